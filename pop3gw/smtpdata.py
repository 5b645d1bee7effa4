# -*- test-case-name: tests.test_smtp -*-
"""
SMTP message data: DATA, the reader of what follows C{354} and the commit,
shared by every SMTP listener; and submission's side of it (the header
fix-ups, its C{Received:} field) in L{SubmissionData}.  The MX listener
(L{pop3gw.smtpmx}) and LMTP (L{pop3gw.smtplmtp}) use the same reader and
rules, store the message as received and write their own C{Received:}
field; LMTP answers the end of the data once per recipient
(L{DataCommands._sendDataReply}, L{DataCommands._cbCommitted}).

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
    which the ownership rules always allow).  Data whose first line is not
    a header field (C{name: value}, RFC 5322 3.6.8 and 4.5; a body line, a
    line starting with white space, or the blank line) has no header
    section: the added fields are followed by a blank line so that the
    text stays the body.  A later line of the header section that is
    neither a field nor a folded continuation ends the section the same
    way (Postfix's cleanup does so): a blank line is inserted before it
    and it is the first line of the body.  Octets are counted as they stream; over
    the size limit the delivery is aborted and the rest of the data is read
    and dropped before C{552 5.3.4} is sent.
  - Line ends are processed exactly across TCP segment boundaries: a CR at
    the end of one segment and an LF at the start of the next is a CRLF.
  - The data is read a chunk at a time, not a line at a time: the
    complete lines buffered are checked for NUL, bare CR and long lines
    and converted (dot-unstuffing, bare LF to CRLF) with C{bytes} methods;
    a chunk that breaks a rule is read again line by line, so the reply is
    always the one of the first rule broken.  The header section is read
    line by line (it is held anyway).

BDAT (RFC 3030)
===============

C{BDAT <size> [LAST]} is followed by exactly C{<size>} octets of message,
whatever they look like (command lines, C{CRLF . CRLF}: all content).  The
chunks go through the rules above but for transparency: no dot-unstuffing,
no end marker, and the line length limit has no allowance for a stuffing
C{"."}; a line may span chunks, and a last line without a line end is
stored with CRLF.  Each chunk but the last is answered C{250 2.0.0 <size>
octets received}; C{BDAT ... LAST} is answered like the end of the data
(C{250} once the message is durable).  A chunk that makes the message
refused (size, bare CR, NUL, long line, header) is answered with that
refusal at once and the transaction ends; chunks already pipelined after it
are out of sequence.  A BDAT that is refused (out of sequence, bad
argument, no recipient) is answered only once its chunk has been read and
discarded, so the session stays in step; a size that cannot be read (not
digits, or more than L{MAX_CHUNK_DIGITS} of them) is answered C{501} and
the connection closed, since where the next command starts is unknown.
DATA in a transaction that has BDAT chunks is C{503 5.5.1}, and so is RCPT.

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

import email.utils
import ipaddress
import re
import time
from abc import abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Optional, cast

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3gw import events
from pop3gw.address import Address, AddressError
from pop3gw.interfaces import IDelivery, IRoutedDelivery, TemporaryFailure
from pop3gw.smtpreplies import (
    BARE_CR,
    BDAT_SYNTAX,
    DATA_AFTER_BDAT,
    DATA_LINE_TOO_LONG,
    HEADER_FROM_NOT_OWNED,
    HEADER_TOO_BIG,
    INTERNAL_ERROR,
    MAX_CHUNK_DIGITS,
    MAX_DATA_LINE,
    MAX_HEADER_SECTION,
    NEED_RCPT,
    NO_ARGUMENTS,
    NO_RECIPIENTS,
    NUL_IN_DATA,
    START_DATA,
    TEMPORARY_FAILURE,
    TOO_BIG,
    WRITE_CHUNK,
    Reply,
    SMTPRefusal,
    _Mode,
    temporaryReply,
)
from pop3gw.tokens import tokenHex

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


_SAFE_HELO = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


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

    @return: a list of (lower-cased field name, or C{None} for a line that
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
    return tokenHex(8).upper()


#: The start of a header field: a field name (RFC 5322 3.6.8: printable
#: ASCII but C{":"}), white space (the obsolete syntax of 4.5), C{":"}.
_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")
#: What a folded line of a header field starts with (RFC 5322 2.2.3).
_FOLD = (b" ", b"\t")


#: The (lower-cased) header fields whose addresses the user must own.
_SENDER_FIELDS = frozenset({b"from", b"sender", b"resent-from", b"resent-sender"})


#: The end of the data when it follows a line ended by CRLF.
_END = b"\r\n.\r\n"
#: A dot-stuffed line after the first of a chunk: C{"."} then something
#: other than the line end (a lone C{"."} line is kept as it is).
_STUFFED = re.compile(rb"\n\.(?=[^\r\n])")


class _MessageReader:
    """
    Reads the data of one message from the input buffer and streams it into
    an L{IDelivery}.  See the module docstring for the rules.

    The data after DATA (C{dotStuffed}: transparency, ended by C{CRLF . CRLF})
    and the chunks of BDAT (RFC 3030: octets counted by the client, no
    transparency, no end marker) go through the same rules.  The header
    section is read line by line; after it the data is handled a chunk at a
    time: whatever complete lines are buffered are checked and converted
    with C{bytes} methods and two regular expressions (NUL, bare CR, long
    lines, dot-stuffing, bare LF), and only a chunk that breaks a rule, or
    would pass the size limit, is read again line by line, so that the
    first rule broken, and so the reply, is the one the line-by-line
    reading gives.

    @ivar refusal: the L{Reply} the message will be refused with at the end
        of the data, or C{None}.
    @ivar reason: the server-side error behind the refusal, for the log (a
        storage failure's text), or C{None}.
    @ivar size: message octets counted so far (CRLF line ends, unstuffed).
    """

    log = Logger()

    def __init__(
        self,
        delivery: IDelivery,
        maxSize: int,
        mayUseSender: Optional[Callable[[Address], bool]],
        addFields: Callable[[set], list[bytes]],
        dotStuffed: bool = True,
    ) -> None:
        self.delivery = delivery
        self._maxSize = maxSize
        self._mayUseSender = mayUseSender
        self._addFields = addFields
        self._dotStuffed = dotStuffed
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
        #: BDAT: the data received and not yet read (a partial line).
        self.pending = bytearray()

    def consume(self, buf: bytearray) -> bool:
        """
        Read complete lines from the front of C{buf}.

        @return: whether the end of the data (C{CRLF . CRLF}, never for
            BDAT) was reached; the octets after it are left in C{buf}.
        """
        try:
            while True:
                if (self._inHeaders and self.refusal is None) or self._inLongLine:
                    ended = self._readLine(buf)
                    if ended is None:
                        return False
                    if ended:
                        return True
                    continue
                end = self._findEnd(buf)
                cut = end if end >= 0 else buf.rfind(b"\n") + 1
                if cut > 0:
                    region = bytes(buf[:cut])
                    del buf[:cut]
                    self._body(region)
                if end >= 0:
                    del buf[:3]
                    return True
                self._partialLine(buf)
                return False
        finally:
            self._flush()

    def feed(self, data: bytes) -> None:
        """
        BDAT: read the octets of a chunk (lines may span chunks).
        """
        self.pending += data
        self.consume(self.pending)

    def endChunks(self) -> None:
        """
        BDAT: the last chunk was read; a last line without a line end is
        read as a line (stored with CRLF).
        """
        rest = bytes(self.pending)
        self.pending.clear()
        if rest:
            self._previousCRLF = False
            self._lineContent(rest)
        self._flush()

    def _findEnd(self, buf: bytearray) -> int:
        """
        Where the end of the data starts in C{buf} (which starts at a line
        start): the offset of the C{". CRLF"} of C{CRLF . CRLF}, or -1.
        """
        if not self._dotStuffed:
            return -1
        if self._previousCRLF and buf.startswith(b".\r\n"):
            return 0
        found = buf.find(_END)
        return found + 2 if found >= 0 else -1

    def _readLine(self, buf: bytearray) -> Optional[bool]:
        """
        Read one line: in the header section, and for the rest of a line
        too long to be kept.

        @return: C{None} if there is no complete line, C{True} if it was
            the end of the data, else C{False}.
        """
        nl = buf.find(b"\n")
        if nl == -1:
            self._partialLine(buf)
            return None
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        crlf = line.endswith(b"\r")
        if crlf:
            line = line[:-1]
        if self._dotStuffed and line == b"." and crlf and self._previousCRLF and not self._inLongLine:
            return True
        self._previousCRLF = crlf
        self._lineContent(line)
        return False

    def _partialLine(self, buf: bytearray) -> None:
        """
        C{buf} holds the start of a line: if it is too long whatever
        follows, refuse the message and drop what we have of it so memory
        stays bounded.  A trailing CR is kept: the LF may come next.
        """
        keep = 1 if buf.endswith(b"\r") else 0
        if len(buf) - keep > MAX_DATA_LINE + self._stuffing(buf):
            self.refuse(DATA_LINE_TOO_LONG)
            del buf[: len(buf) - keep]
            self._inLongLine = True

    def _stuffing(self, line: bytes | bytearray) -> int:
        """
        The octets of transparency stuffing at the start of a data line:
        the line length limit does not count the duplicated leading
        C{"."} (RFC 5321 4.5.3.1.6).  None with BDAT.
        """
        return 1 if self._dotStuffed and line[:1] == b"." else 0

    def _lineContent(self, line: bytes) -> None:
        """
        Check and store one line, without its line end.
        """
        if self._inLongLine or len(line) > MAX_DATA_LINE + self._stuffing(line):
            self._inLongLine = False
            self.refuse(DATA_LINE_TOO_LONG)
            return
        if b"\r" in line:
            self.refuse(BARE_CR)
            return
        if b"\x00" in line:
            # RFC 5321 2.3.8: NUL is not text; MTAs downstream differ in
            # what they make of it.
            self.refuse(NUL_IN_DATA)
            return
        if self.refusal is not None:
            return
        if self._dotStuffed and line[:1] == b"." and len(line) > 1:
            line = line[1:]
        self._line(line)

    def _body(self, region: bytes) -> None:
        """
        Read complete body lines (C{region} starts at a line start, ends
        with LF and holds no end of the data).
        """
        self._previousCRLF = region.endswith(b"\r\n")
        if self.refusal is not None:
            # Only the end of the data matters now.
            return
        if self._bodyAtOnce(region):
            return
        lines = region.split(b"\n")
        lines.pop()
        for line in lines:
            crlf = line.endswith(b"\r")
            self._lineContent(line[:-1] if crlf else line)

    def _bodyAtOnce(self, region: bytes) -> bool:
        """
        Check and store C{region} as a whole, if it breaks no rule.

        @return: whether it was stored; if not, nothing was done.
        """
        if b"\x00" in region:
            return False
        crlf = region.count(b"\r\n")
        if region.count(b"\r") != crlf:
            return False
        if max(map(len, region.split(b"\n"))) > MAX_DATA_LINE:
            # A line that may be too long (998 octets and a CR, or a
            # stuffed line, may not be): read line by line.
            return False
        if self._dotStuffed:
            if region[:1] == b"." and region[1:2] not in (b"\r", b"\n"):
                region = region[1:]
            if b"\n." in region:
                region = _STUFFED.sub(b"\n", region)
        if region.count(b"\n") != crlf:
            # Bare LF: every line end becomes CRLF (there is no bare CR).
            region = region.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        size = self.size + len(region)
        if size > self._maxSize:
            return False
        self.size = size
        self._emit(region)
        return True

    def finish(self) -> Optional[Reply]:
        """
        The end of the data was reached: write what is still held.

        @return: the refusal, or C{None} if the delivery may be committed.
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
            if _FIELD_START.match(line) is None and not (self._headerLines and line[:1] in _FOLD):
                # Neither a field nor the continuation of one: the header
                # section ends before this line (none at all if it is the
                # first), which starts the body after a blank line, as
                # Postfix's cleanup makes it.  Every reader, the DKIM
                # signer and the checks then see one header section.
                self._endHeaders(blankLine=True)
                self._emit(line + b"\r\n")
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
        mayUseSender = self._mayUseSender
        assert mayUseSender is not None, "only called with a check to make"
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
                if not mayUseSender(address):
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

if TYPE_CHECKING:
    from pop3gw.interfaces import ISubmissionAvatar
    from pop3gw.smtp import SubmissionFactory
    from pop3gw.smtpreplies import SMTPHost as _Host
else:
    _Host = object


class DataCommands(_Host):
    """
    DATA, the end of the data and the commit, mixed into
    L{pop3gw.smtp.SubmissionServer}, whose state they use.
    """

    if TYPE_CHECKING:
        # What the SMTP server provides beyond SMTPHost (its factory: each
        # server's own).
        factory: Any
        service: str

        @property
        def _account(self) -> ISubmissionAvatar: ...

    # The BDAT chunk being read: octets still to come, its size, whether it
    # is the last, and the reply to send after it when it is refused.
    _chunkLeft = 0
    _chunkSize = 0
    _chunkLast = False
    _chunkRefusal: Optional[Reply] = None

    def _dataStep(self) -> bool:
        reader = self._reader
        assert reader is not None, "the DATA mode has a reader"
        if not reader.consume(self._buffer):
            return False
        self._mode = _Mode.COMMAND
        self._endOfMessage(reader)
        return True

    def _endOfMessage(self, reader: _MessageReader) -> None:
        """
        The whole message was read (the end of the data, or BDAT LAST):
        refuse it, or commit it and say 250 once it is durable.
        """
        self._reader = None
        refusal = reader.finish()
        envelope = self._envelope
        sender = envelope.sender
        self._resetTransaction()
        if refusal is not None:
            self._logRefused(sender, refusal, reader.reason)
            self._sendDataReply(refusal, reader.delivery)
            return
        queueID, size = envelope.messageId, reader.size
        d = maybeDeferred(reader.delivery.commit)
        d.addCallbacks(
            self._cbCommitted,
            self._ebCommitted,
            callbackArgs=(queueID, size, sender, reader.delivery),
            errbackArgs=(sender, reader.delivery),
        )
        self.hold(d)

    def _logRefused(self, sender: Optional[Address], reply: Reply, reason: Optional[str] = None) -> None:
        """
        Log one line for a message refused after its envelope: who sent it
        (L{_logIdentity}), the envelope sender, the reply and, for a
        server-side failure (a full disk), the error in words::

            submission: refused message user="..." from="..." reply="452 4.3.1 ..." error="cannot write message: No space left on device"
        """
        identity, fields = self._logIdentity()
        fields.update(
            sender=events.sanitize(str(sender) if sender is not None else None),
            reply=events.sanitize(f"{reply.code} {reply.text}"),
        )
        head = self.service + ": refused message " + identity + " from={sender} reply={reply}"
        if reason is None:
            self.log.info(head, **fields)
        else:
            self.log.warn(head + " error={error}", error=events.sanitize(reason, events.MAX_LOGGED_REPLY), **fields)

    def _cbCommitted(
        self, ignored: object, queueID: str, size: int, sender: Optional[Address], delivery: IDelivery
    ) -> None:
        """
        The message is durable: log it (L{_logAccepted}) and say 250.
        """
        self._messages += 1
        self._bytes += size
        self._logAccepted(queueID, size, sender, delivery)
        self._send(Reply(250, f"2.0.0 OK queued as {queueID}"))

    def _ebCommitted(self, failure: Failure, sender: Optional[Address], delivery: IDelivery) -> None:
        if failure.check(SMTPRefusal):
            # A check at commit time refused the message (the MX
            # listener's DMARC policy): its fixed reply.
            reply = cast(SMTPRefusal, failure.value).reply
            self._logRefused(sender, reply)
        elif failure.check(TemporaryFailure):
            reply = temporaryReply(cast(TemporaryFailure, failure.value))
            self._logRefused(sender, reply, str(failure.value))
        else:
            self.log.failure("submission: commit failed", failure)
            reply = TEMPORARY_FAILURE
        self._sendDataReply(reply, delivery)

    def _sendDataReply(self, reply: Reply, delivery: IDelivery) -> None:
        """
        Send the reply to the end of the data of the message delivered
        through C{delivery} when it is refused: once in SMTP; LMTP (RFC
        2033 4.2) sends it once per accepted recipient.
        """
        self._send(reply)

    def do_DATA(self, argument: str) -> None:
        if argument:
            raise SMTPRefusal(NO_ARGUMENTS)
        if self._reader is not None:
            # RFC 3030 2: BDAT and DATA never in one transaction.
            raise SMTPRefusal(DATA_AFTER_BDAT)
        if not self._envelope.recipients:
            raise SMTPRefusal(NO_RECIPIENTS)
        self._reader = self._openMessage(dotStuffed=True)
        self._mode = _Mode.DATA
        self._send(START_DATA)

    def _openMessage(self, dotStuffed: bool) -> _MessageReader:
        """
        Begin the delivery of the current transaction's message and write
        its C{Received:} field.

        @param dotStuffed: whether the data comes after DATA (transparency,
            an end marker) rather than in BDAT chunks.
        @return: the reader of the message.
        @raise SMTPRefusal: the delivery could not begin.
        """
        envelope = self._envelope
        try:
            delivery = self._beginDelivery(envelope.sender, list(envelope.recipients))
        except TemporaryFailure as e:
            self._logRefused(envelope.sender, temporaryReply(e), str(e))
            raise SMTPRefusal(temporaryReply(e)) from None
        envelope.messageId = _messageId(delivery)
        # The Received: field names the id, so it is written once the
        # delivery (and with it the queue id) exists, as the first data.
        try:
            delivery.write(self._receivedHeader())
        except TemporaryFailure as e:
            delivery.abort()
            self._logRefused(envelope.sender, temporaryReply(e), str(e))
            raise SMTPRefusal(temporaryReply(e)) from None
        except Exception:
            delivery.abort()
            raise
        return _MessageReader(
            delivery, self.factory.maxMessageSize, self._headerSenderCheck(), self._missingFields, dotStuffed
        )

    # -- BDAT (RFC 3030) -------------------------------------------------

    def do_BDAT(self, argument: str) -> None:
        """
        Read a chunk of the message: its octets follow the command line,
        as many as it says, and are data whatever they look like.  Any
        refusal is sent only once the chunk was read (and discarded), so
        that the session stays in sync.
        """
        chunk = self._chunkArgument(argument)
        if chunk is None:
            return
        size, last = chunk
        if self._reader is None:
            if not self._envelope.recipients:
                self._readChunk(size, last, NEED_RCPT)
                return
            try:
                self._reader = self._openMessage(dotStuffed=False)
            except SMTPRefusal as e:
                self._readChunk(size, last, e.reply)
                return
        self._readChunk(size, last, None)

    def refuseChunk(self, argument: str, reply: Reply) -> None:
        """
        BDAT is refused with C{reply} (out of sequence): read and discard
        its chunk, then send C{reply}.
        """
        chunk = self._chunkArgument(argument)
        if chunk is not None:
            self._readChunk(chunk[0], chunk[1], reply)

    def _chunkArgument(self, argument: str) -> Optional[tuple[int, bool]]:
        """
        The size of a BDAT chunk and whether it is the last.  A size that
        cannot be read loses the framing: C{501} and the connection is
        closed; other bad arguments get C{501} once the chunk was
        discarded.

        @return: C{(size, last)}, or C{None} when the argument is handled.
        """
        words = argument.split(" ")
        size = words[0]
        if not (size.isascii() and size.isdigit()) or len(size) > MAX_CHUNK_DIGITS:
            self._close(BDAT_SYNTAX)
            return None
        count = int(size)
        if len(words) == 1:
            return count, False
        if len(words) == 2 and words[1].upper() == "LAST":
            return count, True
        self._readChunk(count, False, BDAT_SYNTAX)
        return None

    def _readChunk(self, size: int, last: bool, refusal: Optional[Reply]) -> None:
        """
        Read the next C{size} octets as a chunk: into the message, or, with
        a C{refusal} to send afterwards, nowhere.
        """
        self._chunkLeft = size
        self._chunkSize = size
        self._chunkLast = last
        self._chunkRefusal = refusal
        self._mode = _Mode.CHUNK

    def readingCountedOctets(self) -> bool:
        """
        See L{pop3gw.lineproto.LineProtocol.readingCountedOctets}: a BDAT
        chunk is being read.
        """
        return self._mode is _Mode.CHUNK

    def _chunkStep(self) -> bool:
        """
        Take the octets of the chunk being read from the input buffer.
        """
        buf = self._buffer
        take = min(self._chunkLeft, len(buf))
        if take:
            reader = self._reader
            if self._chunkRefusal is None and reader is not None:
                reader.feed(bytes(buf[:take]))
            del buf[:take]
            self._chunkLeft -= take
        if self._chunkLeft:
            return False
        self._mode = _Mode.COMMAND
        self._chunkRead()
        return True

    def _chunkRead(self) -> None:
        """
        The whole chunk was read: answer it.
        """
        refusal, self._chunkRefusal = self._chunkRefusal, None
        if refusal is not None:
            self._send(refusal)
            return
        reader = self._reader
        assert reader is not None, "a chunk is read into a message"
        if self._chunkLast:
            reader.endChunks()
            self._endOfMessage(reader)
            return
        if reader.refusal is not None:
            # The message cannot be accepted: say so now (RFC 3030 2), and
            # the chunks that follow are out of sequence.
            self._reader = None
            sender = self._envelope.sender
            self._resetTransaction()
            self._logRefused(sender, reader.refusal, reader.reason)
            self._send(reader.refusal)
            return
        self._send(Reply(250, f"2.0.0 {self._chunkSize} octets received"))

    # -- what each server provides --------------------------------------

    @abstractmethod
    def _beginDelivery(self, sender: Optional[Address], recipients: list[Address]) -> IDelivery:
        """
        Start the delivery of the current message.
        """

    def _headerSenderCheck(self) -> Optional[Callable[[Address], bool]]:
        """
        The check the C{From:}/C{Sender:} addresses must pass, or C{None}.
        """
        return None

    @abstractmethod
    def _receivedHeader(self) -> bytes:
        """
        The C{Received:} field for the current message, CRLF included.
        """

    def _missingFields(self, present: set) -> list[bytes]:
        """
        The header fields to add to a message whose header has the
        (lower-cased) field names C{present}: none by default.
        """
        return []

    @abstractmethod
    def _logIdentity(self) -> tuple[str, dict[str, str]]:
        """
        Who the session is for the log lines: a format fragment and its
        fields.
        """

    @abstractmethod
    def _logAccepted(self, queueID: str, size: int, sender: Optional[Address], delivery: IDelivery) -> None:
        """
        Log the accepted message's line.
        """


class SubmissionData(DataCommands):
    """
    The submission server's side of the data (RFC 6409): the delivery
    through the user's router, the C{From:} ownership check, the
    C{Message-ID:}/C{Date:}/C{From:} fix-ups and its C{Received:} field.
    """

    if TYPE_CHECKING:
        factory: SubmissionFactory

    def _beginDelivery(self, sender: Optional[Address], recipients: list[Address]) -> IDelivery:
        return self._account.beginDelivery(sender, recipients, smtputf8=self._envelope.smtputf8)

    def _headerSenderCheck(self) -> Optional[Callable[[Address], bool]]:
        return self._account.mayUseSender if self.factory.checkHeaderFrom else None

    def _logIdentity(self) -> tuple[str, dict[str, str]]:
        return "user={user}", {"user": events.sanitize(self._user)}

    def _logAccepted(self, queueID: str, size: int, sender: Optional[Address], delivery: IDelivery) -> None:
        """
        The accepted line ties the id the client sees to the message's
        routing: the number of local and remote recipients and the queue
        id, when the delivery provides L{IRoutedDelivery} (C{localRecipients},
        C{remoteRecipients}, C{queueId}: see L{pop3gw.router}; C{-} when it
        does not).
        """
        routed = IRoutedDelivery(delivery, None)
        local, remote, queue = (
            (None, None, None)
            if routed is None
            else (routed.localRecipients, routed.remoteRecipients, routed.queueId)
        )
        user = events.sanitize(self._user)
        quotedSender = events.sanitize(None if sender is None else str(sender))
        localCount = "-" if local is None else len(local)
        remoteCount = "-" if remote is None else len(remote)
        queueName = queue if queue is not None and _SAFE_ID.match(queue) else "-"
        self.log.info(
            events.literal(
                f"submission: accepted id={queueID} user={user} from={quotedSender} local={localCount}"
                f" remote={remoteCount} size={size} queue={queueName}"
            ),
            queueID=queueID,
            user=user,
            sender=quotedSender,
            local=localCount,
            remote=remoteCount,
            size=size,
            queue=queueName,
        )

    def _receivedHeader(self) -> bytes:
        """
        The trace field for the current message.  It deliberately names
        neither the client's IP address nor the user (see the class
        docstring).
        """
        helo = _SAFE_HELO.sub("_", _traceName(self._helo))
        # RFC 3848 and, for a message received with SMTPUTF8, RFC 6531 3.7.3.
        protocol = (
            ("UTF8SMTP" if self._envelope.smtputf8 else "ESMTP")
            + ("S" if self.secure else "")
            + ("A" if self._avatar is not None else "")
        )
        return (
            f"Received: from {helo} (authenticated user) by {self.factory.hostname}"
            f" (pop3gw) with {protocol} id {self._envelope.messageId}; {formatDate(self.factory.clock.seconds())}\r\n"
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
            added.append(f"Message-ID: <{tokenHex(16)}@{self.factory.hostname}>\r\n".encode("ascii", "replace"))
        if b"date" not in present:
            added.append(f"Date: {formatDate(self.factory.clock.seconds())}\r\n".encode("ascii"))
        if b"from" not in present and self._avatar is not None:
            added.append(f"From: {self._account.address}\r\n".encode("utf-8"))
        return added
