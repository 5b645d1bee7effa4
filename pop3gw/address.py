# -*- test-case-name: tests.test_address -*-
"""
Mail addresses, parsed and normalised once at the boundary.

An L{Address} is a plain C{local@domain}: the whole string is Unicode NFC,
the domain is lower-cased and an internationalised domain is kept in its
ASCII (IDNA A-label) form, so C{alice@B\u00fccher.example} and
C{alice@xn--bcher-kva.example} are one user with one maildrop, and nothing in
it can name a path outside a maildrop root.  Local parts keep their case
as written (RFC 5321 says they may be case-sensitive, and the stored
spelling names the maildrop), but users and aliases are looked up by
L{lookupKey}, which folds the case, as Dovecot's C{%Lu} and Postfix's table
lookups do: C{Alice@Example.ORG} and C{alice@example.org} are one user.

Lengths are the octet limits of RFC 5321 4.5.3.1 (the local part and a
domain label are also single path components of a maildrop, so they always
fit a file name).
"""

from __future__ import annotations

import functools
import re
import unicodedata

import attr
import idna

#: Octets (UTF-8) in a whole address, its local part, its domain (ASCII
#: form, without a trailing dot) and one domain label (RFC 5321 4.5.3.1,
#: RFC 1035 2.3.4).
MAX_ADDRESS_LENGTH = 254
MAX_LOCALPART_LENGTH = 64
MAX_DOMAIN_LENGTH = 253
MAX_LABEL_LENGTH = 63

