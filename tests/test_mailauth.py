"""
Tests for L{pop3gw.mailauth}: SPF, DKIM and DMARC decisions against an
authoritative DNS server on loopback (L{tests.dnshelpers}), with the
records of RFC 7208 appendix A and RFC 7489's policy examples.  The
blocking checks run in a thread while the reactor serves DNS.
"""

from __future__ import annotations

import functools
import time

from twisted.internet import reactor, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pop3gw import mailauth
from tests.dnshelpers import a, ed25519Key, listen, mx, rsaKey, sign, txt


@functools.lru_cache(maxsize=None)
def key() -> tuple[bytes, str]:
    return rsaKey()


@functools.lru_cache(maxsize=None)
def edKey() -> tuple[bytes, str]:
    return ed25519Key()


@functools.lru_cache(maxsize=None)
def otherKey() -> tuple[bytes, str]:
    return rsaKey()


MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: hello\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Hello.\r\n"
)


def records() -> dict:
    """
    RFC 7208 appendix A's example.com, and the test's other domains.
    """
    return {
        "example.com": [mx(10, "mx.example.com"), mx(20, "mx2.example.com"), a("192.0.2.10"),
                        txt("v=spf1 mx -all")],
        "mx.example.com": [a("192.0.2.11")],
        "mx2.example.com": [a("192.0.2.12")],
        "mail.example.com": [a("192.0.2.10"), txt("v=spf1 a -all")],
        "soft.example.com": [txt("v=spf1 a:mail.example.com ~all")],
        "neutral.example.com": [txt("v=spf1 ?all")],
        "nospf.example.com": [a("192.0.2.10")],
        "perm.example.com": [txt("v=spf1 include:nospf.example.com -all")],
        "many.example.com": [txt("v=spf1 " + " ".join(["a:mail.example.com"] * 11) + " -all")],
        "news.example.com": [a("192.0.2.20")],
        "sel._domainkey.example.com": [txt(f"v=DKIM1; k=rsa; p={key()[1]}")],
        "ed._domainkey.example.com": [txt(f"v=DKIM1; k=ed25519; p={edKey()[1]}")],
        "_dmarc.example.com": [txt("v=DMARC1; p=reject; rua=mailto:d@example.com")],
        "strict.example.net": [txt("v=spf1 ip4:192.0.2.30 -all")],
        "_dmarc.strict.example.net": [txt("v=DMARC1; p=quarantine; adkim=s; aspf=s")],
        "sub.strict.example.net": [txt("v=spf1 ip4:192.0.2.30 -all")],
        "example.org": [txt("v=spf1 -all")],
        "_dmarc.example.org": [txt("v=DMARC1; p=reject; sp=quarantine")],
        "sampled.example": [txt("v=spf1 -all")],
        "_dmarc.sampled.example": [txt("v=DMARC1; p=reject; pct=0")],
        "twice.example": [txt("v=spf1 -all")],
        "_dmarc.twice.example": [txt("v=DMARC1; p=reject"), txt("v=DMARC1; p=none")],
    }


class DNSTestCase(TestCase):
    """
    Starts the loopback DNS server; checks run in a thread.
    """

    failing = ("temp.example.com", "_dmarc.tempdmarc.example", "bad._domainkey.example.com")
    silent = ("slow.example.com",)

    def setUp(self) -> None:
        self.authority, port, ports = listen(reactor, records(), self.failing, self.silent)
        for p in ports:
            self.addCleanup(p.stopListening)
        self.resolver = mailauth.makeResolver(("127.0.0.1", port))

    def client(self, timeout: float = 5.0, deadline: float = 20.0) -> mailauth.DNSClient:
        return mailauth.DNSClient(self.resolver, timeout, time.monotonic() + deadline)

    def inThread(self, f, *args):
        return threads.deferToThread(f, *args)


