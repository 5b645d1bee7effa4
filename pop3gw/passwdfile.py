# -*- test-case-name: tests.test_users -*-
"""
The Dovecot C{passwd-file} format of the users file, the aliases file
format, and the reading of a passwd-file for C{pop3gw user import}.

Pure parsing: no file access, no locks.
"""

from __future__ import annotations

from typing import Optional

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


def parseAliases(data: bytes) -> tuple[AddressMap[Address], list[int]]:
    """
    Parse an aliases file of C{alias@domain: user@domain} lines.

    @return: alias -> user (as written), and the 1-based numbers of
        malformed lines.
    """
    aliases: AddressMap[Address] = AddressMap()
    bad = []
    for number, raw in enumerate(splitLines(data), 1):
        try:
            text = raw.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            bad.append(number)
            continue
        if isComment(text):
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
        if not aliases.add(aliasAddress, targetAddress):
            bad.append(number)
    return aliases, bad


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
