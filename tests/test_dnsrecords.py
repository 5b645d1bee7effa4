"""
The records C{pop3gw dns DOMAIN} prints and how C{--check} judges what
the DNS holds: against a table, and end to end against a twisted.names
authoritative server on loopback.
"""

from __future__ import annotations

import io
import os

from twisted.internet import defer, threads
from twisted.names import authority, common, dns, server
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pop3gw import cli, dnsrecords
from pop3gw.dkimkeys import KeyRecord

HOST = "mail.example.org"
KEY = KeyRecord("example.org", "s1", "ed25519", "2026-12-01T00:00:00Z", True)
PUBLIC = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="


def tableLookup(table: dict):
    def lookup(name: str, rtype: str) -> list:
        found = table.get((name, rtype))
        if isinstance(found, Exception):
            raise found
        return list(found or [])

    return lookup


def statuses(table: dict) -> dict:
    records = dnsrecords.records("example.org", HOST, [(KEY, PUBLIC)])
    return {(r.name, r.rtype): (status, detail) for status, r, detail in dnsrecords.checkRecords(records, tableLookup(table))}


GOOD = {
    ("example.org", "MX"): ["10 mail.example.org."],
    (HOST, "A"): ["192.0.2.1"],
    ("example.org", "TXT"): ["v=spf1 mx -all", "google-site-verification=x"],
    ("s1._domainkey.example.org", "TXT"): [f"v=DKIM1; k=ed25519; p={PUBLIC}"],
    ("_dmarc.example.org", "TXT"): ["v=DMARC1; p=reject; rua=mailto:d@example.org"],
    ("_mta-sts.example.org", "TXT"): ["v=STSv1; id=1"],
    ("mta-sts.example.org", "A"): ["192.0.2.1"],
    ("_smtp._tls.example.org", "TXT"): ["v=TLSRPTv1; rua=mailto:t@example.org"],
    ("_submissions._tcp.example.org", "SRV"): ["0 1 465 mail.example.org."],
    ("_submission._tcp.example.org", "SRV"): ["10 1 587 mail.example.org."],
    ("_pop3s._tcp.example.org", "SRV"): ["0 1 995 mail.example.org."],
    ("_pop3._tcp.example.org", "SRV"): ["10 1 110 MAIL.example.org."],
    ("autoconfig.example.org", "A"): ["192.0.2.1"],
    ("autodiscover.example.org", "AAAA"): ["2001:db8::1"],
}


class CheckTests(SynchronousTestCase):
    def test_allPublished(self) -> None:
        """
        Every record published as advised (or stricter: DMARC p=reject) is
        OK.
        """
        found = statuses(GOOD)
        self.assertEqual({k: v[0] for k, v in found.items() if v[0] != "OK"}, {})
        self.assertEqual(found[("s1._domainkey.example.org", "TXT")], ("OK", "the key matches"))
        self.assertEqual(found[("example.org", "MX")], ("OK", "10 mail.example.org."))

    def test_missing(self) -> None:
        """
        Without records, each is MISSING with what was looked for.
        """
        found = statuses({})
        self.assertEqual({v[0] for v in found.values()}, {"MISSING"})
        self.assertEqual(found[("example.org", "TXT")], ("MISSING", "no v=spf1 TXT record"))
        self.assertEqual(found[("_dmarc.example.org", "TXT")], ("MISSING", "no v=DMARC1 TXT record"))

    def test_wrong(self) -> None:
        """
        A record that exists but says something else is WRONG, with what
        was found: another MX, two SPF records or one with +all or without
        mx, another DKIM key, a DMARC record without p=, an SRV record to
        another host.
        """
        table = dict(GOOD)
        table[("example.org", "MX")] = ["10 mx.other.example."]
        table[("s1._domainkey.example.org", "TXT")] = ["v=DKIM1; k=ed25519; p=AAAA"]
        table[("_dmarc.example.org", "TXT")] = ["v=DMARC1; rua=mailto:x@example.org"]
        table[("_pop3s._tcp.example.org", "SRV")] = ["0 1 995 other.example."]
        found = statuses(table)
        self.assertEqual(found[("example.org", "MX")], ("WRONG", "found 10 mx.other.example., none is mail.example.org"))
        self.assertEqual(found[("s1._domainkey.example.org", "TXT")], ("WRONG", 'found "v=DKIM1; k=ed25519; p=AAAA": not this key'))
        self.assertEqual(found[("_dmarc.example.org", "TXT")], ("WRONG", 'found "v=DMARC1; rua=mailto:x@example.org": no p= tag'))
        self.assertEqual(found[("_pop3s._tcp.example.org", "SRV")], ("WRONG", "found 0 1 995 other.example."))
        for spf, why in (
            (["v=spf1 mx -all", "v=spf1 a -all"], '2 SPF records (RFC 7208 4.5: a permanent error): "v=spf1 mx -all", "v=spf1 a -all"'),
            (["v=spf1 mx +all"], 'found "v=spf1 mx +all": +all lets anyone send as example.org'),
            (["v=spf1 a -all"], 'found "v=spf1 a -all": does not name the MX hosts (mx)'),
        ):
            table[("example.org", "TXT")] = spf
            self.assertEqual(statuses(table)[("example.org", "TXT")], ("WRONG", why))

    def test_dmarcNoneAdvice(self) -> None:
        """
        DMARC p=none is OK, with the advice to tighten it.
        """
        table = dict(GOOD)
        table[("_dmarc.example.org", "TXT")] = ["v=DMARC1; p=none"]
        self.assertEqual(
            statuses(table)[("_dmarc.example.org", "TXT")],
            ("OK", '"v=DMARC1; p=none" (p=none only monitors: tighten to quarantine, then reject, once the reports are clean)'),
        )

    def test_lookupFailure(self) -> None:
        """
        A query that fails (timeout) is ERROR, neither OK nor MISSING.
        """
        table = dict(GOOD)
        table[("example.org", "MX")] = dnsrecords.LookupError_("LifetimeTimeout")
        self.assertEqual(statuses(table)[("example.org", "MX")], ("ERROR", "query failed: LifetimeTimeout"))


