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

from operator import attrgetter
from typing import Any, Generic, Iterable, Mapping, Optional, TypeVar

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


#: The local part that exists in every local domain (RFC 5321 4.5.1).
POSTMASTER = "postmaster"

#: The default sub-address separator (C{alice+tag@example.org}).
DEFAULT_DELIMITER = "+"


def subaddressBase(address: Address, delimiter: str) -> Optional[Address]:
    """
    The address a sub-address stands for: C{alice+tag@example.org} ->
    C{alice@example.org}.  The local part is cut at the first of the
    characters of C{delimiter} (any of them, as Postfix reads its
    C{recipient_delimiter}); a local part that starts with one is no
    sub-address.

    @return: the base address, or C{None} when C{address} has no
        sub-address part or C{delimiter} is empty.
    """
    localpart = address.localpart
    cut = min((i for i in (localpart.find(c) for c in delimiter) if i > 0), default=None)
    if cut is None:
        return None
    return Address(localpart[:cut], address.domain)


@attr.s(frozen=True, auto_attribs=True)
class Senders:
    """
    The addresses one user may send as (its own, its aliases, the
    distribution lists it is on, and their sub-addresses), taken from a
    L{Directory} at login: the same answers as L{Directory.owns} for that
    user, with no further lookup.

    @ivar user: the user, as the avatar names it.
    @ivar exact: the stored spellings (of users and aliases) that resolve
        to the user.
    @ivar keys: the lookup keys that any other spelling resolves by to the
        user.
    @ivar stored: every stored spelling of the directory (an exact match
        is decided by L{exact} alone).
    @ivar taken: every lookup key of the directory (a user, an alias or an
        implicit postmaster): an address with one of them is decided by
        L{keys} alone, never as a sub-address.
    @ivar delimiter: the sub-address separators (C{""}: none).
    """

    user: Address
    exact: frozenset = frozenset()
    keys: frozenset = frozenset()
    stored: frozenset = frozenset()
    taken: frozenset = frozenset()
    delimiter: str = DEFAULT_DELIMITER

    def allows(self, address: Address) -> bool:
        """
        @return: whether the user may send as C{address}.
        """
        if address == self.user:
            return True
        if address in self.stored:
            return address in self.exact
        key = lookupKey(address)
        if key in self.keys:
            return True
        if key in self.taken:
            return False
        base = subaddressBase(address, self.delimiter)
        return base is not None and self.allows(base)


#: The (exact, keys) senders index entry of a user not in the directory.
_NOBODY: tuple[frozenset, frozenset] = (frozenset(), frozenset())


