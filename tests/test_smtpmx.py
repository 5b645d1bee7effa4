"""
Tests for L{pop3gw.smtpmx}: the MX listener, over L{StringTransport} with a
L{task.Clock} and the fakes of L{pop3gw.testing}.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pop3gw import inbound, mailauth, smtpmx
from pop3gw.address import Address
from pop3gw.runner import ImmediateRunner
from pop3gw.testing import FakeRouter, FakeUserDatabase
from tests.test_smtp import queuedReply

HOST = "mail.example.org"
ALICE = Address.parse("alice@example.org")
BOB = Address.parse("bob@example.org")
ALIAS = Address.parse("info@example.org")
NOW = 1700000000.0
NOW_TEXT = b"Tue, 14 Nov 2023 22:13:20 +0000"
PEER = IPv4Address("TCP", "192.0.2.7", 40000)

GREETING = b"220 mail.example.org ESMTP ready\r\n"
EHLO_REPLY = (
    b"250-mail.example.org\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 41943040\r\n"
    b"250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-CHUNKING\r\n"
    b"250 SMTPUTF8\r\n"
)
EHLO_TLS_REPLY = EHLO_REPLY.replace(b"250 SMTPUTF8", b"250-SMTPUTF8") + b"250 STARTTLS\r\n"
SENDER_OK = b"250 2.1.0 OK\r\n"
RCPT_OK = b"250 2.1.5 OK\r\n"
START_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = b"250 2.0.0 OK queued as ID\r\n"
RELAY_DENIED = b"550 5.7.1 Relay access denied\r\n"
USER_UNKNOWN = b"550 5.1.1 Recipient address rejected: user unknown\r\n"
MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


class FakeTLSConnection:
    """
    What C{getHandle()} gives on a TLS transport: its version and cipher.
    """

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_cipher_name(self) -> str:
        return "TLS_AES_256_GCM_SHA384"


class STARTTLSTransport(StringTransport):
    """
    A L{StringTransport} that records C{startTLS} calls and then has a TLS
    handle.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tlsStarted: list = []

    def startTLS(self, contextFactory) -> None:
        self.tlsStarted.append(contextFactory)

    def getHandle(self) -> FakeTLSConnection:
        assert self.tlsStarted, "no TLS yet"
        return FakeTLSConnection()


@implementer(ISSLTransport)
class SecureTransport(StringTransport):
    """
    A L{StringTransport} over TLS from the start.
    """

    def getPeerCertificate(self):
        return None

    def getHandle(self) -> FakeTLSConnection:
        return FakeTLSConnection()


class FakeResolver:
    """
    An C{IResolver} whose PTR lookups wait for the test to answer.
    """

    def __init__(self) -> None:
        self.lookups: list[tuple[str, defer.Deferred]] = []

    def lookupPointer(self, name: str, timeout=None) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.lookups.append((name, d))
        return d

    def answer(self, host: bytes) -> None:
        name, d = self.lookups[-1]
        rr = dns.RRHeader(name=name.encode(), type=dns.PTR, payload=dns.Record_PTR(host))
        d.callback(([rr], [], []))


class NoRelayRouter(FakeRouter):
    """
    A L{FakeRouter} whose routes to the outbound queue fail the test if
    they are ever taken.
    """

    def checkRecipient(self, address):
        raise AssertionError("the MX listener asked the relaying router")

    def beginDelivery(self, sender, recipients, trace=b""):
        raise AssertionError("the MX listener began a relaying delivery")


class MXSessionMixin:
    """
    Builds an MX server over a L{StringTransport}.
    """

    def setUp(self) -> None:
        self.users = FakeUserDatabase({ALICE: "x", BOB: "x"}, aliases={ALIAS: ALICE})
        self.router = NoRelayRouter(domains=("example.org",), users=self.users)
        self.router.queue.beginDelivery = self.queueUsed
        self.store = self.router.store
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.resolver = FakeResolver()

    def queueUsed(self, *args, **kwargs):
        raise AssertionError("the MX listener used the outbound queue")

    def connect(self, transport=None, **kwargs):
        """
        Build a factory with C{kwargs} and connect a protocol from
        192.0.2.7; the greeting is checked and cleared.
        """
        kwargs.setdefault("resolver", self.resolver)
        self.factory = smtpmx.MXFactory(self.router, self.clock, HOST, **kwargs)
        self.proto = self.factory.buildProtocol(None)
        self.transport = transport if transport is not None else StringTransport(peerAddress=PEER)
        self.proto.makeConnection(self.transport)
        self.assertEqual(self.transport.value(), GREETING)
        self.transport.clear()
        return self.proto

    def feed(self, data: bytes) -> bytes:
        """
        Send C{data} in one segment and return (and clear) the output.
        """
        self.proto.dataReceived(data)
        out = self.transport.value()
        self.transport.clear()
        return out

    def stored(self, address=BOB) -> list:
        """
        The messages in C{address}'s maildrop, whole.
        """
        return [data for _uid, data in self.store.boxes.get(address, [])]

    def storedWithoutReceived(self, address=BOB) -> list:
        """
        The messages in C{address}'s maildrop after their (folded)
        C{Received:} field.
        """
        out = []
        for data in self.stored(address):
            self.assertTrue(data.startswith(b"Received: "), data)
            out.append(data.split(b";\r\n\t", 1)[1].split(b"\r\n", 1)[1])
        return out