# Printable characters allowed in a local part: RFC 5322 atext plus ".",
# and any non-ASCII character (RFC 6531) except controls and separators.
_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+\-=?^_`{|}~.\u0080-\U0010ffff]+\Z")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9\-]*[a-z0-9])?\Z")


class AddressError(ValueError):
    """
    A string is not a plain C{local@domain} address.
    """


@attr.s(frozen=True, slots=True, auto_attribs=True, order=True)
class Address:
    """
    A normalised mail address.

    @ivar localpart: the part before the C{@}, case kept.
    @ivar domain: the domain, lower-cased.
    """

    localpart: str
    domain: str

    def __str__(self) -> str:
        return f"{self.localpart}@{self.domain}"

    @classmethod
    def parse(cls, text: str | bytes) -> "Address":
        """
        Parse and normalise C{text}.

        @raise AddressError: if C{text} is not a plain C{local@domain}
            address (empty parts, C{..}, slashes, NUL, controls, spaces,
            quoting, source routes, over-long parts, bad UTF-8).
        """
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise AddressError("address is not valid UTF-8") from None
        address = _parseText(text)
        if cls is not Address:
            return cls(address.localpart, address.domain)
        return address


#: Addresses parsed lately (an L{Address} is immutable, so one parse of a
#: text serves every later one: a session parses its user's address at
#: login, in C{MAIL FROM}, in C{From:}, and the recipients again and
#: again).  Texts that fail to parse are not kept.
PARSE_CACHE_SIZE = 1024


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def _parseText(text: str) -> Address:
    """
    L{Address.parse} of a text already decoded.

    @raise AddressError: see L{Address.parse}.
    """
    if text.isascii():
        # The common case, at C speed: printable ASCII other than the
        # space has no character in categories C and Z, and is NFC.
        if not text.isprintable() or " " in text:
            raise AddressError("address contains control or space characters")
        if len(text) > MAX_ADDRESS_LENGTH:
            raise AddressError("address too long")
    else:
        text = unicodedata.normalize("NFC", text)
        if len(text.encode("utf-8", "surrogatepass")) > MAX_ADDRESS_LENGTH:
            raise AddressError("address too long")
        if any(unicodedata.category(c)[0] in "CZ" for c in text):
            raise AddressError("address contains control or space characters")
    if text.count("@") != 1:
        raise AddressError("address must be local@domain")
    localpart, domain = text.split("@")
    if not localpart or len(localpart.encode("utf-8")) > MAX_LOCALPART_LENGTH:
        raise AddressError("bad local part")
    if (
        not _ATEXT.match(localpart)
        or localpart.startswith(".")
        or localpart.endswith(".")
        or ".." in localpart
        or "/" in localpart
    ):
        raise AddressError("bad local part")
    domain = _normalizeDomain(domain)
    if len(localpart.encode("utf-8")) + 1 + len(domain) > MAX_ADDRESS_LENGTH:
        raise AddressError("address too long")
    return Address(localpart, domain)


def parseReversePath(text: str | bytes) -> Address:
    """
    Parse an envelope sender (the text of C{MAIL FROM:<...>}): an address
    as L{Address.parse} takes it, or a local part at an RFC 5321 4.1.3
    address literal, C{a@[192.0.2.1]} or C{a@[IPv6:2001:db8::1]}.  A
    literal is kept in one spelling: the IPv4 address as it is, the IPv6
    address compressed and lower-case after the tag C{IPv6:} (which may be
    written in any case).  General address literals (C{[tag:text]}), IPv6
    addresses without their tag, zones and zero-padded IPv4 addresses are
    refused.

    Only senders may be literals: a recipient's domain must be a domain
    name, so that it can be local (L{Address.parse}).  An L{Address} with
    a literal never names a maildrop.

    @raise AddressError: see L{Address.parse}.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise AddressError("address is not valid UTF-8") from None
    localpart, at, literal = text.rpartition("@")
    if not (at and literal.startswith("[") and literal.endswith("]")):
        return _parseText(text)
    literal = _addressLiteral(literal[1:-1])
    # The local part by the rules of any other address.
    localpart = _parseText(localpart + "@literal.invalid").localpart
    if len(localpart.encode("utf-8")) + 1 + len(literal) > MAX_ADDRESS_LENGTH:
        raise AddressError("address too long")
    return Address(localpart, literal)


def _addressLiteral(content: str) -> str:
    """
    The normalised address literal, brackets included, for the text
    C{content} between the brackets.

    @raise AddressError: not an IPv4 or C{IPv6:} address literal.
    """
    import ipaddress

    if not content.isascii() or "%" in content:
        # No zones (RFC 4007), which name an interface of the sender's host.
        raise AddressError("bad address literal")
    if content[:5].lower() == "ipv6:":
        try:
            return f"[IPv6:{ipaddress.IPv6Address(content[5:])}]"
        except ValueError:
            raise AddressError("bad address literal") from None
    if content.replace(".", "").isdigit():
        try:
            return f"[{ipaddress.IPv4Address(content)}]"
        except ValueError:
            pass
    raise AddressError("bad address literal")


def lookupKey(address: Address) -> str:
    """
    The key users and aliases are looked up by: C{address} with its local
    part case-folded (ASCII lower-casing for an ASCII local part, Unicode
    case folding, then NFC again, for any other) and its domain as it is
    (already lower-case).  Every case spelling of one address has one key;
    the address itself keeps the spelling it was given.
    """
    localpart = address.localpart
    if localpart.isascii():
        localpart = localpart.lower()
    else:
        localpart = unicodedata.normalize("NFC", localpart.casefold())
    return f"{localpart}@{address.domain}"


#: Domains normalised lately: a users file of 10,000 lines names a few
#: domains, each normalised once instead of once per line.  Texts that
#: fail are not kept.
DOMAIN_CACHE_SIZE = 256


@functools.lru_cache(maxsize=DOMAIN_CACHE_SIZE)
def _normalizeDomain(domain: str) -> str:
    """
    The lower-case ASCII form of C{domain}: non-ASCII labels become IDNA
    A-labels (UTS 46 mapping, so C{U+3002} and full-width letters are what
    they look like); ASCII labels must be letters, digits and inner
    hyphens.

    @raise AddressError: not a domain name.
    """
    if not domain.isascii():
        try:
            domain = idna.uts46_remap(domain, std3_rules=True, transitional=False)
        except (idna.IDNAError, UnicodeError, ValueError):
            raise AddressError("bad domain") from None
    domain = domain.lower()
    if domain.endswith("."):
        domain = domain[:-1]
    labels = []
    for label in domain.split("."):
        if not label.isascii():
            try:
                label = idna.alabel(label).decode("ascii")
            except (idna.IDNAError, UnicodeError, ValueError):
                raise AddressError("bad domain") from None
        if len(label) > MAX_LABEL_LENGTH or not _LABEL.match(label):
            raise AddressError("bad domain")
        labels.append(label)
    domain = ".".join(labels)
    if len(domain) > MAX_DOMAIN_LENGTH:
        raise AddressError("domain too long")
    return domain


def parseDomain(text: str) -> str:
    """
    Normalise a domain name given by an operator (C{--domain}).

    @raise AddressError: if C{text} is not a domain name.
    """
    return Address.parse("x@" + text).domain


#: How a peer connected over a Unix socket is named in logs and policies.
UNIX_PEER = "unix"


def describePeer(peer) -> str:
    """
    The text naming a connection's peer (from C{transport.getPeer()}) in
    logs and policies: the numeric address for TCP, L{UNIX_PEER} for a Unix
    socket, C{"unknown"} otherwise.
    """
    host = getattr(peer, "host", None)
    if host:
        return str(host)
    if type(peer).__name__ == "UNIXAddress":
        return UNIX_PEER
    return "unknown"


@functools.lru_cache(maxsize=4096)
def isLoopback(host: str) -> bool:
    """
    Whether C{host} (a numeric peer address, or L{UNIX_PEER}) is on this
    machine: 127.0.0.0/8, C{::1}, an IPv4-mapped loopback
    C{::ffff:127.x.y.z}, or a Unix socket (only local processes can use
    one).
    """
    import ipaddress

    if host == UNIX_PEER:
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


#: Prefix length under which IPv6 clients are counted: one site's LAN, as
#: one IPv4 address behind NAT is (RFC 6177 assigns a site at least a /64).
IPV6_CLIENT_PREFIX = 64


@functools.lru_cache(maxsize=4096)
def clientNetwork(host: str) -> str:
    """
    The key under which a client's connections and password checks are
    counted: an IPv4 address itself (a /32), the /64 of an IPv6 address
    (C{"2001:db8:1:2::/64"}: a client holds a whole /64, so counting per
    address would let it pass every cap), an IPv4-mapped IPv6 address as
    its IPv4 address; anything else (L{UNIX_PEER}, C{"unknown"}) as it is.

    @param host: a peer as L{describePeer} names it.
    """
    import ipaddress

    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))
    return str(ip)


def isDisguisedRelay(path: str) -> bool:
    """
    Whether the forward path C{path} (the text between C{<>}) routes mail
    somewhere else while looking local: a domain with a trailing dot, or a
    local part holding C{%} (the percent hack) or C{!} (a bang path).
    Quoted local parts, source routes and double C{@}s do not parse as an
    L{Address} at all.  The MX listener refuses these with C{550 5.7.1}
    whatever the users directory says, and the Postfix socketmap does not
    find them, so a Postfix in front refuses them too.
    """
    localpart, _, domain = path.rpartition("@")
    return domain.endswith(".") or "%" in localpart or "!" in localpart
