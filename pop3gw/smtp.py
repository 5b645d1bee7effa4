# -*- test-case-name: tests.test_smtp -*-
"""
The SMTP server core (L{SMTPServer}: dispatch over per-state command
tables, the commands every SMTP listener shares, DATA) and the message
submission server (RFC 6409) on it.  The MX listener is
L{pop3gw.smtpmx}, the same core with its own table and policy.

Implements RFC 5321 as profiled by RFC 6409, with the extensions AUTH PLAIN
and LOGIN (RFC 4954), STARTTLS (RFC 3207), SIZE (RFC 1870), PIPELINING
(RFC 2920), 8BITMIME (RFC 6152), ENHANCEDSTATUSCODES (RFC 2034, RFC 3463
codes), CHUNKING (RFC 3030, BDAT; BINARYMIME is not offered) and SMTPUTF8
(RFC 6531: a non-ASCII path, in MAIL or RCPT, needs the SMTPUTF8 parameter
on MAIL, else C{553 5.6.7}; UTF-8 header fields are stored as they are).
DSN is not offered.

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
from abc import abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Optional

import attr
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3gw import events
from pop3gw.address import Address, AddressError, parseReversePath
from pop3gw.interfaces import (
    ISubmissionAvatar,
    PermanentFailure,
    SendingLimited,
    TemporaryFailure,
    UnknownUser,
)
from pop3gw.lineproto import LineProtocol
from pop3gw.smtpauth import AuthCommands
from pop3gw.smtpdata import DataCommands, SubmissionData, _MessageReader, formatDate
from pop3gw.smtpreplies import (
    ALREADY_AUTHENTICATED,
    AUTH_REQUIRED,
    BAD_BODY,
    BAD_CHARACTERS,
    BAD_RECIPIENT_ADDRESS,
    BAD_SENDER_ADDRESS,
    BAD_SEQUENCE,
    BAD_SIZE,
    BAD_SMTPUTF8,
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
    MAX_JUNK_COMMANDS,
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
    SENDING_LIMITED,
    SERVICE,
    TEMPORARY_FAILURE,
    TLS_ACTIVE,
    TOO_BIG,
    TOO_MANY_RECIPIENTS,
    UNKNOWN_COMMAND,
    UNKNOWN_PARAMETER,
    USER_UNKNOWN,
    UTF8_REQUIRED,
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
    "SMTPServer",
    "SubmissionFactory",
    "SubmissionServer",
    "commandTables",
    "formatDate",
    "parsePath",
]


# --- Helpers ------------------------------------------------------------------

_PATH = re.compile(r"^(?P<kind>FROM|TO): *<(?P<path>[^<>]*)>(?: +(?P<params>.*))?$", re.IGNORECASE)
_HELO_NAME = re.compile(r"^[\x21-\x7e]+$")
#: A control character (refused in a command line).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


class SMTPServer(DataCommands, LineProtocol):
    """
    What every SMTP listener shares: the greeting, the command dispatch
    over per-state tables, EHLO/HELO, NOOP, RSET, QUIT, VRFY, HELP,
    STARTTLS, the syntax of MAIL and RCPT, and (through
    L{pop3gw.smtpdata.DataCommands}) DATA.  A server is a subclass that
    gives its command tables (C{_tables}, C{_knownCommands},
    C{_wrongState}: see L{commandTables}) and its policy: L{_extensions},
    L{_readyState}, L{_checkSender}, L{_recipientAddress},
    L{_checkRecipient}, L{_refusedRecipient} and the data hooks of
    L{pop3gw.smtpdata.DataCommands}.

    @cvar service: the name in log lines.
    """

    log = Logger()
    service = SERVICE

    maxPendingInput = MAX_PENDING_INPUT
    closeTimeout = CLOSE_TIMEOUT
    bareLFCountsAsCRLF = True
    tooLongAtOnce = False

    _tables: dict[_State, dict[str, Callable[..., Any]]] = {}
    _knownCommands: frozenset[str] = frozenset()
    _wrongState: dict[_State, dict[str, Reply]] = {}

    def __init__(self, factory: Any) -> None:
        super().__init__()
        self.factory = factory
        self._state = _State.FRESH
        self._mode = _Mode.COMMAND
        self._helo: Optional[str] = None
        self._esmtp = False
        self._envelope = _Envelope()
        self._reader: Optional[_MessageReader] = None
        self._errors = 0
        self._messages = 0
        self._bytes = 0
        self._junk = 0
        self._junkSince = 0

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
        key = ("220", self.factory.hostname, self.greetingProtocol)
        greeting = self._madeReplies.get(key)
        if greeting is None:
            greeting = self._madeReplies[key] = Reply(220, f"{self.factory.hostname} {self.greetingProtocol} ready").toBytes()
        if not self._closing:
            self.sendReply(greeting)

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        """
        Abort any open delivery and end the session.
        """
        self._closing = True
        self.endSession()

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
        self.sendReply(reply.toBytes())
        if reply.code >= 500:
            self._errors += 1
            if self._errors >= MAX_ERRORS:
                self._close(Reply(421, f"4.7.0 {self.factory.hostname} Error: too many errors"))

    def _junkCommand(self, reply: Reply) -> None:
        """
        Send C{reply} to a command that moves no mail (NOOP, RSET, VRFY,
        HELP).  Past L{MAX_JUNK_COMMANDS} of them since the last accepted
        message, each counts as an error towards L{MAX_ERRORS}.
        """
        self._send(reply)
        if self._junkSince != self._messages:
            self._junkSince = self._messages
            self._junk = 0
        self._junk += 1
        if self._junk > MAX_JUNK_COMMANDS and reply.code < 500 and not self._closing:
            self._errors += 1
            if self._errors >= MAX_ERRORS:
                self._close(Reply(421, f"4.7.0 {self.factory.hostname} Error: too many errors"))

    def _sendLines(self, code: int, lines: list[str]) -> None:
        self.sendReply(self._linesToBytes(code, lines))

    @staticmethod
    def _linesToBytes(code: int, lines: list[str]) -> bytes:
        """
        @return: the multiline reply of C{lines} with C{code}, as sent.
        """
        out = [f"{code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{code} {lines[-1]}\r\n")
        return "".join(out).encode("utf-8")

    @property
    def _madeReplies(self) -> dict[tuple, bytes]:
        """
        The greeting and EHLO replies made so far by the servers of this
        server's factory, keyed by what they are made of (host name, SIZE,
        extensions offered), so that each is made once, not once per
        connection.
        """
        made = getattr(self.factory, "_smtpMadeReplies", None)
        if made is None:
            made = self.factory._smtpMadeReplies = {}
        return made

    # -- input processing -----------------------------------------------

    def step(self) -> bool:
        """
        Handle the next command line or piece of message data.
        """
        try:
            if self._mode is _Mode.DATA:
                return self._dataStep()
            if self._mode is _Mode.CHUNK:
                return self._chunkStep()
            return self._nextLine()
        except Exception:
            self.log.failure("Unexpected error in an SMTP session ({service})", service=self.service)
            self._close(Reply(421, f"4.3.0 {self.factory.hostname} Error: internal error"))
            return False

    def commandFailed(self, failure: Failure) -> None:
        self.log.failure("Unexpected error in an SMTP session ({service})", failure, service=self.service)
        if not self._disconnected:
            self._close(Reply(421, f"4.3.0 {self.factory.hostname} Error: internal error"))

    def lineLimit(self, head: bytes) -> int:
        return MAX_COMMAND_LINE

    def lineReceived(self, line: bytes) -> None:
        self._commandLine(line)

    def lineTooLong(self) -> None:
        self._send(LINE_TOO_LONG)

    def _commandLine(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._send(BAD_CHARACTERS)
            return
        if _CONTROL.search(text) is not None:
            self._send(BAD_CHARACTERS)
            return
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if not verb.isascii() or verb not in self._knownCommands:
            self._send(UNKNOWN_COMMAND)
            return
        handler = self._tables[self._state].get(verb)
        if handler is None:
            reply = self._wrongState[self._state].get(verb, BAD_SEQUENCE)
            if verb == "BDAT":
                # Its chunk follows whatever the reply: read it first.
                self.refuseChunk(argument.strip(" "), reply)
                return
            self._send(reply)
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
        Forget the sender and recipients (RSET, EHLO, end of data), and
        the message of BDAT chunks read so far.
        """
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.abort()
        self._envelope = _Envelope()
        if self._state is _State.MAIL:
            self._state = _State.AUTHENTICATED

    def _startTLSOffered(self) -> bool:
        return self.factory.tlsContextFactory is not None and not self.secure

    # -- policy ----------------------------------------------------------

    def _extensions(self) -> list[str]:
        """
        The EHLO keywords after the common ones (PIPELINING, SIZE,
        8BITMIME, ENHANCEDSTATUSCODES), STARTTLS included when offered.
        """
        return ["STARTTLS"] if self._startTLSOffered() else []

    @abstractmethod
    def _readyState(self) -> _State:
        """
        The state after HELO/EHLO.
        """

    @abstractmethod
    def _checkSender(self, path: str) -> Optional[Address]:
        """
        The envelope sender for the reverse path C{path}.

        @raise SMTPRefusal: the sender is refused.
        """

    @abstractmethod
    def _recipientAddress(self, path: str) -> Address:
        """
        The recipient for the forward path C{path}.

        @raise SMTPRefusal: the path is refused.
        """

    @abstractmethod
    def _checkRecipient(self, address: Address) -> Any:
        """
        Check C{address} against the server's policy.

        @return: the users mail for it goes to (a non-empty tuple of
            L{Address}: a distribution list is several), or a C{Deferred}
            firing with them.
        """

    def _refusedRecipient(self, address: Optional[Address], path: str, reply: Reply, reason: str) -> Reply:
        """
        A recipient was refused with C{reply} for C{reason} (fixed words):
        log it if the server does.

        @return: the reply to send.
        """
        return reply

    # -- commands --------------------------------------------------------

    def _heloName(self, argument: str, syntax: Reply) -> str:
        if not argument or len(argument) > MAX_HELO_NAME or not _HELO_NAME.match(argument):
            raise SMTPRefusal(syntax)
        return argument

    def _greeted(self, name: str, esmtp: bool) -> None:
        self._resetTransaction()
        self._helo = name
        self._esmtp = esmtp
        self._state = self._readyState()

    def do_EHLO(self, argument: str) -> None:
        name = self._heloName(argument, EHLO_SYNTAX)
        self._greeted(name, esmtp=True)
        extensions = self._extensions()
        key = ("250", self.factory.hostname, self.factory.maxMessageSize, *extensions)
        reply = self._madeReplies.get(key)
        if reply is None:
            lines = [
                self.factory.hostname,
                "PIPELINING",
                f"SIZE {self.factory.maxMessageSize}",
                "8BITMIME",
                "ENHANCEDSTATUSCODES",
                "CHUNKING",
                "SMTPUTF8",
            ]
            lines.extend(extensions)
            reply = self._madeReplies[key] = self._linesToBytes(250, lines)
        self.sendReply(reply)

    def do_HELO(self, argument: str) -> None:
        name = self._heloName(argument, HELO_SYNTAX)
        self._greeted(name, esmtp=False)
        self._send(Reply(250, self.factory.hostname))

    def do_NOOP(self, argument: str) -> None:
        self._junkCommand(OK)

    def do_RSET(self, argument: str) -> None:
        if argument:
            raise SMTPRefusal(NO_ARGUMENTS)
        self._resetTransaction()
        self._junkCommand(OK)

    def do_QUIT(self, argument: str) -> None:
        self._close(BYE)

    def do_VRFY(self, argument: str) -> None:
        if not argument:
            raise SMTPRefusal(VRFY_SYNTAX)
        self._junkCommand(CANNOT_VRFY)

    def do_HELP(self, argument: str) -> None:
        self._junkCommand(self.helpReply)

    helpReply = HELP

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
        self._tlsStarted()
        self._resetTransaction()
        self._helo = None
        self._esmtp = False
        self._state = _State.FRESH

    def _tlsStarted(self) -> None:
        """
        TLS has started: forget what the plaintext session established
        (RFC 3207 4.2), beyond the transaction and the HELO name.
        """

    def do_MAIL(self, argument: str) -> None:
        try:
            path, params = parsePath(argument, "FROM")
        except ValueError:
            raise SMTPRefusal(MAIL_SYNTAX) from None
        if params and not self._esmtp:
            raise SMTPRefusal(UNKNOWN_PARAMETER)
        smtputf8 = False
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
            elif keyword == "SMTPUTF8":
                if value or "=" in param:
                    raise SMTPRefusal(BAD_SMTPUTF8)
                smtputf8 = True
            else:
                raise SMTPRefusal(UNKNOWN_PARAMETER)
        if not smtputf8 and not path.isascii():
            raise SMTPRefusal(UTF8_REQUIRED)
        sender = self._checkSender(path)
        self._envelope = _Envelope(sender, smtputf8=smtputf8)
        self._state = _State.MAIL
        self._send(SENDER_OK)

    def do_RCPT(self, argument: str) -> Deferred:
        try:
            path, params = parsePath(argument, "TO")
        except ValueError:
            raise SMTPRefusal(RCPT_SYNTAX) from None
        if params:
            raise SMTPRefusal(UNKNOWN_PARAMETER)
        if self._reader is not None:
            # BDAT chunks were sent: the recipients are settled.
            raise SMTPRefusal(BAD_SEQUENCE)
        if not path.isascii() and not self._envelope.smtputf8:
            raise SMTPRefusal(self._refusedRecipient(None, path, UTF8_REQUIRED, "non-ASCII without SMTPUTF8"))
        address = self._recipientAddress(path)
        if self._envelope.accepted >= self.factory.maxRecipients:
            raise SMTPRefusal(TOO_MANY_RECIPIENTS)
        d = maybeDeferred(self._checkRecipient, address)
        d.addCallbacks(self._cbRecipient, self._ebRecipient, errbackArgs=(address, path))
        return d

    def _cbRecipient(self, users: tuple[Address, ...]) -> None:
        if self._state is not _State.MAIL:
            return
        self._envelope.accepted += 1
        recipients = self._envelope.recipients
        for address in users:
            if address not in recipients:
                recipients.append(address)
        self._send(RECIPIENT_OK)

    def _ebRecipient(self, failure: Failure, address: Address, path: str) -> None:
        if failure.check(UnknownUser):
            self._send(self._refusedRecipient(address, path, USER_UNKNOWN, "unknown user"))
        elif failure.check(SendingLimited):
            self._send(SENDING_LIMITED)
        elif failure.check(TemporaryFailure):
            self._send(TEMPORARY_FAILURE)
        elif failure.check(PermanentFailure):
            self._send(self._refusedRecipient(address, path, self.recipientRefused, "relay denied"))
        else:
            self.log.failure("Checking a recipient failed ({service})", failure, service=self.service)
            self._send(INTERNAL_ERROR)

    recipientRefused = RECIPIENT_REFUSED

    #: The protocol the greeting names (RFC 5321 4.2: C{220 host ESMTP}).
    greetingProtocol = "ESMTP"


