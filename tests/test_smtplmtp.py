"""
Tests for L{pop3gw.smtplmtp}: the LMTP listener (RFC 2033), over
L{StringTransport} with a L{task.Clock} and the fakes of L{pop3gw.testing}.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, task, threads
from twisted.internet.address import UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pop3gw import inbound, mailauth, smtplmtp
from pop3gw.address import Address
from pop3gw.interfaces import InsufficientStorage, TemporaryFailure
from pop3gw.runner import ImmediateRunner
from pop3gw.testing import FakeMaildropStore, FakeUserDatabase
from tests.dnshelpers import listen, txt
from tests.test_smtp import queuedReply
from tests.test_smtpmx import NoRelayRouter

HOST = "mail.example.org"
ALICE = Address.parse("alice@example.org")
BOB = Address.parse("bob@example.org")
CAROL = Address.parse("carol@example.org")
TEAM = Address.parse("team@example.org")
NOW = 1700000000.0

GREETING = b"220 mail.example.org LMTP ready\r\n"
LHLO_REPLY = (
    b"250-mail.example.org\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 41943040\r\n"
    b"250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-CHUNKING\r\n"
    b"250-SMTPUTF8\r\n"
    b"250 XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE\r\n"
)
SENDER_OK = b"250 2.1.0 OK\r\n"
RCPT_OK = b"250 2.1.5 OK\r\n"
START_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = b"250 2.0.0 OK queued as ID\r\n"
USER_UNKNOWN = b"550 5.1.1 Recipient address rejected: user unknown\r\n"
FULL = b"452 4.3.1 Insufficient system storage\r\n"
TEMPFAIL = b"451 4.3.0 Temporary failure, try again later\r\n"
MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


class FailingStore(FakeMaildropStore):
    """
    A L{FakeMaildropStore} whose deliveries to the maildrops in C{failing}
    fail at commit with the exception given there.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failing: dict[Address, Exception] = {}

    def beginDelivery(self, recipients, trace=b""):
        delivery = super().beginDelivery(recipients, trace)
        errors = [self.failing[r] for r in recipients if r in self.failing]
        if errors:
            delivery.commit = lambda: defer.fail(errors[0])
        return delivery


