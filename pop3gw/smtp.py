# -*- test-case-name: tests.test_smtp -*-
"""
The SMTP message submission server (RFC 6409).

Implements RFC 5321 as profiled by RFC 6409, with the extensions AUTH PLAIN
and LOGIN (RFC 4954), STARTTLS (RFC 3207), SIZE (RFC 1870), PIPELINING
(RFC 2920), 8BITMIME (RFC 6152) and ENHANCEDSTATUSCODES (RFC 2034, RFC 3463
codes).  CHUNKING/BDAT, DSN and SMTPUTF8 are not offered.

The protocol stands on L{pop3gw.lineproto.LineProtocol} (framing, limits,
pipelining, back-pressure, idle and close timers, STARTTLS's buffer
discard); it sees only L{pop3gw.interfaces},
L{pop3gw.address}, L{pop3gw.events} and a C{twisted.cred.portal.Portal}
whose realm hands out L{ISubmissionAvatar}s.

Commands
========

Command lines end with LF (an optional CR before it is removed).  A command
line may be L{MAX_COMMAND_LINE} octets long including CRLF (RFC 5321
4.5.3.1.4); AUTH lines and SASL responses, which carry base64
credentials, may be L{MAX_AUTH_LINE} octets (RFC 4954 section 4), however
they are segmented.  Longer lines are discarded up
to their end and answered C{500 5.5.6}; the session goes on.  Each protocol
state has an explicit table of the commands it accepts; a known command in
the wrong state gets C{503 5.5.1} (or C{530 5.7.0} before authentication),
an unknown one C{500 5.5.2}.  After L{MAX_ERRORS} 5xx replies the server
says C{421 4.7.0} and closes.

A streaming producer is registered with the transport for the whole
connection: while the transport pauses it (the client does not read its
replies) nothing more is answered, and reading stops once
L{MAX_PENDING_INPUT} octets wait.  A close while the output is stalled
aborts the connection; a graceful close is aborted after L{CLOSE_TIMEOUT}
seconds.  Only data holding a line end resets the idle timer.  If TLS
cannot start after C{220} to STARTTLS, the connection is closed.

Message data
============

The data after C{354}, its smuggling rules, the header fix-ups, the message
ids and the commit are L{pop3gw.smtpdata}'s.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Optional

import attr
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3gw import events
from pop3gw.address import Address, AddressError
from pop3gw.interfaces import (
    ISubmissionAvatar,
    PermanentFailure,
    TemporaryFailure,
    UnknownUser,
)
from pop3gw.lineproto import LineProtocol
from pop3gw.smtpauth import AuthCommands
from pop3gw.smtpdata import DataCommands, _MessageReader, formatDate
from pop3gw.smtpreplies import (
    ALREADY_AUTHENTICATED,
    AUTH_REQUIRED,
    BAD_BODY,
    BAD_CHARACTERS,
    BAD_RECIPIENT_ADDRESS,
    BAD_SENDER_ADDRESS,
    BAD_SEQUENCE,
    BAD_SIZE,
    BYE,
    CANNOT_VRFY,
    CLOSE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_RECIPIENTS,
    EHLO_SYNTAX,
    HELO_SYNTAX,
    HELP,
    INTERNAL_ERROR,
    LINE_TOO_LONG,
    MAIL_SYNTAX,
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    MAX_ERRORS,
    MAX_HELO_NAME,
    MAX_PENDING_INPUT,
    NEED_MAIL,
    NESTED_MAIL,
    NO_ARGUMENTS,
    NO_STARTTLS,
    NULL_SENDER,
    OK,
    POSTMASTER,
    RCPT_SYNTAX,
    READY_TLS,
    RECIPIENT_OK,
    RECIPIENT_REFUSED,
    SEND_EHLO_FIRST,
    SEND_HELO_FIRST,
    SENDER_NOT_OWNED,
    SENDER_OK,
    SERVICE,
    TEMPORARY_FAILURE,
    TLS_ACTIVE,
    TOO_BIG,
    TOO_MANY_RECIPIENTS,
    UNKNOWN_COMMAND,
    UNKNOWN_PARAMETER,
    USER_UNKNOWN,
    VRFY_SYNTAX,
    Reply,
    SMTPRefusal,
    _Envelope,
    _Mode,
    _State,
)
from pop3gw.wire import DEFAULT_MAX_MESSAGE_SIZE

if TYPE_CHECKING:
    from twisted.cred.portal import Portal
    from twisted.internet.interfaces import IReactorTime

__all__ = [
    "CLOSE_TIMEOUT",
    "MAX_AUTH_LINE",
    "MAX_PENDING_INPUT",
    "SubmissionFactory",
    "SubmissionServer",
    "formatDate",
    "parsePath",
]


# --- Helpers ------------------------------------------------------------------

_PATH = re.compile(r"^(?P<kind>FROM|TO): *<(?P<path>[^<>]*)>(?: +(?P<params>.*))?$", re.IGNORECASE)
_HELO_NAME = re.compile(r"^[\x21-\x7e]+$")


def parsePath(text: str, kind: str) -> tuple[str, list[str]]:
    """
    Parse the argument of MAIL (C{kind="FROM"}) or RCPT (C{kind="TO"}).

    @return: the text between the angle brackets and the list of ESMTP
        parameters.
    @raise ValueError: the syntax is wrong.
    """
    m = _PATH.match(text)
    if m is None or m.group("kind").upper() != kind:
        raise ValueError(text)
    params = [p for p in (m.group("params") or "").split(" ") if p]
    return m.group("path"), params


# --- The protocol -------------------------------------------------------------


class SubmissionServer(AuthCommands, DataCommands, LineProtocol):
    """
    One SMTP submission session.  Built by L{SubmissionFactory}.

    The C{Received:} header added to each message names the client's
    EHLO/HELO argument (C{unknown} when that is an address literal or an IP
    address), the literal C{(authenticated user)} and the server, but never
    the client's IP address nor the user's name: submission
    clients are often on home or mobile networks, and their address is
    private information.  Operators who want it have it in the log lines
    (L{pop3gw.events}).
    """

    log = Logger()

    maxPendingInput = MAX_PENDING_INPUT
    closeTimeout = CLOSE_TIMEOUT
    bareLFCountsAsCRLF = True
    tooLongAtOnce = False

    def __init__(self, factory: "SubmissionFactory") -> None:
        super().__init__()
        self.factory = factory
        self._state = _State.FRESH
        self._mode = _Mode.COMMAND
        self._helo: Optional[str] = None
        self._esmtp = False
        self._avatar: Optional[ISubmissionAvatar] = None
        self._logout: Optional[Callable[[], None]] = None
        self._user = ""
        self._envelope = _Envelope()
        self._reader: Optional[_MessageReader] = None
        self._auth: Optional[tuple] = None
        self._authFailures = 0
        self._errors = 0
        self._messages = 0
        self._bytes = 0

    @property
    def clock(self):
        return self.factory.clock

    @property
    def idleTimeout(self) -> Optional[float]:
        return self.factory.idleTimeout

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        """
        Greet the client and start the idle timer.
        """
        self.startSession()
        self._send(Reply(220, f"{self.factory.hostname} ESMTP ready"))

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        """
        Abort any open delivery, log out, log the session's counters.
        """
        self._closing = True
        self.endSession()
        self._endAuthentication()

    def stopWork(self) -> None:
        """
        Abort the message being read, if any.
        """
        if self._reader is not None:
            self._reader.abort()
            self._reader = None

    def idleTimedOut(self) -> None:
        if self.commandInFlight:
            # The server, not the client, is slow: wait on.
            self.restartTimeout()
            return
        self._close(Reply(421, f"4.4.2 {self.factory.hostname} Error: timeout exceeded"))

    def _close(self, reply: Reply) -> None:
        """
        Send a last reply and close the connection (see
        L{LineProtocol.closeConnection}).
        """
        self.closeConnection(reply.toBytes())

    def _send(self, reply: Reply) -> None:
        """
        Send C{reply}; close after L{MAX_ERRORS} 5xx replies.
        """
        if self._closing:
            return
        self.transport.write(reply.toBytes())
        if reply.code >= 500:
            self._errors += 1
            if self._errors >= MAX_ERRORS:
                self._close(Reply(421, f"4.7.0 {self.factory.hostname} Error: too many errors"))

    def _sendLines(self, code: int, lines: list[str]) -> None:
        out = [f"{code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{code} {lines[-1]}\r\n")
        self.transport.write("".join(out).encode("utf-8"))

    # -- input processing -----------------------------------------------

    def step(self) -> bool:
        """
        Handle the next command line, SASL response or piece of message
        data.
        """
        try:
            if self._mode is _Mode.DATA:
                return self._dataStep()
            return self._nextLine()
        except Exception:
            self.log.failure("Unexpected error in a submission session")
            self._close(Reply(421, f"4.3.0 {self.factory.hostname} Error: internal error"))
            return False

    def commandFailed(self, failure: Failure) -> None:
        self.log.failure("Unexpected error in a submission session", failure)
        if not self._disconnected:
            self._close(Reply(421, f"4.3.0 {self.factory.hostname} Error: internal error"))

    def lineLimit(self, head: bytes) -> int:
        if self._mode is _Mode.AUTH or head[:5].upper() == b"AUTH ":
            return MAX_AUTH_LINE
        return MAX_COMMAND_LINE

    def lineReceived(self, line: bytes) -> None:
        if self._mode is _Mode.AUTH:
            self._authResponse(line)
        else:
            self._commandLine(line)

    def lineTooLong(self) -> None:
        if self._mode is _Mode.AUTH:
            self._mode = _Mode.COMMAND
            self._auth = None
        self._send(LINE_TOO_LONG)

    def _commandLine(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._send(BAD_CHARACTERS)
            return
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            self._send(BAD_CHARACTERS)
            return
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if not verb.isascii() or verb not in _KNOWN_COMMANDS:
            self._send(UNKNOWN_COMMAND)
            return
        handler = _COMMAND_TABLES[self._state].get(verb)
        if handler is None:
            self._send(_WRONG_STATE[self._state].get(verb, BAD_SEQUENCE))
            return
        try:
            result = handler(self, argument.strip(" "))
        except SMTPRefusal as e:
            self._send(e.reply)
            return
        except Exception:
            self.log.failure("Unexpected error handling {verb}", verb=verb)
            self._send(INTERNAL_ERROR)
            return
        if isinstance(result, Deferred):
            self.hold(result)


    # -- session state ---------------------------------------------------

    def _resetTransaction(self) -> None:
        """
        Forget the sender and recipients (RSET, EHLO, end of data).
        """
        self._envelope = _Envelope()
        if self._state is _State.MAIL:
            self._state = _State.AUTHENTICATED

    def _endAuthentication(self) -> None:
        """
        Log out the avatar, if any, logging the session's counters.
        """
        if self._avatar is None:
            return
        logout, self._logout = self._logout, None
        self._avatar = None
        events.loggedOut(self.log, SERVICE, self._user, self.peer, messages=self._messages, bytes=self._bytes)
        if logout is not None:
            try:
                logout()
            except Exception:
                self.log.failure("Submission logout failed")

    @property
    def _account(self) -> ISubmissionAvatar:
        """
        The logged-in user's avatar, for the states after AUTH.
        """
        assert self._avatar is not None, "only asked for after AUTH"
        return self._avatar

    def _plaintextAllowed(self) -> bool:
        return bool(self.factory.plaintextAllowed(self.secure, self.peer))

    def _startTLSOffered(self) -> bool:
        return self.factory.tlsContextFactory is not None and not self.secure

    # -- commands --------------------------------------------------------

    def _heloName(self, argument: str, syntax: Reply) -> str:
        if not argument or len(argument) > MAX_HELO_NAME or not _HELO_NAME.match(argument):
            raise SMTPRefusal(syntax)
        return argument

    def _greeted(self, name: str, esmtp: bool) -> None:
        self._resetTransaction()
        self._helo = name
        self._esmtp = esmtp
        self._state = _State.AUTHENTICATED if self._avatar is not None else _State.GREETED

    def do_EHLO(self, argument: str) -> None:
        name = self._heloName(argument, EHLO_SYNTAX)
        self._greeted(name, esmtp=True)
        lines = [
            self.factory.hostname,
            "PIPELINING",
            f"SIZE {self.factory.maxMessageSize}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if self._startTLSOffered():
            lines.append("STARTTLS")
        if self._plaintextAllowed():
            lines.append("AUTH PLAIN LOGIN")
        self._sendLines(250, lines)

    def do_HELO(self, argument: str) -> None:
        name = self._heloName(argument, HELO_SYNTAX)
        self._greeted(name, esmtp=False)
        self._send(Reply(250, self.factory.hostname))

    def do_NOOP(self, argument: str) -> None:
        self._send(OK)

    def do_RSET(self, argument: str) -> None:
        if argument:
            raise SMTPRefusal(NO_ARGUMENTS)
        self._resetTransaction()
        self._send(OK)

    def do_QUIT(self, argument: str) -> None:
        self._close(BYE)

    def do_VRFY(self, argument: str) -> None:
        if not argument:
            raise SMTPRefusal(VRFY_SYNTAX)
        self._send(CANNOT_VRFY)

    def do_HELP(self, argument: str) -> None:
        self._send(HELP)

    def do_STARTTLS(self, argument: str) -> None:
        if argument:
            raise SMTPRefusal(NO_ARGUMENTS)
        if self.secure:
            raise SMTPRefusal(TLS_ACTIVE)
        if self.factory.tlsContextFactory is None:
            raise SMTPRefusal(NO_STARTTLS)
        self._send(READY_TLS)
        if not self.startTLS(self.factory.tlsContextFactory):
            return
        self._endAuthentication()
        self._resetTransaction()
        self._helo = None
        self._esmtp = False
        self._state = _State.FRESH


    def do_MAIL(self, argument: str) -> None:
        try:
            path, params = parsePath(argument, "FROM")
        except ValueError:
            raise SMTPRefusal(MAIL_SYNTAX) from None
        if params and not self._esmtp:
            raise SMTPRefusal(UNKNOWN_PARAMETER)
        for param in params:
            keyword, _, value = param.partition("=")
            keyword = keyword.upper()
            if keyword == "SIZE":
                if not (value.isascii() and value.isdigit()) or len(value) > 20:
                    raise SMTPRefusal(BAD_SIZE)
                if int(value) > self.factory.maxMessageSize:
                    raise SMTPRefusal(TOO_BIG)
            elif keyword == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    raise SMTPRefusal(BAD_BODY)
            elif keyword == "AUTH":
                # RFC 4954 section 5: accepted; this server does not relay
                # the value, so it is ignored.
                pass
            else:
                raise SMTPRefusal(UNKNOWN_PARAMETER)
        if path == "":
            raise SMTPRefusal(NULL_SENDER)
        try:
            sender = Address.parse(path)
        except AddressError:
            raise SMTPRefusal(BAD_SENDER_ADDRESS) from None
        if not self._account.mayUseSender(sender):
            raise SMTPRefusal(SENDER_NOT_OWNED)
        self._envelope = _Envelope(sender)
        self._state = _State.MAIL
        self._send(SENDER_OK)

    def do_RCPT(self, argument: str) -> Deferred:
        try:
            path, params = parsePath(argument, "TO")
        except ValueError:
            raise SMTPRefusal(RCPT_SYNTAX) from None
        if params:
            raise SMTPRefusal(UNKNOWN_PARAMETER)
        if path.lower() == POSTMASTER:
            # RFC 5321 4.5.1: <Postmaster> without a domain must be
            # accepted.  It is the postmaster of the user's own domain
            # (always a local one): delivered where that address's user or
            # alias says, else refused as an unknown user.
            address = Address(POSTMASTER, self._account.address.domain)
        else:
            try:
                address = Address.parse(path)
            except AddressError:
                raise SMTPRefusal(BAD_RECIPIENT_ADDRESS) from None
        if len(self._envelope.recipients) >= self.factory.maxRecipients:
            raise SMTPRefusal(TOO_MANY_RECIPIENTS)
        d = maybeDeferred(self._account.checkRecipient, address)
        d.addCallbacks(self._cbRecipient, self._ebRecipient)
        return d

    def _cbRecipient(self, users: tuple[Address, ...]) -> None:
        if self._state is not _State.MAIL:
            return
        recipients = self._envelope.recipients
        for address in users:
            if address not in recipients:
                recipients.append(address)
        self._send(RECIPIENT_OK)

    def _ebRecipient(self, failure: Failure) -> None:
        if failure.check(UnknownUser):
            self._send(USER_UNKNOWN)
        elif failure.check(TemporaryFailure):
            self._send(TEMPORARY_FAILURE)
        elif failure.check(PermanentFailure):
            self._send(RECIPIENT_REFUSED)
        else:
            self.log.failure("Checking a submission recipient failed", failure)
            self._send(INTERNAL_ERROR)


    # -- command tables --------------------------------------------------

    _common = {
        "EHLO": do_EHLO,
        "HELO": do_HELO,
        "NOOP": do_NOOP,
        "RSET": do_RSET,
        "QUIT": do_QUIT,
        "VRFY": do_VRFY,
        "HELP": do_HELP,
    }
    _tables: dict[_State, dict[str, Callable[..., Any]]] = {
        _State.FRESH: {**_common, "STARTTLS": do_STARTTLS},
        _State.GREETED: {**_common, "STARTTLS": do_STARTTLS, "AUTH": AuthCommands.do_AUTH},
        _State.AUTHENTICATED: {**_common, "MAIL": do_MAIL},
        _State.MAIL: {**_common, "RCPT": do_RCPT, "DATA": DataCommands.do_DATA},
    }
    del _common


_COMMAND_TABLES = SubmissionServer._tables
#: Every command some state accepts: any other verb is unknown (500 5.5.2)
#: rather than out of sequence.
_KNOWN_COMMANDS: frozenset[str] = frozenset().union(*_COMMAND_TABLES.values())
_WRONG_STATE = {
    _State.FRESH: {
        "AUTH": SEND_EHLO_FIRST,
        "MAIL": SEND_HELO_FIRST,
        "RCPT": SEND_HELO_FIRST,
        "DATA": SEND_HELO_FIRST,
    },
    _State.GREETED: {"MAIL": AUTH_REQUIRED, "RCPT": AUTH_REQUIRED, "DATA": AUTH_REQUIRED},
    _State.AUTHENTICATED: {
        "AUTH": ALREADY_AUTHENTICATED,
        "RCPT": NEED_MAIL,
        "DATA": NEED_MAIL,
    },
    _State.MAIL: {"AUTH": ALREADY_AUTHENTICATED, "MAIL": NESTED_MAIL},
}


# --- The factory --------------------------------------------------------------


if TYPE_CHECKING:
    _Factory = Factory[SubmissionServer]
else:
    # Subscripted for the type checker only: importing does not depend on
    # the installed Twisted's factories being generic.
    _Factory = Factory


@attr.s(auto_attribs=True, eq=False)
class SubmissionFactory(_Factory):
    """
    Builds L{SubmissionServer}s.

    @ivar portal: a C{twisted.cred.portal.Portal} whose realm returns
        L{ISubmissionAvatar}s for L{ClientCredentials} (user name and
        password as UTF-8 bytes, and the client's address).
    @ivar plaintextAllowed: C{plaintextAllowed(secure, peerHost) -> bool}:
        whether AUTH PLAIN/LOGIN may be used on a connection.
    @ivar clock: an C{IReactorTime} for the idle timeout and C{Date:}s.
    @ivar hostname: the server's name in the greeting, EHLO and headers.
    @ivar maxMessageSize: the SIZE limit in octets.
    @ivar tlsContextFactory: passed to C{transport.startTLS}; C{None} means
        STARTTLS is not offered.  For implicit TLS, wrap this factory in a
        C{twisted.protocols.tls.TLSMemoryBIOFactory}: the connection is then
        seen as secure from the start.
    @ivar maxRecipients: recipients per message.
    @ivar checkHeaderFrom: whether the C{From:}/C{Sender:} addresses must be
        owned by the user.
    @ivar idleTimeout: seconds of client silence before C{421} and close.
    """

    portal: Portal
    plaintextAllowed: Callable[[bool, str], bool]
    clock: IReactorTime
    hostname: str
    maxMessageSize: int = DEFAULT_MAX_MESSAGE_SIZE
    tlsContextFactory: object = None
    maxRecipients: int = DEFAULT_MAX_RECIPIENTS
    checkHeaderFrom: bool = True
    idleTimeout: float = DEFAULT_IDLE_TIMEOUT

    def buildProtocol(self, addr) -> SubmissionServer:
        """
        @return: a new L{SubmissionServer}.
        """
        return SubmissionServer(self)