class SPFTests(DNSTestCase):
    """
    L{mailauth.checkSPF}: each result of RFC 7208 section 2.6.
    """

    def spf(self, ip: str, sender: str, helo: str = "client.example", **kwargs):
        return self.inThread(mailauth.checkSPF, self.client(**kwargs), ip, sender, helo)

    def test_pass(self):
        """
        The address of an MX host of a C{v=spf1 mx -all} domain passes.
        """
        d = self.spf("192.0.2.11", "alice@example.com")
        d.addCallback(self.assertEqual,
                      mailauth.SPFResult("pass", "mailfrom", "example.com", "alice@example.com"))
        return d

    def test_fail(self):
        """
        Any other address fails (C{-all}).
        """
        d = self.spf("192.0.2.99", "alice@example.com")
        d.addCallback(lambda r: self.assertEqual(r.result, "fail"))
        return d

    def test_softfail(self):
        """
        C{~all} is softfail.
        """
        d = self.spf("192.0.2.99", "x@soft.example.com")
        d.addCallback(lambda r: self.assertEqual(r.result, "softfail"))
        return d

    def test_neutral(self):
        """
        C{?all} is neutral.
        """
        d = self.spf("192.0.2.99", "x@neutral.example.com")
        d.addCallback(lambda r: self.assertEqual(r.result, "neutral"))
        return d

    def test_none(self):
        """
        A domain without an SPF record is none.
        """
        d = self.spf("192.0.2.99", "x@nospf.example.com")
        d.addCallback(lambda r: self.assertEqual(r.result, "none"))
        return d

    def test_permerrorInclude(self):
        """
        An C{include:} of a domain without a record is permerror (RFC 7208
        5.2).
        """
        d = self.spf("192.0.2.99", "x@perm.example.com")
        d.addCallback(lambda r: self.assertEqual(r.result, "permerror"))
        return d

    def test_lookupLimit(self):
        """
        More than 10 DNS-querying terms is permerror (RFC 7208 4.6.4), and
        the 11th is never looked up.
        """
        d = self.spf("192.0.2.99", "x@many.example.com")

        def check(result):
            self.assertEqual(result.result, "permerror")
            self.assertLessEqual(self.authority.queries.count(("mail.example.com", "A")), 10)

        d.addCallback(check)
        return d

    def test_temperror(self):
        """
        A server failure is temperror.
        """
        d = self.spf("192.0.2.99", "x@temp.example.com")
        d.addCallback(lambda r: self.assertEqual(r.result, "temperror"))
        return d

    def test_deadline(self):
        """
        A lookup that is never answered ends, by the deadline, as temperror.
        """
        d = self.spf("192.0.2.99", "x@slow.example.com", timeout=0.2, deadline=0.5)
        d.addCallback(lambda r: self.assertEqual(r.result, "temperror"))
        return d

    def test_heloForNullSender(self):
        """
        For the null reverse path the HELO identity is checked (RFC 7208
        2.4).
        """
        d = self.inThread(mailauth.checkSPF, self.client(), "192.0.2.10", None, "mail.example.com")
        d.addCallback(self.assertEqual,
                      mailauth.SPFResult("pass", "helo", "mail.example.com", "mail.example.com"))
        return d

    def test_heloAddressLiteral(self):
        """
        A null reverse path with an address literal as HELO has no identity
        to check: none.
        """
        result = mailauth.checkSPF(self.client(), "192.0.2.10", None, "[192.0.2.10]")
        self.assertEqual(result, mailauth.SPFResult("none", "helo", "", ""))

    def test_senderAddressLiteral(self):
        """
        A sender at an address literal names no domain (RFC 7208 4.3: not
        a valid FQDN): none, with no domain for DMARC to align, and the
        temporary results name none either.
        """
        for sender in ("x@[192.0.2.10]", "x@[IPv6:2001:db8::1]"):
            result = mailauth.checkSPF(self.client(), "192.0.2.10", sender, "mail.example.com")
            self.assertEqual(result, mailauth.SPFResult("none", "mailfrom", "", ""))
            self.assertEqual(mailauth.temporaryResults(sender, "mail.example.com").spf,
                             mailauth.SPFResult("temperror", "mailfrom", "", ""))


