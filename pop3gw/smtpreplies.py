# -*- test-case-name: tests.test_smtp -*-
"""
What a submission session says and accepts: its limits, its fixed replies
(none ever holds text from an exception), the refusal that carries one, and
the session's states and envelope.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Callable, Optional

import attr

from pop3gw.address import Address
from pop3gw.interfaces import InsufficientStorage, TemporaryFailure
from pop3gw.sasl import LoginOutcome

# --- Limits -------------------------------------------------------------------

#: Longest command line in octets, CRLF included (RFC 5321 4.5.3.1.4).
MAX_COMMAND_LINE = 512
#: Longest AUTH command or AUTH response line, CRLF included (RFC 4954 4).
MAX_AUTH_LINE = 12288
#: Longest line of message data in octets, line end excluded (RFC 5321
#: 4.5.3.1.6: 1000 octets with CRLF).
MAX_DATA_LINE = 998
#: Largest header section held in memory while the message streams.
MAX_HEADER_SECTION = 256 * 1024
#: Input held while a reply is pending or the client does not read its
#: replies before reading pauses.
MAX_PENDING_INPUT = 1024 * 1024
#: Seconds a closed connection may take to send its last reply before it is
#: aborted (a client that does not read would otherwise keep it for ever).
CLOSE_TIMEOUT = 10.0
#: Message data gathered before it is written to the delivery.
WRITE_CHUNK = 64 * 1024
#: 5xx replies after which the session is closed.
MAX_ERRORS = 20
#: Commands that move no mail (NOOP, RSET, VRFY, HELP) allowed since the
#: last accepted message; each one beyond counts as an error (as Postfix's
#: C{smtpd_junk_command_limit}), so a client cannot hold a connection for
#: ever by keeping the idle timer busy.
MAX_JUNK_COMMANDS = 100
#: Failed AUTH attempts after which the session is closed.
MAX_AUTH_FAILURES = 3
#: Longest accepted EHLO/HELO argument.
MAX_HELO_NAME = 255
#: Most digits in a BDAT chunk size (RFC 3030: 1*DIGIT; more than this is
#: not a size any client means, and the framing is taken as lost).
MAX_CHUNK_DIGITS = 18

DEFAULT_MAX_RECIPIENTS = 100
DEFAULT_IDLE_TIMEOUT = 300.0

SERVICE = "submission"

#: The local part of the unqualified C{RCPT TO:<Postmaster>} (RFC 5321
#: 4.5.1), compared without regard to case.
POSTMASTER = "postmaster"


# --- Replies ------------------------------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Reply:
    """
    One single-line SMTP reply.

    @ivar code: the three-digit reply code.
    @ivar text: the enhanced status code and fixed text.
    """

    code: int
    text: str
    # The reply as sent, made once: most replies are module constants sent
    # over and over.
    _wire: bytes = attr.ib(init=False, repr=False, eq=False)

    @_wire.default
    def _encode(self) -> bytes:
        return f"{self.code} {self.text}\r\n".encode("utf-8")

    def toBytes(self) -> bytes:
        """
        @return: the reply as sent, CRLF included.
        """
        return self._wire


OK = Reply(250, "2.0.0 OK")
SENDER_OK = Reply(250, "2.1.0 OK")
RECIPIENT_OK = Reply(250, "2.1.5 OK")
BYE = Reply(221, "2.0.0 Bye")
HELP = Reply(214, "2.0.0 Submission server, see RFC 6409")
CANNOT_VRFY = Reply(252, "2.5.2 Cannot VRFY user, but will accept message and attempt delivery")
START_DATA = Reply(354, "End data with <CR><LF>.<CR><LF>")
READY_TLS = Reply(220, "2.0.0 Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0 Authentication successful")
AUTH_CONTINUE = Reply(334, "")
AUTH_USERNAME = Reply(334, "VXNlcm5hbWU6")
AUTH_PASSWORD = Reply(334, "UGFzc3dvcmQ6")

UNKNOWN_COMMAND = Reply(500, "5.5.2 Error: command not recognized")
BAD_CHARACTERS = Reply(500, "5.5.2 Error: bad character in command")
LINE_TOO_LONG = Reply(500, "5.5.6 Line too long")
BAD_SEQUENCE = Reply(503, "5.5.1 Error: bad sequence of commands")
SEND_HELO_FIRST = Reply(503, "5.5.1 Error: send HELO/EHLO first")
SEND_EHLO_FIRST = Reply(503, "5.5.1 Error: send EHLO first")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1 Error: already authenticated")
NESTED_MAIL = Reply(503, "5.5.1 Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1 Error: need MAIL command")
NO_STARTTLS = Reply(503, "5.5.1 Error: STARTTLS not offered")
TLS_ACTIVE = Reply(454, "4.7.0 TLS already active")
AUTH_REQUIRED = Reply(530, "5.7.0 Authentication required")

EHLO_SYNTAX = Reply(501, "5.5.4 Syntax: EHLO hostname")
HELO_SYNTAX = Reply(501, "5.5.4 Syntax: HELO hostname")
NO_ARGUMENTS = Reply(501, "5.5.4 Syntax error: no arguments allowed")
VRFY_SYNTAX = Reply(501, "5.5.4 Syntax: VRFY address")

AUTH_SYNTAX = Reply(501, "5.5.4 Syntax: AUTH mechanism [initial-response]")
AUTH_MECHANISM = Reply(504, "5.5.4 Unrecognized authentication type")
AUTH_ENCRYPTION_REQUIRED = Reply(538, "5.7.11 Encryption required for requested authentication mechanism")
AUTH_CANCELLED = Reply(501, "5.0.0 Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2 Invalid base64 data")
AUTH_MALFORMED = Reply(501, "5.5.2 Invalid authentication response")
AUTH_FAILED = Reply(535, "5.7.8 Authentication credentials invalid")
AUTH_TEMPORARY = Reply(454, "4.7.0 Temporary authentication failure")


#: The reply to a login that did not succeed, per L{LoginOutcome}.
LOGIN_REPLIES = {
    LoginOutcome.FAILED: AUTH_FAILED,
    LoginOutcome.BUSY: AUTH_TEMPORARY,
    LoginOutcome.UNAVAILABLE: AUTH_TEMPORARY,
    LoginOutcome.FAULT: AUTH_TEMPORARY,
}

MAIL_SYNTAX = Reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4 Syntax: RCPT TO:<address>")
BAD_SENDER_ADDRESS = Reply(553, "5.1.7 Bad sender address syntax")
BAD_RECIPIENT_ADDRESS = Reply(501, "5.1.3 Bad recipient address syntax")
NULL_SENDER = Reply(550, "5.7.1 Null sender not allowed on submission")
SENDER_NOT_OWNED = Reply(553, "5.7.1 Sender address not owned by user")
BAD_SIZE = Reply(501, "5.5.4 Bad SIZE parameter")
BAD_BODY = Reply(501, "5.5.4 Unsupported BODY type")
UNKNOWN_PARAMETER = Reply(555, "5.5.4 Unsupported parameter")
BAD_SMTPUTF8 = Reply(501, "5.5.4 SMTPUTF8 takes no value")
#: RFC 6531 3.4: a non-ASCII path needs the SMTPUTF8 parameter on MAIL.
UTF8_REQUIRED = Reply(553, "5.6.7 Non-ASCII address requires SMTPUTF8")
USER_UNKNOWN = Reply(550, "5.1.1 Recipient address rejected: user unknown")
RECIPIENT_REFUSED = Reply(550, "5.7.1 Recipient address rejected")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3 Too many recipients")
NO_RECIPIENTS = Reply(554, "5.5.1 No valid recipients")
NEED_RCPT = Reply(503, "5.5.1 Error: need RCPT command")
BDAT_SYNTAX = Reply(501, "5.5.4 Syntax: BDAT chunk-size [LAST]")
DATA_AFTER_BDAT = Reply(503, "5.5.1 Error: DATA not allowed after BDAT")

TOO_BIG = Reply(552, "5.3.4 Message size exceeds fixed maximum message size")
HEADER_TOO_BIG = Reply(552, "5.3.4 Message header section too large")
BARE_CR = Reply(550, "5.6.11 Bare CR not allowed")
DATA_LINE_TOO_LONG = Reply(550, "5.6.0 Message line longer than 998 octets")
NUL_IN_DATA = Reply(550, "5.6.0 NUL character not allowed")
HEADER_FROM_NOT_OWNED = Reply(553, "5.7.1 Sender address in the message header not owned by user")

TEMPORARY_FAILURE = Reply(451, "4.3.0 Temporary failure, try again later")
SENDING_LIMITED = Reply(451, "4.7.1 Sending limit reached; ask your administrator")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1 Insufficient system storage")
INTERNAL_ERROR = Reply(451, "4.3.0 Internal error")


def temporaryReply(error: TemporaryFailure) -> Reply:
    """
    The reply to a L{TemporaryFailure}: C{452 4.3.1} (RFC 5321 4.2.2, RFC
    3463 "mail system full") when it is L{InsufficientStorage}, else
    C{451 4.3.0}.
    """
    return INSUFFICIENT_STORAGE if isinstance(error, InsufficientStorage) else TEMPORARY_FAILURE


class SMTPRefusal(Exception):
    """
    A command is refused with a fixed reply.

    @ivar reply: the L{Reply} to send.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.code)
        self.reply = reply


