"""
Tests for the DNS resolver L{pop3gw.relay.mx.MXResolver} makes for itself,
over the real reactor: a name server on 127.0.0.1 (port 0) answers.
"""

from __future__ import annotations

import gc

from twisted.internet import defer, task
from twisted.internet.udp import Port as UDPPort
from twisted.logger import capturedLogs, formatEvent
from twisted.names import dns
from twisted.trial.unittest import TestCase

from pop3gw.relay.mx import MXResolver
from tests.dnshelpers import listen

PTR_NAME = "7.2.0.192.in-addr.arpa"


class ConfiguredServerTests(TestCase):
    """
    L{MXResolver} given a name server asks that server, and its UDP ports
    write nothing to the log.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        records = {PTR_NAME: [dns.Record_PTR(b"client.example", ttl=60)]}
        self.authority, self.port, ports = listen(reactor, records)
        for port in ports:
            self.addCleanup(port.stopListening)
        self.resolver = MXResolver(reactor, server=("127.0.0.1", self.port))
        self.addCleanup(self.resolver.stop)

    def ownPorts(self) -> list:
        """
        The UDP ports still open (not yet through C{connectionLost}) other
        than the test name server's.
        """
        return [
            o for o in gc.get_objects()
            if isinstance(o, UDPPort) and getattr(o, "connected", False) and o._realPortNumber != self.port
        ]

    @defer.inlineCallbacks
    def waitForPortsClosed(self):
        """
        Wait (a reactor turn at a time, at most 100) until the resolver has
        closed its query ports.
        """
        for _ in range(100):
            if not self.ownPorts():
                return
            yield task.deferLater(self.reactor, 0, lambda: None)
        self.fail(f"UDP ports left open: {self.ownPorts()}")

    @defer.inlineCallbacks
    def test_pointerFromConfiguredServer(self):
        """
        A PTR lookup (the MX listener's reverse lookup of a client) is
        answered by the configured server, not the system's.
        """
        answers, _authority, _additional = yield self.resolver.lookupPointer(PTR_NAME)
        self.assertEqual([a.payload.name.name for a in answers], [b"client.example"])
        self.assertEqual(self.authority.queries, [(PTR_NAME, "PTR")])

    @defer.inlineCallbacks
    def test_queriesWriteNoUDPPortLines(self):
        """
        A lookup opens and closes a UDP port without Twisted's
        "DNSDatagramProtocol starting on N" and "(UDP Port N Closed)"
        lines; the lookup still works.
        """
        with capturedLogs() as events:
            yield self.resolver.lookupPointer(PTR_NAME)
            yield self.waitForPortsClosed()
        self.assertEqual(self.authority.queries, [(PTR_NAME, "PTR")])
        self.assertEqual([formatEvent(e) for e in events], [])