class DKIMTests(DNSTestCase):
    """
    L{mailauth.checkDKIM} on messages signed here with a key published in
    the test DNS.
    """

    def test_pass(self):
        """
        A message signed with the published key passes.
        """
        signed = sign(MESSAGE, "example.com", "sel", key()[0])
        d = self.inThread(mailauth.checkDKIM, self.client(), signed)
        d.addCallback(self.assertEqual, (mailauth.DKIMResult("pass", "example.com", "sel"),))
        return d

    def test_ed25519(self):
        """
        An Ed25519 signature (RFC 8463) with the published key passes.
        """
        signed = sign(MESSAGE, "example.com", "ed", edKey()[0], algorithm=b"ed25519-sha256")
        d = self.inThread(mailauth.checkDKIM, self.client(), signed)
        d.addCallback(self.assertEqual, (mailauth.DKIMResult("pass", "example.com", "ed"),))
        return d

    def test_bodyChanged(self):
        """
        A changed body fails.
        """
        signed = sign(MESSAGE, "example.com", "sel", key()[0]).replace(b"Hello.", b"Hello!")
        d = self.inThread(mailauth.checkDKIM, self.client(), signed)
        d.addCallback(self.assertEqual, (mailauth.DKIMResult("fail", "example.com", "sel"),))
        return d

    def test_wrongKey(self):
        """
        A signature made with another key than the published one fails.
        """
        signed = sign(MESSAGE, "example.com", "sel", otherKey()[0])
        d = self.inThread(mailauth.checkDKIM, self.client(), signed)
        d.addCallback(self.assertEqual, (mailauth.DKIMResult("fail", "example.com", "sel"),))
        return d

    def test_everySignature(self):
        """
        Every signature is verified, top first.
        """
        signed = sign(sign(MESSAGE, "example.com", "sel", key()[0]), "example.com", "other", key()[0])
        d = self.inThread(mailauth.checkDKIM, self.client(), signed)
        d.addCallback(self.assertEqual, (mailauth.DKIMResult("fail", "example.com", "other"),
                                         mailauth.DKIMResult("pass", "example.com", "sel")))
        return d

    def test_keyLookupFails(self):
        """
        A server failure looking up the key is temperror.
        """
        signed = sign(MESSAGE, "example.com", "bad", key()[0])
        d = self.inThread(mailauth.checkDKIM, self.client(), signed)
        d.addCallback(self.assertEqual, (mailauth.DKIMResult("temperror", "example.com", "bad"),))
        return d

    def test_unsigned(self):
        """
        An unsigned message has no results.
        """
        self.assertEqual(mailauth.checkDKIM(self.client(), MESSAGE), ())


