# -*- test-case-name: tests.test_dnsrecords -*-
"""
The DNS records a mail domain served by pop3gw should publish
(C{pop3gw dns DOMAIN}), and their check against what the DNS says
(C{pop3gw dns DOMAIN --check}).

The check asks a resolver with dnspython (blocking: the command has no
reactor), each query bounded by L{QUERY_TIMEOUT}.  It uses the system's
resolver, or the one named by the environment variable
L{RESOLVER_VARIABLE} (C{HOST:PORT}; for tests, which serve the records
from a DNS server on loopback).
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Optional, Sequence

import attr

from pop3gw.dkimkeys import KeyRecord, txtValue, zoneLine
from pop3gw.interfaces import IDKIMKeyStore

#: Seconds one query may take, retries included.
QUERY_TIMEOUT = 5.0

#: The environment variable naming the resolver C{--check} asks
#: (C{HOST:PORT}), instead of the system's (for tests).
RESOLVER_VARIABLE = "POP3GW_DNS_RESOLVER"

OK, MISSING, WRONG, ERROR = "OK", "MISSING", "WRONG", "ERROR"


class LookupError_(Exception):
    """
    A query failed (timeout, server failure): neither found nor missing.
    """


#: A lookup: (name, type) -> the records' texts, [] for none.
Lookup = Callable[[str, str], list]


@attr.s(auto_attribs=True, frozen=True)
class Record:
    """
    One record to publish.

    @ivar name: its owner name (no trailing dot).
    @ivar rtype: its type (C{MX}, C{TXT}, C{SRV}, C{A}, C{CNAME}).
    @ivar value: the zone-file text of its data.
    @ivar check: given a L{Lookup}, the (status, detail) of what the DNS
        holds.
    @ivar comment: what to do with it, for the operator.
    """

    name: str
    rtype: str
    value: str
    check: Callable[[Lookup], tuple] = attr.ib(repr=False, eq=False)
    comment: str = ""

    def zoneLine(self) -> str:
        """
        The zone-file line publishing this record.
        """
        if self.rtype == "TXT":
            return zoneLine(self.name, self.value)
        return f"{self.name}. IN {self.rtype} {self.value}"

    def commentLines(self) -> str:
        """
        L{comment} as zone-file comment lines.
        """
        return "".join(f"; {line}\n" for line in self.comment.splitlines())


def _tags(text: str) -> dict:
    tags = {}
    for part in text.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            tags[k.strip().lower()] = "".join(v.split())
    return tags


def _quote(texts: Sequence[str], limit: int = 120) -> str:
    return ", ".join('"' + (t if len(t) <= limit else t[:limit] + "...") + '"' for t in texts)


def _sameHost(a: str, b: str) -> bool:
    return a.lower().rstrip(".") == b.lower().rstrip(".")


def _mx(domain: str, host: str) -> Callable[[Lookup], tuple]:
    def check(lookup: Lookup) -> tuple:
        found = lookup(domain, "MX")
        if not found:
            return MISSING, "no MX record"
        if any(_sameHost(r.split()[-1], host) for r in found):
            return OK, ", ".join(found)
        return WRONG, f"found {', '.join(found)}, none is {host}"

    return check


def _address(host: str) -> Callable[[Lookup], tuple]:
    def check(lookup: Lookup) -> tuple:
        found = lookup(host, "A") + lookup(host, "AAAA")
        if not found:
            return MISSING, f"{host} has no address"
        return OK, ", ".join(found)

    return check


def _prefixed(name: str, prefix: str) -> Callable[[Lookup], list]:
    def find(lookup: Lookup) -> list:
        return [t for t in lookup(name, "TXT") if t.lower().startswith(prefix.lower())]

    return find


def _spf(domain: str) -> Callable[[Lookup], tuple]:
    find = _prefixed(domain, "v=spf1")

    def check(lookup: Lookup) -> tuple:
        found = find(lookup)
        if not found:
            return MISSING, "no v=spf1 TXT record"
        if len(found) > 1:
            return WRONG, f"{len(found)} SPF records (RFC 7208 4.5: a permanent error): {_quote(found)}"
        terms = found[0].lower().split()
        if "+all" in terms or "all" in terms:
            return WRONG, f"found {_quote(found)}: +all lets anyone send as {domain}"
        if not ({"mx", "+mx"} & set(terms)):
            return WRONG, f"found {_quote(found)}: does not name the MX hosts (mx)"
        return OK, _quote(found)

    return check


def _dkim(name: str, publicKey: str) -> Callable[[Lookup], tuple]:
    def check(lookup: Lookup) -> tuple:
        found = lookup(name, "TXT")
        if not found:
            return MISSING, "no DKIM key record"
        for text in found:
            if _tags(text).get("p") == publicKey:
                return OK, "the key matches"
        return WRONG, f"found {_quote(found, 60)}: not this key"

    return check


def _policy(name: str, prefix: str, required: str, extra: Optional[Callable[[dict], str]] = None) -> Callable[[Lookup], tuple]:
    find = _prefixed(name, prefix)

    def check(lookup: Lookup) -> tuple:
        found = find(lookup)
        if not found:
            return MISSING, f"no {prefix} TXT record"
        if len(found) > 1:
            return WRONG, f"{len(found)} {prefix} records: {_quote(found)}"
        tags = _tags(found[0])
        if required not in tags:
            return WRONG, f"found {_quote(found)}: no {required}= tag"
        note = extra(tags) if extra is not None else ""
        return OK, _quote(found) + note

    return check


def _dmarcNote(tags: dict) -> str:
    if tags.get("p") not in ("none", "quarantine", "reject"):
        return " (p= is not none, quarantine or reject)"
    if tags["p"] == "none":
        return " (p=none only monitors: tighten to quarantine, then reject, once the reports are clean)"
    return ""


def _srv(name: str, port: int, host: str) -> Callable[[Lookup], tuple]:
    def check(lookup: Lookup) -> tuple:
        found = lookup(name, "SRV")
        if not found:
            return MISSING, "no SRV record"
        for r in found:
            fields = r.split()
            if len(fields) == 4 and fields[2] == str(port) and _sameHost(fields[3], host):
                return OK, r
        return WRONG, f"found {', '.join(found)}"

    return check


def _exists(name: str) -> Callable[[Lookup], tuple]:
    def check(lookup: Lookup) -> tuple:
        found = lookup(name, "A") + lookup(name, "AAAA")
        return (OK, ", ".join(found)) if found else (MISSING, f"{name} does not resolve")

    return check


def mtaSTSPolicy(host: str) -> str:
    """
    The MTA-STS policy file (RFC 8461 3.2) for mail to C{host}: served at
    C{https://mta-sts.DOMAIN/.well-known/mta-sts.txt}.  It starts in
    C{testing} mode.
    """
    return f"version: STSv1\nmode: testing\nmx: {host}\nmax_age: 86400\n"


def records(domain: str, host: str, keys: Sequence[tuple[KeyRecord, str]]) -> list[Record]:
    """
    The records C{domain} should publish when C{host} is its pop3gw
    server.

    @param keys: the domain's DKIM keys with their public key data (the
        C{p=} value), active or not: during a rotation both are published.
    """
    policy = mtaSTSPolicy(host)
    policyId = hashlib.sha256(policy.encode("ascii")).hexdigest()[:16]
    postmaster = f"mailto:postmaster@{domain}"
    out = [
        Record(domain, "MX", f"10 {host}.", _mx(domain, host), "mail for the domain goes to this server"),
        Record(host, "A", "<this server's public IPv4 address>", _address(host),
               "and AAAA for IPv6; the address's PTR record should name the host back"),
        Record(domain, "TXT", "v=spf1 mx -all", _spf(domain), "only the MX hosts send mail for the domain"),
    ]
    for record, public in keys:
        name = f"{record.selector}._domainkey.{domain}"
        state = "signs now" if record.active else "not signing (keep it published while mail signed with it may be checked)"
        out.append(Record(name, "TXT", txtValue(record.algorithm, public), _dkim(name, public),
                          f"DKIM {record.algorithm} key, {state}"))
    out += [
        Record(f"_dmarc.{domain}", "TXT", f"v=DMARC1; p=none; rua={postmaster}",
               _policy(f"_dmarc.{domain}", "v=DMARC1", "p", _dmarcNote),
               "a start that only collects reports; tighten to p=quarantine, then p=reject, once they are clean"),
        Record(f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={policyId}",
               _policy(f"_mta-sts.{domain}", "v=STSv1", "id"),
               "change id= whenever the policy file changes"),
        Record(f"mta-sts.{domain}", "CNAME", f"{host}.", _exists(f"mta-sts.{domain}"),
               f"a host name whose HTTPS server (a certificate for mta-sts.{domain}) answers\n"
               f"https://mta-sts.{domain}/.well-known/mta-sts.txt with this policy file:\n"
               + "".join("    " + line + "\n" for line in policy.splitlines())
               + "move to mode: enforce once the TLS reports are clean (pop3gw does not serve this file)"),
        Record(f"_smtp._tls.{domain}", "TXT", f"v=TLSRPTv1; rua={postmaster}",
               _policy(f"_smtp._tls.{domain}", "v=TLSRPTv1", "rua"), "TLS failure reports (RFC 8460)"),
    ]
    for service, priority, port, what in (
        ("submissions", 0, 465, "submission over implicit TLS (RFC 8314)"),
        ("submission", 10, 587, "submission with STARTTLS"),
        ("pop3s", 0, 995, "POP3 over implicit TLS"),
        ("pop3", 10, 110, "POP3 with STLS"),
    ):
        name = f"_{service}._tcp.{domain}"
        out.append(Record(name, "SRV", f"{priority} 1 {port} {host}.", _srv(name, port, host),
                          f"{what}, for mail clients (RFC 6186); '0 0 0 .' for a service not offered"))
    out += [
        Record(f"autoconfig.{domain}", "CNAME", f"{host}.", _exists(f"autoconfig.{domain}"),
               "Thunderbird's autoconfig, if a web server there serves /mail/config-v1.1.xml"),
        Record(f"autodiscover.{domain}", "CNAME", f"{host}.", _exists(f"autodiscover.{domain}"),
               "Outlook's autodiscover, if a web server there serves /autodiscover/autodiscover.xml"),
    ]
    return out


def domainRecords(store: IDKIMKeyStore, domain: str, host: str) -> list[Record]:
    """
    L{records} for C{domain}, with the DKIM keys of C{store}.

    @raise pop3gw.dkimkeys.DKIMKeyError: a key cannot be read.
    """
    keys = []
    for record in store.records():
        if record.domain == domain:
            keys.append((record, _pValue(store.publicRecord(record)[1])))
    return records(domain, host, keys)


def _pValue(text: str) -> str:
    return _tags(text)["p"]


def dnspythonLookup(resolverAddress: Optional[str] = None, timeout: float = QUERY_TIMEOUT) -> Lookup:
    """
    A L{Lookup} asking the system's resolver, or C{resolverAddress}
    (C{HOST:PORT}), with dnspython.
    """
    import dns.exception
    import dns.resolver

    if resolverAddress:
        host, _, port = resolverAddress.rpartition(":")
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [host.strip("[]")]
        resolver.port = int(port)
    else:
        resolver = dns.resolver.Resolver()
    resolver.lifetime = timeout

    def lookup(name: str, rtype: str) -> list:
        try:
            answer = resolver.resolve(name + ".", rtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as e:
            raise LookupError_(f"{type(e).__name__}") from None
        texts = []
        for rdata in answer:
            if rtype == "TXT":
                texts.append(b"".join(rdata.strings).decode("utf-8", "replace"))
            else:
                texts.append(rdata.to_text())
        return texts

    return lookup


def checkRecords(recordList: Sequence[Record], lookup: Lookup) -> list[tuple[str, Record, str]]:
    """
    @return: (status, record, detail) for each record: L{OK}, L{MISSING},
        L{WRONG}, or L{ERROR} when the query itself failed.
    """
    results = []
    for record in recordList:
        try:
            status, detail = record.check(lookup)
        except LookupError_ as e:
            status, detail = ERROR, f"query failed: {e}"
        results.append((status, record, detail))
    return results


def resolverFromEnvironment() -> Optional[str]:
    """
    The resolver address set by L{RESOLVER_VARIABLE}, or C{None}.
    """
    return os.environ.get(RESOLVER_VARIABLE) or None
