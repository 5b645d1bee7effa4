# -*- test-case-name: tests.test_pgstore -*-
"""
C{pop3gw migrate}: copy users (hashes untouched), aliases, maildrops
(UIDLs, seen flags and order kept), app passwords and main-password
scopes, the sending records (per-user limits, suspensions, counts,
last uses of app passwords), the DKIM keys and the login history between a data directory and a PostgreSQL
database, in either direction.

The source is only read; its maildrops are locked while they are copied
(so no POP3 session changes them meanwhile).  The destination must hold no
users, aliases or messages yet.  Into a database, everything is copied in
one transaction: a failure leaves the database as it was.  Into a data
directory, the users and aliases files are written last, so a failed
migration leaves no user behind (rerun it on an emptied directory).

The outbound queue is not copied (empty it first).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterable, Optional

import attr

from pop3gw import fsutil
from pop3gw.address import Address, AddressError, lookupKey
from pop3gw.apppasswords import APP_PASSWORDS, AppPasswords, fileContents
from pop3gw.dkimkeys import DKIMKeyError, KeyStore
from pop3gw.interfaces import Pop3gwError
from pop3gw.loginwatch import HISTORY_FILE, LoginHistoryFile
from pop3gw.maildir import MaildirStore
from pop3gw.passwdfile import AliasLine, formatAliasLine, parseAliases, parseUsers
from pop3gw.pgaccounts import (
    PostgresAppPasswords,
    PostgresSendingLimits,
    insertAppPasswords,
    insertRecords,
)
from pop3gw.pgdatabase import Database
from pop3gw.pgdkim import PostgresKeyStore, insertKeys
from pop3gw.pglogins import PostgresLoginHistory, insertHistory
from pop3gw.pgmail import PostgresMaildropStore, storeMessage
from pop3gw.pgusers import PostgresUsers
from pop3gw.sendlimits import DATABASE, SendingLimits
from pop3gw.wire import CRLFToLF

__all__ = ["MigrationError", "Migrated", "databaseToMaildir", "maildirToDatabase"]


class MigrationError(Pop3gwError):
    """
    A migration was refused or could not be done; its text is the
    operator's one line.
    """


@attr.s(auto_attribs=True)
class Migrated:
    """
    What a migration copied.
    """

    users: int = 0
    aliases: int = 0
    maildrops: int = 0
    messages: int = 0
    appPasswords: int = 0
    dkimKeys: int = 0

    def summary(self) -> str:
        apps = f", {self.appPasswords} app password(s)" if self.appPasswords else ""
        keys = f", {self.dkimKeys} DKIM key(s)" if self.dkimKeys else ""
        return (
            f"{self.users} user(s), {self.aliases} alias(es){apps}{keys}, "
            f"{self.messages} message(s) in {self.maildrops} maildrop(s)"
        )


def _readFile(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def _sourceMaildrops(mailDir: str) -> list[Address]:
    """
    The maildrops under C{mailDir} (C{<domain>/<localpart>/} with C{cur},
    C{new} and C{tmp}), sorted.
    """
    found = []
    try:
        domains = sorted(os.listdir(mailDir))
    except FileNotFoundError:
        return []
    for domain in domains:
        domainDir = os.path.join(mailDir, domain)
        if not os.path.isdir(domainDir):
            continue
        for localpart in sorted(os.listdir(domainDir)):
            path = os.path.join(domainDir, localpart)
            if all(os.path.isdir(os.path.join(path, s)) for s in ("cur", "new", "tmp")):
                try:
                    found.append(Address.parse(f"{localpart}@{domain}"))
                except AddressError:
                    raise MigrationError(f"{path}: not a maildrop of an address") from None
    return found


def maildirToDatabase(dataDir: str, database: Database) -> Migrated:
    """
    Copy the users, aliases and maildrops of the data directory
    C{dataDir} into C{database} (whose schema is current), in one
    transaction.

    @raise MigrationError: the database holds users, aliases or messages
        already, or a maildrop is in use.
    @raise TemporaryFailure: the database failed (nothing was copied).
    """
    _lines, users, _bad = parseUsers(_readFile(os.path.join(dataDir, "users")))
    aliases, catchAll, _bad = parseAliases(_readFile(os.path.join(dataDir, "aliases")))
    source = MaildirStore(os.path.join(dataDir, "mail"), hostname="migrate")
    keys: dict[str, str] = {}
    for address in list(users.entries) + list(aliases.entries):
        first = keys.setdefault(lookupKey(address), str(address))
        if first != str(address):
            raise MigrationError(
                f"{first} and {address} differ only in case: remove or rename one of them before migrating"
            )
    done = Migrated()
    with database.transaction() as conn:
        for table in ("pop3gw_users", "pop3gw_aliases", "pop3gw_maildrop", "pop3gw_app_passwords",
                      "pop3gw_main_scopes", "pop3gw_limit_overrides", "pop3gw_suspended", "pop3gw_dkim_keys",
                      "pop3gw_login_history"):
            if conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
                raise MigrationError("the database is not empty (it holds users, aliases or messages)")
        conn.execute("UPDATE pop3gw_directory_version SET version = version + 1")
        for address, hashed in users.entries.items():
            conn.execute(
                "INSERT INTO pop3gw_users (address, lookup_key, hash) VALUES (%s, %s, %s)",
                (str(address), lookupKey(address), hashed),
            )
            done.users += 1
        named = [(str(a), AliasLine(b"", a, None).key, t) for a, t in aliases.entries.items()]
        named += [(f"@{d}", f"@{d}", t) for d, t in catchAll.items()]
        for name, key, targets in named:
            conn.execute(
                "INSERT INTO pop3gw_aliases (name, lookup_key, targets) VALUES (%s, %s, %s)",
                (name, key, [str(t) for t in targets]),
            )
            done.aliases += 1
        apps = AppPasswords(os.path.join(dataDir, APP_PASSWORDS), os.path.join(dataDir, "users.lock"))
        passwords = apps.listAll()
        insertAppPasswords(conn, passwords, apps.mainScopes())
        done.appPasswords = len(passwords)
        keyStore = KeyStore(dataDir)
        try:
            dkimKeys = [(record, keyStore.privateKey(record)) for record in keyStore.records()]
        except DKIMKeyError as e:
            raise MigrationError(str(e)) from None
        insertKeys(conn, dkimKeys)
        done.dkimKeys = len(dkimKeys)
        history = LoginHistoryFile(os.path.join(dataDir, HISTORY_FILE)).read()
        insertHistory(conn, [(user.lower(), network, first, last) for user, networks in history.items()
                             for network, (first, last) in networks.items()])
        if os.path.exists(os.path.join(dataDir, DATABASE)):
            records = SendingLimits(dataDir)
            try:
                insertRecords(conn, records.export())
            finally:
                records.close()
        for address in _sourceMaildrops(source.root):
            try:
                drop = source._lockAndSnapshot(address)
            except Pop3gwError as e:
                raise MigrationError(f"cannot open the maildrop of {address}: {e}") from None
            try:
                for index, info in enumerate(drop.messages):
                    try:
                        message = drop._openFile(index)
                    except Pop3gwError as e:
                        raise MigrationError(f"cannot read a message of {address}: {e}") from None
                    with message:
                        storeMessage(conn, message, info.size, [(str(address), info.uid, info.seen)])
                    done.messages += 1
            finally:
                drop.release()
            done.maildrops += 1
    return done


def _copyMessage(chunks: Iterable[bytes], path: str, owner: Optional[fsutil.Owner]) -> int:
    """
    Write a message given in wire form, chunk by chunk, into the new file
    C{path} with LF line ends, synced to disk; on a failure the file is
    removed.

    @return: the file's size.
    """
    fd = fsutil.createFile(path, owner)
    try:
        size = 0
        lines = CRLFToLF()
        for chunk in chunks:
            data = lines.feed(chunk)
            fsutil.writeAll(fd, data)
            size += len(data)
        data = lines.finish()
        fsutil.writeAll(fd, data)
        size += len(data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    finally:
        # A generator holding a database connection gives it back now.
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    os.close(fd)
    return size


def databaseToMaildir(database: Database, dataDir: str, owner: Optional[fsutil.Owner] = None) -> Migrated:
    """
    Copy the users, aliases and maildrops of C{database} into the data
    directory C{dataDir} (created if missing), keeping each message's
    UIDL as its Maildir unique name and its seen flag as the C{S} flag.

    @raise MigrationError: the data directory holds users, aliases or
        maildrops already, or a UIDL cannot be a Maildir file name.
    @raise TemporaryFailure: the database failed.
    """
    usersPath = os.path.join(dataDir, "users")
    aliasesPath = os.path.join(dataDir, "aliases")
    mailDir = os.path.join(dataDir, "mail")
    if _readFile(usersPath).strip() or _readFile(aliasesPath).strip() or _sourceMaildrops(mailDir):
        raise MigrationError(f"the data directory {dataDir} is not empty (it holds users, aliases or maildrops)")
    fsutil.makeDirectories(dataDir, owner)
    users = PostgresUsers(database)
    store = PostgresMaildropStore(database)
    target = MaildirStore(mailDir, hostname="migrate", owner=owner)
    done = Migrated()
    for name in store.maildrops():
        address = Address.parse(name)
        path = target._ensureMaildir(target.maildirPath(address))
        for info in store.listMessages(name):
            if not info.uid or any(c in info.uid for c in "/:,") or info.uid.startswith("."):
                raise MigrationError(f"message {info.uid!r} of {name}: its UIDL cannot be a Maildir file name")
            tmp = os.path.join(path, "tmp", info.uid)
            size = _copyMessage(store.messageChunks(info), tmp, owner)
            flags = "S" if info.seen else ""
            os.rename(tmp, os.path.join(path, "cur", f"{info.uid},S={size},W={info.size}:2,{flags}"))
            done.messages += 1
        fsutil.fsyncDirectory(os.path.join(path, "cur"))
        done.maildrops += 1
    aliasLines = users.aliasLines()
    listed = users.listUsers()
    fsutil.replaceFile(aliasesPath, b"".join(formatAliasLine(line.raw.decode("utf-8").partition(":")[0], line.targets) + b"\n"
                                            for _, line in aliasLines), owner)
    apps = PostgresAppPasswords(database)
    passwords, scopes = apps.listAll(), apps.mainScopes()
    if passwords or scopes:
        fsutil.replaceFile(os.path.join(dataDir, APP_PASSWORDS), fileContents(passwords, scopes), owner)
    keyStore = PostgresKeyStore(database)
    keys = [(record, keyStore.privateKey(record)) for record in keyStore.records()]
    if keys:
        KeyStore(dataDir, owner).load(keys)
    done.dkimKeys = len(keys)
    history = PostgresLoginHistory(database).read()
    if history:
        LoginHistoryFile(os.path.join(dataDir, HISTORY_FILE), owner).merge(history, time.time())
    records = PostgresSendingLimits(database).export()
    if records.overrides or records.suspended or records.sent or records.uses:
        local = SendingLimits(dataDir, owner=owner)
        try:
            local.load(records)
        finally:
            local.close()
    fsutil.replaceFile(usersPath, b"".join(f"{a}:{h}\n".encode("utf-8") for a, h in listed), owner)
    done.users, done.aliases, done.appPasswords = len(listed), len(aliasLines), len(passwords)
    return done