class LMTPTestsMixin:
    def setUp(self) -> None:
        self.users = FakeUserDatabase({ALICE: "x", BOB: "x", CAROL: "x"}, aliases={TEAM: (ALICE, BOB)})
        self.store = FailingStore()
        self.router = NoRelayRouter(domains=("example.org",), users=self.users, store=self.store)
        self.router.queue.beginDelivery = self.queueUsed
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.factory = smtplmtp.LMTPFactory(self.router, self.clock, HOST)
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=UNIXAddress(None))
        self.proto.makeConnection(self.transport)
        self.assertEqual(self.transport.value(), GREETING)
        self.transport.clear()

    def queueUsed(self, *args, **kwargs):
        raise AssertionError("the LMTP listener used the outbound queue")

    def feed(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        out = self.transport.value()
        self.transport.clear()
        return out

    def stored(self, address) -> list:
        """
        The messages in C{address}'s maildrop after their C{Received:}
        field (three lines).
        """
        out = []
        for _uid, data in self.store.boxes.get(address, []):
            self.assertTrue(data.startswith(b"Received: from mta.example.org (unix)\r\n"), data)
            out.append(data.split(b"\r\n", 3)[3])
        return out


class CommandTests(LMTPTestsMixin, SynchronousTestCase):
    """
    LHLO, and the SMTP greetings LMTP does not know.
    """

    def test_lhlo(self) -> None:
        """
        LHLO answers with the EHLO keywords: no STARTTLS, no AUTH.
        """
        self.assertEqual(self.feed(b"LHLO mta.example.org\r\n"), LHLO_REPLY)

    def test_heloEhloUnknown(self) -> None:
        """
        HELO and EHLO are unknown commands in LMTP (RFC 2033 4.1), as are
        AUTH and STARTTLS; MAIL before LHLO is out of sequence.
        """
        self.assertEqual(
            self.feed(b"HELO x\r\nEHLO x\r\nAUTH PLAIN\r\nSTARTTLS\r\nMAIL FROM:<>\r\n"),
            b"500 5.5.2 Error: command not recognized\r\n" * 4 + b"503 5.5.1 Send LHLO first\r\n",
        )

    def test_unknownUserAtRcpt(self) -> None:
        """
        An unknown local user is refused at RCPT with 550 5.1.1 and logged;
        a non-local recipient is relay denied.
        """
        self.feed(b"LHLO mta.example.org\r\n")
        with capturedLogs() as events:
            out = self.feed(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<nobody@example.org>\r\nRCPT TO:<x@remote.example>\r\n")
        self.assertEqual(out, SENDER_OK + USER_UNKNOWN + b"550 5.7.1 Relay access denied\r\n")
        self.assertEqual(
            formatEvent(events[0]),
            'lmtp: refused recipient rhost=unix from="x@remote.example" to="nobody@example.org"'
            ' reply="550 5.1.1 Recipient address rejected: user unknown" reason="unknown user"',
        )


    def test_addressLiteralSender(self) -> None:
        """
        A sender whose domain is an address literal is accepted, as the MTA
        in front accepted it (RFC 5321 4.1.3).
        """
        self.feed(b"LHLO mta.example.org\r\n")
        self.assertEqual(self.feed(b"MAIL FROM:<x@[192.0.2.1]>\r\nRCPT TO:<bob@example.org>\r\n"), SENDER_OK + b"250 2.1.5 OK\r\n")


class DataTests(LMTPTestsMixin, SynchronousTestCase):
    """
    One reply per accepted RCPT, in RCPT order, each recipient its own
    delivery.
    """

    def setUp(self) -> None:
        super().setUp()
        self.feed(b"LHLO mta.example.org\r\n")

    def test_oneReplyPerRecipient(self) -> None:
        """
        Two accepted recipients (one refused between them) get two 250s
        after the data; each maildrop holds the message after one
        C{Received:} field naming LMTP.
        """
        out = self.feed(
            b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\n"
            b"RCPT TO:<bob@example.org>\r\nDATA\r\n" + MESSAGE + b".\r\n"
        )
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK + USER_UNKNOWN + RCPT_OK + START_DATA + QUEUED * 2)
        self.assertEqual(self.stored(ALICE), [MESSAGE])
        self.assertEqual(self.stored(BOB), [MESSAGE])
        data = self.store.boxes[ALICE][0][1]
        self.assertRegex(
            data.split(b"Subject")[0],
            rb"^Received: from mta.example.org \(unix\)\r\n\tby mail.example.org \(pop3gw\) with LMTP id [0-9A-F]{16};\r\n"
            rb"\tTue, 14 Nov 2023 22:13:20 \+0000\r\n$",
        )
        self.assertEqual(self.router.queue.entries, [])

    def test_failingMaildropGetsItsOwnReply(self) -> None:
        """
        A recipient whose maildrop is full gets 452 4.3.1, one whose
        maildrop fails otherwise 451 4.3.0, in RCPT order, while the
        others get 250 and their copy.
        """
        self.store.failing[BOB] = InsufficientStorage("cannot deliver message: No space left on device")
        self.store.failing[CAROL] = TemporaryFailure("cannot deliver message: I/O error")
        with capturedLogs() as events:
            out = self.feed(
                b"MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<alice@example.org>\r\n"
                b"RCPT TO:<carol@example.org>\r\nDATA\r\n" + MESSAGE + b".\r\n"
            )
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK * 3 + START_DATA + FULL + QUEUED + TEMPFAIL)
        self.assertEqual(self.stored(ALICE), [MESSAGE])
        self.assertEqual(self.store.boxes.get(BOB), None)
        self.assertEqual(self.store.boxes.get(CAROL), None)
        lines = [formatEvent(e) for e in events]
        self.assertRegex(
            lines[-1],
            r'^lmtp: accepted id=[0-9A-F]{16} rhost=unix from="" recipients=1 size=\d+ failed=2$',
        )
        self.assertRegex(
            lines[-3],
            r'^lmtp: refused recipient message id=[0-9A-F]{16} rhost=unix from="" to="bob@example.org"'
            r' reply="452 4.3.1 Insufficient system storage" error="cannot deliver message: No space left on device"$',
        )

    def test_listAliasOneRecipient(self) -> None:
        """
        A list alias is one RCPT: one reply, a copy for each of its users;
        a user it shares with a later RCPT gets one copy and both RCPTs
        the outcome of that copy.
        """
        self.store.failing[BOB] = InsufficientStorage("full")
        out = self.feed(
            b"MAIL FROM:<>\r\nRCPT TO:<carol@example.org>\r\nRCPT TO:<team@example.org>\r\nRCPT TO:<bob+x@example.org>\r\n"
            b"DATA\r\n" + MESSAGE + b".\r\n"
        )
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK * 3 + START_DATA + QUEUED + FULL + FULL)
        self.assertEqual(self.stored(CAROL), [MESSAGE])
        self.assertEqual(self.store.boxes.get(ALICE), None)
        self.assertEqual(self.store.boxes.get(BOB), None)

    def test_refusalOncePerRecipient(self) -> None:
        """
        A message refused as a whole at the end of its data (bare CR) gets
        the refusal once per accepted recipient; nothing is stored.
        """
        out = self.feed(
            b"MAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
            b"Subject: x\r\n\r\na\rb\r\n.\r\n"
        )
        self.assertEqual(out, SENDER_OK + RCPT_OK * 2 + START_DATA + b"550 5.6.11 Bare CR not allowed\r\n" * 2)
        self.assertEqual(self.store.boxes, {})

    def test_dataWithoutRecipients(self) -> None:
        """
        DATA with no accepted RCPT fails with 503 (RFC 2033 4.2).
        """
        out = self.feed(b"MAIL FROM:<>\r\nRCPT TO:<nobody@example.org>\r\nDATA\r\n")
        self.assertEqual(out, SENDER_OK + USER_UNKNOWN + b"503 5.5.1 No valid recipients\r\n")

    def test_writeFailureInOnePart(self) -> None:
        """
        A maildrop whose write fails while the data streams in gives its
        recipient 452 at the end of the data; the other recipient gets 250
        and its copy; a log line for the accepted message counts one
        failure.
        """
        original = self.store.beginDelivery

        def beginDelivery(recipients, trace=b""):
            delivery = original(recipients, trace)
            if BOB in recipients:
                def write(data):
                    raise InsufficientStorage("cannot write message: No space left on device")
                delivery.write = write
            return delivery

        self.store.beginDelivery = beginDelivery
        with capturedLogs() as events:
            out = self.feed(
                b"MAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
                + MESSAGE + b".\r\n"
            )
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK * 2 + START_DATA + QUEUED + FULL)
        self.assertEqual(self.stored(ALICE), [MESSAGE])
        self.assertEqual(self.store.boxes.get(BOB), None)
        self.assertRegex(formatEvent(events[-1]), r" recipients=1 size=\d+ failed=1$")

    def test_everyPartFailsNoAcceptedLine(self) -> None:
        """
        When every recipient's maildrop fails there is no accepted line:
        one refused line per recipient.
        """
        self.store.failing[ALICE] = TemporaryFailure("cannot deliver message: I/O error")
        with capturedLogs() as events:
            out = self.feed(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n" + MESSAGE + b".\r\n")
        self.assertEqual(out, SENDER_OK + RCPT_OK + START_DATA + TEMPFAIL)
        self.assertEqual([formatEvent(e).split(" id=")[0] for e in events], ["lmtp: refused recipient message"])

    def test_smuggling(self) -> None:
        """
        Only CRLF.CRLF ends the data: a second envelope after "\\n.\\n" is
        content of the one message.
        """
        smuggled = b"MAIL FROM:<admin@example.org>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nsmuggled\r\n"
        out = self.feed(
            b"MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n" + MESSAGE + b"first\n.\n" + smuggled + b".\r\n"
        )
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK + START_DATA + QUEUED)
        self.assertEqual(self.stored(BOB), [MESSAGE + b"first\r\n.\r\n" + smuggled])
        self.assertEqual(self.store.boxes.get(ALICE), None)