class GreetingTests(MXSessionMixin, SynchronousTestCase):
    """
    The greeting, EHLO keywords and the commands the MX listener knows.
    """

    def test_ehloWithoutTLS(self) -> None:
        """
        Without TLS material EHLO lists PIPELINING, SIZE, 8BITMIME and
        ENHANCEDSTATUSCODES: no STARTTLS and no AUTH.
        """
        self.connect()
        self.assertEqual(self.feed(b"EHLO client.example\r\n"), EHLO_REPLY)

    def test_ehloWithTLS(self) -> None:
        """
        With TLS material STARTTLS is offered (and still no AUTH); once TLS
        is on it is not offered again.
        """
        self.connect(transport=STARTTLSTransport(peerAddress=PEER), tlsContextFactory=object())
        self.assertEqual(self.feed(b"EHLO client.example\r\n"), EHLO_TLS_REPLY)
        self.assertEqual(self.feed(b"STARTTLS\r\n"), b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(self.feed(b"EHLO client.example\r\n"), EHLO_REPLY)

    def test_sizeIsTheConfiguredLimit(self) -> None:
        """
        SIZE names the factory's message size limit.
        """
        self.connect(maxMessageSize=2048)
        self.assertIn(b"250-SIZE 2048\r\n", self.feed(b"EHLO client.example\r\n"))

    def test_noAuth(self) -> None:
        """
        AUTH is an unknown command before and after EHLO, and HELO gives
        the plain reply.
        """
        self.connect()
        unknown = b"500 5.5.2 Error: command not recognized\r\n"
        self.assertEqual(self.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"), unknown)
        self.assertEqual(self.feed(b"HELO client.example\r\n"), b"250 mail.example.org\r\n")
        self.assertEqual(self.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"), unknown)

    def test_mailNeedsHelo(self) -> None:
        """
        MAIL before HELO/EHLO is out of sequence; RCPT and DATA before MAIL
        too; HELP names the MX.
        """
        self.connect()
        self.assertEqual(self.feed(b"MAIL FROM:<>\r\n"), b"503 5.5.1 Error: send HELO/EHLO first\r\n")
        self.feed(b"EHLO client.example\r\n")
        self.assertEqual(
            self.feed(b"RCPT TO:<bob@example.org>\r\nDATA\r\nHELP\r\n"),
            b"503 5.5.1 Error: need MAIL command\r\n" * 2 + b"214 2.0.0 pop3gw MX, see RFC 5321\r\n",
        )


class EnvelopeTests(MXSessionMixin, SynchronousTestCase):
    """
    Senders and recipients: no ownership, local recipients only.
    """

    def setUp(self) -> None:
        super().setUp()
        self.connect()
        self.feed(b"EHLO client.example\r\n")

    def test_nullSender(self) -> None:
        """
        The null reverse path is accepted and the message delivered, with
        C{from=""} in the log line.
        """
        with capturedLogs() as events:
            out = self.feed(b"MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n" + MESSAGE + b".\r\n")
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK + START_DATA + QUEUED)
        self.assertEqual(self.storedWithoutReceived(), [MESSAGE])
        lines = [formatEvent(e) for e in events if "accepted" in formatEvent(e)]
        self.assertEqual(len(lines), 1)
        self.assertRegex(lines[0], r'^mx: accepted id=[0-9A-F]{16} rhost=192\.0\.2\.7 from="" recipients=1 size=24 tls=no$')

    def test_anySenderOfAnyDomain(self) -> None:
        """
        Any well-formed sender is accepted, in any domain, local ones
        included (no ownership check); with SIZE and BODY parameters.
        """
        for sender in (b"someone@remote.example", b"alice@example.org", b"x@sub.remote.example"):
            self.assertEqual(
                self.feed(b"MAIL FROM:<" + sender + b"> SIZE=100 BODY=8BITMIME\r\nRSET\r\n"),
                SENDER_OK + b"250 2.0.0 OK\r\n",
            )

    def test_badSenderSyntax(self) -> None:
        """
        A sender that is not a plain address is refused with 553 5.1.7, and
        a MAIL without brackets with 501.
        """
        self.assertEqual(
            self.feed(b"MAIL FROM:<a b@remote.example>\r\nMAIL FROM:<@x.example:a@remote.example>\r\nMAIL FROM:a@b.example\r\n"),
            b"553 5.1.7 Bad sender address syntax\r\n" * 2 + b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n",
        )

    def test_addressLiteralSender(self) -> None:
        """
        A sender whose domain is an address literal (RFC 5321 4.1.3: IPv4,
        or C{IPv6:}) is accepted and the message delivered; the log line
        names it as normalised.  A literal that is neither gets 553 5.1.7.
        """
        with capturedLogs() as events:
            out = self.feed(
                b"MAIL FROM:<a@[192.0.2.1]>\r\nRSET\r\n"
                b"MAIL FROM:<a@[ipv6:2001:DB8::1]>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n" + MESSAGE + b".\r\n"
                b"MAIL FROM:<a@[x-tag:foo]>\r\nMAIL FROM:<a@[2001:db8::1]>\r\n"
            )
        self.assertEqual(
            queuedReply(out),
            SENDER_OK + b"250 2.0.0 OK\r\n" + SENDER_OK + RCPT_OK + START_DATA + QUEUED
            + b"553 5.1.7 Bad sender address syntax\r\n" * 2,
        )
        self.assertEqual(self.storedWithoutReceived(), [MESSAGE])
        lines = [formatEvent(e) for e in events if "accepted" in formatEvent(e)]
        self.assertEqual(len(lines), 1)
        self.assertIn(' from="a@[IPv6:2001:db8::1]" ', lines[0])

    def test_addressLiteralRecipientRefused(self) -> None:
        """
        A recipient whose domain is an address literal is refused as relay
        access, whatever the address: it names no local domain.
        """
        self.feed(b"MAIL FROM:<a@[192.0.2.1]>\r\n")
        out = self.feed(b"RCPT TO:<bob@[127.0.0.1]>\r\nRCPT TO:<bob@[IPv6:::1]>\r\nRCPT TO:<postmaster@[192.0.2.7]>\r\n")
        self.assertEqual(out, RELAY_DENIED * 3)

    def test_localRecipients(self) -> None:
        """
        Local users and aliases are accepted in any case; an unknown local
        user gets 550 5.1.1.
        """
        self.feed(b"MAIL FROM:<x@remote.example>\r\n")
        self.assertEqual(
            self.feed(
                b"RCPT TO:<BOB@Example.ORG>\r\nRCPT TO:<info@example.org>\r\nRCPT TO:<nobody@example.org>\r\n"
            ),
            RCPT_OK + RCPT_OK + USER_UNKNOWN,
        )

    def test_relayDisguisesRefused(self) -> None:
        """
        Every recipient that does not resolve to a local user and is not
        an unknown user of a local domain is refused with 550 5.7.1, however
        it is dressed up, and logged with its reason.
        """
        disguises = [
            b"carol@remote.example",
            b"CAROL@REMOTE.EXAMPLE",
            b"bob@sub.example.org",
            b"bob@example.org.remote.example",
            b"root@localhost",
            b'"bob@remote.example"@example.org',
            b'"bob"@example.org',
            b"bob%remote.example@example.org",
            b"bob%remote.example@EXAMPLE.ORG",
            b"@a.example,@b.example:bob@example.org",
            b"@remote.example:bob@example.org",
            b"remote.example!bob@example.org",
            b"bob@example.org.",
            b"bob@example.org..",
            b"bob@@example.org",
            b"bob@example.org@remote.example",
            b"bob@[192.0.2.1]",
            b"bob",
            b"",
        ]
        self.feed(b"MAIL FROM:<x@remote.example>\r\n")
        with capturedLogs() as events:
            out = b"".join(self.feed(b"RCPT TO:<" + d + b">\r\n") for d in disguises)
        self.assertEqual(out, RELAY_DENIED * len(disguises))
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), len(disguises))
        self.assertEqual(
            lines[7],
            'mx: refused recipient rhost=192.0.2.7 from="x@remote.example" to="bob%remote.example@example.org"'
            ' reply="550 5.7.1 Relay access denied" reason="relay denied"',
        )

    def test_unqualifiedPostmaster(self) -> None:
        """
        C{<Postmaster>} without a domain (RFC 5321 4.5.1) is the postmaster
        of the local domain the server's host name is in, delivered where
        that address resolves.
        """
        self.users.aliases[Address("postmaster", "example.org")] = ALICE
        out = self.feed(b"MAIL FROM:<>\r\nRCPT TO:<PostMaster>\r\nDATA\r\n" + MESSAGE + b".\r\n")
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK + START_DATA + QUEUED)
        self.assertEqual(self.storedWithoutReceived(ALICE), [MESSAGE])

    def test_unqualifiedPostmasterNoLocalDomain(self) -> None:
        """
        When the host name is in no local domain and no C{[pop3gw]
        postmaster} is set, C{<Postmaster>} is refused like any other
        recipient that is not local (start-up warns about the missing
        setting).
        """
        self.proto.factory.hostname = "mx.elsewhere.example"
        self.feed(b"MAIL FROM:<>\r\n")
        self.assertEqual(self.feed(b"RCPT TO:<postmaster>\r\n"), RELAY_DENIED)

    def test_nonASCIIWithoutSMTPUTF8(self) -> None:
        """
        Without the SMTPUTF8 parameter on MAIL, a non-ASCII sender or
        recipient is refused with C{553 5.6.7} (RFC 6531 3.4), even one
        that a catch-all would take.
        """
        self.users.catchAll["example.org"] = BOB
        self.assertIn(b"250 SMTPUTF8\r\n", self.feed(b"EHLO again.example\r\n"))
        self.assertEqual(
            self.feed("MAIL FROM:<\u00e4@remote.example>\r\n".encode("utf-8")),
            b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n",
        )
        self.feed(b"MAIL FROM:<>\r\n")
        self.assertEqual(
            self.feed("RCPT TO:<\u00e4lice@example.org>\r\n".encode("utf-8")),
            b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n",
        )

    def test_unqualifiedPostmasterConfigured(self) -> None:
        """
        When the host name is in no local domain, C{<Postmaster>} goes to
        the C{[pop3gw] postmaster} user (RFC 5321 4.5.1: it is always
        accepted).
        """
        self.proto.factory.hostname = "mx.elsewhere.example"
        self.proto.factory.postmaster = BOB
        out = self.feed(b"MAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\nDATA\r\n" + MESSAGE + b".\r\n")
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK + START_DATA + QUEUED)
        self.assertEqual(self.storedWithoutReceived(BOB), [MESSAGE])

    def test_unknownUserLogged(self) -> None:
        """
        An unknown local user gets one log line with its reason, and no
        failed-login line.
        """
        self.feed(b"MAIL FROM:<>\r\n")
        with capturedLogs() as events:
            self.feed(b"RCPT TO:<nobody@example.org>\r\n")
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                'mx: refused recipient rhost=192.0.2.7 from="" to="nobody@example.org"'
                ' reply="550 5.1.1 Recipient address rejected: user unknown" reason="unknown user"'
            ],
        )

    def test_recipientCap(self) -> None:
        """
        Recipients beyond the cap get 452 4.5.3; the message goes to the
        accepted ones.
        """
        self.proto.factory.maxRecipients = 1
        out = self.feed(
            b"MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n" + MESSAGE + b".\r\n"
        )
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK + b"452 4.5.3 Too many recipients\r\n" + START_DATA + QUEUED)
        self.assertEqual(self.storedWithoutReceived(), [MESSAGE])
        self.assertEqual(self.stored(ALICE), [])

    def test_recipientCapCountsCommands(self) -> None:
        """
        The cap counts accepted RCPT commands, as the client sees them: a
        list counts once however many users it has, and sub-addresses of
        one user count each.
        """
        self.users.aliases[Address("team", "example.org")] = (ALICE, BOB)
        self.proto.factory.maxRecipients = 2
        out = self.feed(
            b"MAIL FROM:<>\r\nRCPT TO:<team@example.org>\r\nRCPT TO:<alice+a@example.org>\r\n"
            b"RCPT TO:<alice+b@example.org>\r\n"
        )
        self.assertEqual(out, SENDER_OK + RCPT_OK * 2 + b"452 4.5.3 Too many recipients\r\n")

    def test_severalRecipientsOneCopyEach(self) -> None:
        """
        A message for a user and an alias of another gets one copy in each
        maildrop; a recipient named twice gets one.
        """
        out = self.feed(
            b"MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<info@example.org>\r\nRCPT TO:<Bob@example.org>\r\n"
            b"DATA\r\n" + MESSAGE + b".\r\n"
        )
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK * 3 + START_DATA + QUEUED)
        self.assertEqual(self.storedWithoutReceived(BOB), [MESSAGE])
        self.assertEqual(self.storedWithoutReceived(ALICE), [MESSAGE])


    def test_distributionList(self) -> None:
        """
        A distribution list, a sub-address and the domain's catch-all
        resolve on MX as on every other path: one copy per user, each
        once.
        """
        self.users.aliases[Address("team", "example.org")] = (ALICE, BOB)
        self.users.catchAll["example.org"] = BOB
        out = self.feed(
            b"MAIL FROM:<>\r\nRCPT TO:<team@example.org>\r\nRCPT TO:<alice+news@example.org>\r\n"
            b"RCPT TO:<whoever@example.org>\r\nDATA\r\n" + MESSAGE + b".\r\n"
        )
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK * 3 + START_DATA + QUEUED)
        self.assertEqual(self.storedWithoutReceived(ALICE), [MESSAGE])
        self.assertEqual(self.storedWithoutReceived(BOB), [MESSAGE])


