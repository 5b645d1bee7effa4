# -*- test-case-name: tests.test_fsutil -*-
"""
The files and directories pop3gw creates: private whatever the umask,
durable, and owned by the owner of the data directory.

Every file is created with mode 0600 and every directory with mode 0700,
set again with C{fchmod} after creation so the process umask can neither
widen nor narrow them.

A process running as root on a data directory that belongs to another user
(the service account) gives everything it creates to the data directory's
owner, and a file it replaces keeps the owner the old file had: running
C{pop3gw user add} or C{pop3gw deliver} as root must not leave root-owned
files the server cannot read.  A process that is neither root nor the
owner cannot do that, and refuses to write at all (L{dataDirectoryOwner}
raises L{ForeignDataDirectory}).

A server holds an exclusive C{flock} on a lock file that names its pid
(L{takePidLock}), so a second server on the same data directory can say
which process is in the way.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import secrets
import time
from typing import Callable, Optional

import attr

#: Mode of every file pop3gw creates.
FILE_MODE = 0o600

#: Mode of every directory pop3gw creates.
DIRECTORY_MODE = 0o700

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

#: Longest pid text read back from a lock file.
_MAX_PID_TEXT = 32


class ForeignDataDirectory(Exception):
    """
    This process may not write to the data directory: it is neither root
    nor the directory's owner, so what it created would belong to the wrong
    user.  The text is one line for the operator.
    """


class LockHeld(Exception):
    """
    Another process holds the lock.

    @ivar path: the lock file.
    @ivar pid: the holder's pid as written in the lock file, or C{None} if
        the file does not name one (yet).
    """

    def __init__(self, path: str, pid: Optional[int]) -> None:
        super().__init__(path, pid)
        self.path = path
        self.pid = pid


def _userName(uid: int) -> str:
    """
    C{"uid N (name)"}, or C{"uid N"} when the uid has no account.
    """
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


@attr.s(frozen=True, auto_attribs=True)
class Owner:
    """
    The user and group the files pop3gw writes must belong to.
    """

    uid: int
    gid: int

    def claim(self, fd: int) -> None:
        """
        Give the open file or directory C{fd} to this owner, if it is
        someone else's and this process may (it runs as root).  A process
        that is not root only ever creates files of its own.
        """
        if os.geteuid() != 0:
            return
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (self.uid, self.gid):
            os.fchown(fd, self.uid, self.gid)


def ownerFor(path: str, st: os.stat_result, euid: int) -> Owner:
    """
    Decide who owns what a process with effective uid C{euid} creates in
    the data directory C{path}, whose C{stat} is C{st}.

    @return: the data directory's owner and group: root gives its files to
        them, and the owner's own files are theirs already.
    @raise ForeignDataDirectory: C{euid} is neither root nor the owner.
    """
    if euid != 0 and euid != st.st_uid:
        raise ForeignDataDirectory(
            f"data directory {path} belongs to {_userName(st.st_uid)}, not to {_userName(euid)}: "
            f"run this as its owner (or as root, which keeps that owner)"
        )
    return Owner(st.st_uid, st.st_gid)


def dataDirectoryOwner(path: str, euid: Optional[int] = None) -> Owner:
    """
    The owner of the existing data directory C{path}, for everything this
    process creates there (see L{ownerFor}).

    @param euid: the effective uid to decide for; default: this process's.
    @raise ForeignDataDirectory: this process may not write there.
    @raise OSError: C{path} cannot be examined.
    """
    return ownerFor(path, os.stat(path), os.geteuid() if euid is None else euid)


#: Told the duration in seconds of every fsync pop3gw makes, from whatever
#: thread made it (see L{pop3gw.metrics}); C{None} when nobody watches.
fsyncObserver: Optional[Callable[[float], None]] = None


def fsync(fd: int) -> None:
    """
    C{os.fsync(fd)}, timed for L{fsyncObserver}.
    """
    observer = fsyncObserver
    if observer is None:
        os.fsync(fd)
        return
    start = time.monotonic()
    try:
        os.fsync(fd)
    finally:
        observer(time.monotonic() - start)


def fsyncDirectory(path: str) -> None:
    """
    Make the entries of directory C{path} (creations, renames, unlinks)
    durable.
    """
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def unlinkIfThere(path: str) -> None:
    """
    Remove the file C{path}; one already gone is not an error.

    @raise OSError: it cannot be removed.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def createFile(path: str, owner: Optional[Owner] = None, flags: int = os.O_WRONLY) -> int:
    """
    Create the file C{path}, which must not exist (a symbolic link there is
    refused too), with mode 0600 whatever the umask, given to C{owner}.

    @param flags: the access flags (C{os.O_WRONLY} or C{os.O_RDWR}).
    @return: the open descriptor (close-on-exec).
    @raise OSError: it exists (C{FileExistsError}) or cannot be created; no
        file is left behind.
    """
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        if owner is not None:
            owner.claim(fd)
    except BaseException:
        os.close(fd)
        unlinkIfThere(path)
        raise
    return fd


