# -*- test-case-name: tests.test_directory -*-
"""
The users directory as the reactor thread reads it: an immutable snapshot
(L{Directory}) of the users, the aliases and the users' domains, which a
backend builds off the reactor thread and swaps in whole.

Every question a protocol, the router or an avatar asks about users
(does this address exist, whose maildrop receives it, may this user send
as it, which domains are local) is answered here from memory, without I/O.
Passwords are not here: they are the blocking side
(L{pop3gw.interfaces.IUserStore}), used from the hash thread pool.
"""

from __future__ import annotations

from typing import Any, Generic, Iterable, Optional, TypeVar

import attr
from zope.interface import implementer

from pop3gw.address import Address, lookupKey
from pop3gw.interfaces import IDirectorySnapshot, TemporaryFailure

_V = TypeVar("_V")


class AddressMap(Generic[_V]):
    """
    A map from addresses to values, built once (L{add}) and then only
    read, looked up case-insensitively
    (L{pop3gw.address.lookupKey}): an address written exactly as stored finds that entry;
    any other spelling finds the first entry, in file order, with the same
    key.  Only files written before lookups ignored case can have two
    entries with one key.

    @ivar entries: stored address -> value, in file order.
    @ivar caseVariants: for each key held by more than one entry, those
        entries' addresses in file order.
    """

    def __init__(self) -> None:
        self.entries: dict[Address, _V] = {}
        self._byKey: dict[str, Address] = {}
        self.caseVariants: dict[str, list[Address]] = {}

    def add(self, address: Address, value: _V) -> bool:
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
        The stored address that C{address} finds, or C{None}.
        """
        if address in self.entries:
            return address
        return self._byKey.get(lookupKey(address))

    def get(self, address: Address) -> Optional[_V]:
        """
        The value of the entry C{address} finds, or C{None}.
        """
        found = self.find(address)
        return None if found is None else self.entries[found]


@attr.s(frozen=True, auto_attribs=True)
class Senders:
    """
    The addresses one user may send as (its own and its aliases), taken
    from a L{Directory} at login: the same answers as
    L{Directory.owns} for that user, with no further lookup.

    @ivar user: the user, as the avatar names it.
    @ivar exact: the stored spellings (of users and aliases) that resolve
        to the user.
    @ivar keys: the lookup keys that any other spelling resolves by to the
        user.
    @ivar stored: every stored spelling of the directory (an exact match
        is decided by L{exact} alone).
    """

    user: Address
    exact: frozenset = frozenset()
    keys: frozenset = frozenset()
    stored: frozenset = frozenset()

    def allows(self, address: Address) -> bool:
        """
        @return: whether the user may send as C{address}.
        """
        if address == self.user:
            return True
        if address in self.stored:
            return address in self.exact
        return lookupKey(address) in self.keys


#: The (exact, keys) senders index entry of a user not in the directory.
_NOBODY: tuple[frozenset, frozenset] = (frozenset(), frozenset())


@implementer(IDirectorySnapshot)
class Directory:
    """
    An immutable snapshot of the users and aliases; see
    L{IDirectorySnapshot}.  Aliases are one level deep: an alias naming a
    user that does not exist resolves to C{None}.  Built off the reactor
    thread (the index of senders and domains is made here, once).

    A directory whose backing store has never been readable is
    L{unavailable}: every question raises L{TemporaryFailure}, so mail is
    deferred rather than bounced as "unknown user".
    """

    def __init__(self, users: AddressMap[Any], aliases: AddressMap[Address]) -> None:
        """
        @param users: the users (the values are not used).
        @param aliases: alias -> target user as written.
        """
        self._users = users
        self._aliases = aliases
        self._unavailable: Optional[str] = None
        self._addresses = tuple(sorted(users.entries))
        self._domains = frozenset(a.domain for a in users.entries)
        self._index()

    @classmethod
    def fromEntries(cls, users: Iterable[Address], aliases: Iterable[tuple[Address, Address]] = ()) -> "Directory":
        """
        A directory of C{users} and C{(alias, target)} pairs, in order (the
        first of two entries with one lookup key wins, as in a file).
        """
        userMap: AddressMap[None] = AddressMap()
        aliasMap: AddressMap[Address] = AddressMap()
        for user in users:
            userMap.add(user, None)
        for alias, target in aliases:
            aliasMap.add(alias, target)
        return cls(userMap, aliasMap)

    @classmethod
    def unavailable(cls, reason: str) -> "Directory":
        """
        A directory that answers every question with
        L{TemporaryFailure}C{(reason)}.
        """
        directory = cls(AddressMap(), AddressMap())
        directory._unavailable = reason
        return directory

    def _check(self) -> None:
        if self._unavailable is not None:
            raise TemporaryFailure(self._unavailable)

    def _resolve(self, address: Address) -> Optional[Address]:
        user = self._users.find(address)
        if user is not None:
            return user
        target = self._aliases.get(address)
        if target is None:
            return None
        return self._users.find(target)

    def _resolveKey(self, key: str) -> Optional[Address]:
        """
        What a spelling with lookup key C{key} that is not stored exactly
        resolves to.
        """
        user = self._users._byKey.get(key)
        if user is not None:
            return user
        alias = self._aliases._byKey.get(key)
        if alias is None:
            return None
        return self._users.find(self._aliases.entries[alias])

    def _index(self) -> None:
        stored = frozenset(self._users.entries) | frozenset(self._aliases.entries)
        exact: dict[Address, set] = {}
        for spelling in stored:
            owner = self._resolve(spelling)
            if owner is not None:
                exact.setdefault(owner, set()).add(spelling)
        keys: dict[Address, set] = {}
        for key in set(self._users._byKey) | set(self._aliases._byKey):
            owner = self._resolveKey(key)
            if owner is not None:
                keys.setdefault(owner, set()).add(key)
        self._stored = stored
        self._senders = {
            user: (frozenset(exact.get(user, ())), frozenset(keys.get(user, ())))
            for user in self._users.entries
        }

    # -- IDirectorySnapshot

    def exists(self, address: Address) -> bool:
        """
        See L{IDirectorySnapshot.exists}.
        """
        self._check()
        return self._users.find(address) is not None

    def resolve(self, address: Address) -> Optional[Address]:
        """
        See L{IDirectorySnapshot.resolve}.
        """
        self._check()
        return self._resolve(address)

    def sendersOf(self, user: Address) -> Senders:
        """
        See L{IDirectorySnapshot.sendersOf}.
        """
        self._check()
        found = self._users.find(user)
        exact, keys = self._senders.get(found, _NOBODY) if found is not None else _NOBODY
        return Senders(user, exact, keys, self._stored)

    def owns(self, user: Address, address: Address) -> bool:
        """
        See L{IDirectorySnapshot.owns}.
        """
        return self.sendersOf(user).allows(address)

    def addresses(self) -> list:
        """
        See L{IDirectorySnapshot.addresses}.
        """
        self._check()
        return list(self._addresses)

    def domains(self) -> frozenset:
        """
        See L{IDirectorySnapshot.domains}.
        """
        self._check()
        return self._domains
