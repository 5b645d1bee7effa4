# -*- test-case-name: tests.test_mailauth -*-
"""
SPF (RFC 7208), DKIM verification (RFC 6376) and DMARC (RFC 7489) for a
message received from the world, and the C{Authentication-Results:} field
(RFC 8601) that records them.

Everything here blocks on DNS: L{authenticate} runs in a thread (see
L{pop3gw.inbound}), never on the reactor thread.  The work is done by the
maintained libraries of the field; this module only feeds them DNS and
reads their answers:

  - pyspf (C{spf}) evaluates SPF, with its limits (10 DNS-querying terms,
    2 void lookups, RFC 7208 4.6.4).  It has no per-query DNS hook: it
    calls its module-level C{spf.DNSLookup}.  That name is replaced (once,
    by L{checkSPF}) with a function that answers through the L{DNSClient}
    of the current thread, and through pyspf's own lookup for a thread that
    has none.
  - dkimpy (C{dkim}) verifies each C{DKIM-Signature:} with a C{dnsfunc}
    given per call: L{DNSClient.dkimKey}.
  - DMARC policy discovery and alignment are RFC 7489 6.6 read directly:
    the record at C{_dmarc.<From domain>}, else at C{_dmarc.<organizational
    domain>}, the organizational domain from the Public Suffix List
    (C{publicsuffixlist}).
  - authres formats the results.

All DNS goes through one dnspython C{Resolver} (the system's, or the
C{[inbound] dns-server} one), each query bounded by the smaller of the
per-query timeout and what is left of the message's deadline; a query
past the deadline fails at once, so a message's checks end with
C{temperror} rather than late.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import re
import threading
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import attr
import authres
import authres.dmarc
import dkim
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import spf
from publicsuffixlist import PublicSuffixList

__all__ = [
    "AuthenticationResults",
    "DKIMResult",
    "DMARCResult",
    "DNSClient",
    "DNSTemporaryError",
    "SPFResult",
    "authenticate",
    "checkDKIM",
    "checkDMARC",
    "checkSPF",
    "fromDomains",
    "makeResolver",
]

#: DKIM signatures verified per message; more are not looked at (RFC 6376
#: 6.1 lets a verifier limit them).
MAX_SIGNATURES = 5

#: A domain name as it may be written in a result: LDH labels.
_DOMAIN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9\-_]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9\-_]{0,61}[A-Za-z0-9])?)*$")
#: A local part that may be written in C{smtp.mailfrom} as it is.
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+)*$")

#: dkimpy writes its diagnostics to a stdlib logger; they name
#: sender-controlled text and are not wanted in pop3gw's log.
_dkimLog = logging.getLogger("pop3gw.mailauth.dkim")
_dkimLog.addHandler(logging.NullHandler())
_dkimLog.propagate = False


def isDomainName(text: str) -> bool:
    """
    Whether C{text} is a plain DNS name (letters, digits, hyphens, dots).
    """
    return bool(_DOMAIN.match(text))


class DNSTemporaryError(Exception):
    """
    A lookup failed for now (timeout, server failure, the message's deadline
    passed): the check it served is C{temperror}.
    """


def makeResolver(server: Optional[tuple[str, int]] = None) -> dns.resolver.Resolver:
    """
    The dnspython resolver for the checks.

    @param server: C{(address, port)} of the one name server to ask, or
        C{None} for the system's (C{/etc/resolv.conf}).
    """
    if server is None:
        return dns.resolver.Resolver()
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server[0]]
    resolver.port = server[1]
    return resolver


@attr.s(auto_attribs=True)
class DNSClient:
    """
    The lookups of one message's checks, in one thread.

    @ivar resolver: a dnspython C{Resolver}.
    @ivar timeout: seconds one query may take.
    @ivar deadline: the C{monotonic} time after which every query fails
        with L{DNSTemporaryError}.
    @ivar monotonic: the clock for C{deadline}.
    """

    resolver: Any
    timeout: float
    deadline: float
    monotonic: Callable[[], float] = time.monotonic

    def remaining(self) -> float:
        """
        @return: seconds left before the deadline (never negative).
        """
        return max(0.0, self.deadline - self.monotonic())

    def query(self, name: str, rdtype: str) -> list:
        """
        @return: the records of type C{rdtype} at C{name} (dnspython rdata),
            an empty list for a name that does not exist or has none.
        @raise DNSTemporaryError: timeout, server failure, deadline passed.
        """
        lifetime = min(self.timeout, self.remaining())
        if lifetime <= 0:
            raise DNSTemporaryError("deadline passed")
        try:
            answer = self.resolver.resolve(name, rdtype, lifetime=lifetime, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.NoRootSOA) as e:
            raise DNSTemporaryError(type(e).__name__) from None
        except dns.exception.DNSException as e:
            raise DNSTemporaryError(type(e).__name__) from None
        return list(answer)

    def txt(self, name: str) -> list[bytes]:
        """
        @return: the TXT records at C{name}, each one's strings joined.
        """
        return [b"".join(rdata.strings) for rdata in self.query(name, "TXT")]

    def dkimKey(self, name: bytes, timeout: float = 5) -> Optional[bytes]:
        """
        dkimpy's C{dnsfunc}: the key record at C{name}, or C{None}.
        """
        records = self.txt(name.decode("ascii", "replace"))
        return records[0] if records else None

    def spfLookup(self, name: str, qtype: str) -> list:
        """
        pyspf's C{DNSLookup} contract: C{((name, qtype), value)} pairs.

        @raise spf.TempError: see L{query}.
        """
        try:
            records = self.query(name, qtype)
        except DNSTemporaryError as e:
            raise spf.TempError("DNS " + str(e)) from None
        out = []
        for rdata in records:
            value: Any
            if qtype in ("A", "AAAA"):
                value = rdata.address
            elif qtype == "MX":
                value = (rdata.preference, rdata.exchange.to_text(True))
            elif qtype == "PTR":
                value = rdata.target.to_text(True)
            elif qtype in ("TXT", "SPF"):
                value = rdata.strings
            else:
                continue
            out.append(((name, qtype), value))
        return out


# --- SPF ---------------------------------------------------------------------

_spfThread = threading.local()
_pyspfLookup = spf.DNSLookup


def _spfDNSLookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list:
    client = getattr(_spfThread, "client", None)
    if client is None:
        return _pyspfLookup(name, qtype, strict, timeout)
    return client.spfLookup(name, qtype)


@attr.s(frozen=True, auto_attribs=True)
class SPFResult:
    """
    @ivar result: C{pass}, C{fail}, C{softfail}, C{neutral}, C{none},
        C{permerror} or C{temperror}.
    @ivar scope: C{"mailfrom"} or C{"helo"} (the null reverse path).
    @ivar domain: the domain checked (DMARC aligns it), C{""} if none.
    @ivar identity: what the C{Authentication-Results} property names.
    """

    result: str
    scope: str
    domain: str
    identity: str


def checkSPF(client: DNSClient, ip: str, sender: Optional[str], helo: str) -> SPFResult:
    """
    SPF for the MAIL FROM identity, or the HELO identity when the reverse
    path is null (RFC 7208 2.4).
    """
    if spf.DNSLookup is not _spfDNSLookup:
        spf.DNSLookup = _spfDNSLookup
    if sender:
        local, _, domain = sender.rpartition("@")
        domain = domain.lower()
        scope, identity = "mailfrom", (sender if _DOT_ATOM.match(local) else domain)
    else:
        domain = helo.lower().rstrip(".")
        scope, identity = "helo", domain
    if not isDomainName(domain):
        return SPFResult("none", scope, "", "")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        # No address to authorise (a Unix-socket client).
        return SPFResult("none", scope, domain, identity)
    _spfThread.client = client
    try:
        q = spf.query(i=ip, s=sender or "", h=domain if not sender else helo, timeout=client.timeout,
                      querytime=max(client.remaining(), 0.001))
        result, _code, _text = q.check()
    except spf.TempError:
        result = "temperror"
    finally:
        _spfThread.client = None
    if result not in ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"):
        result = "permerror"
    return SPFResult(result, scope, domain, identity)


# --- DKIM --------------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class DKIMResult:
    """
    One signature's outcome.

    @ivar result: C{pass}, C{fail}, C{permerror} or C{temperror}.
    @ivar domain: its C{d=}, C{""} if unreadable.
    @ivar selector: its C{s=}, C{""} if unreadable.
    """

    result: str
    domain: str
    selector: str


def _signatureTags(value: bytes) -> tuple[str, str]:
    try:
        tags = dkim.util.parse_tag_value(value)
    except Exception:
        return "", ""
    domain = tags.get(b"d", b"").decode("ascii", "replace").lower()
    selector = tags.get(b"s", b"").decode("ascii", "replace")
    return (domain if isDomainName(domain) else ""), (selector if isDomainName(selector) else "")


def checkDKIM(client: DNSClient, message: bytes) -> tuple[DKIMResult, ...]:
    """
    Verify every C{DKIM-Signature:} (at most L{MAX_SIGNATURES}).

    @return: one L{DKIMResult} per signature, top first; none if unsigned.
    """
    try:
        verifier = dkim.DKIM(message, logger=_dkimLog, timeout=client.timeout)
    except dkim.DKIMException:
        return ()
    signatures = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    results = []
    for index, value in enumerate(signatures[:MAX_SIGNATURES]):
        domain, selector = _signatureTags(value)
        try:
            ok = verifier.verify(index, dnsfunc=client.dkimKey)
        except DNSTemporaryError:
            results.append(DKIMResult("temperror", domain, selector))
            continue
        except dkim.ValidationError:
            # The body hash or a tag does not match: the signature fails.
            results.append(DKIMResult("fail", domain, selector))
            continue
        except dkim.DKIMException:
            results.append(DKIMResult("permerror", domain, selector))
            continue
        except Exception:
            # A signature dkimpy cannot digest (malformed key material).
            results.append(DKIMResult("permerror", domain, selector))
            continue
        results.append(DKIMResult("pass" if ok else "fail", domain, selector))
    return tuple(results)


# --- DMARC -------------------------------------------------------------------


def fromDomains(message: bytes) -> Optional[list[str]]:
    """
    The domains of the addresses in the message's C{From:} fields (RFC
    5322.From), lower-cased, in order, each once.

    @return: the domains, or C{None} when there is no usable one (no
        C{From:}, only addresses without a domain or whose domain is not a
        DNS name).
    """
    values = [value for name, value in headerFields(message) if name == b"from"]
    if not values:
        return None
    domains: list[str] = []
    for _, spec in email.utils.getaddresses([v.decode("utf-8", "replace") for v in values]):
        domain = spec.rpartition("@")[2].lower().rstrip(".")
        # An unusable address is skipped, not a reason to skip DMARC for
        # the others.
        if "@" in spec and isDomainName(domain) and domain not in domains:
            domains.append(domain)
    return domains or None


def headerFields(message: bytes) -> list[tuple[bytes, bytes]]:
    """
    The unfolded fields of C{message}'s header section: (lower-cased name,
    value) pairs.
    """
    out: list[tuple[bytes, bytes]] = []
    for field in splitHeader(message)[0]:
        name, _, value = field.partition(b":")
        out.append((name.strip(b" \t").lower(), value.replace(b"\r\n", b"").strip(b" \t")))
    return out


def splitHeader(message: bytes) -> tuple[list[bytes], int]:
    """
    Split C{message} (CRLF line ends) into its header fields, each with its
    folded lines and CRLFs, and the offset of the blank line that ends the
    header section (or of the first line that is not part of a field).
    """
    fields: list[bytes] = []
    offset = 0
    while offset < len(message):
        end = message.find(b"\r\n", offset)
        end = len(message) if end == -1 else end + 2
        line = message[offset:end]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif b":" in line and line[:1] not in (b"\r", b"\n", b" ", b"\t") and re.match(rb"[!-9;-~]+[ \t]*:", line):
            fields.append(line)
        else:
            break
        offset = end
    return fields, offset


@attr.s(frozen=True, auto_attribs=True)
class DMARCResult:
    """
    @ivar result: C{pass}, C{fail}, C{none} (no policy, no usable From
        domain), C{temperror} or C{permerror}.
    @ivar fromDomain: the RFC 5322.From domain evaluated, C{""} if none.
    @ivar policy: the published policy that applies (C{p=}, or C{sp=} for a
        subdomain when the record is the organizational domain's):
        C{none}, C{quarantine} or C{reject}; C{""} without a record.
    @ivar disposition: what the policy asks of this message once C{pct=}
        sampled it: C{none}, C{quarantine} or C{reject}.
    """

    result: str
    fromDomain: str = ""
    policy: str = ""
    disposition: str = "none"


_STRICTNESS = {"none": 0, "quarantine": 1, "reject": 2}
_LOWER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


def parseDMARCRecord(text: str) -> Optional[dict[str, str]]:
    """
    The tags of a DMARC record (RFC 7489 6.3), or C{None} if it is not one
    (it must start with C{v=DMARC1}).  Unknown tags are kept, invalid
    values of known tags are dropped (defaults apply).
    """
    parts = [p.strip() for p in text.split(";")]
    first = parts[0].replace(" ", "")
    if first != "v=DMARC1":
        return None
    tags: dict[str, str] = {}
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        if not eq:
            continue
        tags.setdefault(name.strip().lower(), value.strip())
    for key in ("p", "sp"):
        if tags.get(key, "").lower() not in _STRICTNESS:
            tags.pop(key, None)
        else:
            tags[key] = tags[key].lower()
    for key in ("adkim", "aspf"):
        if tags.get(key, "r").lower() not in ("r", "s"):
            tags.pop(key)
    if "pct" in tags and not (tags["pct"].isdigit() and 0 <= int(tags["pct"]) <= 100):
        tags.pop("pct")
    return tags


def _record(client: DNSClient, domain: str) -> Optional[dict[str, str]]:
    records = []
    for raw in client.txt("_dmarc." + domain):
        tags = parseDMARCRecord(raw.decode("utf-8", "replace"))
        if tags is not None:
            records.append(tags)
    # RFC 7489 6.6.3: several records, or none, is no policy.
    return records[0] if len(records) == 1 else None


@attr.s(frozen=True)
class OrganizationalDomains:
    """
    The organizational domain of a name (RFC 7489 3.2): its public suffix
    plus one label, from the Public Suffix List.
    """

    _psl: PublicSuffixList = attr.ib(factory=PublicSuffixList)

    def __call__(self, domain: str) -> str:
        """
        @return: C{domain}'s organizational domain (C{domain} itself if it
            is a public suffix).
        """
        return self._psl.privatesuffix(domain.lower()) or domain.lower()


def aligned(a: str, b: str, mode: str, organizational: Callable[[str], str]) -> bool:
    """
    Identifier alignment (RFC 7489 3.1): C{"s"} (strict) wants the same
    name, C{"r"} (relaxed) the same organizational domain.
    """
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return a == b or organizational(a) == organizational(b)


def checkDMARC(
    client: DNSClient,
    fromDomain: str,
    spfResult: SPFResult,
    dkimResults: Sequence[DKIMResult],
    organizational: Callable[[str], str],
    sample: Callable[[], float],
) -> DMARCResult:
    """
    DMARC for one RFC 5322.From domain (RFC 7489 6.6).

    @param sample: a random number in [0, 1) for C{pct=}.
    """
    try:
        tags = _record(client, fromDomain)
        orgDomain = organizational(fromDomain)
        atOrg = False
        if tags is None and orgDomain != fromDomain:
            tags = _record(client, orgDomain)
            atOrg = True
    except DNSTemporaryError:
        return DMARCResult("temperror", fromDomain)
    if tags is None:
        return DMARCResult("none", fromDomain)
    policy = tags.get("p", "none")
    if atOrg and "sp" in tags:
        policy = tags["sp"]
    dkimPass = any(
        r.result == "pass" and aligned(fromDomain, r.domain, tags.get("adkim", "r"), organizational)
        for r in dkimResults
    )
    spfPass = spfResult.result == "pass" and aligned(fromDomain, spfResult.domain, tags.get("aspf", "r"), organizational)
    if dkimPass or spfPass:
        return DMARCResult("pass", fromDomain, policy, "none")
    if spfResult.result == "temperror" or any(r.result == "temperror" for r in dkimResults):
        return DMARCResult("temperror", fromDomain, policy, "none")
    disposition = policy
    pct = int(tags.get("pct", "100"))
    if pct < 100 and sample() * 100 >= pct:
        disposition = _LOWER[policy]
    return DMARCResult("fail", fromDomain, policy, disposition)


# --- all of it ----------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class AuthenticationResults:
    """
    The checks of one message.

    @ivar dmarc: the result for the (strictest) From domain.
    """

    spf: SPFResult
    dkim: tuple[DKIMResult, ...]
    dmarc: DMARCResult

    def header(self, authservID: str) -> bytes:
        """
        The C{Authentication-Results:} field naming C{authservID}, folded
        one method per line, CRLF included.
        """
        spfResult = self.spf
        spfRecord = (
            authres.SPFAuthenticationResult(result=spfResult.result, smtp_mailfrom=spfResult.identity)
            if spfResult.scope == "mailfrom" and spfResult.identity
            else authres.SPFAuthenticationResult(result=spfResult.result, smtp_helo=spfResult.identity)
            if spfResult.identity
            else authres.SPFAuthenticationResult(result=spfResult.result)
        )
        results: list[Any] = [spfRecord]
        for d in self.dkim or (None,):
            if d is None:
                results.append(authres.DKIMAuthenticationResult(result="none"))
            else:
                results.append(
                    authres.DKIMAuthenticationResult(
                        result=d.result, header_d=d.domain or None, header_s=d.selector or None
                    )
                )
        dmarc = self.dmarc
        results.append(
            authres.dmarc.DMARCAuthenticationResult(
                result=dmarc.result, header_from=dmarc.fromDomain or None, policy=dmarc.policy or None
            )
        )
        text = f"Authentication-Results: {authservID};\r\n\t" + ";\r\n\t".join(str(r) for r in results) + "\r\n"
        return text.encode("ascii", "replace")

    def summary(self) -> str:
        """
        The results for a log line: C{spf=pass dkim=pass,fail dmarc=pass}.
        """
        dkimText = ",".join(d.result for d in self.dkim) or "none"
        dmarc = self.dmarc.result
        if self.dmarc.result == "fail":
            dmarc += f"({self.dmarc.disposition})"
        return f"spf={self.spf.result} dkim={dkimText} dmarc={dmarc}"


def temporaryResults(sender: Optional[str], helo: str) -> AuthenticationResults:
    """
    What is recorded when the checks did not finish before the deadline.
    """
    domain = (sender or "").rpartition("@")[2].lower() if sender else helo.lower()
    scope = "mailfrom" if sender else "helo"
    identity = domain if isDomainName(domain) else ""
    return AuthenticationResults(
        SPFResult("temperror", scope, identity, identity), (), DMARCResult("temperror")
    )


def authenticate(
    client: DNSClient,
    message: bytes,
    ip: str,
    sender: Optional[str],
    helo: str,
    organizational: Callable[[str], str],
    sample: Callable[[], float],
) -> AuthenticationResults:
    """
    SPF, DKIM and DMARC for one message.  Blocks: run it in a thread.

    With several From domains, each is evaluated and the strictest outcome
    kept (RFC 7489 6.6.1): a failure wins over a pass.
    """
    spfResult = checkSPF(client, ip, sender, helo)
    dkimResults = checkDKIM(client, message)
    domains = fromDomains(message)
    if domains is None:
        return AuthenticationResults(spfResult, dkimResults, DMARCResult("none"))
    return AuthenticationResults(
        spfResult, dkimResults, _strictest(checkDMARC(client, d, spfResult, dkimResults, organizational, sample) for d in domains)
    )


_RANK = {"pass": 0, "none": 0, "permerror": 1, "temperror": 2, "fail": 3}


def _strictest(results: Iterable[DMARCResult]) -> DMARCResult:
    def key(r: DMARCResult) -> tuple[int, int]:
        return _RANK[r.result], _STRICTNESS.get(r.disposition, 0)

    return max(results, key=key)
