"""
Tests for L{pop3gw.relay.client}: L{deliverOnce} over fake endpoints, the
typed results (L{RelayError}, L{SessionResult}), dot-stuffing and the plain
words given to Twisted's client errors.
"""

from __future__ import annotations

import io

from OpenSSL import SSL
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from pop3gw.address import Address
from pop3gw.queue import Outcome, OutcomeKind
from pop3gw.relay.client import (
    CACHE_IDLE_TIME,
    ConnectionCache,
    Phase,
    RelayError,
    SessionResult,
    TLSPolicy,
    _DotStuffer,
    deliverOnce,
    describeConnectFailure,
    describeError,
)
from tests.queuehelpers import (
    ALICE,
    BOB,
    CAROL,
    EHLO_OK,
    EHLO_UTF8,
    GREETING,
    JORG,
    OK,
    SENT,
    STORED,
    FakeEndpoint,
    TLSStringTransport,
    successReplies,
)


class RelayErrorTests(unittest.SynchronousTestCase):
    """
    L{RelayError} is built from a reply with its class and enhanced status.
    """

    def test_permanentWithEnhanced(self):
        """
        A 5xx reply with a 5.x.y status is permanent with that status.
        """
        e = RelayError.fromReply(550, b"5.1.1 no such user", Phase.RCPT)
        self.assertEqual(e, RelayError(True, 550, "5.1.1", Phase.RCPT, "550 5.1.1 no such user"))
        self.assertEqual(e.outcome(), Outcome(OutcomeKind.FAILED, "5.1.1", "550 5.1.1 no such user"))

    def test_temporaryMismatchedStatus(self):
        """
        A 4xx reply whose enhanced status has another class gets 4.0.0.
        """
        e = RelayError.fromReply(451, b"5.1.1 odd", Phase.DATA)
        self.assertEqual((e.permanent, e.enhanced), (False, "4.0.0"))
        self.assertEqual(e.outcome().kind, OutcomeKind.DEFERRED)

    def test_multilineReplyIsOneLine(self):
        """
        The text is one line even for a multi-line reply.
        """
        e = RelayError.fromReply(421, b"4.3.2 going\nbye now", Phase.GREETING)
        self.assertNotIn("\n", e.text)
        self.assertTrue(e.text.startswith("421 4.3.2 going"))


