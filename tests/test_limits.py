"""
Connection caps per listener and per peer address.
"""

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.limits import ConnectionLimitFactory, PeerCounts, PeerTokens

REFUSAL = b"-ERR [SYS/TEMP] Too many connections\r\n"


def connect(factory, host):
    if host is None:
        addr = UNIXAddress(None)
    elif ":" in host:
        addr = IPv6Address("TCP", host, 40000)
    else:
        addr = IPv4Address("TCP", host, 40000)
    proto = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    proto.makeConnection(transport)
    return proto, transport


class LimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.factory = ConnectionLimitFactory(Factory.forProtocol(Protocol), maxTotal=5, maxPerPeer=2, refusal=REFUSAL)

    def test_perPeer(self) -> None:
        """
        A third connection from one address is refused with the refusal line
        and closed; other addresses still get in; a closed connection frees
        its slot.
        """
        first, _ = connect(self.factory, "192.0.2.1")
        connect(self.factory, "192.0.2.1")
        _, t3 = connect(self.factory, "192.0.2.1")
        self.assertEqual(t3.value(), REFUSAL)
        self.assertTrue(t3.disconnecting)
        _, t4 = connect(self.factory, "192.0.2.2")
        self.assertEqual(t4.value(), b"")
        first.connectionLost(None)
        _, t5 = connect(self.factory, "192.0.2.1")
        self.assertEqual(t5.value(), b"")

    def test_loopbackExemptFromPerPeerButNotTotal(self) -> None:
        """
        Loopback clients are not held to the per-address cap, but the total
        cap applies to them.
        """
        transports = [connect(self.factory, "127.0.0.1")[1] for _ in range(6)]
        self.assertEqual([t.value() for t in transports[:5]], [b""] * 5)
        self.assertEqual(transports[5].value(), REFUSAL)

    def test_unixSocketPeersExempt(self) -> None:
        """
        Clients on a Unix socket count as loopback: the per-address cap
        does not hold them (they are not one shared bucket), the total cap
        does.
        """
        factory = ConnectionLimitFactory(Factory.forProtocol(Protocol), maxTotal=8, maxPerPeer=2, refusal=REFUSAL)
        transports = [connect(factory, None)[1] for _ in range(9)]
        self.assertEqual([t.value() for t in transports[:8]], [b""] * 8)
        self.assertEqual(transports[8].value(), REFUSAL)

    def test_ipv6CountedPer64(self) -> None:
        """
        IPv6 clients are counted per /64 (one site's LAN, like one IPv4
        address behind NAT), so a client cannot pass the cap by using more
        addresses of its /64; another /64 has its own count.  An IPv4-mapped
        address counts as its IPv4 address.
        """
        self.factory = ConnectionLimitFactory(
            Factory.forProtocol(Protocol), maxTotal=100, maxPerPeer=2, refusal=REFUSAL
        )
        first, _ = connect(self.factory, "2001:db8:1:2::1")
        connect(self.factory, "2001:db8:1:2::2")
        _, refused = connect(self.factory, "2001:db8:1:2:abcd::3")
        self.assertEqual(refused.value(), REFUSAL)
        _, other = connect(self.factory, "2001:db8:1:3::1")
        self.assertEqual(other.value(), b"")
        first.connectionLost(None)
        _, again = connect(self.factory, "2001:db8:1:2::4")
        self.assertEqual(again.value(), b"")
        connect(self.factory, "192.0.2.9")
        _, mapped = connect(self.factory, "::ffff:192.0.2.9")
        self.assertEqual(mapped.value(), b"")
        _, refusedV4 = connect(self.factory, "192.0.2.9")
        self.assertEqual(refusedV4.value(), REFUSAL)

    def test_closeWithoutRefusalLine(self) -> None:
        """
        Without a refusal line, a connection over the limits is closed
        without a byte written (for implicit-TLS listeners).
        """
        factory = ConnectionLimitFactory(Factory.forProtocol(Protocol), maxTotal=5, maxPerPeer=1, refusal=None)
        connect(factory, "192.0.2.1")
        _, refused = connect(factory, "192.0.2.1")
        self.assertEqual(refused.value(), b"")
        self.assertTrue(refused.disconnecting)

    def test_perPeerSharedAcrossListeners(self) -> None:
        """
        Listeners sharing a L{PeerCounts} enforce one per-address cap
        together.
        """
        from pop3gw.limits import PeerCounts

        shared = PeerCounts()
        pop3 = ConnectionLimitFactory(Factory.forProtocol(Protocol), 5, 2, REFUSAL, shared)
        smtp = ConnectionLimitFactory(Factory.forProtocol(Protocol), 5, 2, b"421 no\r\n", shared)
        first, _ = connect(pop3, "192.0.2.1")
        connect(smtp, "192.0.2.1")
        _, refused = connect(smtp, "192.0.2.1")
        self.assertEqual(refused.value(), b"421 no\r\n")
        first.connectionLost(None)
        _, t = connect(pop3, "192.0.2.1")
        self.assertEqual(t.value(), b"")

    def test_refusalsLoggedSparingly(self) -> None:
        """
        With a clock, a flood of refused connections gives one log line per
        interval, the next one counting those not logged.
        """
        from twisted.internet.task import Clock
        from twisted.logger import globalLogPublisher

        from pop3gw.limits import REFUSAL_LOG_INTERVAL

        clock = Clock()
        factory = ConnectionLimitFactory(Factory.forProtocol(Protocol), 1, 0, REFUSAL, clock=clock)
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        connect(factory, "192.0.2.1")
        for _ in range(5):
            connect(factory, "192.0.2.1")
        clock.advance(REFUSAL_LOG_INTERVAL)
        connect(factory, "192.0.2.1")
        refusals = [e for e in events if "connection refused" in e.get("log_format", "")]
        self.assertEqual([e["more"] for e in refusals], [0, 4])


