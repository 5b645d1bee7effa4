# -*- test-case-name: tests.test_apppasswords -*-
"""
Scoped app passwords: one generated password per device, each allowed on
POP3, on submission, or on both, and removable alone.

They live in C{DATA/app-passwords}, a file of the users file's family (the
passwd-file format), one line per app password::

    alice@example.org:{ARGON2ID}$argon2id$...::::::id=k3mzq name=phone scope=pop3 created=1764547200

and one line per user whose main password is restricted::

    alice@example.org:!::::::main-scope=none

The users file itself is never touched, so its lines stay importable into
Dovecot.  A generated password is four groups of five characters from a
32-letter alphabet (100 bits, C{k3mzq-7vd2p-...}); its first group is its
C{id}, kept in the clear so a login checks one hash, not one per app
password (80 secret bits remain, behind Argon2id).

When each app password was last used (time and client) is kept in
C{DATA/accounts.sqlite} (see L{pop3gw.sendlimits}), written at most once a
minute per password.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import attr
from zope.interface import implementer

from pop3gw import fsutil
from pop3gw.address import Address, AddressError
from pop3gw.interfaces import IAppPasswords
from pop3gw.passwdfile import isComment, splitLines
from pop3gw.users import _FileLock, _statKey, _WatchedFile

#: The file under the data directory.
APP_PASSWORDS = "app-passwords"

#: Where an app password may be used; the main password may also be
#: C{none}.
SCOPES = ("pop3", "submission", "all")
MAIN_SCOPES = SCOPES + ("none",)

#: The services of the listeners, as the credentials name them.
SERVICES = ("pop3", "submission")

_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"
_GROUPS, _GROUP = 4, 5
_FORMAT = re.compile(rb"^[a-km-np-z2-9]{5}(?:-[a-km-np-z2-9]{5}){3}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

#: Seconds between two records of one app password's use.
USE_RECORD_INTERVAL = 60.0


def generatePassword() -> str:
    """
    A new app password, e.g. C{k3mzq-7vd2p-x8hta-2mwe9}.
    """
    return "-".join("".join(secrets.choice(_ALPHABET) for _ in range(_GROUP)) for _ in range(_GROUPS))


def looksGenerated(password: bytes) -> bool:
    """
    Whether C{password} has the form of a generated app password.
    """
    return bool(_FORMAT.match(password))


def covers(scope: str, service: Optional[str]) -> bool:
    """
    Whether a password of C{scope} may log in to C{service} (C{None}: a
    service that does not say which it is, allowed only for C{all}).
    """
    if scope == "all":
        return True
    return scope != "none" and scope == service


@attr.s(frozen=True, auto_attribs=True)
class AppPassword:
    """
    One app password as stored.
    """

    user: Address
    hashed: str
    id: str
    name: str
    scope: str
    created: float


@attr.s(frozen=True, auto_attribs=True)
class _Entries:
    """
    The parsed file: app passwords by (user key, id), and main scopes by
    user key.
    """

    passwords: Dict[Tuple[str, str], AppPassword]
    mainScopes: Dict[str, str]


def _fields(extra: str) -> Dict[str, str]:
    return dict(field.split("=", 1) for field in extra.split() if "=" in field)


def _parse(data: bytes) -> tuple:
    passwords: Dict[Tuple[str, str], AppPassword] = {}
    mainScopes: Dict[str, str] = {}
    bad: List[int] = []
    for number, raw in enumerate(splitLines(data), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(number)
            continue
        if isComment(text):
            continue
        parts = text.split(":", 7)
        try:
            user = Address.parse(parts[0])
        except AddressError:
            bad.append(number)
            continue
        fields = _fields(parts[7]) if len(parts) == 8 else {}
        key = str(user).lower()
        if "main-scope" in fields:
            if fields["main-scope"] not in MAIN_SCOPES or key in mainScopes:
                bad.append(number)
            else:
                mainScopes[key] = fields["main-scope"]
            continue
        try:
            entry = AppPassword(user, parts[1], fields["id"], fields["name"], fields["scope"],
                                float(fields.get("created", "0")))
        except (KeyError, ValueError, IndexError):
            bad.append(number)
            continue
        if entry.scope not in SCOPES or (key, entry.id) in passwords:
            bad.append(number)
            continue
        passwords[(key, entry.id)] = entry
    return _Entries(passwords, mainScopes), bad


def _line(entry: AppPassword) -> bytes:
    return (f"{entry.user}:{entry.hashed}::::::id={entry.id} name={entry.name} scope={entry.scope} "
            f"created={int(entry.created)}\n").encode("utf-8")


def fileContents(passwords: Sequence[AppPassword], mainScopes: Sequence[Tuple[str, str]]) -> bytes:
    """
    The app passwords file holding C{passwords} and the restrictions
    C{mainScopes} (C{(user, scope)}), as C{pop3gw migrate} writes it.
    """
    lines = [_line(e) for e in passwords]
    lines += [f"{user}:!::::::main-scope={scope}\n".encode("utf-8") for user, scope in mainScopes]
    return b"".join(lines)


class AppPasswordError(Exception):
    """
    A change to the app passwords that cannot be made (the message says
    why, for one line on stderr).
    """


def checkNew(name: str, scope: str) -> None:
    """
    @raise AppPasswordError: C{name} or C{scope} cannot be those of a new
        app password.
    """
    if not _NAME.match(name):
        raise AppPasswordError(f"bad app password name {name!r}: letters, digits, '.', '_', '-', at most 64")
    if scope not in SCOPES:
        raise AppPasswordError(f"bad scope {scope!r}: one of {', '.join(SCOPES)}")


def checkMainScope(scope: str) -> None:
    """
    @raise AppPasswordError: C{scope} is not a main password's scope.
    """
    if scope not in MAIN_SCOPES:
        raise AppPasswordError(f"bad scope {scope!r}: one of {', '.join(MAIN_SCOPES)}")


def passwordId(password: bytes) -> str:
    """
    The id of a generated password: its first group.
    """
    return password[:_GROUP].decode("ascii")


@implementer(IAppPasswords)
class AppPasswords:
    """
    The app passwords file (L{pop3gw.pgaccounts.PostgresAppPasswords}
    keeps them in the database store): read by the server (re-read when it changes),
    edited by the C{pop3gw} command under the users file's lock.

    The blocking methods (L{find}, L{mainScope}, the edits) run in a pool
    thread or the command; L{peekMainScope} is for the reactor thread.
    """

    def __init__(self, path: str, lockPath: str, owner: Optional[fsutil.Owner] = None) -> None:
        self.path = path
        self._lockPath = lockPath
        self._owner = owner
        self._file = _WatchedFile(path, _parse, "app passwords file")
        self._lock = threading.Lock()
        self._entries: _Entries = self._file.value[0]
        self._key: object = None

    def _current(self) -> _Entries:
        with self._lock:
            self._entries = self._file.current()[0]
            self._key = self._file.key
            return self._entries

    def find(self, user: Address, password: bytes) -> Optional[AppPassword]:
        """
        The app password of C{user} that C{password} would be, by its id
        (not verified).
        """
        if not looksGenerated(password):
            return None
        return self._current().passwords.get((str(user).lower(), passwordId(password)))

    def mainScope(self, user: Address) -> str:
        """
        Where C{user}'s main password may be used.
        """
        return self._current().mainScopes.get(str(user).lower(), "all")

    def peekMainScope(self, user: Address) -> Optional[str]:
        """
        L{mainScope} from memory if the file is unchanged since it was
        read (a C{stat}), else C{None}.
        """
        try:
            key: object = _statKey(os.stat(self.path))
        except FileNotFoundError:
            key = None
        except OSError:
            return None
        if key != self._key:
            return None
        return self._entries.mainScopes.get(str(user).lower(), "all")

    def list(self, user: Address) -> List[AppPassword]:
        """
        C{user}'s app passwords, oldest first.
        """
        key = str(user).lower()
        return sorted((e for (k, _), e in self._current().passwords.items() if k == key), key=lambda e: e.created)

    def listAll(self) -> List[AppPassword]:
        """
        Every app password, oldest first (C{pop3gw migrate}).
        """
        return sorted(self._current().passwords.values(), key=lambda e: e.created)

    def mainScopes(self) -> List[Tuple[str, str]]:
        """
        C{(user, scope)} for every restricted main password (C{pop3gw
        migrate}).
        """
        entries = self._current()
        return sorted(entries.mainScopes.items())

    def add(self, user: Address, name: str, scope: str, hashPassword, now: Optional[float] = None) -> str:
        """
        Generate, store (hashed with C{hashPassword}) and return a new app
        password.

        @raise AppPasswordError: a bad name or scope, or the name taken.
        """
        checkNew(name, scope)
        with _FileLock(self._lockPath, self._owner):
            entries = self._file.current(force=True)[0]
            mine = [e for (k, _), e in entries.passwords.items() if k == str(user).lower()]
            if any(e.name == name for e in mine):
                raise AppPasswordError(f"{user} already has an app password named {name}")
            while True:
                password = generatePassword()
                if (str(user).lower(), password[:_GROUP]) not in entries.passwords:
                    break
            entry = AppPassword(user, hashPassword(password), password[:_GROUP], name, scope,
                                time.time() if now is None else now)
            self._rewrite(lambda raws: raws + [_line(entry)])
        return password

    def remove(self, user: Address, name: str) -> None:
        """
        Remove C{user}'s app password C{name}.

        @raise AppPasswordError: there is none.
        """
        with _FileLock(self._lockPath, self._owner):
            entries = self._file.current(force=True)[0]
            found = [e for (k, _), e in entries.passwords.items() if k == str(user).lower() and e.name == name]
            if not found:
                raise AppPasswordError(f"{user} has no app password named {name}")
            target = found[0]

            def drop(raws: List[bytes]) -> List[bytes]:
                return [raw for raw in raws if _parse(raw)[0].passwords.get((str(user).lower(), target.id)) is None]

            self._rewrite(drop)

    def setMainScope(self, user: Address, scope: str) -> None:
        """
        Restrict (or free, with C{all}) C{user}'s main password.
        """
        checkMainScope(scope)
        key = str(user).lower()
        line = f"{user}:!::::::main-scope={scope}\n".encode("utf-8")
        with _FileLock(self._lockPath, self._owner):
            def change(raws: List[bytes]) -> List[bytes]:
                kept = [raw for raw in raws if key not in _parse(raw)[0].mainScopes]
                return kept if scope == "all" else kept + [line]

            self._rewrite(change)

    def removeUser(self, user: Address) -> None:
        """
        Forget everything of C{user} (the user was removed).
        """
        key = str(user).lower()
        with _FileLock(self._lockPath, self._owner):
            def drop(raws: List[bytes]) -> List[bytes]:
                out = []
                for raw in raws:
                    parsed = _parse(raw)[0]
                    if key in parsed.mainScopes or any(k == key for k, _ in parsed.passwords):
                        continue
                    out.append(raw)
                return out

            self._rewrite(drop)

    def _rewrite(self, change) -> None:
        try:
            with open(self.path, "rb") as f:
                raws = [raw + b"\n" for raw in splitLines(f.read())]
        except FileNotFoundError:
            raws = []
        fsutil.replaceFile(self.path, b"".join(change(raws)), self._owner)


def describe(entries: Sequence[AppPassword], used: Dict[str, Tuple[float, str]]) -> List[str]:
    """
    The C{app-password list} lines: name, scope, created, last used.
    """
    lines = []
    for e in entries:
        created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(e.created))
        last = used.get(e.name)
        seen = "never used" if last is None else (
            f"last used {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(last[0]))} from {last[1]}")
        lines.append(f"{e.name} scope={e.scope} created {created}, {seen}")
    return lines
