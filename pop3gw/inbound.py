# -*- test-case-name: tests.test_inbound -*-
"""
What happens at the end of the data of a message received on C{--mx}: its
SPF, DKIM and DMARC results (L{pop3gw.mailauth}, run in a thread), the
optional rspamd verdict (HTTP, on the reactor), the policy that acts on
them, and the header fields the stored message gets.

The MX listener hands the message to a L{CheckedDelivery} instead of the
maildrops' delivery: it holds the message (the header must be changed
before anything is stored, and DKIM needs the whole of it), and its
C{commit} runs L{InboundChecker.check} and then either writes the message,
rewritten, into the real delivery and commits that, or aborts it and fails
with L{SMTPRefusal}, which the end of the data answers with its reply.

Policy (L{InboundPolicy}; the C{[inbound]} INI section):

  - DMARC C{fail} with the disposition C{reject} (after C{pct=}):
    C{550 5.7.1} (C{dmarc-reject = yes}, the default; with C{no} it is
    quarantined instead).
  - DMARC C{fail} with the disposition C{quarantine}: delivered with the
    subject tag and C{X-Spam-Flag: YES} (C{dmarc-quarantine = yes}).
  - A From domain in C{allow-domains} (or under one) is never acted on.
  - A DNS C{temperror} that keeps DMARC from a verdict: delivered with
    the results recorded, or C{451 4.4.3} with C{temperror = defer}.
  - rspamd (C{rspamd-url}): C{reject} is C{550 5.7.1}, C{soft reject} and
    C{greylist} are C{451 4.7.1}, C{add header} and C{rewrite subject}
    mark the message as spam (the tag or rspamd's subject, and
    C{X-Spam-Flag: YES}); its score is written as C{X-Spam-Score:} and the
    header fields its C{milter.add_headers} names are added.  rspamd not
    answering in C{rspamd-timeout} seconds (or answering nonsense) lets
    the message through (C{rspamd-failure = accept}) or gets C{451 4.7.1}
    (C{defer}).

Behind a front MTA (LMTP, with C{lmtp-checks = yes}; C{pop3gw deliver}
through L{checkNow}), the same checks run with C{behindMTA}: a message
whose topmost C{Authentication-Results:} field names one of
C{trusted-authserv-ids} is delivered unchanged (the front MTA checked
it), forged fields naming a trusted front MTA are removed too, and a
DMARC p=reject failure is quarantined unless C{lmtp-dmarc-reject = yes}
(a refusal there makes the front MTA bounce to a likely forged sender).

The stored message starts with one C{Authentication-Results:} field (RFC
8601) naming the server's host name, then the spam fields, then the
C{Received:} field; earlier C{Authentication-Results:} fields that name
this host (in any case) are forgeries and are removed, the others kept.
"""

from __future__ import annotations

import json
import random
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import attr
from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from pop3gw import events, mailauth
from pop3gw.inboundpolicy import InboundPolicy, Session
from pop3gw.interfaces import IDelivery, IRoutedDelivery
from pop3gw.smtpreplies import Reply, SMTPRefusal

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

__all__ = [
    "CheckedDelivery",
    "InboundChecker",
    "InboundPolicy",
    "RspamdClient",
    "Session",
    "Verdict",
]

DMARC_REJECTED = Reply(550, "5.7.1 Message rejected by the sender domain's DMARC policy")
SPAM_REJECTED = Reply(550, "5.7.1 Message rejected as spam")
SPAM_DEFERRED = Reply(451, "4.7.1 Try again later")
DNS_DEFERRED = Reply(451, "4.4.3 Temporary DNS failure checking the sender, try again later")
FILTER_DEFERRED = Reply(451, "4.7.1 The message could not be checked, try again later")

#: Seconds the reactor waits past the checks' own deadline before it
#: records C{temperror} without their answer.
DEADLINE_GRACE = 2.0

#: Octets of rspamd's answer read at most.
MAX_RSPAMD_ANSWER = 1024 * 1024

#: rspamd header fields (C{milter.add_headers}) taken per message.
MAX_RSPAMD_HEADERS = 10
#: rspamd may add only C{X-} fields (C{X-Spamd-Result}, C{X-Rspamd-Server},
#: ...): never one that would replace a trace or authentication field.
_FIELD_NAME = re.compile(r"^[Xx]-[A-Za-z0-9][A-Za-z0-9\-]{0,61}$")
_SPAM_FIELDS = (b"x-spam-flag", b"x-spam-score")

