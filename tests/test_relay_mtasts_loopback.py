"""
MTA-STS against real servers on loopback: the policy fetched over HTTPS
(a certificate from a test CA for C{mta-sts.example.com}) and the
C{_mta-sts} record served by a twisted.names authoritative server, both on
127.0.0.1 with ports chosen at run time.
"""

from __future__ import annotations

from twisted.internet import defer, endpoints, ssl
from twisted.names import authority, client, common, dns, server
from twisted.trial.unittest import TestCase
from twisted.web import resource
from twisted.web.client import Agent
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import Site
from zope.interface import implementer

from pop3gw.relay.mtasts import Policy, PolicyError, PolicySource, makeFetcher
from pop3gw.relay.mx import MXResolver
from tests.tlshelpers import makeCA, makeLeaf

POLICY = b"version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 604800\n"


class PolicyFile(resource.Resource):
    isLeaf = True

    def __init__(self, body: bytes, kind: bytes = b"text/plain", code: int = 200) -> None:
        super().__init__()
        self.body, self.kind, self.code = body, kind, code
        self.requests: list = []

    def render_GET(self, request):
        self.requests.append((request.getRequestHostname(), request.path))
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", self.kind)
        return self.body


@implementer(IAgentEndpointFactory)
class _LoopbackEndpoints:
    """
    Sends every HTTPS request to the test server on 127.0.0.1, verifying
    its certificate for the request's host name against C{caPem}.
    """

    def __init__(self, reactor, port: int, caPem: bytes) -> None:
        self.reactor, self.port = reactor, port
        self.trust = ssl.Certificate.loadPEM(caPem)
        self.hosts: list = []

    def endpointForURI(self, uri):
        self.hosts.append((uri.host, uri.port))
        creator = ssl.optionsForClientTLS(uri.host.decode("ascii"), trustRoot=self.trust)
        return endpoints.wrapClientTLS(creator, endpoints.TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port))


class _MemoryAuthority(authority.FileAuthority):
    def __init__(self, soa, records) -> None:
        common.ResolverBase.__init__(self)
        self.soa, self.records = soa, records
        self._cache = {}


class LoopbackTests(TestCase):
    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.caPem, caKey = makeCA()
        self.otherCA, _ = makeCA("another CA")
        certPem, keyPem = makeLeaf(self.caPem, caKey, "mta-sts.example.com")
        self.serverCert = ssl.PrivateCertificate.loadPEM(keyPem + certPem)

    def serveHTTPS(self, page: PolicyFile) -> int:
        port = self.reactor.listenSSL(0, Site(page), self.serverCert.options(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def fetcher(self, port: int, caPem: bytes | None = None):
        endpointsFactory = _LoopbackEndpoints(self.reactor, port, caPem or self.caPem)
        self.endpoints = endpointsFactory
        return makeFetcher(self.reactor, Agent.usingEndpointFactory(self.reactor, endpointsFactory))

    def serveDNS(self, txt: dict) -> int:
        soa = dns.Record_SOA(mname=b"ns.example.com", rname=b"root.example.com", serial=1, ttl=60)
        records: dict = {b"example.com": [soa]}
        for name, value in txt.items():
            records[name.encode()] = [dns.Record_TXT(value.encode(), ttl=60)]
        factory = server.DNSServerFactory(authorities=[_MemoryAuthority((b"example.com", soa), records)])
        factory.noisy = False
        udp = self.reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        return udp.getHost().port

    @defer.inlineCallbacks
    def test_fetch(self):
        """
        The policy file is fetched from C{https://mta-sts.DOMAIN} port 443
        at C{/.well-known/mta-sts.txt}, the certificate verified for that
        name.
        """
        page = PolicyFile(POLICY)
        fetch = self.fetcher(self.serveHTTPS(page))
        body = yield fetch("example.com")
        self.assertEqual(body, POLICY)
        self.assertEqual(self.endpoints.hosts, [(b"mta-sts.example.com", 443)])
        self.assertEqual(page.requests, [(b"mta-sts.example.com", b"/.well-known/mta-sts.txt")])

    @defer.inlineCallbacks
    def test_refusedResponses(self):
        """
        A status other than 200, a type other than text/plain, a body over
        64 KiB, and a certificate from an unknown CA all fail the fetch.
        """
        for page, why in (
            (PolicyFile(POLICY, code=404), "HTTP status 404"),
            (PolicyFile(POLICY, kind=b"text/html"), "not text/plain"),
            (PolicyFile(POLICY + b"x" * 70000), "larger than 64 KiB"),
        ):
            error = yield self.assertFailure(self.fetcher(self.serveHTTPS(page))("example.com"), PolicyError)
            self.assertEqual(str(error), why)
        fetch = self.fetcher(self.serveHTTPS(PolicyFile(POLICY)), self.otherCA)
        yield self.assertFailure(fetch("example.com"), Exception)

    @defer.inlineCallbacks
    def test_recordAndPolicy(self):
        """
        With the record in the DNS and the file on the HTTPS server, the
        source gives the parsed policy; the TXT lookup goes through the
        relay's resolver.
        """
        dnsPort = self.serveDNS({"_mta-sts.example.com": "v=STSv1; id=20261201"})
        resolver = client.Resolver(servers=[("127.0.0.1", dnsPort)], reactor=self.reactor)
        self.addCleanup(lambda: resolver._parseCall.cancel() if getattr(resolver, "_parseCall", None) and resolver._parseCall.active() else None)
        mx = MXResolver(self.reactor, resolver)
        source = PolicySource(self.reactor, mx.lookupTXT, self.fetcher(self.serveHTTPS(PolicyFile(POLICY))))
        policy = yield source.policyFor("example.com")
        self.assertEqual(policy, Policy("enforce", ("mx.example.com",), 604800))
        self.assertEqual((yield mx.lookupTXT("nothing.example.com")), [])