class DeliverOnceTests(unittest.SynchronousTestCase):
    """
    L{deliverOnce} carries one message over one connection.
    """

    def setUp(self):
        self.clock = Clock()
        self.connects = []
        self.endpoint = FakeEndpoint("mx.remote.example", 25, self.connects)
        self.contexts = []

    def contextFor(self, policy):
        self.contexts.append(policy)
        return f"CTX-{policy.value}", policy is TLSPolicy.REQUIRED_STARTTLS

    def deliver(self, recipients=(BOB,), policy=TLSPolicy.OPPORTUNISTIC, credentials=None, sender=ALICE, **kw):
        self.message = io.BytesIO(STORED)
        return deliverOnce(
            self.endpoint,
            sender,
            list(recipients),
            self.message,
            policy,
            credentials,
            identity="mx.example.org",
            clock=self.clock,
            **kw,
        )

    def test_conversation(self):
        """
        The client sends EHLO, MAIL, RCPT, DATA with the dot-stuffed
        message, and QUIT; each recipient gets its outcome and the message
        file is closed.
        """
        d = self.deliver()
        sent = self.endpoint.serve(successReplies())
        self.assertEqual(
            sent,
            [
                b"EHLO mx.example.org\r\n",
                b"MAIL FROM:<alice@example.org>\r\n",
                b"RCPT TO:<bob@remote.example>\r\n",
                b"DATA\r\n",
                SENT,
                b"QUIT\r\n",
                b"",
            ],
        )
        self.assertEqual(
            self.successResultOf(d),
            SessionResult({BOB: Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 2.0.0 ok")}, None, False, False, False),
        )
        self.assertTrue(self.message.closed)

    def test_resultBeforeQuitReply(self):
        """
        Without a connection cache, the session's result is given once the
        server accepted the end of data: C{QUIT} is sent and its reply not
        waited for; the message file is closed then, and the connection
        once the server answers C{QUIT}.
        """
        d = self.deliver()
        replies = successReplies()
        self.endpoint.open()
        sent = [self.endpoint.feed(r) for r in replies[:-1]]
        self.assertEqual(sent[-2:], [SENT, b"QUIT\r\n"])
        self.assertEqual(
            self.successResultOf(d),
            SessionResult({BOB: Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 2.0.0 ok")}, None, False, False, False),
        )
        self.assertTrue(self.message.closed)
        self.assertFalse(self.endpoint.transport.disconnecting)
        self.assertEqual(self.endpoint.feed(replies[-1]), b"")
        self.assertTrue(self.endpoint.transport.disconnecting)
        self.endpoint.close()

    def test_resultBeforeQuitReplyKeepsRefusals(self):
        """
        A session whose recipients were all refused gives its result
        before the reply to C{QUIT} too, with each refusal.
        """
        d = self.deliver()
        self.endpoint.open()
        for r in [GREETING, EHLO_OK, OK]:
            self.endpoint.feed(r)
        self.assertEqual(self.endpoint.feed(b"550 5.1.1 no such user\r\n"), b"QUIT\r\n")
        self.assertEqual(
            self.successResultOf(d).outcomes,
            {BOB: Outcome(OutcomeKind.FAILED, "5.1.1", "550 5.1.1 no such user")},
        )
        self.endpoint.close()

    def test_smtputf8Offered(self):
        """
        With C{smtputf8} and a server offering SMTPUTF8, MAIL carries the
        parameter and the UTF-8 addresses go as UTF-8.
        """
        d = self.deliver(recipients=[JORG], sender=Address("\u00e4", "example.org"), smtputf8=True)
        sent = self.endpoint.serve([GREETING, EHLO_UTF8, OK, OK, b"354 go\r\n", OK, b"221 bye\r\n"])
        self.assertEqual(
            sent[1:3],
            ["MAIL FROM:<\u00e4@example.org> SMTPUTF8\r\n".encode("utf-8"), "RCPT TO:<j\u00f6rg@remote.example>\r\n".encode("utf-8")],
        )
        self.assertEqual(self.successResultOf(d).outcomes[JORG].kind, OutcomeKind.DELIVERED)

    def test_smtputf8OnlyWhenAsked(self):
        """
        A server offering SMTPUTF8 gets no parameter for a message that was
        not received with it.
        """
        self.deliver()
        sent = self.endpoint.serve([GREETING, EHLO_UTF8, OK, OK, b"354 go\r\n", OK, b"221 bye\r\n"])
        self.assertEqual(sent[1], b"MAIL FROM:<alice@example.org>\r\n")

    def test_utf8SenderWithoutSMTPUTF8(self):
        """
        A UTF-8 sender cannot go to a server without SMTPUTF8: no MAIL is
        sent, every recipient fails with 5.6.7.
        """
        d = self.deliver(recipients=[BOB, CAROL], sender=Address("\u00e4", "example.org"), smtputf8=True)
        sent = self.endpoint.serve([GREETING, EHLO_OK, b"221 bye\r\n"])
        self.assertEqual(sent[:2], [b"EHLO mx.example.org\r\n", b"QUIT\r\n"])
        result = self.successResultOf(d)
        failed = Outcome(
            OutcomeKind.FAILED, "5.6.7", "the server does not offer SMTPUTF8, which the non-ASCII address needs"
        )
        self.assertEqual((result.outcomes, result.error), ({BOB: failed, CAROL: failed}, None))

    def test_utf8RefusedAfterSTARTTLS(self):
        """
        The keywords that count are those of the EHLO after STARTTLS; a
        session that ends before MAIL for want of SMTPUTF8 still says it
        used TLS.
        """
        d = self.deliver(recipients=[JORG], smtputf8=True, contextFor=self.contextFor)
        self.endpoint.open()
        self.endpoint.feed(GREETING)
        self.assertEqual(self.endpoint.feed(b"250-mx\r\n250-SMTPUTF8\r\n250 STARTTLS\r\n"), b"STARTTLS\r\n")
        self.assertEqual(self.endpoint.feed(b"220 go\r\n"), b"EHLO mx.example.org\r\n")
        self.assertEqual(self.endpoint.feed(b"250 mx\r\n"), b"QUIT\r\n")
        self.endpoint.feed(b"221 bye\r\n")
        self.endpoint.close()
        result = self.successResultOf(d)
        self.assertEqual((result.outcomes[JORG].status, result.tls), ("5.6.7", True))

    def test_utf8RecipientWithoutSMTPUTF8(self):
        """
        A UTF-8 recipient fails with 5.6.7 at a server without SMTPUTF8;
        the ASCII recipients are sent, without the parameter.
        """
        d = self.deliver(recipients=[JORG, BOB], smtputf8=True)
        sent = self.endpoint.serve([GREETING, EHLO_OK, OK, OK, b"354 go\r\n", OK, b"221 bye\r\n"])
        self.assertEqual(sent[1:3], [b"MAIL FROM:<alice@example.org>\r\n", b"RCPT TO:<bob@remote.example>\r\n"])
        result = self.successResultOf(d)
        self.assertEqual((result.outcomes[JORG].kind, result.outcomes[JORG].status), (OutcomeKind.FAILED, "5.6.7"))
        self.assertEqual(result.outcomes[BOB].kind, OutcomeKind.DELIVERED)

    def test_perRecipientRefusal(self):
        """
        A recipient refused at RCPT gets the refusal's outcome; the others
        are delivered.
        """
        d = self.deliver(recipients=[BOB, CAROL])
        self.endpoint.serve([GREETING, EHLO_OK, OK, OK, b"550 5.1.1 unknown\r\n", b"354 go\r\n", OK, b"221 bye\r\n"])
        result = self.successResultOf(d)
        self.assertEqual(result.outcomes[CAROL], Outcome(OutcomeKind.FAILED, "5.1.1", "550 5.1.1 unknown"))
        self.assertEqual(result.outcomes[BOB].kind, OutcomeKind.DELIVERED)
        self.assertIsNone(result.error)

    def test_connectionRefused(self):
        """
        A refused connection is a temporary error of the connect phase,
        without a reply code.
        """
        d = self.deliver()
        self.endpoint.refuse()
        result = self.successResultOf(d)
        self.assertEqual(result.outcomes, {})
        self.assertEqual(result.error, RelayError(False, 0, "4.4.1", Phase.CONNECT, "connection refused"))

    def test_requiredStartTLSMissing(self):
        """
        With STARTTLS required and not offered, nothing is sent and the
        error has no made-up reply code.
        """
        d = self.deliver(policy=TLSPolicy.REQUIRED_STARTTLS, contextFor=self.contextFor)
        sent = self.endpoint.serve([GREETING, EHLO_OK, b"221 bye\r\n"])
        self.assertEqual(sent, [b"EHLO mx.example.org\r\n", b"QUIT\r\n", b""])
        error = self.successResultOf(d).error
        self.assertEqual(
            error,
            RelayError(False, 0, "4.4.1", Phase.STARTTLS, "smarthost offers no STARTTLS and certificate verification is on"),
        )

    def test_greetingRefusedKeepsTheCode(self):
        """
        A refusal in the greeting keeps the server's own code.
        """
        d = self.deliver()
        self.endpoint.serve([b"554 5.3.2 no service\r\n", b"221 bye\r\n"])
        error = self.successResultOf(d).error
        self.assertEqual((error.code, error.phase), (554, Phase.GREETING))
        self.assertEqual(error.text, "server refused the session: 554 5.3.2 no service")

    def test_startTLSRefusedKeepsTheCode(self):
        """
        A server that refuses STARTTLS is named with its own reply code, in
        the STARTTLS phase (Twisted keeps the code, not the reply text, so
        the status is the class's generic one).
        """
        d = self.deliver(policy=TLSPolicy.REQUIRED_STARTTLS, contextFor=self.contextFor)
        self.endpoint.serve([GREETING, b"250-mx\r\n250 STARTTLS\r\n", b"454 4.7.0 TLS not available\r\n", b"221 bye\r\n"])
        self.assertEqual(
            self.successResultOf(d).error,
            RelayError(False, 454, "4.0.0", Phase.STARTTLS, "server refused STARTTLS (reply code 454)"),
        )

    def test_opportunisticStartTLS(self):
        """
        Opportunistic TLS uses STARTTLS when offered, with the context
        C{contextFor} gives for the policy.
        """
        self.deliver(contextFor=self.contextFor)
        self.endpoint.open()
        self.endpoint.feed(GREETING)
        self.assertEqual(self.endpoint.feed(b"250-mx\r\n250 STARTTLS\r\n"), b"STARTTLS\r\n")
        self.endpoint.feed(b"220 go\r\n")
        self.assertEqual(self.endpoint.transport.tlsContext, "CTX-opportunistic")
        self.endpoint.close()

    def test_noneNeverStartsTLS(self):
        """
        With the policy C{NONE}, an offered STARTTLS is not used.
        """
        d = self.deliver(policy=TLSPolicy.NONE, contextFor=self.contextFor)
        self.endpoint.open()
        self.endpoint.feed(GREETING)
        self.assertEqual(self.endpoint.feed(b"250-mx\r\n250 STARTTLS\r\n"), b"MAIL FROM:<alice@example.org>\r\n")
        self.endpoint.close()
        self.assertEqual(self.contexts, [])
        self.assertIsNotNone(self.successResultOf(d).error)

    def test_loopbackPolicy(self):
        """
        The loopback policy replaces the policy when the address connected
        to is on this machine, and only then.
        """
        for peer, expected in (
            (IPv4Address("TCP", "127.0.0.1", 25), [TLSPolicy.OPPORTUNISTIC]),
            (UNIXAddress("/run/relay"), [TLSPolicy.OPPORTUNISTIC]),
            (IPv4Address("TCP", "192.0.2.1", 25), [TLSPolicy.REQUIRED_STARTTLS]),
        ):
            del self.contexts[:]
            self.endpoint = FakeEndpoint("relay", 25, self.connects)
            self.deliver(policy=TLSPolicy.REQUIRED_STARTTLS, contextFor=self.contextFor, loopbackPolicy=TLSPolicy.OPPORTUNISTIC)
            self.endpoint.open(TLSStringTransport(peerAddress=peer))
            self.assertEqual(self.contexts, expected, peer)
            self.endpoint.close()

    def test_immediateTLS(self):
        """
        With immediate TLS, the connection is TLS from the first byte: the
        endpoint is given a TLS-wrapping factory with the context for
        C{IMMEDIATE}, and STARTTLS is never asked.
        """
        creator = optionsForClientTLS("relay.example")

        def contextFor(policy):
            self.contexts.append(policy)
            return creator, True

        self.deliver(policy=TLSPolicy.IMMEDIATE, contextFor=contextFor)
        [endpoint] = self.connects
        self.assertIsInstance(endpoint.factory, TLSMemoryBIOFactory)
        self.assertEqual(self.contexts, [TLSPolicy.IMMEDIATE])
        endpoint.open()
        # The first bytes are a TLS ClientHello, not an SMTP command.
        self.assertEqual(endpoint.transport.value()[:1], b"\x16")
        self.assertNotIn(b"EHLO", endpoint.transport.value())

    def test_credentialsRequireTLS(self):
        """
        With credentials, a server without STARTTLS gets no AUTH, whatever
        the policy.
        """
        d = self.deliver(credentials=("gw", "s3cret"), contextFor=self.contextFor)
        sent = self.endpoint.serve([GREETING, b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n", b"221 bye\r\n"])
        self.assertEqual(sent, [b"EHLO mx.example.org\r\n", b"QUIT\r\n", b""])
        self.assertEqual(
            self.successResultOf(d).error.text, "smarthost offers no STARTTLS and relay credentials are sent only over TLS"
        )


class CreatorCallingTransport(TLSStringTransport):
    """
    A transport whose C{startTLS} asks the connection creator for the TLS
    connection at once, as Twisted's TLS layer does, and aborts like a
    real transport.
    """

    aborted = False
    tlsProtocol = None
    tlsConnection = None

    def startTLS(self, contextFactory):
        self.tlsContext = contextFactory
        self.tlsProtocol = object()
        self.tlsConnection = contextFactory.clientConnectionForTLS(self.tlsProtocol)

    def abortConnection(self):
        self.aborted = True
        TLSStringTransport.abortConnection(self)


class TLSSetupFailureTests(unittest.SynchronousTestCase):
    """
    A TLS connection this side cannot build ends the session as a
    temporary failure in plain words, without a traceback.
    """

    def setUp(self):
        self.clock = Clock()
        self.connects = []
        self.endpoint = FakeEndpoint("mx.remote.example", 25, self.connects)

    def deliver(self, contextFor, policy=TLSPolicy.REQUIRED_STARTTLS):
        self.message = io.BytesIO(STORED)
        return deliverOnce(
            self.endpoint, ALICE, [BOB], self.message, policy, None,
            identity="mx.example.org", clock=self.clock, contextFor=contextFor,
        )

    def test_contextCannotBeMade(self):
        """
        When C{contextFor} raises, the client says QUIT instead of
        STARTTLS; the error names the problem, in the STARTTLS phase, with
        no reply code; nothing is logged as an unhandled error.
        """

        def contextFor(policy):
            raise ValueError("no CA file")

        for policy in (TLSPolicy.REQUIRED_STARTTLS, TLSPolicy.OPPORTUNISTIC):
            self.endpoint = FakeEndpoint("mx.remote.example", 25, self.connects)
            d = self.deliver(contextFor, policy)
            sent = self.endpoint.serve([GREETING, b"250-mx\r\n250 STARTTLS\r\n", b"221 bye\r\n"])
            self.assertEqual(sent, [b"EHLO mx.example.org\r\n", b"QUIT\r\n", b""])
            self.assertEqual(
                self.successResultOf(d),
                SessionResult(
                    {}, RelayError(False, 0, "4.4.1", Phase.STARTTLS, "TLS could not be set up here: ValueError: no CA file")
                ),
            )
            self.assertTrue(self.message.closed)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_connectionCannotBeMade(self):
        """
        A connection creator that raises when asked for the TLS connection
        (a trust root that cannot be loaded when it is first needed) does
        not leave the transport half switched to TLS: the connection is
        aborted without another plaintext line and the session ends with a
        temporary failure in plain words; nothing is logged as an unhandled
        error.
        """

        @implementer(IOpenSSLClientConnectionCreator)
        class Broken:
            def clientConnectionForTLS(self, tlsProtocol):
                raise SSL.Error([("x509 certificate routines", "", "no certificate or crl found")])

        d = self.deliver(lambda policy: (Broken(), True))
        self.endpoint.open(CreatorCallingTransport())
        self.endpoint.feed(GREETING)
        self.assertEqual(self.endpoint.feed(b"250-mx\r\n250 STARTTLS\r\n"), b"STARTTLS\r\n")
        self.assertEqual(self.endpoint.feed(b"220 go\r\n"), b"")
        self.assertTrue(self.endpoint.transport.aborted)
        self.endpoint.close()
        error = self.successResultOf(d).error
        self.assertEqual((error.permanent, error.code, error.enhanced, error.phase), (False, 0, "4.4.1", Phase.STARTTLS))
        self.assertTrue(error.text.startswith("TLS could not be set up here: Error: "), error.text)
        self.assertIn("no certificate or crl found", error.text)
        self.assertNotIn("\n", error.text)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_transportStartTLSFails(self):
        """
        When the transport cannot start TLS after the server's 220, the
        connection is dropped without another plaintext line (the server
        now expects a TLS handshake) and the session ends with a temporary
        failure in plain words; nothing is logged as an unhandled error.
        """

        class FailingTLS(TLSStringTransport):
            def startTLS(self, contextFactory):
                raise ValueError("no TLS here")

        d = self.deliver(lambda policy: (optionsForClientTLS("mx.remote.example"), True))
        self.endpoint.open(FailingTLS())
        self.endpoint.feed(GREETING)
        self.assertEqual(self.endpoint.feed(b"250-mx\r\n250 STARTTLS\r\n"), b"STARTTLS\r\n")
        self.assertEqual(self.endpoint.feed(b"220 go\r\n"), b"")
        self.assertTrue(self.endpoint.transport.disconnecting)
        self.endpoint.close()
        self.assertEqual(
            self.successResultOf(d),
            SessionResult(
                {}, RelayError(False, 0, "4.4.1", Phase.STARTTLS, "TLS could not be started: ValueError: no TLS here")
            ),
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_startTLSGivesTheCreatorsConnection(self):
        """
        The transport's C{startTLS} gets the connection the context's
        creator makes for the TLS protocol; the client then says EHLO
        again.
        """
        made = []

        @implementer(IOpenSSLClientConnectionCreator)
        class Creator:
            def clientConnectionForTLS(self, tlsProtocol):
                made.append((tlsProtocol, SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)))
                return made[-1][1]

        self.deliver(lambda policy: (Creator(), True))
        self.endpoint.open(CreatorCallingTransport())
        self.endpoint.feed(GREETING)
        self.assertEqual(self.endpoint.feed(b"250-mx\r\n250 STARTTLS\r\n"), b"STARTTLS\r\n")
        self.assertEqual(self.endpoint.feed(b"220 go\r\n"), b"EHLO mx.example.org\r\n")
        self.assertEqual(made, [(self.endpoint.transport.tlsProtocol, self.endpoint.transport.tlsConnection)])
        self.assertFalse(self.endpoint.transport.aborted)
        self.endpoint.close()

    def test_immediateConnectionCannotBeMade(self):
        """
        With immediate TLS, a creator that raises when the connection is
        made means nothing is sent: the connection is aborted and the
        session is a temporary failure in plain words.
        """

        @implementer(IOpenSSLClientConnectionCreator)
        class Broken:
            def clientConnectionForTLS(self, tlsProtocol):
                raise ValueError("no CA file")

        d = self.deliver(lambda policy: (Broken(), True), TLSPolicy.IMMEDIATE)
        [endpoint] = self.connects
        endpoint.open(CreatorCallingTransport())
        self.assertEqual(endpoint.transport.value(), b"")
        self.assertTrue(endpoint.transport.disconnecting)
        endpoint.close()
        self.assertEqual(
            self.successResultOf(d),
            SessionResult(
                {}, RelayError(False, 0, "4.4.1", Phase.CONNECT, "TLS could not be set up here: ValueError: no CA file")
            ),
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_immediateContextCannotBeMade(self):
        """
        With immediate TLS, a context that cannot be made (or a connection
        its creator cannot make) means no connection attempt: the session
        is a temporary failure in plain words and the message is closed.
        """

        def contextFor(policy):
            raise ValueError("no CA file")

        d = self.deliver(contextFor, TLSPolicy.IMMEDIATE)
        self.assertEqual(self.connects, [])
        self.assertEqual(
            self.successResultOf(d),
            SessionResult(
                {}, RelayError(False, 0, "4.4.1", Phase.CONNECT, "TLS could not be set up here: ValueError: no CA file")
            ),
        )
        self.assertTrue(self.message.closed)
        self.assertEqual(self.flushLoggedErrors(), [])


class DotStufferTests(unittest.SynchronousTestCase):
    """
    Tests for the dot-stuffing reader used for C{DATA}.
    """

    def test_smallReads(self):
        """
        Lines starting with a dot get a second one, whatever the read size;
        a dot in the middle of a line is left alone; the terminating dot
        line follows the message.
        """
        source = b".a\r\nb.c\r\n\r\n..d\r\n" + b"x" * 70000 + b"\r\n.e\r\n"
        expected = b"..a\r\nb.c\r\n\r\n...d\r\n" + b"x" * 70000 + b"\r\n..e\r\n.\r\n"
        for size in (1, 3, 16384):
            reader = _DotStuffer(io.BytesIO(source))
            chunks = []
            while True:
                chunk = reader.read(size)
                if not chunk:
                    break
                self.assertLessEqual(len(chunk), size)
                chunks.append(chunk)
            self.assertEqual(b"".join(chunks), expected)

    def test_longLineWithDot(self):
        """
        A dot after a line-length read boundary inside one long line is not
        at a line start and is not doubled.
        """
        source = b"y" * (64 * 1024) + b".z\r\n"
        self.assertEqual(_DotStuffer(io.BytesIO(source)).read(), source + b".\r\n")

    def test_dotAfterChunkBoundary(self):
        """
        A dot that starts a line right after the boundary of a read from
        the file is doubled; one right after a boundary inside a line is
        not.
        """
        for head in (b"x" * (64 * 1024 - 2) + b"\r\n", b"x" * (64 * 1024)):
            stuffed = b"." if head.endswith(b"\n") else b""
            source = head + b".dot\r\n"
            self.assertEqual(
                _DotStuffer(io.BytesIO(source)).read(16384 * 5), head + stuffed + b".dot\r\n.\r\n"
            )

    def test_readsInChunks(self):
        """
        The message file is read in large chunks, not line by line: a
        message of 1,000 short lines takes two reads (the second finds the
        end).
        """
        calls = []

        class Spy(io.BytesIO):
            def read(self, *args):
                calls.append("read")
                return io.BytesIO.read(self, *args)

            def readline(self, *args):
                calls.append("readline")
                return io.BytesIO.readline(self, *args)

        source = b"line\r\n.dot\r\n" * 500
        self.assertEqual(_DotStuffer(Spy(source)).read(), source.replace(b"\n.", b"\n..") + b".\r\n")
        self.assertEqual(calls, ["read", "read"])

    def test_endWithoutLineEnd(self):
        """
        A message whose last line has no CRLF gets one before the
        terminating dot; the terminator comes once.
        """
        reader = _DotStuffer(io.BytesIO(b"a\r\nb"))
        self.assertEqual((reader.read(), reader.read()), (b"a\r\nb\r\n.\r\n", b""))


class DescribeErrorTests(unittest.SynchronousTestCase):
    """
    Tests for the plain words given to Twisted's SMTP client errors.
    """

    def test_starttlsRefused(self):
        """
        A server that refuses STARTTLS is named with its reply code.
        """
        from twisted.mail.smtp import TLSError

        exc = TLSError(454, b"Could not complete the SSL/TLS handshake")
        self.assertEqual(describeError(exc, False), "server refused STARTTLS (reply code 454)")

    def test_starttlsFailedLocally(self):
        """
        When TLS could not be started after the server's 220, Twisted's
        made-up 451 is not passed off as the server's reply.
        """
        from twisted.mail.smtp import TLSError

        exc = TLSError(451, b"Could not complete the SSL/TLS handshake")
        self.assertEqual(describeError(exc, False, starttlsBegun=True), "TLS could not be started")

    def test_malformedChallenge(self):
        """
        A malformed AUTH challenge is named as such, without Twisted's 501.
        """
        from twisted.mail.smtp import AuthenticationError

        exc = AuthenticationError(
            501, b"Login failed because the SMTP Server returned a malformed Authentication Challenge"
        )
        self.assertEqual(describeError(exc, True), "smarthost sent a malformed AUTH challenge")

    def test_connectFailures(self):
        """
        TCP connection failures are named in plain words.
        """
        from twisted.internet import error as ierror

        cases = [
            (ierror.ConnectionRefusedError(), "connection refused"),
            (ierror.TimeoutError(), "connection timed out"),
            (ierror.TCPTimedOutError(), "connection timed out"),
            (ierror.DNSLookupError("x"), "host name not found"),
            (ierror.NoRouteError(), "no route to host"),
        ]
        self.assertEqual([describeConnectFailure(Failure(e)) for e, _ in cases], [w for _, w in cases])


class ConnectionReuseTests(unittest.SynchronousTestCase):
    """
    With a L{ConnectionCache}, L{deliverOnce} sends several messages to
    one destination over one connection, with C{RSET} between them.
    """

    def setUp(self):
        self.clock = Clock()
        self.connects = []
        self.cache = ConnectionCache(self.clock)

    def deliver(self, recipients=(BOB,), key="smarthost"):
        endpoint = FakeEndpoint("smarthost.example", 25, self.connects)
        message = io.BytesIO(STORED)
        d = deliverOnce(
            endpoint,
            ALICE,
            list(recipients),
            message,
            TLSPolicy.NONE,
            identity="mx.example.org",
            clock=self.clock,
            cache=self.cache,
            cacheKey=key,
        )
        return d, endpoint, message

    def firstMessage(self):
        """
        Send one message over a new connection, up to the server's answer
        to C{RSET}.
        """
        d, endpoint, message = self.deliver()
        endpoint.open()
        sent = [endpoint.feed(r) for r in [GREETING, EHLO_OK, OK, OK, b"354 go ahead\r\n", OK]]
        self.assertEqual(sent[-1], b"RSET\r\n")
        self.assertNoResult(d)
        self.assertEqual(endpoint.feed(OK), b"")
        return d, endpoint, message

    def test_twoMessagesOneConnection(self):
        """
        The second message for the same destination goes over the first
        one's connection: C{RSET}, then straight to C{MAIL FROM}, no new
        connection, greeting or C{EHLO}.  Each message gets its own
        result; the connection is closed with C{QUIT} once it has waited
        L{CACHE_IDLE_TIME} seconds for a third.
        """
        first, endpoint, firstMessage = self.firstMessage()
        delivered = SessionResult({BOB: Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 2.0.0 ok")}, None)
        self.assertEqual(self.successResultOf(first), delivered)
        self.assertTrue(firstMessage.closed)
        self.assertEqual(len(self.cache), 1)
        second, unused, secondMessage = self.deliver(recipients=(CAROL,))
        self.assertEqual(self.connects, [endpoint])
        self.assertEqual(endpoint.transport.value(), b"MAIL FROM:<alice@example.org>\r\n")
        endpoint.transport.clear()
        self.assertEqual(endpoint.feed(OK), b"RCPT TO:<carol@remote.example>\r\n")
        self.assertEqual(endpoint.feed(OK), b"DATA\r\n")
        self.assertEqual(endpoint.feed(b"354 go ahead\r\n"), SENT)
        self.assertEqual(endpoint.feed(OK), b"RSET\r\n")
        self.assertEqual(endpoint.feed(OK), b"")
        self.assertEqual(
            self.successResultOf(second),
            SessionResult({CAROL: Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 2.0.0 ok")}, None),
        )
        self.assertTrue(secondMessage.closed)
        self.clock.advance(CACHE_IDLE_TIME - 0.5)
        self.assertEqual(endpoint.transport.value(), b"")
        self.clock.advance(0.5)
        self.assertEqual(endpoint.transport.value(), b"QUIT\r\n")
        self.assertEqual(len(self.cache), 0)

    def test_otherDestinationNewConnection(self):
        """
        A message for another destination key opens its own connection.
        """
        self.firstMessage()
        d, endpoint, message = self.deliver(key="elsewhere")
        self.assertEqual(len(self.connects), 2)
        self.assertEqual(len(self.cache), 1)

    def test_secondFailureLeavesFirst(self):
        """
        A connection lost during the second message fails only that one
        (temporarily, so it is tried again); the first keeps its delivery.
        """
        first, endpoint, message = self.firstMessage()
        second, unused, secondMessage = self.deliver(recipients=(CAROL,))
        endpoint.feed(OK)
        endpoint.feed(OK)
        endpoint.feed(b"354 go ahead\r\n")
        endpoint.protocol.connectionLost(Failure(ConnectionLost("gone")))
        self.assertEqual(
            self.successResultOf(first),
            SessionResult({BOB: Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 2.0.0 ok")}, None),
        )
        result = self.successResultOf(second)
        self.assertEqual(result.outcomes, {})
        self.assertEqual((result.error.permanent, result.error.enhanced, result.error.phase), (False, "4.4.1", Phase.DATA))
        self.assertTrue(secondMessage.closed)
        self.assertEqual(len(self.cache), 0)
        third, endpoint3, _ = self.deliver()
        self.assertEqual(self.connects[-1], endpoint3)

    def test_refusedResetCloses(self):
        """
        A server that refuses C{RSET} gets C{QUIT}; the message before it
        keeps its result and the connection is not kept.
        """
        d, endpoint, message = self.deliver()
        endpoint.open()
        for r in [GREETING, EHLO_OK, OK, OK, b"354 go ahead\r\n", OK]:
            endpoint.feed(r)
        self.assertEqual(endpoint.feed(b"500 what\r\n"), b"QUIT\r\n")
        self.assertEqual(self.successResultOf(d).outcomes, {BOB: Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 2.0.0 ok")})
        self.assertEqual(len(self.cache), 0)

    def test_replyWhileWaitingCloses(self):
        """
        A line from the server while the connection waits (a time-out
        notice) ends it: C{QUIT}, and it is not handed out again.
        """
        self.firstMessage()
        endpoint = self.connects[0]
        self.assertEqual(endpoint.feed(b"421 idle too long\r\n"), b"QUIT\r\n")
        self.assertEqual(len(self.cache), 0)
        self.deliver()
        self.assertEqual(len(self.connects), 2)

    def test_closeAll(self):
        """
        L{ConnectionCache.closeAll} aborts the waiting connections.
        """
        self.firstMessage()
        endpoint = self.connects[0]
        self.cache.closeAll()
        self.assertTrue(endpoint.transport.disconnecting)
        self.assertEqual(len(self.cache), 0)


#: An EHLO reply offering PIPELINING (RFC 2920).
EHLO_PIPE = b"250-mx.remote.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"

#: The command group for ALICE to BOB and CAROL.
GROUP = (
    b"MAIL FROM:<alice@example.org>\r\n"
    b"RCPT TO:<bob@remote.example>\r\n"
    b"RCPT TO:<carol@remote.example>\r\n"
    b"DATA\r\n"
)


class WriteCountingTransport(TLSStringTransport):
    """
    A transport that counts its writes.
    """

    writes = 0

    def write(self, data):
        self.writes += 1
        TLSStringTransport.write(self, data)


class PipeliningTests(unittest.SynchronousTestCase):
    """
    To a server offering PIPELINING, L{deliverOnce} sends C{MAIL}, every
    C{RCPT} and C{DATA} in one write and matches the replies in order
    (RFC 2920), with the same outcomes as in lockstep.
    """

    def setUp(self):
        self.clock = Clock()
        self.connects = []
        self.endpoint = FakeEndpoint("mx.remote.example", 25, self.connects)
        self.contexts = []

    def deliver(self, recipients=(BOB, CAROL), policy=TLSPolicy.NONE, **kw):
        self.message = io.BytesIO(STORED)
        return deliverOnce(
            self.endpoint,
            ALICE,
            list(recipients),
            self.message,
            policy,
            identity="mx.example.org",
            clock=self.clock,
            **kw,
        )

    def start(self, ehlo=EHLO_PIPE):
        """
        Open the connection and answer the greeting and C{EHLO}.

        @return: what the client wrote after the C{EHLO} reply.
        """
        self.endpoint.open(WriteCountingTransport())
        self.assertEqual(self.endpoint.feed(GREETING), b"EHLO mx.example.org\r\n")
        before = self.endpoint.transport.writes
        sent = self.endpoint.feed(ehlo)
        self.writes = self.endpoint.transport.writes - before
        return sent

    def test_allAccepted(self):
        """
        C{MAIL}, both C{RCPT}s and C{DATA} go in one write; after the
        replies (here in one piece) the message follows, and both
        recipients are delivered.
        """
        d = self.deliver()
        self.assertEqual((self.start(), self.writes), (GROUP, 1))
        self.assertEqual(self.endpoint.feed(OK + OK + OK + b"354 go ahead\r\n"), SENT)
        self.assertEqual(self.endpoint.feed(OK), b"QUIT\r\n")
        self.endpoint.close()
        delivered = Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 2.0.0 ok")
        self.assertEqual(
            self.successResultOf(d), SessionResult({BOB: delivered, CAROL: delivered}, None)
        )
        self.assertTrue(self.message.closed)

    def test_dataAndDotInOneWrite(self):
        """
        The message and its terminating dot go in one write: a dot line
        written alone after the data would wait, with Nagle's algorithm,
        for the server's delayed ACK of the data (some 40 ms on Linux).
        """
        self.deliver()
        self.start()
        self.endpoint.feed(OK + OK + OK)
        before = self.endpoint.transport.writes
        self.assertEqual(self.endpoint.feed(b"354 go ahead\r\n"), SENT)
        self.assertEqual(self.endpoint.transport.writes - before, 1)

    def test_oneRecipientRefused(self):
        """
        A refused C{RCPT} fails that recipient with its reply; the message
        goes to the other.
        """
        d = self.deliver()
        self.start()
        replies = [OK, OK, b"550 5.1.1 unknown\r\n", b"354 go ahead\r\n"]
        self.assertEqual([self.endpoint.feed(r) for r in replies], [b"", b"", b"", SENT])
        self.assertEqual(self.endpoint.feed(b"250 2.0.0 queued\r\n"), b"QUIT\r\n")
        self.endpoint.close()
        result = self.successResultOf(d)
        self.assertEqual(
            result.outcomes,
            {
                BOB: Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 2.0.0 queued"),
                CAROL: Outcome(OutcomeKind.FAILED, "5.1.1", "550 5.1.1 unknown"),
            },
        )
        self.assertIsNone(result.error)

    def test_allRecipientsRefused(self):
        """
        When every C{RCPT} is refused, the expected refusal of C{DATA} is
        read and nothing but C{QUIT} follows; each recipient gets its own
        C{RCPT} reply.
        """
        d = self.deliver()
        self.start()
        replies = (
            OK
            + b"550 5.1.1 unknown\r\n"
            + b"450 4.2.1 busy\r\n"
            + b"554 5.5.1 no valid recipients\r\n"
        )
        self.assertEqual(self.endpoint.feed(replies), b"QUIT\r\n")
        self.endpoint.close()
        self.assertEqual(
            self.successResultOf(d),
            SessionResult(
                {
                    BOB: Outcome(OutcomeKind.FAILED, "5.1.1", "550 5.1.1 unknown"),
                    CAROL: Outcome(OutcomeKind.DEFERRED, "4.2.1", "450 4.2.1 busy"),
                },
                None,
            ),
        )

    def test_allRefusedDataAccepted(self):
        """
        A server that answers C{DATA} with 354 although it refused every
        C{RCPT} gets a lone dot (RFC 2920 3.1), never the message; its
        reply to the dot changes nothing.
        """
        d = self.deliver(recipients=(BOB,))
        self.start()
        self.assertEqual(
            self.endpoint.feed(OK + b"550 5.1.1 unknown\r\n" + b"354 go ahead\r\n"), b".\r\n"
        )
        self.assertEqual(self.endpoint.feed(OK), b"QUIT\r\n")
        self.endpoint.close()
        self.assertEqual(
            self.successResultOf(d).outcomes,
            {BOB: Outcome(OutcomeKind.FAILED, "5.1.1", "550 5.1.1 unknown")},
        )

    def test_mailRefused(self):
        """
        A refused C{MAIL} gives every recipient its reply, whatever the
        C{RCPT} and C{DATA} replies after it say; no data is sent.
        """
        d = self.deliver()
        self.start()
        refusals = b"550 5.7.1 sender refused\r\n" + b"503 5.5.1 need MAIL\r\n" * 3
        self.assertEqual(self.endpoint.feed(refusals), b"QUIT\r\n")
        self.endpoint.close()
        refused = Outcome(OutcomeKind.FAILED, "5.7.1", "550 5.7.1 sender refused")
        self.assertEqual(
            self.successResultOf(d), SessionResult({BOB: refused, CAROL: refused}, None)
        )

    def test_dataRefused(self):
        """
        A refused C{DATA} gives its reply to the recipients accepted.
        """
        d = self.deliver()
        self.start()
        self.assertEqual(
            self.endpoint.feed(OK + OK + b"550 5.1.1 unknown\r\n" + b"451 4.3.0 try later\r\n"),
            b"QUIT\r\n",
        )
        self.endpoint.close()
        self.assertEqual(
            self.successResultOf(d).outcomes,
            {
                BOB: Outcome(OutcomeKind.DEFERRED, "4.3.0", "451 4.3.0 try later"),
                CAROL: Outcome(OutcomeKind.FAILED, "5.1.1", "550 5.1.1 unknown"),
            },
        )

    def test_repliesInPieces(self):
        """
        Replies arriving a few bytes at a time, split inside lines and
        inside a multi-line reply, are matched in order; the message is
        sent once the whole 354 line is in.
        """
        d = self.deliver()
        self.start()
        replies = (
            OK
            + b"250-2.1.5 ok\r\n250 2.1.5 still ok\r\n"
            + b"550 5.1.1 unknown\r\n"
            + b"354 go ahead\r\n"
        )
        pieces = [replies[i : i + 5] for i in range(0, len(replies), 5)]
        sent = [self.endpoint.feed(p) for p in pieces]
        self.assertEqual(sent[:-1], [b""] * (len(pieces) - 1))
        self.assertEqual(sent[-1], SENT)
        self.assertEqual(self.endpoint.feed(OK), b"QUIT\r\n")
        self.endpoint.close()
        result = self.successResultOf(d)
        self.assertEqual(result.outcomes[BOB].kind, OutcomeKind.DELIVERED)
        self.assertEqual(
            result.outcomes[CAROL], Outcome(OutcomeKind.FAILED, "5.1.1", "550 5.1.1 unknown")
        )

    def test_withoutPipelining(self):
        """
        A server without PIPELINING gets one command at a time, as before.
        """
        d = self.deliver()
        self.assertEqual(self.start(EHLO_OK), b"MAIL FROM:<alice@example.org>\r\n")
        sent = [self.endpoint.feed(r) for r in [OK, OK, OK, b"354 go ahead\r\n", OK]]
        self.assertEqual(
            sent,
            [
                b"RCPT TO:<bob@remote.example>\r\n",
                b"RCPT TO:<carol@remote.example>\r\n",
                b"DATA\r\n",
                SENT,
                b"QUIT\r\n",
            ],
        )
        self.endpoint.close()
        self.assertEqual(len(self.successResultOf(d).outcomes), 2)

    def test_smtputf8Parameter(self):
        """
        The pipelined C{MAIL} keeps the SMTPUTF8 parameter.
        """
        self.deliver(recipients=(JORG,), smtputf8=True)
        sent = self.start(b"250-mx.remote.example\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n")
        self.assertEqual(
            sent,
            "MAIL FROM:<alice@example.org> SMTPUTF8\r\nRCPT TO:<j\u00f6rg@remote.example>\r\nDATA\r\n".encode(
                "utf-8"
            ),
        )

    def contextFor(self, policy):
        self.contexts.append(policy)
        return f"CTX-{policy.value}", False

    def test_onlyAfterTLSEhlo(self):
        """
        PIPELINING offered before STARTTLS does not count: C{STARTTLS} is
        sent alone, and the EHLO after the handshake decides.
        """
        self.deliver(policy=TLSPolicy.OPPORTUNISTIC, contextFor=self.contextFor)
        self.assertEqual(
            self.start(b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n"), b"STARTTLS\r\n"
        )
        self.assertEqual(self.endpoint.feed(b"220 go\r\n"), b"EHLO mx.example.org\r\n")
        self.assertEqual(self.endpoint.feed(b"250 mx\r\n"), b"MAIL FROM:<alice@example.org>\r\n")
        self.endpoint.close()

    def test_heloAfterTLSForgetsKeywords(self):
        """
        When the EHLO after STARTTLS is refused and C{HELO} follows, the
        PIPELINING offered in plaintext is forgotten: lockstep.
        """
        self.deliver(policy=TLSPolicy.OPPORTUNISTIC, contextFor=self.contextFor)
        self.start(b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
        self.endpoint.feed(b"220 go\r\n")
        self.assertEqual(self.endpoint.feed(b"500 no\r\n"), b"HELO mx.example.org\r\n")
        self.assertEqual(self.endpoint.feed(b"250 mx\r\n"), b"MAIL FROM:<alice@example.org>\r\n")
        self.endpoint.close()

    def test_injectedRepliesDiscarded(self):
        """
        Replies sent in plaintext after the 220 to C{STARTTLS}, before the
        handshake, are discarded; the pipelined group waits for the TLS
        C{EHLO}.
        """
        self.deliver(policy=TLSPolicy.OPPORTUNISTIC, contextFor=self.contextFor)
        self.start(b"250-mx\r\n250 STARTTLS\r\n")
        injected = b"220 go\r\n" + EHLO_PIPE + OK * 3
        self.assertEqual(self.endpoint.feed(injected), b"EHLO mx.example.org\r\n")
        self.assertEqual(self.endpoint.feed(EHLO_PIPE), GROUP)
        self.endpoint.close()


class PipelinedReuseTests(unittest.SynchronousTestCase):
    """
    A pipelining connection kept in a L{ConnectionCache} sends the C{RSET}
    before the next message in the same write as its C{MAIL}.
    """

    def setUp(self):
        self.clock = Clock()
        self.connects = []
        self.cache = ConnectionCache(self.clock)

    def deliver(self, recipients=(BOB,)):
        endpoint = FakeEndpoint("smarthost.example", 25, self.connects)
        message = io.BytesIO(STORED)
        d = deliverOnce(
            endpoint,
            ALICE,
            list(recipients),
            message,
            TLSPolicy.NONE,
            identity="mx.example.org",
            clock=self.clock,
            cache=self.cache,
            cacheKey="smarthost",
        )
        return d, endpoint

    def firstMessage(self):
        """
        Send one message over a new pipelining connection.
        """
        d, endpoint = self.deliver()
        endpoint.open()
        endpoint.feed(GREETING)
        endpoint.feed(EHLO_PIPE)
        self.assertEqual(endpoint.feed(OK + OK + b"354 go ahead\r\n"), SENT)
        self.assertEqual(endpoint.feed(OK), b"")
        delivered = SessionResult(
            {BOB: Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 2.0.0 ok")}, None
        )
        self.assertEqual(self.successResultOf(d), delivered)
        self.assertEqual(len(self.cache), 1)
        return endpoint

    def test_resetWithNextMail(self):
        """
        The message's result comes with its final reply; the next message
        sends C{RSET}, C{MAIL}, C{RCPT} and C{DATA} together.  An idle
        connection is closed with C{QUIT} alone.
        """
        endpoint = self.firstMessage()
        second, unused = self.deliver(recipients=(CAROL,))
        self.assertEqual(
            endpoint.transport.value(),
            b"RSET\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<carol@remote.example>\r\nDATA\r\n",
        )
        endpoint.transport.clear()
        self.assertEqual(endpoint.feed(OK + OK + OK + b"354 go ahead\r\n"), SENT)
        self.assertEqual(endpoint.feed(OK), b"")
        self.assertEqual(
            self.successResultOf(second).outcomes,
            {CAROL: Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 2.0.0 ok")},
        )
        self.clock.advance(CACHE_IDLE_TIME)
        self.assertEqual(endpoint.transport.value(), b"QUIT\r\n")

    def test_resetRefused(self):
        """
        A refused C{RSET} aborts the connection: the next message gets no
        outcome (it is tried again) and a temporary error with the reply.
        """
        endpoint = self.firstMessage()
        second, unused = self.deliver(recipients=(CAROL,))
        endpoint.transport.clear()
        self.assertEqual(endpoint.feed(b"421 4.3.2 shutting down\r\n"), b"")
        self.assertTrue(endpoint.transport.disconnecting)
        endpoint.close()
        result = self.successResultOf(second)
        self.assertEqual(result.outcomes, {})
        self.assertEqual(
            result.error,
            RelayError(
                False, 421, "4.3.2", Phase.MAIL, "server refused RSET: 421 4.3.2 shutting down"
            ),
        )
        self.assertEqual(len(self.cache), 0)
