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
Argon2id hash at its first successful login
(L{pop3gw.passwords.upgradedHash}, L{UsersFile.upgradePasswordHash}).
The file formats are parsed in L{pop3gw.passwdfile}; the password schemes
live in L{pop3gw.passwords}.

The aliases file (optional) has one C{alias@domain: user@domain} line per
alias.

Both files are re-read whenever their (mtime, size, inode) change, checked
by each lookup of the blocking side (L{UsersFile.lookupUser}, in the
server's hash pool) and by L{UsersFile.refresh} (the server's I/O pool,
every few seconds and on SIGHUP), so C{pop3gw user add} takes effect for
the next login without a restart.  A re-read swaps in a new immutable
L{pop3gw.directory.Directory}, which the reactor thread reads
(L{UsersFile.snapshot}) without any I/O.  Writes go to a temporary file in the same directory which is
fsynced and renamed over the old one, under an exclusive lock on a sidecar
C{.lock} file, so a crash never leaves a half-written file and two
concurrent writers never lose an update.
"""

from __future__ import annotations

import fcntl
import os
import threading
from typing import Callable, Iterable, Optional

import attr
from twisted.logger import Logger
from zope.interface import implementer

from pop3gw import fsutil
from pop3gw.address import Address, AddressError, lookupKey
from pop3gw.directory import DEFAULT_DELIMITER, AddressMap, Directory
from pop3gw.interfaces import (
    AddressIsAlias,
    AliasError,
    AliasNotLocal,
    AliasShadowsUser,
    IUserDirectory,
    IUserStore,
    LookupWouldBlock,
    TemporaryFailure,
    UnknownTarget,
    UnknownUser,
    UserExists,
)
from pop3gw.passwdfile import (
    AliasLine,
    UserLine,
    formatAliasLine,
    parseAliases,
    parseAliasLine,
    parseAliasName,
    parseUsers,
    splitLines,
)
from pop3gw.passwords import canVerify, isMalformed, schemeOf

_log = Logger()


def _statKey(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


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
        self.key: object = object()
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
        if key == self.key and not force:
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
        self.key = key
        self._failedKey = None
        self._loaded = True
        return self.value

    def install(self, value: tuple, key: object) -> None:
        """
        Take C{value} as the parsed contents of the file at C{key}: what
        this process has just written there, so it need not be read back.
        """
        self.value = value
        self.key = key
        self._failedKey = None
        self._loaded = True

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


def _unverifiable(users: AddressMap[str]) -> list[tuple[Address, Optional[str]]]:
    """
    The users whose hash L{pop3gw.passwords.verifyPassword} cannot check,
    with their scheme (printable ASCII, else C{"?"}) or C{None} when there
    is no scheme.
    """
    return [(address, _printableScheme(stored)) for address, stored in users.entries.items() if not canVerify(stored)]


def _printableScheme(stored: str) -> Optional[str]:
    """
    The scheme of C{stored} (printable ASCII, else C{"?"}), or C{None} when
    there is no scheme.
    """
    scheme = schemeOf(stored)
    if scheme is not None and not (scheme.isascii() and scheme.isprintable()):
        scheme = "?"
    return scheme


def _unverifiableWhat(stored: str) -> str:
    """
    What is wrong with a hash L{pop3gw.passwords.verifyPassword} cannot
    check, for the load warning (never the hash itself).
    """
    scheme = _printableScheme(stored)
    if scheme is None:
        return "no {SCHEME} prefix"
    if isMalformed(stored):
        return f"a malformed {scheme} hash"
    return f"password scheme {scheme}"


@attr.s(frozen=True, auto_attribs=True)
class _Snapshot:
    """
    Immutable view of both files, swapped as a whole.

    @ivar users: stored address -> hash.
    @ivar aliases: alias -> its targets.
    @ivar catchAll: domain -> its catch-all targets.
    @ivar directory: the L{Directory} of both, for the reactor thread.
    @ivar keys: the (mtime_ns, size, inode) of the users and aliases files
        as read (C{None} for a missing file), for L{UsersFile.peekUser}.
    """

    users: AddressMap[str]
    aliases: AddressMap[tuple]
    directory: Directory
    keys: tuple = ()
    catchAll: Optional[dict] = None


def _checkHash(hashed: str) -> None:
    """
    @raise ValueError: C{hashed} contains C{:} or a line break, or does
        not start with C{{SCHEME}}.
    """
    if not hashed.startswith("{") or "}" not in hashed or any(c in hashed for c in ":\r\n\0"):
        raise ValueError("not a {SCHEME}hash string")


@implementer(IUserDirectory, IUserStore)
class UsersFile:
    """
    L{IUserDirectory} and L{IUserStore} backed by a Dovecot-style
    passwd-file and an optional aliases file.

    The files are read at construction.  The blocking side is thread-safe
    (L{lookupUser} runs in a thread pool): each call stats the files and,
    if they changed, re-reads them and swaps in a new immutable snapshot
    under a lock; so does L{refresh}, which the server runs in its I/O
    pool periodically and on SIGHUP.  L{snapshot} only returns the last
    one.

    @cvar FILE_MODE: the permissions of a rewritten users file.
    """

    FILE_MODE = fsutil.FILE_MODE

    # Indirection so tests can simulate a crash at the rename.
    _replace = staticmethod(os.replace)

    def __init__(
        self,
        path: str,
        aliasesPath: Optional[str] = None,
        owner: Optional[fsutil.Owner] = None,
        postmaster: Optional[Address] = None,
        delimiter: str = DEFAULT_DELIMITER,
    ):
        """
        @param path: the users file; missing means no users.
        @param aliasesPath: the aliases file, or C{None} for no aliases.
        @param owner: the data directory's owner, given the users file and
            its lock file when this process creates them (see
            L{pop3gw.fsutil}); a rewritten file keeps its owner.
        @param postmaster: who receives C{postmaster@} the users' domains
            (see L{Directory}).
        @param delimiter: the sub-address separators (C{""}: none).
        """
        self.path = path
        self.aliasesPath = aliasesPath
        self.owner = owner
        self.postmaster = postmaster
        self.delimiter = delimiter
        self.lockPath = path + ".lock"
        self._lock = threading.Lock()
        self._usersFile = _WatchedFile(path, parseUsers, "users file")
        self._aliasesFile = (
            _WatchedFile(aliasesPath, parseAliases, "aliases file") if aliasesPath is not None else None
        )
        self._snapshot = _Snapshot(AddressMap(), AddressMap(), Directory.unavailable("users file not read"))
        # What _warnAboutUsers has warned about in the file as last loaded.
        self._warned: set[tuple] = set()
        self._aliases = _AliasesEditor(self)
        try:
            self._refresh()
        except TemporaryFailure as e:
            # Logged; every lookup fails temporarily until it can be read.
            self._snapshot = attr.evolve(self._snapshot, directory=Directory.unavailable(str(e)))

    def _refresh(self, force: bool = False) -> _Snapshot:
        """
        The current snapshot, re-reading changed files.

        @raise TemporaryFailure: a file cannot be read and never could.
        """
        with self._lock:
            _lines, users = self._usersFile.current(force)
            if self._aliasesFile is not None:
                aliases, catchAll = self._aliasesFile.current(force)
            else:
                aliases, catchAll = self._snapshot.aliases, self._snapshot.catchAll
            if users is not self._snapshot.users:
                self._warnAboutUsers(users)
            keys = (self._usersFile.key, self._aliasesFile.key if self._aliasesFile is not None else None)
            if users is not self._snapshot.users or aliases is not self._snapshot.aliases:
                directory = Directory(users, aliases, catchAll, self.postmaster, self.delimiter)
                self._snapshot = _Snapshot(users, aliases, directory, keys, catchAll)
            elif keys != self._snapshot.keys:
                self._snapshot = attr.evolve(self._snapshot, keys=keys)
            return self._snapshot

    def _warnAboutUsers(self, users: AddressMap[str]) -> None:
        """
        Log what the operator should fix in a newly loaded users file:
        users whose hash pop3gw cannot verify (one warning each, as their
        logins cannot succeed), and users that differ only in case.  Each
        is warned about when it first appears, or when its line changes,
        not again at every reload (a re-hash at login rewrites the file).
        """
        lines, _ = self._usersFile.value
        numbers = {line.address: n for n, line in reversed(list(enumerate(lines, 1))) if line.address is not None}
        unverifiableUsers = _unverifiable(users)
        unverifiable = {(address, users.entries[address]) for address, _ in unverifiableUsers}
        caseVariants = {(key, tuple(addresses)) for key, addresses in users.caseVariants.items()}
        warned, self._warned = self._warned, unverifiable | caseVariants
        for address, _scheme in unverifiableUsers:
            if (address, users.entries[address]) in warned:
                continue
            _log.warn(
                "users file {path} line {line}: {user} has {what}, which pop3gw does not accept; "
                "{user} cannot log in until its password is set with 'pop3gw user passwd'",
                path=self.path,
                line=numbers[address],
                user=str(address),
                what=_unverifiableWhat(users.entries[address]),
            )
        for key, variants in users.caseVariants.items():
            if (key, tuple(variants)) in warned:
                continue
            _log.warn(
                "users file {path}: lines {lines} ({key}) differ only in case; other spellings find line {first}",
                path=self.path,
                lines=",".join(str(numbers[a]) for a in variants),
                key=key,
                first=numbers[variants[0]],
            )

    # -- IUserDirectory

    def snapshot(self) -> Directory:
        """
        See L{IUserDirectory.snapshot}.
        """
        return self._snapshot.directory

    # -- IUserStore: reads

    def refresh(self) -> Directory:
        """
        See L{IUserStore.refresh}.  A file that cannot be read is logged
        (by L{_WatchedFile}); nothing is raised.
        """
        try:
            return self._refresh().directory
        except TemporaryFailure:
            return self._snapshot.directory

    def lookupUser(self, address: Address) -> Optional[tuple[Address, str]]:
        """
        See L{IUserStore.lookupUser}.
        """
        users = self._refresh().users
        found = users.find(address)
        if found is None:
            return None
        return found, users.entries[found]

    def peekUser(self, address: Address) -> Optional[tuple[Address, str]]:
        """
        See L{IUserStore.peekUser}: the answer of the snapshot in memory,
        if a C{stat} of each file shows it unchanged since it was read
        (cheap enough for the reactor thread); the files are never read
        here.

        @raise LookupWouldBlock: a file changed (or cannot be examined, or
            has never been read): L{lookupUser} re-reads it in the pool.
        """
        snapshot = self._snapshot
        if not self._unchanged(snapshot):
            raise LookupWouldBlock(str(address))
        found = snapshot.users.find(address)
        if found is None:
            return None
        return found, snapshot.users.entries[found]

    def _unchanged(self, snapshot: _Snapshot) -> bool:
        """
        Whether both files are as C{snapshot} read them.
        """
        if not snapshot.keys:
            return False
        paths = (self.path, self.aliasesPath)
        for path, known in zip(paths, snapshot.keys):
            if path is None:
                continue
            try:
                key: object = _statKey(os.stat(path))
            except FileNotFoundError:
                key = None
            except OSError:
                return False
            if key != known:
                return False
        return True

    def unverifiableUsers(self) -> list[tuple[Address, Optional[str]]]:
        """
        The users whose stored hash L{pop3gw.passwords.verifyPassword}
        cannot check (so who cannot log in), in file order.

        @return: (user, scheme name or C{None} for no C{{SCHEME}} prefix)
            pairs.
        """
        return _unverifiable(self._refresh().users)

    def passwordHash(self, address: Address) -> Optional[str]:
        """
        See L{IUserStore.passwordHash}.
        """
        return self._refresh().users.get(address)

    # -- IUserStore: writes

    def setPassword(self, address: Address, hashed: str, create: bool) -> None:
        """
        See L{IUserStore.setPassword}.

        @raise ValueError: C{hashed} contains C{:} or a line break, or does
            not start with C{{SCHEME}}.
        """
        _checkHash(hashed)
        with self._writeLock():
            lines = self._readLines()
            index = self._find(lines, address)
            if create and index is not None:
                raise UserExists(str(address))
            if create and self.aliasesPath is not None and any(
                line.key == lookupKey(address) for line in self._aliases.lines()
            ):
                raise AddressIsAlias(str(address))
            if not create and index is None:
                raise UnknownUser(str(address))
            if index is None:
                lines.append(UserLine(f"{address}:{hashed}".encode("utf-8"), address, str(address), hashed))
            else:
                lines[index] = lines[index].withHash(hashed)
            self._write(lines)
            self._written(lines)
        self._refresh()

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
            # One set of lookup keys, not a scan of the file per entry: an
            # import of many users stays linear.
            taken = {lookupKey(line.address) for line in lines if line.address is not None}
            for address, hashed, extra in entries:
                key = lookupKey(address)
                if key in taken:
                    raise UserExists(str(address))
                taken.add(key)
                text = f"{address}:{hashed}{extra}"
                lines.append(UserLine(text.encode("utf-8"), address, str(address), hashed, extra))
            self._write(lines)
            self._written(lines)
        self._refresh()

    def upgradePasswordHash(self, address: Address, oldHash: str, newHash: str) -> bool:
        """
        See L{IUserStore.upgradePasswordHash}.  The file is rewritten
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
                self._written(lines)
        except OSError as e:
            _log.error(
                "cannot upgrade the password hash of {user} in {path}: {error}",
                user=str(address),
                path=self.path,
                error=e.strerror or str(e),
            )
            return False
        self._refresh()
        _log.info(
            "upgraded the password hash of {user} from {old} to {new}",
            user=str(stored),
            old=schemeOf(oldHash),
            new=schemeOf(newHash),
        )
        return True

    def remove(self, address: Address) -> None:
        """
        See L{IUserStore.remove}.  Every line for the user C{address}
        finds is removed.
        """
        with self._writeLock():
            lines = self._readLines()
            index = self._find(lines, address)
            if index is None:
                raise UnknownUser(str(address))
            stored = lines[index].address
            kept = [line for line in lines if line.address != stored]
            self._write(kept)
            self._written(kept)
        self._refresh()

    # -- aliases (C{pop3gw alias}): under the users file's lock

    def aliasLines(self) -> list[tuple[int, AliasLine]]:
        """
        See L{_AliasesEditor.numberedLines} (C{pop3gw alias list}).
        """
        return self._aliases.numberedLines()

    def addAlias(self, name: str, targets: list[Address], localDomains: Iterable[str] = ()) -> tuple[Address, ...]:
        """
        See L{_AliasesEditor.add} (C{pop3gw alias add}).
        """
        return self._aliases.add(name, targets, localDomains)

    def removeAlias(self, name: str) -> None:
        """
        See L{_AliasesEditor.remove} (C{pop3gw alias remove}).
        """
        self._aliases.remove(name)

    def _readUsers(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    @staticmethod
    def _find(lines: list[UserLine], address: Address) -> Optional[int]:
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

    def _readLines(self) -> list[UserLine]:
        """
        The users file's lines as they are now (the caller holds the write
        lock): those of the last reading if the file has not changed since
        (the same (mtime_ns, size, inode) that decides a re-read), else
        parsed afresh.  Adding a user to a file of 10,000 then parses it
        once, not three times.
        """
        try:
            with open(self.path, "rb") as f:
                key = _statKey(os.fstat(f.fileno()))
                with self._lock:
                    if key == self._usersFile.key:
                        return list(self._usersFile.value[0])
                data = f.read()
        except FileNotFoundError:
            data = b""
        return parseUsers(data)[0]

    def _written(self, lines: list[UserLine]) -> None:
        """
        Take C{lines}, just written to the users file (the caller still
        holds the write lock), as its contents, so that the next
        L{_refresh} brings the snapshot up to date without reading and
        parsing the file back.  If the file cannot be examined, that
        refresh reads it instead.
        """
        try:
            key = _statKey(os.stat(self.path))
        except OSError:
            return
        users: AddressMap[str] = AddressMap()
        for line in lines:
            if line.address is not None:
                users.add(line.address, line.hashed)
        with self._lock:
            self._usersFile.install((lines, users), key)

    def _write(self, lines: list[UserLine]) -> None:
        """
        Replace the users file with C{lines} atomically and durably, keeping
        its owner.
        """
        data = b"".join(line.raw + b"\n" for line in lines)
        fsutil.replaceFile(self.path, data, self.owner, self._replace)


class _AliasesEditor:
    """
    The writers of the aliases file of a L{UsersFile} (C{pop3gw alias
    add|remove|list}): atomic rewrites under the users file's lock, so a
    concurrent C{user remove} of a target cannot interleave between the
    check and the write; comments and malformed lines kept as written.
    """

    def __init__(self, users: "UsersFile") -> None:
        self._users = users

    def numberedLines(self) -> list[tuple[int, AliasLine]]:
        """
        The lines of the aliases file as written (C{pop3gw alias list}),
        with their 1-based numbers; malformed ones carry their
        C{problem}.
        """
        return list(enumerate(self.lines(), 1))

    def add(self, name: str, targets: list[Address], localDomains: Iterable[str] = ()) -> tuple[Address, ...]:
        """
        Make the alias C{name} (C{alias@domain}, or C{@domain} for that
        domain's catch-all) deliver to C{targets} too: a new line, or the
        existing alias's line with the new targets added (each target
        once).  One atomic rewrite under the users file's lock.

        @param localDomains: local domains besides the users' own (those
            given with C{--domain}).
        @return: the alias's targets now.
        @raise AliasError: C{name} is not an address or C{@domain}, it
            is a user's address, its domain is not local, a target is not
            a user, or there is no aliases file.
        """
        alias, domain = self._name(name)
        if not targets:
            raise AliasError("an alias needs at least one target")
        shown = str(alias) if alias is not None else f"@{domain}"
        with self._users._writeLock():
            userLines, users, _ = parseUsers(self._users._readUsers())
            if alias is not None and users.find(alias) is not None:
                raise AliasShadowsUser(f"{alias} is a user; an alias of that name would never be used")
            aliasDomain = alias.domain if alias is not None else domain
            known = {line.address.domain for line in userLines if line.address is not None}
            if aliasDomain not in known and aliasDomain not in set(localDomains):
                raise AliasNotLocal(
                    f"{aliasDomain} is not a local domain (no user has it, and it is not a --domain):"
                    " mail for the alias would never be accepted"
                )
            stored = []
            for target in targets:
                found = users.find(target)
                if found is None:
                    raise UnknownTarget(f"target {target} is not a local user")
                stored.append(found)
            lines = self.lines()
            key = AliasLine(b"", alias, domain).key
            index = next((i for i, line in enumerate(lines) if line.key == key), None)
            if index is None:
                new = tuple(dict.fromkeys(stored))
                lines.append(parseAliasLine(formatAliasLine(shown, new)))
            else:
                old = lines[index]
                new = tuple(dict.fromkeys(old.targets + tuple(stored)))
                written = old.raw.decode("utf-8").partition(":")[0].strip()
                lines[index] = parseAliasLine(formatAliasLine(written, new))
            self._write(lines)
        self._users._refresh(force=True)
        return new

    def remove(self, name: str) -> None:
        """
        Remove the alias C{name} (C{@domain}: that domain's catch-all), in
        any case: every line defining it.  One atomic rewrite under the
        users file's lock.

        @raise AliasError: C{name} is not an address or C{@domain}, or no
            such alias.
        """
        alias, domain = self._name(name)
        key = AliasLine(b"", alias, domain).key
        with self._users._writeLock():
            lines = self.lines()
            kept = [line for line in lines if line.key != key]
            if len(kept) == len(lines):
                raise AliasError(f"no such alias {name.strip()}")
            self._write(kept)
        self._users._refresh(force=True)

    def _name(self, name: str) -> tuple[Optional[Address], Optional[str]]:
        if self._users.aliasesPath is None:
            raise AliasError("no aliases file")
        try:
            return parseAliasName(name)
        except AddressError:
            raise AliasError(f"{name.strip()!r} is not an address (alias@domain) or @domain") from None

    def lines(self) -> list[AliasLine]:
        """
        The aliases file's lines as written, parsed.
        """
        assert self._users.aliasesPath is not None
        try:
            with open(self._users.aliasesPath, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        return [parseAliasLine(raw) for raw in splitLines(data)]

    def _write(self, lines: list[AliasLine]) -> None:
        """
        Replace the aliases file with C{lines} atomically and durably,
        keeping its owner; comments and malformed lines stay as written.
        """
        assert self._users.aliasesPath is not None
        data = b"".join(line.raw + b"\n" for line in lines)
        fsutil.replaceFile(self._users.aliasesPath, data, self._users.owner, self._users._replace)


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