class DataTests(MXSessionMixin, SynchronousTestCase):
    """
    The data: stored as received, the one DATA reader's rules.
    """

    def setUp(self) -> None:
        super().setUp()
        self.connect()
        self.feed(b"EHLO client.example\r\n")

    def envelope(self) -> None:
        self.assertEqual(self.feed(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"),
                         SENDER_OK + RCPT_OK + START_DATA)

    def test_storedAsReceived(self) -> None:
        """
        No Message-ID, Date or From is added: the message is the
        C{Received:} field then the data, dot-unstuffed, bare LFs made CRLF.
        """
        self.envelope()
        out = self.feed(b"Subject: x\r\n\r\n..dot\nbare lf\r\n.\r\n")
        self.assertEqual(queuedReply(out), QUEUED)
        self.assertEqual(self.storedWithoutReceived(), [b"Subject: x\r\n\r\n.dot\r\nbare lf\r\n"])

    def test_headerSectionEndsAtNonField(self) -> None:
        """
        A line in the header section that is neither a field nor a
        continuation ends it, as on submission: a blank line is inserted
        before it, so the checks and the reader see one header section.
        """
        out = self.feed(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
                        b"Subject: hello\r\nno colon\r\nFrom: x@remote.example\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK + START_DATA + QUEUED)
        self.assertEqual(self.storedWithoutReceived(),
                         [b"Subject: hello\r\n\r\nno colon\r\nFrom: x@remote.example\r\n\r\nbody\r\n"])

    def test_size(self) -> None:
        """
        A message over the size limit is refused with 552 5.3.4 once its
        data has been read; nothing is stored.
        """
        self.proto.factory.maxMessageSize = 1024
        self.envelope()
        self.assertEqual(self.feed(b"Subject: x\r\n\r\n" + (b"y" * 100 + b"\r\n") * 11 + b".\r\nNOOP\r\n"),
                         b"552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 OK\r\n")
        self.assertEqual(self.store.boxes, {})

    def test_sizeParameter(self) -> None:
        """
        MAIL with a SIZE over the limit is refused at once.
        """
        self.proto.factory.maxMessageSize = 1024
        self.assertEqual(self.feed(b"MAIL FROM:<> SIZE=1025\r\n"),
                         b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")

    def test_bareCR(self) -> None:
        """
        A bare CR refuses the message with 550 5.6.11.
        """
        self.envelope()
        self.assertEqual(self.feed(b"Subject: x\r\n\r\na\rb\r\n.\r\n"), b"550 5.6.11 Bare CR not allowed\r\n")
        self.assertEqual(self.store.boxes, {})

    def test_nul(self) -> None:
        """
        A NUL refuses the message with 550 5.6.0.
        """
        self.envelope()
        self.assertEqual(self.feed(b"Subject: x\r\n\r\na\x00b\r\n.\r\n"), b"550 5.6.0 NUL character not allowed\r\n")
        self.assertEqual(self.store.boxes, {})

    def test_refusedMessageLogged(self) -> None:
        """
        A message refused at the end of its data has one log line naming
        the peer (not a user), the sender and the reply.
        """
        self.envelope()
        with capturedLogs() as events:
            self.feed(b"Subject: x\r\n\r\na\rb\r\n.\r\n")
        self.assertEqual(
            [formatEvent(e) for e in events],
            ['mx: refused message rhost=192.0.2.7 from="x@remote.example" reply="550 5.6.11 Bare CR not allowed"'],
        )

    def test_junkCommandsLimited(self) -> None:
        """
        A client that moves no mail cannot hold the connection for ever
        with NOOP, RSET, VRFY and HELP: each beyond the 100th since the
        last accepted message counts as an error, and at 20 errors the
        server says 421 4.7.0 and closes.  A message accepted starts the
        count again.
        """
        junk = [b"NOOP\r\n", b"RSET\r\n", b"VRFY bob\r\n", b"HELP\r\n"]
        replies = {b"NOOP\r\n": b"250 2.0.0 OK\r\n", b"RSET\r\n": b"250 2.0.0 OK\r\n"}
        for i in range(100):
            self.assertNotEqual(self.feed(junk[i % 4])[:3], b"421")
        self.envelope()
        self.assertEqual(queuedReply(self.feed(MESSAGE + b".\r\n")), QUEUED)
        for _i in range(119):
            self.assertEqual(self.feed(b"NOOP\r\n"), replies[b"NOOP\r\n"])
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(
            self.feed(b"RSET\r\n"),
            replies[b"RSET\r\n"] + b"421 4.7.0 mail.example.org Error: too many errors\r\n",
        )
        self.assertTrue(self.transport.disconnecting)

    def test_commitFailure(self) -> None:
        """
        If the maildrop cannot keep the message the client gets 451, not
        250.
        """
        self.store.failCommit = True
        self.envelope()
        self.assertEqual(self.feed(MESSAGE + b".\r\n"), b"451 4.3.0 Temporary failure, try again later\r\n")


class SmugglingTests(MXSessionMixin, SynchronousTestCase):
    """
    SMTP smuggling: only CRLF.CRLF ends the data, so a second envelope
    hidden in the data is content, never a second message.
    """

    SMUGGLED = (
        b"MAIL FROM:<admin@example.org>\r\n"
        b"RCPT TO:<alice@example.org>\r\n"
        b"DATA\r\n"
        b"From: admin@example.org\r\n\r\nsmuggled\r\n"
    )

    def setUp(self) -> None:
        super().setUp()
        self.connect()
        self.feed(b"EHLO client.example\r\n")

    def smuggle(self, separator: bytes) -> bytes:
        out = self.feed(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        self.assertEqual(out, SENDER_OK + RCPT_OK + START_DATA)
        return queuedReply(self.feed(MESSAGE + b"first" + separator + self.SMUGGLED + b".\r\nQUIT\r\n"))

    def test_contentSeparators(self) -> None:
        """
        "\\n.\\n", "\\r\\n.\\n" and "\\n.\\r\\n" are content: one message,
        for bob, holding the smuggled text; nothing for alice.
        """
        for separator in (b"\n.\n", b"\r\n.\n", b"\n.\r\n"):
            self.assertEqual(self.smuggle(separator), QUEUED + b"221 2.0.0 Bye\r\n")
            self.assertEqual(self.storedWithoutReceived(), [MESSAGE + b"first\r\n.\r\n" + self.SMUGGLED])
            self.assertEqual(self.stored(ALICE), [])
            self.store.boxes.clear()
            self.connect()
            self.feed(b"EHLO client.example\r\n")

    def test_bareCRSeparators(self) -> None:
        """
        "\\r.\\r" and "\\r.\\n" hold bare CRs: the message is refused and no
        second envelope is run.
        """
        for separator in (b"\r.\r", b"\r.\n", b"\r\n.\r"):
            self.assertEqual(self.smuggle(separator), b"550 5.6.11 Bare CR not allowed\r\n221 2.0.0 Bye\r\n")
            self.assertEqual(self.store.boxes, {})
            self.connect()
            self.feed(b"EHLO client.example\r\n")


class StartTLSTests(MXSessionMixin, SynchronousTestCase):
    """
    STARTTLS on the MX listener.
    """

    def test_pipelinedPlaintextDiscarded(self) -> None:
        """
        Commands pipelined after STARTTLS in plaintext are dropped: the
        session starts over in the fresh state, so MAIL needs EHLO again.
        """
        self.connect(transport=STARTTLSTransport(peerAddress=PEER), tlsContextFactory=object())
        self.feed(b"EHLO client.example\r\n")
        out = self.feed(b"STARTTLS\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\n")
        self.assertEqual(out, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(len(self.transport.tlsStarted), 1)
        self.assertEqual(self.feed(b"MAIL FROM:<>\r\n"), b"503 5.5.1 Error: send HELO/EHLO first\r\n")

    def test_notOffered(self) -> None:
        """
        Without TLS material STARTTLS is refused.
        """
        self.connect()
        self.assertEqual(self.feed(b"EHLO c.example\r\nSTARTTLS\r\n"),
                         EHLO_REPLY + b"503 5.5.1 Error: STARTTLS not offered\r\n")


class ReceivedTests(MXSessionMixin, SynchronousTestCase):
    """
    The C{Received:} field: peer address, reverse name, HELO name,
    protocol, TLS.
    """

    def deliver(self, hello: bytes = b"EHLO client.example") -> bytes:
        out = self.feed(hello + b"\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n" + MESSAGE + b".\r\n")
        self.assertTrue(queuedReply(out).endswith(QUEUED), out)
        [data] = self.stored()
        self.assertTrue(data.endswith(b"\r\n" + MESSAGE), data)
        return data[: -len(MESSAGE)]

    def messageId(self) -> bytes:
        [data] = self.stored()
        return data.split(b" id ", 1)[1].split(b";", 1)[0]

    def test_resolvedName(self) -> None:
        """
        The reverse name found for the peer's address is named with the
        address, the EHLO name and C{with ESMTP}; the lookup asked for the
        address's PTR name.
        """
        self.connect()
        self.assertEqual([name for name, _ in self.resolver.lookups], ["7.2.0.192.in-addr.arpa"])
        self.resolver.answer(b"MX.Client.Example")
        received = self.deliver()
        self.assertEqual(
            received,
            b"Received: from client.example (mx.client.example [192.0.2.7])\r\n"
            b"\tby mail.example.org (pop3gw) with ESMTP id " + self.messageId() + b";\r\n"
            b"\t" + NOW_TEXT + b"\r\n",
        )

    def test_failedLookup(self) -> None:
        """
        A failed lookup gives C{unknown}; HELO gives C{with SMTP}.
        """
        self.connect()
        self.resolver.lookups[-1][1].errback(DNSNameError())
        received = self.deliver(b"HELO [192.0.2.7]")
        self.assertEqual(
            received,
            b"Received: from [192.0.2.7] (unknown [192.0.2.7])\r\n"
            b"\tby mail.example.org (pop3gw) with SMTP id " + self.messageId() + b";\r\n"
            b"\t" + NOW_TEXT + b"\r\n",
        )

    def test_slowLookupDoesNotBlock(self) -> None:
        """
        A lookup that has not answered does not hold the session: the
        message is accepted with C{unknown}; after the timeout the lookup
        is cancelled.
        """
        self.connect()
        received = self.deliver()
        self.assertTrue(received.startswith(b"Received: from client.example (unknown [192.0.2.7])\r\n"), received)
        d = self.resolver.lookups[-1][1]
        self.assertFalse(d.called)
        self.clock.advance(smtpmx.REVERSE_LOOKUP_TIMEOUT)
        self.assertTrue(d.called)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active() and c.func == d.cancel], [])

    def test_timeoutThenUnknown(self) -> None:
        """
        After the timeout the name stays C{unknown}.
        """
        self.connect()
        self.clock.advance(smtpmx.REVERSE_LOOKUP_TIMEOUT)
        self.assertTrue(self.deliver().startswith(b"Received: from client.example (unknown [192.0.2.7])\r\n"))

    def test_ipv6Peer(self) -> None:
        """
        An IPv6 peer is written as an IPv6 address literal and looked up
        under ip6.arpa.
        """
        self.connect(transport=StringTransport(peerAddress=IPv6Address("TCP", "2001:db8::1", 4000)))
        self.assertTrue(self.resolver.lookups[-1][0].endswith(".8.b.d.0.1.0.0.2.ip6.arpa"))
        self.resolver.answer(b"v6.client.example")
        self.assertTrue(self.deliver().startswith(b"Received: from client.example (v6.client.example [IPv6:2001:db8::1])\r\n"))

    def test_afterSTARTTLS(self) -> None:
        """
        After STARTTLS the field says C{with ESMTPS} and names the TLS
        version and cipher; the accepted line says C{tls=TLSv1.3}.
        """
        self.connect(transport=STARTTLSTransport(peerAddress=PEER), tlsContextFactory=object())
        self.resolver.answer(b"mx.client.example")
        self.feed(b"EHLO client.example\r\nSTARTTLS\r\n")
        with capturedLogs() as events:
            received = self.deliver()
        self.assertEqual(
            received,
            b"Received: from client.example (mx.client.example [192.0.2.7])\r\n"
            b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
            b"\tby mail.example.org (pop3gw) with ESMTPS id " + self.messageId() + b";\r\n"
            b"\t" + NOW_TEXT + b"\r\n",
        )
        [line] = [formatEvent(e) for e in events]
        self.assertTrue(line.endswith(" recipients=1 size=24 tls=TLSv1.3"), line)

    def test_hostileHelo(self) -> None:
        """
        Characters of the HELO name that could break the field are
        replaced.
        """
        self.connect(transport=SecureTransport(peerAddress=PEER))
        received = self.deliver(b"EHLO a(b)c;d")
        self.assertTrue(received.startswith(b"Received: from a_b_c_d (unknown [192.0.2.7])\r\n\t(using TLSv1.3"), received)

    def test_connectionLostCancelsLookup(self) -> None:
        """
        A client that goes away leaves no lookup and no timer behind.
        """
        self.connect()
        d = self.resolver.lookups[-1][1]
        self.proto.connectionLost(None)
        self.assertTrue(d.called)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])


def authResults(dmarc: str = "pass", disposition: str = "none", spf: str = "pass") -> mailauth.AuthenticationResults:
    """
    Results for mail from remote.example with DMARC C{dmarc}.
    """
    return mailauth.AuthenticationResults(
        mailauth.SPFResult(spf, "mailfrom", "remote.example", "x@remote.example"),
        (),
        mailauth.DMARCResult(dmarc, "remote.example", "reject" if dmarc != "none" else "", disposition),
    )


class AuthenticationTests(MXSessionMixin, SynchronousTestCase):
    """
    The end of the data runs the inbound checks (L{pop3gw.inbound}): the
    message gets one C{Authentication-Results:} field, or is refused.
    """

    def setUp(self) -> None:
        super().setUp()
        self.results = authResults()
        self.seen: list = []
        self.checker = inbound.InboundChecker(HOST, inbound.InboundPolicy(), ImmediateRunner(), self.clock,
                                              authenticate=self.authenticate)
        self.connect(checker=self.checker)
        self.feed(b"EHLO client.example\r\n")

    def authenticate(self, message: bytes, session: inbound.Session) -> mailauth.AuthenticationResults:
        self.seen.append((message, session))
        return self.results

    def send(self, data: bytes) -> bytes:
        self.assertEqual(self.feed(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"),
                         SENDER_OK + RCPT_OK + START_DATA)
        return self.feed(data + b".\r\n")

    def test_headerPrepended(self) -> None:
        """
        The stored message is the C{Authentication-Results:} field, the
        C{Received:} field, then the data; the checks saw the message with
        its C{Received:} field and the session.
        """
        out = self.send(MESSAGE)
        self.assertEqual(queuedReply(out), QUEUED)
        [data] = self.stored()
        header = (b"Authentication-Results: mail.example.org;\r\n\tspf=pass smtp.mailfrom=x@remote.example;\r\n"
                  b"\tdkim=none;\r\n\tdmarc=pass header.from=remote.example policy.dmarc=reject\r\n")
        self.assertTrue(data.startswith(header + b"Received: from client.example"), data)
        self.assertTrue(data.endswith(b"\r\n" + MESSAGE), data)
        [(message, session)] = self.seen
        self.assertEqual(message, data[len(header):])
        self.assertEqual(session, inbound.Session("192.0.2.7", "client.example", "x@remote.example",
                                                  ("bob@example.org",), None))

    def test_addressLiteralSender(self) -> None:
        """
        The checks see a sender with an address literal as normalised.
        """
        self.assertEqual(self.feed(b"MAIL FROM:<x@[IPv6:2001:db8:0::7]>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"),
                         SENDER_OK + RCPT_OK + START_DATA)
        self.assertEqual(queuedReply(self.feed(MESSAGE + b".\r\n")), QUEUED)
        [(_message, session)] = self.seen
        self.assertEqual(session.sender, "x@[IPv6:2001:db8::7]")

    def test_forgedResultsRemoved(self) -> None:
        """
        An C{Authentication-Results:} field naming this host (in any case)
        is removed; one naming another host is kept.
        """
        self.send(b"Authentication-Results: MAIL.example.org; dmarc=pass\r\n"
                  b"Authentication-Results: other.example;\r\n dkim=pass\r\n" + MESSAGE)
        [data] = self.stored()
        self.assertEqual(data.count(b"Authentication-Results: "), 2)
        self.assertNotIn(b"MAIL.example.org", data)
        self.assertIn(b"Authentication-Results: other.example;\r\n dkim=pass\r\nSubject: hello\r\n", data)

    def test_dmarcReject(self) -> None:
        """
        A DMARC failure with p=reject is refused with 550 5.7.1 at the end
        of the data, nothing is stored, and the refusal is logged (not as an
        authentication failure).
        """
        self.results = authResults("fail", "reject", spf="fail")
        with capturedLogs() as events:
            out = self.send(MESSAGE)
        self.assertEqual(out, b"550 5.7.1 Message rejected by the sender domain's DMARC policy\r\n")
        self.assertEqual(self.store.boxes, {})
        self.assertEqual(
            [formatEvent(e) for e in events],
            ['mx: checked rhost=192.0.2.7 from="x@remote.example" spf=fail dkim=none dmarc=fail(reject) action=reject',
             'mx: refused message rhost=192.0.2.7 from="x@remote.example"'
             ' reply="550 5.7.1 Message rejected by the sender domain\'s DMARC policy"'],
        )

    def test_dmarcQuarantine(self) -> None:
        """
        A DMARC failure with p=quarantine is stored with the subject tag
        and C{X-Spam-Flag: YES}.
        """
        self.results = authResults("fail", "quarantine")
        out = self.send(MESSAGE)
        self.assertEqual(queuedReply(out), QUEUED)
        [data] = self.stored()
        self.assertIn(b"policy.dmarc=reject\r\nX-Spam-Flag: YES\r\nReceived: ", data)
        self.assertTrue(data.endswith(b"Subject: [SPAM] hello\r\n\r\nbody\r\n"), data)

    def test_nextMessageChecked(self) -> None:
        """
        Each message of a session is checked on its own.
        """
        self.send(MESSAGE)
        self.results = authResults("fail", "reject")
        self.assertEqual(self.send(MESSAGE), b"550 5.7.1 Message rejected by the sender domain's DMARC policy\r\n")
        self.assertEqual(len(self.stored()), 1)
        self.assertEqual(len(self.seen), 2)


class BDATTests(MXSessionMixin, SynchronousTestCase):
    """
    CHUNKING (RFC 3030) on the MX listener: the DATA reader's rules, the
    same C{Received:} field, no transparency.
    """

    def setUp(self) -> None:
        super().setUp()
        self.connect()
        self.feed(b"EHLO client.example\r\n")

    def test_storedAsWithData(self) -> None:
        """
        A message in two chunks (a CRLF cut between them) is stored after
        the same C{Received:} field as with DATA, leading dots kept, bare
        LF made CRLF; CRLF.CRLF and command lines inside a chunk are
        content.
        """
        body = b"Subject: x\r\n\r\n..dot\nbare lf\r\n.\r\nMAIL FROM:<y@remote.example>\r\n"
        out = self.feed(
            b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<bob@example.org>\r\n"
            b"BDAT 20\r\n" + body[:20] + b"BDAT %d LAST\r\n" % (len(body) - 20) + body[20:]
        )
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK + b"250 2.0.0 20 octets received\r\n" + QUEUED)
        self.assertEqual(
            self.storedWithoutReceived(),
            [b"Subject: x\r\n\r\n..dot\r\nbare lf\r\n.\r\nMAIL FROM:<y@remote.example>\r\n"],
        )
        [data] = self.stored()
        self.assertRegex(
            data.split(b"Subject")[0],
            rb"^Received: from client.example \(unknown \[192.0.2.7\]\)\r\n"
            rb"\tby mail.example.org \(pop3gw\) with ESMTP id [0-9A-F]{16};\r\n"
            rb"\tTue, 14 Nov 2023 22:13:20 \+0000\r\n$",
        )
        self.assertEqual(self.router.queue.entries, [])

    def test_sizeWhileStreaming(self) -> None:
        """
        Over the size limit, the chunk that passes it gets 552 5.3.4; the
        chunks pipelined after it are discarded (503) and the session stays
        in sync.
        """
        self.proto.factory.maxMessageSize = 1024
        chunk = (b"y" * 500 + b"\r\n") * 2
        out = self.feed(
            b"MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\n"
            + b"BDAT 16\r\nSubject: x\r\n\r\nab"
            + b"BDAT 1004\r\n" + chunk
            + b"BDAT 1004\r\n" + chunk
            + b"BDAT 6 LAST\r\nNOOP\r\n"
            + b"NOOP\r\n"
        )
        self.assertEqual(
            out,
            SENDER_OK
            + RCPT_OK
            + b"250 2.0.0 16 octets received\r\n"
            + b"250 2.0.0 1004 octets received\r\n"
            + b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
            + b"503 5.5.1 Error: need MAIL command\r\n"
            + b"250 2.0.0 OK\r\n",
        )
        self.assertEqual(self.store.boxes, {})

    def test_unknownRecipientThenBDAT(self) -> None:
        """
        BDAT after only refused recipients is refused (503), its chunk
        discarded.
        """
        out = self.feed(b"MAIL FROM:<>\r\nRCPT TO:<nobody@example.org>\r\nBDAT 6 LAST\r\nNOOP\r\nNOOP\r\n")
        self.assertEqual(out, SENDER_OK + USER_UNKNOWN + b"503 5.5.1 Error: need RCPT command\r\n250 2.0.0 OK\r\n")


#: An internationalised user: a UTF-8 local part in a domain configured
#: as its A-label.
NANDU = Address.parse("\u00f1and\u00fa@xn--bcher-kva.example")


class SMTPUTF8Tests(MXSessionMixin, SynchronousTestCase):
    """
    SMTPUTF8 (RFC 6531/6532) on the MX listener.
    """

    def setUp(self) -> None:
        super().setUp()
        self.users = FakeUserDatabase({ALICE: "x", BOB: "x", NANDU: "x"}, aliases={ALIAS: ALICE})
        self.router = NoRelayRouter(domains=("example.org", "xn--bcher-kva.example"), users=self.users)
        self.router.queue.beginDelivery = self.queueUsed
        self.store = self.router.store
        self.connect()
        self.feed(b"EHLO client.example\r\n")

    def test_utf8Envelope(self) -> None:
        """
        With C{MAIL FROM:<...> SMTPUTF8}, a UTF-8 sender and a UTF-8
        recipient in a U-label domain (matched as its A-label) are accepted;
        the message, UTF-8 headers included, is stored byte for byte.
        """
        message = "From: J\u00f6rg <j\u00f6rg@m\u00fcnchen.example>\r\nSubject: gr\u00fc\u00df dich\r\n\r\n\u00e4\u00f6\u00fc\r\n".encode("utf-8")
        out = self.feed(
            "MAIL FROM:<j\u00f6rg@m\u00fcnchen.example> SMTPUTF8 BODY=8BITMIME\r\n"
            "RCPT TO:<\u00f1and\u00fa@b\u00fccher.example>\r\nDATA\r\n".encode("utf-8")
            + message
            + b".\r\n"
        )
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK + START_DATA + QUEUED)
        self.assertEqual(self.storedWithoutReceived(NANDU), [message])

    def test_receivedWithUTF8SMTP(self) -> None:
        """
        A message received with SMTPUTF8 is traced C{with UTF8SMTP} (RFC
        6531 3.7.3); the next one, without it, C{with ESMTP} again.
        """
        self.feed(
            "MAIL FROM:<> SMTPUTF8\r\nRCPT TO:<\u00f1and\u00fa@b\u00fccher.example>\r\nDATA\r\n".encode("utf-8")
            + MESSAGE
            + b".\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nBDAT %d LAST\r\n" % len(MESSAGE)
            + MESSAGE
        )
        [first] = self.stored(NANDU)
        [second] = self.stored(BOB)
        self.assertIn(b"\tby mail.example.org (pop3gw) with UTF8SMTP id ", first)
        self.assertIn(b"\tby mail.example.org (pop3gw) with ESMTP id ", second)

    def test_parameterOnlyForItsTransaction(self) -> None:
        """
        SMTPUTF8 holds for its own transaction only: after RSET, a UTF-8
        recipient needs it again.
        """
        self.feed(b"MAIL FROM:<> SMTPUTF8\r\nRSET\r\nMAIL FROM:<>\r\n")
        self.assertEqual(
            self.feed("RCPT TO:<\u00f1and\u00fa@example.org>\r\n".encode("utf-8")),
            b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n",
        )

    def test_parameterTakesNoValue(self) -> None:
        """
        C{SMTPUTF8=...} is a syntax error (RFC 6531 3.4: no value).
        """
        self.assertEqual(self.feed(b"MAIL FROM:<> SMTPUTF8=yes\r\n"), b"501 5.5.4 SMTPUTF8 takes no value\r\n")

    def test_unknownUTF8User(self) -> None:
        """
        An unknown UTF-8 local part of a local domain is 550 5.1.1; a UTF-8
        recipient elsewhere is relay denied.
        """
        self.feed(b"MAIL FROM:<> SMTPUTF8\r\n")
        self.assertEqual(self.feed("RCPT TO:<\u00f1o@b\u00fccher.example>\r\n".encode("utf-8")), USER_UNKNOWN)
        self.assertEqual(self.feed("RCPT TO:<\u00f1o@m\u00fcnchen.example>\r\n".encode("utf-8")), RELAY_DENIED)
