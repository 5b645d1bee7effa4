# -*- test-case-name: tests.test_dsn -*-
"""
Delivery status notifications (bounces), RFC 3464.

L{makeBounce} builds one C{multipart/report; report-type=delivery-status}
message for a batch of recipients that failed permanently: a human-readable
part, a C{message/delivery-status} part and a C{text/rfc822-headers} part
with the original message's header.  Everything is built as bytes with CRLF
line ends, ready for a maildrop.

Text that came from the network (a remote server's reply) is reduced to one
printable line by L{oneLine} before it goes into any header field or body
line, so it can never add a header, a MIME boundary or a line of its own.
"""

from __future__ import annotations

import email.utils
import os
import re
from typing import Optional, Sequence, Tuple

from pop3gw.address import Address
from pop3gw.wire import toCRLF

#: The most bytes of the original header copied into a bounce.
MAX_ORIGINAL_HEADERS = 64 * 1024

#: The most characters kept of one diagnostic text.
MAX_DIAGNOSTIC_LENGTH = 500

_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_BARE_CR = re.compile(rb"\r(?!\n)")
#: RFC 6533 QCHAR: printable ASCII except "+", "=" and "\\".
_QCHAR = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")
_SMTP_REPLY = re.compile(r"^[2-5]\d\d(?: |$)")

Failure = Tuple[Address, str, str]


