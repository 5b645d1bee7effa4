# -*- test-case-name: tests.test_smtpmx -*-
"""
The MX listener: SMTP from the world (RFC 5321) for the local domains.

It is the shared L{pop3gw.smtp.SMTPServer} (the line core, the command
dispatch, EHLO/HELO, STARTTLS, the syntax of MAIL and RCPT, and the one
DATA reader of L{pop3gw.smtpdata} with its smuggling, bare CR, NUL, line
length and size rules) with its own command table and policy:

  - No AUTH: it is neither offered nor known (C{500 5.5.2}).  MAIL is
    accepted once the client has said HELO/EHLO.
  - Any syntactically valid sender is accepted, the null reverse path
    C{<>} included (bounces must reach the users), and one at an address
    literal (C{a@[192.0.2.1]}, C{a@[IPv6:2001:db8::1]}, RFC 5321 4.1.3:
    its SPF result is C{none}, RFC 7208 4.3); a malformed one gets
    C{553 5.1.7}.  There is no ownership check: the world's senders are not
    our users.
  - A recipient is accepted only if the router resolves it to a local user
    (L{IMailRouter.checkLocalRecipient}: users, aliases and whatever else
    the users directory resolves).  An unknown user of a local domain gets
    C{550 5.1.1}; anything else gets C{550 5.7.1 Relay access denied},
    however it is dressed up: an address that does not parse as a plain
    C{local@domain} (quoted local parts, source routes, several C{@}), a
    local part holding C{%} (the percent hack) or C{!} (a bang path), a
    domain written with a trailing dot, a domain that is not local in any
    case.  C{<Postmaster>} without a domain (RFC 5321 4.5.1) is
    C{postmaster@} the local domain the server's host name is in.
  - The message goes to L{IMailRouter.beginLocalDelivery}: the maildrops
    only.  Nothing received here is ever queued for relay.
  - At the end of the data, the factory's L{InboundChecker} (if any)
    checks SPF, DKIM and DMARC (and asks rspamd) before anything is
    stored: the message is held by a L{CheckedDelivery} until then, and
    refused (C{550 5.7.1}, C{451}) or stored with an
    C{Authentication-Results:} field on top (L{pop3gw.inbound}).
  - The message is stored as received, after one C{Received:} field: no
    C{Message-ID:}/C{Date:}/C{From:} is added (those fix-ups are
    submission's, RFC 6409).
  - The C{Received:} field names the HELO/EHLO argument, the client's
    reverse DNS name and address, the TLS version and cipher when TLS is
    on, and C{with SMTP}, C{ESMTP} or C{ESMTPS} (RFC 3848).  The reverse
    name is looked up when the connection is made, through the factory's
    resolver, for at most L{REVERSE_LOOKUP_TIMEOUT} seconds; nothing waits
    for it: a lookup that failed, timed out or has not answered by DATA
    gives C{unknown}.

CHUNKING (BDAT) is offered, through the same reader and rules
(L{pop3gw.smtpdata}).  SMTPUTF8 is offered (RFC 6531): with the
parameter on MAIL, UTF-8 local parts and internationalised domains (local
ones matched in their A-label form, as L{pop3gw.address} keeps them) are
accepted and UTF-8 header fields stored unchanged; without it a non-ASCII
path gets C{553 5.6.7}.

Log lines (L{pop3gw.events}), one per refused recipient, one per checked
message and one per accepted message::

    mx: refused recipient rhost=192.0.2.7 from="a@b.example" to="x@remote.example" reply="550 5.7.1 Relay access denied" reason="relay denied"
    mx: checked rhost=192.0.2.7 from="a@b.example" spf=pass dkim=pass dmarc=pass action=deliver
    mx: accepted id=<id> rhost=192.0.2.7 from="a@b.example" recipients=2 size=1234 tls=TLSv1.3

Neither is an authentication failure: the fail2ban filter does not match
them.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Any, Optional

import attr
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from pop3gw import events
from pop3gw.address import Address, AddressError, isDisguisedRelay, parseReversePath
from pop3gw.inbound import CheckedDelivery, InboundChecker, Session
from pop3gw.interfaces import IDelivery, IRoutedDelivery
from pop3gw.smtp import _COMMON_COMMANDS, SMTPServer, commandTables
from pop3gw.smtpdata import _SAFE_HELO, DataCommands, formatDate
from pop3gw.smtpreplies import (
    BAD_SENDER_ADDRESS,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_RECIPIENTS,
    NEED_MAIL,
    NESTED_MAIL,
    POSTMASTER,
    SEND_HELO_FIRST,
    Reply,
    SMTPRefusal,
    _State,
)
from pop3gw.wire import DEFAULT_MAX_MESSAGE_SIZE

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from pop3gw.interfaces import IMailRouter

__all__ = ["MXFactory", "MXServer", "RELAY_DENIED", "REVERSE_LOOKUP_TIMEOUT"]

#: Seconds the reverse DNS lookup of a client may take.
REVERSE_LOOKUP_TIMEOUT = 10.0

SERVICE = "mx"

RELAY_DENIED = Reply(550, "5.7.1 Relay access denied")
MX_HELP = Reply(214, "2.0.0 pop3gw MX, see RFC 5321")

#: What a reverse DNS name must look like to be written in a C{Received:}
#: field.
_HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9\-_]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9\-_]*[A-Za-z0-9])?)*$")


def _addressLiteral(host: str) -> str:
    """
    C{host} as an RFC 5321 address literal (C{[192.0.2.7]},
    C{[IPv6:2001:db8::1]}), or C{host} itself if it is not an address.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return _SAFE_HELO.sub("_", host)
    return f"[IPv6:{ip.compressed}]" if ip.version == 6 else f"[{ip}]"


