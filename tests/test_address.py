"""
Tests for L{pop3gw.address}: parsing and normalising addresses once, at the
boundary, so that no login name or recipient can name a path outside
C{DATA/mail}, and the loopback test used by the plaintext-auth policy.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from pop3gw.address import (
    MAX_ADDRESS_LENGTH,
    MAX_LOCALPART_LENGTH,
    Address,
    AddressError,
    isDisguisedRelay,
    isLoopback,
    lookupKey,
    parseDomain,
    parseReversePath,
)

#: Strings that are not a plain local@domain address.
BAD_ADDRESSES = [
    "",
    "@",
    "alice",
    "alice@",
    "@example.org",
    "a@b@example.org",
    # Path tricks.
    "a/b@example.org",
    "../../etc/passwd@example.org",
    "..@example.org",
    ".@example.org",
    "alice@..",
    "alice@.",
    "alice@example/org",
    "alice@../../etc",
    "a\\b@example.org",
    "a..b@example.org",
    ".alice@example.org",
    "alice.@example.org",
    "alice@.example.org",
    "alice@example..org",
    "alice@example.org..",
    # NUL, controls, white space, format characters.
    "al\x00ice@example.org",
    "alice@exam\x00ple.org",
    "al\x01ice@example.org",
    "alice@example.org\n",
    "alice@example.org\r\n",
    "al\x7fice@example.org",
    "al ice@example.org",
    " alice@example.org",
    "alice@example.org ",
    "al\tice@example.org",
    "al\u00a0ice@example.org",
    "al\u2028ice@example.org",
    "al\u200dice@example.org",
    "al\u202eice@example.org",
    # Quoting, IP literals, source routes, comments.
    '"alice"@example.org',
    '"al ice"@example.org',
    '"a/b"@example.org',
    "alice@[127.0.0.1]",
    "alice@[IPv6:::1]",
    "@relay.example:alice@example.org",
    "alice(comment)@example.org",
    "<alice@example.org>",
    # Bad domains.
    "alice@-example.org",
    "alice@example-.org",
    "alice@exa_mple.org",
    "alice@\u2603.net",
    "alice@example\uff0forg",
]


class ParseTests(SynchronousTestCase):
    """
    L{Address.parse}.
    """

    def test_plain(self) -> None:
        """
        A plain address splits at the C{@}; text and UTF-8 bytes alike.
        """
        self.assertEqual(Address.parse("alice@example.org"), Address("alice", "example.org"))
        self.assertEqual(Address.parse(b"alice@example.org"), Address("alice", "example.org"))
        self.assertEqual(str(Address.parse("alice@example.org")), "alice@example.org")

    def test_refused(self) -> None:
        """
        Anything that is not a plain C{local@domain} (slashes, C{..}, NUL,
        control and space characters, quoted local parts, IP literals,
        source routes, bad domain labels) raises L{AddressError}.
        """
        for bad in BAD_ADDRESSES:
            with self.subTest(address=bad):
                self.assertRaises(AddressError, Address.parse, bad)
                self.assertRaises(AddressError, Address.parse, bad.encode("utf-8"))

    def test_badUTF8(self) -> None:
        """
        Bytes that are not UTF-8 are refused.
        """
        self.assertRaises(AddressError, Address.parse, b"al\xffice@example.org")
        self.assertRaises(AddressError, Address.parse, b"alice@ex\xc3ample.org")

    def test_atext(self) -> None:
        """
        Every RFC 5322 C{atext} character and inner dots are allowed in a
        local part.
        """
        local = "a.b!#$%&'*+-=?^_`{|}~c"
        self.assertEqual(Address.parse(f"{local}@example.org").localpart, local)

    def test_domainLowerCasedLocalPartKept(self) -> None:
        """
        The domain is lower-cased; the local part keeps its case.
        """
        self.assertEqual(Address.parse("Alice@Example.ORG"), Address("Alice", "example.org"))

    def test_trailingDot(self) -> None:
        """
        A fully-qualified domain's trailing dot is dropped.
        """
        self.assertEqual(Address.parse("alice@example.org."), Address("alice", "example.org"))

    def test_nfc(self) -> None:
        """
        The local part is Unicode NFC: a decomposed and a precomposed
        spelling are one user.
        """
        decomposed = Address.parse("jose\u0301@example.org")
        precomposed = Address.parse("jos\u00e9@example.org")
        self.assertEqual(decomposed, precomposed)
        self.assertEqual(precomposed.localpart, "jos\u00e9")

    def test_lookupKeyFoldsCase(self) -> None:
        """
        L{lookupKey} is the same for every case spelling of an ASCII local
        part (and its domain), and differs between different local parts;
        the address itself keeps its spelling.
        """
        key = lookupKey(Address.parse("alice@example.org"))
        self.assertEqual(key, "alice@example.org")
        for spelling in ("Alice@example.org", "ALICE@Example.ORG", "aLiCe@EXAMPLE.org."):
            address = Address.parse(spelling)
            self.assertEqual(lookupKey(address), key, spelling)
            self.assertNotEqual(str(address), key)
        self.assertNotEqual(lookupKey(Address.parse("alicia@example.org")), key)
        self.assertNotEqual(lookupKey(Address.parse("alice@example.net")), key)

    def test_lookupKeyUnicodeCasefold(self) -> None:
        """
        A non-ASCII local part is folded with Unicode case folding and
        kept NFC, so decomposed, precomposed, upper- and lower-case
        spellings share one key.
        """
        keys = {
            lookupKey(Address.parse(text))
            for text in ("J\u00d6RG@example.org", "j\u00f6rg@example.org", "JO\u0308RG@example.org", "jo\u0308rg@example.org")
        }
        self.assertEqual(keys, {"j\u00f6rg@example.org"})
        self.assertEqual(lookupKey(Address.parse("\u03a3\u03bf\u03c6\u03af\u03b1@example.org")),
                         lookupKey(Address.parse("\u03c3\u03bf\u03c6\u03af\u03b1@example.org")))
        self.assertEqual(lookupKey(Address("Stra\u00dfe", "example.org")), "strasse@example.org")

    def test_internationalisedDomain(self) -> None:
        """
        An internationalised domain, in any case and with any IDNA dot, is
        kept in its A-label form, so the U-label and A-label spellings are
        the same user and the same maildrop.
        """
        expected = Address("alice", "xn--bcher-kva.example")
        for text in (
            "alice@b\u00fccher.example",
            "alice@Bu\u0308cher.Example",
            "alice@B\u00dcCHER.EXAMPLE",
            "alice@b\u00fccher\u3002example",
            "alice@b\u00fccher\uff0eexample",
            "alice@xn--bcher-kva.example",
            "alice@XN--BCHER-KVA.example",
        ):
            with self.subTest(address=text):
                self.assertEqual(Address.parse(text), expected)

    def test_hyphensInAsciiLabel(self) -> None:
        """
        An ASCII label with hyphens in the third and fourth position (valid
        in DNS) is kept.
        """
        self.assertEqual(Address.parse("a@ab--cd.example").domain, "ab--cd.example")

    def test_localpartLengthInOctets(self) -> None:
        """
        The local part is limited to 64 octets of UTF-8 (RFC 5321
        4.5.3.1.1), not 64 characters: 32 two-octet characters fit, 33 do
        not.
        """
        self.assertEqual(MAX_LOCALPART_LENGTH, 64)
        Address.parse("a" * 64 + "@example.org")
        self.assertRaises(AddressError, Address.parse, "a" * 65 + "@example.org")
        Address.parse("\u00e9" * 32 + "@example.org")
        self.assertRaises(AddressError, Address.parse, "\u00e9" * 33 + "@example.org")

    def test_labelLength(self) -> None:
        """
        A domain label is at most 63 octets (RFC 1035).
        """
        Address.parse("a@" + "b" * 63 + ".org")
        self.assertRaises(AddressError, Address.parse, "a@" + "b" * 64 + ".org")
        # 30 distinct CJK characters: 90 octets of UTF-8, a 73-octet A-label.
        cjk = "".join(chr(0x4E00 + i * 37) for i in range(30))
        self.assertRaises(AddressError, Address.parse, "a@" + cjk + ".org")

    def test_addressLengthInOctets(self) -> None:
        """
        A whole address is at most 254 octets, counted in UTF-8 and with
        the domain in its ASCII form; so no local part or domain is too
        long to be a file name.
        """
        domain = ".".join(["b" * 63] * 3 + ["c" * 60])
        self.assertEqual(len("a@" + domain), MAX_ADDRESS_LENGTH)
        Address.parse("a@" + domain)
        self.assertRaises(AddressError, Address.parse, "aa@" + domain)
        # Six labels of 20 distinct CJK characters: 125 characters, but 365
        # octets of UTF-8 and 275 in ASCII form.
        cjk = "".join(chr(0x4E00 + i * 37) for i in range(20))
        self.assertRaises(AddressError, Address.parse, "a@" + ".".join([cjk] * 6))

    def test_neverOutsideRoot(self) -> None:
        """
        Whatever is parsed, C{root/domain/localpart} names a directory two
        levels below C{root}: neither part is empty, C{.} or C{..}, holds a
        slash or NUL, or is longer than a file name may be.
        """
        root = "/data/mail"
        candidates = BAD_ADDRESSES + [
            "alice@example.org",
            "Alice@Example.ORG.",
            "\u00e9" * 32 + "@b\u00fccher.example",
            "a.b@c.d",
            "~@example.org",
            "a%2F..%2Fb@example.org",
            "a\u2215b@example.org",
            "a\uff0fb@example.org",
        ]
        for text in candidates:
            try:
                address = Address.parse(text)
            except AddressError:
                continue
            for part in (address.localpart, address.domain):
                with self.subTest(address=text, part=part):
                    self.assertNotIn(part, ("", ".", ".."))
                    self.assertNotIn("/", part)
                    self.assertNotIn("\0", part)
                    self.assertLessEqual(len(part.encode("utf-8")), 255)
            path = os.path.normpath(os.path.join(root, address.domain, address.localpart))
            self.assertEqual(os.path.dirname(os.path.dirname(path)), root)


class ParseDomainTests(SynchronousTestCase):
    """
    L{parseDomain}, for C{--domain}.
    """

    def test_normalised(self) -> None:
        """
        A configured domain is normalised like an address's domain, so it
        matches the recipients it should.
        """
        self.assertEqual(parseDomain("Example.ORG."), "example.org")
        self.assertEqual(parseDomain("B\u00fccher.example"), "xn--bcher-kva.example")

    def test_refused(self) -> None:
        """
        A string that is not a domain name raises L{AddressError}.
        """
        for bad in ("", ".", "..", "a/b", "a b", "[127.0.0.1]", "x@y"):
            with self.subTest(domain=bad):
                self.assertRaises(AddressError, parseDomain, bad)


class IsLoopbackTests(SynchronousTestCase):
    """
    L{isLoopback}: what "loopback" means wherever a policy depends on it.
    """

    def test_loopback(self) -> None:
        """
        All of 127.0.0.0/8, C{::1} (any spelling) and IPv4-mapped
        127.0.0.0/8 are loopback.
        """
        for host in ("127.0.0.1", "127.255.0.9", "::1", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1", "::ffff:127.1.2.3"):
            with self.subTest(host=host):
                self.assertTrue(isLoopback(host))

    def test_notLoopback(self) -> None:
        """
        Other addresses, names and garbage are not loopback.
        """
        for host in ("10.0.0.1", "128.0.0.1", "::", "::2", "::ffff:10.0.0.1", "fe80::1%lo", "localhost", ""):
            with self.subTest(host=host):
                self.assertFalse(isLoopback(host))


class PeerTests(SynchronousTestCase):
    def test_describePeer(self) -> None:
        """
        TCP peers are named by their numeric address; a Unix-socket peer is
        C{unix} and counts as local for the plaintext-auth policy.
        """
        from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

        from pop3gw.address import UNIX_PEER, describePeer

        self.assertEqual(describePeer(IPv4Address("TCP", "192.0.2.1", 1)), "192.0.2.1")
        self.assertEqual(describePeer(IPv6Address("TCP", "::1", 1)), "::1")
        self.assertEqual(describePeer(UNIXAddress(None)), UNIX_PEER)
        self.assertEqual(describePeer(object()), "unknown")
        self.assertTrue(isLoopback(UNIX_PEER))
        self.assertFalse(isLoopback("unknown"))

    def test_clientNetwork(self) -> None:
        """
        Clients are counted per IPv4 address (/32) and per IPv6 /64; an
        IPv4-mapped IPv6 address counts as its IPv4 address, a zone index
        is ignored, and anything that is not an address (a Unix-socket
        peer, C{unknown}) is its own key.
        """
        from pop3gw.address import UNIX_PEER, clientNetwork

        cases = [
            ("192.0.2.1", "192.0.2.1"),
            ("127.0.0.2", "127.0.0.2"),
            ("::ffff:192.0.2.1", "192.0.2.1"),
            ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
            ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
            ("2001:DB8:1:3::1", "2001:db8:1:3::/64"),
            ("fe80::1%eth0", "fe80::/64"),
            ("::1", "::/64"),
            (UNIX_PEER, UNIX_PEER),
            ("unknown", "unknown"),
        ]
        for host, key in cases:
            with self.subTest(host=host):
                self.assertEqual(clientNetwork(host), key)


class DisguisedRelayTests(SynchronousTestCase):
    def test_disguises(self) -> None:
        """
        A trailing dot on the domain, a percent hack or a bang path is a
        disguised relay; a plain or sub-addressed local address is not.
        """
        for path in ("bob@example.org.", "bob%remote.example@example.org", "remote!bob@example.org"):
            self.assertTrue(isDisguisedRelay(path), path)
        for path in ("bob@example.org", "bob+tag@example.org", "BOB@Example.ORG"):
            self.assertFalse(isDisguisedRelay(path), path)


class ReversePathTests(SynchronousTestCase):
    """
    L{parseReversePath}: a sender, which may name its host by an RFC 5321
    4.1.3 address literal.
    """

    def test_addressLiterals(self) -> None:
        """
        An IPv4 literal and an C{IPv6:} literal (tag in any case, address in
        any spelling) are accepted and written one way: the IPv6 address
        compressed and lower-case after C{IPv6:}.
        """
        cases = {
            "a@[192.0.2.1]": Address("a", "[192.0.2.1]"),
            "Bob.Smith@[IPv6:2001:db8::1]": Address("Bob.Smith", "[IPv6:2001:db8::1]"),
            "a@[ipv6:2001:DB8:0:0:0:0:0:1]": Address("a", "[IPv6:2001:db8::1]"),
            "a@[IPv6:::ffff:192.0.2.1]": Address("a", "[IPv6:::ffff:c000:201]"),
        }
        for text, address in cases.items():
            with self.subTest(text=text):
                self.assertEqual(parseReversePath(text), address)
                self.assertEqual(parseReversePath(text.encode("ascii")), address)
        self.assertEqual(str(parseReversePath("a@[192.0.2.1]")), "a@[192.0.2.1]")

    def test_domainsAsParse(self) -> None:
        """
        A sender with a domain is parsed as L{Address.parse} parses it.
        """
        self.assertEqual(parseReversePath("Alice@Example.ORG"), Address.parse("Alice@Example.ORG"))

    def test_refused(self) -> None:
        """
        Literals that are not an IPv4 or C{IPv6:} address (a general
        literal, a bad or zero-padded IPv4 address, an IPv6 address without
        its tag, a zone, an empty literal, spaces) and bad local parts raise
        L{AddressError}, as does everything L{Address.parse} refuses.
        """
        for bad in [
            "a@[x-tag:foo]",
            "a@[192.0.2.256]",
            "a@[192.0.2]",
            "a@[192.000.2.1]",
            "a@[2001:db8::1]",
            "a@[IPv6:192.0.2.1]",
            "a@[IPv6:fe80::1%eth0]",
            "a@[]",
            "a@[ 192.0.2.1]",
            "a@[192.0.2.1",
            "a@192.0.2.1]",
            "a@[192.0.2.1].example",
            "a b@[192.0.2.1]",
            "a..b@[192.0.2.1]",
            "@[192.0.2.1]",
            "a@b@[192.0.2.1]",
            "x" * 250 + "@[192.0.2.1]",
            *(b for b in BAD_ADDRESSES if "[" not in b),
        ]:
            with self.subTest(address=bad):
                self.assertRaises(AddressError, parseReversePath, bad)
