"""
Wiring: L{makeService} builds every listener from the configuration, all
sharing one portal, without opening real sockets.
"""

from __future__ import annotations

import os

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.config import Options
from pop3gw.limits import ConnectionLimitFactory
from pop3gw.pop3 import POP3Factory
from pop3gw.service import ListenerService, makeService
from pop3gw.smtp import SubmissionFactory


def options(*args: str) -> Options:
    o = Options()
    o.parseOptions(list(args))
    return o


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dataDir = os.path.abspath(self.mktemp())
        self.reactor = MemoryReactorClock()

    def build(self, *args: str):
        top = makeService(options("--data-dir", self.dataDir, "--hostname", "mail.example.org", *args), self.reactor)
        listeners = [s for s in top if isinstance(s, ListenerService)]
        return top, listeners

    def test_defaults(self) -> None:
        """
        By default there is one POP3 listener on loopback port 1110 and one
        submission listener on loopback port 1587; the data directory, its
        maildrop and queue directories and a self-signed certificate exist.
        """
        top, listeners = self.build()
        self.assertEqual(sorted((s.listenerName, s.description) for s in listeners), [
            ("pop3", "tcp:1110:interface=127.0.0.1"),
            ("submission", "tcp:1587:interface=127.0.0.1"),
        ])
        for sub in ("mail", "queue", "tls/cert.pem", "tls/key.pem"):
            self.assertTrue(os.path.exists(os.path.join(self.dataDir, sub)), sub)
        for s in listeners:
            s.privilegedStartService()
        ports = sorted((port, iface) for port, factory, backlog, iface in self.reactor.tcpServers)
        self.assertEqual(ports, [(1110, "127.0.0.1"), (1587, "127.0.0.1")])

    def test_sharedPortalAndImplicitTLS(self) -> None:
        """
        Every listener is wrapped in the connection limiter; implicit-TLS
        listeners add a TLS layer around the same protocol factory; POP3 and
        submission share one portal.
        """
        top, listeners = self.build("--pop3", "tcp:2110", "--pop3s", "tcp:2995", "--submission", "tcp:2587",
                                    "--submissions", "tcp:2465")
        byName = {s.listenerName: s.factory for s in listeners}
        self.assertEqual(sorted(byName), ["pop3", "pop3s", "submission", "submissions"])
        for factory in byName.values():
            self.assertIsInstance(factory, ConnectionLimitFactory)
        self.assertIsInstance(byName["pop3"].wrappedFactory, POP3Factory)
        self.assertIsInstance(byName["pop3s"].wrappedFactory, TLSMemoryBIOFactory)
        self.assertIs(byName["pop3s"].wrappedFactory.wrappedFactory, byName["pop3"].wrappedFactory)
        self.assertIsInstance(byName["submission"].wrappedFactory, SubmissionFactory)
        self.assertIs(byName["pop3"].wrappedFactory.portal, byName["submission"].wrappedFactory.portal)

    def test_disabledListener(self) -> None:
        """
        C{none} disables a listener.
        """
        top, listeners = self.build("--submission", "none")
        self.assertEqual([s.listenerName for s in listeners], ["pop3"])

    def test_badCertificateIsOneLine(self) -> None:
        """
        An unreadable certificate stops start-up with one line, not a
        traceback.
        """
        missing = os.path.join(self.dataDir, "missing.pem")
        with self.assertRaises(SystemExit) as e:
            self.build("--tls-cert", missing, "--tls-key", missing)
        self.assertIn("missing.pem", str(e.exception))
        self.assertNotIn("\n", str(e.exception))


class _Collector(Protocol):
    """
    Collects what arrives over the TLS connection and how it ended.
    """

    received = b""
    lost = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost = reason