def openLockFile(path: str, owner: Optional[Owner] = None) -> int:
    """
    Open the lock file C{path} for reading and writing, creating it as
    L{createFile} does if it is missing.

    @return: the open descriptor (close-on-exec).
    """
    while True:
        # It is there nearly always: try opening it first.
        try:
            return os.open(path, os.O_RDWR | _O_CLOEXEC | _O_NOFOLLOW)
        except FileNotFoundError:
            pass
        try:
            return createFile(path, owner, os.O_RDWR)
        except FileExistsError:
            continue  # created in between: open it after all


def makeDirectory(path: str, owner: Optional[Owner] = None) -> bool:
    """
    Create the directory C{path} with mode 0700 whatever the umask, given
    to C{owner}, and make its entry in the parent durable.

    @return: C{True} if it was created, C{False} if it was there already.
    @raise OSError: it cannot be created, or something other than a
        directory is in the way (C{FileExistsError}).
    """
    try:
        os.mkdir(path, DIRECTORY_MODE)
    except FileExistsError:
        if os.path.isdir(path):
            return False
        raise
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC | _O_NOFOLLOW)
    try:
        os.fchmod(fd, DIRECTORY_MODE)
        if owner is not None:
            owner.claim(fd)
    finally:
        os.close(fd)
    fsyncDirectory(os.path.dirname(os.path.abspath(path)))
    return True


def makeDirectories(path: str, owner: Optional[Owner] = None) -> list[str]:
    """
    Create the directory C{path} and its missing parents as
    L{makeDirectory} does.

    @return: the directories created, outermost first (empty if C{path}
        was there).
    """
    missing = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return [d for d in reversed(missing) if makeDirectory(d, owner)]


def writeAll(fd: int, data: bytes) -> None:
    """
    Write all of C{data} to descriptor C{fd} (C{os.write} may write less).
    """
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def replaceFile(
    path: str,
    data: bytes,
    owner: Optional[Owner] = None,
    replace: Callable[[str, str], None] = os.replace,
    syncDirectory: bool = True,
) -> None:
    """
    Replace the file C{path} with C{data} atomically and durably: a
    temporary file in the same directory (mode 0600) is written, fsynced
    and renamed over C{path}, then the directory is fsynced.  A crash
    leaves the old file or the new one, never a mixture.

    The new file keeps the owner and group of the file it replaces (when
    this process may give it away: see L{Owner.claim}); a new file is given
    to C{owner}.

    @param replace: the rename (for tests).
    @param syncDirectory: whether to fsync the directory here; C{False}
        leaves that to the caller (which batches it with others: see
        L{pop3gw.groupsync}), and the rename is not durable until then.
    @raise OSError: nothing was replaced and no temporary file is left.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        keep = owner
    else:
        keep = Owner(st.st_uid, st.st_gid)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = createFile(tmp, keep)
    try:
        try:
            writeAll(fd, data)
            fsync(fd)
        finally:
            os.close(fd)
        replace(tmp, path)
    except BaseException:
        unlinkIfThere(tmp)
        raise
    if syncDirectory:
        fsyncDirectory(directory)


def takePidLock(path: str, owner: Optional[Owner] = None) -> int:
    """
    Take an exclusive C{flock} on the lock file C{path} (created as
    L{openLockFile} does) without waiting, and write this process's pid
    into it.  The lock lasts while the descriptor stays open (see
    L{releasePidLock}); the kernel drops it when the process dies, so a
    crash leaves no stale lock.

    @return: the open descriptor holding the lock.
    @raise LockHeld: another process holds it.
    """
    fd = openLockFile(path, owner)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(path, _readPid(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _readPid(fd: int) -> Optional[int]:
    """
    The pid written in a lock file, or C{None}.
    """
    try:
        text = os.pread(fd, _MAX_PID_TEXT, 0).strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    return int(text)


def releasePidLock(fd: int) -> None:
    """
    Empty the lock file (so it names no process) and release the lock
    taken by L{takePidLock}.
    """
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass  # the lock goes with the descriptor all the same
    finally:
        os.close(fd)
