"""
Tests for L{pop3gw.relay.mx}: MX resolution and the public-address policy.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.names import error as dnserror
from twisted.trial import unittest

from pop3gw.relay.mx import MXResolver, PermanentLookupFailure, isPublicAddress
from tests.queuehelpers import FakeResolver


class IsPublicAddressTests(unittest.SynchronousTestCase):
    """
    L{isPublicAddress} accepts only globally reachable unicast addresses.
    """

    def test_public(self):
        """
        Public IPv4 and IPv6 unicast addresses are accepted, an IPv4-mapped
        one by its IPv4 address.
        """
        for text in ("93.184.215.14", "2a00:1450:4001:82b::200e", "::ffff:93.184.215.14", "1.1.1.1"):
            self.assertTrue(isPublicAddress(text), text)

    def test_internal(self):
        """
        Loopback, private, shared (100.64.0.0/10, carrier-grade NAT),
        link-local, multicast, unspecified, reserved, documentation
        addresses and text that is no address are refused.
        """
        for text in (
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.1.1",
            "224.0.0.1",
            "0.0.0.0",
            "240.0.0.1",
            "192.0.2.1",
            "::1",
            "fc00::1",
            "fe80::1%eth0",
            "ff02::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:100.64.0.1",
            "mx.example",
        ):
            self.assertFalse(isPublicAddress(text), text)


class MXResolverTests(unittest.SynchronousTestCase):
    """
    L{MXResolver.mailHosts} gives the hosts to try for a domain, best first.
    """

    def mailHosts(self, domain="remote.example", **kw):
        return MXResolver(Clock(), FakeResolver(**kw)).mailHosts(domain)

    def test_preferenceOrder(self):
        """
        MX hosts come sorted by preference, each once, lower-cased.
        """
        d = self.mailHosts(
            mx={"remote.example": [(20, "B.mx.example"), (10, "a.mx.example"), (30, "b.mx.example")]},
            a={"a.mx.example": ["93.184.215.14"], "b.mx.example": ["93.184.215.15"]},
        )
        self.assertEqual(self.successResultOf(d), ["a.mx.example", "b.mx.example"])

    def test_sharedAddressSpaceSkipped(self):
        """
        An MX host that resolves only into shared address space
        (100.64.0.0/10) is skipped like a private one.
        """
        d = self.mailHosts(
            mx={"remote.example": [(10, "cgn.mx.example"), (20, "b.mx.example")]},
            a={"cgn.mx.example": ["100.64.0.7"], "b.mx.example": ["93.184.215.15"]},
        )
        self.assertEqual(self.successResultOf(d), ["b.mx.example"])

    def test_onlyInternal(self):
        """
        A domain with only internal mail exchangers fails permanently with
        5.4.4.
        """
        d = self.mailHosts(mx={"remote.example": [(10, "mx.remote.example")]}, a={"mx.remote.example": ["100.100.1.1"]})
        failure = self.failureResultOf(d, PermanentLookupFailure)
        self.assertEqual((failure.value.status, failure.value.text), ("5.4.4", "domain remote.example has no usable mail exchanger"))

    def test_implicitMX(self):
        """
        A domain without MX records is its own mail exchanger.
        """
        d = self.mailHosts(a={"remote.example": ["93.184.215.14"]})
        self.assertEqual(self.successResultOf(d), ["remote.example"])

    def test_nullMX(self):
        """
        A null MX (RFC 7505) fails permanently with 5.1.10.
        """
        d = self.mailHosts(mx={"remote.example": [(0, "")]})
        self.assertEqual(self.failureResultOf(d, PermanentLookupFailure).value.status, "5.1.10")

    def test_nxdomain(self):
        """
        A domain that does not exist fails permanently with 5.1.2.
        """
        d = self.mailHosts(errors={("MX", "remote.example"): dnserror.DNSNameError("nx")})
        self.assertEqual(self.failureResultOf(d, PermanentLookupFailure).value.status, "5.1.2")

    def test_temporary(self):
        """
        A temporary DNS failure is passed on as it is.
        """
        d = self.mailHosts(errors={("MX", "remote.example"): dnserror.DNSServerError("servfail")})
        self.failureResultOf(d, dnserror.DNSServerError)


class FakeUDPPort:
    """
    The transport of a datagram protocol given to L{UDPClock.listenUDP}.
    """

    def __init__(self, protocol):
        self.protocol = protocol
        self.written = []

    def write(self, data, address):
        self.written.append((data, address))

    def stopListening(self):
        self.protocol.doStop()


class UDPClock(Clock):
    """
    A clock that also provides C{listenUDP}, connecting each protocol to a
    L{FakeUDPPort} as a real port does.
    """

    def __init__(self):
        Clock.__init__(self)
        self.udpProtocols = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        self.udpProtocols.append(protocol)
        transport = FakeUDPPort(protocol)
        protocol.makeConnection(transport)
        return transport


class ResolverNoiseTests(unittest.SynchronousTestCase):
    """
    The resolver L{MXResolver} makes for itself does not log "Starting
    protocol" and "Stopping protocol" for each DNS query.
    """

    def test_quietQueries(self):
        """
        An MX lookup through the resolver's own resolver opens a datagram
        protocol that logs nothing when it starts and stops.
        """
        reactor = UDPClock()
        mx = MXResolver(reactor)
        with capturedLogs() as events:
            d = mx.mailHosts("remote.example")
            self.assertNotEqual(reactor.udpProtocols, [])
            # Each retry is scheduled by the one before: step through them.
            for _ in range(20):
                reactor.advance(60)
        self.failureResultOf(d, defer.TimeoutError)
        self.assertEqual([formatEvent(e) for e in events if "protocol" in formatEvent(e).lower()], [])
        mx.stop()