class DMARCTests(DNSTestCase):
    """
    L{mailauth.authenticate}: DMARC (RFC 7489) with relaxed and strict
    alignment, subdomain policies and sampling.
    """

    def authenticate(self, message: bytes, ip: str, sender, sample: float = 0.5):
        return self.inThread(mailauth.authenticate, self.client(), message, ip, sender, "client.example",
                             mailauth.OrganizationalDomains(), lambda: sample)

    def test_spfAlignedRelaxed(self):
        """
        SPF passing for a subdomain of the From domain's organizational
        domain is aligned in relaxed mode: pass.
        """
        message = MESSAGE.replace(b"alice@example.com", b"alice@news.example.com")
        d = self.authenticate(message, "192.0.2.11", "bounce@example.com")
        d.addCallback(lambda r: self.assertEqual(r.dmarc, mailauth.DMARCResult("pass", "news.example.com", "reject", "none")))
        return d

    def test_dkimAlignedRelaxed(self):
        """
        A DKIM pass for the organizational domain is aligned with a From
        subdomain in relaxed mode, whatever SPF says.
        """
        message = sign(MESSAGE.replace(b"alice@example.com", b"alice@news.example.com"), "example.com", "sel", key()[0])
        d = self.authenticate(message, "192.0.2.99", "bounce@elsewhere.example")
        d.addCallback(lambda r: self.assertEqual(r.dmarc.result, "pass"))
        return d

    def test_fail(self):
        """
        Neither aligned: fail, with the published p=reject.
        """
        d = self.authenticate(MESSAGE, "192.0.2.99", "alice@example.com")
        d.addCallback(lambda r: self.assertEqual(r.dmarc, mailauth.DMARCResult("fail", "example.com", "reject", "reject")))
        return d

    def test_strictAlignment(self):
        """
        With aspf=s, an SPF pass for a subdomain of the From domain is not
        aligned: fail, p=quarantine.
        """
        message = MESSAGE.replace(b"alice@example.com", b"alice@strict.example.net")
        d = self.authenticate(message, "192.0.2.30", "x@sub.strict.example.net")

        def check(result):
            self.assertEqual(result.spf.result, "pass")
            self.assertEqual(result.dmarc, mailauth.DMARCResult("fail", "strict.example.net", "quarantine", "quarantine"))

        d.addCallback(check)
        return d

    def test_strictAlignmentSameName(self):
        """
        With aspf=s the same name is aligned: pass.
        """
        message = MESSAGE.replace(b"alice@example.com", b"alice@strict.example.net")
        d = self.authenticate(message, "192.0.2.30", "x@strict.example.net")
        d.addCallback(lambda r: self.assertEqual(r.dmarc.result, "pass"))
        return d

    def test_subdomainPolicy(self):
        """
        A subdomain without its own record takes the organizational
        domain's sp=: quarantine, not p=reject.
        """
        message = MESSAGE.replace(b"alice@example.com", b"alice@sub.example.org")
        d = self.authenticate(message, "192.0.2.99", "alice@sub.example.org")
        d.addCallback(lambda r: self.assertEqual(r.dmarc, mailauth.DMARCResult("fail", "sub.example.org", "quarantine", "quarantine")))
        return d

    def test_organizationalDomainOwnPolicy(self):
        """
        The organizational domain itself takes p=, not sp=.
        """
        message = MESSAGE.replace(b"alice@example.com", b"alice@example.org")
        d = self.authenticate(message, "192.0.2.99", "alice@example.org")
        d.addCallback(lambda r: self.assertEqual(r.dmarc, mailauth.DMARCResult("fail", "example.org", "reject", "reject")))
        return d

    def test_pctSampledOut(self):
        """
        pct=0: the failing message is not sampled, the next lower policy
        applies (RFC 7489 6.6.4).
        """
        message = MESSAGE.replace(b"alice@example.com", b"alice@sampled.example")
        d = self.authenticate(message, "192.0.2.99", "alice@sampled.example")
        d.addCallback(lambda r: self.assertEqual(r.dmarc, mailauth.DMARCResult("fail", "sampled.example", "reject", "quarantine")))
        return d

    def test_noRecord(self):
        """
        No record at the From domain nor its organizational domain: none.
        """
        message = MESSAGE.replace(b"alice@example.com", b"alice@nospf.example.net")
        d = self.authenticate(message, "192.0.2.99", "alice@nospf.example.net")
        d.addCallback(lambda r: self.assertEqual(r.dmarc, mailauth.DMARCResult("none", "nospf.example.net")))
        return d

    def test_severalRecords(self):
        """
        Two DMARC records are no policy (RFC 7489 6.6.3).
        """
        message = MESSAGE.replace(b"alice@example.com", b"alice@twice.example")
        d = self.authenticate(message, "192.0.2.99", "alice@twice.example")
        d.addCallback(lambda r: self.assertEqual(r.dmarc.result, "none"))
        return d

    def test_temperror(self):
        """
        A server failure looking up the policy is temperror.
        """
        message = MESSAGE.replace(b"alice@example.com", b"alice@tempdmarc.example")
        d = self.authenticate(message, "192.0.2.99", "alice@tempdmarc.example")
        d.addCallback(lambda r: self.assertEqual(r.dmarc, mailauth.DMARCResult("temperror", "tempdmarc.example")))
        return d

    def test_severalFromDomainsStrictest(self):
        """
        A From field naming two domains is failed if either fails.
        """
        message = MESSAGE.replace(b"Alice <alice@example.com>", b"alice@strict.example.net, alice@example.com")
        d = self.authenticate(message, "192.0.2.30", "x@strict.example.net")
        d.addCallback(lambda r: self.assertEqual(r.dmarc, mailauth.DMARCResult("fail", "example.com", "reject", "reject")))
        return d