class BDATTests(LMTPTestsMixin, SynchronousTestCase):
    """
    CHUNKING (RFC 3030) over LMTP: after BDAT LAST, one reply per accepted
    RCPT, in RCPT order.
    """

    def setUp(self) -> None:
        super().setUp()
        self.feed(b"LHLO mta.example.org\r\n")

    def test_oneReplyPerRecipientAfterLast(self) -> None:
        """
        Intermediate chunks get one reply each; BDAT LAST gets one per
        recipient, a failing maildrop its own 452.
        """
        self.store.failing[BOB] = InsufficientStorage("full")
        out = self.feed(
            b"MAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
            b"BDAT 10\r\n" + MESSAGE[:10] + b"BDAT %d LAST\r\n" % (len(MESSAGE) - 10) + MESSAGE[10:]
        )
        self.assertEqual(
            queuedReply(out), SENDER_OK + RCPT_OK * 2 + b"250 2.0.0 10 octets received\r\n" + QUEUED + FULL
        )
        self.assertEqual(self.stored(ALICE), [MESSAGE])
        self.assertEqual(self.store.boxes.get(BOB), None)

    def test_refusalAtLastOncePerRecipient(self) -> None:
        """
        A message refused in its last chunk gets the refusal once per
        recipient, as with DATA.
        """
        body = b"Subject: x\r\n\r\na\rb\r\n"
        out = self.feed(
            b"MAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
            b"BDAT %d LAST\r\n" % len(body) + body
        )
        self.assertEqual(out, SENDER_OK + RCPT_OK * 2 + b"550 5.6.11 Bare CR not allowed\r\n" * 2)
        self.assertEqual(self.store.boxes, {})