log = Logger()


@attr.s(frozen=True, auto_attribs=True)
class Verdict:
    """
    The outcome of the checks.

    @ivar reply: the refusal, or C{None} to deliver.
    @ivar message: the message to store (rewritten).
    @ivar summary: the results for the log line.
    @ivar action: C{deliver}, C{quarantine}, C{reject} or C{defer}.
    """

    reply: Optional[Reply]
    message: bytes
    summary: str
    action: str


class RspamdError(Exception):
    """
    rspamd could not be asked, or answered something unusable.
    """


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@attr.s(auto_attribs=True)
class RspamdClient:
    """
    rspamd's HTTP protocol (C{POST /checkv2}, the message as the body, the
    envelope in request headers).

    @ivar agent: a C{twisted.web.iweb.IAgent}.
    @ivar url: the C{/checkv2} URL.
    @ivar clock: for the timeout.
    @ivar timeout: seconds the answer may take.
    @ivar hostname: this server's name (rspamd's C{MTA-Name}).
    """

    agent: Any
    url: str
    clock: Any
    timeout: float
    hostname: str = ""

    def check(self, message: bytes, session: Session) -> Deferred:
        """
        @return: a C{Deferred} firing with rspamd's answer (a dict), or
            failing with L{RspamdError} (or C{TimeoutError}).
        """
        headers = Headers()
        for name, value in _rspamdHeaders(session, self.hostname):
            headers.addRawHeader(name, value)
        d = self.agent.request(b"POST", self.url.encode("ascii"), headers, _BytesProducer(message))
        d.addCallback(self._cbResponse)
        d.addTimeout(self.timeout, self.clock)
        return d

    def _cbResponse(self, response: Any) -> Deferred:
        if response.code != 200:
            # Drain and drop the body.
            response.deliverBody(_Discard())
            raise RspamdError(f"HTTP {response.code}")
        finished: Deferred = Deferred()
        response.deliverBody(_BodyReader(finished))
        return finished.addCallback(_parseAnswer)


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


class _BodyReader(Protocol):
    """
    Collects a response body of at most L{MAX_RSPAMD_ANSWER} octets.
    """

    def __init__(self, finished: Deferred) -> None:
        self._finished = finished
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._finished.called:
            return
        self._size += len(data)
        if self._size > MAX_RSPAMD_ANSWER:
            self._finished.errback(RspamdError("answer too long"))
            transport: Any = self.transport
            transport.stopProducing()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(RspamdError("answer cut short"))