@implementer(IDirectorySnapshot)
class Directory:
    """
    An immutable snapshot of the users and aliases; see
    L{IDirectorySnapshot}.  Built off the reactor thread (the index of
    senders and domains is made here, once).

    An address resolves, in this order, to:

      1. the user it names;
      2. the targets of the alias it names (a distribution list when
         several), one level deep: targets that are not users are left
         out, and an alias none of whose targets is a user resolves to
         nothing;
      3. for C{postmaster@} a domain of the users that has neither user
         nor alias of that name: the configured postmaster if it is a
         user, else the first user of that domain in file order;
      4. for a sub-address (C{alice+tag@...}), what its base address
         resolves to by 1-3;
      5. the catch-all targets of its domain.

    A directory whose backing store has never been readable is
    L{unavailable}: every question raises L{TemporaryFailure}, so mail is
    deferred rather than bounced as "unknown user".

    @ivar postmaster: the configured postmaster as stored, or C{None} if
        none was given or it is not a user.
    """

    def __init__(
        self,
        users: AddressMap[Any],
        aliases: AddressMap[tuple[Address, ...]],
        catchAll: Optional[Mapping[str, tuple[Address, ...]]] = None,
        postmaster: Optional[Address] = None,
        delimiter: str = DEFAULT_DELIMITER,
    ) -> None:
        """
        @param users: the users (the values are not used).
        @param aliases: alias -> its targets as written.
        @param catchAll: domain -> the targets of its catch-all.
        @param postmaster: who receives C{postmaster@} every domain that
            has no such user or alias (C{None}: the first user of each
            domain).
        @param delimiter: the sub-address separators (C{""}: no
            sub-addressing).
        """
        self._users = users
        self._aliases = aliases
        self._catchAll = dict(catchAll or {})
        self._delimiter = delimiter
        self._unavailable: Optional[str] = None
        # Sorted by their fields, as Address orders itself, without a
        # Python comparison per pair.
        self._addresses = tuple(sorted(users.entries, key=attrgetter("localpart", "domain")))
        self._domains = frozenset(a.domain for a in users.entries)
        self.postmaster = users.find(postmaster) if postmaster is not None else None
        self._postmasters: dict[str, Address] = {}
        for user in users.entries:
            key = lookupKey(Address(POSTMASTER, user.domain))
            if key in users._byKey or key in aliases._byKey:
                continue
            self._postmasters.setdefault(key, self.postmaster or user)
        self._index()

    @classmethod
    def fromEntries(
        cls,
        users: Iterable[Address],
        aliases: Iterable[tuple[Address, Any]] = (),
        catchAll: Optional[Mapping[str, Any]] = None,
        postmaster: Optional[Address] = None,
        delimiter: str = DEFAULT_DELIMITER,
    ) -> "Directory":
        """
        A directory of C{users} and C{(alias, target or targets)} pairs, in
        order (the first of two entries with one lookup key wins, as in a
        file); C{catchAll} maps a domain to a target or targets.
        """
        userMap: AddressMap[None] = AddressMap()
        aliasMap: AddressMap[tuple[Address, ...]] = AddressMap()
        for user in users:
            userMap.add(user, None)
        for alias, targets in aliases:
            aliasMap.add(alias, _targets(targets))
        catchAlls = {domain: _targets(targets) for domain, targets in (catchAll or {}).items()}
        return cls(userMap, aliasMap, catchAlls, postmaster, delimiter)

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

    def _usersOf(self, targets: Iterable[Address]) -> tuple[Address, ...]:
        """
        The users among C{targets}, as stored, in order, each once.
        """
        found = (self._users.find(t) for t in targets)
        return tuple(dict.fromkeys(u for u in found if u is not None))

    def _direct(self, address: Address) -> Optional[tuple[Address, ...]]:
        """
        What C{address} resolves to as a user, an alias or an implicit
        postmaster (steps 1-3), or C{None} if it is none of them.
        """
        user = self._users.find(address)
        if user is not None:
            return (user,)
        alias = self._aliases.find(address)
        if alias is not None:
            return self._usersOf(self._aliases.entries[alias])
        postmaster = self._postmasterFor(lookupKey(address))
        if postmaster is not None:
            return (postmaster,)
        return None

    def _postmasterFor(self, key: str) -> Optional[Address]:
        """
        Who receives mail for the lookup key C{key} as an implicit
        postmaster: the one of a users' domain, else, for C{postmaster@}
        any other domain (a local domain without users: the router asks
        only for local domains), the configured postmaster; or C{None}.
        """
        postmaster = self._postmasters.get(key)
        if postmaster is None and key.rpartition("@")[0] == POSTMASTER:
            return self.postmaster
        return postmaster

    def _directKey(self, key: str) -> tuple[Address, ...]:
        """
        What a spelling with lookup key C{key} that is not stored exactly
        resolves to by steps 1-3.
        """
        user = self._users._byKey.get(key)
        if user is not None:
            return (user,)
        alias = self._aliases._byKey.get(key)
        if alias is not None:
            return self._usersOf(self._aliases.entries[alias])
        postmaster = self._postmasterFor(key)
        return (postmaster,) if postmaster is not None else ()

    def _resolve(self, address: Address) -> tuple[Address, ...]:
        found = self._direct(address)
        if found is not None:
            return found
        base = subaddressBase(address, self._delimiter)
        if base is not None:
            found = self._direct(base)
            if found is not None:
                return found
        return self._usersOf(self._catchAll.get(address.domain, ()))

    def _index(self) -> None:
        stored = frozenset(self._users.entries) | frozenset(self._aliases.entries)
        exact: dict[Address, set] = {}
        for spelling in stored:
            for owner in self._direct(spelling) or ():
                exact.setdefault(owner, set()).add(spelling)
        taken = frozenset(self._users._byKey) | frozenset(self._aliases._byKey) | frozenset(self._postmasters)
        keys: dict[Address, set] = {}
        for key in taken:
            for owner in self._directKey(key):
                keys.setdefault(owner, set()).add(key)
        self._stored = stored
        self._taken = taken
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

    def resolve(self, address: Address) -> tuple[Address, ...]:
        """
        See L{IDirectorySnapshot.resolve}: the users, as stored, whose
        maildrops receive mail for C{address}, in the order above and each
        once; an empty tuple if none does.
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
        return Senders(user, exact, keys, self._stored, self._taken, self._delimiter)

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


def _targets(targets: Any) -> tuple[Address, ...]:
    """
    C{targets} as a tuple: one L{Address} or several.
    """
    if isinstance(targets, Address):
        return (targets,)
    return tuple(targets)