class _RecordingTransport(iosim.FakeTransport):
    """
    An iosim transport that records the raw octets its protocol receives.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.raw = b""

    def bufferReceived(self, data: bytes) -> None:
        self.raw += data
        super().bufferReceived(data)


class ImplicitTLSRefusalTests(SynchronousTestCase):
    """
    On the implicit-TLS listeners, a connection over the limits is closed
    without a byte: a plaintext refusal would land in the client's TLS
    handshake.
    """

    def setUp(self) -> None:
        self.dataDir = os.path.abspath(self.mktemp())
        self.reactor = MemoryReactorClock()
        top = makeService(
            options("--data-dir", self.dataDir, "--hostname", "mail.example.org", "--pop3s", "tcp:2995",
                    "--submissions", "tcp:2465"),
            self.reactor,
        )
        self.listeners = {s.listenerName: s.factory for s in top if isinstance(s, ListenerService)}

    def handshake(self, factory, host: str) -> tuple:
        """
        Connect a real TLS client from C{host} to C{factory} in memory and
        run the exchange to its end.

        @return: the client's application protocol and its transport.
        """
        addr = IPv4Address("TCP", host, 40000)
        server = factory.buildProtocol(addr)
        collector = _Collector()
        client = TLSMemoryBIOFactory(
            CertificateOptions(), True, Factory.forProtocol(lambda: collector), self.reactor
        ).buildProtocol(IPv4Address("TCP", "127.0.0.1", 2995))
        clientTransport = _RecordingTransport(client, isServer=False, peerAddress=addr)
        serverTransport = iosim.FakeTransport(server, isServer=True, peerAddress=addr)
        iosim.connect(server, serverTransport, client, clientTransport, clock=self.reactor)
        return collector, clientTransport

    def test_closedWithoutPlaintext(self) -> None:
        """
        Within the per-address cap, the TLS handshake completes and the
        greeting arrives over TLS; over it, the connection is closed and
        the client receives no octet at all (no plaintext refusal in its
        handshake).
        """
        cases = [
            ("pop3s", "192.0.2.1", b"+OK pop3gw ready.\r\n"),
            ("submissions", "192.0.2.2", b"220 mail.example.org ESMTP ready\r\n"),
        ]
        for name, host, greeting in cases:
            with self.subTest(listener=name):
                factory = self.listeners[name]
                factory.maxPerPeer = 1
                accepted, _ = self.handshake(factory, host)
                self.assertEqual(accepted.received, greeting)
                self.assertIsNone(accepted.lost)
                refused, transport = self.handshake(factory, host)
                self.assertEqual(transport.raw, b"")
                self.assertEqual(refused.received, b"")
                self.assertIsNotNone(refused.lost)


class OperatorErrorTests(SynchronousTestCase):
    """
    Operator mistakes end start-up with one line, never a traceback.
    """

    def setUp(self) -> None:
        self.dataDir = os.path.abspath(self.mktemp())

    def assertOneLine(self, exc: SystemExit, *fragments: str) -> None:
        text = str(exc)
        self.assertTrue(text.startswith("pop3gw: "), text)
        self.assertNotIn("\n", text)
        for fragment in fragments:
            self.assertIn(fragment, text)

    def test_badEndpointDescription(self) -> None:
        """
        An endpoint description that does not parse is named in one line.
        """
        for bad in ("bogus:1", "tcp:abc"):
            with self.assertRaises(SystemExit) as e:
                makeService(options("--data-dir", self.dataDir, "--pop3", bad), MemoryReactorClock())
            self.assertOneLine(e.exception, bad)

    def test_portInUse(self) -> None:
        """
        A listener that cannot bind stops start-up with one line naming the
        listener, the endpoint and the reason.
        """
        from twisted.internet.error import CannotListenError

        class BusyReactor(MemoryReactorClock):
            def listenTCP(self, port, factory, backlog=50, interface=""):
                raise CannotListenError(interface, port, OSError(98, "Address already in use"))

        top = makeService(options("--data-dir", self.dataDir, "--submission", "none"), BusyReactor())
        [listener] = [s for s in top if isinstance(s, ListenerService)]
        with self.assertRaises(SystemExit) as e:
            listener.privilegedStartService()
        self.assertOneLine(e.exception, "pop3", "tcp:1110:interface=127.0.0.1", "Address already in use")

    def test_dataDirIsAFile(self) -> None:
        """
        A data directory that is a file is one clear line.
        """
        with open(self.dataDir, "w"):
            pass
        with self.assertRaises(SystemExit) as e:
            makeService(options("--data-dir", self.dataDir), MemoryReactorClock())
        self.assertOneLine(e.exception, "data directory", self.dataDir)

    def test_badOptionUnderTwistd(self) -> None:
        """
        The options class twistd uses turns a bad value into one line on
        stderr (not twistd's whole help text).
        """
        from pop3gw.service import Options as TwistdOptions

        with self.assertRaises(SystemExit) as e:
            TwistdOptions().parseOptions(["--plaintext-auth", "sometimes"])
        self.assertOneLine(e.exception, "plaintext-auth")
