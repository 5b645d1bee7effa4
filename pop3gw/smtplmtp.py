# -*- test-case-name: tests.test_smtplmtp -*-
"""
The LMTP listener (RFC 2033): local delivery for an MTA in front.

It is the MX listener's policy (L{pop3gw.smtpmx}: no AUTH, any sender,
recipients only through the router's local-only entry points, relay
disguises refused, the message stored as received after one C{Received:}
field, nothing ever queued for relay) on the same SMTP core and DATA
reader, with what RFC 2033 changes:

  - The greeting says C{LMTP}; C{LHLO} replaces HELO and EHLO, which are
    unknown commands (C{500 5.5.2}).  LHLO answers as EHLO does
    (PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES, CHUNKING, SMTPUTF8).  STARTTLS is not
    offered: LMTP runs on a Unix socket or a trusted network.
  - An unknown local user is refused at RCPT with C{550 5.1.1}.
  - After the end of the data there is one reply per accepted RCPT, in
    RCPT order.  Each RCPT is its own delivery (its users, those of a
    list alias included, get their copies in one commit), so a maildrop
    that fails gives that recipient its own C{452 4.3.1} (full) or C{451
    4.3.0} while the others get C{250}.  A user named by two RCPTs gets
    one copy, and both RCPTs get the outcome of that copy.  A message
    refused as a whole (size, bare CR, NUL, line length) gets the same
    refusal once per recipient.  DATA with no accepted RCPT is C{503}.
  - With BDAT (RFC 3030), the per-recipient replies answer C{BDAT ...
    LAST}; each earlier chunk gets one reply.
  - The C{Received:} field says C{with UTF8LMTP} for a message received
    with SMTPUTF8 (RFC 6531 3.7.3).
  - XFORWARD (Postfix's C{lmtp_send_xforward_command = yes}, see its
    XFORWARD_README) is offered and accepted outside a transaction: its
    attributes (xtext, at most 255 octets each, C{[UNAVAILABLE]} and
    C{[TEMPUNAVAIL]} clearing one) name the client the front MTA
    received the message from, and hold for the next transaction only.
    The LMTP client is trusted by construction (a Unix socket or a
    trusted network), so they are taken as said once they are well
    formed: C{ADDR} an IP address (C{IPV6:} prefix allowed), C{PORT} a
    port number, C{SOURCE} C{LOCAL} or C{REMOTE}, the others printable
    ASCII without spaces.  A bad one gets C{501 5.5.4} and changes
    nothing.
  - With C{[inbound] lmtp-checks = yes} (the factory's C{checker}), a
    message whose topmost C{Authentication-Results:} field does not name
    a trusted front MTA (C{trusted-authserv-ids}) goes through the checks
    of C{--mx} (L{pop3gw.inbound}), with XFORWARD's C{ADDR} and C{HELO} as
    the client (no C{ADDR}: SPF C{none}, DMARC on DKIM alone); a refusal
    is sent once per recipient.  A DMARC p=reject failure is quarantined
    unless C{lmtp-dmarc-reject = yes}.

Log lines::

    lmtp: refused recipient rhost=unix from="a@b.example" to="x@example.org" reply="550 5.1.1 ..." reason="unknown user"
    lmtp: accepted id=<id> rhost=unix from="a@b.example" recipients=2 size=1234 failed=0

(only when at least one recipient has its copy), and one per recipient
whose maildrop failed::

    lmtp: refused recipient message id=<id> rhost=unix from="a@b.example" to="bob@example.org" reply="452 4.3.1 ..." error="..."
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Any, Optional

import attr
from twisted.internet.defer import Deferred, DeferredList
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3gw import events
from pop3gw.address import Address
from pop3gw.inbound import CheckedDelivery, Session
from pop3gw.interfaces import IDelivery, TemporaryFailure
from pop3gw.smtp import SMTPServer, commandTables
from pop3gw.smtpdata import _SAFE_HELO, DataCommands, formatDate
from pop3gw.smtpmx import MXFactory, MXServer, _addressLiteral
from pop3gw.smtpreplies import (
    NEED_MAIL,
    NESTED_MAIL,
    TEMPORARY_FAILURE,
    Reply,
    SMTPRefusal,
    _State,
    temporaryReply,
)

__all__ = ["LMTPFactory", "LMTPServer"]

SERVICE = "lmtp"

LMTP_HELP = Reply(214, "2.0.0 pop3gw LMTP, see RFC 2033")
SEND_LHLO_FIRST = Reply(503, "5.5.1 Send LHLO first")
NO_VALID_RECIPIENTS = Reply(503, "5.5.1 No valid recipients")
XFORWARD_OK = Reply(250, "2.0.0 Ok")
XFORWARD_SYNTAX = Reply(501, "5.5.4 Syntax: XFORWARD attribute=value...")
XFORWARD_BAD_NAME = Reply(501, "5.5.4 Bad XFORWARD attribute name")
XFORWARD_BAD_VALUE = Reply(501, "5.5.4 Bad XFORWARD attribute value")
XFORWARD_IN_TRANSACTION = Reply(503, "5.5.1 Error: MAIL transaction in progress")

#: The XFORWARD attributes taken, in the order the LHLO reply names them.
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
#: Octets of one XFORWARD value, decoded (Postfix's own limit).
MAX_XFORWARD_VALUE = 255
_XFORWARD_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")
_XTEXT = re.compile(r"\+([0-9A-F]{2})")
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")


class XForwardError(Exception):
    """
    An XFORWARD command that cannot be taken; C{args[0]} is its reply.
    """


def _xtextDecode(value: str) -> str:
    """
    Decode RFC 3461's xtext (C{+XX} hexadecimal escapes).

    @raise XForwardError: a C{+} not followed by two upper-case hex
        digits.
    """
    if value.count("+") != len(_XTEXT.findall(value)):
        raise XForwardError(XFORWARD_BAD_VALUE)
    return _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), value)


def _xforwardValue(name: str, value: str) -> Optional[str]:
    """
    Check one decoded XFORWARD value.

    @return: the value to keep (C{ADDR} without its C{IPV6:} prefix), or
        C{None} when the front MTA says it is unavailable.
    @raise XForwardError: it is not well formed.
    """
    if value in _XFORWARD_UNAVAILABLE:
        return None
    if not value or len(value) > MAX_XFORWARD_VALUE or not _PRINTABLE.match(value):
        raise XForwardError(XFORWARD_BAD_VALUE)
    if name == "ADDR":
        if value[:5].upper() == "IPV6:":
            value = value[5:]
        try:
            return ipaddress.ip_address(value).compressed
        except ValueError:
            raise XForwardError(XFORWARD_BAD_VALUE) from None
    if name == "PORT" and not (value.isdigit() and len(value) <= 5 and int(value) <= 65535):
        raise XForwardError(XFORWARD_BAD_VALUE)
    if name == "SOURCE" and value.upper() not in ("LOCAL", "REMOTE"):
        raise XForwardError(XFORWARD_BAD_VALUE)
    return value


def parseXForward(argument: str) -> dict[str, Optional[str]]:
    """
    The attributes of an XFORWARD command's argument (RFC-less: Postfix's
    XFORWARD_README): C{name=value} pairs, names in any case, values in
    xtext.

    @return: attribute name (upper case) -> value, or C{None} to forget it.
    @raise XForwardError: the argument is not well formed (nothing taken).
    """
    pairs = argument.split()
    if not pairs:
        raise XForwardError(XFORWARD_SYNTAX)
    attributes: dict[str, Optional[str]] = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise XForwardError(XFORWARD_SYNTAX)
        name = name.upper()
        if name not in XFORWARD_ATTRIBUTES:
            raise XForwardError(XFORWARD_BAD_NAME)
        attributes[name] = _xforwardValue(name, _xtextDecode(value))
    return attributes


@implementer(IDelivery)
class _PerRecipientDelivery:
    """
    One message delivered as one L{IDelivery} per RCPT: every write goes to
    each part; the commit commits each part on its own and never fails: it
    fires with one C{Failure} or C{None} per part.

    @ivar parts: the deliveries, one per RCPT that named a user no earlier
        RCPT named.
    @ivar outcomes: per RCPT, the indices of the parts holding its users.
    @ivar rcpts: per RCPT, its users.
    """

    def __init__(self, parts: list[IDelivery], outcomes: list[list[int]], rcpts: list[tuple[Address, ...]]) -> None:
        self.parts = parts
        self.rcpts = rcpts
        self.outcomes = outcomes
        self._failures: list[Optional[Failure]] = [None] * len(parts)

    def write(self, data: bytes) -> None:
        """
        Write C{data} to every part still open.  A part that fails with a
        L{TemporaryFailure} is aborted and keeps its failure for its
        recipients; only when every part has failed is the failure raised.
        """
        last: Optional[TemporaryFailure] = None
        for i, part in enumerate(self.parts):
            if self._failures[i] is not None:
                continue
            try:
                part.write(data)
            except TemporaryFailure as e:
                self._failures[i] = Failure(e)
                part.abort()
                last = e
        if last is not None and all(f is not None for f in self._failures):
            raise last

    def commit(self) -> Deferred:
        """
        Commit every part still open.

        @return: a C{Deferred} firing with the list of outcomes, one per
            part: C{None} (durable) or a C{Failure}.
        """
        ds = []
        for i, part in enumerate(self.parts):
            failure = self._failures[i]
            if failure is not None:
                ds.append(_failed(failure))
            else:
                ds.append(_commitPart(part))
        d = DeferredList(ds, consumeErrors=True)
        d.addCallback(lambda results: [None if ok else value for ok, value in results])
        return d

    def abort(self) -> None:
        """
        Discard the message in every part.
        """
        for part in self.parts:
            part.abort()


def _failed(failure: Failure) -> Deferred:
    d: Deferred = Deferred()
    d.errback(failure)
    return d


def _commitPart(part: IDelivery) -> Deferred:
    try:
        d = part.commit()
    except Exception:
        return _failed(Failure())
    return d


class LMTPServer(MXServer):
    """
    One LMTP session.  Built by L{LMTPFactory}; see the module docstring
    for the policy.
    """

    if TYPE_CHECKING:
        factory: LMTPFactory

    service = SERVICE
    helpReply = LMTP_HELP
    greetingProtocol = "LMTP"

    #: Per accepted RCPT of the current transaction, its users.
    _rcpts: list[tuple[Address, ...]]
    #: The XFORWARD attributes for the next transaction.
    _xforward: dict[str, str]

    def connectionMade(self) -> None:
        self._rcpts = []
        self._xforward = {}
        super().connectionMade()

    def _resetTransaction(self) -> None:
        super()._resetTransaction()
        self._rcpts = []
        self._xforward = {}

    def do_XFORWARD(self, argument: str) -> None:
        """
        Take the original client's attributes for the next transaction
        (see the module docstring).
        """
        try:
            attributes = parseXForward(argument)
        except XForwardError as e:
            raise SMTPRefusal(e.args[0]) from None
        for name, value in attributes.items():
            if value is None:
                self._xforward.pop(name, None)
            else:
                self._xforward[name] = value
        self._send(XFORWARD_OK)

    def _startReverseLookup(self) -> None:
        # An MTA in front, often on a Unix socket: no reverse name.
        return

    def _extensions(self) -> list[str]:
        return ["XFORWARD " + " ".join(XFORWARD_ATTRIBUTES)]

    def do_LHLO(self, argument: str) -> None:
        self.do_EHLO(argument)

    def _cbRecipient(self, users: tuple[Address, ...]) -> None:
        if self._state is _State.MAIL:
            self._rcpts.append(tuple(users))
        super()._cbRecipient(users)

    def _beginDelivery(self, sender: Optional[Address], recipients: list[Address]) -> IDelivery:
        parts: list[IDelivery] = []
        outcomes: list[list[int]] = []
        owner: dict[Address, int] = {}
        try:
            for users in self._rcpts:
                fresh = [u for u in dict.fromkeys(users) if u not in owner]
                if fresh:
                    parts.append(self.factory.router.beginLocalDelivery(sender, fresh))
                    for u in fresh:
                        owner[u] = len(parts) - 1
                outcomes.append(sorted({owner[u] for u in users}))
        except BaseException:
            for part in parts:
                part.abort()
            raise
        delivery = _PerRecipientDelivery(parts, outcomes, list(self._rcpts))
        checker = self.factory.checker
        if checker is None:
            return delivery
        session = Session(
            self._xforward.get("ADDR", ""),
            self._xforward.get("HELO", ""),
            None if sender is None else str(sender),
            tuple(str(r) for r in recipients),
        )
        return CheckedDelivery(delivery, checker, session, self.log, SERVICE, behindMTA=True, peer=self.peer)

    def _sendDataReply(self, reply: Reply, delivery: IDelivery) -> None:
        if isinstance(delivery, CheckedDelivery):
            delivery = delivery.delivery
        count = len(delivery.outcomes) if isinstance(delivery, _PerRecipientDelivery) else 1
        for _ in range(count):
            self._send(reply)

    def _cbCommitted(
        self, results: Any, queueID: str, size: int, sender: Optional[Address], delivery: IDelivery
    ) -> None:
        """
        Each part is durable or failed: one reply per RCPT, in RCPT order.
        """
        if isinstance(delivery, CheckedDelivery):
            delivery = delivery.delivery
        assert isinstance(delivery, _PerRecipientDelivery), "LMTP delivers per recipient"
        replies = []
        failed = 0
        for users, indices in zip(delivery.rcpts, delivery.outcomes):
            failure = next((results[i] for i in indices if results[i] is not None), None)
            if failure is None:
                replies.append(Reply(250, f"2.0.0 OK queued as {queueID}"))
                continue
            failed += 1
            if failure.check(TemporaryFailure):
                reply = temporaryReply(failure.value)
                error = str(failure.value)
            else:
                self.log.failure("lmtp: commit failed", failure)
                reply, error = TEMPORARY_FAILURE, "internal error"
            self.log.warn(
                "lmtp: refused recipient message id={queueID} rhost={peer} from={sender} to={to} reply={reply} error={error}",
                queueID=queueID,
                peer=self.peer,
                sender=events.sanitize("" if sender is None else str(sender)),
                to=events.sanitize(", ".join(str(u) for u in users)),
                reply=events.sanitize(f"{reply.code} {reply.text}"),
                error=events.sanitize(error, events.MAX_LOGGED_REPLY),
            )
            replies.append(reply)
        if failed == len(replies):
            for reply in replies:
                self._send(reply)
            return
        self._messages += 1
        self._bytes += size
        self.log.info(
            "lmtp: accepted id={queueID} rhost={peer} from={sender} recipients={recipients} size={size} failed={failed}",
            queueID=queueID,
            peer=self.peer,
            sender=events.sanitize("" if sender is None else str(sender)),
            recipients=len(replies) - failed,
            size=size,
            failed=failed,
        )
        for reply in replies:
            self._send(reply)

    def do_DATA(self, argument: str) -> None:
        """
        DATA, but with no accepted RCPT it fails with 503 (RFC 2033 4.2).
        """
        if not argument and not self._envelope.recipients:
            raise SMTPRefusal(NO_VALID_RECIPIENTS)
        DataCommands.do_DATA(self, argument)

    def _receivedHeader(self) -> bytes:
        """
        The trace field (RFC 5321 4.4)::

            Received: from mta.example.org (unix)
            	by mail.example.org (pop3gw) with LMTP id 0123456789ABCDEF;
            	Tue, 14 Nov 2023 22:13:20 +0000
        """
        helo = _SAFE_HELO.sub("_", self._helo or "unknown")
        lines = [
            f"Received: from {helo} ({_addressLiteral(self.peer)})",
            f"\tby {self.factory.hostname} (pop3gw) with {'UTF8LMTP' if self._envelope.smtputf8 else 'LMTP'}"
            f" id {self._envelope.messageId};",
            f"\t{formatDate(self.factory.clock.seconds())}",
        ]
        return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")

    _COMMANDS = {
        "LHLO": do_LHLO,
        "NOOP": SMTPServer.do_NOOP,
        "RSET": SMTPServer.do_RSET,
        "QUIT": SMTPServer.do_QUIT,
        "VRFY": SMTPServer.do_VRFY,
        "HELP": SMTPServer.do_HELP,
    }

    _tables, _knownCommands, _wrongState = commandTables(
        {
            _State.FRESH: _COMMANDS,
            _State.AUTHENTICATED: {**_COMMANDS, "MAIL": SMTPServer.do_MAIL, "XFORWARD": do_XFORWARD},
            _State.MAIL: {**_COMMANDS, "RCPT": SMTPServer.do_RCPT, "DATA": do_DATA, "BDAT": DataCommands.do_BDAT},
        },
        {
            _State.FRESH: {
                "MAIL": SEND_LHLO_FIRST,
                "RCPT": SEND_LHLO_FIRST,
                "DATA": SEND_LHLO_FIRST,
                "BDAT": SEND_LHLO_FIRST,
                "XFORWARD": SEND_LHLO_FIRST,
            },
            _State.AUTHENTICATED: {"RCPT": NEED_MAIL, "DATA": NEED_MAIL, "BDAT": NEED_MAIL},
            _State.MAIL: {"MAIL": NESTED_MAIL, "XFORWARD": XFORWARD_IN_TRANSACTION},
        },
    )


@attr.s(auto_attribs=True, eq=False)
class LMTPFactory(MXFactory):
    """
    Builds L{LMTPServer}s.  The attributes are L{MXFactory}'s; C{resolver}
    and C{tlsContextFactory} are not used, and C{checker} (given only with
    C{lmtp-checks = yes}) checks the messages no trusted front MTA
    checked.
    """

    def buildProtocol(self, addr) -> LMTPServer:
        """
        @return: a new L{LMTPServer}.
        """
        return LMTPServer(self)
