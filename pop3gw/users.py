# -*- test-case-name: tests.test_users -*-
"""
The users file: login addresses with slow password hashes, and aliases.

The users file uses Dovecot's C{passwd-file} format, so an existing Dovecot
file can be used as it is::

    # comments and blank lines are kept when the file is rewritten
    alice@example.org:{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$...
    bob@example.org:{SHA512-CRYPT}$6$rounds=5000$salt$...:1000:1000::/home/bob

Fields after the hash (uid, gid, gecos, home, shell, extra fields) are
ignored and kept as they are when the file is rewritten.

Users and aliases are found whatever the case of their local part (by
L{pop3gw.address.lookupKey}); an address written exactly as stored wins, so
old files holding two case variants keep working.  Answers name the user as
stored.  A password verified under an older scheme is replaced by an
Argon2id hash at its first successful login (L{upgradedHash},
L{UsersFile.upgradePasswordHash}).

The aliases file (optional) has one C{alias@domain: user@domain} line per
alias.

Both files are re-read whenever their (mtime, size, inode) change, checked on
each lookup, so C{pop3gw user add} takes effect for the next login without a
restart.  Writes go to a temporary file in the same directory which is
fsynced and renamed over the old one, under an exclusive lock on a sidecar
C{.lock} file, so a crash never leaves a half-written file and two
concurrent writers never lose an update.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import os
import secrets
import threading
from typing import Callable, Mapping, Optional

import argon2
import attr
import bcrypt
from twisted.logger import Logger
from zope.interface import implementer

from pop3gw import fsutil
from pop3gw.address import Address, AddressError, lookupKey
from pop3gw.interfaces import IUserDatabase, TemporaryFailure, UnknownUser, UserExists

_log = Logger()

# --- Password hashing ---------------------------------------------------

#: Argon2id parameters for new hashes: OWASP's minimum recommendation
#: (19 MiB, 2 passes, 1 lane), which costs tens of milliseconds on a small
#: 2-core server.
ARGON2_TIME_COST = 2
ARGON2_MEMORY_COST = 19456  # KiB
ARGON2_PARALLELISM = 1
ARGON2_HASH_LEN = 32
ARGON2_SALT_LEN = 16

#: Longer passwords are refused without hashing: sha512-crypt's cost grows
#: with the square of the password length.
MAX_PASSWORD_BYTES = 1024

#: bcrypt only looks at the first 72 bytes of a password.
BCRYPT_MAX_PASSWORD_BYTES = 72

#: sha256-crypt and sha512-crypt round limits and default, from Ulrich
#: Drepper's specification (C{rounds=} outside the limits is clamped).
SHA_CRYPT_DEFAULT_ROUNDS = 5000
SHA_CRYPT_MIN_ROUNDS = 1000
SHA_CRYPT_MAX_ROUNDS = 999999999
SHA_CRYPT_MAX_SALT = 16

_CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CRYPT_CHARS = frozenset(_CRYPT_ALPHABET)

#: The schemes new hashes are made with; a password verified against any
#: other scheme is re-hashed at its first successful login.
CURRENT_SCHEMES = frozenset({"ARGON2ID", "ARGON2I"})


def _passwordHasher() -> argon2.PasswordHasher:
    """
    The Argon2id hasher with this module's parameters.
    """
    return argon2.PasswordHasher(
        time_cost=ARGON2_TIME_COST,
        memory_cost=ARGON2_MEMORY_COST,
        parallelism=ARGON2_PARALLELISM,
        hash_len=ARGON2_HASH_LEN,
        salt_len=ARGON2_SALT_LEN,
        type=argon2.Type.ID,
    )


def hashPassword(password: str) -> str:
    """
    Hash C{password} for storage with Argon2id.

    @return: C{"{ARGON2ID}$argon2id$v=19$m=...,t=...,p=...$salt$hash"}, the
        form Dovecot's C{ARGON2ID} scheme uses.
    """
    return "{ARGON2ID}" + _passwordHasher().hash(password)


def _b64From24Bit(b2: int, b1: int, b0: int, n: int) -> str:
    """
    The crypt(3) base-64 encoding of a 24-bit group, least significant
    six bits first, C{n} characters.
    """
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(_CRYPT_ALPHABET[w & 0x3F])
        w >>= 6
    return "".join(out)


def _repeatTo(block: bytes, length: int) -> bytes:
    """
    C{block} repeated and cut to C{length} bytes.
    """
    return (block * (length // len(block) + 1))[:length]


@attr.s(frozen=True, auto_attribs=True)
class _ShaCrypt:
    """
    One member of the SHA-crypt family (Ulrich Drepper, "Unix crypt using
    SHA-256 and SHA-512"): the two differ only in the digest, the prefix
    and the order in which the final digest's bytes are encoded.

    @ivar prefix: C{$5$} or C{$6$}.
    @ivar digest: the hashlib constructor.
    @ivar groups: the final encoding: (byte indexes, most significant
        first, L{None} for a zero byte; characters) per group.
    """

    prefix: str
    digest: Callable
    groups: tuple

    @classmethod
    def make(cls, prefix: str, digest: Callable, size: int, rotation: int) -> "_ShaCrypt":
        """
        Derive the encoding order of the specification: groups of three
        bytes C{size // 3} apart, each group rotated by its index times
        C{rotation}, then the bytes left over, in reverse.
        """
        stride = size // 3
        groups = []
        for i in range(stride):
            group = (i, i + stride, i + 2 * stride)
            turn = (rotation * i) % 3
            groups.append((group[turn:] + group[:turn], 4))
        rest = tuple(reversed(range(3 * stride, size)))
        groups.append(((None,) * (3 - len(rest)) + rest, len(rest) + 1))
        return cls(prefix, digest, tuple(groups))

    @property
    def hashLength(self) -> int:
        return sum(n for _, n in self.groups)

    def crypt(self, password: bytes, salt: bytes, rounds: Optional[int] = None) -> str:
        """
        The hash of C{password}.

        @param salt: up to 16 bytes are used; must not contain C{$}.
        @param rounds: the C{rounds=} value, or L{None} for the default
            (5000) without a C{rounds=} field in the result.  Clamped to
            [1000, 999999999] as the specification says.
        @return: C{"$N$[rounds=R$]salt$hash"}.
        """
        salt = salt[:SHA_CRYPT_MAX_SALT]
        if rounds is None:
            count = SHA_CRYPT_DEFAULT_ROUNDS
            roundsField = ""
        else:
            count = min(max(rounds, SHA_CRYPT_MIN_ROUNDS), SHA_CRYPT_MAX_ROUNDS)
            roundsField = f"rounds={count}$"
        h = self.digest
        p = password
        s = salt
        plen = len(p)

        # Steps 1-12: digest A from P, S and alternate digest B = H(P S P).
        b = h(p + s + p).digest()
        a = h(p + s)
        a.update(_repeatTo(b, plen))
        n = plen
        while n:
            a.update(b if n & 1 else p)
            n >>= 1
        aDigest = a.digest()

        # Steps 13-20: the P and S sequences.
        dp = h(p * plen).digest()
        pSeq = _repeatTo(dp, plen) if plen else b""
        ds = h(s * (16 + aDigest[0])).digest()
        sSeq = _repeatTo(ds, len(s)) if s else b""

        # Step 21: the rounds.
        c = aDigest
        for i in range(count):
            r = h(pSeq if i & 1 else c)
            if i % 3:
                r.update(sSeq)
            if i % 7:
                r.update(pSeq)
            r.update(c if i & 1 else pSeq)
            c = r.digest()

        # Step 22: the encoding, with the specification's byte order.
        out = []
        for indexes, chars in self.groups:
            b2, b1, b0 = (0 if i is None else c[i] for i in indexes)
            out.append(_b64From24Bit(b2, b1, b0, chars))
        return self.prefix + roundsField + salt.decode("ascii", "surrogateescape") + "$" + "".join(out)

    def verify(self, hashed: str, password: bytes) -> bool:
        """
        Check C{password} against a C{$N$[rounds=R$]salt$hash} string.
        """
        if not hashed.startswith(self.prefix):
            return False
        parts = hashed[len(self.prefix) :].split("$")
        rounds: Optional[int] = None
        if len(parts) == 3 and parts[0].startswith("rounds="):
            digits = parts[0][len("rounds=") :]
            if not (digits.isascii() and digits.isdigit()) or len(digits) > 10:
                return False
            rounds = int(digits)
            parts = parts[1:]
        if len(parts) != 2:
            return False
        salt, expected = parts
        if len(expected) != self.hashLength or not set(expected) <= _CRYPT_CHARS:
            return False
        if not salt.isascii():
            return False
        computed = self.crypt(password, salt.encode("ascii"), rounds)
        return hmac.compare_digest(computed.rsplit("$", 1)[1].encode("ascii"), expected.encode("ascii"))


_SHA256_CRYPT = _ShaCrypt.make("$5$", hashlib.sha256, 32, -1)
_SHA512_CRYPT = _ShaCrypt.make("$6$", hashlib.sha512, 64, 1)


def sha256Crypt(password: bytes, salt: bytes, rounds: Optional[int] = None) -> str:
    """
    The glibc C{$5$} (sha256-crypt) hash of C{password}, implemented from
    Ulrich Drepper's published specification, since Python's C{crypt}
    module is deprecated and gone from Python 3.13.  See L{_ShaCrypt.crypt}
    for the parameters.

    @return: C{"$5$[rounds=N$]salt$hash"}.
    """
    return _SHA256_CRYPT.crypt(password, salt, rounds)


def sha512Crypt(password: bytes, salt: bytes, rounds: Optional[int] = None) -> str:
    """
    The glibc C{$6$} (sha512-crypt) hash of C{password}; see
    L{sha256Crypt}.

    @return: C{"$6$[rounds=N$]salt$hash"}.
    """
    return _SHA512_CRYPT.crypt(password, salt, rounds)


def _sshaVerifier(digest: Callable, size: int, decode: Callable[[str], bytes]) -> Callable[[str, bytes], bool]:
    """
    A checker for Dovecot's salted SHA-2 schemes (C{SSHA256}, C{SSHA512}):
    C{encode(digest(password + salt) + salt)}, with a salt of at least one
    byte (Dovecot makes four).
    """

    def verify(hashed: str, password: bytes) -> bool:
        try:
            raw = decode(hashed)
        except (ValueError, binascii.Error):
            return False
        if len(raw) <= size:
            return False
        expected, salt = raw[:size], raw[size:]
        return hmac.compare_digest(digest(password + salt).digest(), expected)

    return verify


def _base64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _hex(text: str) -> bytes:
    return bytes.fromhex(text)


def _verifyBcrypt(hashed: str, password: bytes) -> bool:
    """
    Check C{password} against a C{$2y$}/C{$2b$}/C{$2a$} bcrypt hash.  Like
    every bcrypt implementation that made the stored hash (htpasswd,
    doveadm pw, libxcrypt), only the first 72 bytes of the password count.
    """
    if hashed[:4] not in ("$2y$", "$2b$", "$2a$"):
        return False
    # The Python bcrypt library knows $2b$ and $2a$; $2y$ (PHP, htpasswd)
    # is the same algorithm under another name.
    if hashed.startswith("$2y$"):
        hashed = "$2b$" + hashed[4:]
    return bcrypt.checkpw(password[:BCRYPT_MAX_PASSWORD_BYTES], hashed.encode("ascii"))


def _argon2Verifier(prefix: str) -> Callable[[str, bytes], bool]:
    """
    A checker for Argon2 hashes of one type (C{prefix} is C{$argon2id$} or
    C{$argon2i$}).
    """

    def verify(hashed: str, password: bytes) -> bool:
        if not hashed.startswith(prefix):
            return False
        try:
            return _passwordHasher().verify(hashed, password)
        except argon2.exceptions.VerificationError:
            return False

    return verify


def _encodings(decoders: Mapping[str, Callable[[str], bytes]], default: str) -> dict:
    """
    Dovecot's encoding suffixes: C{SCHEME} (the default encoding),
    C{SCHEME.B64}, C{SCHEME.BASE64} and C{SCHEME.HEX}.
    """
    suffixes = {"": default, ".B64": "base64", ".BASE64": "base64", ".HEX": "hex"}
    return {suffix: decoders[encoding] for suffix, encoding in suffixes.items()}


_VERIFIERS: Mapping[str, Callable[[str, bytes], bool]] = {
    "ARGON2ID": _argon2Verifier("$argon2id$"),
    "ARGON2I": _argon2Verifier("$argon2i$"),
    "BLF-CRYPT": _verifyBcrypt,
    "SHA256-CRYPT": _SHA256_CRYPT.verify,
    "SHA512-CRYPT": _SHA512_CRYPT.verify,
    **{
        name + suffix: _sshaVerifier(digest, size, decode)
        for name, digest, size in (("SSHA256", hashlib.sha256, 32), ("SSHA512", hashlib.sha512, 64))
        for suffix, decode in _encodings({"base64": _base64, "hex": _hex}, "base64").items()
    },
}

#: Dovecot's plain-text schemes (with their encoding suffixes): never
#: accepted at login; C{pop3gw user import} hashes them.
_PLAIN_DECODERS: Mapping[str, Callable[[str], bytes]] = {
    name + suffix: decode
    for name in ("PLAIN", "CLEAR", "CLEARTEXT")
    for suffix, decode in _encodings(
        {"none": lambda text: text.encode("utf-8"), "base64": _base64, "hex": _hex}, "none"
    ).items()
}


def schemeOf(stored: str) -> Optional[str]:
    """
    The scheme name of a stored C{"{SCHEME}hash"}, upper-cased, or L{None}
    if it has no C{{SCHEME}} prefix.
    """
    if not stored.startswith("{"):
        return None
    end = stored.find("}")
    if end < 0:
        return None
    return stored[1:end].upper()


def canVerify(stored: str) -> bool:
    """
    Whether L{verifyPassword} knows the scheme of C{stored}.
    """
    return schemeOf(stored) in _VERIFIERS


def plainPassword(stored: str) -> Optional[str]:
    """
    The password of a plain-text C{{PLAIN}}, C{{CLEAR}} or C{{CLEARTEXT}}
    entry (with any of Dovecot's encoding suffixes), for hashing it on
    import.

    @return: the password, or L{None} if C{stored} is not plain text (or
        its encoding or UTF-8 is broken).
    """
    decode = _PLAIN_DECODERS.get(schemeOf(stored) or "")
    if decode is None:
        return None
    try:
        return decode(stored[stored.index("}") + 1 :]).decode("utf-8")
    except (ValueError, binascii.Error):
        return None


def upgradedHash(stored: str, password: bytes) -> Optional[str]:
    """
    A new Argon2id hash of C{password}, if C{stored} (which C{password}
    was just verified against) uses an older scheme; L{None} if it is
    current (or not one L{verifyPassword} knows).
    """
    scheme = schemeOf(stored)
    if scheme is None or scheme in CURRENT_SCHEMES or scheme not in _VERIFIERS:
        return None
    return "{ARGON2ID}" + _passwordHasher().hash(password)


def verifyPassword(stored: str, password: str | bytes) -> bool:
    """
    Check C{password} against a stored C{"{SCHEME}hash"}.

    Known schemes: C{ARGON2ID}, C{ARGON2I}, C{BLF-CRYPT} (bcrypt, C{$2y$},
    C{$2b$} or C{$2a$}), C{SHA256-CRYPT} and C{SHA512-CRYPT} (glibc C{$5$}
    and C{$6$}), C{SSHA256} and C{SSHA512} (Dovecot's salted SHA-2, base64
    or with a C{.HEX} suffix).  Plain-text schemes (C{PLAIN}, C{CLEAR},
    C{CRAM-MD5}'s HMAC context...) never match.  Scheme names are
    case-insensitive, as in Dovecot.  All comparisons are constant-time.
    Passwords longer than L{MAX_PASSWORD_BYTES} never match.

    @return: whether the password matches.  An unknown scheme or a malformed
        hash gives C{False}, never an exception.
    """
    if not isinstance(stored, str):
        return False
    verifier = _VERIFIERS.get(schemeOf(stored) or "")
    if verifier is None:
        return False
    end = stored.index("}")
    try:
        if isinstance(password, str):
            password = password.encode("utf-8")
        if len(password) > MAX_PASSWORD_BYTES:
            return False
        if not stored.isascii():
            return False
        return bool(verifier(stored[end + 1 :], password))
    except (ValueError, TypeError, argon2.exceptions.VerificationError):
        return False


@attr.s(frozen=True, auto_attribs=True)
class ImportedUser:
    """
    One user taken from a Dovecot passwd-file by L{parsePasswdFile}.

    @ivar line: its 1-based line number.
    @ivar address: the user.
    @ivar hashed: the C{{SCHEME}hash} to store.
    @ivar extra: the fields after the password, with their leading C{:},
        or C{""}.
    @ivar converted: whether the file held a plain-text password, hashed
        here with Argon2id.
    """

    line: int
    address: Address
    hashed: str
    extra: str
    converted: bool


def parsePasswdFile(data: bytes) -> tuple[list[ImportedUser], list[tuple[int, str]]]:
    """
    Read a Dovecot passwd-file (C{user:{SCHEME}password:uid:gid:...}) for
    C{pop3gw user import}: hashes L{verifyPassword} can check are kept as
    they are, plain-text passwords (C{{PLAIN}}, C{{CLEAR}}, C{{CLEARTEXT}},
    with any encoding suffix) are hashed with Argon2id, and every other
    line that is not a comment or blank is refused with a reason that
    never contains the password or hash.  A user that differs from an
    earlier line only in case is refused too.

    @return: the users taken, and (line number, reason) for each line
        refused.
    """
    taken: list[ImportedUser] = []
    refused: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(_splitLines(data), 1):
        try:
            text = raw.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            refused.append((number, "not valid UTF-8"))
            continue
        if _isComment(text):
            continue
        userField, sep, rest = text.partition(":")
        if not sep:
            refused.append((number, "not a user:password line"))
            continue
        try:
            address = Address.parse(userField.strip())
        except AddressError:
            refused.append((number, f"{userField.strip()!r} is not an address (user@domain)"))
            continue
        stored, sep, extra = rest.partition(":")
        extra = sep + extra
        reason = None
        converted = False
        if not stored:
            reason = "no password"
        elif schemeOf(stored) is None:
            reason = "no {SCHEME} prefix, so the hash cannot be told apart"
        elif schemeOf(stored) in _PLAIN_DECODERS:
            password = plainPassword(stored)
            if not password or len(password.encode("utf-8")) > MAX_PASSWORD_BYTES or "\0" in password:
                reason = "plain-text password empty, too long, with NUL or badly encoded"
            else:
                stored = hashPassword(password)
                converted = True
        elif not canVerify(stored) or not stored.isascii():
            scheme = schemeOf(stored) or ""
            if not (scheme.isascii() and scheme.isprintable()):
                scheme = "?"
            reason = f"password scheme {scheme} cannot be verified by pop3gw"
        if reason is None and lookupKey(address) in seen:
            reason = f"same user as line {seen[lookupKey(address)]}"
        if reason is not None:
            refused.append((number, f"{address}: {reason}"))
            continue
        seen[lookupKey(address)] = number
        taken.append(ImportedUser(number, address, stored, extra, converted))
    return taken, refused


class _DummyHash:
    """
    Makes the dummy hash once, on first use, even when several pool threads
    ask at the same time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: Optional[str] = None

    def __call__(self) -> str:
        with self._lock:
            if self._value is None:
                self._value = hashPassword(secrets.token_urlsafe(32))
            return self._value


_dummyHash = _DummyHash()


def dummyHash() -> str:
    """
    A valid C{{ARGON2ID}} hash of a random password nobody knows, made once
    on first use (also available as C{DUMMY_HASH}).  Logins for unknown
    users are checked against it so that they cost as much as logins for
    real users.
    """
    return _dummyHash()


def __getattr__(name: str) -> str:
    # DUMMY_HASH is computed on first access (PEP 562), not at import time.
    if name == "DUMMY_HASH":
        return dummyHash()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- Files ----------------------------------------------------------------


def _statKey(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _splitLines(data: bytes) -> list[bytes]:
    """
    The lines of C{data}, without their line ends.
    """
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def _isComment(text: str) -> bool:
    stripped = text.strip()
    return not stripped or stripped.startswith("#")


@attr.s(frozen=True, auto_attribs=True)
class _UserLine:
    """
    One parsed users file line.

    @ivar address: the user, or L{None} for a comment, blank or malformed
        line (kept as it is on rewrite).
    @ivar userField: the address text as written in the file.
    @ivar hashed: the stored C{{SCHEME}hash}.
    @ivar extra: the fields after the hash, with their leading C{:}, or
        C{""}.
    """

    raw: bytes
    address: Optional[Address] = None
    userField: str = ""
    hashed: str = ""
    extra: str = ""

    def withHash(self, hashed: str) -> "_UserLine":
        text = f"{self.userField}:{hashed}{self.extra}"
        return attr.evolve(self, raw=text.encode("utf-8"), hashed=hashed)


def _parseUserLine(raw: bytes) -> tuple[_UserLine, bool]:
    """
    @return: the parsed line and whether it is malformed.
    """
    try:
        text = raw.rstrip(b"\r").decode("utf-8")
    except UnicodeDecodeError:
        return _UserLine(raw), True
    if _isComment(text):
        return _UserLine(raw), False
    userField, sep, rest = text.partition(":")
    if not sep:
        return _UserLine(raw), True
    try:
        address = Address.parse(userField.strip())
    except AddressError:
        return _UserLine(raw), True
    hashed, sep, extra = rest.partition(":")
    return _UserLine(raw, address, userField, hashed, sep + extra), False


class _AddressMap:
    """
    An immutable map from addresses to values, looked up case-insensitively
    (L{lookupKey}): an address written exactly as stored finds that entry;
    any other spelling finds the first entry, in file order, with the same
    key.  Only files written before lookups ignored case can have two
    entries with one key.

    @ivar entries: stored address -> value, in file order.
    @ivar caseVariants: for each key held by more than one entry, those
        entries' addresses in file order.
    """

    def __init__(self) -> None:
        self.entries: dict[Address, object] = {}
        self._byKey: dict[str, Address] = {}
        self.caseVariants: dict[str, list[Address]] = {}

    def _add(self, address: Address, value: object) -> bool:
        """
        Add an entry while building the map.

        @return: C{False} if C{address} (this exact spelling) is already
            there, and nothing was added.
        """
        if address in self.entries:
            return False
        self.entries[address] = value
        key = lookupKey(address)
        first = self._byKey.setdefault(key, address)
        if first != address:
            self.caseVariants.setdefault(key, [first]).append(address)
        return True

    def find(self, address: Address) -> Optional[Address]:
        """
        The stored address that C{address} finds, or L{None}.
        """
        if address in self.entries:
            return address
        return self._byKey.get(lookupKey(address))

    def get(self, address: Address) -> Optional[object]:
        """
        The value of the entry C{address} finds, or L{None}.
        """
        found = self.find(address)
        return None if found is None else self.entries[found]


def _parseUsers(data: bytes) -> tuple[list[_UserLine], _AddressMap, list[int]]:
    """
    Parse a users file.

    @return: its lines, the users (stored address -> hash; the first line
        of a duplicated address wins), and the 1-based numbers of malformed
        or duplicate lines.
    """
    lines = []
    users = _AddressMap()
    bad = []
    for number, raw in enumerate(_splitLines(data), 1):
        line, malformed = _parseUserLine(raw)
        lines.append(line)
        if malformed:
            bad.append(number)
        elif line.address is not None and not users._add(line.address, line.hashed):
            bad.append(number)
    return lines, users, bad


def _parseAliases(data: bytes) -> tuple[_AddressMap, list[int]]:
    """
    Parse an aliases file of C{alias@domain: user@domain} lines.

    @return: alias -> user (as written), and the 1-based numbers of
        malformed lines.
    """
    aliases = _AddressMap()
    bad = []
    for number, raw in enumerate(_splitLines(data), 1):
        try:
            text = raw.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            bad.append(number)
            continue
        if _isComment(text):
            continue
        alias, sep, target = text.partition(":")
        try:
            if not sep:
                raise AddressError("no colon")
            aliasAddress = Address.parse(alias.strip())
            targetAddress = Address.parse(target.strip())
        except AddressError:
            bad.append(number)
            continue
        if not aliases._add(aliasAddress, targetAddress):
            bad.append(number)
    return aliases, bad


class _WatchedFile:
    """
    A file parsed into an immutable value that is re-read when its
    (mtime_ns, size, inode) change.  A missing file parses as C{b""}; a file
    that cannot be read keeps the previous value, and if it has never been
    read, raises L{TemporaryFailure}: an empty users database would turn a
    passing permission or I/O problem into "unknown user" bounces and a
    silently empty C{user list}.

    Not thread-safe by itself: the owner holds a lock around L{current}.
    """

    def __init__(self, path: str, parse: Callable[[bytes], tuple], what: str):
        self.path = path
        self._parse = parse
        self._what = what
        self._key: object = object()
        self._failedKey: object = None
        self._loaded = False
        self.value = parse(b"")[:-1]

    def current(self, force: bool = False) -> tuple:
        """
        The parsed value, re-read first if the file changed.

        @raise TemporaryFailure: the file cannot be read and never could.
        """
        try:
            key: object = _statKey(os.stat(self.path))
        except FileNotFoundError:
            key = None
        except OSError as e:
            self._loadFailed(("stat", e.errno), e)
            return self.value
        if key == self._key and not force:
            return self.value
        if key is None:
            data = b""
        else:
            try:
                with open(self.path, "rb") as f:
                    key = _statKey(os.fstat(f.fileno()))
                    data = f.read()
            except FileNotFoundError:
                key, data = None, b""
            except OSError as e:
                self._loadFailed(key, e)
                return self.value
        *value, bad = self._parse(data)
        if bad:
            _log.warn(
                "{what} {path}: ignored malformed or duplicate line(s) {lines}",
                what=self._what,
                path=self.path,
                lines=",".join(str(n) for n in bad),
            )
        self.value = tuple(value)
        self._key = key
        self._failedKey = None
        self._loaded = True
        return self.value

    def _loadFailed(self, key: object, e: OSError) -> None:
        error = e.strerror or str(e.errno)
        if key != self._failedKey:
            self._failedKey = key
            _log.error(
                "cannot read {what} {path} ({error}); {consequence}",
                what=self._what,
                path=self.path,
                error=error,
                consequence="keeping the previous contents" if self._loaded else "lookups fail temporarily",
            )
        if not self._loaded:
            raise TemporaryFailure(f"cannot read {self._what} {self.path}: {error}")


def _unverifiable(users: _AddressMap) -> list[tuple[Address, Optional[str]]]:
    """
    The users whose hash L{verifyPassword} cannot check, with their scheme
    (printable ASCII, else C{"?"}) or L{None} when there is no scheme.
    """
    found = []
    for address, stored in users.entries.items():
        if not canVerify(stored):
            scheme = schemeOf(stored)
            if scheme is not None and not (scheme.isascii() and scheme.isprintable()):
                scheme = "?"
            found.append((address, scheme))
    return found


@attr.s(frozen=True, auto_attribs=True)
class _Snapshot:
    """
    Immutable view of both files, swapped as a whole.
    """

    users: _AddressMap
    aliases: _AddressMap


def _checkHash(hashed: str) -> None:
    """
    @raise ValueError: C{hashed} contains C{:} or a line break, or does
        not start with C{{SCHEME}}.
    """
    if not hashed.startswith("{") or "}" not in hashed or any(c in hashed for c in ":\r\n\0"):
        raise ValueError("not a {SCHEME}hash string")


@implementer(IUserDatabase)
class UsersFile:
    """
    L{IUserDatabase} backed by a Dovecot-style passwd-file and an optional
    aliases file.

    Lookups are thread-safe (L{passwordHash} runs in a thread pool): each
    one stats the files and, if they changed, re-reads them and swaps in a
    new immutable snapshot under a lock.

    @cvar FILE_MODE: the permissions of a rewritten users file.
    """

    FILE_MODE = fsutil.FILE_MODE

    # Indirection so tests can simulate a crash at the rename.
    _replace = staticmethod(os.replace)

    def __init__(self, path: str, aliasesPath: Optional[str] = None, owner: Optional[fsutil.Owner] = None):
        """
        @param path: the users file; missing means no users.
        @param aliasesPath: the aliases file, or L{None} for no aliases.
        @param owner: the data directory's owner, given the users file and
            its lock file when this process creates them (see
            L{pop3gw.fsutil}); a rewritten file keeps its owner.
        """
        self.path = path
        self.aliasesPath = aliasesPath
        self.owner = owner
        self.lockPath = path + ".lock"
        self._lock = threading.Lock()
        self._usersFile = _WatchedFile(path, _parseUsers, "users file")
        self._aliasesFile = (
            _WatchedFile(aliasesPath, _parseAliases, "aliases file") if aliasesPath is not None else None
        )
        self._snapshot = _Snapshot(_AddressMap(), _AddressMap())
        try:
            self._refresh()
        except TemporaryFailure:
            pass  # logged; every lookup fails temporarily until it can be read

    def _refresh(self, force: bool = False) -> _Snapshot:
        """
        The current snapshot, re-reading changed files.

        @raise TemporaryFailure: a file cannot be read and never could.
        """
        with self._lock:
            _lines, users = self._usersFile.current(force)
            if self._aliasesFile is not None:
                (aliases,) = self._aliasesFile.current(force)
            else:
                aliases = self._snapshot.aliases
            if users is not self._snapshot.users:
                self._warnAboutUsers(users)
            if users is not self._snapshot.users or aliases is not self._snapshot.aliases:
                self._snapshot = _Snapshot(users, aliases)
            return self._snapshot

    def _warnAboutUsers(self, users: _AddressMap) -> None:
        """
        Log, once per load of the users file, what the operator should
        fix: users whose hash pop3gw cannot verify (one warning each, as
        their logins fail with the right password), and users that differ
        only in case.
        """
        lines, _ = self._usersFile.value
        numbers = {line.address: n for n, line in reversed(list(enumerate(lines, 1))) if line.address is not None}
        for address, scheme in _unverifiable(users):
            _log.warn(
                "users file {path} line {line}: {user} has {what}, which pop3gw does not accept; "
                "{user} cannot log in until its password is set with 'pop3gw user passwd'",
                path=self.path,
                line=numbers[address],
                user=str(address),
                what="no {SCHEME} prefix" if scheme is None else f"password scheme {scheme}",
            )
        for key, variants in users.caseVariants.items():
            _log.warn(
                "users file {path}: lines {lines} ({key}) differ only in case; other spellings find line {first}",
                path=self.path,
                lines=",".join(str(numbers[a]) for a in variants),
                key=key,
                first=numbers[variants[0]],
            )

    # -- IUserDatabase: reads

    def lookupUser(self, address: Address) -> Optional[tuple[Address, str]]:
        """
        See L{IUserDatabase.lookupUser}.
        """
        users = self._refresh().users
        found = users.find(address)
        if found is None:
            return None
        return found, users.entries[found]

    def peekUser(self, address: Address) -> Optional[tuple[Address, str]]:
        """
        See L{IUserDatabase.peekUser}: the file is held in memory and
        re-read only when a C{stat} shows it changed, which is cheap enough
        for the reactor thread.
        """
        return self.lookupUser(address)

    def unverifiableUsers(self) -> list[tuple[Address, Optional[str]]]:
        """
        The users whose stored hash L{verifyPassword} cannot check (so who
        cannot log in), in file order.

        @return: (user, scheme name or L{None} for no C{{SCHEME}} prefix)
            pairs.
        """
        return _unverifiable(self._refresh().users)

    def passwordHash(self, address: Address) -> Optional[str]:
        """
        See L{IUserDatabase.passwordHash}.
        """
        return self._refresh().users.get(address)

    def exists(self, address: Address) -> bool:
        """
        See L{IUserDatabase.exists}.
        """
        return self._refresh().users.find(address) is not None

    def resolve(self, address: Address) -> Optional[Address]:
        """
        See L{IUserDatabase.resolve}.  Aliases are one level deep: an alias
        naming a user that does not exist resolves to L{None}.
        """
        return self._resolve(self._refresh(), address)

    @staticmethod
    def _resolve(snapshot: _Snapshot, address: Address) -> Optional[Address]:
        user = snapshot.users.find(address)
        if user is not None:
            return user
        target = snapshot.aliases.get(address)
        if target is None:
            return None
        return snapshot.users.find(target)

    def owns(self, user: Address, address: Address) -> bool:
        """
        See L{IUserDatabase.owns}.
        """
        if address == user:
            return True
        snapshot = self._refresh()
        owner = self._resolve(snapshot, address)
        return owner is not None and owner == snapshot.users.find(user)

    def addresses(self) -> list:
        """
        See L{IUserDatabase.addresses}.
        """
        return sorted(self._refresh().users.entries)

    def reload(self) -> None:
        """
        See L{IUserDatabase.reload}.  A file that cannot be read is logged
        (by L{_WatchedFile}); nothing is raised.
        """
        try:
            self._refresh()
        except TemporaryFailure:
            pass

    # -- IUserDatabase: writes

    def setPassword(self, address: Address, hashed: str, create: bool) -> None:
        """
        See L{IUserDatabase.setPassword}.

        @raise ValueError: C{hashed} contains C{:} or a line break, or does
            not start with C{{SCHEME}}.
        """
        _checkHash(hashed)
        with self._writeLock():
            lines = self._readLines()
            index = self._find(lines, address)
            if create and index is not None:
                raise UserExists(str(address))
            if not create and index is None:
                raise UnknownUser(str(address))
            if index is None:
                lines.append(_UserLine(f"{address}:{hashed}".encode("utf-8"), address, str(address), hashed))
            else:
                lines[index] = lines[index].withHash(hashed)
            self._write(lines)
        self._refresh(force=True)

    def addUsers(self, entries: list[tuple[Address, str, str]]) -> None:
        """
        Add several users in one atomic rewrite (C{pop3gw user import}).

        @param entries: (address, C{{SCHEME}hash}, the fields after the
            hash with their leading C{:}, or C{""}) per user.
        @raise UserExists: one of them exists already (in any case);
            nothing was added.
        @raise ValueError: a hash or fields could corrupt the file.
        """
        for _address, hashed, extra in entries:
            _checkHash(hashed)
            if extra and (not extra.startswith(":") or any(c in extra for c in "\r\n\0")):
                raise ValueError("bad extra fields")
        with self._writeLock():
            lines = self._readLines()
            for address, hashed, extra in entries:
                if self._find(lines, address) is not None:
                    raise UserExists(str(address))
                text = f"{address}:{hashed}{extra}"
                lines.append(_UserLine(text.encode("utf-8"), address, str(address), hashed, extra))
            self._write(lines)
        self._refresh(force=True)

    def upgradePasswordHash(self, address: Address, oldHash: str, newHash: str) -> bool:
        """
        See L{IUserDatabase.upgradePasswordHash}.  The file is rewritten
        like any other change (under the lock, atomically); a failure to
        write it is logged, not raised: the login that asked succeeds
        anyway and the next one tries again.
        """
        _checkHash(newHash)
        try:
            with self._writeLock():
                lines = self._readLines()
                index = self._find(lines, address)
                if index is None or lines[index].hashed != oldHash:
                    return False
                lines[index] = lines[index].withHash(newHash)
                stored = lines[index].address
                self._write(lines)
        except OSError as e:
            _log.error(
                "cannot upgrade the password hash of {user} in {path}: {error}",
                user=str(address),
                path=self.path,
                error=e.strerror or str(e),
            )
            return False
        self._refresh(force=True)
        _log.info(
            "upgraded the password hash of {user} from {old} to {new}",
            user=str(stored),
            old=schemeOf(oldHash),
            new=schemeOf(newHash),
        )
        return True

    def remove(self, address: Address) -> None:
        """
        See L{IUserDatabase.remove}.  Every line for the user C{address}
        finds is removed.
        """
        with self._writeLock():
            lines = self._readLines()
            index = self._find(lines, address)
            if index is None:
                raise UnknownUser(str(address))
            stored = lines[index].address
            self._write([line for line in lines if line.address != stored])
        self._refresh(force=True)

    @staticmethod
    def _find(lines: list[_UserLine], address: Address) -> Optional[int]:
        """
        The index of the line that a lookup of C{address} finds: the first
        one written exactly so, else the first one with its L{lookupKey}.
        """
        key = lookupKey(address)
        folded = None
        for i, line in enumerate(lines):
            if line.address == address:
                return i
            if folded is None and line.address is not None and lookupKey(line.address) == key:
                folded = i
        return folded

    def _writeLock(self):
        """
        A context manager holding an exclusive C{flock} on the sidecar lock
        file.
        """
        return _FileLock(self.lockPath, self.owner)

    def _readLines(self) -> list[_UserLine]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        return _parseUsers(data)[0]

    def _write(self, lines: list[_UserLine]) -> None:
        """
        Replace the users file with C{lines} atomically and durably, keeping
        its owner.
        """
        data = b"".join(line.raw + b"\n" for line in lines)
        fsutil.replaceFile(self.path, data, self.owner, self._replace)


class _FileLock:
    """
    An exclusive C{flock} on a lock file, as a context manager.  C{flock}
    locks belong to the open file, so this also excludes other threads of
    this process.
    """

    def __init__(self, path: str, owner: Optional[fsutil.Owner]):
        self._path = path
        self._owner = owner
        self._fd: Optional[int] = None

    def __enter__(self) -> "_FileLock":
        fd = fsutil.openLockFile(self._path, self._owner)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