def _tlsDescription(transport: Any) -> str:
    """
    The TLS version and cipher of C{transport}'s connection, e.g.
    C{"TLSv1.3 with cipher TLS_AES_256_GCM_SHA384"}, or C{""} when they
    cannot be read.
    """
    try:
        connection = transport.getHandle()
        version = connection.get_protocol_version_name()
        cipher = connection.get_cipher_name()
    except Exception:
        return ""
    if not isinstance(version, str) or not isinstance(cipher, str):
        return ""
    return f"{_SAFE_HELO.sub('_', version)} with cipher {_SAFE_HELO.sub('_', cipher)}"


class MXServer(SMTPServer):
    """
    One SMTP session from the world.  Built by L{MXFactory}; see the module
    docstring for the policy.
    """

    if TYPE_CHECKING:
        factory: MXFactory

    service = SERVICE
    helpReply = MX_HELP
    recipientRefused = RELAY_DENIED

    _reverseName: Optional[str] = None
    _lookup: Optional[Deferred] = None
    _lookupTimeout: Optional[IDelayedCall] = None

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        """
        Greet the client and start looking up its reverse DNS name.
        """
        super().connectionMade()
        self._startReverseLookup()

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        """
        End the session and any lookup still running.
        """
        super().connectionLost(reason)
        self._stopReverseLookup()

    def _startReverseLookup(self) -> None:
        resolver = self.factory.resolver
        try:
            name = ipaddress.ip_address(self.peer).reverse_pointer
        except ValueError:
            return
        if resolver is None:
            return
        d = resolver.lookupPointer(name)
        self._lookup = d
        self._lookupTimeout = self.clock.callLater(self.factory.reverseLookupTimeout, d.cancel)
        d.addCallbacks(self._cbReverse, self._ebReverse)

    def _stopReverseLookup(self) -> None:
        timeout, self._lookupTimeout = self._lookupTimeout, None
        if timeout is not None and timeout.active():
            timeout.cancel()
        lookup, self._lookup = self._lookup, None
        if lookup is not None:
            lookup.cancel()

    def _cbReverse(self, result: Any) -> None:
        self._lookup = None
        self._stopReverseLookup()
        answers = result[0] if isinstance(result, tuple) and result else []
        for rr in answers:
            name = getattr(getattr(getattr(rr, "payload", None), "name", None), "name", None)
            if isinstance(name, bytes):
                text = name.decode("ascii", "replace").rstrip(".")
                if _HOST_NAME.match(text) and len(text) <= 253:
                    self._reverseName = text.lower()
                    return

    def _ebReverse(self, failure: Failure) -> None:
        # No name (NXDOMAIN, SERVFAIL, timeout): "unknown", as Postfix says.
        self._lookup = None
        self._stopReverseLookup()

    # -- policy ----------------------------------------------------------

    def _readyState(self) -> _State:
        return _State.AUTHENTICATED

    def _checkSender(self, path: str) -> Optional[Address]:
        if path == "":
            return None
        try:
            return parseReversePath(path)
        except AddressError:
            raise SMTPRefusal(BAD_SENDER_ADDRESS) from None

    def _recipientAddress(self, path: str) -> Address:
        if path.lower() == POSTMASTER:
            postmaster = self._postmaster()
            if postmaster is not None:
                return postmaster
        try:
            if isDisguisedRelay(path):
                raise AddressError(path)
            return Address.parse(path)
        except AddressError:
            raise SMTPRefusal(self._refusedRecipient(None, path, RELAY_DENIED, "relay denied")) from None

    def _postmaster(self) -> Optional[Address]:
        """
        The address C{<Postmaster>} without a domain stands for (RFC 5321
        4.5.1): C{postmaster@} the local domain the server's host name is
        in (itself or the nearest parent, C{example.org} for
        C{mail.example.org}); else the C{[pop3gw] postmaster} user; else
        C{None} (refused; start-up warns when no postmaster is set).
        """
        labels = self.factory.hostname.lower().rstrip(".").split(".")
        for i in range(len(labels) - 1):
            domain = ".".join(labels[i:])
            if self.factory.router.isLocalDomain(domain):
                return Address(POSTMASTER, domain)
        return self.factory.postmaster

    def _checkRecipient(self, address: Address) -> Any:
        return self.factory.router.checkLocalRecipient(address)

    def _refusedRecipient(self, address: Optional[Address], path: str, reply: Reply, reason: str) -> Reply:
        sender = self._envelope.sender
        events.recipientRefused(
            self.log,
            self.service,
            self.peer,
            "" if sender is None else str(sender),
            path,
            f"{reply.code} {reply.text}",
            reason,
        )
        return reply

    # -- data ------------------------------------------------------------

    def _beginDelivery(self, sender: Optional[Address], recipients: list[Address]) -> IDelivery:
        delivery = self.factory.router.beginLocalDelivery(sender, recipients)
        checker = self.factory.checker
        if checker is None:
            return delivery
        session = Session(
            self.peer,
            self._helo or "",
            None if sender is None else str(sender),
            tuple(str(r) for r in recipients),
            self._reverseName,
        )
        return CheckedDelivery(delivery, checker, session, self.log)

    def _logIdentity(self) -> tuple[str, dict[str, str]]:
        return "rhost={peer}", {"peer": self.peer}

    def _tlsVersion(self) -> str:
        if not self.secure:
            return "no"
        description = _tlsDescription(self.transport)
        return description.split(" ", 1)[0] if description else "yes"

    def _logAccepted(self, queueID: str, size: int, sender: Optional[Address], delivery: IDelivery) -> None:
        self.log.info(
            "mx: accepted id={queueID} rhost={peer} from={sender} recipients={recipients} size={size} tls={tls}",
            queueID=queueID,
            peer=self.peer,
            sender=events.sanitize("" if sender is None else str(sender)),
            recipients=len(IRoutedDelivery(delivery).localRecipients),
            size=size,
            tls=self._tlsVersion(),
        )

    def _receivedHeader(self) -> bytes:
        """
        The trace field (RFC 5321 4.4), folded::

            Received: from client.example (mx.client.example [192.0.2.7])
            	(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)
            	by mail.example.org (pop3gw) with ESMTPS id 0123456789ABCDEF;
            	Tue, 14 Nov 2023 22:13:20 +0000
        """
        helo = _SAFE_HELO.sub("_", self._helo or "unknown")
        reverse = self._reverseName or "unknown"
        # RFC 3848 and, with SMTPUTF8, RFC 6531 3.7.3.
        if self._envelope.smtputf8:
            protocol = "UTF8SMTP"
        else:
            protocol = "ESMTP" if self._esmtp else "SMTP"
        protocol += "S" if self.secure else ""
        lines = [f"Received: from {helo} ({reverse} {_addressLiteral(self.peer)})"]
        if self.secure:
            description = _tlsDescription(self.transport)
            if description:
                lines.append(f"\t(using {description})")
        lines.append(f"\tby {self.factory.hostname} (pop3gw) with {protocol} id {self._envelope.messageId};")
        lines.append(f"\t{formatDate(self.factory.clock.seconds())}")
        return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")

    # -- command table ---------------------------------------------------

    _tables, _knownCommands, _wrongState = commandTables(
        {
            _State.FRESH: {**_COMMON_COMMANDS, "STARTTLS": SMTPServer.do_STARTTLS},
            _State.AUTHENTICATED: {**_COMMON_COMMANDS, "STARTTLS": SMTPServer.do_STARTTLS, "MAIL": SMTPServer.do_MAIL},
            _State.MAIL: {
                **_COMMON_COMMANDS,
                "RCPT": SMTPServer.do_RCPT,
                "DATA": DataCommands.do_DATA,
                "BDAT": DataCommands.do_BDAT,
            },
        },
        {
            _State.FRESH: {
                "MAIL": SEND_HELO_FIRST,
                "RCPT": SEND_HELO_FIRST,
                "DATA": SEND_HELO_FIRST,
                "BDAT": SEND_HELO_FIRST,
            },
            _State.AUTHENTICATED: {"RCPT": NEED_MAIL, "DATA": NEED_MAIL, "BDAT": NEED_MAIL},
            _State.MAIL: {"MAIL": NESTED_MAIL},
        },
    )