class SMTPUTF8Tests(LMTPTestsMixin, SynchronousTestCase):
    """
    SMTPUTF8 (RFC 6531) over LMTP.
    """

    def test_utf8Recipient(self) -> None:
        """
        With SMTPUTF8 on MAIL, a UTF-8 local part is accepted and the UTF-8
        message stored unchanged; without it, 553 5.6.7.
        """
        jorg = Address.parse("j\u00f6rg@example.org")
        self.users.users[jorg] = "x"
        self.feed(b"LHLO mta.example.org\r\n")
        self.assertEqual(
            self.feed("MAIL FROM:<>\r\nRCPT TO:<j\u00f6rg@example.org>\r\nRSET\r\n".encode("utf-8")),
            SENDER_OK + b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n" + b"250 2.0.0 OK\r\n",
        )
        message = "Subject: \u00e4\r\n\r\n\u00f6\r\n".encode("utf-8")
        out = self.feed(
            "MAIL FROM:<\u00e4@remote.example> SMTPUTF8\r\nRCPT TO:<J\u00d6RG@example.org>\r\nDATA\r\n".encode("utf-8")
            + message
            + b".\r\n"
        )
        self.assertEqual(queuedReply(out), SENDER_OK + RCPT_OK + START_DATA + QUEUED)
        self.assertEqual(self.stored(jorg), [message])
        self.assertIn(b"with UTF8LMTP id ", self.store.boxes[jorg][0][1])


XFORWARD_OK = b"250 2.0.0 Ok\r\n"
SPOOF = b"From: The Boss <boss@bad.example>\r\nSubject: urgent\r\n\r\nPay this.\r\n"
TRUSTED = b"Authentication-Results: MX1.example.org; dmarc=pass header.from=good.example\r\n"


def passing(message, session) -> mailauth.AuthenticationResults:
    return mailauth.AuthenticationResults(
        mailauth.SPFResult("pass", "mailfrom", "good.example", "x@good.example"),
        (),
        mailauth.DMARCResult("pass", "good.example", "reject", "none"),
    )


