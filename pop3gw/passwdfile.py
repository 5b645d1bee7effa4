# -*- test-case-name: tests.test_users -*-
"""
The Dovecot C{passwd-file} format of the users file, the aliases file
format, and the reading of a passwd-file for C{pop3gw user import}.

Pure parsing: no file access, no locks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import attr

from pop3gw.address import Address, AddressError, lookupKey
from pop3gw.directory import AddressMap
from pop3gw.passwords import (
    MAX_PASSWORD_BYTES,
    canVerify,
    hashPassword,
    isMalformed,
    isPlainText,
    plainPassword,
    schemeOf,
)


def splitLines(data: bytes) -> list[bytes]:
    """
    The lines of C{data}, without their line ends.
    """
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def isComment(text: str) -> bool:
    stripped = text.strip()
    return not stripped or stripped.startswith("#")


@attr.s(frozen=True, auto_attribs=True)
class UserLine:
    """
    One parsed users file line.

    @ivar address: the user, or C{None} for a comment, blank or malformed
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

    def withHash(self, hashed: str) -> "UserLine":
        text = f"{self.userField}:{hashed}{self.extra}"
        return attr.evolve(self, raw=text.encode("utf-8"), hashed=hashed)


def parseUserLine(raw: bytes) -> tuple[UserLine, bool]:
    """
    @return: the parsed line and whether it is malformed.
    """
    try:
        text = raw.rstrip(b"\r").decode("utf-8")
    except UnicodeDecodeError:
        return UserLine(raw), True
    if isComment(text):
        return UserLine(raw), False
    userField, sep, rest = text.partition(":")
    if not sep:
        return UserLine(raw), True
    try:
        address = Address.parse(userField.strip())
    except AddressError:
        return UserLine(raw), True
    hashed, sep, extra = rest.partition(":")
    return UserLine(raw, address, userField, hashed, sep + extra), False


def parseUsers(data: bytes) -> tuple[list[UserLine], AddressMap[str], list[int]]:
    """
    Parse a users file.

    @return: its lines, the users (stored address -> hash; the first line
        of a duplicated address wins), and the 1-based numbers of malformed
        or duplicate lines.
    """
    lines = []
    users: AddressMap[str] = AddressMap()
    bad = []
    for number, raw in enumerate(splitLines(data), 1):
        line, malformed = parseUserLine(raw)
        lines.append(line)
        if malformed:
            bad.append(number)
        elif line.address is not None and not users.add(line.address, line.hashed):
            bad.append(number)
    return lines, users, bad


@attr.s(frozen=True, auto_attribs=True)
class AliasLine:
    """
    One parsed aliases file line.

    @ivar raw: the line as written, without its line end.
    @ivar alias: the alias, or C{None} for a catch-all, comment, blank or
        malformed line.
    @ivar domain: the domain of a catch-all line (C{@domain: ...}), else
        C{None}.
    @ivar targets: the targets as written, each once, in order.
    @ivar problem: why a malformed line is malformed, else C{None}.
    """

    raw: bytes
    alias: Optional[Address] = None
    domain: Optional[str] = None
    targets: tuple = ()
    problem: Optional[str] = None

    @property
    def key(self) -> Optional[str]:
        """
        What the line defines: the alias's L{lookupKey}, C{"@domain"} for
        a catch-all, or C{None}.
        """
        if self.alias is not None:
            return lookupKey(self.alias)
        if self.domain is not None:
            return "@" + self.domain
        return None


def formatAliasLine(name: str, targets: Sequence[Address]) -> bytes:
    """
    The aliases file line that makes C{name} (an alias address, or
    C{@domain}) deliver to C{targets}.
    """
    return f"{name}: {', '.join(str(t) for t in targets)}".encode("utf-8")


def parseAliasName(text: str) -> tuple[Optional[Address], Optional[str]]:
    """
    Parse the left side of an aliases line: C{alias@domain}, or
    C{@domain} for the domain's catch-all.

    @return: (alias, None) or (None, domain).
    @raise AddressError: neither.
    """
    text = text.strip()
    if text.startswith("@"):
        return None, Address.parse("catchall" + text).domain
    return Address.parse(text), None


def parseAliasLine(raw: bytes) -> AliasLine:
    """
    Parse one line of the aliases file: C{alias@domain: user@domain}, with
    several targets separated by commas (a distribution list), or
    C{@domain: user@domain} for the domain's catch-all.
    """
    try:
        text = raw.rstrip(b"\r").decode("utf-8")
    except UnicodeDecodeError:
        return AliasLine(raw, problem="not valid UTF-8")
    if isComment(text):
        return AliasLine(raw)
    name, sep, rest = text.partition(":")
    if not sep:
        return AliasLine(raw, problem="not an 'alias@domain: user@domain' line")
    try:
        alias, domain = parseAliasName(name)
    except AddressError:
        return AliasLine(raw, problem=f"{name.strip()!r} is not an address or @domain")
    targets = []
    for field in rest.split(","):
        try:
            targets.append(Address.parse(field.strip()))
        except AddressError:
            return AliasLine(raw, problem=f"target {field.strip()!r} is not an address")
    return AliasLine(raw, alias, domain, tuple(dict.fromkeys(targets)))


def parseAliases(data: bytes) -> tuple[AddressMap[tuple], dict[str, tuple], list[int]]:
    """
    Parse an aliases file (see L{parseAliasLine}).

    @return: alias -> its targets (as written), domain -> its catch-all
        targets, and the 1-based numbers of malformed lines and of lines
        defining an alias or catch-all again (the first one wins).
    """
    aliases: AddressMap[tuple] = AddressMap()
    catchAll: dict[str, tuple] = {}
    bad = []
    for number, raw in enumerate(splitLines(data), 1):
        line = parseAliasLine(raw)
        if line.problem is not None:
            bad.append(number)
        elif line.alias is not None:
            if not aliases.add(line.alias, line.targets):
                bad.append(number)
        elif line.domain is not None:
            if line.domain in catchAll:
                bad.append(number)
            else:
                catchAll[line.domain] = line.targets
    return aliases, catchAll, bad


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
    C{pop3gw user import}: hashes L{pop3gw.passwords.verifyPassword} can check are kept as
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
    for number, raw in enumerate(splitLines(data), 1):
        try:
            text = raw.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            refused.append((number, "not valid UTF-8"))
            continue
        if isComment(text):
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
        elif isPlainText(stored):
            password = plainPassword(stored)
            if not password or len(password.encode("utf-8")) > MAX_PASSWORD_BYTES or "\0" in password:
                reason = "plain-text password empty, too long, with NUL or badly encoded"
            else:
                stored = hashPassword(password)
                converted = True
        elif not canVerify(stored):
            scheme = schemeOf(stored) or ""
            if not (scheme.isascii() and scheme.isprintable()):
                scheme = "?"
            if isMalformed(stored):
                reason = f"malformed {scheme} hash, which pop3gw cannot verify"
            else:
                reason = f"password scheme {scheme} cannot be verified by pop3gw"
        if reason is None and lookupKey(address) in seen:
            reason = f"same user as line {seen[lookupKey(address)]}"
        if reason is not None:
            refused.append((number, f"{address}: {reason}"))
            continue
        seen[lookupKey(address)] = number
        taken.append(ImportedUser(number, address, stored, extra, converted))
    return taken, refused