if TYPE_CHECKING:
    _Factory = Factory[MXServer]
else:
    _Factory = Factory


@attr.s(auto_attribs=True, eq=False)
class MXFactory(_Factory):
    """
    Builds L{MXServer}s.

    @ivar router: the L{IMailRouter} whose local-only entry points
        (C{checkLocalRecipient}, C{beginLocalDelivery}) take the mail.
    @ivar clock: an C{IReactorTime} for the timers and the C{Received:}
        date.
    @ivar hostname: the server's name in the greeting, EHLO and headers.
    @ivar maxMessageSize: the SIZE limit in octets.
    @ivar tlsContextFactory: passed to C{transport.startTLS}; C{None} means
        STARTTLS is not offered.
    @ivar maxRecipients: recipients per message.
    @ivar idleTimeout: seconds of client silence before C{421} and close.
    @ivar resolver: a C{twisted.internet.interfaces.IResolver} (its
        C{lookupPointer}) for the clients' reverse names, or C{None} for
        none.
    @ivar reverseLookupTimeout: seconds a reverse lookup may take.
    @ivar postmaster: the C{[pop3gw] postmaster} user, who receives
        C{<Postmaster>} when the host name is in no local domain.
    @ivar checker: the L{InboundChecker} every message goes through at the
        end of its data (SPF, DKIM, DMARC, rspamd), or C{None} for none.
    """

    router: IMailRouter
    clock: IReactorTime
    hostname: str
    maxMessageSize: int = DEFAULT_MAX_MESSAGE_SIZE
    tlsContextFactory: object = None
    maxRecipients: int = DEFAULT_MAX_RECIPIENTS
    idleTimeout: float = DEFAULT_IDLE_TIMEOUT
    resolver: Any = None
    reverseLookupTimeout: float = REVERSE_LOOKUP_TIMEOUT
    postmaster: Optional[Address] = None
    checker: Optional[InboundChecker] = None

    def buildProtocol(self, addr) -> MXServer:
        """
        @return: a new L{MXServer}.
        """
        return MXServer(self)