class _MemoryAuthority(authority.FileAuthority):
    def __init__(self, soa, records) -> None:
        common.ResolverBase.__init__(self)
        self.soa, self.records = soa, records
        self._cache = {}


class LoopbackCheckTests(TestCase):
    """
    C{pop3gw dns DOMAIN --check} asks a twisted.names authoritative server
    on 127.0.0.1 (a port chosen at run time, named by
    C{POP3GW_DNS_RESOLVER}), over UDP and TCP.
    """

    def serve(self, records: dict) -> int:
        from twisted.internet import reactor

        soa = dns.Record_SOA(mname=b"ns.example.org", rname=b"root.example.org", serial=1, ttl=60)
        zone = {b"example.org": [soa]}
        for name, rdatas in records.items():
            zone.setdefault(name.encode(), []).extend(rdatas)
        factory = server.DNSServerFactory(authorities=[_MemoryAuthority((b"example.org", soa), zone)])
        factory.noisy = False
        for _ in range(20):
            udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
            port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
            except Exception:
                udp.stopListening()
                continue
            self.addCleanup(udp.stopListening)
            self.addCleanup(tcp.stopListening)
            return port
        raise AssertionError("no UDP and TCP port pair free on 127.0.0.1")

    @defer.inlineCallbacks
    def test_check(self):
        """
        Published records are OK (the 2048-bit RSA key record, longer than
        a UDP answer without EDNS holds, split in strings), absent ones
        MISSING, another key WRONG; the exit status is 1.
        """
        dataDir = self.mktemp()
        os.makedirs(dataDir)
        out = io.StringIO()
        cli.main(["--data-dir", dataDir, "dkim", "generate", "example.org", "--selector", "big"], stdout=out)
        cli.main(["--data-dir", dataDir, "dkim", "generate", "example.org", "--selector", "ed", "--algorithm", "ed25519"], stdout=out)
        bigRecord = [line for line in out.getvalue().splitlines() if line.startswith("big._domainkey")][0]
        strings = [s.encode() for s in bigRecord.split('"')[1::2]]
        port = self.serve({
            "example.org": [dns.Record_MX(10, b"mail.example.org", ttl=60), dns.Record_TXT(b"v=spf1 mx -all", ttl=60)],
            "mail.example.org": [dns.Record_A("192.0.2.1", ttl=60)],
            "big._domainkey.example.org": [dns.Record_TXT(*strings, ttl=60)],
            "ed._domainkey.example.org": [dns.Record_TXT(b"v=DKIM1; k=ed25519; p=AAAA", ttl=60)],
            "_dmarc.example.org": [dns.Record_TXT(b"v=DMARC1; p=quarantine", ttl=60)],
        })
        os.environ[dnsrecords.RESOLVER_VARIABLE] = f"127.0.0.1:{port}"
        self.addCleanup(os.environ.pop, dnsrecords.RESOLVER_VARIABLE, None)
        stdout, stderr = io.StringIO(), io.StringIO()
        status = yield threads.deferToThread(
            cli.main, ["--data-dir", dataDir, "dns", "example.org", "--host", HOST, "--check"], None, stdout, stderr
        )
        lines = stdout.getvalue().splitlines()
        self.assertEqual((status, stderr.getvalue()), (1, ""))
        self.assertEqual(lines[:6], [
            "OK      example.org MX: 10 mail.example.org.",
            "OK      mail.example.org A: 192.0.2.1",
            'OK      example.org TXT: "v=spf1 mx -all"',
            "OK      big._domainkey.example.org TXT: the key matches",
            'WRONG   ed._domainkey.example.org TXT: found "v=DKIM1; k=ed25519; p=AAAA": not this key',
            'OK      _dmarc.example.org TXT: "v=DMARC1; p=quarantine"',
        ])
        self.assertEqual(lines[6], "MISSING _mta-sts.example.org TXT: no v=STSv1 TXT record")
        self.assertEqual(len(lines), 15)
        self.assertEqual([line.split()[0] for line in lines[6:]], ["MISSING"] * 9)
