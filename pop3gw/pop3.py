# -*- test-case-name: tests.test_pop3 -*-
"""
The POP3 server protocol (RFC 1939, 1225, 2449, 2595, 3206, 5034).

L{POP3Server} speaks POP3 to one client; L{POP3Factory} builds them.  The
protocol sees only L{pop3gw.interfaces}, L{pop3gw.events} and a
L{twisted.cred.portal.Portal} handing out L{IPOP3Avatar}s.

Design notes:

  - Framing, the line limits, pipelining, read back-pressure, the idle
    timer, closing and the STLS discard rule are L{pop3gw.lineproto}'s.
    While a command is in flight (a login, a message transfer, the UPDATE
    state) further lines stay buffered and are answered, in order, once it
    finishes.  A line over its limit is answered as soon as the limit is
    passed, and the rest of it is dropped.
  - Each state has an explicit command table; nothing from the wire is
    looked up with C{getattr}.
  - One push producer is registered with the transport for the whole
    connection: while the client does not read what it is sent, no further
    command is answered, a message transfer pauses, and reading stops once
    L{MAX_PENDING_INPUT} octets wait, so output never piles up in memory.
  - Messages are streamed from L{IMaildrop.openMessage} in chunks that are
    dot-stuffed across chunk boundaries.
  - DELE only marks; the marks are handed to L{IMaildrop.commit} at QUIT.
    Any other ending releases the maildrop without deleting anything.
  - LAST (RFC 1225) is the highest message number accessed in this or an
    earlier session: it starts at the highest number whose message is
    L{seen<pop3gw.interfaces.IMessageInfo.seen>}, RETR (not TOP) raises it,
    and RSET puts it back to its value at login.  The messages retrieved
    (and not deleted) are handed to L{IMaildrop.commit} at QUIT to be
    marked seen, as Dovecot does; any other ending records nothing.
  - The logout line counts RETRs (C{retrieved}), TOPs (C{top}) and the
    message octets sent for both (C{bytes}: wire form before dot-stuffing,
    without the C{.} line, counted as each piece is written, so a transfer
    cut short counts what went out).
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import attr

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, ITLSTransport
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3gw import events
from pop3gw.credentials import ClientCredentials
from pop3gw.lineproto import LineProtocol
from pop3gw.sasl import BadBase64, LoginOutcome, MalformedPlain, classifyLoginFailure, decodeResponse, loggedUser, parsePlain
from pop3gw.interfaces import IPOP3Avatar, MaildropLocked, PermanentFailure, TemporaryFailure

#: Longest command line accepted, terminator included (RFC 2449 section 4).
MAX_LINE_LENGTH = 255

#: Longest SASL client response line accepted (RFC 5034 lifts the command
#: limit for continuation lines; PLAIN with a long address and password
#: needs more than 255 octets once base64-encoded).
MAX_SASL_LINE_LENGTH = 2048

#: Octets of input kept while a command is in progress before the server
#: stops reading from the client (pipelining back-pressure).
MAX_PENDING_INPUT = 65536

#: Seconds a closed connection may take to send its last reply before it is
#: aborted (a client that does not read would otherwise keep it for ever).
CLOSE_TIMEOUT = 10.0

#: Consecutive erroneous commands before the connection is closed.
MAX_BAD_COMMANDS = 20

#: Failed authentication attempts per connection before it is closed.
MAX_AUTH_FAILURES = 3

#: Default seconds of client silence before the connection is closed
#: (RFC 1939 asks for at least 10 minutes).
IDLE_TIMEOUT = 600

#: Octets read from a message file at a time when streaming it.
READ_CHUNK_SIZE = 65536

#: A message number or line count argument: 1 to 10 decimal digits.
_NUMBER = re.compile(r"^[0-9]{1,10}$")

# Fixed replies.  Nothing here ever contains text from an exception.
GREETING = "+OK {implementation} ready."
GOODBYE = "+OK {hostname} signing off."
ERR_UNKNOWN = "-ERR Unknown command."
ERR_WRONG_STATE = "-ERR Command not valid in this state."
ERR_SYNTAX = "-ERR Invalid arguments."
ERR_EMPTY = "-ERR Empty command."
ERR_NUL = "-ERR Invalid characters in command."
ERR_UTF8 = "-ERR Command is not valid UTF-8."
ERR_LINE_TOO_LONG = "-ERR Line too long."
ERR_TOO_MANY_ERRORS = "-ERR Too many errors, closing connection."
ERR_IDLE = "-ERR Idle timeout, closing connection."
ERR_INTERNAL = "-ERR [SYS/TEMP] Internal error."
ERR_NO_SUCH_MESSAGE = "-ERR No such message."
ERR_DELETED = "-ERR Message already deleted."
ERR_MESSAGE_UNAVAILABLE = "-ERR [SYS/TEMP] Message temporarily unavailable."
ERR_AUTH_FAILED = "-ERR [AUTH] Authentication failed."
ERR_PLAINTEXT = "-ERR [AUTH] Plaintext authentication disallowed on non-encrypted connections."
ERR_TOO_MANY_AUTH = "-ERR [AUTH] Too many authentication failures, closing connection."
ERR_AUTH_TEMP = "-ERR [SYS/TEMP] Authentication temporarily unavailable."
ERR_IN_USE = "-ERR [IN-USE] Mailbox is locked by another session."
ERR_MAILDROP_TEMP = "-ERR [SYS/TEMP] Mailbox temporarily unavailable."
ERR_MAILDROP_PERM = "-ERR [SYS/PERM] Mailbox unavailable."
ERR_USER_FIRST = "-ERR Send USER first."
ERR_SASL_CANCELLED = "-ERR Authentication cancelled."
ERR_SASL_BASE64 = "-ERR Invalid base64 data."
ERR_SASL_MECHANISM = "-ERR Unsupported authentication mechanism."
ERR_TLS_UNAVAILABLE = "-ERR TLS not available."
ERR_TLS_ACTIVE = "-ERR Already using TLS."
ERR_TLS_AFTER_USER = "-ERR STLS not allowed after USER."
ERR_COMMIT = "-ERR [SYS/TEMP] Some deleted messages not removed."

#: The reply to a login that did not succeed, per L{LoginOutcome}.
LOGIN_REPLIES = {
    LoginOutcome.FAILED: ERR_AUTH_FAILED,
    LoginOutcome.BUSY: ERR_AUTH_TEMP,
    LoginOutcome.UNAVAILABLE: ERR_AUTH_TEMP,
    LoginOutcome.FAULT: ERR_AUTH_TEMP,
}

_AUTHORIZATION = "AUTHORIZATION"
_TRANSACTION = "TRANSACTION"
_UPDATE = "UPDATE"


@attr.s(slots=True, auto_attribs=True)
class _Transaction:
    """
    What RSET undoes: made at login, replaced whole by a new one at RSET,
    handed to L{IMaildrop.commit} at QUIT.

    @ivar last: the highest message number accessed (RFC 1225 LAST).
    @ivar deleted: the 0-based indexes of the messages marked deleted.
    @ivar accessed: the 0-based indexes of the messages retrieved (marked
        seen at QUIT unless deleted).
    """

    last: int = 0
    deleted: set[int] = attr.Factory(set)
    accessed: set[int] = attr.Factory(set)


class _BadArguments(Exception):
    """
    A command's arguments are missing, extra or malformed (client mistake).
    """


class _NoSuchMessage(Exception):
    """
    A message number is out of range.
    """


class _MessageDeleted(Exception):
    """
    A message number names a message marked as deleted.
    """


def _noArguments(rest: str) -> None:
    """
    @raise _BadArguments: if C{rest} holds any argument.
    """
    if rest.split():
        raise _BadArguments()


def _numbers(rest: str, minimum: int, maximum: int) -> list[int]:
    """
    Parse between C{minimum} and C{maximum} decimal arguments.

    @raise _BadArguments: wrong count or not plain decimal numbers.
    """
    words = rest.split()
    if not minimum <= len(words) <= maximum:
        raise _BadArguments()
    if not all(_NUMBER.match(w) for w in words):
        raise _BadArguments()
    return [int(w) for w in words]


class _DotStuffer:
    """
    Dot-stuffs a byte stream delivered in arbitrary chunks: every line that
    begins with C{"."} gets a second one, wherever the chunk boundaries
    fall.

    @ivar atLineStart: whether the next octet begins a line.
    """

    def __init__(self) -> None:
        self.atLineStart = True

    def stuff(self, chunk: bytes) -> bytes:
        """
        @return: C{chunk}, stuffed.
        """
        if not chunk:
            return chunk
        out = chunk.replace(b"\n.", b"\n..")
        if self.atLineStart and out[:1] == b".":
            out = b"." + out
        self.atLineStart = chunk.endswith(b"\n")
        return out


class _TopFilter:
    """
    Cuts a message stream after its header, the blank line and C{lines}
    body lines (the POP3 C{TOP} command), whatever the chunk boundaries.
    """

    def __init__(self, lines: int) -> None:
        self._inHeader = True
        self._bodyLeft = lines
        self._lineHasContent = False
        self.done = False

    def _finished(self) -> bool:
        return not self._inHeader and self._bodyLeft <= 0

    def feed(self, chunk: bytes) -> bytes:
        """
        @return: the part of C{chunk} to send; L{done} is set once the rest
            of the message is not needed.
        """
        if self.done:
            return b""
        if self._finished():
            self.done = True
            return b""
        out = []
        i = 0
        n = len(chunk)
        while i < n:
            j = chunk.find(b"\n", i)
            if j == -1:
                if chunk[i:].strip(b"\r"):
                    self._lineHasContent = True
                out.append(chunk[i:])
                break
            if chunk[i:j].strip(b"\r"):
                self._lineHasContent = True
            out.append(chunk[i : j + 1])
            i = j + 1
            if self._inHeader:
                if not self._lineHasContent:
                    self._inHeader = False
            else:
                self._bodyLeft -= 1
            self._lineHasContent = False
            if self._finished():
                self.done = True
                break
        return b"".join(out)


class _MessageSender:
    """
    Streams one message (or its top) to a transport: reads C{chunkSize}
    octets at a time while not paused, dot-stuffs them and ends with the
    C{.} line.  The server's L{pop3gw.flow.OutputFlow} pauses and resumes it.

    C{onSent(n)} is called for every piece written with its length in
    message octets (wire form, before dot-stuffing), so a transfer cut
    short still counts what went out.
    """

    def __init__(
        self,
        transport,
        source,
        topLines: Optional[int],
        onDone: Callable[["_MessageSender", Optional[Failure]], None],
        onProgress: Callable[[], None],
        onSent: Callable[[int], None],
        chunkSize: int = READ_CHUNK_SIZE,
    ) -> None:
        self._transport = transport
        self._source = source
        self._top = _TopFilter(topLines) if topLines is not None else None
        self._onDone = onDone
        self._onProgress = onProgress
        self._onSent = onSent
        self._chunkSize = chunkSize
        self._stuffer = _DotStuffer()
        self._paused = False
        self._running = False
        self._finished = False

    def start(self, paused: bool) -> None:
        """
        Send as much as the transport accepts, or nothing yet if it is
        C{paused}.
        """
        self._paused = paused
        self._run()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._finished:
            self._onProgress()
        self._run()

    def stopProducing(self) -> None:
        """
        The connection is going away: close the file, send nothing more.
        """
        if self._finished:
            return
        self._finished = True
        self._close()

    def _close(self) -> None:
        try:
            self._source.close()
        except Exception:
            pass

    def _run(self) -> None:
        if self._running or self._finished:
            return
        self._running = True
        try:
            ended = self._pump()
        except Exception:
            self._finished = True
            self._close()
            self._onDone(self, Failure())
            return
        finally:
            self._running = False
        if ended:
            self._end()

    def _pump(self) -> bool:
        """
        Send chunks until paused or at the end.

        @return: whether the end of what is to be sent was reached.
        """
        while not self._paused and not self._finished:
            chunk = self._source.read(self._chunkSize)
            if not chunk:
                return True
            if self._top is not None:
                chunk = self._top.feed(chunk)
            data = self._stuffer.stuff(chunk)
            if data:
                self._transport.write(data)
                self._onSent(len(chunk))
            if self._top is not None and self._top.done:
                return True
        return False

    def _end(self) -> None:
        self._finished = True
        self._close()
        if self._stuffer.atLineStart:
            self._transport.write(b".\r\n")
        else:
            self._transport.write(b"\r\n.\r\n")
        self._onDone(self, None)


def _plainAuthcid(encoded: bytes) -> Optional[str]:
    """
    The authentication identity of a SASL PLAIN response, for a log line;
    the password in it is not looked at.

    @return: L{None} if C{encoded} is not a well-formed response.
    """
    authcid = loggedUser("PLAIN", encoded)
    try:
        return None if authcid is None else authcid.decode("utf-8")
    except UnicodeDecodeError:
        return None


class POP3Server(LineProtocol):
    """
    One POP3 session.  Its settings (portal, plaintext policy, clock, STLS
    context, idle timeout, names) are those of its L{POP3Factory}, read
    through C{self.factory}.

    @ivar state: C{"AUTHORIZATION"}, C{"TRANSACTION"} or C{"UPDATE"}.
    """

    log = Logger()

    maxPendingInput = MAX_PENDING_INPUT
    closeTimeout = CLOSE_TIMEOUT

    # Per-session state.  The defaults live on the class, and an instance
    # gets its own attribute only when a value changes: an idle connection
    # then costs little memory.  The mutable containers of the TRANSACTION
    # state are made at login.
    state = _AUTHORIZATION
    _badCommands = 0
    _authFailures = 0
    _user: Optional[str] = None
    _refusedUser: Optional[str] = None
    _saslPending = False
    _avatar = None
    _logout: Optional[Callable[[], None]] = None
    _maildrop = None
    _messages: Sequence = ()
    _initialLast = 0
    _transaction: Optional["_Transaction"] = None
    _sender: Optional["_MessageSender"] = None
    _loggedOut = False
    _committing = False
    _retrieved = 0
    _topped = 0
    _bytesSent = 0

    def __init__(self, factory: "POP3Factory") -> None:
        super().__init__()
        self.factory = factory

    @property
    def clock(self) -> IReactorTime:
        return self.factory.clock

    @property
    def idleTimeout(self) -> Optional[float]:
        return self.factory.idleTimeout

    # --- Connection ------------------------------------------------------

    def connectionMade(self) -> None:
        self.startSession()
        self._reply(GREETING.format(implementation=self.factory.implementation))

    def connectionLost(self, reason: Failure = None) -> None:
        self.endSession()
        # Whatever the state: a maildrop held must never stay locked.
        if self._maildrop is not None:
            self._releaseMaildrop()
            if self.state == _TRANSACTION:
                self._logSessionEnd(deleted=0)
        # A commit in progress releases the maildrop and logs out itself.
        if not self._committing:
            self._callLogout()

    def _releaseMaildrop(self) -> None:
        maildrop, self._maildrop = self._maildrop, None
        if maildrop is None:
            return
        try:
            maildrop.release()
        except Exception:
            self.log.failure("releasing maildrop of {user}", user=self._avatarName())

    def _callLogout(self) -> None:
        logout, self._logout = self._logout, None
        if logout is not None:
            try:
                logout()
            except Exception:
                self.log.failure("portal logout failed")

    def _close(self, text: Optional[str] = None) -> None:
        """
        Send the reply C{text} (if any) and close the connection.
        """
        self.closeConnection(None if text is None else text.encode("utf-8") + b"\r\n")

    def stopWork(self) -> None:
        """
        Stop any message transfer: the connection is closing.
        """
        if self._sender is not None:
            sender, self._sender = self._sender, None
            sender.stopProducing()

    def _outputPaused(self) -> None:
        """
        The client is not reading: pause any transfer; nothing more is
        answered until L{_outputResumed}.
        """
        if self._sender is not None:
            self._sender.pauseProducing()

    def _outputResumed(self) -> None:
        if self.ended():
            return
        if self._sender is not None:
            self._sender.resumeProducing()
        else:
            self.processBuffer()

    def idleTimedOut(self) -> None:
        if self._sender is not None:
            # Mid-message a reply line would look like message text: just
            # close, without the terminating "." line.
            self.stopWork()
            self._close()
            return
        # A client that stopped reading is aborted without the reply.
        self._close(ERR_IDLE)

    # --- Output -------------------------------------------------------------

    def _reply(self, text: str) -> None:
        """
        Send one reply line; a C{+OK} ends a run of bad commands.
        """
        if self._disconnected:
            return
        if text.startswith("+OK"):
            self._badCommands = 0
        self.transport.write(text.encode("utf-8") + b"\r\n")

    def _replyMultiline(self, first: str, lines: list[str]) -> None:
        """
        Send a C{+OK} line, the (dot-stuffed) C{lines} and the C{.} line.
        """
        out = [first]
        for line in lines:
            out.append("." + line if line.startswith(".") else line)
        out.append(".")
        if self._disconnected:
            return
        self._badCommands = 0
        self.transport.write(("\r\n".join(out) + "\r\n").encode("utf-8"))

    def _clientError(self, text: str) -> None:
        """
        Answer a client mistake; close after too many in a row.
        """
        self._badCommands += 1
        if self._badCommands >= MAX_BAD_COMMANDS:
            self._close(ERR_TOO_MANY_ERRORS)
        else:
            self._reply(text)

    # --- Input ------------------------------------------------------------

    def lineLimit(self, head: bytes) -> int:
        return MAX_SASL_LINE_LENGTH if self._saslPending else MAX_LINE_LENGTH

    def lineTooLong(self) -> None:
        self._saslPending = False
        self._clientError(ERR_LINE_TOO_LONG)

    def lineReceived(self, raw: bytes) -> None:
        try:
            if self._saslPending:
                self._saslPending = False
                self._saslResponse(raw)
                return
            if b"\x00" in raw:
                self._clientError(ERR_NUL)
                return
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                self._clientError(ERR_UTF8)
                return
            if not line.strip():
                self._clientError(ERR_EMPTY)
                return
            word, _, rest = line.partition(" ")
            name = word.upper() if word.isascii() else ""
            table = self._commandTable()
            handler = table.get(name)
            if handler is None:
                if name in _ALL_COMMANDS:
                    self._clientError(ERR_WRONG_STATE)
                else:
                    self._clientError(ERR_UNKNOWN)
                return
            try:
                handler(self, rest)
            except _BadArguments:
                self._clientError(ERR_SYNTAX)
            except _NoSuchMessage:
                self._clientError(ERR_NO_SUCH_MESSAGE)
            except _MessageDeleted:
                self._clientError(ERR_DELETED)
        except Exception:
            self.log.failure("unexpected error handling a POP3 command")
            self._saslPending = False
            self.dropInFlight()
            self.stopWork()
            self._reply(ERR_INTERNAL)

    def _commandTable(self) -> dict:
        return _COMMAND_TABLES.get(self.state, {})

    # --- Policy -------------------------------------------------------------

    def _plaintextAllowed(self) -> bool:
        return bool(self.factory.plaintextAllowed(self.secure, self.peer))

    def _stlsOffered(self) -> bool:
        return (
            self.factory.tlsContextFactory is not None
            and not self.secure
            and self.state == _AUTHORIZATION
            and ITLSTransport.providedBy(self.transport)
        )

    # --- Commands valid in every state -------------------------------------

    def do_CAPA(self, rest: str) -> None:
        """
        RFC 2449 capabilities; USER, SASL and STLS only where usable now.
        """
        _noArguments(rest)
        caps = ["TOP"]
        if self.state == _AUTHORIZATION and self._plaintextAllowed():
            caps.append("USER")
        caps += [
            "UIDL",
            "RESP-CODES",
            "AUTH-RESP-CODE",
            "PIPELINING",
            "EXPIRE NEVER",
            "LOGIN-DELAY 0",
        ]
        if self.state == _AUTHORIZATION:
            if self._plaintextAllowed():
                caps.append("SASL PLAIN")
            if self._stlsOffered():
                caps.append("STLS")
        caps.append(f"IMPLEMENTATION {self.factory.implementation}")
        self._replyMultiline("+OK Capability list follows.", caps)

    # --- AUTHORIZATION --------------------------------------------------------

    def do_QUIT_authorization(self, rest: str) -> None:
        self._close(GOODBYE.format(hostname=self.factory.hostname))

    def do_USER(self, rest: str) -> None:
        words = rest.split()
        if len(words) != 1:
            raise _BadArguments()
        self._user = None
        if not self._plaintextAllowed():
            self._refusedUser = words[0]
            self._refusePlaintext(words[0])
            return
        self._user = words[0]
        self._reply("+OK Send PASS.")

    def do_PASS(self, rest: str) -> None:
        user, self._user = self._user, None
        if not self._plaintextAllowed():
            refused, self._refusedUser = self._refusedUser, None
            self._refusePlaintext(refused)
            return
        if user is None:
            self._clientError(ERR_USER_FIRST)
            return
        if not rest:
            raise _BadArguments()
        self._login(user, rest.encode("utf-8"))

    def do_AUTH(self, rest: str) -> None:
        self._user = None
        words = rest.split()
        if not words:
            mechanisms = ["PLAIN"] if self._plaintextAllowed() else []
            self._replyMultiline("+OK Supported mechanisms follow.", mechanisms)
            return
        if len(words) > 2:
            raise _BadArguments()
        if words[0].upper() != "PLAIN":
            self._clientError(ERR_SASL_MECHANISM)
            return
        if not self._plaintextAllowed():
            self._refusePlaintext(_plainAuthcid(words[1].encode("ascii", "replace")) if len(words) == 2 else None)
            return
        if len(words) == 1:
            self._saslPending = True
            if not self._disconnected:
                self.transport.write(b"+ \r\n")
            return
        self._saslPlain(words[1].encode("ascii", "replace"))

    def _refusePlaintext(self, user: Optional[str]) -> None:
        """
        Refuse a plaintext login the policy disallows here, and log it as
        refused (not as a failed login, which fail2ban would count).

        @param user: the login name the client gave, if known.
        """
        events.loginRefused(self.log, "pop3", user, self.peer, events.PLAINTEXT_DISALLOWED)
        self._clientError(ERR_PLAINTEXT)

    def _saslResponse(self, raw: bytes) -> None:
        """
        The client's line after our C{+ } continuation.
        """
        if raw.strip() == b"*":
            self._clientError(ERR_SASL_CANCELLED)
            return
        self._saslPlain(raw.strip(), continuation=True)

    def _saslPlain(self, encoded: bytes, continuation: bool = False) -> None:
        """
        Decode and check a PLAIN response (RFC 4616) and log in with it.
        """
        try:
            response = parsePlain(decodeResponse(encoded, emptyMarker=not continuation))
        except BadBase64:
            self._clientError(ERR_SASL_BASE64)
            return
        except MalformedPlain:
            self._authFailed(None, "malformed SASL PLAIN response")
            return
        password = response.password
        try:
            user = response.authcid.decode("utf-8")
            authz = response.authzid.decode("utf-8")
        except UnicodeDecodeError:
            self._authFailed(None, "malformed SASL PLAIN response")
            return
        if not user or not password:
            self._authFailed(user or None, "malformed SASL PLAIN response")
            return
        if authz and authz != user:
            self._authFailed(user, "authorization identity differs")
            return
        self._login(user, password)

    def do_STLS(self, rest: str) -> None:
        _noArguments(rest)
        if self.secure:
            self._clientError(ERR_TLS_ACTIVE)
            return
        if not self._stlsOffered():
            self._clientError(ERR_TLS_UNAVAILABLE)
            return
        if self._user is not None:
            self._clientError(ERR_TLS_AFTER_USER)
            return
        self._reply("+OK Begin TLS negotiation")
        if not self.startTLS(self.factory.tlsContextFactory):
            return
        self._user = None
        self._saslPending = False
        self.state = _AUTHORIZATION

    # --- Login ----------------------------------------------------------------

    def _login(self, user: str, password: bytes) -> None:
        """
        Check the credentials with the portal, then open the maildrop.
        Further input waits until this is over.
        """
        creds = ClientCredentials(user.encode("utf-8"), password, self.peer)
        d = defer.maybeDeferred(self.factory.portal.login, creds, None, IPOP3Avatar)
        d.addCallbacks(self._cbLoggedIn, self._ebLogin, callbackArgs=(user,), errbackArgs=(user,))
        self.hold(d)

    def commandFailed(self, reason: Failure) -> None:
        """
        A bug in a login or QUIT callback: say so without details and close;
        L{connectionLost} releases whatever is held.
        """
        self.log.failure("unexpected error in a POP3 session", reason)
        if self._committing:
            self._committing = False
            self._callLogout()
        self._close(ERR_INTERNAL)

    def _ebLogin(self, reason: Failure, user: str) -> None:
        """
        Answer and log a login that did not succeed, as L{pop3gw.sasl.LOGIN_ERRORS}
        says; a client that hung up gets no answer but the same log line.
        """
        kind = classifyLoginFailure(reason)
        reply = LOGIN_REPLIES[kind]
        ended = self.ended()
        if kind is LoginOutcome.FAILED:
            if ended:
                events.loginFailed(self.log, "pop3", user, self.peer)
                return
            self._authFailed(user)
            return
        if kind is LoginOutcome.UNAVAILABLE:
            events.loginUnavailable(self.log, "pop3", user, self.peer, str(reason.value))
        elif kind is LoginOutcome.FAULT:
            self.log.failure("authentication backend failed", reason)
        if not ended:
            self._reply(reply)

    def _warnUnavailable(self, what: str, reason: Failure) -> None:
        """
        Log an expected server-side refusal (C{what}, a fixed phrase) with
        its operator-facing text; the client gets only a fixed reply.
        """
        self.log.warn("{what}: rhost={peer} error={error}", what=what, peer=self.peer, error=str(reason.value))

    def _authFailed(self, user: Optional[str], reason: str = "bad credentials") -> None:
        """
        Count and log a failed attempt; close after L{MAX_AUTH_FAILURES}.
        """
        self._authFailures += 1
        events.loginFailed(self.log, "pop3", user, self.peer, reason)
        if self._authFailures >= MAX_AUTH_FAILURES:
            self._close(ERR_TOO_MANY_AUTH)
        else:
            self._reply(ERR_AUTH_FAILED)

    def _cbLoggedIn(self, result, user: str):
        interface, avatar, logout = result
        self._logout = logout
        if self.ended():
            self._callLogout()
            return None
        self._avatar = avatar
        d = defer.maybeDeferred(avatar.openMaildrop)
        d.addCallbacks(self._cbMaildrop, self._ebMaildrop)
        d.addErrback(self.commandFailed)
        return d

    def _ebMaildrop(self, reason: Failure) -> None:
        user = self._avatarName()
        self._avatar = None
        self._callLogout()
        if self.ended():
            return
        if reason.check(MaildropLocked):
            self.log.info(
                "maildrop in use: service=pop3 rhost={peer} user={user}",
                peer=self.peer,
                user=events.sanitize(user),
            )
            self._reply(ERR_IN_USE)
        elif reason.check(TemporaryFailure):
            self._warnUnavailable("maildrop unavailable", reason)
            self._reply(ERR_MAILDROP_TEMP)
        elif reason.check(PermanentFailure):
            self._warnUnavailable("maildrop refused", reason)
            self._reply(ERR_MAILDROP_PERM)
        else:
            self.log.failure("opening maildrop failed", reason)
            self._reply(ERR_MAILDROP_TEMP)

    def _cbMaildrop(self, maildrop) -> None:
        if self.ended():
            try:
                maildrop.release()
            except Exception:
                self.log.failure("releasing maildrop failed")
            self._avatar = None
            self._callLogout()
            return
        self._maildrop = maildrop
        self._messages = list(maildrop.messages)
        self._initialLast = max((n for n, m in enumerate(self._messages, 1) if m.seen), default=0)
        self._transaction = _Transaction(last=self._initialLast)
        self.state = _TRANSACTION
        self._reply("+OK Logged in.")
        events.loginSucceeded(self.log, "pop3", self._avatarName(), self.peer, self.secure)

    def _avatarName(self) -> str:
        address = getattr(self._avatar, "address", None)
        return str(address) if address is not None else ""

    # --- TRANSACTION ------------------------------------------------------

    def _message(self, number: int) -> int:
        """
        @return: the 0-based index of the live message C{number}.
        @raise _NoSuchMessage: out of range.
        @raise _MessageDeleted: marked as deleted.
        """
        if not 1 <= number <= len(self._messages):
            raise _NoSuchMessage()
        index = number - 1
        if index in self._transaction.deleted:
            raise _MessageDeleted()
        return index

    def _live(self) -> list[tuple[int, object]]:
        deleted = self._transaction.deleted
        return [(i + 1, m) for i, m in enumerate(self._messages) if i not in deleted]

    def do_STAT(self, rest: str) -> None:
        _noArguments(rest)
        live = self._live()
        self._reply("+OK %d %d" % (len(live), sum(m.size for _, m in live)))

    def do_LIST(self, rest: str) -> None:
        args = _numbers(rest, 0, 1)
        if args:
            index = self._message(args[0])
            self._reply("+OK %d %d" % (args[0], self._messages[index].size))
            return
        live = self._live()
        total = sum(m.size for _, m in live)
        self._replyMultiline(
            "+OK %d messages (%d octets)" % (len(live), total),
            ["%d %d" % (n, m.size) for n, m in live],
        )

    def do_UIDL(self, rest: str) -> None:
        args = _numbers(rest, 0, 1)
        if args:
            index = self._message(args[0])
            self._reply("+OK %d %s" % (args[0], self._messages[index].uid))
            return
        self._replyMultiline("+OK Unique-ID listing follows.", ["%d %s" % (n, m.uid) for n, m in self._live()])

    def do_DELE(self, rest: str) -> None:
        (number,) = _numbers(rest, 1, 1)
        index = self._message(number)
        self._transaction.deleted.add(index)
        self._reply("+OK Message %d deleted." % (number,))

    def do_NOOP(self, rest: str) -> None:
        _noArguments(rest)
        self._reply("+OK")

    def do_RSET(self, rest: str) -> None:
        """
        Unmark every deletion and, as RFC 1225 says, put the highest
        message number accessed back to its value at the beginning of the
        session: the messages retrieved so far are no longer marked seen at
        QUIT.
        """
        _noArguments(rest)
        self._transaction = _Transaction(last=self._initialLast)
        live = self._live()
        self._reply("+OK Maildrop has %d messages (%d octets)." % (len(live), sum(m.size for _, m in live)))

    def do_LAST(self, rest: str) -> None:
        """
        RFC 1225: the highest message number accessed, in this session or
        (through the seen flags) an earlier one; 0 if none.
        """
        _noArguments(rest)
        self._reply("+OK %d" % (self._transaction.last,))

    def do_RETR(self, rest: str) -> None:
        (number,) = _numbers(rest, 1, 1)
        index = self._message(number)
        source = self._open(index)
        if source is None:
            return
        self._reply("+OK %d octets" % (self._messages[index].size,))
        transaction = self._transaction
        transaction.last = max(transaction.last, number)
        transaction.accessed.add(index)
        self._send(source, None)

    def do_TOP(self, rest: str) -> None:
        number, lines = _numbers(rest, 2, 2)
        index = self._message(number)
        source = self._open(index)
        if source is None:
            return
        self._reply("+OK Top of message follows.")
        self._send(source, lines)

    def _open(self, index: int):
        """
        @return: the message file, or L{None} after replying if it is gone.
        """
        try:
            return self._maildrop.openMessage(index)
        except TemporaryFailure as e:
            self.log.warn(
                "message unavailable: user={user} index={index} error={error}",
                user=events.sanitize(self._avatarName()),
                index=index,
                error=str(e),
            )
            self._reply(ERR_MESSAGE_UNAVAILABLE)
            return None

    def _send(self, source, topLines: Optional[int]) -> None:
        done: defer.Deferred = defer.Deferred()
        sender = _MessageSender(
            self.transport,
            source,
            topLines,
            onDone=lambda sender, failure: self._transferDone(sender, failure, topLines is None, done),
            onProgress=self.resetTimeout,
            onSent=self._countSent,
        )
        self._sender = sender
        self.hold(done)
        sender.start(paused=self._output.paused)

    def _countSent(self, octets: int) -> None:
        """
        Count message octets written for RETR or TOP (the logout line's
        C{bytes}).
        """
        self._bytesSent += octets

    def _transferDone(
        self, sender: _MessageSender, failure: Optional[Failure], whole: bool, done: defer.Deferred
    ) -> None:
        """
        A RETR (C{whole}) or TOP transfer ended: count it, or close if the
        message could not be read; then fire C{done}, the command in flight.
        """
        if self._sender is sender:
            self._sender = None
        if failure is not None:
            # The +OK line and part of the message are out: never let the
            # client mistake a truncated message for a whole one.
            self.log.failure("reading message failed", failure)
            self._close()
        else:
            if whole:
                self._retrieved += 1
            else:
                self._topped += 1
            self.resetTimeout()
        done.callback(None)

    def do_QUIT_transaction(self, rest: str) -> None:
        """
        Enter the UPDATE state: delete the marked messages and mark the
        other retrieved ones seen, then close.
        """
        _noArguments(rest)
        self.state = _UPDATE
        self._committing = True
        self.cancelTimeout()
        transaction = self._transaction
        deleted = sorted(transaction.deleted)
        seen = sorted(transaction.accessed - transaction.deleted)
        maildrop, self._maildrop = self._maildrop, None
        d = defer.maybeDeferred(maildrop.commit, deleted, seen=seen)
        d.addCallbacks(self._cbCommitted, self._ebCommit, callbackArgs=(len(deleted),))
        self.hold(d)

    def _cbCommitted(self, ignored, deleted: int) -> None:
        self._committing = False
        self._logSessionEnd(deleted=deleted)
        self._callLogout()
        self._close(GOODBYE.format(hostname=self.factory.hostname))

    def _ebCommit(self, reason: Failure) -> None:
        self._committing = False
        if reason.check(TemporaryFailure):
            self.log.warn(
                "commit failed: user={user} error={error}",
                user=events.sanitize(self._avatarName()),
                error=str(reason.value),
            )
        else:
            self.log.failure("commit failed", reason)
        self._logSessionEnd(deleted=0)
        self._callLogout()
        self._close(ERR_COMMIT)

    def _logSessionEnd(self, deleted: int) -> None:
        if self._loggedOut:
            return
        self._loggedOut = True
        events.loggedOut(
            self.log,
            "pop3",
            self._avatarName(),
            self.peer,
            retrieved=self._retrieved,
            top=self._topped,
            deleted=deleted,
            bytes=self._bytesSent,
        )


_AUTHORIZATION_COMMANDS = {
    "CAPA": POP3Server.do_CAPA,
    "USER": POP3Server.do_USER,
    "PASS": POP3Server.do_PASS,
    "AUTH": POP3Server.do_AUTH,
    "STLS": POP3Server.do_STLS,
    "QUIT": POP3Server.do_QUIT_authorization,
}

_TRANSACTION_COMMANDS = {
    "CAPA": POP3Server.do_CAPA,
    "STAT": POP3Server.do_STAT,
    "LIST": POP3Server.do_LIST,
    "RETR": POP3Server.do_RETR,
    "DELE": POP3Server.do_DELE,
    "NOOP": POP3Server.do_NOOP,
    "RSET": POP3Server.do_RSET,
    "TOP": POP3Server.do_TOP,
    "UIDL": POP3Server.do_UIDL,
    "LAST": POP3Server.do_LAST,
    "QUIT": POP3Server.do_QUIT_transaction,
}

_COMMAND_TABLES = {
    _AUTHORIZATION: _AUTHORIZATION_COMMANDS,
    _TRANSACTION: _TRANSACTION_COMMANDS,
}

#: Every command some state accepts: any other is unknown rather than
#: not valid in this state.
_ALL_COMMANDS = frozenset().union(*_COMMAND_TABLES.values())


class POP3Factory(ServerFactory):
    """
    Builds L{POP3Server}s.  Also used under implicit TLS (wrapped in a
    L{twisted.protocols.tls.TLSMemoryBIOFactory}): the protocol then sees
    an L{ISSLTransport} and counts as secure from the start.

    @ivar plaintextAllowed: C{(secure, peerHost) -> bool}: whether USER/PASS
        and AUTH PLAIN are allowed on a connection.
    @ivar tlsContextFactory: passed to C{transport.startTLS} for STLS; if
        L{None}, STLS is not offered.
    """

    protocol = POP3Server

    def __init__(
        self,
        portal,
        plaintextAllowed: Callable[[bool, str], bool],
        clock: IReactorTime,
        tlsContextFactory=None,
        idleTimeout: Optional[float] = IDLE_TIMEOUT,
        hostname: str = "pop3gw",
        implementation: str = "pop3gw",
    ) -> None:
        self.portal = portal
        self.plaintextAllowed = plaintextAllowed
        self.clock = clock
        self.tlsContextFactory = tlsContextFactory
        self.idleTimeout = idleTimeout
        self.hostname = hostname
        self.implementation = implementation

    def buildProtocol(self, addr) -> POP3Server:
        return self.protocol(self)