def oneLine(text: str | bytes, limit: int = MAX_DIAGNOSTIC_LENGTH) -> str:
    """
    C{text} as one line of printable ASCII: line breaks and tabs become
    spaces, other unprintable or non-ASCII characters become C{?}, runs of
    spaces collapse, and the result is cut to C{limit} characters.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = re.sub(r"[\r\n\t]+", " ", text)
    text = _UNPRINTABLE.sub("?", text)
    text = re.sub(r" {2,}", " ", text).strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def originalHeaders(message: bytes, limit: int = MAX_ORIGINAL_HEADERS) -> bytes:
    """
    The header of C{message} (everything before the first empty line),
    with CRLF line ends, cut at a line boundary to at most C{limit} bytes.
    """
    message = toCRLF(message)
    end = message.find(b"\r\n\r\n")
    header = message if end == -1 else message[: end + 2]
    if message.startswith(b"\r\n"):
        header = b""
    if len(header) > limit:
        cut = header.rfind(b"\r\n", 0, limit)
        header = header[: cut + 2] if cut != -1 else b""
    return header


def _addressType(address: Address) -> str:
    """
    The RFC 3464/6533 address-type and address text of C{address}.  A
    non-ASCII address is written as C{utf-8-addr-xtext} (RFC 6533 section
    3), the form allowed in C{message/delivery-status}: characters other
    than QCHAR become C{\\x{HEX}}.
    """
    text = str(address)
    if text.isascii():
        return "rfc822; " + text
    return "utf-8; " + "".join(c if _QCHAR.match(c) else "\\x{%02X}" % ord(c) for c in text)


def _diagnosticCode(diagnostic: str) -> str:
    """
    The C{Diagnostic-Code} value: type C{smtp} for a remote server's reply
    (it starts with a reply code), C{X-pop3gw} for this server's own text
    (expiry, DNS, an unsupported address).
    """
    text = oneLine(diagnostic)
    kind = "smtp" if _SMTP_REPLY.match(text) else "X-pop3gw"
    return f"{kind}; {text}"


def _status(status: str) -> str:
    """
    C{status} if it is a well-formed RFC 3463 code, else C{5.0.0}.
    """
    return status if _STATUS.match(status or "") else "5.0.0"


def makeBounce(
    reportingHost: str,
    sender: Address,
    failures: Sequence[Failure],
    originalHeaders: bytes,
    queueId: str,
    now: float,
    arrivalDate: Optional[float] = None,
    boundary: Optional[str] = None,
    messageId: Optional[str] = None,
    notice: Optional[Sequence[str]] = None,
) -> bytes:
    """
    Build one delivery status notification.

    @param reportingHost: this server's host name (C{Reporting-MTA} and the
        domain of C{MAILER-DAEMON@}).
    @param sender: the envelope sender of the failed message, who receives
        the notification; for a postmaster notice (C{notice}), the
        postmaster who receives it.
    @param failures: C{(recipient, status, diagnostic)} for each failed
        recipient: the recipient L{Address}, an RFC 3463 status such as
        C{"5.1.1"} and a diagnostic text (typically the remote reply, e.g.
        C{"550 5.1.1 no such user"}).
    @param originalHeaders: the original message's header (CRLF or LF line
        ends); see L{originalHeaders} to extract it.
    @param queueId: the queue id of the failed message, named in the text.
    @param now: the current time (POSIX seconds): the C{Date} header.
    @param arrivalDate: when the message was queued (C{Arrival-Date});
        omitted if C{None}.
    @param boundary: the MIME boundary; random if C{None} (tests fix it).
    @param messageId: the C{Message-ID} (with angle brackets); made from the
        queue id and random bits if C{None}.
    @param notice: if not C{None}, the report is a postmaster notice, the
        copy of a bounce that cannot be returned to the sender (Postfix's
        "double bounce"): the subject says so, and the text explains why
        with the lines of C{notice} (each made one line by L{oneLine}).
    @return: the message, with CRLF line ends.
    """
    host = oneLine(reportingHost, 255)
    if boundary is None:
        boundary = "=_report_" + os.urandom(12).hex()
    if messageId is None:
        messageId = f"<{queueId}.{os.urandom(6).hex()}.bounce@{host}>"

    header = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{sender}>",
        "Subject: " + ("Undelivered Mail Returned to Sender" if notice is None else "Postmaster Copy: Undelivered Mail"),
        f"Date: {email.utils.formatdate(now, usegmt=True)}",
        f"Message-ID: {messageId}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]

    if notice is None:
        explanation = [
            "Your message could not be delivered to one or more recipients.",
            "It has been returned to you with this report; the original",
            "header is attached.",
        ]
    else:
        explanation = [
            "A message could not be delivered to one or more recipients.",
            *(oneLine(line) for line in notice),
            "This report goes to you, the postmaster, instead; the original",
            "header is attached.",
        ]
    human = [
        f"This is the mail system at host {host}.",
        "",
        *explanation,
        "",
        f"Queue id: {oneLine(queueId, 100)}",
        "",
    ]
    for recipient, _, diagnostic in failures:
        human.append(f"<{recipient}>: {oneLine(diagnostic)}")

    perMessage = [f"Reporting-MTA: dns; {host}"]
    if arrivalDate is not None:
        perMessage.append(f"Arrival-Date: {email.utils.formatdate(arrivalDate, usegmt=True)}")
    status = []
    for recipient, code, diagnostic in failures:
        status.append("")
        status.append(f"Final-Recipient: {_addressType(recipient)}")
        status.append("Action: failed")
        status.append(f"Status: {_status(code)}")
        status.append(f"Diagnostic-Code: {_diagnosticCode(diagnostic)}")

    headers = originalHeaders
    headers = toCRLF(headers)
    headers = _BARE_CR.sub(b"\r\n", headers)
    if headers and not headers.endswith(b"\r\n"):
        headers += b"\r\n"
    headers = re.sub(rb"(\r\n){2,}", b"\r\n", headers).lstrip(b"\r\n")
    encoding = "7bit" if headers.isascii() else "8bit"

    lines = header + [
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
    ] + human + [
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
    ] + perMessage + status + [
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        f"Content-Transfer-Encoding: {encoding}",
        "",
    ]
    out = "\r\n".join(lines).encode("utf-8") + b"\r\n" + headers
    out += f"\r\n--{boundary}--\r\n".encode("ascii")
    return out
