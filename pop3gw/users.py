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
from pop3gw.address import Address, AddressError
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

#: sha512-crypt round limits and default, from Ulrich Drepper's
#: specification (C{rounds=} outside the limits is clamped).
SHA512_CRYPT_DEFAULT_ROUNDS = 5000
SHA512_CRYPT_MIN_ROUNDS = 1000
SHA512_CRYPT_MAX_ROUNDS = 999999999
SHA512_CRYPT_MAX_SALT = 16

_CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CRYPT_CHARS = frozenset(_CRYPT_ALPHABET)
_SHA512_CRYPT_HASH_LENGTH = 86


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


def sha512Crypt(password: bytes, salt: bytes, rounds: Optional[int] = None) -> str:
    """
    The glibc C{$6$} (sha512-crypt) hash of C{password}, implemented from
    Ulrich Drepper's published specification ("Unix crypt using SHA-256 and
    SHA-512"), since Python's C{crypt} module is deprecated and gone from
    Python 3.13.

    @param salt: up to 16 bytes are used; must not contain C{$}.
    @param rounds: the C{rounds=} value, or L{None} for the default (5000)
        without a C{rounds=} field in the result.  Clamped to
        [1000, 999999999] as the specification says.
    @return: C{"$6$[rounds=N$]salt$hash"}.
    """
    salt = salt[:SHA512_CRYPT_MAX_SALT]
    if rounds is None:
        count = SHA512_CRYPT_DEFAULT_ROUNDS
        roundsField = ""
    else:
        count = min(max(rounds, SHA512_CRYPT_MIN_ROUNDS), SHA512_CRYPT_MAX_ROUNDS)
        roundsField = f"rounds={count}$"
    sha512 = hashlib.sha512
    p = password
    s = salt
    plen = len(p)

    # Steps 1-12: digest A from P, S and alternate digest B = H(P S P).
    b = sha512(p + s + p).digest()
    a = sha512(p + s)
    a.update(_repeatTo(b, plen))
    n = plen
    while n:
        a.update(b if n & 1 else p)
        n >>= 1
    aDigest = a.digest()

    # Steps 13-20: the P and S sequences.
    dp = sha512(p * plen).digest()
    pSeq = _repeatTo(dp, plen) if plen else b""
    ds = sha512(s * (16 + aDigest[0])).digest()
    sSeq = _repeatTo(ds, len(s)) if s else b""

    # Step 21: the rounds.
    c = aDigest
    for i in range(count):
        h = sha512(pSeq if i & 1 else c)
        if i % 3:
            h.update(sSeq)
        if i % 7:
            h.update(pSeq)
        h.update(c if i & 1 else pSeq)
        c = h.digest()

    # Step 22: the encoding, with the specification's byte permutation.
    out = []
    for i in range(21):
        x, y, z = i, i + 21, i + 42
        if i % 3 == 1:
            x, y, z = y, z, x
        elif i % 3 == 2:
            x, y, z = z, x, y
        out.append(_b64From24Bit(c[x], c[y], c[z], 4))
    out.append(_b64From24Bit(0, 0, c[63], 2))
    return "$6$" + roundsField + salt.decode("ascii", "surrogateescape") + "$" + "".join(out)


def _verifySha512Crypt(hashed: str, password: bytes) -> bool:
    """
    Check C{password} against a C{$6$[rounds=N$]salt$hash} string.
    """
    if not hashed.startswith("$6$"):
        return False
    parts = hashed[3:].split("$")
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
    if len(expected) != _SHA512_CRYPT_HASH_LENGTH or not set(expected) <= _CRYPT_CHARS:
        return False
    if not salt.isascii():
        return False
    computed = sha512Crypt(password, salt.encode("ascii"), rounds)
    return hmac.compare_digest(computed.rsplit("$", 1)[1].encode("ascii"), expected.encode("ascii"))


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


_VERIFIERS: Mapping[str, Callable[[str, bytes], bool]] = {
    "ARGON2ID": _argon2Verifier("$argon2id$"),
    "ARGON2I": _argon2Verifier("$argon2i$"),
    "BLF-CRYPT": _verifyBcrypt,
    "SHA512-CRYPT": _verifySha512Crypt,
}


