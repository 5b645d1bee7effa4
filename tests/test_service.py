"""
Wiring: L{makeService} builds every listener from the configuration, all
sharing one portal, without opening real sockets.
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import socket
import stat
import sys
import tempfile
from typing import Optional

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import defer, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.address import Address
from pop3gw.config import Options
from pop3gw.directory import Directory
from pop3gw.inbound import InboundChecker
from pop3gw.limits import ConnectionLimitFactory
from pop3gw.pop3 import POP3Factory
from pop3gw.relay.service import RelayService
from pop3gw.runner import ThreadPoolRunner
from pop3gw.service import (
    ListenerService,
    LocalDomains,
    StartupReport,
    ThreadPoolService,
    makeService,
)
from pop3gw.smtp import SubmissionFactory
from pop3gw.smtplmtp import LMTPFactory
from pop3gw.smtpmx import MXFactory
from pop3gw.socketmap import SocketmapFactory
from pop3gw.textlog import TextLogService

from .util import OTHER_GID, OTHER_UID, effectiveUser, requireRoot, treeModesAndOwners, withUmask


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

    def test_textLogOncePerTurn(self) -> None:
        """
        A server in one process runs a L{TextLogService} (twistd's text
        log written once per reactor turn), started before the listeners.
        """
        top, listeners = self.build()
        parts = list(top)
        [text] = [s for s in parts if isinstance(s, TextLogService)]
        self.assertIs(text.reactor, self.reactor)
        self.assertLess(parts.index(text), min(parts.index(s) for s in listeners))

    def test_metricsOnEveryInterfaceWarns(self) -> None:
        """
        A C{--metrics} listener bound to every interface (IPv4 or IPv6)
        logs a warning after its listening line: it has no
        authentication.  One on loopback, and the mail listeners on every
        interface, log none.
        """
        from twisted.internet.address import IPv4Address, IPv6Address
        from twisted.logger import LogLevel, formatEvent, globalLogPublisher

        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        class Port:
            def __init__(self, host) -> None:
                self.host = host

            def getHost(self):
                return self.host

        for name, host in [
            ("metrics", IPv4Address("TCP", "0.0.0.0", 9134)),
            ("metrics", IPv6Address("TCP", "::", 9134)),
            ("metrics", IPv4Address("TCP", "127.0.0.1", 9134)),
            ("pop3", IPv4Address("TCP", "0.0.0.0", 110)),
        ]:
            ListenerService(self.reactor, name, "tcp:9134", object())._logListening(Port(host))
        warnings = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(
            warnings,
            [
                f"metrics listening on every interface ({where}): it has no authentication;"
                " bind it to 127.0.0.1 or a management address (interface=...)"
                for where in ("0.0.0.0:9134", ":::9134")
            ],
        )

    def test_mtaSTSForDirectDeliveryOnly(self) -> None:
        """
        Direct MX delivery applies MTA-STS policies; delivery through a
        relay host does not (the smarthost's business).
        """
        from pop3gw.relay import RelayService
        from pop3gw.relay.mtasts import PolicySource

        direct, _ = self.build()
        [relay] = [s for s in direct if isinstance(s, RelayService)]
        self.assertIsInstance(relay.dispatcher.mtaSTS, PolicySource)
        self.dataDir = os.path.abspath(self.mktemp())
        smarthost, _ = self.build("--relay-host", "smtp.example.net")
        [relay] = [s for s in smarthost if isinstance(s, RelayService)]
        self.assertIsNone(relay.dispatcher.mtaSTS)

    def test_mtaSTSCacheAndSwitch(self) -> None:
        """
        The MTA-STS cache is kept in C{DATA/mta-sts.json}, written in the
        I/O pool; C{[relay] mta-sts = no} turns MTA-STS off.
        """
        from pop3gw.relay import RelayService

        direct, _ = self.build()
        [relay] = [s for s in direct if isinstance(s, RelayService)]
        cacheFile = relay.dispatcher.mtaSTS._cacheFile
        self.assertEqual(cacheFile.path, os.path.join(self.dataDir, "mta-sts.json"))
        self.assertIsInstance(cacheFile.runner, ThreadPoolRunner)
        ini = os.path.abspath(self.mktemp())
        with open(ini, "w") as f:
            f.write("[relay]\nmta-sts = no\n")
        self.dataDir = os.path.abspath(self.mktemp())
        off, _ = self.build("--config", ini)
        [relay] = [s for s in off if isinstance(s, RelayService)]
        self.assertIsNone(relay.dispatcher.mtaSTS)

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

    def test_noticeRecipient(self) -> None:
        """
        The relay's notices to the postmaster go to the C{[pop3gw]
        postmaster} user when it is set; else to C{postmaster@} the
        sender's domain, or, for the null sender, the local domain the
        host name is in.
        """
        top, _ = self.build("--domain", "example.org")
        [relay] = [s for s in top if isinstance(s, RelayService)]
        postmasterOf = relay.bouncer.postmasterOf
        assert postmasterOf is not None
        self.assertEqual(postmasterOf(None), Address("postmaster", "example.org"))
        self.assertEqual(postmasterOf(Address("carol", "example.net")), Address("postmaster", "example.net"))
        os.makedirs(self.dataDir, exist_ok=True)
        config = os.path.join(self.dataDir, "pop3gw.ini")
        with open(config, "w") as f:
            f.write("[pop3gw]\npostmaster = bob@example.org\n")
        top, _ = self.build("--config", config, "--domain", "example.org")
        [relay] = [s for s in top if isinstance(s, RelayService)]
        postmasterOf = relay.bouncer.postmasterOf
        assert postmasterOf is not None
        for sender in (None, Address("carol", "example.net")):
            self.assertEqual(postmasterOf(sender), Address("bob", "example.org"))

    def test_relayConnections(self) -> None:
        """
        C{[limits] relay-connections} bounds the messages the relay sends at
        once (20 unless set).
        """
        from pop3gw.relay.service import RelayService

        def bound(top) -> int:
            [relay] = [s for s in top if isinstance(s, RelayService)]
            return relay.dispatcher._semaphore.limit

        self.assertEqual(bound(self.build()[0]), 20)
        ini = os.path.join(self.mktemp())
        with open(ini, "w") as f:
            f.write("[limits]\nrelay-connections = 3\n")
        self.assertEqual(bound(self.build("--config", ini)[0]), 3)

    def test_mxListener(self) -> None:
        """
        C{--mx} adds a plaintext listener behind the same connection
        limiter (and its per-address counts) as the others, over the same
        router, with the SMTP limits and STARTTLS material.
        """
        top, listeners = self.build("--mx", "tcp:2525", "--max-message-size", "2048")
        byName = {s.listenerName: s.factory for s in listeners}
        self.assertEqual(sorted(byName), ["mx", "pop3", "submission"])
        limiter = byName["mx"]
        self.assertIsInstance(limiter, ConnectionLimitFactory)
        self.assertIs(limiter.perPeer, byName["submission"].perPeer)
        mx = limiter.wrappedFactory
        self.assertIsInstance(mx, MXFactory)
        submission = byName["submission"].wrappedFactory
        self.assertIs(mx.router, submission.portal.realm.router)
        self.assertEqual(mx.maxMessageSize, 2048)
        self.assertIs(mx.tlsContextFactory, submission.tlsContextFactory)
        self.assertEqual((mx.maxRecipients, mx.idleTimeout), (submission.maxRecipients, submission.idleTimeout))

    def test_mxReverseLookupsUseDNSServer(self) -> None:
        """
        The MX listener's reverse lookups of its clients go to the
        C{[inbound] dns-server}, as the checks' lookups do, not to the
        system's name servers.
        """
        ini = os.path.abspath(self.mktemp())
        with open(ini, "w") as f:
            f.write("[inbound]\ndns-server = 127.0.0.1:5353\n")
        top, listeners = self.build("--config", ini, "--mx", "tcp:2525")
        [mx] = [s.factory.wrappedFactory for s in listeners if s.listenerName == "mx"]
        resolver = mx.resolver._resolver()
        self.addCleanup(mx.resolver.stop)
        self.assertEqual(resolver.servers, [("127.0.0.1", 5353)])
        self.assertIsNone(resolver.resolv)

    def test_mxInboundChecks(self) -> None:
        """
        The MX listener checks its mail with the C{[inbound]} policy, the
        server's host name as authserv-id, DNS in a pool of its own
        (started and stopped with the server), rspamd when configured.
        """
        ini = os.path.abspath(self.mktemp())
        with open(ini, "w") as f:
            f.write("[inbound]\ndns-server = 127.0.0.1:5353\nrspamd-url = http://127.0.0.1:11333/checkv2\n"
                    "rspamd-timeout = 3\n")
        top, listeners = self.build("--config", ini, "--mx", "tcp:2525")
        [mx] = [s.factory.wrappedFactory for s in listeners if s.listenerName == "mx"]
        checker = mx.checker
        self.assertIsInstance(checker, InboundChecker)
        self.assertEqual((checker.hostname, checker.policy.dnsServer), ("mail.example.org", ("127.0.0.1", 5353)))
        self.assertEqual((checker.rspamd.url, checker.rspamd.timeout, checker.rspamd.clock),
                         ("http://127.0.0.1:11333/checkv2", 3.0, self.reactor))
        self.assertIsInstance(checker.runner, ThreadPoolRunner)
        pools = [s for s in top if isinstance(s, ThreadPoolService) and s.runner is checker.runner]
        self.assertEqual(len(pools), 1)
        self.assertEqual(pools[0].pool.name, "pop3gw-dns")

    def test_mxInboundChecksOff(self) -> None:
        """
        With C{checks = no} and no rspamd, MX mail is stored without a
        checker.
        """
        ini = os.path.abspath(self.mktemp())
        with open(ini, "w") as f:
            f.write("[inbound]\nchecks = no\n")
        top, listeners = self.build("--config", ini, "--mx", "tcp:2525")
        [mx] = [s.factory.wrappedFactory for s in listeners if s.listenerName == "mx"]
        self.assertIsNone(mx.checker)

    def test_lmtpInboundChecks(self) -> None:
        """
        With C{lmtp-checks = yes} the LMTP listener checks with the same
        checker as the MX listener (one DNS pool); without, it has none.
        """
        ini = os.path.abspath(self.mktemp())
        with open(ini, "w") as f:
            f.write("[inbound]\nlmtp-checks = yes\n")
        top, listeners = self.build("--config", ini, "--mx", "tcp:2525", "--lmtp", "unix:/run/x/lmtp")
        byName = {s.listenerName: s.factory.wrappedFactory for s in listeners}
        self.assertIsInstance(byName["lmtp"].checker, InboundChecker)
        self.assertIs(byName["lmtp"].checker, byName["mx"].checker)
        self.assertEqual(len([s for s in top if isinstance(s, ThreadPoolService) and s.pool.name == "pop3gw-dns"]), 1)
        top, listeners = self.build("--config", ini, "--lmtp", "unix:/run/x/lmtp")
        [lmtp] = [s.factory.wrappedFactory for s in listeners if s.listenerName == "lmtp"]
        self.assertIsInstance(lmtp.checker, InboundChecker)
        top, listeners = self.build("--mx", "tcp:2525", "--lmtp", "unix:/run/x/lmtp")
        [lmtp] = [s.factory.wrappedFactory for s in listeners if s.listenerName == "lmtp"]
        self.assertIsNone(lmtp.checker)

    def test_postfixMapListener(self) -> None:
        """
        C{--postfix-map} adds a socketmap listener over the same router,
        behind the same connection limiter, which refuses by closing
        without a byte (a socketmap client must not read an SMTP line).
        """
        socket = os.path.join(self.dataDir, "map")
        top, listeners = self.build("--postfix-map", f"unix:{socket}", "--mx", "tcp:2525")
        byName = {s.listenerName: s for s in listeners}
        self.assertEqual(byName["postfix-map"].description, f"unix:{socket}")
        limiter = byName["postfix-map"].factory
        self.assertIsInstance(limiter, ConnectionLimitFactory)
        self.assertIs(limiter.perPeer, byName["mx"].factory.perPeer)
        self.assertIsNone(limiter.refusal)
        self.assertIsInstance(limiter.wrappedFactory, SocketmapFactory)
        self.assertIs(limiter.wrappedFactory.router, byName["mx"].factory.wrappedFactory.router)

    def test_lmtpListener(self) -> None:
        """
        C{--lmtp} adds a listener behind the same connection limiter, over
        the same router; a Unix socket without C{mode} is made C{0660}, one
        with a C{mode} keeps it.
        """
        top, listeners = self.build("--lmtp", "unix:/run/x/lmtp", "--lmtp", "unix:/run/x/other:mode=600",
                                    "--max-message-size", "2048")
        lmtp = [s for s in listeners if s.listenerName == "lmtp"]
        self.assertEqual([s.endpoint._mode for s in lmtp], [0o660, 0o600])
        self.assertEqual([s.description for s in lmtp], ["unix:/run/x/lmtp", "unix:/run/x/other:mode=600"])
        limiter = lmtp[0].factory
        self.assertIsInstance(limiter, ConnectionLimitFactory)
        factory = limiter.wrappedFactory
        self.assertIsInstance(factory, LMTPFactory)
        submission = {s.listenerName: s.factory for s in listeners}["submission"].wrappedFactory
        self.assertIs(factory.router, submission.portal.realm.router)
        self.assertEqual(factory.maxMessageSize, 2048)

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


class DataDirectoryTests(SynchronousTestCase):
    """
    What the server creates in its data directory: private whatever the
    umask, owned by the data directory's owner.
    """

    def test_modesWhateverUmask(self) -> None:
        """
        Under umask 022, 000 and 277, C{makeService} on a new data
        directory creates only 0700 directories (data, mail, queue, tls)
        and 0600 files (certificate, key).
        """
        for mask in (0o022, 0o000, 0o277):
            withUmask(self, mask)
            dataDir = os.path.abspath(self.mktemp())
            makeService(options("--data-dir", dataDir, "--hostname", "mail.example.org"), MemoryReactorClock())
            found = treeModesAndOwners(dataDir)
            for expected in (".", "mail", "queue", "tls", "tls/cert.pem", "tls/key.pem"):
                self.assertIn(expected, found)
            for path, (kind, mode, _, _) in found.items():
                if path.startswith("queue/"):
                    continue  # the queue's own files are its business
                self.assertEqual(mode, 0o700 if kind == "d" else 0o600, (oct(mask), path))

    def test_rootKeepsOwner(self) -> None:
        """
        Run as root on a data directory that belongs to another uid, the
        server gives what it creates there (mail, queue, TLS directory,
        certificate, key) to that uid and gid.
        """
        requireRoot(self)
        dataDir = os.path.abspath(self.mktemp())
        os.makedirs(dataDir)
        os.chown(dataDir, OTHER_UID, OTHER_GID)
        makeService(options("--data-dir", dataDir, "--hostname", "mail.example.org"), MemoryReactorClock())
        found = treeModesAndOwners(dataDir)
        for expected in ("mail", "queue", "tls", "tls/cert.pem", "tls/key.pem"):
            self.assertEqual(found[expected][2:], (OTHER_UID, OTHER_GID), expected)

    def test_otherUserRefused(self) -> None:
        """
        A server that is neither root nor the data directory's owner stops
        start-up with one line naming the directory and both uids.
        """
        requireRoot(self)
        parent = tempfile.mkdtemp(prefix="pop3gw-owner-")
        self.addCleanup(shutil.rmtree, parent, True)
        os.chmod(parent, 0o755)
        dataDir = os.path.join(parent, "data")
        os.mkdir(dataDir)
        os.chmod(dataDir, 0o770)
        os.chown(dataDir, OTHER_UID, OTHER_GID)
        with effectiveUser(OTHER_UID + 1, OTHER_GID):
            with self.assertRaises(SystemExit) as e:
                makeService(options("--data-dir", dataDir), MemoryReactorClock())
        text = str(e.exception)
        self.assertEqual(text, f"pop3gw: data directory {dataDir} belongs to uid {OTHER_UID}, not to uid "
                               f"{OTHER_UID + 1}: run this as its owner (or as root, which keeps that owner)")
        self.assertEqual(os.listdir(dataDir), [])


class ServerLockTests(SynchronousTestCase):
    """
    One server per data directory: the first holds an exclusive lock on
    C{DATA/server.lock} from before its listeners bind until it has
    stopped.
    """

    def setUp(self) -> None:
        self.dataDir = os.path.abspath(self.mktemp())

    def build(self):
        return makeService(options("--data-dir", self.dataDir, "--hostname", "mail.example.org"),
                           MemoryReactorClock())

    def test_secondServerRefused(self) -> None:
        """
        A second server on the same data directory stops at start-up,
        before binding any listener, with one line naming the first one's
        pid; the first one wrote its pid into C{server.lock} (0600).
        """
        first = self.build()
        first.privilegedStartService()
        self.addCleanup(first.releaseLock)
        with open(os.path.join(self.dataDir, "server.lock")) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dataDir, "server.lock")).st_mode), 0o600)
        reactor = MemoryReactorClock()
        second = makeService(options("--data-dir", self.dataDir), reactor)
        with self.assertRaises(SystemExit) as e:
            second.privilegedStartService()
        self.assertEqual(str(e.exception), f"pop3gw: another pop3gw server (pid {os.getpid()}) is running on "
                                           f"the data directory {self.dataDir}")
        self.assertEqual(reactor.tcpServers, [])

    def test_holderWithoutPid(self) -> None:
        """
        A holder that has not written its pid yet is named without one.
        """
        os.makedirs(self.dataDir)
        fd = os.open(os.path.join(self.dataDir, "server.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with self.assertRaises(SystemExit) as e:
            self.build().privilegedStartService()
        self.assertEqual(str(e.exception), f"pop3gw: another pop3gw server is running on the data directory "
                                           f"{self.dataDir}")

    def test_lockHeldUntilStopped(self) -> None:
        """
        The lock is released only once every part of the server has
        stopped (a part may take time to stop); then another server may
        start.
        """
        stopping = defer.Deferred()

        class SlowToStop(Service):
            def stopService(self):
                super().stopService()
                return stopping

        first = self.build()
        SlowToStop().setServiceParent(first)
        for child in list(first):
            if not isinstance(child, SlowToStop):
                child.disownServiceParent()
        first.startService()
        self.addCleanup(first.releaseLock)
        d = first.stopService()
        second = self.build()
        self.assertRaises(SystemExit, second.privilegedStartService)
        stopping.callback(None)
        self.successResultOf(d)
        second.privilegedStartService()
        second.releaseLock()

class StartupReportTests(SynchronousTestCase):
    """
    L{StartupReport}: a start-up failure told on the terminal C{twistd}
    was started from, after it has redirected stderr or daemonized.
    """

    def setUp(self) -> None:
        self.dataDir = os.path.abspath(self.mktemp())

    def pipe(self) -> tuple:
        r, w = os.pipe()
        self.addCleanup(_closeQuietly, r)
        self.addCleanup(_closeQuietly, w)
        return r, w

    def twistdOptions(self, **values) -> dict:
        """
        What the report reads of twistd's options (C{ServerOptions}).
        """
        return {"pidfile": "", "statusPipe": None, **values}

    def test_notUnderTwistd(self) -> None:
        """
        Options parsed on their own (not as twistd's subcommand) and a
        L{Config} give no report; under twistd the report holds a
        duplicate of descriptor 2 that child processes do not inherit.
        """
        top = makeService(options("--data-dir", self.dataDir), MemoryReactorClock())
        self.assertIsNone(top.startupReport)
        parsed = options("--data-dir", self.dataDir)
        parsed.parent = self.twistdOptions()  # type: ignore[attr-defined]
        top = makeService(parsed, MemoryReactorClock())
        report = top.startupReport
        self.addCleanup(report.started)
        self.assertIsInstance(report, StartupReport)
        self.assertIs(report.twistdOptions, parsed.parent)  # type: ignore[attr-defined]
        self.assertEqual(os.fstat(report.terminal).st_ino, os.fstat(2).st_ino)
        self.assertFalse(os.get_inheritable(report.terminal))
        report.started()
        self.assertIsNone(report.terminal)

    def test_failedTellsEveryone(self) -> None:
        """
        L{StartupReport.failed} writes the line on the terminal and lets
        it go, answers a daemonizing twistd (which would wait for ever)
        and forgets its pipe, and removes the pid file that names this
        process.
        """
        terminal, terminalW = self.pipe()
        status, statusW = self.pipe()
        pidfile = self.mktemp()
        with open(pidfile, "wb") as f:
            f.write(b"%d" % (os.getpid(),))
        twistd = self.twistdOptions(pidfile=pidfile, statusPipe=statusW)
        report = StartupReport(terminalW, twistd)
        report.failed("pop3gw: pop3: cannot listen on tcp:110: Address already in use")
        self.assertEqual(os.read(terminal, 1000), b"pop3gw: pop3: cannot listen on tcp:110: Address already in use\n")
        self.assertEqual(os.read(terminal, 1000), b"")  # closed
        self.assertEqual(os.read(status, 1000), StartupReport.STATUS)
        self.assertEqual(os.read(status, 1000), b"")  # closed
        self.assertTrue(StartupReport.STATUS.startswith(b"1 "))
        self.assertIsNone(twistd["statusPipe"])
        self.assertFalse(os.path.exists(pidfile))
        report.started()

    def test_otherPidfileKept(self) -> None:
        """
        A pid file that names another process is not removed; in the
        foreground (no status pipe) only the terminal is told.
        """
        terminal, terminalW = self.pipe()
        pidfile = self.mktemp()
        with open(pidfile, "wb") as f:
            f.write(b"1")
        StartupReport(terminalW, self.twistdOptions(pidfile=pidfile)).failed("pop3gw: no")
        self.assertEqual(os.read(terminal, 100), b"pop3gw: no\n")
        self.assertTrue(os.path.exists(pidfile))

    def test_portInUseReported(self) -> None:
        """
        A listener that cannot bind (a real port taken on loopback) stops
        the server's start with its one line, which the report writes on
        the terminal too; the lock taken is the only thing left, released
        with the process.
        """
        import socket

        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        from twisted.internet import reactor

        description = f"tcp:{port}:interface=127.0.0.1"
        top = makeService(options("--data-dir", self.dataDir, "--pop3", description, "--submission", "none"), reactor)
        self.addCleanup(top.releaseLock)
        terminal, terminalW = self.pipe()
        top.startupReport = StartupReport(terminalW, self.twistdOptions())
        with self.assertRaises(SystemExit) as e:
            top.privilegedStartService()
        line = f"pop3gw: pop3: cannot listen on {description}: Address already in use"
        self.assertEqual(str(e.exception), line)
        self.assertEqual(os.read(terminal, 1000), line.encode() + b"\n")
        self.assertIsNone(top.startupReport.terminal)

    def test_startedLetsTerminalGo(self) -> None:
        """
        Once the server has started the terminal is let go (a caller
        reading the daemonizing twistd's stderr to its end is not held).
        """
        from pop3gw.service import ServerLockService

        os.makedirs(self.dataDir)
        top = ServerLockService(self.dataDir)
        top.addService(Service())
        terminal, terminalW = self.pipe()
        top.startupReport = StartupReport(terminalW, self.twistdOptions())
        top.privilegedStartService()
        self.assertIsNotNone(top.startupReport.terminal)
        top.startService()
        self.addCleanup(top.stopService)
        self.assertIsNone(top.startupReport.terminal)
        self.assertEqual(os.read(terminal, 100), b"")


def _closeQuietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class VersionOptionTests(SynchronousTestCase):
    def test_version(self) -> None:
        """
        C{twistd pop3gw --version} prints pop3gw's version and Twisted's on
        one line on stdout and exits 0 (the inherited option named only
        Twisted).
        """
        from pop3gw import __version__
        from pop3gw.service import Options as TwistdOptions
        from twisted import copyright

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as e:
            TwistdOptions().parseOptions(["--version"])
        self.assertEqual(e.exception.code, 0)
        self.assertEqual(out.getvalue(), f"pop3gw {__version__} (Twisted {copyright.version})\n")


class _CountingDirectory:
    """
    An L{pop3gw.interfaces.IUserDirectory} whose snapshot refuses to list
    its users.
    """

    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self.snapshots = 0

    def snapshot(self) -> Directory:
        self.snapshots += 1
        return self.directory


class LocalDomainsTests(SynchronousTestCase):
    """
    Tests for L{LocalDomains}.
    """

    def test_domainsFromSnapshot(self) -> None:
        """
        The local domains are the configured ones plus the users' domains,
        read from the directory's current snapshot (its C{domains()}, made
        once per load) for each question, never by listing every user.
        """
        directory = Directory.fromEntries([Address("alice", "users.example"), Address("bob", "users.example")])
        directory.addresses = lambda: self.fail("every user listed")
        users = _CountingDirectory(directory)
        domains = LocalDomains(["example.org"], users)
        self.assertIn("example.org", domains)
        self.assertEqual(users.snapshots, 0)
        self.assertIn("users.example", domains)
        self.assertNotIn("elsewhere.example", domains)
        self.assertEqual(sorted(domains), ["example.org", "users.example"])
        self.assertEqual(users.snapshots, 3)
        users.directory = Directory.fromEntries([Address("carol", "new.example")])
        self.assertIn("new.example", domains)
        self.assertNotIn("users.example", domains)


class PostmasterWarningTests(SynchronousTestCase):
    """
    Start-up warns when C{[pop3gw] postmaster} does not name a user.
    """

    def warnings(self, ini: str) -> list:
        from twisted.logger import Logger, formatEvent

        from pop3gw import service

        dataDir = os.path.abspath(self.mktemp())
        os.makedirs(dataDir)
        with open(os.path.join(dataDir, "users"), "w") as f:
            f.write("alice@example.org:{ARGON2ID}x\n")
        path = os.path.join(dataDir, "pop3gw.ini")
        with open(path, "w") as f:
            f.write(f"[pop3gw]\n{ini}")
        events: list = []
        self.patch(service, "log", Logger(namespace="pop3gw", observer=events.append))
        makeService(options("--config", path, "--data-dir", dataDir, "--hostname", "mail.example.org"), MemoryReactorClock())
        return [formatEvent(e) for e in events if "postmaster" in formatEvent(e)]

    def test_unset(self) -> None:
        """
        Without the setting, one warning says where postmaster@ mail goes.
        """
        self.assertEqual(
            self.warnings(""),
            [
                "no [pop3gw] postmaster is set: mail for postmaster@ each local domain goes to "
                "that domain's first user in the users file, and is refused for a domain that has no users"
            ],
        )

    def test_notAUser(self) -> None:
        """
        A setting that names no user is warned about; one that names a
        user (in any case) is not.
        """
        self.assertEqual(
            self.warnings("postmaster = ghost@example.org\n"),
            [
                "[pop3gw] postmaster ghost@example.org is not a user: mail for postmaster@ each local domain "
                "goes to that domain's first user in the users file, and is refused for a domain that has no users"
            ],
        )
        self.assertEqual(self.warnings("postmaster = Alice@example.org\n"), [])


class FakeAccepted(tcp.Server):
    """
    An accepted connection as L{pop3gw.service.closeConnections} sees it.
    """

    def __init__(self) -> None:
        self.connected = 1
        self.losing = False
        self.lost: Optional[Failure] = None

    def loseConnection(self, _reason=None) -> None:
        self.losing = True

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


class CloseConnectionsTests(SynchronousTestCase):
    """
    L{pop3gw.service.closeConnections}: the last stage of a stop.
    """

    def test_acceptedClosedAfterTheirOutput(self) -> None:
        """
        Every accepted connection of the reactor is closed after its output
        is sent (C{loseConnection}); the result fires once all are closed.
        Other descriptors (a listening port, the reactor's own) are left
        alone.
        """
        from pop3gw.service import closeConnections

        reactor = MemoryReactorClock()
        one, two, other = FakeAccepted(), FakeAccepted(), Protocol()
        reactor.addReader(one)
        reactor.addWriter(two)
        reactor.addReader(other)
        d = closeConnections(reactor, 5.0)
        self.assertEqual((one.losing, two.losing), (True, True))
        self.assertNoResult(d)
        one.connected = 0
        reactor.advance(0.01)
        self.assertNoResult(d)
        two.connected = 0
        reactor.advance(0.01)
        self.assertIsNone(self.successResultOf(d))

    def test_waitBounded(self) -> None:
        """
        A connection whose peer reads nothing is waited for C{timeout}
        seconds at most.
        """
        from pop3gw.service import closeConnections

        reactor = MemoryReactorClock()
        reactor.addReader(FakeAccepted())
        d = closeConnections(reactor, 5.0)
        reactor.advance(4.9)
        self.assertNoResult(d)
        reactor.advance(0.2)
        self.assertIsNone(self.successResultOf(d))

    def test_stopClosesLast(self) -> None:
        """
        A staged service with a reactor closes the accepted connections
        after its parts have stopped, and its stop waits for them.
        """
        from pop3gw.service import StagedService

        reactor = MemoryReactorClock()
        connection = FakeAccepted()
        reactor.addReader(connection)
        top = StagedService()
        top.reactor = reactor
        top.startService()
        d = top.stopService()
        self.assertTrue(connection.losing)
        self.assertNoResult(d)
        connection.connected = 0
        reactor.advance(0.01)
        self.successResultOf(d)

    def test_pausedConnectionFoundThroughItsListener(self) -> None:
        """
        A connection whose reading is paused and that has nothing to write
        is in none of the reactor's lists; it is found through its
        listener's factory (the connections its limiter wraps) and closed
        too, and the wait covers it.
        """
        from pop3gw.service import closeConnections

        reactor = MemoryReactorClock()
        paused = FakeAccepted()
        factory = WrappingFactory(Factory.forProtocol(Protocol))
        wrapper = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        wrapper.makeConnection(paused)
        d = closeConnections(reactor, 5.0, [factory])
        self.assertTrue(paused.losing)
        self.assertNoResult(d)
        paused.connected = 0
        reactor.advance(0.01)
        self.assertIsNone(self.successResultOf(d))

    def test_stopClosesPausedConnectionsOfItsListeners(self) -> None:
        """
        A staged service closes the connections its listeners' factories
        know, not only those in the reactor's lists.
        """
        from pop3gw.service import STOP_LISTENERS, StagedService

        reactor = MemoryReactorClock()
        paused = FakeAccepted()
        factory = WrappingFactory(Factory.forProtocol(Protocol))
        factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000)).makeConnection(paused)
        listener = Service()
        listener.stopStage = STOP_LISTENERS  # type: ignore[attr-defined]
        listener.factory = factory  # type: ignore[attr-defined]
        top = StagedService()
        top.reactor = reactor
        listener.setServiceParent(top)
        top.startService()
        top.stopService()
        self.assertTrue(paused.losing)

    def test_stillOpenClosedAtTheDeadline(self) -> None:
        """
        A connection still open when the time is up (its client reads
        nothing) is closed then, orderly (C{connectionLost} with
        C{CONNECTION_LOST}, as the reactor's shutdown does, not an abort),
        and one line says so.
        """
        from twisted.internet.main import CONNECTION_LOST

        from pop3gw.service import closeConnections

        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        reactor = MemoryReactorClock()
        stalled = FakeAccepted()
        reactor.addWriter(stalled)
        d = closeConnections(reactor, 5.0)
        reactor.advance(4.99)
        self.assertIsNone(stalled.lost)
        reactor.advance(0.02)
        self.assertIsNone(self.successResultOf(d))
        assert stalled.lost is not None
        self.assertIs(stalled.lost.value, CONNECTION_LOST)
        self.assertEqual(
            [formatEvent(e) for e in events if e.get("log_namespace") == "pop3gw"],
            ["stopping: 1 connection(s) did not take their last output within 5.0 s; closing them"],
        )


class DiscardInputTests(SynchronousTestCase):
    """
    L{pop3gw.service.discardInput} and L{pop3gw.service.closeGracefully}
    on a plain connection: unread input is thrown away before the close
    (closing a socket with unread input resets the connection).
    """

    def setUp(self) -> None:
        self.ours, self.peer = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.peer.close)
        self.ours.setblocking(False)

    def test_discardsWhatWaits(self) -> None:
        """
        Everything the socket holds unread is read and dropped; the call
        does not wait for more.
        """
        from pop3gw.service import discardInput

        self.peer.sendall(b"NOOP\r\n" * 1000)
        connection = FakeAccepted()
        connection.socket = self.ours
        discardInput(connection)
        with self.assertRaises(BlockingIOError):
            self.ours.recv(1)

    def test_limit(self) -> None:
        """
        At most C{limit} octets are read.
        """
        from pop3gw.service import discardInput

        self.peer.sendall(b"x" * 100)
        connection = FakeAccepted()
        connection.socket = self.ours
        discardInput(connection, 60)
        self.assertEqual(self.ours.recv(100), b"x" * 40)

    def test_closeGracefullyDiscardsThenCloses(self) -> None:
        """
        A plain connection's unread input is dropped, then it is closed
        after its output (C{loseConnection}).
        """
        from pop3gw.service import closeGracefully

        self.peer.sendall(b"RETR 1\r\n")
        connection = FakeAccepted()
        connection.socket = self.ours
        closeGracefully(connection)
        self.assertTrue(connection.losing)
        with self.assertRaises(BlockingIOError):
            self.ours.recv(1)

    def test_nothingForAClosedConnection(self) -> None:
        """
        A connection closed already is left alone.
        """
        from pop3gw.service import closeGracefully, closeNow

        connection = FakeAccepted()
        connection.connected = 0
        closeGracefully(connection)
        closeNow(connection)
        self.assertEqual((connection.losing, connection.lost), (False, None))


class _AcceptedTransport(iosim.FakeTransport):
    """
    An iosim transport standing for an accepted TCP connection.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.readingResumed = False

    @property
    def connected(self) -> bool:  # type: ignore[override]
        return not self.disconnected

    def startReading(self) -> None:
        self.readingResumed = True


class TLSCloseTests(SynchronousTestCase):
    """
    L{pop3gw.service.closeGracefully} on a POP3S session (the real
    listener's factory: the limiter, TLS, POP3) with a real TLS client in
    memory: the session ends with the TLS close alert after the output.
    """

    def setUp(self) -> None:
        self.dataDir = os.path.abspath(self.mktemp())
        self.reactor = MemoryReactorClock()
        top = makeService(
            options("--data-dir", self.dataDir, "--hostname", "mail.example.org", "--pop3s", "tcp:2995"),
            self.reactor,
        )
        self.factory = next(s.factory for s in top if isinstance(s, ListenerService) and s.listenerName == "pop3s")
        addr = IPv4Address("TCP", "127.0.0.1", 40000)
        self.collector = _Collector()
        self.client = TLSMemoryBIOFactory(
            CertificateOptions(), True, Factory.forProtocol(lambda: self.collector), self.reactor
        ).buildProtocol(IPv4Address("TCP", "127.0.0.1", 2995))
        server = self.factory.buildProtocol(addr)
        self.serverTransport = _AcceptedTransport(server, isServer=True, peerAddress=addr)
        clientTransport = iosim.FakeTransport(self.client, isServer=False, peerAddress=addr)
        self.pump = iosim.connect(server, self.serverTransport, self.client, clientTransport, clock=self.reactor)
        self.flush()
        self.assertEqual(self.collector.received, b"+OK pop3gw ready.\r\n")

    def flush(self) -> None:
        for _ in range(10):
            self.pump.flush()

    def test_tlsLayerFound(self) -> None:
        """
        The TLS layer of an implicit-TLS connection is the protocol inside
        the limiter's wrapper.
        """
        from pop3gw.service import tlsLayer

        tls = tlsLayer(self.serverTransport)
        self.assertIsInstance(tls, TLSMemoryBIOProtocol)
        assert tls is not None
        self.assertIs(tls.transport, self.serverTransport.protocol)
        self.assertIsNone(tlsLayer(FakeAccepted()))

    def test_tlsLayerAfterStartTLS(self) -> None:
        """
        After STLS or STARTTLS the TLS layer is the connection's protocol
        (C{startTLS} puts it in front of the limiter's wrapper).
        """
        from pop3gw.service import tlsLayer

        inner = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
        front = TLSMemoryBIOProtocol(TLSMemoryBIOFactory(CertificateOptions(), False, None), inner, False)
        connection = FakeAccepted()
        connection.protocol = front
        self.assertIs(tlsLayer(connection), front)

    def test_closeNotifyAfterTheOutput(self) -> None:
        """
        The TLS layer sends the close alert after the last reply, although
        the POP3 protocol has its producer registered, and the connection
        closes without waiting for the client's alert: the client reads the
        reply, then a clean end (close_notify received, C{ConnectionDone}).
        The protocol's producer is told that the connection is going away
        (C{stopProducing}), as a transport tells it when the connection is
        lost.
        """
        from pop3gw.service import closeGracefully

        self.client.write(b"CAPA\r\n")
        self.pump.pump()
        self.pump.pump()
        handle = self.client.getHandle()
        pop3 = self.serverTransport.protocol.wrappedProtocol.wrappedProtocol
        self.assertTrue(pop3._outputRegistered)
        closeGracefully(self.serverTransport)
        # Told the connection is going away, the protocol does not
        # unregister its producer again (after STLS the TCP transport
        # would fail to).
        self.assertFalse(pop3._outputRegistered)
        self.flush()
        self.assertTrue(self.serverTransport.disconnected)
        self.assertTrue(self.collector.received.endswith(b"\r\n.\r\n"), self.collector.received)
        self.assertTrue(handle.get_shutdown() & SSL.RECEIVED_SHUTDOWN)
        self.assertIsInstance(self.collector.lost.value, ConnectionDone)
        self.assertEqual(self.factory.protocols, {})
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_closeConnectionsWaitsForIt(self) -> None:
        """
        Through L{closeConnections} with the listener's factory, the wait
        ends once the TLS connection is gone.
        """
        from pop3gw.service import closeConnections

        handle = self.client.getHandle()
        d = closeConnections(self.reactor, 5.0, [self.factory])
        self.flush()
        self.assertNoResult(d)
        self.reactor.advance(0.01)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(handle.get_shutdown() & SSL.RECEIVED_SHUTDOWN)


class FakeBoundPort:
    """
    A bound TCP port as L{pop3gw.service.BoundListenerService} gets it.
    """

    backlog = 50

    def __init__(self, sock) -> None:
        self.socket = sock
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def stopListening(self) -> None:
        pass

    def fileno(self) -> int:
        return self.socket.fileno()

    def getHost(self) -> IPv4Address:
        host, port = self.socket.getsockname()
        return IPv4Address("TCP", host, port)


class ReadingPort:
    """
    An adopted port that records whether it is read (accepts).
    """

    def __init__(self) -> None:
        self.reading = True

    def startReading(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False


class ReadingReactor(MemoryReactorClock):
    """
    A memory reactor whose adopted ports are L{ReadingPort}s.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[ReadingPort] = []

    def adoptStreamPort(self, fileno, addressFamily, factory):
        super().adoptStreamPort(fileno, addressFamily, factory)
        port = ReadingPort()
        self.ports.append(port)
        return port


class WorkersWiringTests(SynchronousTestCase):
    """
    C{--workers N}: what the supervisor and a worker are built from.
    """

    def setUp(self) -> None:
        self.dataDir = os.path.abspath(self.mktemp())
        self.reactor = MemoryReactorClock()

    def test_oneWorkerIsOneProcess(self) -> None:
        """
        With the default of one worker, the server is the single process it
        always was: its listeners serve, and there is no worker pool.
        """
        from pop3gw.supervisor import WorkerPool

        top = makeService(options("--data-dir", self.dataDir, "--hostname", "mail.example.org"), self.reactor)
        self.assertEqual([s for s in top if isinstance(s, WorkerPool)], [])
        self.assertEqual(len([s for s in top if type(s) is ListenerService]), 2)

    def test_supervisorParts(self) -> None:
        """
        With two workers the C{twistd} process holds the lock, binds the
        listeners without serving them, runs the relay and a pool of two
        workers, and has no hashing threads (it checks no password).
        """
        from pop3gw.relay import RelayService
        from pop3gw.service import BoundListenerService, ServerLockService, ThreadPoolService
        from pop3gw.supervisor import WorkerPool

        top = makeService(options("--data-dir", self.dataDir, "--hostname", "mail.example.org", "--workers", "2"), self.reactor)
        self.assertIsInstance(top, ServerLockService)
        bound = [s for s in top if isinstance(s, BoundListenerService)]
        self.assertEqual(sorted((s.listenerName, s.description) for s in bound), [
            ("pop3", "tcp:1110:interface=127.0.0.1"),
            ("submission", "tcp:1587:interface=127.0.0.1"),
        ])
        for s in bound:
            self.assertNotIsInstance(s.factory, ConnectionLimitFactory)
        [pool] = [s for s in top if isinstance(s, WorkerPool)]
        self.assertEqual(pool.count, 2)
        self.assertEqual(len([s for s in top if isinstance(s, RelayService)]), 1)
        self.assertEqual([s.pool.name for s in top if isinstance(s, ThreadPoolService)], ["pop3gw-io"])
        # The supervisor writes its workers' lines to twistd's own text
        # observer (pop3gw.supervisor.textLogWriter): it is not replaced.
        self.assertEqual([s for s in top if isinstance(s, TextLogService)], [])

    def test_metricsServedBySupervisor(self) -> None:
        """
        With workers, C{--metrics} is served by the supervisor (it is not
        among the sockets the workers adopt).
        """
        from pop3gw.service import BoundListenerService, ListenerService

        top = makeService(options("--data-dir", self.dataDir, "--hostname", "mail.example.org", "--workers", "2",
                                  "--metrics", "tcp:0:interface=127.0.0.1"), self.reactor)
        served = [s.listenerName for s in top if type(s) is ListenerService]
        bound = [s.listenerName for s in top if isinstance(s, BoundListenerService)]
        self.assertEqual((served, sorted(bound)), (["metrics"], ["pop3", "submission"]))

    def test_workerParts(self) -> None:
        """
        A worker adopts each socket it inherited, under the listener's caps
        with per-address counts kept by the supervisor, runs no relay, and
        does not take the server lock (the supervisor holds it).
        """
        import socket

        from pop3gw.config import buildConfig
        from pop3gw.relay import RelayService
        from pop3gw.service import SERVER_LOCK, makeWorkerService
        from pop3gw.workerlink import InheritedListener, SharedPeerCounts, WorkerLink, WorkerSetup

        config = buildConfig({"data-dir": self.dataDir, "hostname": "mail.example.org", "workers": "2"})
        makeService(config, self.reactor)  # makes the data directory, as the supervisor does
        fd = os.open(os.devnull, os.O_RDONLY)
        setup = WorkerSetup(config, 1, (InheritedListener("submission", "tcp:1587", fd, socket.AF_INET),))
        top = makeWorkerService(setup, self.reactor, WorkerLink())
        self.assertEqual([s for s in top if isinstance(s, RelayService)], [])
        top.privilegedStartService()
        [(adoptedFD, family, factory)] = self.reactor.adoptedPorts
        self.assertEqual((adoptedFD, family), (fd, socket.AF_INET))
        self.assertIsInstance(factory, ConnectionLimitFactory)
        self.assertIsInstance(factory.wrappedFactory, SubmissionFactory)
        self.assertIsInstance(factory.perPeer, SharedPeerCounts)
        self.assertRaises(OSError, os.fstat, fd)  # the inherited descriptor was closed once adopted
        lockFD = os.open(os.path.join(self.dataDir, SERVER_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, lockFD)
        fcntl.flock(lockFD, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def test_workerCommand(self) -> None:
        """
        A worker runs the C{pop3gw} package the supervisor imported, from
        its directory, whatever the working directory holds.
        """
        import pop3gw
        from pop3gw.service import WORKER_BOOTSTRAP, workerCommand

        command = workerCommand()
        self.assertEqual(command[:3], [sys.executable, "-c", WORKER_BOOTSTRAP])
        self.assertEqual(os.path.join(command[3], "pop3gw", "__init__.py"), os.path.abspath(pop3gw.__file__))
