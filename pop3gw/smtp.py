# -*- test-case-name: tests.test_smtp -*-
"""
The SMTP message submission server (RFC 6409).

Implements RFC 5321 as profiled by RFC 6409, with the extensions AUTH PLAIN
and LOGIN (RFC 4954), STARTTLS (RFC 3207), SIZE (RFC 1870), PIPELINING
(RFC 2920), 8BITMIME (RFC 6152) and ENHANCEDSTATUSCODES (RFC 2034, RFC 3463
codes).  CHUNKING/BDAT, DSN and SMTPUTF8 are not offered.

The protocol does its own line parsing over
L{twisted.internet.protocol.Protocol}; it sees only L{pop3gw.interfaces},
L{pop3gw.address}, L{pop3gw.events} and a L{twisted.cred.portal.Portal}
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
seconds.  Only data holding a line end resets the idle timer.

Message data
============

The parsing of the data after C{354} is the defence against SMTP smuggling
(CVE-2023-51764 and its family), so its rules are exact:

  - The end of the data is only C{CRLF . CRLF}: a line holding just C{"."},
    ended by CRLF, whose previous line also ended with CRLF (or which is
    the first line after the 354 reply).
  - A bare LF (an LF without a CR before it) ends a line, and the line is
    stored with CRLF (Postfix's C{smtpd_forbid_bare_newline = normalize}).
    A C{"."} line ended by a bare LF, or following a line ended by a bare
    LF, is not the end of the data: it is content, stored as the line
    C{"."} (a POP3 server or relay dot-stuffs it again when sending it).
  - A bare CR (a CR not followed by LF) anywhere in the data makes the
    message refused at the end of the data with C{550 5.6.11}; nothing is
    stored.  A NUL octet is refused the same way with C{550 5.6.0}.
  - Dot-unstuffing follows RFC 5321 4.5.2 for every line, whatever its
    line end: if a line starts with C{"."} and has other characters, the
    first C{"."} is removed.  A lone C{"."} line that is content (see above)
    is kept as C{"."}.
  - A line longer than L{MAX_DATA_LINE} octets (998, not counting its line
    end nor a leading C{"."} added for transparency: RFC 5321 4.5.3.1.6 and
    RFC 5322 2.1.1) is never cut or folded: the message is refused at the
    end of the data with C{550 5.6.0}.
  - The message is streamed into the L{IDelivery} as it arrives, except the
    header section, which is held (at most L{MAX_HEADER_SECTION} octets;
    more is refused with C{552 5.3.4}) so that the C{From:}, C{Sender:},
    C{Resent-From:} and C{Resent-Sender:} addresses can be checked and
    C{Message-ID:}, C{Date:} and C{From:} added when missing (RFC 6409
    section 8; an added C{From:} holds the authenticated user's address,
    which the ownership rules always allow).  Octets are counted as they stream; over
    the size limit the delivery is aborted and the rest of the data is read
    and dropped before C{552 5.3.4} is sent.
  - Line ends are processed exactly across TCP segment boundaries: a CR at
    the end of one segment and an LF at the start of the next is a CRLF.

Message ids
===========

Each message has one id from acceptance to delivery.  When the delivery
names the outbound queue entry its remote part becomes (a C{queueId}
attribute, see L{pop3gw.router}), that id is used; otherwise (purely local
mail) a random one is made.  The id is named in the C{Received:} field
(written as the first data of the delivery, once the delivery and so its
queue id exist), in the C{250 2.0.0 OK queued as <id>} reply, and in the
log line each accepted message gets::

    submission: accepted id=<id> user="..." from="<envelope sender>" local=<n> remote=<n> size=<octets> queue=<queue id or ->

C{pop3gw queue list}, the relay's log lines and bounces use the same id.

Replies to commands after the final C{"."} wait until the delivery's commit
fires; C{250} is sent only then.  A client that disconnects while the
commit is in flight does not abort it: the message is kept and delivered
although the client saw no C{250}, so a client that sends it again makes a
duplicate.  This is the unavoidable window RFC 1047 describes (it is kept
short by replying as soon as the commit fires); losing the message instead
would be worse.

A message the store cannot keep for lack of space (L{InsufficientStorage}:
C{ENOSPC}, C{EDQUOT}), whether at DATA, while the data streams in or at the
commit, gets C{452 4.3.1 Insufficient system storage}; other temporary
failures get C{451 4.3.0}.  Every message refused after its envelope has
one log line, which names a server-side cause in words::

    submission: refused message user="..." from="..." reply="452 4.3.1 Insufficient system storage" error="cannot write message: No space left on device"
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import enum
import ipaddress
import re
import secrets
import time
from typing import Callable, Optional

import attr
from twisted.cred.error import LoginFailed
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3gw import events
from pop3gw.address import Address, AddressError, describePeer
from pop3gw.credentials import ClientCredentials
from pop3gw.flow import OutputFlow
from pop3gw.interfaces import (
    AuthenticationBusy,
    IDelivery,
    IRoutedDelivery,
    InsufficientStorage,
    ISubmissionAvatar,
    PermanentFailure,
    TemporaryFailure,
    UnknownUser,
)

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
#: Failed AUTH attempts after which the session is closed.
MAX_AUTH_FAILURES = 3
#: Longest accepted EHLO/HELO argument.
MAX_HELO_NAME = 255

DEFAULT_MAX_MESSAGE_SIZE = 41943040
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

    def toBytes(self) -> bytes:
        """
        @return: the reply as sent, CRLF included.
        """
        return f"{self.code} {self.text}\r\n".encode("utf-8")


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


#: How a login that did not succeed is logged: a failed login (the line
#: fail2ban matches, counted towards L{MAX_AUTH_FAILURES}), a check that
#: could not be made (one warn line with the server's reason), or a bug (the
#: traceback).
_LOGIN_FAILED = "failed"
_LOGIN_UNAVAILABLE = "unavailable"
_LOGIN_FAULT = "fault"
#: A check refused before it started (the client's share of password checks
#: is used up): not logged per attempt, the checker logs such refusals
#: sparingly.
_LOGIN_BUSY = "busy"


#: The error-to-reply table of logins, first match wins: C{(exception
#: types, reply, how it is logged)} for every exception the checker or the
#: portal can raise; anything else is L{LOGIN_FAULT}.
LOGIN_ERRORS = (
    ((LoginFailed,), AUTH_FAILED, _LOGIN_FAILED),
    ((AuthenticationBusy,), AUTH_TEMPORARY, _LOGIN_BUSY),
    ((TemporaryFailure,), AUTH_TEMPORARY, _LOGIN_UNAVAILABLE),
)
LOGIN_FAULT = (AUTH_TEMPORARY, _LOGIN_FAULT)

MAIL_SYNTAX = Reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4 Syntax: RCPT TO:<address>")
BAD_SENDER_ADDRESS = Reply(553, "5.1.7 Bad sender address syntax")
BAD_RECIPIENT_ADDRESS = Reply(501, "5.1.3 Bad recipient address syntax")
NULL_SENDER = Reply(550, "5.7.1 Null sender not allowed on submission")
SENDER_NOT_OWNED = Reply(553, "5.7.1 Sender address not owned by user")
BAD_SIZE = Reply(501, "5.5.4 Bad SIZE parameter")
BAD_BODY = Reply(501, "5.5.4 Unsupported BODY type")
UNKNOWN_PARAMETER = Reply(555, "5.5.4 Unsupported parameter")
USER_UNKNOWN = Reply(550, "5.1.1 Recipient address rejected: user unknown")
RECIPIENT_REFUSED = Reply(550, "5.7.1 Recipient address rejected")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3 Too many recipients")
NO_RECIPIENTS = Reply(554, "5.5.1 No valid recipients")

TOO_BIG = Reply(552, "5.3.4 Message size exceeds fixed maximum message size")
HEADER_TOO_BIG = Reply(552, "5.3.4 Message header section too large")
BARE_CR = Reply(550, "5.6.11 Bare CR not allowed")
DATA_LINE_TOO_LONG = Reply(550, "5.6.0 Message line longer than 998 octets")
NUL_IN_DATA = Reply(550, "5.6.0 NUL character not allowed")
HEADER_FROM_NOT_OWNED = Reply(553, "5.7.1 Sender address in the message header not owned by user")

TEMPORARY_FAILURE = Reply(451, "4.3.0 Temporary failure, try again later")
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


# --- Helpers ------------------------------------------------------------------

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def formatDate(seconds: float) -> str:
    """
    An RFC 5322 date-time in UTC, e.g. C{"Tue, 14 Nov 2023 22:13:20 +0000"}.
    Independent of the process locale.
    """
    t = time.gmtime(seconds)
    return "%s, %d %s %04d %02d:%02d:%02d +0000" % (
        _DAYS[t.tm_wday],
        t.tm_mday,
        _MONTHS[t.tm_mon - 1],
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


def decodeBase64(text: str) -> bytes:
    """
    Decode one SASL response (RFC 4954): strict base64, C{"="} meaning the
    empty string.

    @raise SMTPRefusal: with L{AUTH_BAD_BASE64}.
    """
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise SMTPRefusal(AUTH_BAD_BASE64) from None


_PATH = re.compile(r"^(?P<kind>FROM|TO): *<(?P<path>[^<>]*)>(?: +(?P<params>.*))?$", re.IGNORECASE)
_HELO_NAME = re.compile(r"^[\x21-\x7e]+$")
_SAFE_HELO = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


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


def _traceName(helo: Optional[str]) -> str:
    """
    The client's name for the C{Received:} field: its EHLO/HELO argument,
    or C{"unknown"} if there is none or it is an IP address (an address
    literal such as C{[192.0.2.7]}, as many mail programs send, is the
    client's address).
    """
    if not helo:
        return "unknown"
    host = helo[1:-1] if helo.startswith("[") and helo.endswith("]") else helo
    if host.lower().startswith("ipv6:"):
        host = host[5:]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not helo.startswith("["):
            return helo
    return "unknown"


def _headerFields(lines: list[bytes]) -> list[tuple[Optional[bytes], bytes]]:
    """
    Split a header section into unfolded fields.

    @return: a list of (lower-cased field name, or L{None} for a line that
        is not a field, unfolded value).
    """
    fields: list[list] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1] += line
            continue
        name, colon, value = line.partition(b":")
        if colon:
            # RFC 5322 4.5 (obsolete syntax) allows white space before ":".
            fields.append([name.strip(b" \t").lower(), value])
        else:
            fields.append([None, line])
    return [(name, value) for name, value in fields]


#: What a delivery's C{queueId} must look like to be used as the message id
#: on the wire and in the C{Received:} field (an RFC 5322 atom, no spaces).
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,63}$")


def _messageId(delivery: IDelivery) -> str:
    """
    The id of the message being delivered through C{delivery}: the C{queueId}
    of its L{IRoutedDelivery} (L{pop3gw.router}: the outbound queue's id, so that the
    id a client is given in the 250 reply is the one C{pop3gw queue list},
    the relay's log lines and bounces use), or, for a message with no queue
    entry, a new random one.
    """
    routed = IRoutedDelivery(delivery, None)
    queueId = None if routed is None else routed.queueId
    if isinstance(queueId, str) and _SAFE_ID.match(queueId):
        return queueId
    return secrets.token_hex(8).upper()


def _initialUser(mechanism: str, initial: Optional[str]) -> Optional[bytes]:
    """
    The user name in an AUTH initial response, for a log line: the
    authentication identity of PLAIN, or LOGIN's user name; L{None} if
    there is none or it does not decode.  Never the password.
    """
    if initial is None:
        return None
    try:
        response = decodeBase64(initial)
    except SMTPRefusal:
        return None
    if mechanism == "LOGIN":
        return response or None
    parts = response.split(b"\x00")
    if len(parts) != 3:
        return None
    return parts[1] or None


#: The (lower-cased) header fields whose addresses the user must own.
_SENDER_FIELDS = frozenset({b"from", b"sender", b"resent-from", b"resent-sender"})


def _stuffing(line: bytes | bytearray) -> int:
    """
    The octets of transparency stuffing at the start of a data line: the
    line length limit does not count the duplicated leading C{"."} (RFC 5321
    4.5.3.1.6).
    """
    return 1 if line[:1] == b"." else 0


# --- The message reader -------------------------------------------------------


class _MessageReader:
    """
    Reads the data of one message from the input buffer and streams it into
    an L{IDelivery}.  See the module docstring for the rules.

    @ivar refusal: the L{Reply} the message will be refused with at the end
        of the data, or L{None}.
    @ivar reason: the server-side error behind the refusal, for the log (a
        storage failure's text), or L{None}.
    @ivar size: message octets counted so far (CRLF line ends, unstuffed).
    """

    log = Logger()

    def __init__(
        self,
        delivery: IDelivery,
        maxSize: int,
        mayUseSender: Optional[Callable[[Address], bool]],
        addFields: Callable[[set], list[bytes]],
    ) -> None:
        self.delivery = delivery
        self._maxSize = maxSize
        self._mayUseSender = mayUseSender
        self._addFields = addFields
        self.refusal: Optional[Reply] = None
        self.reason: Optional[str] = None
        self.size = 0
        self._previousCRLF = True
        self._inLongLine = False
        self._inHeaders = True
        self._headerLines: list[bytes] = []
        self._headerSize = 0
        self._out: list[bytes] = []
        self._outSize = 0

    def consume(self, buf: bytearray) -> bool:
        """
        Read complete lines from the front of C{buf}.

        @return: whether the end of the data was reached; the octets after
            it are left in C{buf}.
        """
        while True:
            nl = buf.find(b"\n")
            if nl == -1:
                # Keep a trailing CR: the LF may come in the next segment.
                keep = 1 if buf.endswith(b"\r") else 0
                if len(buf) - keep > MAX_DATA_LINE + _stuffing(buf):
                    # This line is too long whatever follows; drop what we
                    # have of it so memory stays bounded.
                    self.refuse(DATA_LINE_TOO_LONG)
                    del buf[: len(buf) - keep]
                    self._inLongLine = True
                self._flush()
                return False
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            crlf = line.endswith(b"\r")
            if crlf:
                line = line[:-1]
            if line == b"." and crlf and self._previousCRLF and not self._inLongLine:
                self._flush()
                return True
            self._previousCRLF = crlf
            if self._inLongLine or len(line) > MAX_DATA_LINE + _stuffing(line):
                self._inLongLine = False
                self.refuse(DATA_LINE_TOO_LONG)
                continue
            if b"\r" in line:
                self.refuse(BARE_CR)
                continue
            if b"\x00" in line:
                # RFC 5321 2.3.8: NUL is not text; MTAs downstream differ
                # in what they make of it.
                self.refuse(NUL_IN_DATA)
                continue
            if self.refusal is not None:
                continue
            if line[:1] == b"." and len(line) > 1:
                line = line[1:]
            self._line(line)

    def finish(self) -> Optional[Reply]:
        """
        The end of the data was reached: write what is still held.

        @return: the refusal, or L{None} if the delivery may be committed.
        """
        if self.refusal is None and self._inHeaders:
            self._endHeaders(blankLine=False)
        self._flush()
        return self.refusal

    def refuse(self, reply: Reply, reason: Optional[str] = None) -> None:
        """
        Refuse the message (the first refusal wins): abort the delivery now,
        keep reading to the end of the data.

        @param reason: the server-side error, for the log only.
        """
        if self.refusal is not None:
            return
        self.refusal = reply
        self.reason = reason
        self._out = []
        self._headerLines = []
        try:
            self.delivery.abort()
        except Exception:
            self.log.failure("Aborting a submission delivery failed")

    def abort(self) -> None:
        """
        The session ended before the end of the data.
        """
        self.refuse(INTERNAL_ERROR)

    def _line(self, line: bytes) -> None:
        self.size += len(line) + 2
        if self.size > self._maxSize:
            self.refuse(TOO_BIG)
            return
        if self._inHeaders:
            if line == b"":
                self._endHeaders(blankLine=True)
                return
            self._headerSize += len(line) + 2
            if self._headerSize > MAX_HEADER_SECTION:
                self.refuse(HEADER_TOO_BIG)
                return
            self._headerLines.append(line)
        else:
            self._emit(line + b"\r\n")

    def _endHeaders(self, blankLine: bool) -> None:
        self._inHeaders = False
        lines, self._headerLines = self._headerLines, []
        fields = _headerFields(lines)
        if self._mayUseSender is not None and not self._sendersOwned(fields):
            self.refuse(HEADER_FROM_NOT_OWNED)
            return
        present = {name for name, _ in fields if name is not None}
        for added in self._addFields(present):
            self._emit(added)
        for line in lines:
            self._emit(line + b"\r\n")
        if blankLine:
            self._emit(b"\r\n")

    def _sendersOwned(self, fields: list[tuple[Optional[bytes], bytes]]) -> bool:
        """
        Whether every address in every C{From:}, C{Sender:}, C{Resent-From:}
        and C{Resent-Sender:} field may be used by the user.  An unparseable or empty field counts as not
        owned; a message without these fields passes.
        """
        for name, value in fields:
            if name not in _SENDER_FIELDS:
                continue
            pairs = email.utils.getaddresses([value.decode("utf-8", "replace")])
            if not pairs:
                return False
            for _, spec in pairs:
                try:
                    address = Address.parse(spec)
                except AddressError:
                    return False
                if not self._mayUseSender(address):
                    return False
        return True

    def _emit(self, data: bytes) -> None:
        self._out.append(data)
        self._outSize += len(data)
        if self._outSize >= WRITE_CHUNK:
            self._flush()

    def _flush(self) -> None:
        out, self._out, self._outSize = self._out, [], 0
        if not out or self.refusal is not None:
            return
        try:
            self.delivery.write(b"".join(out))
        except TemporaryFailure as e:
            self.refuse(temporaryReply(e), str(e))
        except Exception:
            self.log.failure("Writing a submitted message failed")
            self.refuse(INTERNAL_ERROR)


# --- The protocol -------------------------------------------------------------


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


class SubmissionServer(Protocol):
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

    def __init__(self, factory: "SubmissionFactory") -> None:
        self.factory = factory
        self._buffer = bytearray()
        self._state = _State.FRESH
        self._mode = _Mode.COMMAND
        self._secure = False
        self._peer = "unknown"
        self._helo: Optional[str] = None
        self._esmtp = False
        self._avatar: Optional[ISubmissionAvatar] = None
        self._logout: Optional[Callable[[], None]] = None
        self._user = ""
        self._sender: Optional[Address] = None
        self._recipients: list[Address] = []
        self._reader: Optional[_MessageReader] = None
        self._queueID = ""
        self._auth: Optional[tuple] = None
        self._authFailures = 0
        self._errors = 0
        self._messages = 0
        self._bytes = 0
        self._discardingLine = False
        self._waiting = False
        self._processing = False
        self._paused = False
        self._closing = False
        self._connected = False
        self._timer = None
        self._abortCall = None
        self._output = OutputFlow(self)
        self._outputRegistered = False

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        """
        Greet the client and start the idle timer.
        """
        self._connected = True
        self._secure = ISSLTransport.providedBy(self.transport)
        self._peer = describePeer(self.transport.getPeer())
        self._output.register(self.transport)
        self._timer = self.factory.clock.callLater(self.factory.idleTimeout, self._timedOut)
        self._send(Reply(220, f"{self.factory.hostname} ESMTP ready"))

    def dataReceived(self, data: bytes) -> None:
        """
        Buffer C{data} and process what can be processed now.
        """
        if self._closing or not self._connected:
            return
        if b"\n" in data and self._timer is not None and self._timer.active():
            # Only a line end counts as activity: a client trickling a line
            # that never ends (slowloris) still times out.
            self._timer.reset(self.factory.idleTimeout)
        self._buffer += data
        self._process()

    def connectionLost(self, reason: Failure = None) -> None:
        """
        Abort any open delivery, log out, log the session's counters.
        """
        self._connected = False
        self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()
        self._abortCall = None
        del self._buffer[:]
        self._unregisterOutput()
        if self._reader is not None:
            self._reader.abort()
            self._reader = None
        self._endAuthentication()

    def _unregisterOutput(self) -> None:
        self._output.unregister(self.transport, self.log)

    def _outputPaused(self) -> None:
        """
        The client stopped reading: nothing to do now; L{_process} checks
        the flow before answering anything.
        """

    def _outputResumed(self) -> None:
        """
        The client reads again: answer what waits.
        """
        if self._connected and not self._closing:
            self._process()

    def _timedOut(self) -> None:
        self._timer = None
        if self._waiting and self._connected:
            # The server, not the client, is slow: wait on.
            self._timer = self.factory.clock.callLater(self.factory.idleTimeout, self._timedOut)
            return
        self._close(Reply(421, f"4.4.2 {self.factory.hostname} Error: timeout exceeded"))

    def _close(self, reply: Reply) -> None:
        """
        Send a last reply and close the connection.  If the client is not
        reading (the output is paused), the connection is aborted at once
        without the reply; otherwise it is aborted if the reply has not gone
        out after L{CLOSE_TIMEOUT} seconds.
        """
        if self._closing:
            return
        stalled = self._output.paused
        self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._reader is not None:
            self._reader.abort()
            self._reader = None
        del self._buffer[:]
        if not self._connected:
            return
        if not stalled:
            self.transport.write(reply.toBytes())
        # A registered producer would keep a TLS transport from shutting
        # down.
        self._unregisterOutput()
        if stalled:
            self.transport.abortConnection()
            return
        self.transport.loseConnection()
        self._abortCall = self.factory.clock.callLater(CLOSE_TIMEOUT, self._abortStalled)

    def _abortStalled(self) -> None:
        """
        The last reply did not go out in time: the client is not reading.
        """
        self._abortCall = None
        if self._connected:
            self.transport.abortConnection()

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

    def _process(self) -> None:
        """
        Handle buffered input until it runs out or a reply is pending.
        """
        if self._processing:
            return
        self._processing = True
        try:
            while not self._waiting and not self._closing and not self._output.paused:
                if self._mode is _Mode.DATA:
                    progressed = self._dataStep()
                else:
                    progressed = self._lineStep()
                if not progressed:
                    break
        except Exception:
            self.log.failure("Unexpected error in a submission session")
            self._close(Reply(421, f"4.3.0 {self.factory.hostname} Error: internal error"))
        finally:
            self._processing = False
        self._flowControl()

    def _flowControl(self) -> None:
        """
        Stop reading while more than L{MAX_PENDING_INPUT} octets wait (behind
        a pending reply, or for a client that does not read its replies);
        read again once they have been handled.
        """
        if self._closing or not self._connected:
            return
        want = len(self._buffer) <= MAX_PENDING_INPUT
        try:
            if not want and not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            elif want and self._paused:
                self._paused = False
                self.transport.resumeProducing()
        except Exception:
            self.log.failure("Flow control on a submission transport failed")

    def _wait(self, d: Deferred) -> None:
        """
        Hold further input until C{d} (whose callbacks send the reply) fires.
        """
        self._waiting = True
        d.addErrback(self._ebUnexpected)
        d.addBoth(self._resume)

    def _resume(self, ignored: object) -> None:
        self._waiting = False
        if self._connected:
            self._process()

    def _ebUnexpected(self, failure: Failure) -> None:
        self.log.failure("Unexpected error in a submission session", failure)
        if self._connected:
            self._close(Reply(421, f"4.3.0 {self.factory.hostname} Error: internal error"))

    def _lineStep(self) -> bool:
        buf = self._buffer
        nl = buf.find(b"\n")
        if nl == -1:
            if len(buf) > MAX_AUTH_LINE:
                del buf[:]
                self._discardingLine = True
            return False
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        if self._discardingLine:
            self._discardingLine = False
            self._lineTooLong()
            return True
        length = len(line) + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        else:
            length += 1
        if self._mode is _Mode.AUTH or line[:5].upper() == b"AUTH ":
            limit = MAX_AUTH_LINE
        else:
            limit = MAX_COMMAND_LINE
        if length > limit:
            # Whether the line came in one segment or many.
            self._lineTooLong()
        elif self._mode is _Mode.AUTH:
            self._authResponse(line)
        else:
            self._commandLine(line)
        return True

    def _lineTooLong(self) -> None:
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
            self._wait(result)

    def _dataStep(self) -> bool:
        reader = self._reader
        if not reader.consume(self._buffer):
            return False
        self._reader = None
        self._mode = _Mode.COMMAND
        refusal = reader.finish()
        sender = self._sender
        self._resetTransaction()
        if refusal is not None:
            self._logRefused(sender, refusal, reader.reason)
            self._send(refusal)
            return True
        queueID, size = self._queueID, reader.size
        d = maybeDeferred(reader.delivery.commit)
        d.addCallbacks(
            self._cbCommitted,
            self._ebCommitted,
            callbackArgs=(queueID, size, sender, reader.delivery),
            errbackArgs=(sender,),
        )
        self._wait(d)
        return True

    def _logRefused(self, sender: Optional[Address], reply: Reply, reason: Optional[str] = None) -> None:
        """
        Log one line for a message refused after its envelope: the user,
        the envelope sender, the reply and, for a server-side failure (a
        full disk), the error in words::

            submission: refused message user="..." from="..." reply="452 4.3.1 ..." error="cannot write message: No space left on device"
        """
        fields = dict(
            user=events.sanitize(self._user),
            sender=events.sanitize(str(sender) if sender is not None else None),
            reply=events.sanitize(f"{reply.code} {reply.text}"),
        )
        if reason is None:
            self.log.info("submission: refused message user={user} from={sender} reply={reply}", **fields)
        else:
            self.log.warn(
                "submission: refused message user={user} from={sender} reply={reply} error={error}",
                error=events.sanitize(reason, events.MAX_LOGGED_REPLY),
                **fields,
            )

    def _cbCommitted(
        self, ignored: object, queueID: str, size: int, sender: Optional[Address], delivery: IDelivery
    ) -> None:
        """
        The message is durable: log it and say 250.

        The log line ties the id the client sees to the message's routing:
        the number of local and remote recipients and the queue id, when
        the delivery provides L{IRoutedDelivery} (C{localRecipients},
        C{remoteRecipients}, C{queueId}: see L{pop3gw.router}; C{-} when it
        does not).
        """
        self._messages += 1
        self._bytes += size
        routed = IRoutedDelivery(delivery, None)
        local, remote, queue = (None, None, None) if routed is None else (
            routed.localRecipients, routed.remoteRecipients, routed.queueId)
        self.log.info(
            "submission: accepted id={queueID} user={user} from={sender} local={local} remote={remote}"
            " size={size} queue={queue}",
            queueID=queueID,
            user=events.sanitize(self._user),
            sender=events.sanitize(None if sender is None else str(sender)),
            local="-" if local is None else len(local),
            remote="-" if remote is None else len(remote),
            size=size,
            queue=queue if queue is not None and _SAFE_ID.match(queue) else "-",
        )
        self._send(Reply(250, f"2.0.0 OK queued as {queueID}"))

    def _ebCommitted(self, failure: Failure, sender: Optional[Address]) -> None:
        if failure.check(TemporaryFailure):
            reply = temporaryReply(failure.value)
            self._logRefused(sender, reply, str(failure.value))
        else:
            self.log.failure("submission: commit failed", failure)
            reply = TEMPORARY_FAILURE
        self._send(reply)

    # -- session state ---------------------------------------------------

    def _resetTransaction(self) -> None:
        """
        Forget the sender and recipients (RSET, EHLO, end of data).
        """
        self._sender = None
        self._recipients = []
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
        events.loggedOut(self.log, SERVICE, self._user, self._peer, messages=self._messages, bytes=self._bytes)
        if logout is not None:
            try:
                logout()
            except Exception:
                self.log.failure("Submission logout failed")

    def _plaintextAllowed(self) -> bool:
        return bool(self.factory.plaintextAllowed(self._secure, self._peer))

    def _startTLSOffered(self) -> bool:
        return self.factory.tlsContextFactory is not None and not self._secure

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

    def _cmdEHLO(self, argument: str) -> None:
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

    def _cmdHELO(self, argument: str) -> None:
        name = self._heloName(argument, HELO_SYNTAX)
        self._greeted(name, esmtp=False)
        self._send(Reply(250, self.factory.hostname))

    def _cmdNOOP(self, argument: str) -> None:
        self._send(OK)

    def _cmdRSET(self, argument: str) -> None:
        if argument:
            raise SMTPRefusal(NO_ARGUMENTS)
        self._resetTransaction()
        self._send(OK)

    def _cmdQUIT(self, argument: str) -> None:
        self._close(BYE)

    def _cmdVRFY(self, argument: str) -> None:
        if not argument:
            raise SMTPRefusal(VRFY_SYNTAX)
        self._send(CANNOT_VRFY)

    def _cmdHELP(self, argument: str) -> None:
        self._send(HELP)

    def _cmdSTARTTLS(self, argument: str) -> None:
        if argument:
            raise SMTPRefusal(NO_ARGUMENTS)
        if self._secure:
            raise SMTPRefusal(TLS_ACTIVE)
        if self.factory.tlsContextFactory is None:
            raise SMTPRefusal(NO_STARTTLS)
        self._send(READY_TLS)
        # CVE-2011-0411: whatever was pipelined after STARTTLS arrived in
        # plaintext and must never be acted on.
        del self._buffer[:]
        self._discardingLine = False
        self.transport.startTLS(self.factory.tlsContextFactory)
        self._secure = True
        self._endAuthentication()
        self._resetTransaction()
        self._helo = None
        self._esmtp = False
        self._state = _State.FRESH

    def _cmdAUTH(self, argument: str) -> Optional[Deferred]:
        if not self._esmtp:
            raise SMTPRefusal(SEND_EHLO_FIRST)
        parts = argument.split(" ")
        if not argument or len(parts) > 2:
            raise SMTPRefusal(AUTH_SYNTAX)
        mechanism = parts[0].upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            raise SMTPRefusal(AUTH_MECHANISM)
        initial = parts[1] if len(parts) == 2 else None
        if not self._plaintextAllowed():
            events.loginRefused(
                self.log, SERVICE, _initialUser(mechanism, initial), self._peer, events.PLAINTEXT_DISALLOWED
            )
            raise SMTPRefusal(AUTH_ENCRYPTION_REQUIRED)
        if mechanism == "PLAIN":
            if initial is None:
                self._auth = ("PLAIN",)
                self._mode = _Mode.AUTH
                self._send(AUTH_CONTINUE)
                return None
            return self._authPlain(decodeBase64(initial))
        if initial is None:
            self._auth = ("LOGIN-USER",)
            self._mode = _Mode.AUTH
            self._send(AUTH_USERNAME)
            return None
        self._auth = ("LOGIN-PASSWORD", decodeBase64(initial))
        self._mode = _Mode.AUTH
        self._send(AUTH_PASSWORD)
        return None

    def _authResponse(self, line: bytes) -> None:
        """
        One SASL response line in the middle of an AUTH exchange.
        """
        step, self._auth = self._auth, None
        self._mode = _Mode.COMMAND
        if line == b"*":
            self._send(AUTH_CANCELLED)
            return
        try:
            response = decodeBase64(line.decode("ascii"))
            if step[0] == "PLAIN":
                result = self._authPlain(response)
            elif step[0] == "LOGIN-USER":
                self._auth = ("LOGIN-PASSWORD", response)
                self._mode = _Mode.AUTH
                self._send(AUTH_PASSWORD)
                return
            else:
                result = self._login(step[1], response)
        except UnicodeDecodeError:
            self._send(AUTH_BAD_BASE64)
            return
        except SMTPRefusal as e:
            self._send(e.reply)
            return
        if isinstance(result, Deferred):
            self._wait(result)

    def _authPlain(self, response: bytes) -> Optional[Deferred]:
        parts = response.split(b"\x00")
        if len(parts) != 3:
            raise SMTPRefusal(AUTH_MALFORMED)
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            events.loginFailed(self.log, SERVICE, authcid, self._peer, "authorization identity differs")
            self._authFailed()
            return None
        return self._login(authcid, password)

    def _login(self, user: bytes, password: bytes) -> Deferred:
        d = self.factory.portal.login(ClientCredentials(user, password, self._peer), None, ISubmissionAvatar)
        d.addCallbacks(self._cbLogin, self._ebLogin, callbackArgs=(user,), errbackArgs=(user,))
        return d

    def _cbLogin(self, result: tuple, user: bytes) -> None:
        interface, avatar, logout = result
        if not self._connected or self._closing:
            logout()
            return
        self._avatar = avatar
        self._logout = logout
        # The user as stored, whatever case the client typed.
        self._user = str(avatar.address)
        self._state = _State.AUTHENTICATED
        events.loginSucceeded(self.log, SERVICE, self._user, self._peer, self._secure)
        self._send(AUTH_OK)

    def _ebLogin(self, failure: Failure, user: bytes) -> None:
        """
        Answer and log a login that did not succeed, as L{LOGIN_ERRORS}
        says; a client that hung up gets no answer but the same log line.
        """
        for errors, reply, kind in LOGIN_ERRORS:
            if failure.check(*errors):
                break
        else:
            reply, kind = LOGIN_FAULT
        if kind == _LOGIN_FAILED:
            events.loginFailed(self.log, SERVICE, user, self._peer)
            self._authFailed(reply)
            return
        if kind == _LOGIN_UNAVAILABLE:
            events.loginUnavailable(self.log, SERVICE, user, self._peer, str(failure.value))
        elif kind == _LOGIN_FAULT:
            self.log.failure("Submission login failed unexpectedly", failure)
        self._send(reply)

    def _authFailed(self, reply: Reply = AUTH_FAILED) -> None:
        self._authFailures += 1
        self._send(reply)
        if self._authFailures >= MAX_AUTH_FAILURES:
            self._close(Reply(421, f"4.7.0 {self.factory.hostname} Error: too many authentication failures"))

    def _cmdMAIL(self, argument: str) -> None:
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
        if not self._avatar.mayUseSender(sender):
            raise SMTPRefusal(SENDER_NOT_OWNED)
        self._sender = sender
        self._recipients = []
        self._state = _State.MAIL
        self._send(SENDER_OK)

    def _cmdRCPT(self, argument: str) -> Deferred:
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
            address = Address(POSTMASTER, self._avatar.address.domain)
        else:
            try:
                address = Address.parse(path)
            except AddressError:
                raise SMTPRefusal(BAD_RECIPIENT_ADDRESS) from None
        if len(self._recipients) >= self.factory.maxRecipients:
            raise SMTPRefusal(TOO_MANY_RECIPIENTS)
        d = maybeDeferred(self._avatar.checkRecipient, address)
        d.addCallbacks(self._cbRecipient, self._ebRecipient)
        return d

    def _cbRecipient(self, address: Address) -> None:
        if self._state is not _State.MAIL:
            return
        if address not in self._recipients:
            self._recipients.append(address)
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

    def _cmdDATA(self, argument: str) -> None:
        if argument:
            raise SMTPRefusal(NO_ARGUMENTS)
        if not self._recipients:
            raise SMTPRefusal(NO_RECIPIENTS)
        try:
            delivery = self._avatar.beginDelivery(self._sender, list(self._recipients))
        except TemporaryFailure as e:
            self._logRefused(self._sender, temporaryReply(e), str(e))
            raise SMTPRefusal(temporaryReply(e)) from None
        self._queueID = _messageId(delivery)
        # The Received: field names the id, so it is written once the
        # delivery (and with it the queue id) exists, as the first data.
        try:
            delivery.write(self._receivedHeader())
        except TemporaryFailure as e:
            delivery.abort()
            self._logRefused(self._sender, temporaryReply(e), str(e))
            raise SMTPRefusal(temporaryReply(e)) from None
        except Exception:
            delivery.abort()
            raise
        checker = self._avatar.mayUseSender if self.factory.checkHeaderFrom else None
        self._reader = _MessageReader(delivery, self.factory.maxMessageSize, checker, self._missingFields)
        self._mode = _Mode.DATA
        self._send(START_DATA)

    def _receivedHeader(self) -> bytes:
        """
        The trace field for the current message.  It deliberately names
        neither the client's IP address nor the user (see the class
        docstring).
        """
        helo = _SAFE_HELO.sub("_", _traceName(self._helo))
        protocol = "ESMTP" + ("S" if self._secure else "") + ("A" if self._avatar is not None else "")
        return (
            f"Received: from {helo} (authenticated user) by {self.factory.hostname}"
            f" (pop3gw) with {protocol} id {self._queueID}; {formatDate(self.factory.clock.seconds())}\r\n"
        ).encode("ascii", "replace")

    def _missingFields(self, present: set) -> list[bytes]:
        """
        The C{Message-ID:}, C{Date:} and C{From:} fields to add to a message
        whose header has the (lower-cased) field names C{present} (RFC 6409
        8.2, 8.3; RFC 5322 3.6 requires C{From:} and C{Date:}).  An added
        C{From:} holds the authenticated user's own address, not the
        envelope sender (which may be one of the user's aliases): the
        address the user proved, as a C{Sender:} would.
        """
        added = []
        if b"message-id" not in present:
            added.append(f"Message-ID: <{secrets.token_hex(16)}@{self.factory.hostname}>\r\n".encode("ascii", "replace"))
        if b"date" not in present:
            added.append(f"Date: {formatDate(self.factory.clock.seconds())}\r\n".encode("ascii"))
        if b"from" not in present and self._avatar is not None:
            added.append(f"From: {self._avatar.address}\r\n".encode("utf-8"))
        return added

    # -- command tables --------------------------------------------------

    _common = {
        "EHLO": _cmdEHLO,
        "HELO": _cmdHELO,
        "NOOP": _cmdNOOP,
        "RSET": _cmdRSET,
        "QUIT": _cmdQUIT,
        "VRFY": _cmdVRFY,
        "HELP": _cmdHELP,
    }
    _tables = {
        _State.FRESH: {**_common, "STARTTLS": _cmdSTARTTLS},
        _State.GREETED: {**_common, "STARTTLS": _cmdSTARTTLS, "AUTH": _cmdAUTH},
        _State.AUTHENTICATED: {**_common, "MAIL": _cmdMAIL},
        _State.MAIL: {**_common, "RCPT": _cmdRCPT, "DATA": _cmdDATA},
    }
    del _common


_COMMAND_TABLES = SubmissionServer._tables
_KNOWN_COMMANDS = frozenset(
    {"EHLO", "HELO", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "STARTTLS", "VRFY", "HELP"}
)
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


@attr.s(auto_attribs=True, eq=False)
class SubmissionFactory(Factory):
    """
    Builds L{SubmissionServer}s.

    @ivar portal: a L{twisted.cred.portal.Portal} whose realm returns
        L{ISubmissionAvatar}s for L{ClientCredentials} (user name and
        password as UTF-8 bytes, and the client's address).
    @ivar plaintextAllowed: C{plaintextAllowed(secure, peerHost) -> bool}:
        whether AUTH PLAIN/LOGIN may be used on a connection.
    @ivar clock: an L{IReactorTime} for the idle timeout and C{Date:}s.
    @ivar hostname: the server's name in the greeting, EHLO and headers.
    @ivar maxMessageSize: the SIZE limit in octets.
    @ivar tlsContextFactory: passed to C{transport.startTLS}; L{None} means
        STARTTLS is not offered.  For implicit TLS, wrap this factory in a
        L{twisted.protocols.tls.TLSMemoryBIOFactory}: the connection is then
        seen as secure from the start.
    @ivar maxRecipients: recipients per message.
    @ivar checkHeaderFrom: whether the C{From:}/C{Sender:} addresses must be
        owned by the user.
    @ivar idleTimeout: seconds of client silence before C{421} and close.
    """

    portal: object
    plaintextAllowed: Callable[[bool, str], bool]
    clock: object
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