def commandTables(
    tables: dict[_State, dict[str, Callable[..., Any]]], wrongState: dict[_State, dict[str, Reply]]
) -> tuple[dict[_State, dict[str, Callable[..., Any]]], frozenset[str], dict[_State, dict[str, Reply]]]:
    """
    The class attributes of an L{SMTPServer} subclass's dispatch
    (C{_tables, _knownCommands, _wrongState = commandTables(...)}): its
    per-state C{tables}, every command some state accepts (any other verb
    is unknown, C{500 5.5.2}, rather than out of sequence) and the replies
    to a known command in the wrong state (C{503 5.5.1} by default).
    """
    known: frozenset[str] = frozenset().union(*tables.values())
    return tables, known, {state: wrongState.get(state, {}) for state in tables}


_COMMON_COMMANDS: dict[str, Callable[..., Any]] = {
    "EHLO": SMTPServer.do_EHLO,
    "HELO": SMTPServer.do_HELO,
    "NOOP": SMTPServer.do_NOOP,
    "RSET": SMTPServer.do_RSET,
    "QUIT": SMTPServer.do_QUIT,
    "VRFY": SMTPServer.do_VRFY,
    "HELP": SMTPServer.do_HELP,
}


class SubmissionServer(AuthCommands, SubmissionData, SMTPServer):
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

    def __init__(self, factory: "SubmissionFactory") -> None:
        super().__init__(factory)
        self._avatar: Optional[ISubmissionAvatar] = None
        self._logout: Optional[Callable[[], None]] = None
        self._user = ""
        self._auth: Optional[tuple] = None
        self._authFailures = 0

    def connectionMade(self) -> None:
        """
        Greet the client; start the idle timer and the login deadline.
        """
        super().connectionMade()
        self.startLoginDeadline(self.factory.loginTimeout)

    def loginTimedOut(self) -> None:
        """
        Not logged in within L{SubmissionFactory.loginTimeout} seconds of
        connecting: C{421} and close (no reply while a command is being
        answered: it would come out of order).
        """
        if self.commandInFlight:
            self.closeConnection()
            return
        self._close(Reply(421, f"4.4.2 {self.factory.hostname} Error: login time exceeded"))

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        """
        Abort any open delivery, log out, log the session's counters.
        """
        super().connectionLost(reason)
        self._endAuthentication()

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

    # -- policy ----------------------------------------------------------

    def _extensions(self) -> list[str]:
        lines = super()._extensions()
        if self._plaintextAllowed():
            lines.append("AUTH PLAIN LOGIN")
        return lines

    def _readyState(self) -> _State:
        return _State.AUTHENTICATED if self._avatar is not None else _State.GREETED

    def _tlsStarted(self) -> None:
        self._endAuthentication()

    def _checkSender(self, path: str) -> Optional[Address]:
        if path == "":
            raise SMTPRefusal(NULL_SENDER)
        try:
            # A literal (RFC 5321 4.1.3) is well-formed, and never owned.
            sender = parseReversePath(path)
        except AddressError:
            raise SMTPRefusal(BAD_SENDER_ADDRESS) from None
        if not self._account.mayUseSender(sender):
            raise SMTPRefusal(SENDER_NOT_OWNED)
        return sender

    def _recipientAddress(self, path: str) -> Address:
        if path.lower() == POSTMASTER:
            # RFC 5321 4.5.1: <Postmaster> without a domain must be
            # accepted.  It is the postmaster of the user's own domain
            # (always a local one): delivered where that address's user or
            # alias says, else refused as an unknown user.
            return Address(POSTMASTER, self._account.address.domain)
        try:
            return Address.parse(path)
        except AddressError:
            raise SMTPRefusal(BAD_RECIPIENT_ADDRESS) from None

    def _checkRecipient(self, address: Address) -> Any:
        return self._account.checkRecipient(address, self._envelope.accepted)

    # -- command tables --------------------------------------------------

    _tables, _knownCommands, _wrongState = commandTables(
            {
                _State.FRESH: {**_COMMON_COMMANDS, "STARTTLS": SMTPServer.do_STARTTLS},
                _State.GREETED: {**_COMMON_COMMANDS, "STARTTLS": SMTPServer.do_STARTTLS, "AUTH": AuthCommands.do_AUTH},
                _State.AUTHENTICATED: {**_COMMON_COMMANDS, "MAIL": SMTPServer.do_MAIL},
                _State.MAIL: {
                    **_COMMON_COMMANDS,
                    "RCPT": SMTPServer.do_RCPT,
                    "DATA": DataCommands.do_DATA,
                    "BDAT": DataCommands.do_BDAT,
                },
            },
            {
                _State.FRESH: {
                    "AUTH": SEND_EHLO_FIRST,
                    "MAIL": SEND_HELO_FIRST,
                    "RCPT": SEND_HELO_FIRST,
                    "DATA": SEND_HELO_FIRST,
                    "BDAT": SEND_HELO_FIRST,
                },
                _State.GREETED: {
                    "MAIL": AUTH_REQUIRED,
                    "RCPT": AUTH_REQUIRED,
                    "DATA": AUTH_REQUIRED,
                    "BDAT": AUTH_REQUIRED,
                },
                _State.AUTHENTICATED: {
                    "AUTH": ALREADY_AUTHENTICATED,
                    "RCPT": NEED_MAIL,
                    "DATA": NEED_MAIL,
                    "BDAT": NEED_MAIL,
                },
                _State.MAIL: {"AUTH": ALREADY_AUTHENTICATED, "MAIL": NESTED_MAIL},
            },
    )


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
    @ivar loginTimeout: seconds from connecting until a client that has not
        logged in gets C{421} and is closed, whatever it sends meanwhile;
        C{None} for no limit.
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
    loginTimeout: Optional[float] = None

    def buildProtocol(self, addr) -> SubmissionServer:
        """
        @return: a new L{SubmissionServer}.
        """
        return SubmissionServer(self)