def verifyPassword(stored: str, password: str | bytes) -> bool:
    """
    Check C{password} against a stored C{"{SCHEME}hash"}.

    Known schemes: C{ARGON2ID}, C{ARGON2I}, C{BLF-CRYPT} (bcrypt, C{$2y$},
    C{$2b$} or C{$2a$}) and C{SHA512-CRYPT} (glibc C{$6$}).  Scheme names
    are case-insensitive, as in Dovecot.  All comparisons are constant-time.
    Passwords longer than L{MAX_PASSWORD_BYTES} never match.

    @return: whether the password matches.  An unknown scheme or a malformed
        hash gives C{False}, never an exception.
    """
    if not isinstance(stored, str) or not stored.startswith("{"):
        return False
    end = stored.find("}")
    if end < 0:
        return False
    verifier = _VERIFIERS.get(stored[1:end].upper())
    if verifier is None:
        return False
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


def _parseUsers(data: bytes) -> tuple[list[_UserLine], dict[Address, str], list[int]]:
    """
    Parse a users file.

    @return: its lines, the users (the first line of a duplicated address
        wins), and the 1-based numbers of malformed or duplicate lines.
    """
    lines = []
    users: dict[Address, str] = {}
    bad = []
    for number, raw in enumerate(_splitLines(data), 1):
        line, malformed = _parseUserLine(raw)
        lines.append(line)
        if malformed:
            bad.append(number)
        elif line.address is not None:
            if line.address in users:
                bad.append(number)
            else:
                users[line.address] = line.hashed
    return lines, users, bad


def _parseAliases(data: bytes) -> tuple[dict[Address, Address], list[int]]:
    """
    Parse an aliases file of C{alias@domain: user@domain} lines.

    @return: alias -> user, and the 1-based numbers of malformed lines.
    """
    aliases: dict[Address, Address] = {}
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
        if aliasAddress in aliases:
            bad.append(number)
            continue
        aliases[aliasAddress] = targetAddress
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


@attr.s(frozen=True, auto_attribs=True)
class _Snapshot:
    """
    Immutable view of both files, swapped as a whole.
    """

    users: Mapping[Address, str]
    aliases: Mapping[Address, Address]


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
        self._snapshot = _Snapshot({}, {})
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
                aliases = {}
            if users is not self._snapshot.users or aliases is not self._snapshot.aliases:
                self._snapshot = _Snapshot(users, aliases)
            return self._snapshot

    # -- IUserDatabase: reads

    def passwordHash(self, address: Address) -> Optional[str]:
        """
        See L{IUserDatabase.passwordHash}.
        """
        return self._refresh().users.get(address)

    def peekPasswordHash(self, address: Address) -> Optional[str]:
        """
        See L{IUserDatabase.peekPasswordHash}: the file is held in memory and
        re-read only when a C{stat} shows it changed, which is cheap enough
        for the reactor thread.
        """
        return self.passwordHash(address)

    def exists(self, address: Address) -> bool:
        """
        See L{IUserDatabase.exists}.
        """
        return address in self._refresh().users

    def resolve(self, address: Address) -> Optional[Address]:
        """
        See L{IUserDatabase.resolve}.  Aliases are one level deep: an alias
        naming a user that does not exist resolves to L{None}.
        """
        snapshot = self._refresh()
        if address in snapshot.users:
            return address
        target = snapshot.aliases.get(address)
        if target is not None and target in snapshot.users:
            return target
        return None

    def owns(self, user: Address, address: Address) -> bool:
        """
        See L{IUserDatabase.owns}.
        """
        if address == user:
            return True
        snapshot = self._refresh()
        return address not in snapshot.users and snapshot.aliases.get(address) == user

    def addresses(self) -> list:
        """
        See L{IUserDatabase.addresses}.
        """
        return sorted(self._refresh().users)

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
        if not hashed.startswith("{") or "}" not in hashed or any(c in hashed for c in ":\r\n\0"):
            raise ValueError("not a {SCHEME}hash string")
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

    def remove(self, address: Address) -> None:
        """
        See L{IUserDatabase.remove}.  Every line for C{address} is removed.
        """
        with self._writeLock():
            lines = self._readLines()
            if self._find(lines, address) is None:
                raise UnknownUser(str(address))
            self._write([line for line in lines if line.address != address])
        self._refresh(force=True)

    @staticmethod
    def _find(lines: list[_UserLine], address: Address) -> Optional[int]:
        for i, line in enumerate(lines):
            if line.address == address:
                return i
        return None

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

