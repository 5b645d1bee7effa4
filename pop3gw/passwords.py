# -*- test-case-name: tests.test_passwords -*-
"""
Password schemes: hashing new passwords with Argon2id, verifying the
schemes a Dovecot passwd-file may hold (Argon2, bcrypt, SHA-crypt, salted
SHA-2), re-hashing an older scheme after a successful login
(L{upgradedHash}), and the dummy hash unknown users are checked against.

Everything here is pure computation, slow on purpose: callers run it in the
hash thread pool, never on the reactor thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import threading
from typing import Callable, Mapping, Optional

import argon2
import attr
import bcrypt

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
        first, C{None} for a zero byte; characters) per group.
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
        groups: list[tuple[tuple[Optional[int], ...], int]] = []
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
        @param rounds: the C{rounds=} value, or C{None} for the default
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

def _sshaWellFormed(size: int, decode: Callable[[str], bytes]) -> Callable[[str], bool]:
    """
    The syntax check of a salted SHA-2 value: valid base64 (or hex) of at
    least the digest and one byte of salt.
    """

    def wellFormed(hashed: str) -> bool:
        try:
            return len(decode(hashed)) > size
        except (ValueError, binascii.Error):
            return False

    return wellFormed


def _matches(pattern: str) -> Callable[[str], bool]:
    """
    The syntax check of a hash: a full match of the regular expression
    C{pattern} (ASCII only).
    """
    compiled = re.compile(pattern, re.ASCII)
    return lambda hashed: compiled.fullmatch(hashed) is not None


#: The PHC string format of argon2-cffi and Dovecot: version (optional),
#: memory, time and parallelism, then the salt (at least 8 bytes) and the
#: hash (at least 4 bytes) in unpadded base64.
_ARGON2_SYNTAX = r"\$%s\$(?:v=[0-9]+\$)?m=[0-9]+,t=[0-9]+,p=[0-9]+\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{6,}"

#: glibc's SHA-crypt: an optional C{rounds=N}, a salt of up to 16 printable
#: characters other than C{$} and C{:}, and the hash in the crypt alphabet.
_SHA_CRYPT_SYNTAX = r"\$%s\$(?:rounds=[0-9]{1,10}\$)?[!-#%%-9;-~]{0,16}\$[./0-9A-Za-z]{%d}"

#: The syntax of a well-formed hash of each scheme L{verifyPassword} knows;
#: a stored hash that does not match cannot be verified (see
#: L{isMalformed}).
_WELL_FORMED: Mapping[str, Callable[[str], bool]] = {
    "ARGON2ID": _matches(_ARGON2_SYNTAX % "argon2id"),
    "ARGON2I": _matches(_ARGON2_SYNTAX % "argon2i"),
    "BLF-CRYPT": _matches(r"\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}"),
    "SHA256-CRYPT": _matches(_SHA_CRYPT_SYNTAX % ("5", _SHA256_CRYPT.hashLength)),
    "SHA512-CRYPT": _matches(_SHA_CRYPT_SYNTAX % ("6", _SHA512_CRYPT.hashLength)),
    **{
        name + suffix: _sshaWellFormed(size, decode)
        for name, size in (("SSHA256", 32), ("SSHA512", 64))
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
    The scheme name of a stored C{"{SCHEME}hash"}, upper-cased, or C{None}
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
    Whether L{verifyPassword} can check C{stored}: it knows its scheme and
    the hash is well-formed for it (see L{isMalformed}).
    """
    scheme = schemeOf(stored)
    if scheme is None or scheme not in _VERIFIERS or not stored.isascii():
        return False
    return _WELL_FORMED[scheme](stored[stored.index("}") + 1 :])


def isMalformed(stored: str) -> bool:
    """
    Whether C{stored} is in a scheme L{verifyPassword} knows but its hash
    is not well-formed for that scheme: not an Argon2 encoded string of
    the scheme's type, not C{$2a$}/C{$2b$}/C{$2y$}, a cost and 53
    characters for bcrypt, not C{$5$}/C{$6$}, an optional C{rounds=N$}, a
    salt and a 43/86-character hash in the crypt alphabet for SHA-crypt,
    or not base64 (hex) of at least the digest and one byte of salt for
    SSHA.  No password can match such a hash: it is a problem for the
    operator, like an unknown scheme, not a wrong password.
    """
    return schemeOf(stored) in _VERIFIERS and not canVerify(stored)


def plainPassword(stored: str) -> Optional[str]:
    """
    The password of a plain-text C{{PLAIN}}, C{{CLEAR}} or C{{CLEARTEXT}}
    entry (with any of Dovecot's encoding suffixes), for hashing it on
    import.

    @return: the password, or C{None} if C{stored} is not plain text (or
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
    was just verified against) uses an older scheme; C{None} if it is
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


def isPlainText(stored: str) -> bool:
    """
    Whether C{stored} is in one of Dovecot's plain-text schemes (C{PLAIN},
    C{CLEAR}, C{CLEARTEXT}, with any encoding suffix), which are never
    accepted at login.
    """
    return schemeOf(stored) in _PLAIN_DECODERS


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