def _parseAnswer(body: bytes) -> dict:
    try:
        answer = json.loads(body)
    except ValueError:
        raise RspamdError("not JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("action"), str):
        raise RspamdError("no action")
    return answer


def _rspamdHeaders(session: Session, hostname: str) -> list[tuple[bytes, bytes]]:
    """
    The request header fields that tell rspamd the envelope of C{session}.
    """
    fields = [
        (b"IP", session.ip.encode("ascii", "replace")),
        (b"Helo", _headerSafe(session.helo)),
        (b"From", _headerSafe(session.sender or "")),
    ]
    fields.extend((b"Rcpt", _headerSafe(recipient)) for recipient in session.recipients)
    fields.append((b"Hostname", _headerSafe(session.reverseName or "unknown")))
    if hostname:
        fields.append((b"MTA-Name", _headerSafe(hostname)))
    return fields


def askRspamdNow(url: str, timeout: float, hostname: str, message: bytes, session: Session) -> Any:
    """
    Ask rspamd about C{message} and wait for the answer (C{pop3gw
    deliver} has no reactor): the protocol of L{RspamdClient}, over
    C{http.client}; each step (connect, send, each read) may take
    C{timeout} seconds.

    @return: rspamd's answer (a dict), or a L{Failure} of L{RspamdError}.
    """
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    connection: Optional[http.client.HTTPConnection] = None
    try:
        kind = {"http": http.client.HTTPConnection, "https": http.client.HTTPSConnection}.get(parts.scheme)
        if kind is None or not parts.hostname:
            raise RspamdError("not an http:// or https:// URL")
        connection = kind(parts.hostname, parts.port, timeout=timeout)
        connection.putrequest("POST", (parts.path or "/checkv2") + (f"?{parts.query}" if parts.query else ""))
        for name, value in _rspamdHeaders(session, hostname):
            connection.putheader(name.decode("ascii"), value)
        connection.putheader("Content-Length", str(len(message)))
        connection.endheaders(message)
        response = connection.getresponse()
        if response.status != 200:
            raise RspamdError(f"HTTP {response.status}")
        body = response.read(MAX_RSPAMD_ANSWER + 1)
        if len(body) > MAX_RSPAMD_ANSWER:
            raise RspamdError("answer too long")
        return _parseAnswer(body)
    except RspamdError:
        return Failure()
    except (OSError, http.client.HTTPException) as e:
        return Failure(RspamdError(" ".join(str(e).split()) or type(e).__name__))
    finally:
        if connection is not None:
            connection.close()


def _headerSafe(text: str) -> bytes:
    return "".join(c if c.isprintable() else "_" for c in text).encode("utf-8", "replace")


# --- the decision --------------------------------------------------------------


@attr.s(auto_attribs=True)
class _Decision:
    reply: Optional[Reply] = None
    action: str = "deliver"
    spam: bool = False
    subject: Optional[bytes] = None
    fields: list[bytes] = attr.Factory(list)
    rspamd: str = ""


def decide(
    policy: InboundPolicy, results: mailauth.AuthenticationResults, rspamd: Any, behindMTA: bool = False
) -> _Decision:
    """
    Act on the results and rspamd's answer (a dict, a L{Failure}, or
    C{None} when rspamd is not configured).

    @param behindMTA: the message came over LMTP or C{pop3gw deliver}:
        a p=reject failure is refused only with C{lmtp-dmarc-reject}.
    """
    decision = _Decision()
    dmarc = results.dmarc
    acted = dmarc.fromDomain and not policy.allowed(dmarc.fromDomain)
    reject = policy.lmtpDMARCReject if behindMTA else policy.dmarcReject
    if dmarc.result == "fail" and acted:
        if dmarc.disposition == "reject" and reject:
            decision.reply, decision.action = DMARC_REJECTED, "reject"
        elif dmarc.disposition in ("reject", "quarantine") and policy.dmarcQuarantine:
            decision.spam, decision.action = True, "quarantine"
    elif dmarc.result == "temperror" and policy.temperrorDefer and (acted or not dmarc.fromDomain):
        decision.reply, decision.action = DNS_DEFERRED, "defer"
    if rspamd is None:
        return decision
    if isinstance(rspamd, Failure):
        decision.rspamd = "unavailable"
        if policy.rspamdFailClosed and decision.reply is None:
            decision.reply, decision.action = FILTER_DEFERRED, "defer"
        return decision
    action = rspamd.get("action", "")
    decision.rspamd = action.replace(" ", "-")
    score = rspamd.get("score")
    if isinstance(score, (int, float)) and not isinstance(score, bool):
        decision.fields.append(b"X-Spam-Score: %.2f\r\n" % score)
    decision.fields.extend(_milterFields(rspamd.get("milter")))
    if decision.reply is not None and decision.reply.code >= 500:
        return decision
    if action == "reject":
        decision.reply, decision.action = SPAM_REJECTED, "reject"
    elif action in ("soft reject", "greylist"):
        if decision.reply is None:
            decision.reply, decision.action = SPAM_DEFERRED, "defer"
    elif action in ("add header", "rewrite subject"):
        decision.spam = True
        if decision.action == "deliver":
            decision.action = "quarantine"
        subject = rspamd.get("subject")
        if action == "rewrite subject" and isinstance(subject, str) and subject.isprintable():
            decision.subject = subject.encode("utf-8")
    return decision


def _milterFields(milter: Any) -> list[bytes]:
    """
    The fields of rspamd's C{milter.add_headers} (C{{name: value}} or
    C{{name: {"value": value}}}), each name a plain C{X-} token, each
    value's line breaks kept only as folding.
    """
    if not isinstance(milter, dict) or not isinstance(milter.get("add_headers"), dict):
        return []
    out = []
    for name, value in list(milter["add_headers"].items())[:MAX_RSPAMD_HEADERS]:
        if isinstance(value, dict):
            value = value.get("value")
        if not isinstance(name, str) or not _FIELD_NAME.match(name) or not isinstance(value, str):
            continue
        if name.lower().encode() in _SPAM_FIELDS:
            continue
        lines = [line.strip() for line in value.replace("\r", "").split("\n")]
        text = "\r\n\t".join(line for line in lines if line)
        if not all(c.isprintable() or c == "\t" for c in text.replace("\r\n", "")):
            continue
        out.append(f"{name}: {text}\r\n".encode("utf-8"))
    return out


def authservID(field: bytes) -> str:
    """
    The authserv-id an C{Authentication-Results:} field names (lower-cased),
    or C{""}.
    """
    text = field.decode("utf-8", "replace").replace("\r\n", "")
    value = text.partition(":")[2]
    previous = None
    while previous != value:
        previous, value = value, re.sub(r"\([^()]*\)", " ", value)
    m = re.match(r'\s*"?([^\s;"]+)', value)
    return m.group(1).lower() if m else ""


def trustedFront(message: bytes, trusted: frozenset) -> Optional[str]:
    """
    The authserv-id of C{message}'s topmost C{Authentication-Results:}
    field if it is one of C{trusted}, else C{None}.
    """
    if not trusted:
        return None
    fields, _ = mailauth.splitHeader(message)
    for field in fields:
        if field.partition(b":")[0].strip(b" \t").lower() == b"authentication-results":
            name = authservID(field)
            return name if name in trusted else None
    return None


def rewrite(
    message: bytes, hostname: str, top: list[bytes], decision: _Decision, tag: bytes, others: frozenset = frozenset()
) -> bytes:
    """
    C{message} with the fields C{top} first, the forged
    C{Authentication-Results:} fields (naming this host, or one of
    C{others}) removed, and the spam marks of C{decision}.
    """
    fields, end = mailauth.splitHeader(message)
    forged = {hostname.lower().rstrip(".")} | set(others)
    added = [b"X-Spam-Flag: YES\r\n"] if decision.spam else []
    replaced = {bytes(f.partition(b":")[0].strip().lower()) for f in decision.fields}
    if decision.spam or any(f.lower().startswith(b"x-spam-score:") for f in decision.fields):
        replaced.update(_SPAM_FIELDS)
    kept = []
    subjectSeen = False
    for field in fields:
        name = field.partition(b":")[0].strip(b" \t").lower()
        if name == b"authentication-results" and authservID(field) in forged:
            continue
        if name in replaced:
            continue
        if name == b"subject" and decision.spam and not subjectSeen:
            subjectSeen = True
            field = _tagged(field, decision.subject, tag)
        kept.append(field)
    if decision.spam and not subjectSeen:
        added.append(b"Subject: " + (decision.subject or tag) + b"\r\n")
    return b"".join(top + added + decision.fields + kept) + message[end:]


def _tagged(field: bytes, subject: Optional[bytes], tag: bytes) -> bytes:
    if subject is not None:
        return b"Subject: " + subject + b"\r\n"
    value = field.partition(b":")[2].lstrip(b" \t")
    if value.startswith(tag) or not tag:
        return field
    return b"Subject: " + tag + b" " + value


# --- the checker -----------------------------------------------------------------


def _orgDomains() -> Callable[[str], str]:
    return mailauth.OrganizationalDomains()


class InboundChecker:
    """
    Runs the checks of one message and decides (see the module docstring).

    @param hostname: the authserv-id of the C{Authentication-Results:}
        field (the server's host name).
    @param policy: the L{InboundPolicy}.
    @param runner: an L{IBlockingRunner} for the DNS work (a bounded pool of
        its own in the server).
    @param clock: C{IReactorTime}, for the deadline.
    @param rspamd: an L{RspamdClient}, or C{None}.
    @param authenticate: C{(message, session) -> AuthenticationResults},
        blocking; by default L{mailauth.authenticate} through C{policy}'s
        name server.
    """

    log = Logger()

    def __init__(
        self,
        hostname: str,
        policy: InboundPolicy,
        runner: Any,
        clock: IReactorTime,
        rspamd: Optional[RspamdClient] = None,
        authenticate: Optional[Callable[[bytes, Session], mailauth.AuthenticationResults]] = None,
        sample: Callable[[], float] = random.random,
    ) -> None:
        self.hostname = hostname
        self.policy = policy
        self.runner = runner
        self.clock = clock
        self.rspamd = rspamd
        self._sample = sample
        if authenticate is None:
            self._resolver = mailauth.makeResolver(policy.dnsServer)
            self._organizational = _orgDomains()
            authenticate = self._authenticate
        self.authenticate = authenticate

    def _authenticate(self, message: bytes, session: Session) -> mailauth.AuthenticationResults:
        client = mailauth.DNSClient(self._resolver, self.policy.dnsTimeout, time.monotonic() + self.policy.deadline)
        return mailauth.authenticate(
            client, message, session.ip, session.sender, session.helo, self._organizational, self._sample
        )

    def check(self, message: bytes, session: Session, behindMTA: bool = False, service: str = "mx") -> Deferred:
        """
        @param behindMTA: the message came over LMTP: one whose topmost
            C{Authentication-Results:} field names a trusted front MTA is
            delivered unchanged, and a p=reject failure is refused only
            with C{lmtp-dmarc-reject}.
        @param service: the listener, first word of the log lines
            (C{mx}, C{lmtp}).
        @return: a C{Deferred} firing with a L{Verdict}; never failing.
        """
        if behindMTA:
            front = trustedFront(message, self.policy.trustedAuthservIDs)
            if front is not None:
                return succeed(Verdict(None, message, f"trusted={front}", "deliver"))
        results = self._checkAuthentication(message, session, service)
        rspamd: Deferred = (
            succeed(None)
            if self.rspamd is None
            else self.rspamd.check(message, session).addErrback(self._ebRspamd, service)
        )
        d = defer.gatherResults([results, rspamd], consumeErrors=True)
        d.addCallback(lambda both: self._verdict(message, both[0], both[1], behindMTA))
        return d

    def _ebRspamd(self, failure: Failure, service: str) -> RspamdError:
        self.log.warn(
            service + ": rspamd not usable: {error}", error=events.sanitize(_describe(failure), events.MAX_LOGGED_REPLY)
        )
        # A value, not a failure: the checks go on without rspamd.
        return RspamdError("unusable")

    def _checkAuthentication(self, message: bytes, session: Session, service: str) -> Deferred:
        if not self.policy.checks:
            return succeed(None)
        outcome: Deferred = Deferred()

        def done(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if outcome.called:
                return
            if isinstance(result, Failure):
                self.log.failure(service + ": authentication checks failed", result)
                result = mailauth.temporaryResults(session.sender, session.helo)
            outcome.callback(result)

        def late() -> None:
            if not outcome.called:
                outcome.callback(mailauth.temporaryResults(session.sender, session.helo))

        timer = self.clock.callLater(self.policy.deadline + DEADLINE_GRACE, late)
        self.runner.run(self.authenticate, message, session).addBoth(done)
        return outcome

    def _verdict(self, message: bytes, results: Any, rspamd: Any, behindMTA: bool) -> Verdict:
        if isinstance(rspamd, RspamdError):
            rspamd = Failure(rspamd)
        return makeVerdict(self.hostname, self.policy, message, results, rspamd, behindMTA)


def makeVerdict(
    hostname: str, policy: InboundPolicy, message: bytes, results: Any, rspamd: Any, behindMTA: bool = False
) -> Verdict:
    """
    The L{Verdict} on C{message} from its results (C{None}: not checked)
    and rspamd's answer (see L{decide}).
    """
    top: list[bytes] = []
    if results is None:
        decision = decide(policy, _UNCHECKED, rspamd, behindMTA)
        summary = "checks=off"
    else:
        decision = decide(policy, results, rspamd, behindMTA)
        top.append(results.header(hostname))
        summary = results.summary()
    if decision.rspamd:
        summary += f" rspamd={decision.rspamd}"
    if decision.reply is not None:
        return Verdict(decision.reply, b"", summary, decision.action)
    tag = policy.subjectTag.encode("utf-8")
    others = policy.trustedAuthservIDs if behindMTA else frozenset()
    return Verdict(None, rewrite(message, hostname, top, decision, tag, others), summary, decision.action)


def checkNow(
    hostname: str,
    policy: InboundPolicy,
    message: bytes,
    session: Session,
    authenticate: Optional[Callable[[bytes, Session], mailauth.AuthenticationResults]] = None,
) -> Verdict:
    """
    The checks of C{pop3gw deliver}: those of LMTP (C{behindMTA}), rspamd
    included (L{askRspamdNow}), blocking (the command has no reactor).

    @param authenticate: as L{InboundChecker}'s; by default
        L{mailauth.authenticate} through C{policy}'s name server, within
        its deadline.
    """
    front = trustedFront(message, policy.trustedAuthservIDs)
    if front is not None:
        return Verdict(None, message, f"trusted={front}", "deliver")
    rspamd: Any = None
    if policy.rspamdURL is not None:
        rspamd = askRspamdNow(policy.rspamdURL, policy.rspamdTimeout, hostname, message, session)
        if isinstance(rspamd, Failure):
            log.warn("deliver: rspamd not usable: {error}", error=events.sanitize(_describe(rspamd), events.MAX_LOGGED_REPLY))
    if not policy.checks:
        return makeVerdict(hostname, policy, message, None, rspamd, True)
    if authenticate is None:
        resolver = mailauth.makeResolver(policy.dnsServer)
        organizational = _orgDomains()

        def authenticate(message: bytes, session: Session) -> mailauth.AuthenticationResults:
            client = mailauth.DNSClient(resolver, policy.dnsTimeout, time.monotonic() + policy.deadline)
            return mailauth.authenticate(
                client, message, session.ip, session.sender, session.helo, organizational, random.random
            )

    try:
        results = authenticate(message, session)
    except Exception:
        log.failure("deliver: authentication checks failed")
        results = mailauth.temporaryResults(session.sender, session.helo)
    return makeVerdict(hostname, policy, message, results, rspamd, True)


_UNCHECKED = mailauth.AuthenticationResults(
    mailauth.SPFResult("none", "helo", "", ""), (), mailauth.DMARCResult("none")
)


def _describe(failure: Failure) -> str:
    value = failure.value
    if isinstance(value, defer.CancelledError):
        return "timed out"
    return f"{type(value).__name__}: {value}"


# --- the delivery ------------------------------------------------------------------


@implementer(IRoutedDelivery)
class CheckedDelivery:
    """
    An L{IDelivery} that holds the message and checks it when committed
    (see the module docstring).

    @param delivery: the real delivery (L{IRoutedDelivery} of the local
        maildrops).
    @param checker: the L{InboundChecker}.
    @param session: the L{Session}.
    @param log: the session's logger.
    @param service: the listener, for the log line (C{mx}, C{lmtp}).
    @param behindMTA: the message came over LMTP (see
        L{InboundChecker.check}).
    @param peer: the connection's peer for the log line, when it is not
        the session's client (LMTP).
    """

    def __init__(
        self,
        delivery: IDelivery,
        checker: InboundChecker,
        session: Session,
        log: Logger,
        service: str = "mx",
        behindMTA: bool = False,
        peer: Optional[str] = None,
    ) -> None:
        self._peer = peer
        self._delivery = delivery
        self._checker = checker
        self._session = session
        self._log = log
        self._service = service
        self._behindMTA = behindMTA
        self._chunks: list[bytes] = []
        self._aborted = False

    @property
    def delivery(self) -> IDelivery:
        """
        The real delivery.
        """
        return self._delivery

    @property
    def queueId(self) -> Optional[str]:
        """
        The real delivery's queue id.
        """
        routed = IRoutedDelivery(self._delivery, None)
        return None if routed is None else routed.queueId

    @property
    def localRecipients(self) -> tuple:
        """
        The real delivery's local recipients.
        """
        routed = IRoutedDelivery(self._delivery, None)
        return () if routed is None else routed.localRecipients

    @property
    def remoteRecipients(self) -> tuple:
        """
        The real delivery's remote recipients (none: MX mail is local).
        """
        routed = IRoutedDelivery(self._delivery, None)
        return () if routed is None else routed.remoteRecipients

    def write(self, data: bytes) -> None:
        """
        Hold C{data}.
        """
        self._chunks.append(data)

    def abort(self) -> None:
        """
        Drop the message and abort the real delivery.
        """
        self._aborted = True
        self._chunks = []
        self._delivery.abort()

    def commit(self) -> Deferred:
        """
        Check the message, then store it or refuse it.

        @return: a C{Deferred} firing once stored, or failing with
            L{SMTPRefusal} (or what the real delivery's commit fails with).
        """
        message = b"".join(self._chunks)
        self._chunks = []
        d = self._checker.check(message, self._session, self._behindMTA, self._service)
        d.addCallback(self._cbChecked)
        return d

    def _cbChecked(self, verdict: Verdict) -> Any:
        session = self._session
        # Behind an MTA, rhost is that MTA and client the one it names.
        client = f" client={session.ip or 'unknown'}" if self._behindMTA else ""
        self._log.info(
            self._service + ": checked rhost={peer}" + client + " from={sender} {summary} action={action}",
            peer=self._peer or session.ip,
            sender=events.sanitize(session.sender or ""),
            summary=verdict.summary,
            action=verdict.action,
        )
        if self._aborted:
            return None
        if verdict.reply is not None:
            self._delivery.abort()
            raise SMTPRefusal(verdict.reply)
        try:
            self._delivery.write(verdict.message)
        except Exception:
            self._delivery.abort()
            raise
        return self._delivery.commit()
