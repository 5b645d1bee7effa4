"""
Tests for L{pop3gw.httpsite}: the HTTP listeners (C{--metrics}, the ACME
HTTP-01 responder) serve GET only and never take in a request body.
"""

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from pop3gw import httpsite
from pop3gw.acmeclient import ChallengeTokens, challengeSite
from pop3gw.metrics import Metrics, metricsSite

REFUSED = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def connect(site: Site) -> tuple:
    """
    A protocol of C{site} connected to a L{StringTransport}; the requests
    it makes are appended to C{site.made}.  Its timeouts run on a
    L{Clock} of its own, so none is left in the global reactor.
    """
    site.reactor = Clock()
    made: list = []
    factory = site.requestFactory

    def record(*args, **kwargs):
        made.append(factory(*args, **kwargs))
        return made[-1]

    site.requestFactory = record
    site.made = made  # type: ignore[attr-defined]
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    return protocol, transport


class BodyTests(SynchronousTestCase):
    def sites(self) -> list:
        return [
            ("metrics", metricsSite(Metrics(), lambda: []), b"/metrics"),
            ("acme", challengeSite(ChallengeTokens()), b"/.well-known/acme-challenge/t"),
        ]

    def test_largeBodyRefused(self) -> None:
        """
        A request announcing a body over L{httpsite.MAX_REQUEST_BODY}
        octets is answered C{413} and the connection closed as soon as its
        header ends, before any of the body is read; what arrives of the
        body meanwhile is dropped (never spooled to a temporary file).
        """
        for name, site, path in self.sites():
            protocol, transport = connect(site)
            protocol.dataReceived(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n")
            self.assertEqual(transport.value(), REFUSED, name)
            self.assertTrue(transport.disconnecting, name)
            request = site.made[-1]
            protocol.dataReceived(b"A" * 200000)
            self.assertEqual(request.content.getvalue(), b"", name)
            self.assertEqual(transport.value(), REFUSED, name)

    def test_chunkedBodyRefused(self) -> None:
        """
        A chunked body (no length announced) is refused the same way.
        """
        for name, site, path in self.sites():
            protocol, transport = connect(site)
            protocol.dataReceived(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            self.assertEqual(transport.value(), REFUSED, name)
            self.assertTrue(transport.disconnecting, name)

    def test_getServed(self) -> None:
        """
        A GET, with no body or a small one, is served as before.
        """
        for body in (b"", b"Content-Length: 5\r\n\r\nhello"):
            protocol, transport = connect(metricsSite(Metrics(), lambda: []))
            head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + (body or b"\r\n")
            protocol.dataReceived(head)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"), transport.value())
            self.assertTrue(transport.value().endswith(b"\r\n\r\nok\n"), transport.value())
            self.assertFalse(transport.disconnecting)

    def test_siteSettings(self) -> None:
        """
        L{httpsite.getOnlySite} logs no access lines and shows no
        tracebacks.
        """
        site = httpsite.getOnlySite(Resource())
        self.assertEqual((site.noisy, site.displayTracebacks), (False, False))