class HeaderTests(SynchronousTestCase):
    """
    The C{Authentication-Results:} field and the header helpers.
    """

    def test_header(self) -> None:
        """
        One field naming the host, one method per folded line.
        """
        results = mailauth.AuthenticationResults(
            mailauth.SPFResult("pass", "mailfrom", "example.com", "alice@example.com"),
            (mailauth.DKIMResult("pass", "example.com", "sel"), mailauth.DKIMResult("fail", "example.net", "s2")),
            mailauth.DMARCResult("pass", "example.com", "reject", "none"),
        )
        self.assertEqual(
            results.header("mail.example.org"),
            b"Authentication-Results: mail.example.org;\r\n"
            b"\tspf=pass smtp.mailfrom=alice@example.com;\r\n"
            b"\tdkim=pass header.d=example.com header.s=sel;\r\n"
            b"\tdkim=fail header.d=example.net header.s=s2;\r\n"
            b"\tdmarc=pass header.from=example.com policy.dmarc=reject\r\n",
        )

    def test_headerNothingFound(self) -> None:
        """
        Unsigned mail with no SPF identity and no From domain: none for
        each method.
        """
        results = mailauth.AuthenticationResults(
            mailauth.SPFResult("none", "helo", "", ""), (), mailauth.DMARCResult("none"))
        self.assertEqual(
            results.header("mail.example.org"),
            b"Authentication-Results: mail.example.org;\r\n\tspf=none;\r\n\tdkim=none;\r\n\tdmarc=none\r\n",
        )

    def test_fromDomains(self) -> None:
        """
        The From domains, lower-cased, each once; none for a From without a
        usable domain.
        """
        self.assertEqual(mailauth.fromDomains(b"From: a@X.example, b@x.example,\r\n c@y.example\r\n\r\n"),
                         ["x.example", "y.example"])
        self.assertIsNone(mailauth.fromDomains(b"Subject: x\r\n\r\nFrom: a@x.example\r\n"))
        self.assertIsNone(mailauth.fromDomains(b"From: undisclosed\r\n\r\n"))
        self.assertIsNone(mailauth.fromDomains(b"From: a@[192.0.2.1]\r\n\r\n"))

    def test_fromDomainsSkipsUnusable(self) -> None:
        """
        An unusable address beside a usable one does not hide the usable
        one's domain from DMARC.
        """
        self.assertEqual(mailauth.fromDomains(b"From: undisclosed, boss@Bad.example\r\n\r\n"), ["bad.example"])

    def test_spfWithoutAddress(self) -> None:
        """
        A client without an IP address (a Unix socket) has no SPF result:
        none, nothing looked up.
        """
        client = mailauth.DNSClient(None, 5.0, time.monotonic() + 20)
        self.assertEqual(mailauth.checkSPF(client, "unix", "x@example.com", "client.example"),
                         mailauth.SPFResult("none", "mailfrom", "example.com", "x@example.com"))

    def test_parseRecord(self) -> None:
        """
        A DMARC record's tags; invalid values dropped; not a record without
        C{v=DMARC1} first.
        """
        self.assertEqual(mailauth.parseDMARCRecord("v=DMARC1; p=Reject; adkim=x; pct=50"),
                         {"p": "reject", "pct": "50"})
        self.assertIsNone(mailauth.parseDMARCRecord("p=reject; v=DMARC1"))
