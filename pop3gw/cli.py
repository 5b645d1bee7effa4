# -*- test-case-name: tests.test_cli -*-
"""
The C{pop3gw} command: users, local delivery and the outbound queue.

It works on the data directory directly (no network) and exits non-zero
with one line on stderr when it fails.  C{deliver} uses the sysexits codes
MTAs expect of a mailbox command.

Run as root, a command gives what it writes to the data directory's owner;
run as anyone but root or that owner, a command that writes refuses (see
L{pop3gw.fsutil}).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import TYPE_CHECKING, BinaryIO, Optional, TextIO

from pop3gw import __version__, fsutil
from pop3gw.address import Address, AddressError
from pop3gw.config import Config, ConfigError, buildConfig
from pop3gw.interfaces import (
    AddressIsAlias,
    AliasError,
    AliasNotLocal,
    AliasShadowsUser,
    BadMessageData,
    InsufficientStorage,
    PermanentFailure,
    Pop3gwError,
    TemporaryFailure,
    UnknownTarget,
    UnknownUser,
    UserExists,
)

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
_READ_ONLY = frozenset({("user", "list"), ("queue", "list"), ("alias", "list")})

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

    queue = sub.add_parser("queue", help="outbound queue")
    qsub = queue.add_subparsers(dest="action", required=True)
    qsub.add_parser("list", help="list waiting messages")
    qsub.add_parser("flush", help="retry every waiting message now")
    return p


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
        for a in users.refresh().addresses():
            stdout.write(f"{a}\n")
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
        raise CommandError(f"no such user {address}") from None
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


def cmdDeliver(stores: _Stores, args, stdinBytes: BinaryIO, owner: Optional[fsutil.Owner] = None) -> int:
    config = stores.config
    address = _address(args.address, EX_NOUSER)
    users = stores.users()
    recipients = users.refresh().resolve(address)
    if not recipients:
        raise CommandError(f"no such user {address}", EX_NOUSER)
    # One delivery for every target of a distribution list: its commit
    # fires only once each copy is durable.
    user = recipients[0] if len(recipients) == 1 else address
    store = stores.maildrops(owner)
    try:
        delivery = store.beginDelivery(list(recipients))
    except TemporaryFailure as e:
        raise _temporaryDeliveryError(user, e) from None
    size = 0
    try:
        while True:
            chunk = stdinBytes.read(READ_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > config.maxMessageSize:
                raise CommandError(f"message larger than max-message-size ({config.maxMessageSize} octets)", EX_DATAERR)
            delivery.write(chunk)
        if size == 0:
            raise CommandError("empty message refused", EX_DATAERR)
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
        for entry in queue.listEntries(config.queueDir):
            stdout.write(queue.formatEntry(entry) + "\n")
        return EX_OK
    if os.path.exists(config.queueDir):
        os.listdir(config.queueDir)  # an unreadable queue is an error, not "0 messages"
    count = queue.requestFlush(config.queueDir, owner=owner)
    stdout.write(
        f"{count} message(s) scheduled for immediate retry; "
        "a running server picks them up within seconds, a stopped one at its next start\n"
    )
    return EX_OK


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
    if args.command == "init":
        return cmdInit(stores, stdout)
    if args.command == "migrate":
        return cmdMigrate(args, stdout)
    owner = None
    if not config.usesDatabase:
        owner = _dataDirectory(config, args, stderr)
    if args.command == "user":
        if args.action == "import":
            return cmdImport(stores, args, stdout, stderr, owner)
        return cmdUser(stores, args, stdin, stdout, owner)
    if args.command == "alias":
        return cmdAlias(stores, args, stdout, stderr, owner)
    if args.command == "deliver":
        return cmdDeliver(stores, args, getattr(stdin, "buffer", stdin), owner)
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
