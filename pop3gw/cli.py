# -*- test-case-name: tests.test_cli -*-
"""
The C{pop3gw} command: users, local delivery, the outbound queue, DKIM
keys and DNS records (L{pop3gw.clidkim}).

It works on the data directory directly (no network, except the DNS
queries of C{dns --check}) and exits non-zero with one line on stderr when
it fails.  C{deliver} uses the sysexits codes
MTAs expect of a mailbox command.

Run as root, a command gives what it writes to the data directory's owner;
run as anyone but root or that owner, a command that writes refuses (see
L{pop3gw.fsutil}).
"""

from __future__ import annotations

import argparse
import getpass
import io
import ipaddress
import os
import sqlite3
import sys
import time
from typing import TYPE_CHECKING, BinaryIO, Iterator, Optional, TextIO

from pop3gw import __version__, clidkim, fsutil
from pop3gw.address import Address, AddressError
from pop3gw.config import Config, ConfigError, buildConfig
from pop3gw.inboundpolicy import Session
from pop3gw.interfaces import (
    AddressIsAlias,
    AliasError,
    AliasNotLocal,
    AliasShadowsUser,
    BadMessageData,
    InsufficientStorage,
    MaildropLocked,
    PermanentFailure,
    Pop3gwError,
    TemporaryFailure,
    UnknownTarget,
    UnknownUser,
    UserExists,
)
from pop3gw.selftest import LISTENER_KINDS

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77

#: The commands that only read the data directory, as (command, action);
#: every other command writes to it.
_READ_ONLY = frozenset({("user", "list"), ("queue", "list"), ("alias", "list"), ("dkim", "list"), ("dns", None)})

#: An option not given on the command line.
_UNSET = object()

#: Longest password accepted, in octets of UTF-8: the login check refuses
#: longer ones (L{pop3gw.passwords.MAX_PASSWORD_BYTES}) without hashing.
MAX_PASSWORD_LENGTH = 1024
READ_CHUNK = 64 * 1024

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from pop3gw.pgdatabase import Database


