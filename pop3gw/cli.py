# -*- test-case-name: tests.test_cli -*-
"""
The C{pop3gw} command: users, local delivery and the outbound queue.

It works on the data directory directly (no network) and exits non-zero
with one line on stderr when it fails.  C{deliver} uses the sysexits codes
MTAs expect of a mailbox command.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import BinaryIO, Optional, TextIO

from pop3gw import __version__
from pop3gw.address import Address, AddressError
from pop3gw.config import ConfigError, buildConfig
from pop3gw.interfaces import PermanentFailure, Pop3gwError, TemporaryFailure, UnknownUser, UserExists

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75

#: Longest password accepted, in octets of UTF-8: the login check refuses
#: longer ones (L{pop3gw.users.MAX_PASSWORD_BYTES}) without hashing.
MAX_PASSWORD_LENGTH = 1024
READ_CHUNK = 64 * 1024


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
    sub = p.add_subparsers(dest="command", required=True)

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


def _users(config):
    from pop3gw.users import UsersFile

    return UsersFile(config.usersPath, config.aliasesPath)


def cmdUser(config, args, stdin: TextIO, stdout: TextIO) -> int:
    from pop3gw.users import hashPassword

    users = _users(config)
    if args.action == "list":
        for a in users.addresses():
            stdout.write(f"{a}\n")
        return EX_OK
    address = _address(args.address)
    try:
        if args.action == "remove":
            users.remove(address)
            stdout.write(f"removed {address} (its maildrop is kept)\n")
            return EX_OK
        create = args.action == "add"
        if create and users.exists(address):
            raise UserExists(str(address))
        if not create and not users.exists(address):
            raise UnknownUser(str(address))
        password = _readPassword(stdin, stdin.isatty())
        users.setPassword(address, hashPassword(password), create=create)
    except UserExists:
        raise CommandError(f"user {address} already exists") from None
    except UnknownUser:
        raise CommandError(f"no such user {address}") from None
    except OSError as e:
        raise CommandError(f"cannot write users file {config.usersPath}: {e.strerror}", EX_CANTCREAT) from None
    stdout.write(f"{'added' if create else 'changed password of'} {address}\n")
    return EX_OK


def cmdDeliver(config, args, stdinBytes: BinaryIO) -> int:
    from pop3gw.maildir import MaildirStore

    address = _address(args.address, EX_NOUSER)
    users = _users(config)
    user = users.resolve(address)
    if user is None:
        raise CommandError(f"no such user {address}", EX_NOUSER)
    store = MaildirStore(config.mailDir, hostname=config.hostname)
    try:
        delivery = store.beginDelivery([user])
    except TemporaryFailure as e:
        raise CommandError(f"cannot deliver to {user}: {e}", EX_TEMPFAIL) from None
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
        failures = []
        delivery.commit().addErrback(failures.append)
        if failures:
            failures[0].raiseException()
    except CommandError:
        delivery.abort()
        raise
    except TemporaryFailure as e:
        delivery.abort()
        raise CommandError(f"cannot deliver to {user}: {e}", EX_TEMPFAIL) from None
    except PermanentFailure as e:
        delivery.abort()
        raise CommandError(f"cannot deliver to {user}: {e}", EX_DATAERR) from None
    except OSError as e:
        delivery.abort()
        raise CommandError(f"cannot read message: {e.strerror}", EX_TEMPFAIL) from None
    return EX_OK


def cmdQueue(config, args, stdout: TextIO) -> int:
    from pop3gw import queue

    if args.action == "list":
        for entry in queue.listEntries(config.queueDir):
            stdout.write(queue.formatEntry(entry) + "\n")
        return EX_OK
    if os.path.exists(config.queueDir):
        os.listdir(config.queueDir)  # an unreadable queue is an error, not "0 messages"
    count = queue.requestFlush(config.queueDir)
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
        try:
            config = buildConfig(cli, args.config)
        except ConfigError as e:
            raise CommandError(str(e), EX_USAGE) from None
        if not (args.command == "user" and args.action == "add") and not os.path.isdir(config.dataDir):
            status = EX_TEMPFAIL if args.command == "deliver" else EX_USAGE
            what = "is not a directory" if os.path.exists(config.dataDir) else "does not exist"
            raise CommandError(f"data directory {config.dataDir} {what}", status)
        if args.command == "user":
            os.makedirs(config.dataDir, mode=0o700, exist_ok=True)
            return cmdUser(config, args, stdin, stdout)
        if args.command == "deliver":
            return cmdDeliver(config, args, getattr(stdin, "buffer", stdin))
        return cmdQueue(config, args, stdout)
    except CommandError as e:
        stderr.write(f"pop3gw: {e}\n")
        return e.status
    except Pop3gwError as e:
        stderr.write(f"pop3gw: {e}\n")
        return EX_TEMPFAIL if args.command == "deliver" else 1
    except OSError as e:
        stderr.write(f"pop3gw: {e.strerror}: {e.filename}\n")
        return EX_TEMPFAIL if args.command == "deliver" else 1


def run() -> None:
    """
    Console-script entry point.
    """
    sys.exit(main())
