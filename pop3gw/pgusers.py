# -*- test-case-name: tests.test_pgstore -*-
"""
Users and aliases in PostgreSQL: L{IUserDirectory} and L{IUserStore} over
a L{pop3gw.pgdatabase.Database}.

Every node reads the same tables.  The reactor thread reads an immutable
L{Directory} snapshot, which L{PostgresUsers.refresh} (run every two
seconds in the server's database threads) replaces whenever the
directory's version row moved: one small query per refresh when nothing
changed.  Password hashes are never taken from the snapshot: a login asks
the database (L{PostgresUsers.lookupUser}, in a hash thread), so a password
changed through one node is refused on every other node at the next login,
and the verified-credentials cache (which compares the stored hash) stays
correct.  L{PostgresUsers.peekUser} therefore always raises
L{LookupWouldBlock}.

Every change takes the version row's lock first, so changes of users and
aliases are serialised across nodes (the checks of C{alias add} and
C{user add} cannot interleave with another change).
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Optional

from twisted.logger import Logger
from zope.interface import implementer

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
from pop3gw.passwdfile import AliasLine, formatAliasLine, parseAliasLine, parseAliasName
from pop3gw.passwords import schemeOf
from pop3gw.pgdatabase import Database

__all__ = ["PostgresUsers"]

_log = Logger()


def _checkHash(hashed: str) -> None:
    """
    @raise ValueError: C{hashed} does not start with C{{SCHEME}} or holds
        a character the users file could not hold (kept the same, so a
        migration back to files always works).
    """
    if not hashed.startswith("{") or "}" not in hashed or any(c in hashed for c in ":\r\n\0"):
        raise ValueError("not a {SCHEME}hash string")


def _aliasName(name: str) -> tuple[Optional[Address], Optional[str], str]:
    """
    @return: (alias, domain, lookup key) of C{alias@domain} or C{@domain}.
    @raise AliasError: neither.
    """
    try:
        alias, domain = parseAliasName(name)
    except AddressError:
        raise AliasError(f"{name.strip()!r} is not an address (alias@domain) or @domain") from None
    key = AliasLine(b"", alias, domain).key
    assert key is not None
    return alias, domain, key


@implementer(IUserDirectory, IUserStore)
class PostgresUsers:
    """
    The users directory in the database.

    @param database: the pool to use.
    @param postmaster: who receives C{postmaster@} the users' domains (see
        L{Directory}).
    @param delimiter: the sub-address separators (C{""}: none).
    """

    def __init__(
        self,
        database: Database,
        postmaster: Optional[Address] = None,
        delimiter: str = DEFAULT_DELIMITER,
    ) -> None:
        self.database = database
        self.postmaster = postmaster
        self.delimiter = delimiter
        self._lock = threading.Lock()
        self._version: Optional[int] = None
        self._directory = Directory.unavailable("users database not read yet")

    # -- IUserDirectory

    def snapshot(self) -> Directory:
        """
        See L{IUserDirectory.snapshot}: the directory as last read (one
        that raises L{TemporaryFailure} until the database was read once).
        """
        return self._directory

    # -- IUserStore: reads

    def refresh(self) -> Directory:
        """
        See L{IUserStore.refresh}: re-read users and aliases if their
        version moved.  A database that cannot be reached is logged and the
        old snapshot kept.
        """
        try:
            self._refresh()
        except TemporaryFailure as e:
            _log.warn("cannot read the users database: {error}", error=str(e))
        return self._directory

    def _refresh(self, force: bool = False) -> None:
        with self._lock:
            with self.database.transaction() as conn:
                version = conn.execute("SELECT version FROM pop3gw_directory_version").fetchone()[0]
                if version == self._version and not force:
                    return
                users = conn.execute("SELECT address FROM pop3gw_users ORDER BY position").fetchall()
                aliases = conn.execute("SELECT name, targets FROM pop3gw_aliases ORDER BY position").fetchall()
            userMap: AddressMap[None] = AddressMap()
            for (address,) in users:
                userMap.add(Address.parse(address), None)
            aliasMap: AddressMap[tuple] = AddressMap()
            catchAll: dict[str, tuple] = {}
            for name, targets in aliases:
                alias, domain = parseAliasName(name)
                parsed = tuple(Address.parse(t) for t in targets)
                if alias is not None:
                    aliasMap.add(alias, parsed)
                elif domain is not None:
                    catchAll.setdefault(domain, parsed)
            self._directory = Directory(userMap, aliasMap, catchAll, self.postmaster, self.delimiter)
            self._version = version

    def lookupUser(self, address: Address) -> Optional[tuple[Address, str]]:
        """
        See L{IUserStore.lookupUser}: asks the database every time (one
        statement, one round trip).
        """
        with self.database.connection() as conn:
            return self._find(conn, address)

    @staticmethod
    def _find(conn: Any, address: Address) -> Optional[tuple[Address, str]]:
        """
        The user C{address} finds (this exact spelling, else the one with
        its lookup key) and its hash, or C{None}.
        """
        row = conn.execute(
            "SELECT address, hash FROM pop3gw_users WHERE address = %s OR lookup_key = %s "
            "ORDER BY address = %s DESC LIMIT 1",
            (str(address), lookupKey(address), str(address)),
        ).fetchone()
        return None if row is None else (Address.parse(row[0]), row[1])

    def peekUser(self, address: Address) -> Optional[tuple[Address, str]]:
        """
        See L{IUserStore.peekUser}: another node may have changed the
        password, so the answer is never at hand.

        @raise LookupWouldBlock: always.
        """
        raise LookupWouldBlock(str(address))

    def passwordHash(self, address: Address) -> Optional[str]:
        """
        See L{IUserStore.passwordHash}.
        """
        found = self.lookupUser(address)
        return None if found is None else found[1]

    def listUsers(self) -> list[tuple[Address, str]]:
        """
        Every user and its stored hash, in the order they were added
        (C{pop3gw migrate}).
        """
        with self.database.transaction() as conn:
            rows = conn.execute("SELECT address, hash FROM pop3gw_users ORDER BY position").fetchall()
        return [(Address.parse(a), h) for a, h in rows]

    # -- IUserStore: writes

    def _changing(self, conn: Any) -> None:
        """
        Start a change: take the version row's lock (serialising changes
        across nodes) and move the version.
        """
        conn.execute("UPDATE pop3gw_directory_version SET version = version + 1")

    def setPassword(self, address: Address, hashed: str, create: bool) -> None:
        """
        See L{IUserStore.setPassword}.

        @raise ValueError: C{hashed} is not a C{{SCHEME}hash} string.
        @raise AddressIsAlias: C{create} for an alias's address.
        """
        _checkHash(hashed)
        with self.database.transaction() as conn:
            self._changing(conn)
            found = self._find(conn, address)
            if create:
                if found is not None:
                    raise UserExists(str(address))
                alias = conn.execute(
                    "SELECT 1 FROM pop3gw_aliases WHERE lookup_key = %s", (lookupKey(address),)
                ).fetchone()
                if alias is not None:
                    raise AddressIsAlias(str(address))
                conn.execute(
                    "INSERT INTO pop3gw_users (address, lookup_key, hash) VALUES (%s, %s, %s)",
                    (str(address), lookupKey(address), hashed),
                )
            else:
                if found is None:
                    raise UnknownUser(str(address))
                conn.execute("UPDATE pop3gw_users SET hash = %s WHERE address = %s", (hashed, str(found[0])))
        self._refresh()

    def addUsers(self, entries: list[tuple[Address, str, str]]) -> None:
        """
        Add several users in one transaction (C{pop3gw user import}); the
        fields after the hash are not kept.

        @raise UserExists: one of them exists already (in any case);
            nothing was added.
        """
        for _address, hashed, _extra in entries:
            _checkHash(hashed)
        with self.database.transaction() as conn:
            self._changing(conn)
            for address, hashed, _extra in entries:
                if self._find(conn, address) is not None:
                    raise UserExists(str(address))
                conn.execute(
                    "INSERT INTO pop3gw_users (address, lookup_key, hash) VALUES (%s, %s, %s)",
                    (str(address), lookupKey(address), hashed),
                )
        self._refresh()

    def upgradePasswordHash(self, address: Address, oldHash: str, newHash: str) -> bool:
        """
        See L{IUserStore.upgradePasswordHash}: one compare-and-set update.
        """
        _checkHash(newHash)
        try:
            with self.database.transaction() as conn:
                row = conn.execute(
                    "UPDATE pop3gw_users SET hash = %s WHERE (address = %s OR lookup_key = %s) AND hash = %s "
                    "RETURNING address",
                    (newHash, str(address), lookupKey(address), oldHash),
                ).fetchone()
        except TemporaryFailure as e:
            _log.error("cannot upgrade the password hash of {user}: {error}", user=str(address), error=str(e))
            return False
        if row is None:
            return False
        _log.info(
            "upgraded the password hash of {user} from {old} to {new}",
            user=row[0],
            old=schemeOf(oldHash),
            new=schemeOf(newHash),
        )
        return True

    def remove(self, address: Address) -> None:
        """
        See L{IUserStore.remove}.  The maildrop is kept.
        """
        with self.database.transaction() as conn:
            self._changing(conn)
            found = self._find(conn, address)
            if found is None:
                raise UnknownUser(str(address))
            conn.execute("DELETE FROM pop3gw_users WHERE address = %s", (str(found[0]),))
        self._refresh()

    # -- aliases (C{pop3gw alias})

    def aliasLines(self) -> list[tuple[int, AliasLine]]:
        """
        The aliases as the aliases file would hold them, numbered (C{pop3gw
        alias list}).
        """
        with self.database.transaction() as conn:
            rows = conn.execute("SELECT name, targets FROM pop3gw_aliases ORDER BY position").fetchall()
        return [
            (n, parseAliasLine(formatAliasLine(name, [Address.parse(t) for t in targets])))
            for n, (name, targets) in enumerate(rows, 1)
        ]

    def addAlias(self, name: str, targets: list[Address], localDomains: Iterable[str] = ()) -> tuple[Address, ...]:
        """
        Make the alias C{name} (C{alias@domain}, or C{@domain}) deliver to
        C{targets} too, as L{pop3gw.users.UsersFile.addAlias} does.

        @return: the alias's targets now.
        @raise AliasError: see L{pop3gw.users.UsersFile.addAlias}.
        """
        alias, domain, key = _aliasName(name)
        if not targets:
            raise AliasError("an alias needs at least one target")
        shown = str(alias) if alias is not None else f"@{domain}"
        with self.database.transaction() as conn:
            self._changing(conn)
            if alias is not None and self._find(conn, alias) is not None:
                raise AliasShadowsUser(f"{alias} is a user; an alias of that name would never be used")
            aliasDomain = alias.domain if alias is not None else domain
            known = conn.execute(
                "SELECT 1 FROM pop3gw_users WHERE split_part(address, '@', 2) = %s LIMIT 1", (aliasDomain,)
            ).fetchone()
            if known is None and aliasDomain not in set(localDomains):
                raise AliasNotLocal(
                    f"{aliasDomain} is not a local domain (no user has it, and it is not a --domain):"
                    " mail for the alias would never be accepted"
                )
            stored = []
            for target in targets:
                found = self._find(conn, target)
                if found is None:
                    raise UnknownTarget(f"target {target} is not a local user")
                stored.append(found[0])
            row = conn.execute("SELECT targets FROM pop3gw_aliases WHERE lookup_key = %s", (key,)).fetchone()
            if row is None:
                new = tuple(dict.fromkeys(stored))
                conn.execute(
                    "INSERT INTO pop3gw_aliases (name, lookup_key, targets) VALUES (%s, %s, %s)",
                    (shown, key, [str(t) for t in new]),
                )
            else:
                new = tuple(dict.fromkeys([Address.parse(t) for t in row[0]] + stored))
                conn.execute(
                    "UPDATE pop3gw_aliases SET targets = %s WHERE lookup_key = %s", ([str(t) for t in new], key)
                )
        self._refresh()
        return new

    def removeAlias(self, name: str) -> None:
        """
        Remove the alias C{name} (C{@domain}: that domain's catch-all), in
        any case.

        @raise AliasError: not an alias name, or no such alias.
        """
        _alias, _domain, key = _aliasName(name)
        with self.database.transaction() as conn:
            self._changing(conn)
            row = conn.execute("DELETE FROM pop3gw_aliases WHERE lookup_key = %s RETURNING name", (key,)).fetchone()
            if row is None:
                raise AliasError(f"no such alias {name.strip()}")
        self._refresh()

    def listAliases(self) -> list[tuple[str, tuple[Address, ...]]]:
        """
        Every alias (C{alias@domain} or C{@domain}) and its targets, in the
        order they were added (C{pop3gw migrate}).
        """
        return [(line.raw.decode("utf-8").partition(":")[0], line.targets) for _, line in self.aliasLines()]
