"""
Connection caps per listener and per peer address.
"""

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.limits import ConnectionLimitFactory

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