# --- Session state ----------------------------------------------------------


@attr.s(slots=True, auto_attribs=True)
class _Envelope:
    """
    One mail transaction: made at MAIL, replaced whole by a new one at RSET,
    HELO/EHLO, STARTTLS and the end of the data.

    @ivar sender: the envelope sender (C{None} before MAIL).
    @ivar recipients: the users the accepted recipients resolved to,
        without duplicates (a distribution list is several).
    @ivar accepted: the RCPT commands accepted, which the recipient cap
        counts.
    @ivar messageId: the message's id, once DATA has begun its delivery.
    @ivar smtputf8: whether MAIL had the SMTPUTF8 parameter (RFC 6531):
        UTF-8 addresses are then allowed, and the message is queued as
        needing SMTPUTF8.
    """

    sender: Optional[Address] = None
    recipients: list[Address] = attr.Factory(list)
    accepted: int = 0
    messageId: str = ""
    smtputf8: bool = False


class _State(enum.Enum):
    """
    Command states of a submission session.
    """

    FRESH = "fresh"  # before HELO/EHLO
    GREETED = "greeted"  # after HELO/EHLO, not authenticated
    AUTHENTICATED = "authenticated"  # no transaction
    MAIL = "mail"  # after MAIL FROM


class _Mode(enum.Enum):
    """
    What the next input line is.
    """

    COMMAND = "command"
    AUTH = "auth"  # a SASL response line
    DATA = "data"  # message data
    CHUNK = "chunk"  # the octets of a BDAT chunk


if TYPE_CHECKING:
    from pop3gw.interfaces import ISubmissionAvatar
    from pop3gw.lineproto import LineProtocol
    from pop3gw.smtpdata import _MessageReader

    class SMTPHost(LineProtocol):
        """
        For the type checker only: what an SMTP server
        (L{pop3gw.smtp.SMTPServer}) provides to the handler mixins
        (L{pop3gw.smtpauth.AuthCommands}, L{pop3gw.smtpdata.DataCommands}),
        which at run time derive from C{object}.
        """

        _state: _State
        _mode: _Mode
        _helo: Optional[str]
        _esmtp: bool
        _avatar: Optional[ISubmissionAvatar]
        _logout: Optional[Callable[[], None]]
        _user: str
        _envelope: _Envelope
        _reader: Optional[_MessageReader]
        _auth: Optional[tuple]
        _authFailures: int
        _errors: int
        _messages: int
        _bytes: int

        def _send(self, reply: Reply) -> None: ...
        def _close(self, reply: Reply) -> None: ...
        def _resetTransaction(self) -> None: ...
        def _plaintextAllowed(self) -> bool: ...