class CommandError(Exception):
    """
    A failure to report as one line, with an exit status.
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pop3gw", description="Manage a pop3gw data directory.")
    p.add_argument("--version", action="version", version=f"pop3gw {__version__}")
    p.add_argument("--data-dir", help="the server's data directory (default: from --config, else ./pop3gw-data)")
    p.add_argument("--config", help="INI file to read data-dir and limits from")
    p.add_argument(
        "--store",
        help="where users, aliases and maildrops live: maildir (default, under the data directory) "
        "or a postgresql:// URI (default: from --config)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("init", help="create or upgrade the database schema (with --store postgresql://...)")
    migrate = sub.add_parser(
        "migrate", help="copy users, aliases and maildrops between a data directory and a database"
    )
    migrate.add_argument("--from", dest="source", required=True, metavar="SOURCE", help="maildir:DATA_DIR or a postgresql:// URI")
    migrate.add_argument("--to", dest="target", required=True, metavar="TARGET", help="a postgresql:// URI or maildir:DATA_DIR")

    user = sub.add_parser("user", help="add, change, remove or list users")
    usub = user.add_subparsers(dest="action", required=True)
    for action, text in (
        ("add", "add a user (password prompted on a TTY, else read from stdin)"),
        ("passwd", "change a user's password (prompted on a TTY, else read from stdin)"),
        ("remove", "remove a user (the maildrop is kept)"),
    ):
        a = usub.add_parser(action, help=text)
        a.add_argument("address")
    usub.add_parser("list", help="list users")
    imp = usub.add_parser(
        "import", help="add the users of a Dovecot passwd-file (plain-text passwords are hashed on the way in)"
    )
    imp.add_argument("file")
    lim = usub.add_parser(
        "limits", help="show, or set with the options, a user's own sending limits (0 = none, 'default')"
    )
    lim.add_argument("address")
    lim.add_argument("--messages-per-hour", type=_limitValue, metavar="N", default=_UNSET)
    lim.add_argument("--recipients-per-day", type=_limitValue, metavar="N", default=_UNSET)
    app = usub.add_parser("app-password", help="add, list or remove a user's scoped app passwords")
    appsub = app.add_subparsers(dest="appAction", required=True)
    appAdd = appsub.add_parser("add", help="generate an app password (printed once, alone on the last line)")
    appAdd.add_argument("address")
    appAdd.add_argument("--name", required=True, help="what it is for, e.g. phone")
    appAdd.add_argument("--scope", required=True, choices=("pop3", "submission", "all"))
    appsub.add_parser("list", help="names, scopes, created, last used").add_argument("address")
    appRemove = appsub.add_parser("remove", help="remove one app password")
    appRemove.add_argument("address")
    appRemove.add_argument("name")
    scope = usub.add_parser("scope", help="where the user's main password works (none: app passwords only)")
    scope.add_argument("address")
    scope.add_argument("scope", choices=("pop3", "submission", "all", "none"))
    iu = usub.add_parser(
        "import-uidl",
        help="give the user's messages the UIDLs of the old server (a UIDL listing or Dovecot's dovecot-uidlist "
        "on stdin)",
    )
    iu.add_argument("address")
    uns = usub.add_parser("unsuspend", help="let a suspended user send again, and clear the user's counters")
    uns.add_argument("address")

    alias = sub.add_parser("alias", help="add, remove or list aliases, distribution lists and catch-alls")
    asub = alias.add_subparsers(dest="action", required=True)
    add = asub.add_parser("add", help="make ALIAS (or @domain: its catch-all) deliver to the TARGET users too")
    add.add_argument("alias")
    add.add_argument("targets", nargs="+", metavar="target")
    rm = asub.add_parser("remove", help="remove an alias (or @domain: its catch-all)")
    rm.add_argument("alias")
    asub.add_parser("list", help="list aliases and catch-alls")

    deliver = sub.add_parser("deliver", help="deliver the message on stdin to a local user")
    deliver.add_argument("address")
    deliver.add_argument("--client-address", metavar="IP",
                         help="the address of the client the MTA received the message from, for SPF with "
                              "[inbound] lmtp-checks (Postfix pipe: ${client_address}; empty or unknown: none)")
    deliver.add_argument("--client-helo", metavar="NAME",
                         help="that client's HELO name (Postfix pipe: ${client_helo})")
    deliver.add_argument("--sender", metavar="ADDRESS",
                         help="the envelope sender, for SPF (Postfix pipe: ${sender}; empty: the null sender)")

    queue = sub.add_parser("queue", help="outbound queue")
    qsub = queue.add_subparsers(dest="action", required=True)
    qsub.add_parser("list", help="list waiting messages")
    qsub.add_parser("flush", help="retry every waiting message now")

    imp2 = sub.add_parser(
        "import", help="copy a mailbox from another POP3 server over verified TLS, with its UIDLs (resumable)"
    )
    imp2.add_argument("source", metavar="pop3[s]://USER@HOST[:PORT]")
    imp2.add_argument("--to", metavar="ADDRESS", help="the local user (default: USER, when it is an address)")
    imp2.add_argument("--ca-file", metavar="FILE", help="trust the CAs in FILE instead of the system's")

    selftest = sub.add_parser(
        "selftest", help="probe a running server from outside; one PASS or FAIL line per probe")
    for kind in LISTENER_KINDS:
        selftest.add_argument(f"--{kind}", metavar="HOST:PORT", action="append", default=[],
                              help=f"a {kind} listener to probe (default: the configured ones)")
    selftest.add_argument("--user", metavar="ADDRESS", help="log in as ADDRESS for the mailbox probes")
    selftest.add_argument("--password-file", metavar="FILE", help="the first line of FILE is --user's password")
    selftest.add_argument("--domain", help="a local domain of the server (default: --user's domain, "
                          "else the first configured one)")
    selftest.add_argument("--ca-file", metavar="FILE",
                          help="trust the CA certificates in FILE instead of the system's")

    clidkim.addParsers(sub)
    return p


def _users(config, owner: Optional[fsutil.Owner] = None):
    """
    The users file of the data directory (the commands that only work on
    one).
    """
    from pop3gw.users import UsersFile

    return UsersFile(config.usersPath, config.aliasesPath, owner, config.postmaster, config.recipientDelimiter)


def _limitValue(text: str) -> Optional[int]:
    """
    A limit on the command line: a count (0: no limit), or C{default}.
    """
    if text.strip().lower() == "default":
        return None
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a number or 'default', got {text!r}")
    return int(text)


def _sendingLimits(stores: "_Stores", owner: Optional[fsutil.Owner] = None):
    """
    The sending records of the store (see L{pop3gw.sendlimits}).
    """
    config = stores.config
    if config.usesDatabase:
        from pop3gw.pgaccounts import PostgresSendingLimits

        return PostgresSendingLimits(
            stores.openDatabase(), config.limits["messages-per-hour"], config.limits["recipients-per-day"]
        )
    from pop3gw.sendlimits import SendingLimits

    return SendingLimits(
        config.dataDir, config.limits["messages-per-hour"], config.limits["recipients-per-day"], owner
    )


def _appPasswords(stores: "_Stores", owner: Optional[fsutil.Owner] = None):
    """
    The app passwords of the store (see L{pop3gw.apppasswords}).
    """
    config = stores.config
    if config.usesDatabase:
        from pop3gw.pgaccounts import PostgresAppPasswords

        return PostgresAppPasswords(stores.openDatabase())
    from pop3gw.apppasswords import APP_PASSWORDS, AppPasswords

    return AppPasswords(os.path.join(config.dataDir, APP_PASSWORDS), config.usersPath + ".lock", owner)


def cmdAppPassword(stores: "_Stores", args, stdout: TextIO, owner: Optional[fsutil.Owner] = None) -> int:
    """
    C{user app-password add|list|remove} and C{user scope}.
    """
    from pop3gw.apppasswords import AppPasswordError, describe
    from pop3gw.passwords import hashPassword

    found = stores.users(owner).lookupUser(_address(args.address))
    if found is None:
        raise CommandError(f"no such user {args.address}", EX_NOUSER)
    user = found[0]
    apps = _appPasswords(stores, owner)
    try:
        if args.action == "scope":
            apps.setMainScope(user, args.scope)
            stdout.write(f"{user}: main password scope {args.scope}\n")
        elif args.appAction == "add":
            password = apps.add(user, args.name, args.scope, hashPassword)
            stdout.write(
                f"app password {args.name} for {user}, scope {args.scope}; "
                "shown only now, stored only as a hash:\n"
            )
            stdout.write(password + "\n")
        elif args.appAction == "remove":
            apps.remove(user, args.name)
            stdout.write(f"removed app password {args.name} of {user}\n")
        else:
            sending = _sendingLimits(stores, owner)
            try:
                used = sending.lastUses(str(user))
            except sqlite3.Error:
                # The file's records only: the database's failures are the
                # command's.
                used = {}
            finally:
                sending.close()
            for line in describe(apps.list(user), used):
                stdout.write(line + "\n")
    except AppPasswordError as e:
        raise CommandError(str(e)) from None
    except OSError as e:
        raise CommandError(f"cannot write {apps.path}: {e.strerror}", EX_CANTCREAT) from None
    return EX_OK


def _openForMigration(stores: "_Stores", address: Address, owner: Optional[fsutil.Owner]):
    """
    The maildrop store and C{address}'s locked maildrop (the user as
    stored).
    """
    from twisted.python.failure import Failure

    found = stores.users(owner).lookupUser(address)
    if found is None:
        raise CommandError(f"no such user {address}", EX_NOUSER)
    user = found[0]
    store = stores.maildrops(owner)
    results: list = []
    store.openMaildrop(user).addBoth(results.append)
    result = results[0]
    if isinstance(result, Failure):
        if result.check(MaildropLocked):
            raise CommandError(f"the maildrop of {user} is in use by a POP3 session; try again", EX_TEMPFAIL)
        result.raiseException()
    return user, store, result


def _uidlTarget(stores: "_Stores", user: Address, store, maildrop, owner: Optional[fsutil.Owner], held: bool):
    """
    Where C{user}'s imported messages and UIDLs go (see
    L{pop3gw.pop3import.IUIDLTarget}).

    @param held: C{maildrop} stays locked while the target is used (its
        messages are those of its snapshot); otherwise a Maildir is
        listed anew, under its lock, at each use.
    """
    from pop3gw.pop3import import MaildirTarget, PostgresTarget

    if stores.config.usesDatabase:
        return PostgresTarget(store, user)

    def keys() -> list:
        if held:
            return maildrop.keys()
        return _openForMigration(stores, user, owner)[2].keysAndRelease()

    def deliver(chunks, before) -> str:
        delivery = store.beginDelivery([user])
        before(delivery.uniqueName)
        try:
            for chunk in chunks:
                delivery.write(chunk)
        except BaseException:
            delivery.abort()
            raise
        failures: list = []
        delivery.commit().addErrback(failures.append)
        if failures:
            delivery.abort()
            failures[0].raiseException()
        return delivery.uniqueName

    return MaildirTarget(maildrop.path, keys, deliver, owner)


def cmdImportUIDL(stores: "_Stores", args, stdin: TextIO, stdout: TextIO,
                  owner: Optional[fsutil.Owner] = None) -> int:
    """
    C{user import-uidl}: see L{pop3gw.pop3import}.
    """
    from pop3gw.pop3import import MigrationError, importUIDLs

    user, store, maildrop = _openForMigration(stores, _address(args.address), owner)
    try:
        target = _uidlTarget(stores, user, store, maildrop, owner, held=True)
        total = len(target.messageKeys())
        count = importUIDLs(target, stdin.read())
    except MigrationError as e:
        raise CommandError(f"cannot import UIDLs: {e}", EX_DATAERR) from None
    finally:
        maildrop.release()
    stdout.write(f"{user}: {count} of {total} messages now have their old UIDL\n")
    return EX_OK


def cmdImportMailbox(stores: "_Stores", args, stdin: TextIO, stdout: TextIO,
                     owner: Optional[fsutil.Owner] = None, stderr: Optional[TextIO] = None) -> int:
    """
    C{import pop3[s]://USER@HOST}: see L{pop3gw.pop3import.Importer}.
    """
    import ssl

    from pop3gw.pop3import import Importer, MigrationError, parseSource

    try:
        remoteUser, host, port, implicit = parseSource(args.source)
    except MigrationError as e:
        raise CommandError(str(e), EX_USAGE) from None
    local = _address(args.to or remoteUser)
    password = _readPassword(stdin, stdin.isatty())
    user, store, maildrop = _openForMigration(stores, local, owner)
    target = _uidlTarget(stores, user, store, maildrop, owner, held=False)
    maildrop.release()
    try:
        context = ssl.create_default_context(cafile=args.ca_file)
    except (OSError, ssl.SSLError) as e:
        raise CommandError(f"--ca-file: {e}", EX_NOINPUT) from None
    importer = Importer(target, maxLine=stores.config.maxMessageSize)
    try:
        session = importer.connect(host, port, implicit, context)
        copied, skipped = importer.run(session, remoteUser, password)
    except MigrationError as e:
        raise CommandError(f"import from {host}: {e}", EX_TEMPFAIL) from None
    except BadMessageData as e:
        raise CommandError(f"import from {host}: a message cannot be stored unchanged: {e}", EX_DATAERR) from None
    stdout.write(f"{user}: copied {copied} messages from {host}, {skipped} already copied before\n")
    if importer.refused:
        for line in importer.refused:
            (stderr or sys.stderr).write(f"pop3gw: import from {host}: {line}\n")
        return EX_DATAERR
    return EX_OK


def cmdLimits(stores: "_Stores", args, stdout: TextIO, owner: Optional[fsutil.Owner] = None) -> int:
    """
    C{user limits} (show or set a user's sending limits) and C{user
    unsuspend}.
    """
    users = stores.users(owner)
    found = users.lookupUser(_address(args.address))
    if found is None:
        raise CommandError(f"no such user {args.address}", EX_NOUSER)
    user = str(found[0])
    sending = _sendingLimits(stores, owner)
    try:
        if args.action == "unsuspend":
            was = sending.unsuspend(user)
            stdout.write(f"{user}: {'sending allowed again' if was else 'was not suspended'}; counters cleared\n")
            return EX_OK
        given = {"messages-per-hour": args.messages_per_hour, "recipients-per-day": args.recipients_per_day}
        setting = {name: value for name, value in given.items() if value is not _UNSET}
        if setting:
            sending.setLimits(
                user,
                setting.get("messages-per-hour"),
                setting.get("recipients-per-day"),
                clear=[name for name, value in setting.items() if value is None],
            )
        usage = sending.usage(user)
    except sqlite3.Error as e:
        raise CommandError(f"sending records {sending.path}: {e}") from None
    finally:
        sending.close()
    limits = usage.limits

    def shown(value: int, own: bool) -> str:
        return f"{value or 'none'}{'' if own else ' (default)'}"

    stdout.write(
        f"{user}: messages-per-hour {shown(limits.messagesPerHour, limits.own[0])}, "
        f"recipients-per-day {shown(limits.recipientsPerDay, limits.own[1])}; "
        f"sent {usage.messagesLastHour} messages in the last hour, "
        f"{usage.recipientsLastDay} recipients in the last day; "
    )
    if usage.suspended is None:
        stdout.write("sending allowed\n")
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(usage.suspended[0]))
        stdout.write(f"sending SUSPENDED since {since} ({usage.suspended[1]})\n")
    return EX_OK


def _address(text: str, status: int = EX_USAGE) -> Address:
    try:
        return Address.parse(text)
    except AddressError as e:
        raise CommandError(f"bad address {text!r}: {e}", status) from None


def _readPassword(stdin: TextIO, isatty: bool) -> str:
    """
    Read a new password: twice without echo on a TTY, else one line of
    C{stdin}.

    @raise CommandError: no password (end of input or interrupted), the two
        differ, or it is empty, too long, has a NUL or is not UTF-8 (logins
        send UTF-8, so anything else could never match).
    """
    try:
        if isatty:
            first = getpass.getpass("Password: ")
            second = getpass.getpass("Again: ")
            if first != second:
                raise CommandError("passwords do not match")
            password = first
        else:
            line = stdin.readline()
            password = line[:-1] if line.endswith("\n") else line
            if password.endswith("\r"):
                password = password[:-1]
    except (EOFError, KeyboardInterrupt):
        raise CommandError("no password given") from None
    except UnicodeDecodeError:
        raise CommandError("password is not valid UTF-8") from None
    try:
        encoded = password.encode("utf-8")
    except UnicodeEncodeError:
        # Undecodable bytes read with surrogateescape (a C or POSIX locale).
        raise CommandError("password is not valid UTF-8") from None
    if not password:
        raise CommandError("empty password refused")
    if len(encoded) > MAX_PASSWORD_LENGTH or "\x00" in password:
        raise CommandError("password too long or contains NUL")
    return password


class _Stores:
    """
    The stores a command works on, opened once: the files under the data
    directory, or the database of C{--store postgresql://...} (whose
    schema must be current).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.database: Optional[Database] = None

    def openDatabase(self, checked: bool = True) -> Database:
        """
        @return: the L{pop3gw.pgdatabase.Database} of C{--store}.
        @raise CommandError: C{checked} and its schema is missing or not
            current.
        """
        from pop3gw import pgdatabase

        if self.database is None:
            self.database = pgdatabase.Database(self.config.store, maxConnections=1, timeout=pgdatabase.CONNECT_TIMEOUT)
            if checked:
                problem = pgdatabase.checkSchema(self.database)
                if problem is not None:
                    raise CommandError(problem)
        return self.database

    def users(self, owner: Optional[fsutil.Owner] = None):
        config = self.config
        if config.usesDatabase:
            from pop3gw.pgusers import PostgresUsers

            return PostgresUsers(self.openDatabase(), config.postmaster, config.recipientDelimiter)
        from pop3gw.users import UsersFile

        return UsersFile(config.usersPath, config.aliasesPath, owner, config.postmaster, config.recipientDelimiter)

    def maildrops(self, owner: Optional[fsutil.Owner] = None):
        config = self.config
        if config.usesDatabase:
            from pop3gw.pgmail import PostgresMaildropStore

            return PostgresMaildropStore(self.openDatabase())
        from pop3gw.maildir import MaildirStore

        return MaildirStore(config.mailDir, hostname=config.hostname, owner=owner)

    def dkimKeys(self, owner: Optional[fsutil.Owner] = None):
        """
        The DKIM keys of the store (see L{pop3gw.dkimkeys}).
        """
        if self.config.usesDatabase:
            from pop3gw.pgdkim import PostgresKeyStore

            return PostgresKeyStore(self.openDatabase())
        from pop3gw.dkimkeys import KeyStore

        return KeyStore(self.config.dataDir, owner)

    def close(self) -> None:
        database, self.database = self.database, None
        if database is not None:
            database.close()


def cmdInit(stores: _Stores, stdout: TextIO) -> int:
    """
    C{pop3gw --store URI init}: create the schema, or bring it to this
    version; idempotent.
    """
    from pop3gw import pgdatabase

    if not stores.config.usesDatabase:
        raise CommandError("init needs --store postgresql://...", EX_USAGE)
    try:
        before, after = pgdatabase.initSchema(stores.openDatabase(checked=False))
    except ValueError as e:
        raise CommandError(str(e)) from None
    if before == after:
        stdout.write(f"the pop3gw schema is current (version {after})\n")
    elif before == 0:
        stdout.write(f"created the pop3gw schema (version {after})\n")
    else:
        stdout.write(f"upgraded the pop3gw schema from version {before} to {after}\n")
    return EX_OK


def cmdUser(stores: _Stores, args, stdin: TextIO, stdout: TextIO, owner: Optional[fsutil.Owner] = None) -> int:
    from pop3gw.passwords import hashPassword

    config = stores.config
    users = stores.users(owner)
    if args.action == "list":
        sending = _sendingLimits(stores, owner)
        try:
            suspended = {user for user, _, _ in sending.suspendedUsers()}
        except sqlite3.Error:
            suspended = set()
        finally:
            sending.close()
        for a in users.refresh().addresses():
            mark = " (sending suspended)" if str(a).lower() in suspended else ""
            stdout.write(f"{a}{mark}\n")
        return EX_OK
    address = _address(args.address)
    # Users are found whatever the case of the local part; messages name
    # the user as stored.
    found = users.lookupUser(address)
    try:
        create = args.action == "add"
        if create and found is not None:
            spelling = "" if found[0] == address else f" as {found[0]}"
            raise CommandError(f"user {address} already exists{spelling}")
        if not create and found is None:
            raise UnknownUser(str(address))
        if found is not None:
            address = found[0]
        if args.action == "remove":
            users.remove(address)
            _appPasswords(stores, owner).removeUser(address)
            stdout.write(f"removed {address} (its maildrop is kept)\n")
            return EX_OK
        password = _readPassword(stdin, stdin.isatty())
        users.setPassword(address, hashPassword(password), create=create)
    except UserExists:
        raise CommandError(f"user {address} already exists") from None
    except AddressIsAlias:
        raise CommandError(
            f"{address} is an alias; remove it first (pop3gw alias remove {address}) to make it a user"
        ) from None
    except UnknownUser:
        raise CommandError(f"no such user {address}", EX_NOUSER) from None
    except OSError as e:
        raise CommandError(f"cannot write users file {config.usersPath}: {e.strerror}", EX_CANTCREAT) from None
    stdout.write(f"{'added' if create else 'changed password of'} {address}\n")
    return EX_OK


def cmdAlias(stores: _Stores, args, stdout: TextIO, stderr: TextIO, owner: Optional[fsutil.Owner] = None) -> int:
    """
    C{alias add|remove|list}: edit the aliases file under the users
    file's lock, in one atomic rewrite; malformed lines (kept as written)
    are reported on stderr with their line numbers.
    """
    config = stores.config
    users = stores.users(owner)
    if args.action != "list" and not args.alias.strip().startswith("@"):
        _address(args.alias)
    targets = [_address(t) for t in getattr(args, "targets", ())]
    try:
        if args.action == "add":
            now = users.addAlias(args.alias, targets, config.domains)
            stdout.write(f"{args.alias.strip()}: {', '.join(str(t) for t in now)}\n")
        elif args.action == "remove":
            users.removeAlias(args.alias)
            stdout.write(f"removed {args.alias.strip()}\n")
    except UnknownTarget as e:
        raise CommandError(str(e), EX_NOUSER) from None
    except AliasError as e:
        raise CommandError(str(e), EX_DATAERR if isinstance(e, (AliasShadowsUser, AliasNotLocal)) else 1) from None
    except OSError as e:
        raise CommandError(f"cannot write aliases file {config.aliasesPath}: {e.strerror}", EX_CANTCREAT) from None
    bad = 0
    seen: dict[tuple, int] = {}
    for number, line in users.aliasLines():
        if line.problem is not None:
            bad += 1
            stderr.write(f"pop3gw: {config.aliasesPath}:{number}: {line.problem}; line ignored\n")
            continue
        if line.key is None:
            continue
        key = (line.alias, line.domain)
        if key in seen:
            bad += 1
            stderr.write(f"pop3gw: {config.aliasesPath}:{number}: defined again (line {seen[key]} is used); line ignored\n")
            continue
        seen[key] = number
        if args.action == "list":
            name = str(line.alias) if line.alias is not None else f"@{line.domain}"
            stdout.write(f"{name}: {', '.join(str(t) for t in line.targets)}\n")
    return EX_DATAERR if bad and args.action == "list" else EX_OK


def cmdImport(stores: _Stores, args, stdout: TextIO, stderr: TextIO, owner: Optional[fsutil.Owner] = None) -> int:
    """
    C{user import FILE}: add the users of a Dovecot passwd-file in one
    rewrite; report each line not taken on stderr (exit 65 if any).
    """
    from pop3gw.passwdfile import parsePasswdFile

    config = stores.config
    try:
        with open(args.file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CommandError(f"cannot read {args.file}: {e.strerror}", EX_NOINPUT) from None
    taken, refused = parsePasswdFile(data)
    users = stores.users(owner)
    entries = []
    for user in taken:
        found = users.lookupUser(user.address)
        if found is not None:
            refused.append((user.line, f"{user.address}: user exists already as {found[0]}"))
        else:
            entries.append(user)
    try:
        users.addUsers([(u.address, u.hashed, u.extra) for u in entries])
    except UserExists as e:
        raise CommandError(f"user {e} was added meanwhile; nothing imported, run the import again") from None
    except OSError as e:
        raise CommandError(f"cannot write users file {config.usersPath}: {e.strerror}", EX_CANTCREAT) from None
    for number, reason in sorted(refused):
        stderr.write(f"pop3gw: {args.file}:{number}: {reason}\n")
    converted = sum(u.converted for u in entries)
    summary = f"imported {len(entries)} user(s) from {args.file}"
    if converted:
        summary += f" ({converted} plain-text password(s) hashed with Argon2id)"
    if refused:
        summary += f"; {len(refused)} line(s) not taken"
    stdout.write(summary + "\n")
    return EX_DATAERR if refused else EX_OK


def _deliverSession(args, recipient: Address) -> Session:
    """
    The client C{deliver}'s options name (C{--client-address},
    C{--client-helo}, C{--sender}), for the inbound checks.

    @raise CommandError: an option is malformed (exit 64).
    """
    ip = (args.client_address or "").strip()
    if ip.lower() in ("unknown", "[unavailable]", "[tempunavail]"):
        ip = ""
    if ip:
        literal = ip.strip("[]")
        if literal[:5].lower() == "ipv6:":
            literal = literal[5:]
        try:
            ip = ipaddress.ip_address(literal).compressed
        except ValueError:
            raise CommandError(f"--client-address: {args.client_address!r} is not an IP address", EX_USAGE) from None
    helo = (args.client_helo or "").strip()
    if helo and (len(helo) > 255 or not all(0x21 <= ord(c) <= 0x7E for c in helo)):
        raise CommandError(f"--client-helo: {args.client_helo!r} is not a host name", EX_USAGE)
    sender = None
    path = (args.sender or "").strip()
    if path.startswith("<") and path.endswith(">"):
        path = path[1:-1]
    if path:
        try:
            sender = str(Address.parse(path))
        except AddressError:
            raise CommandError(f"--sender: {args.sender!r} is not an address", EX_USAGE) from None
    return Session(ip, helo, sender, (str(recipient),))


def _readMessage(stdinBytes: BinaryIO, maxSize: int) -> Iterator[bytes]:
    """
    The chunks of the message on standard input.

    @raise CommandError: it is empty, or over C{maxSize} octets (exit 65;
        raised when the octet over the limit is read, so nothing past it
        is used).
    """
    size = 0
    while True:
        chunk = stdinBytes.read(READ_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > maxSize:
            raise CommandError(f"message larger than max-message-size ({maxSize} octets)", EX_DATAERR)
        yield chunk
    if size == 0:
        raise CommandError("empty message refused", EX_DATAERR)


def _checkedMessage(config: Config, stdinBytes: BinaryIO, session: Session) -> bytes:
    """
    Read the whole message and run the inbound checks on it
    (C{[inbound] lmtp-checks}).

    @return: the message to store (CRLF line ends).
    @raise CommandError: it is too large, empty, refused (exit 77) or
        deferred (exit 75) by the checks.
    """
    message = b"".join(_readMessage(stdinBytes, config.maxMessageSize)).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    # Loaded only here: the checks need DNS, DKIM and HTTP libraries that
    # every other command (and a delivery without the checks) does without.
    from pop3gw import inbound

    verdict = inbound.checkNow(config.hostname, config.inbound, message, session)
    if verdict.reply is not None:
        status = EX_NOPERM if verdict.reply.code >= 500 else EX_TEMPFAIL
        raise CommandError(f"message refused: {verdict.reply.code} {verdict.reply.text}", status)
    return verdict.message


def cmdDeliver(stores: _Stores, args, stdinBytes: BinaryIO, owner: Optional[fsutil.Owner] = None) -> int:
    config = stores.config
    address = _address(args.address, EX_NOUSER)
    session = _deliverSession(args, address)
    users = stores.users()
    recipients = users.refresh().resolve(address)
    if not recipients:
        raise CommandError(f"no such user {address}", EX_NOUSER)
    # One delivery for every target of a distribution list: its commit
    # fires only once each copy is durable.
    user = recipients[0] if len(recipients) == 1 else address
    if config.inbound.lmtpChecks:
        stdinBytes = io.BytesIO(_checkedMessage(config, stdinBytes, session))
    store = stores.maildrops(owner)
    try:
        delivery = store.beginDelivery(list(recipients))
    except TemporaryFailure as e:
        raise _temporaryDeliveryError(user, e) from None
    try:
        for chunk in _readMessage(stdinBytes, config.maxMessageSize):
            delivery.write(chunk)
        failures: list[Failure] = []
        delivery.commit().addErrback(failures.append)
        if failures:
            failures[0].raiseException()
    except CommandError:
        delivery.abort()
        raise
    except BadMessageData as e:
        delivery.abort()
        raise CommandError(f"message refused: {e}", EX_DATAERR) from None
    except TemporaryFailure as e:
        delivery.abort()
        raise _temporaryDeliveryError(user, e) from None
    except PermanentFailure as e:
        delivery.abort()
        raise CommandError(f"cannot deliver to {user}: {e}", EX_DATAERR) from None
    except OSError as e:
        delivery.abort()
        raise CommandError(f"cannot read message: {e.strerror}", EX_TEMPFAIL) from None
    return EX_OK


def _temporaryDeliveryError(user: Address, error: TemporaryFailure) -> CommandError:
    """
    The exit-75 line for a temporary delivery failure; a full disk or quota
    says so first.
    """
    what = "insufficient storage: " if isinstance(error, InsufficientStorage) else ""
    return CommandError(f"cannot deliver to {user}: {what}{error}", EX_TEMPFAIL)


def cmdQueue(stores: _Stores, args, stdout: TextIO, owner: Optional[fsutil.Owner] = None) -> int:
    from pop3gw import queue

    config = stores.config
    if config.usesDatabase:
        from pop3gw import pgqueue

        database = stores.openDatabase()
        if args.action == "list":
            for entry in pgqueue.listEntries(database):
                stdout.write(queue.formatEntry(entry) + "\n")
            return EX_OK
        count = pgqueue.requestFlush(database)
        stdout.write(
            f"{count} message(s) scheduled for immediate retry; "
            "the nodes holding them pick them up within seconds\n"
        )
        return EX_OK
    if args.action == "list":
        # One write: a long queue is tens of thousands of lines.
        stdout.write(queue.listText(config.queueDir))
        return EX_OK
    if os.path.exists(config.queueDir):
        os.listdir(config.queueDir)  # an unreadable queue is an error, not "0 messages"
    count = queue.requestFlush(config.queueDir, owner=owner)
    stdout.write(
        f"{count} message(s) scheduled for immediate retry; "
        "a running server picks them up within seconds, a stopped one at its next start\n"
    )
    return EX_OK


def cmdSelftest(args, config, stdout: TextIO) -> int:
    """
    Probe the listeners named on the command line, or else the configured
    ones; exit 1 if any probe fails.
    """
    from pop3gw import selftest

    if bool(args.user) != bool(args.password_file):
        raise CommandError("--user and --password-file go together", EX_USAGE)
    targets = []
    for kind in LISTENER_KINDS:
        for text in getattr(args, kind):
            try:
                targets.append(selftest.Target(kind, *selftest.parseHostPort(text)))
            except ValueError as e:
                raise CommandError(f"--{kind}: {e}", EX_USAGE) from None
    if not targets:
        for kind in LISTENER_KINDS:
            for description in config.listeners.get(kind, ()):
                target = selftest.targetFromEndpoint(kind, description)
                if target is not None:
                    targets.append(target)
    if not targets:
        raise CommandError("no TCP listener to probe: name one (--pop3 HOST:PORT, ...)", EX_USAGE)
    options = selftest.Options(caFile=args.ca_file, domain=args.domain or None)
    if args.user:
        try:
            password = selftest.readPassword(args.password_file)
        except OSError as e:
            raise CommandError(f"cannot read password file: {e.strerror}: {args.password_file}", EX_NOINPUT) from None
        options.account = selftest.Account(str(_address(args.user)), password)
    elif options.domain is None and config.domains:
        options.domain = config.domains[0]
    if options.caFile is not None and not os.path.isfile(options.caFile):
        raise CommandError(f"--ca-file: no such file: {options.caFile}", EX_NOINPUT)
    passed = selftest.run(targets, options, stdout.write)
    return EX_OK if passed else 1


def main(argv: Optional[list] = None, stdin=None, stdout=None, stderr=None) -> int:
    """
    Run the command; return the exit status (C{sys.exit} is left to the
    console-script wrapper).
    """
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    args = _parser().parse_args(argv)
    try:
        cli = {"data-dir": args.data_dir} if args.data_dir else {}
        if args.store:
            cli["store"] = args.store
        try:
            config = buildConfig(cli, args.config)
        except ConfigError as e:
            raise CommandError(str(e), EX_USAGE) from None
        stores = _Stores(config)
        try:
            return _run(stores, args, stdin, stdout, stderr)
        finally:
            stores.close()
    except CommandError as e:
        stderr.write(f"pop3gw: {e}\n")
        return e.status
    except Pop3gwError as e:
        stderr.write(f"pop3gw: {e}\n")
        return EX_TEMPFAIL if args.command == "deliver" else 1
    except OSError as e:
        stderr.write(f"pop3gw: {e.strerror}: {e.filename}\n")
        return EX_TEMPFAIL if args.command == "deliver" else 1


def cmdMigrate(args, stdout: TextIO) -> int:
    """
    C{pop3gw migrate --from maildir:DIR --to URI} and back (see
    L{pop3gw.migrate}).
    """
    from pop3gw import migrate, pgdatabase
    from pop3gw.config import parseStore

    def side(text: str) -> tuple[str, str]:
        if text.startswith("maildir:") and text[len("maildir:") :]:
            return "maildir", os.path.abspath(text[len("maildir:") :])
        try:
            uri = parseStore(text)
        except ConfigError:
            uri = "maildir"
        if uri == "maildir":
            raise CommandError(f"{text!r}: expected maildir:DATA_DIR or a postgresql:// URI", EX_USAGE)
        return "database", uri

    source, target = side(args.source), side(args.target)
    if {source[0], target[0]} != {"maildir", "database"}:
        raise CommandError("migrate copies between a data directory (maildir:DATA_DIR) and a database", EX_USAGE)
    uri = source[1] if source[0] == "database" else target[1]
    database = pgdatabase.Database(uri, maxConnections=1, timeout=pgdatabase.CONNECT_TIMEOUT)
    try:
        problem = pgdatabase.checkSchema(database)
        if problem is not None:
            raise CommandError(problem)
        try:
            if source[0] == "maildir":
                if not os.path.isdir(source[1]):
                    raise CommandError(f"data directory {source[1]} does not exist", EX_USAGE)
                done = migrate.maildirToDatabase(source[1], database)
            else:
                owner = fsutil.dataDirectoryOwner(target[1]) if os.path.isdir(target[1]) else None
                done = migrate.databaseToMaildir(database, target[1], owner)
        except migrate.MigrationError as e:
            raise CommandError(str(e)) from None
    finally:
        database.close()
    shown = [pgdatabase.redact(x[1]) if x[0] == "database" else f"maildir:{x[1]}" for x in (source, target)]
    stdout.write(f"migrated {done.summary()} from {shown[0]} to {shown[1]}\n")
    return EX_OK


def _run(stores: _Stores, args, stdin, stdout: TextIO, stderr: TextIO) -> int:
    """
    Run the command C{args} names on C{stores}.
    """
    config = stores.config
    if args.command == "selftest":
        return cmdSelftest(args, config, stdout)
    if args.command == "init":
        return cmdInit(stores, stdout)
    if args.command == "migrate":
        return cmdMigrate(args, stdout)
    action = getattr(args, "action", None)
    owner = None
    if not config.usesDatabase:
        owner = _dataDirectory(config, args, stderr)
    if args.command == "user":
        if action == "import":
            return cmdImport(stores, args, stdout, stderr, owner)
        if action == "import-uidl":
            return cmdImportUIDL(stores, args, stdin, stdout, owner)
        if action in ("limits", "unsuspend"):
            return cmdLimits(stores, args, stdout, owner)
        if action in ("app-password", "scope"):
            return cmdAppPassword(stores, args, stdout, owner)
        return cmdUser(stores, args, stdin, stdout, owner)
    if args.command == "import":
        return cmdImportMailbox(stores, args, stdin, stdout, owner, stderr)
    if args.command == "alias":
        return cmdAlias(stores, args, stdout, stderr, owner)
    if args.command == "deliver":
        return cmdDeliver(stores, args, getattr(stdin, "buffer", stdin), owner)
    if args.command == "dkim":
        return clidkim.cmdDkim(config, args, stdout, owner, stores.dkimKeys(owner))
    if args.command == "dns":
        return clidkim.cmdDns(config, args, stdout, stores.dkimKeys(), stderr)
    return cmdQueue(stores, args, stdout, owner)


def _dataDirectory(config, args, stderr: TextIO) -> Optional[fsutil.Owner]:
    """
    Check (or, for C{user add} and C{user import}, create) the data
    directory the command works on.

    @return: its owner, for a command that writes; C{None} for one that
        only reads.
    @raise CommandError: it is missing, not a directory, or owned by
        someone else.
    """
    creates = args.command == "user" and args.action in ("add", "import")
    if not os.path.isdir(config.dataDir):
        if not creates or os.path.exists(config.dataDir):
            status = EX_TEMPFAIL if args.command == "deliver" else EX_USAGE
            what = "is not a directory" if os.path.exists(config.dataDir) else "does not exist"
            raise CommandError(f"data directory {config.dataDir} {what}", status)
        # Said, so that a mistyped --data-dir does not go unnoticed.
        fsutil.makeDirectories(config.dataDir)
        stderr.write(f"pop3gw: created new data directory {config.dataDir}\n")
    if (args.command, getattr(args, "action", None)) in _READ_ONLY:
        return None
    try:
        return fsutil.dataDirectoryOwner(config.dataDir)
    except fsutil.ForeignDataDirectory as e:
        raise CommandError(str(e), EX_TEMPFAIL if args.command == "deliver" else EX_NOPERM) from None


def run() -> None:
    """
    Console-script entry point.
    """
    sys.exit(main())
