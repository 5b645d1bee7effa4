"""
Connection caps per listener and per peer address.
"""

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.limits import ConnectionLimitFactory

REFUSAL = b"-ERR [SYS/TEMP] Too many connections\r\n"


def connect(factory, host):
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