class _DeferredCounts(PeerCounts):
    """
    Per-peer counts kept elsewhere (another process): each claim is a
    C{Deferred} the test fires.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pending: list = []
        self.released: list = []

    def claim(self, key, limit):
        d: defer.Deferred = defer.Deferred()
        self.pending.append((key, limit, d))

        def granted(ok):
            if ok:
                self.add(key)
            return ok

        return d.addCallback(granted)

    def release(self, key) -> None:
        self.released.append(key)
        self.remove(key)


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.received: list = []
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.write(b"+OK hello\r\n")

    def dataReceived(self, data) -> None:
        self.received.append(data)

    def connectionLost(self, reason) -> None:
        self.lost = True


class SharedCountsTests(SynchronousTestCase):
    """
    Per-peer caps held by counts another process keeps: the connection
    waits, reading nothing, until the claim is answered.
    """

    def setUp(self) -> None:
        self.counts = _DeferredCounts()
        self.built: list = []

        def build():
            p = _Recorder()
            self.built.append(p)
            return p

        self.factory = ConnectionLimitFactory(Factory.forProtocol(build), maxTotal=5, maxPerPeer=2, refusal=REFUSAL, peerCounts=self.counts)

    def test_grantedStartsTheProtocol(self) -> None:
        """
        A non-loopback client's connection is paused, its protocol not
        started, until the claim is granted; then it reads again and the
        protocol greets.  Closing it releases the claim.
        """
        proto, transport = connect(self.factory, "192.0.2.1")
        [(key, limit, d)] = self.counts.pending
        self.assertEqual((key, limit), ("192.0.2.1", 2))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.producerState, "paused")
        d.callback(True)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(transport.value(), b"+OK hello\r\n")
        proto.dataReceived(b"STAT\r\n")
        self.assertEqual(self.built[0].received, [b"STAT\r\n"])
        self.assertEqual(self.factory.total, 1)
        proto.connectionLost(None)
        self.assertEqual((self.counts.released, self.factory.total, self.built[0].lost), (["192.0.2.1"], 0, True))

    def test_refusedGetsTheRefusalLine(self) -> None:
        """
        A refused claim gets the refusal line and the connection closes;
        the protocol never starts, nothing is released, the total drops.
        """
        first, _ = connect(self.factory, "192.0.2.1")
        self.counts.pending[0][2].callback(True)
        proto, transport = connect(self.factory, "192.0.2.1")
        self.counts.pending[1][2].callback(False)
        self.assertEqual(transport.value(), REFUSAL)
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(None)
        self.assertEqual((self.built[1].lost, self.counts.released, self.factory.total), (False, [], 1))
        self.assertEqual(self.counts.get("192.0.2.1"), 1)
        self.flushLoggedErrors()

    def test_lostWhileWaiting(self) -> None:
        """
        A connection closed before its claim is answered releases the claim
        once it is granted, and its protocol never starts.
        """
        proto, transport = connect(self.factory, "192.0.2.1")
        proto.connectionLost(None)
        self.assertEqual(self.factory.total, 0)
        self.counts.pending[0][2].callback(True)
        self.assertEqual((transport.value(), self.counts.released, self.built[0].lost), (b"", ["192.0.2.1"], False))
        self.assertEqual(self.counts.get("192.0.2.1"), 0)

    def test_failedClaimRefuses(self) -> None:
        """
        A claim that fails (the other process is gone) refuses the
        connection as if over the cap.
        """
        _, transport = connect(self.factory, "192.0.2.1")
        self.counts.pending[0][2].errback(ConnectionDone())
        self.assertEqual(transport.value(), REFUSAL)

    def test_loopbackNeedsNoClaim(self) -> None:
        """
        Loopback clients, exempt from the per-address cap, start at once
        without asking.
        """
        _, transport = connect(self.factory, "127.0.0.1")
        self.assertEqual((self.counts.pending, transport.value()), ([], b"+OK hello\r\n"))


class PeerTokensTests(SynchronousTestCase):
    """
    L{PeerTokens}: the per-address counts of every worker, kept by the
    supervisor.
    """

    def test_capAcrossOwners(self) -> None:
        """
        The cap counts connections of one address across all workers; a
        release frees a slot.
        """
        tokens = PeerTokens()
        self.assertTrue(tokens.acquire(1, "192.0.2.1", 2))
        self.assertTrue(tokens.acquire(2, "192.0.2.1", 2))
        self.assertFalse(tokens.acquire(1, "192.0.2.1", 2))
        self.assertTrue(tokens.acquire(2, "192.0.2.9", 2))
        tokens.release(1, "192.0.2.1")
        self.assertTrue(tokens.acquire(2, "192.0.2.1", 2))
        self.assertEqual(tokens.get("192.0.2.1"), 2)

    def test_dropOwner(self) -> None:
        """
        A worker that dies takes its connections with it: its counts go.
        A release it never held changes nothing.
        """
        tokens = PeerTokens()
        tokens.acquire(1, "192.0.2.1", 5)
        tokens.acquire(1, "192.0.2.1", 5)
        tokens.acquire(2, "192.0.2.1", 5)
        tokens.release(3, "192.0.2.1")
        self.assertEqual(tokens.get("192.0.2.1"), 3)
        tokens.dropOwner(1)
        self.assertEqual(tokens.get("192.0.2.1"), 1)
        tokens.dropOwner(2)
        self.assertEqual((tokens.get("192.0.2.1"), tokens.counts), (0, {}))
