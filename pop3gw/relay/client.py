# -*- test-case-name: tests.test_relay_client -*-
"""
The SMTP client of the relay: one function, L{deliverOnce}, carries one
queued message over one connection and says what became of each recipient.

It is the only module that knows Twisted's C{ESMTPClient}, whose private
state (C{_from}, C{_buffer}, C{_tlsMode}, C{_disconnectFromServer}, and
C{tryTLS} and C{esmtpState_starttls} replaced) is used here and nowhere
else.  Everything leaves it typed: an L{Outcome} per
recipient that got a definitive reply, a L{RelayError} (built here, from
the server's reply or from Twisted's own error) for the reply or the break
that ended the session, and whether TLS was used and verified.  Twisted
makes up reply codes for its own errors (C{TLSRequiredError} says C{502}
although no server sent one); a made-up code never leaves this module:
L{RelayError.code} is 0 and its text says what happened in plain words.

TLS is one L{TLSPolicy} value: immediate (TLS from the first byte),
required STARTTLS (no STARTTLS, no mail), opportunistic (STARTTLS when
offered), or none.  Credentials are only ever sent over TLS.  Replies sent
in plaintext after C{STARTTLS} and before the handshake are discarded (the
client side of CVE-2011-0411).  A TLS connection this side cannot build (a
context or trust root that cannot be loaded, a transport whose
C{startTLS} fails) ends the session with a temporary L{RelayError} in
plain words (C{TLS could not be set up here: ...}), never a traceback:
before C{STARTTLS} is sent with C{QUIT}, after the server's C{220} by
aborting the connection, with immediate TLS before anything is sent.

Given a L{ConnectionCache}, L{deliverOnce} keeps the connection after its
message: it sends C{RSET}, and the next message for the same destination
(host, port, TLS policy, credentials) that comes within
L{CACHE_IDLE_TIME} goes over it, with no new connection, greeting,
C{STARTTLS} or C{AUTH}.  Each message still has its own
L{SessionResult}: a connection that breaks during a later message fails
only that one.

To a server whose C{EHLO} reply (the one after C{STARTTLS}, when TLS is
used) offers C{PIPELINING} (RFC 2920), C{MAIL}, every C{RCPT} and C{DATA}
go in one write and the replies are matched in order; the outcomes are
those the same replies give in lockstep.  If C{MAIL} or every C{RCPT} was
refused, the message is not sent: a C{354} to C{DATA} then gets a lone
dot (RFC 2920 3.1).  Such a connection waits in the cache without
C{RSET}: the C{RSET} goes with the next message's C{MAIL}.  C{STARTTLS}
is never in a group.  Without C{PIPELINING}, one command at a time.

A session without a cache gives its result as soon as every recipient
has its answer: C{QUIT} is sent and its reply is not waited for (the
connection closes when the reply comes, or at the reply time-out), so
the slot the session held is free one round trip earlier.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import re
from typing import Callable, Hashable, Mapping, Optional, Protocol, Sequence, Tuple, cast

import attr
from OpenSSL import SSL
from twisted.internet import defer, protocol
from twisted.internet import error as ierror
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.mail.smtp import Address as TwistedAddress
from twisted.mail.smtp import (
    AUTHDeclinedError,
    AuthenticationError,
    AUTHRequiredError,
    EHLORequiredError,
    ESMTPClient,
    LOGINAuthenticator,
    PLAINAuthenticator,
    SMTPClientError,
    SMTPConnectError,
    SMTPProtocolError,
    SMTPTimeoutError,
    TLSError,
    TLSRequiredError,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3gw.address import Address, describePeer, isLoopback
from pop3gw.dsn import oneLine
from pop3gw.queue import Outcome, OutcomeKind


class _TLSConnection(Protocol):
    """
    What this client uses of its transport beyond C{ITransport}
    (C{ITLSTransport.startTLS}, C{ITCPTransport.abortConnection}).
    """

    def startTLS(self, contextFactory) -> None: ...

    def abortConnection(self) -> None: ...


#: Seconds to wait for each reply of the remote server (RFC 5321 4.5.3.2
#: asks for at least 5 minutes for most commands).
RESPONSE_TIMEOUT = 5 * 60

#: Seconds a connection kept by a L{ConnectionCache} waits for its next
#: message before it is closed with C{QUIT} (Postfix's
#: C{smtp_connection_cache_time_limit} is 2).
CACHE_IDLE_TIME = 2.0

#: Octets read at once from a queued message while sending it.
_READ_CHUNK = 64 * 1024

#: Every reply code: the replies a handler takes whatever they are (a
#: C{range}, whose membership test is a comparison, where a list is
#: scanned and was built for each message).
_ANY_REPLY = range(1000)

_ENHANCED = re.compile(rb"^([245])\.\d{1,3}\.\d{1,3}(?=\s|$)")

#: The outcome of a recipient that cannot be sent because the server does
#: not offer SMTPUTF8 (RFC 6531 3.7.5: a permanent failure, 5.6.7).
UTF8_NOT_OFFERED = Outcome(
    OutcomeKind.FAILED, "5.6.7", "the server does not offer SMTPUTF8, which the non-ASCII address needs"
)


class TLSPolicy(enum.Enum):
    """
    How a session uses TLS.
    """

    #: TLS from the first byte (RFC 8314, port 465).
    IMMEDIATE = "immediate"
    #: STARTTLS, and no mail to a server that does not offer it.
    REQUIRED_STARTTLS = "required"
    #: STARTTLS when the server offers it (RFC 7435).
    OPPORTUNISTIC = "opportunistic"
    #: Never TLS.
    NONE = "none"


class Phase(enum.Enum):
    """
    Where in the session an error happened.
    """

    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


@attr.s(auto_attribs=True, frozen=True)
class RelayError:
    """
    A refusal or a failure of the session, built at the client boundary.

    @ivar permanent: whether the reply was a 5xx.  A recipient refused
        permanently fails; a session that breaks leaves its unanswered
        recipients pending whatever this says (another host, or a later
        attempt, may take them).
    @ivar code: the server's reply code, or 0 when the server sent none
        (a connection failure, a time-out, a rule of this client).
    @ivar enhanced: the RFC 3463 status.
    @ivar phase: a L{Phase}.
    @ivar text: one line in plain words: the reply as C{"<code> <text>"},
        or what happened.
    """

    permanent: bool
    code: int
    enhanced: str
    phase: Phase
    text: str

    @classmethod
    def fromReply(cls, code: int, resp: bytes | str, phase: Phase) -> "RelayError":
        """
        The error for a 4xx or 5xx reply (its enhanced status when the reply
        carries one of its class, else C{4.0.0}/C{5.0.0}).
        """
        if isinstance(resp, str):
            resp = resp.encode("utf-8", "replace")
        permanent = 500 <= code < 600
        cls_ = "5" if permanent else "4"
        match = _ENHANCED.match(resp or b"")
        if match is not None and match.group(1).decode() == cls_:
            enhanced = match.group(0).decode()
        else:
            enhanced = f"{cls_}.0.0"
        return cls(permanent, code, enhanced, phase, _replyText(code, resp))

    def outcome(self) -> Outcome:
        """
        @return: the L{Outcome} of a recipient this error applies to.
        """
        return Outcome(OutcomeKind.FAILED if self.permanent else OutcomeKind.DEFERRED, self.enhanced, self.text)


@attr.s(auto_attribs=True, frozen=True)
class SessionResult:
    """
    What one session did.

    @ivar outcomes: an L{Outcome} per recipient L{Address} that got a
        definitive reply.  Recipients missing from it (the session broke
        first) may be tried on another host.
    @ivar error: why the session broke, if it did before every recipient
        had its answer.
    @ivar tls: whether the message went over TLS.
    @ivar verified: whether it went over TLS to a peer whose certificate
        was verified.
    @ivar tlsHandshakeFailed: whether the server accepted STARTTLS and the
        handshake then failed (an opportunistic sender retries in plaintext).
    """

    outcomes: Mapping[Address, Outcome]
    error: Optional[RelayError]
    tls: bool = False
    verified: bool = False
    tlsHandshakeFailed: bool = False

    @classmethod
    def broken(cls, text: str, phase: Phase = Phase.CONNECT) -> "SessionResult":
        """
        The result of a session that never reached the server.
        """
        return cls({}, RelayError(False, 0, "4.4.1", phase, text))


#: C{contextFor(policy) -> (contextFactory, verifying)}: the client TLS
#: context factory for a policy, and whether it refuses unverified peers.
ContextFor = Callable[[TLSPolicy], Tuple[IOpenSSLClientConnectionCreator, bool]]


def deliverOnce(
    endpoint,
    sender: Optional[Address],
    recipients: Sequence[Address],
    message,
    tlsPolicy: TLSPolicy,
    credentials: Optional[Tuple[str, str]] = None,
    *,
    identity: str,
    clock,
    contextFor: Optional[ContextFor] = None,
    loopbackPolicy: Optional[TLSPolicy] = None,
    smtputf8: bool = False,
    cache: Optional["ConnectionCache"] = None,
    cacheKey: Hashable = None,
) -> defer.Deferred:
    """
    Send C{message} from C{sender} to C{recipients} over one connection
    made with C{endpoint}: C{EHLO} (C{HELO} when allowed), C{STARTTLS} as
    C{tlsPolicy} says, C{AUTH} with C{credentials}, then one transaction
    and C{QUIT}.  No retries.  Once every recipient has its answer, the
    result is given without waiting for the reply to C{QUIT}.

    @param message: the message with CRLF line ends, a binary file open for
        reading; it is dot-stuffed on the way and closed at the end.
    @param credentials: C{(username, password)} for C{AUTH PLAIN}/C{LOGIN}
        (never logged); they make TLS required.
    @param identity: this host's name for C{EHLO}.
    @param clock: runs the reply time-out (L{RESPONSE_TIMEOUT}).
    @param contextFor: gives the TLS context factory for the policy in
        force; without it, no TLS.
    @param loopbackPolicy: the policy in force instead of C{tlsPolicy} when
        the address connected to is on this machine (127.0.0.0/8, C{::1}, a
        Unix socket: L{pop3gw.address.isLoopback}).
    @param smtputf8: whether the message was received with SMTPUTF8: MAIL
        then carries the SMTPUTF8 parameter when the server offers it
        (RFC 6531 3.4).  Whatever this says, a non-ASCII address is only
        sent to a server that offers SMTPUTF8: to another, a non-ASCII
        sender fails every recipient and a non-ASCII recipient fails, with
        5.6.7 (RFC 6531 3.7.5), and the ASCII recipients are sent.
    @param cache: where a connection is kept after its message, and taken
        from instead of connecting (see the module docstring); C{None}
        closes it with C{QUIT}.
    @param cacheKey: the destination, for C{cache}: the same for messages
        that may share a connection (same host, port, policies and
        credentials).
    @return: a Deferred firing with the L{SessionResult} (never failing).
    """
    session = _Session(sender, recipients, message, smtputf8)
    if cache is not None:
        kept = cache.take(cacheKey)
        if kept is not None:
            kept.sendNext(session)
            return session.done.addCallback(lambda s: s.result())
    if tlsPolicy is TLSPolicy.IMMEDIATE and contextFor is not None:
        try:
            contextFactory, session.verifying = contextFor(tlsPolicy)
        except Exception as e:
            session.error = _tlsSetupError(e, Phase.CONNECT)
            session.finish(None)
            return session.done.addCallback(lambda s: s.result())
        session.contextFactory = contextFactory
        guarded = _guarded(contextFactory)
        endpoint = wrapClientTLS(guarded, endpoint)
    factory = _RelayClientFactory(session, identity, clock, tlsPolicy, loopbackPolicy, contextFor, credentials)
    factory.cache, factory.cacheKey = cache, cacheKey
    if tlsPolicy is TLSPolicy.IMMEDIATE and contextFor is not None:
        factory.immediateCreator = guarded

    def connectFailed(f: Failure) -> None:
        session.error = RelayError(False, 0, "4.4.1", Phase.CONNECT, describeConnectFailure(f))
        session.finish(None)

    try:
        d = endpoint.connect(factory)
    except Exception:
        d = defer.fail()
    d.addCallbacks(lambda _: None, connectFailed)
    return session.done.addCallback(lambda s: s.result())


def describeConnectFailure(f: Failure) -> str:
    """
    Why a TCP connection to a mail server could not be made, in plain words.
    """
    if f.check(ierror.ConnectingCancelledError, defer.CancelledError):
        return "connection attempt cancelled"
    if f.check(ierror.ConnectionRefusedError):
        return "connection refused"
    if f.check(ierror.TimeoutError, ierror.TCPTimedOutError):
        return "connection timed out"
    if f.check(ierror.DNSLookupError):
        return "host name not found"
    if f.check(ierror.NoRouteError):
        return "no route to host"
    return oneLine(f"cannot connect: {f.getErrorMessage()}")


def describeError(exc: Exception, credentials: bool, starttlsBegun: bool = False) -> str:
    """
    Why an SMTP client session broke, in plain words for the log and
    C{pop3gw queue list}.

    Twisted's client errors carry either the remote server's reply or a
    code and text Twisted made up: a real reply is quoted, a made-up one is
    replaced by what actually happened.

    @param exc: the error given to C{sendError}.
    @param credentials: whether relay credentials are configured (TLS is
        then required for them, not for certificate verification).
    @param starttlsBegun: whether the server had accepted STARTTLS (a TLS
        error then comes from starting TLS here, with a made-up 451).
    """
    if isinstance(exc, TLSRequiredError):
        if credentials:
            return "smarthost offers no STARTTLS and relay credentials are sent only over TLS"
        return "smarthost offers no STARTTLS and certificate verification is on"
    if isinstance(exc, AUTHRequiredError):
        return "smarthost offers no AUTH mechanism pop3gw supports (PLAIN, LOGIN)"
    if isinstance(exc, EHLORequiredError):
        return "server refused EHLO, which STARTTLS and AUTH need"
    if isinstance(exc, TLSError):
        if exc.code > 0 and not starttlsBegun:
            return f"server refused STARTTLS (reply code {exc.code:03d})"
        return "TLS could not be started"
    if isinstance(exc, AUTHDeclinedError):
        return "smarthost refused the relay credentials: " + _replyText(exc.code, exc.resp)
    if isinstance(exc, AuthenticationError):
        if exc.code == 501 and exc.resp.startswith(b"Login failed because"):
            return "smarthost sent a malformed AUTH challenge"
        return "smarthost refused authentication: " + _replyText(exc.code, exc.resp)
    if isinstance(exc, SMTPTimeoutError):
        return f"no reply from the server within {RESPONSE_TIMEOUT} seconds"
    if isinstance(exc, SMTPConnectError) and exc.code > 0:
        return "server refused the session: " + _replyText(exc.code, exc.resp)
    if isinstance(exc, SMTPProtocolError) and exc.code <= 0:
        return "the server sent a malformed reply"
    if isinstance(exc, SMTPClientError):
        if exc.code > 0:
            return "server replied " + _replyText(exc.code, exc.resp)
        return oneLine(exc.resp)
    return oneLine(f"{exc.__class__.__name__}: {exc}")


def _replyText(code: int, resp: bytes | str) -> str:
    """
    A reply as one line, C{"<code> <text>"}.
    """
    if isinstance(resp, str):
        resp = resp.encode("utf-8", "replace")
    text = oneLine(resp)
    return f"{code:03d} {text}" if code > 0 else text


def _madeUp(exc: Exception, starttlsBegun: bool) -> bool:
    """
    Whether the code of a Twisted client error is one Twisted made up
    rather than a reply the server sent.
    """
    if isinstance(exc, (TLSRequiredError, AUTHRequiredError, EHLORequiredError, SMTPTimeoutError)):
        return True
    if isinstance(exc, TLSError):
        # After the server's 220 to STARTTLS, the failure is ours (451).
        return starttlsBegun
    if isinstance(exc, AuthenticationError):
        return exc.code == 501 and exc.resp.startswith(b"Login failed because")
    return False


def _errorFor(exc: Exception, credentials: bool, starttlsBegun: bool, phase: Phase) -> RelayError:
    """
    The L{RelayError} for an exception Twisted's client gave C{sendError}:
    its text in plain words (L{describeError}); its code, enhanced status
    and class from the server's reply when the error carries one the server
    sent, else code 0 and 4.4.1.
    """
    if isinstance(exc, (TLSRequiredError, TLSError)):
        phase = Phase.STARTTLS
    elif isinstance(exc, (AUTHRequiredError, AUTHDeclinedError, AuthenticationError)):
        phase = Phase.AUTH
    elif isinstance(exc, EHLORequiredError):
        phase = Phase.EHLO
    elif isinstance(exc, SMTPConnectError):
        phase = Phase.GREETING
    text = describeError(exc, credentials, starttlsBegun)
    code = getattr(exc, "code", 0)
    if _madeUp(exc, starttlsBegun) or not isinstance(code, int) or not 400 <= code < 600:
        return RelayError(False, 0, "4.4.1", phase, text)
    return attr.evolve(RelayError.fromReply(code, getattr(exc, "resp", b"") or b"", phase), text=text)


def _tlsSetupError(exc: Exception, phase: Phase) -> RelayError:
    """
    The temporary error for a TLS connection this side could not build (a
    context or trust root that cannot be loaded): no reply code, the
    exception's type and text on one line.
    """
    return RelayError(False, 0, "4.4.1", phase, oneLine(f"TLS could not be set up here: {exc.__class__.__name__}: {exc}"))


@implementer(IOpenSSLClientConnectionCreator)
class _GuardedCreator:
    """
    A connection creator that cannot make a transport's C{startTLS} (or a
    TLS-wrapped connection) fail half-way.  If the creator it wraps raises
    (a trust root that cannot be loaded when the first connection needs
    it), the exception is kept in L{failure} and a connection with a plain
    client context is handed out instead, so that the transport stays
    consistent until the caller, seeing L{failure}, aborts it: nothing is
    ever sent over that connection.

    @ivar failure: what the wrapped creator raised, or C{None}.
    """

    def __init__(self, context) -> None:
        self._context = context
        self.failure: Optional[Exception] = None

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        try:
            if IOpenSSLClientConnectionCreator.providedBy(self._context):
                return self._context.clientConnectionForTLS(tlsProtocol)
            connection = SSL.Connection(self._context.getContext(), None)
            connection.set_app_data(tlsProtocol)
            return connection
        except Exception as e:
            self.failure = e
            return SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)


def _guarded(context):
    """
    C{context} in a L{_GuardedCreator} when it is a connection creator or
    an old-style context factory; anything else as it is.
    """
    if IOpenSSLClientConnectionCreator.providedBy(context) or hasattr(context, "getContext"):
        return _GuardedCreator(context)
    return context


class _DotStuffer:
    """
    A read-only file wrapper giving the queued message dot-stuffed (RFC 5321
    4.5.2) and followed by the terminating dot line, so that the end of the
    message goes in the same write as its last bytes (a dot line written
    alone after them waits, with Nagle's algorithm, for the server's
    delayed ACK); the message already has CRLF line ends.
    """

    def __init__(self, f):
        self._file = f
        self._buffer = b""
        self._atLineStart = True
        self._ended = False

    def read(self, n: int = -1) -> bytes:
        # A line starts after each LF: a dot there is doubled, within a
        # chunk by one replace, at a chunk's start by the flag.
        parts = [self._buffer]
        size = len(self._buffer)
        while (n < 0 or size < n) and not self._ended:
            chunk = self._file.read(_READ_CHUNK)
            if not chunk:
                self._ended = True
                end = b".\r\n" if self._atLineStart else b"\r\n.\r\n"
                parts.append(end)
                size += len(end)
                break
            stuffed = chunk.replace(b"\n.", b"\n..")
            if self._atLineStart and chunk.startswith(b"."):
                stuffed = b"." + stuffed
            self._atLineStart = chunk.endswith(b"\n")
            parts.append(stuffed)
            size += len(stuffed)
        data = b"".join(parts)
        if n < 0:
            n = len(data)
        out, self._buffer = data[:n], data[n:]
        return out

    def close(self) -> None:
        self._file.close()


def _outcomeForReply(code: int, resp: bytes, phase: Phase) -> Outcome:
    if 200 <= code < 300:
        return Outcome(OutcomeKind.DELIVERED, "2.0.0", _replyText(code, resp))
    return RelayError.fromReply(code, resp, phase).outcome()


class _Path(TwistedAddress):
    """
    A forward path as the client sends it in C{RCPT TO:<...>}: UTF-8 when
    it is not ASCII (SMTPUTF8).  Twisted's client quotes an address of its
    own C{Address} type as its C{bytes}.
    """

    def __init__(self, text: str) -> None:
        self.text = text

    def __bytes__(self) -> bytes:
        return self.text.encode("utf-8")

    def __str__(self) -> str:
        return self.text


class _Session:
    """
    The state of one session while it runs; L{result} freezes it.

    @ivar error: why the session broke, if it did.
    @ivar done: fires with this session when it is over.
    """

    def __init__(self, sender: Optional[Address], recipients: Sequence[Address], message, smtputf8: bool = False):
        self.senderText = "" if sender is None else str(sender)
        self.recipients = {str(r): r for r in recipients}
        self.smtputf8 = smtputf8
        self.message = message
        self.outcomes: dict = {}
        self.error: Optional[RelayError] = None
        self.tls = False
        self.contextFactory: Optional[IOpenSSLClientConnectionCreator] = None
        self.verifying = False
        self.starttlsBegun = False
        self.tlsHandshakeFailed = False
        self.protocol: Optional["_RelayClient"] = None
        self.done: defer.Deferred = defer.Deferred()

    def recordSent(self, code: int, resp: bytes, addresses: list) -> None:
        if not addresses:
            # MAIL FROM refused: the reply applies to every recipient.
            outcome = _outcomeForReply(code, resp, Phase.MAIL)
            for r in self.recipients.values():
                self.outcomes[r] = outcome
            return
        for addr, rcode, rresp in addresses:
            addr = addr.decode("utf-8") if isinstance(addr, bytes) else str(addr)
            recipient = self.recipients.get(addr)
            if recipient is None:
                continue
            if 200 <= rcode < 300:
                self.outcomes[recipient] = _outcomeForReply(code, resp, Phase.DATA)
            else:
                self.outcomes[recipient] = _outcomeForReply(rcode, rresp, Phase.RCPT)

    def withoutSMTPUTF8(self) -> list[str]:
        """
        The server does not offer SMTPUTF8: the recipients that cannot be
        sent (all of them when the sender is not ASCII) fail with 5.6.7.

        @return: the recipients that may still be sent.
        """
        senderASCII = self.senderText.isascii()
        sendable = []
        for text, recipient in self.recipients.items():
            if senderASCII and text.isascii():
                sendable.append(text)
            else:
                self.outcomes[recipient] = UTF8_NOT_OFFERED
        return sendable

    def recordError(self, error: RelayError) -> None:
        """
        Record why the session broke, unless a definitive reply came first.
        """
        if self.error is None and not self.outcomes:
            self.error = error

    def tlsVerified(self) -> bool:
        """
        Whether the message went over TLS to a peer whose certificate was
        verified: always, when the context refuses unverified peers
        (C{verifying}: a smarthost with verification on); otherwise an
        opportunistic context's C{result.verified} (see
        L{pop3gw.tlsclient.OpportunisticClientTLS}) says.
        """
        if not self.tls:
            return False
        if self.verifying:
            return True
        result = getattr(self.contextFactory, "result", None)
        return getattr(result, "verified", None) is True

    def finish(self, reason: Optional[Failure]) -> None:
        if self.done.called:
            return
        if self.error is None and len(self.outcomes) < len(self.recipients):
            why = "connection lost" if reason is None else oneLine(reason.getErrorMessage())
            phase = self.protocol.phase if self.protocol is not None else Phase.CONNECT
            self.error = RelayError(False, 0, "4.4.1", phase, f"connection lost before the end: {why}")
        if self.message is not None:
            with contextlib.suppress(OSError):
                self.message.close()
        self.done.callback(self)

    def result(self) -> SessionResult:
        return SessionResult(dict(self.outcomes), self.error, self.tls, self.tlsVerified(), self.tlsHandshakeFailed)


class _RelayClient(ESMTPClient):
    """
    An ESMTP client sending one message for a L{_Session}: STARTTLS by
    policy, optional AUTH, per-recipient results, no retries of its own.

    @ivar phase: the L{Phase} the session is in.
    """

    # The line log would hold AUTH lines; nothing here reads it.
    debug = False

    # ESMTPClient.__setattr__ only warns about its deprecated tlsMode,
    # which is never set here, and costs a Python call per assignment.
    __setattr__ = object.__setattr__

    def __init__(self, session: _Session, identity: str, tlsPolicy, loopbackPolicy, contextFor, credentials):
        password = None if credentials is None else credentials[1].encode("utf-8")
        ESMTPClient.__init__(self, password, None, identity.encode("ascii", "replace"))
        self.session = session
        self.phase = Phase.GREETING
        self._tlsPolicy = tlsPolicy
        self._loopbackPolicy = loopbackPolicy
        self._contextFor = contextFor
        self._mailFromSent = False
        #: Whether the next message's group starts with RSET.
        self._resetPending = False
        self._pipeHandlers: collections.deque = collections.deque()
        #: The reply refusing a pipelined MAIL, if it was refused.
        self._mailRefusal: Optional[Tuple[int, bytes]] = None
        self._tlsSetupFailure: Optional[Exception] = None
        #: The EHLO keywords of the server (upper case), from the last EHLO.
        self._keywords: frozenset[bytes] = frozenset()
        #: The recipients this session sends (see _Session.withoutSMTPUTF8).
        self._sendable: list[str] = list(session.recipients)
        # SMTPClient's class attribute is None; a number is its documented use.
        self.timeout = RESPONSE_TIMEOUT  # type: ignore[assignment]
        self.requireAuthentication = credentials is not None
        if credentials is not None:
            user = credentials[0].encode("utf-8")
            self.registerAuthenticator(PLAINAuthenticator(user))
            self.registerAuthenticator(LOGINAuthenticator(user))

    def connectionMade(self):
        immediate = getattr(self.factory, "immediateCreator", None)
        failure = getattr(immediate, "failure", None)
        if failure is not None:
            # Immediate TLS without a usable connection: nothing is sent.
            self.session.recordError(_tlsSetupError(failure, Phase.CONNECT))
            self._connection().abortConnection()
            return
        # The policy may depend on the address actually connected to (a
        # loopback smarthost may be plaintext), known only now.
        policy = self._tlsPolicy
        transport = self.transport
        assert transport is not None, "connected"
        if self._loopbackPolicy is not None and isLoopback(describePeer(transport.getPeer())):
            policy = self._loopbackPolicy
        if policy in (TLSPolicy.REQUIRED_STARTTLS, TLSPolicy.OPPORTUNISTIC) and self._contextFor is not None:
            try:
                self.context, self.session.verifying = self._contextFor(policy)
            except Exception as e:
                # Told when STARTTLS would be sent (L{tryTLS}).
                self._tlsSetupFailure = e
            else:
                self.session.contextFactory = self.context
        required = self.requireAuthentication or policy is TLSPolicy.REQUIRED_STARTTLS
        self.requireTransportSecurity = required
        self.heloFallback = not required
        ESMTPClient.connectionMade(self)

    def esmtpState_ehlo(self, code, resp):
        self.phase = Phase.EHLO
        # Only the keywords of the latest EHLO count: a HELO after a
        # refused EHLO (after STARTTLS) has none.
        self._keywords = frozenset()
        return ESMTPClient.esmtpState_ehlo(self, code, resp)

    def getMailFrom(self):
        if self._mailFromSent:
            return None
        self._mailFromSent = True
        self.phase = Phase.MAIL
        return self.session.senderText

    def getMailTo(self):
        self.phase = Phase.RCPT
        return [_Path(text) for text in self._sendable]

    def smtpState_from(self, code, resp):
        """
        MAIL FROM, with the SMTPUTF8 parameter when the message was
        received with it and the server offers it; addresses that need
        SMTPUTF8 are not sent to a server without it (L{deliverOnce}).
        """
        sender = self.getMailFrom()
        self._from = sender
        self._failresponse = self.smtpTransferFailed
        if sender is None:
            self._disconnectFromServer()
            return
        offered = b"SMTPUTF8" in self._keywords
        # Set for each message: a reused connection carries several.
        self._sendable = list(self.session.recipients)
        if not offered:
            self._sendable = self.session.withoutSMTPUTF8()
            if not self._sendable:
                self.session.tls = self._tlsMode
                self._from = None
                self._disconnectFromServer()
                return
        line = b"MAIL FROM:<" + sender.encode("utf-8") + b">"
        if offered and self.session.smtputf8:
            line += b" SMTPUTF8"
        if b"PIPELINING" in self._keywords:
            self._sendGroup(line)
            return
        self.sendLine(line)
        self._expected = [250]
        self._okresponse = self.smtpState_to

    def _sendGroup(self, mailLine: bytes) -> None:
        """
        Send C{RSET} (on a reused connection), C{MAIL}, every C{RCPT} and
        C{DATA} in one write (RFC 2920), and read their replies in order
        with L{_pipelineReply}.
        """
        commands = []
        handlers: collections.deque = collections.deque()
        if self._resetPending:
            self._resetPending = False
            commands.append(b"RSET")
            handlers.append(self._pipeReset)
        commands.append(mailLine)
        handlers.append(self._pipeMail)
        for text in self._sendable:
            commands.append(b"RCPT TO:<" + text.encode("utf-8") + b">")
            handlers.append(functools.partial(self._pipeRcpt, _Path(text)))
        commands.append(b"DATA")
        handlers.append(self._pipeData)
        self._pipeHandlers = handlers
        self._mailRefusal = None
        self.toAddressesResult = []
        self.successAddresses = []
        self.phase = Phase.MAIL
        self._expected = _ANY_REPLY  # type: ignore[assignment]
        self._okresponse = self._failresponse = self._pipelineReply
        transport = self.transport
        assert transport is not None, "connected"
        transport.write(b"".join(c + b"\r\n" for c in commands))

    def _pipelineReply(self, code: int, resp: bytes) -> None:
        """
        A reply to a pipelined command: the handler of the oldest command
        not yet answered takes it.
        """
        self._pipeHandlers.popleft()(code, resp)

    def _pipeReset(self, code: int, resp: bytes) -> None:
        """
        The reply to C{RSET}: anything but 250 leaves the connection in an
        unknown state; it is aborted, the message is tried again.
        """
        if code == 250:
            return
        error = RelayError.fromReply(code, resp, Phase.MAIL)
        self.session.recordError(attr.evolve(error, text="server refused RSET: " + error.text))
        self._pipeHandlers.clear()
        self._okresponse = self._failresponse = lambda code, resp: None
        self._connection().abortConnection()

    def _pipeMail(self, code: int, resp: bytes) -> None:
        self.phase = Phase.RCPT
        if code != 250:
            self._mailRefusal = (code, resp)

    def _pipeRcpt(self, path: "_Path", code: int, resp: bytes) -> None:
        if self._mailRefusal is not None:
            return
        self.toAddressesResult.append((path, code, resp))
        if 200 <= code < 300:
            self.successAddresses.append(path)

    def _pipeData(self, code: int, resp: bytes) -> None:
        """
        The reply to C{DATA}, the last of the group: send the message, or
        report the refusals (a lone dot first to a C{354} that came
        although nothing may be sent).
        """
        self.phase = Phase.DATA
        self._failresponse = self.smtpTransferFailed
        if self._mailRefusal is not None:
            result = self._mailRefusal
        elif not self.successAddresses:
            result = (code, b"No recipients accepted")
        elif code == 354:
            self.smtpState_data(code, resp)
            return
        else:
            result = (code, resp)
        if code != 354:
            self.smtpState_msgSent(*result)
            return
        self.sendLine(b".")
        self._expected = _ANY_REPLY  # type: ignore[assignment]
        self._okresponse = lambda code, resp: self.smtpState_msgSent(*result)

    def getMailData(self):
        self.phase = Phase.DATA
        return _DotStuffer(self.session.message)

    def finishedFileTransfer(self, lastsent: bytes) -> None:
        # The terminating dot line came with the data (_DotStuffer).
        pass

    def transformChunk(self, chunk: bytes) -> bytes:
        # The data is already CRLF and dot-stuffed by _DotStuffer.
        self.resetTimeout()
        return chunk

    def _connection(self) -> _TLSConnection:
        """
        The connection: always a TCP connection that can start TLS (an
        endpoint's transport) once this client is connected.
        """
        assert self.transport is not None, "not connected"
        return cast(_TLSConnection, self.transport)

    def tryTLS(self, code, resp, items):
        self._keywords = frozenset(k.upper() for k in items)
        # Without a context, the session ends where STARTTLS would be sent,
        # still politely, in plaintext, with QUIT.
        if self._tlsSetupFailure is not None and not self._tlsMode and b"STARTTLS" in items:
            self.session.recordError(_tlsSetupError(self._tlsSetupFailure, Phase.STARTTLS))
            self._disconnectFromServer()
            return
        ESMTPClient.tryTLS(self, code, resp, items)

    def esmtpState_starttls(self, code, resp):
        # Replies that arrived after the 220 came in plaintext, possibly
        # injected by a man in the middle; only what comes over TLS may be
        # acted on (the client side of CVE-2011-0411).
        self._buffer = b""
        self.session.starttlsBegun = True
        # ESMTPClient's own version logs the failure as an unhandled error
        # and goes on writing to the broken transport.
        guarded = _guarded(self.context)
        error: Optional[RelayError] = None
        try:
            self._connection().startTLS(guarded)
        except Exception as e:
            text = oneLine(f"TLS could not be started: {e.__class__.__name__}: {e}")
            error = RelayError(False, 0, "4.4.1", Phase.STARTTLS, text)
        else:
            failure = getattr(guarded, "failure", None)
            if failure is not None:
                error = _tlsSetupError(failure, Phase.STARTTLS)
        if error is not None:
            # The server now expects a handshake: no plaintext QUIT.
            self.session.recordError(error)
            self._connection().abortConnection()
            return
        self._tlsMode = True
        self.esmtpState_ehlo(code, resp)

    def smtpState_msgSent(self, code, resp):
        # Report the message; then QUIT, or RSET and wait in the cache.
        if self._from is not None:
            self.sentMail(code, resp, len(self.successAddresses), self.toAddressesResult, self.log)
        self._from = None
        self.toAddressesResult = []
        if self.factory.cache is None:
            self._disconnectFromServer()
            if len(self.session.outcomes) >= len(self.session.recipients):
                # Every recipient has its answer: the reply to QUIT is not
                # waited for (the connection closes when it comes, or at
                # the reply time-out).
                self.session.finish(None)
            return
        if b"PIPELINING" in self._keywords:
            # The RSET goes with the next message's MAIL.
            self._resetPending = True
            self._cbReset(250, b"")
            return
        # The message's result is given once the connection waits in the
        # cache, so that the next message, which its result may start,
        # finds it there.
        self.sendLine(b"RSET")
        self._expected = [250]
        self._okresponse = self._cbReset
        self._failresponse = self._ebReset

    def _cbReset(self, code, resp):
        """
        The server took C{RSET}: wait in the cache for the next message.
        Any reply from now until then (a time-out notice) ends the
        connection.
        """
        self.setTimeout(None)
        self._expected = _ANY_REPLY  # type: ignore[assignment]
        self._okresponse = self._ebReset
        self.factory.cache.keep(self.factory.cacheKey, self)
        self.session.finish(None)

    def _ebReset(self, code, resp):
        self.factory.cache.forget(self)
        self._disconnectFromServer()
        self.session.finish(None)

    def sendNext(self, session: _Session) -> None:
        """
        Send C{session}'s message over this connection, which is waiting
        in a cache after C{RSET}.
        """
        previous = self.session
        session.contextFactory = previous.contextFactory
        session.verifying = previous.verifying
        session.protocol = self
        self.session = session
        self._mailFromSent = False
        self.setTimeout(self.timeout)
        self.smtpState_from(250, b"")

    def quit(self) -> None:
        """
        Close this waiting connection politely.
        """
        self.setTimeout(self.timeout)
        self._disconnectFromServer()

    def sentMail(self, code, resp, numOk, addresses, log):
        self.session.tls = self._tlsMode
        self.session.recordSent(code, resp, addresses)

    def sendError(self, exc):
        self.session.recordError(_errorFor(exc, self.requireAuthentication, self.session.starttlsBegun, self.phase))
        ESMTPClient.sendError(self, exc)

    def connectionLost(self, reason=protocol.connectionDone):
        if self.session.starttlsBegun and not self.session.outcomes and reason is not None and reason.check(SSL.Error):
            self.session.tlsHandshakeFailed = True
        ESMTPClient.connectionLost(self, reason)
        if self.factory.cache is not None:
            self.factory.cache.forget(self)
        self.session.finish(reason)


class _RelayClientFactory(protocol.Factory):
    """
    Builds the one L{_RelayClient} of a L{_Session}.
    """

    # One connection per session: "Starting factory" / "Stopping factory"
    # lines for each would only be noise in the log.
    noisy = False

    #: The L{_GuardedCreator} of an immediate TLS connection, if any.
    immediateCreator: object = None

    #: Where the connection waits after its message, and under what key.
    cache: Optional["ConnectionCache"] = None
    cacheKey: Hashable = None

    def __init__(self, session: _Session, identity: str, clock, tlsPolicy, loopbackPolicy, contextFor, credentials):
        self.session = session
        self.identity = identity
        self.clock = clock
        self.tlsPolicy = tlsPolicy
        self.loopbackPolicy = loopbackPolicy
        self.contextFor = contextFor
        self.credentials = credentials

    def buildProtocol(self, addr):
        p = _RelayClient(
            self.session, self.identity, self.tlsPolicy, self.loopbackPolicy, self.contextFor, self.credentials
        )
        # The response timeout runs on our clock, not the global reactor.
        # TimeoutMixin.callLater is there to be replaced like this.
        p.callLater = self.clock.callLater  # type: ignore[method-assign]
        p.factory = self
        self.session.protocol = p
        return p


class ConnectionCache:
    """
    Connections to mail servers waiting for their next message (see the
    module docstring), by destination key; the most recently used is
    taken first, and each is closed with C{QUIT} after
    L{CACHE_IDLE_TIME} unused.

    @param clock: runs the idle timers.
    @param idleTime: seconds a connection waits.
    """

    def __init__(self, clock, idleTime: float = CACHE_IDLE_TIME) -> None:
        self._clock = clock
        self._idleTime = idleTime
        self._waiting: dict = {}
        self._timers: dict = {}
        self._known: set = set()

    def __len__(self) -> int:
        """
        @return: how many connections wait.
        """
        return len(self._timers)

    def keep(self, key: Hashable, client: _RelayClient) -> None:
        """
        Let C{client}, which just finished a message, wait for the next one
        for C{key}.
        """
        self._known.add(client)
        self._waiting.setdefault(key, []).append(client)
        self._timers[client] = self._clock.callLater(self._idleTime, self._expire, client)

    def take(self, key: Hashable) -> Optional[_RelayClient]:
        """
        @return: a waiting connection for C{key} (no longer waiting), or
            C{None}.
        """
        clients = self._waiting.get(key)
        if not clients:
            return None
        client = clients.pop()
        if not clients:
            del self._waiting[key]
        timer = self._timers.pop(client)
        if timer.active():
            timer.cancel()
        return client

    def forget(self, client: _RelayClient) -> None:
        """
        C{client} is closing or gone: never hand it out again.
        """
        self._known.discard(client)
        timer = self._timers.pop(client, None)
        if timer is None:
            return
        if timer.active():
            timer.cancel()
        for key, clients in list(self._waiting.items()):
            if client in clients:
                clients.remove(client)
                if not clients:
                    del self._waiting[key]

    def _expire(self, client: _RelayClient) -> None:
        self.forget(client)
        client.quit()

    def closeAll(self) -> None:
        """
        Abort every connection that ever waited here and is still open
        (waiting or carrying a later message): the service is stopping.
        """
        for client in list(self._known):
            self.forget(client)
            if client.transport is not None:
                client._connection().abortConnection()