class XForwardTests(LMTPTestsMixin, SynchronousTestCase):
    """
    XFORWARD (Postfix's C{lmtp_send_xforward_command}): the original
    client's address and HELO name for the checks.
    """

    def setUp(self) -> None:
        super().setUp()
        self.sessions: list = []

        def authenticate(message, session):
            self.sessions.append(session)
            return passing(message, session)

        policy = inbound.InboundPolicy(lmtpChecks=True, trustedAuthservIDs=frozenset({"mx1.example.org"}))
        self.factory.checker = inbound.InboundChecker(HOST, policy, ImmediateRunner(), self.clock,
                                                      authenticate=authenticate)
        self.feed(b"LHLO mta.example.org\r\n")

    def send(self, message: bytes = MESSAGE) -> bytes:
        return queuedReply(self.feed(
            b"MAIL FROM:<x@good.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n" + message + b".\r\n"
        ))

    def test_attributesReachTheChecks(self) -> None:
        """
        XFORWARD's ADDR (C{IPV6:} prefix dropped) and HELO (xtext decoded)
        are the client the checks see; the envelope sender and recipients
        are the transaction's.
        """
        out = self.feed(b"XFORWARD NAME=client.good.example ADDR=IPV6:2001:db8::7 PORT=4321\r\n"
                        b"XFORWARD PROTO=ESMTP HELO=client+2Egood.example SOURCE=REMOTE IDENT=abc\r\n")
        self.assertEqual(out, XFORWARD_OK * 2)
        self.assertEqual(self.send(), SENDER_OK + RCPT_OK + START_DATA + QUEUED)
        self.assertEqual(self.sessions, [
            inbound.Session("2001:db8::7", "client.good.example", "x@good.example", ("alice@example.org",))])

    def test_resetAfterTransaction(self) -> None:
        """
        The attributes hold for one transaction: the next one without
        XFORWARD has no client address (SPF none), as has one after RSET
        or an attribute given as C{[UNAVAILABLE]}.
        """
        self.feed(b"XFORWARD ADDR=192.0.2.7 HELO=client.good.example\r\n")
        self.send()
        self.send()
        self.feed(b"XFORWARD ADDR=192.0.2.7\r\nRSET\r\n")
        self.send()
        self.feed(b"XFORWARD ADDR=192.0.2.7\r\nXFORWARD ADDR=[UNAVAILABLE]\r\n")
        self.send()
        self.assertEqual([(s.ip, s.helo) for s in self.sessions],
                         [("192.0.2.7", "client.good.example"), ("", ""), ("", ""), ("", "")])

    def test_refused(self) -> None:
        """
        A bad XFORWARD gets a fixed reply and changes nothing: no
        argument, no C{=}, an unknown attribute, an address that is not
        one, a bad port or source, a value over 255 octets, a bad xtext
        escape; inside a transaction it is out of sequence, before LHLO
        too.
        """
        out = self.feed(
            b"XFORWARD\r\nXFORWARD ADDR\r\nXFORWARD COLOR=red\r\nXFORWARD ADDR=192.0.2.7 ADDR2=x\r\n"
            b"XFORWARD ADDR=mx.example\r\nXFORWARD PORT=99999\r\nXFORWARD SOURCE=MOON\r\n"
            b"XFORWARD HELO=" + b"a" * 256 + b"\r\nXFORWARD HELO=a+zz\r\n"
        )
        self.assertEqual(
            out,
            b"501 5.5.4 Syntax: XFORWARD attribute=value...\r\n" * 2
            + b"501 5.5.4 Bad XFORWARD attribute name\r\n" * 2
            + b"501 5.5.4 Bad XFORWARD attribute value\r\n" * 5,
        )
        self.assertEqual(self.feed(b"MAIL FROM:<x@good.example>\r\nXFORWARD ADDR=192.0.2.7\r\nRSET\r\n"),
                         SENDER_OK + b"503 5.5.1 Error: MAIL transaction in progress\r\n" + b"250 2.0.0 OK\r\n")
        self.send()
        self.assertEqual(self.sessions[0].ip, "")
        fresh = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=UNIXAddress(None))
        fresh.makeConnection(transport)
        fresh.dataReceived(b"XFORWARD ADDR=192.0.2.7\r\n")
        self.assertEqual(transport.value(), GREETING + b"503 5.5.1 Send LHLO first\r\n")

    def test_trustedFrontUnchanged(self) -> None:
        """
        A message whose topmost C{Authentication-Results:} names a trusted
        front MTA (in any case) is stored unchanged, without checks.
        """
        self.assertEqual(self.send(TRUSTED + SPOOF), SENDER_OK + RCPT_OK + START_DATA + QUEUED)
        self.assertEqual(self.sessions, [])
        self.assertEqual(self.stored(ALICE), [TRUSTED + SPOOF])

    def test_untrustedChecked(self) -> None:
        """
        A message whose topmost C{Authentication-Results:} names another
        host is checked: one field naming this host on top, the forged
        one claiming the trusted front (below it) removed, the other kept.
        """
        other = b"Authentication-Results: elsewhere.example; spf=pass\r\n"
        with capturedLogs() as events:
            self.assertEqual(self.send(other + TRUSTED + SPOOF), SENDER_OK + RCPT_OK + START_DATA + QUEUED)
        self.assertEqual(len(self.sessions), 1)
        data = self.store.boxes[ALICE][0][1]
        self.assertTrue(data.startswith(
            b"Authentication-Results: mail.example.org;\r\n\tspf=pass smtp.mailfrom=x@good.example;\r\n"
            b"\tdkim=none;\r\n\tdmarc=pass header.from=good.example policy.dmarc=reject\r\n"
            b"Received: from mta.example.org (unix)\r\n"), data)
        self.assertTrue(data.endswith(b"\r\n" + other + SPOOF), data)
        self.assertIn('lmtp: checked rhost=unix client=unknown from="x@good.example" spf=pass dkim=none dmarc=pass action=deliver',
                      [formatEvent(e) for e in events])


