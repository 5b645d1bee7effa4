# -*- test-case-name: tests.test_pop3 -*-
"""
The POP3 server protocol (RFC 1939, 1225, 2449, 2595, 3206, 5034).

L{POP3Server} speaks POP3 to one client; L{POP3Factory} builds them.  The
protocol sees only L{pop3gw.interfaces}, L{pop3gw.events} and a
C{twisted.cred.portal.Portal} handing out L{IPOP3Avatar}s.

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
  - After a RETR the next message, if it is small and not marked deleted,
    is opened and its first chunk read while the client reads (see
    L{TransactionCommands._readAhead
    <pop3gw.pop3transaction.TransactionCommands._readAhead>}); a RETR or
    TOP of it uses what was read, and anything left unused is closed at
    the next RETR or TOP, at QUIT and when the connection ends.
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

from typing import TYPE_CHECKING, Callable, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, ITLSTransport
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3gw.lineproto import LineProtocol
from pop3gw.pop3login import AuthorizationCommands
from pop3gw.pop3replies import (
    _AUTHORIZATION,
    _TRANSACTION,
    CLOSE_TIMEOUT,
    ERR_DELETED,
    ERR_EMPTY,
    ERR_IDLE,
    ERR_INTERNAL,
    ERR_LINE_TOO_LONG,
    ERR_LOGIN_TIMEOUT,
    ERR_NO_SUCH_MESSAGE,
    ERR_NUL,
    ERR_SYNTAX,
    ERR_TOO_MANY_ERRORS,
    ERR_UNKNOWN,
    ERR_UTF8,
    ERR_WRONG_STATE,
    GOODBYE,
    GREETING,
    IDLE_TIMEOUT,
    MAX_BAD_COMMANDS,
    MAX_LINE_LENGTH,
    MAX_PENDING_INPUT,
    MAX_SASL_LINE_LENGTH,
    _BadArguments,
    _MessageDeleted,
    _noArguments,
    _NoSuchMessage,
)
from pop3gw.pop3transaction import TransactionCommands, _Transaction
from pop3gw.pop3transfer import READ_CHUNK_SIZE, _DotStuffer, _MessageSender, _TopFilter

__all__ = [
    "CLOSE_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_PENDING_INPUT",
    "READ_CHUNK_SIZE",
    "POP3Factory",
    "POP3Server",
    "_DotStuffer",
    "_TopFilter",
]


class POP3Server(AuthorizationCommands, TransactionCommands, LineProtocol):
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
    _totalSize = 0
    _transaction: Optional["_Transaction"] = None
    _sender: Optional["_MessageSender"] = None
    _ahead: Optional[tuple[int, Deferred]] = None
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
        self.startLoginDeadline(self.factory.loginTimeout)
        self._reply(GREETING.format(implementation=self.factory.implementation))

    def loginTimedOut(self) -> None:
        """
        Not logged in within L{POP3Factory.loginTimeout} seconds of
        connecting: C{-ERR} and close (no reply while a command is being
        answered: it would come out of order).
        """
        if self.commandInFlight:
            self._close()
            return
        self._close(ERR_LOGIN_TIMEOUT)

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
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
        self._dropReadAhead()
        maildrop, self._maildrop = self._maildrop, None
        # The protocol and its transport refer to each other, so the
        # listing (large for a large maildrop) would otherwise wait for
        # the garbage collector.
        self._messages = ()
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
        self.sendReply(text.encode("utf-8") + b"\r\n")

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
        self.sendReply(("\r\n".join(out) + "\r\n").encode("utf-8"))

    def _replyBlock(self, first: str, body: bytes) -> None:
        """
        Send the C{+OK} line C{first} and C{body} (the rest of a multi-line
        response, dot-stuffed, with its C{.} line) in one write.
        """
        if self._disconnected:
            return
        self._badCommands = 0
        self.sendReply(first.encode("utf-8") + b"\r\n" + body)

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

    def do_QUIT_authorization(self, rest: str) -> None:
        self._close(GOODBYE.format(hostname=self.factory.hostname))

    # --- Shared by the states ---------------------------------------------------

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

    def _avatarName(self) -> str:
        address = getattr(self._avatar, "address", None)
        return str(address) if address is not None else ""


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


if TYPE_CHECKING:
    _ServerFactory = ServerFactory[POP3Server]
else:
    # Subscripted for the type checker only: importing does not depend on
    # the installed Twisted's factories being generic.
    _ServerFactory = ServerFactory


class POP3Factory(_ServerFactory):
    """
    Builds L{POP3Server}s.  Also used under implicit TLS (wrapped in a
    C{twisted.protocols.tls.TLSMemoryBIOFactory}): the protocol then sees
    an C{ISSLTransport} and counts as secure from the start.

    @ivar plaintextAllowed: C{(secure, peerHost) -> bool}: whether USER/PASS
        and AUTH PLAIN are allowed on a connection.
    @ivar tlsContextFactory: passed to C{transport.startTLS} for STLS; if
        C{None}, STLS is not offered.
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
        loginTimeout: Optional[float] = None,
    ) -> None:
        self.portal = portal
        self.plaintextAllowed = plaintextAllowed
        self.clock = clock
        self.tlsContextFactory = tlsContextFactory
        self.idleTimeout = idleTimeout
        self.hostname = hostname
        self.implementation = implementation
        self.loginTimeout = loginTimeout

    def buildProtocol(self, addr) -> POP3Server:
        return self.protocol(self)