class _ThreadRunner:
    """
    An C{IBlockingRunner} running in the reactor's thread pool; keeps the
    last call's C{Deferred}.
    """

    last: defer.Deferred

    def run(self, f, *args):
        self.last = threads.deferToThread(f, *args)
        return self.last


class DMARCOverLMTPTests(LMTPTestsMixin, TestCase):
    """
    The checks over LMTP against a DNS server on loopback: a DMARC
    p=reject failure is quarantined by default (refusing it would make the
    front MTA bounce to a possibly forged sender), refused per recipient
    with C{lmtp-dmarc-reject}.
    """

    def setUp(self) -> None:
        super().setUp()
        _, port, ports = listen(reactor, {
            "bad.example": [txt("v=spf1 ip4:192.0.2.1 -all")],
            "_dmarc.bad.example": [txt("v=DMARC1; p=reject")],
        })
        for p in ports:
            self.addCleanup(p.stopListening)
        self.port = port
        self.runner = _ThreadRunner()
        self.feed(b"LHLO mta.example.org\r\n")

    def checker(self, **kwargs) -> inbound.InboundChecker:
        policy = inbound.InboundPolicy(dnsServer=("127.0.0.1", self.port), lmtpChecks=True, **kwargs)
        return inbound.InboundChecker(HOST, policy, self.runner, reactor)

    async def send(self) -> bytes:
        out = self.feed(
            b"XFORWARD ADDR=192.0.2.99 HELO=client.bad.example\r\nMAIL FROM:<boss@bad.example>\r\n"
            b"RCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n" + SPOOF + b".\r\n"
        )
        await self.runner.last
        return queuedReply(out + self.feed(b""))

    async def test_quarantinedByDefault(self) -> None:
        """
        SPF fail from the forwarded address, no DKIM, p=reject: delivered
        to both recipients with the results, C{X-Spam-Flag: YES} and the
        subject tag.
        """
        self.factory.checker = self.checker()
        out = await self.send()
        self.assertEqual(out, XFORWARD_OK + SENDER_OK + RCPT_OK * 2 + START_DATA + QUEUED * 2)
        for user in (ALICE, BOB):
            data = self.store.boxes[user][0][1]
            self.assertTrue(data.startswith(
                b"Authentication-Results: mail.example.org;\r\n\tspf=fail smtp.mailfrom=boss@bad.example;\r\n"
                b"\tdkim=none;\r\n\tdmarc=fail header.from=bad.example policy.dmarc=reject\r\n"
                b"X-Spam-Flag: YES\r\nReceived: from mta.example.org (unix)\r\n"), data)
            self.assertTrue(data.endswith(b"\r\nFrom: The Boss <boss@bad.example>\r\nSubject: [SPAM] urgent\r\n"
                                          b"\r\nPay this.\r\n"), data)

    async def test_rejectedPerRecipient(self) -> None:
        """
        With C{lmtp-dmarc-reject = yes}: C{550 5.7.1} for each recipient,
        nothing stored.
        """
        self.factory.checker = self.checker(lmtpDMARCReject=True)
        out = await self.send()
        self.assertEqual(out, XFORWARD_OK + SENDER_OK + RCPT_OK * 2 + START_DATA
                         + b"550 5.7.1 Message rejected by the sender domain's DMARC policy\r\n" * 2)
        self.assertEqual(self.store.boxes, {})
