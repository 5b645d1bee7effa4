"""
The file helpers: private modes whatever the umask, ownership of the data
directory's owner, atomic replacement, and the server's pid lock.
"""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from pop3gw import fsutil
from pop3gw.fsutil import ForeignDataDirectory, LockHeld, Owner

from .util import OTHER_GID, OTHER_UID, makeTempDirectory, requireRoot, withUmask


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def owner(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return (st.st_uid, st.st_gid)


class ModeTests(SynchronousTestCase):
    """
    Files are created 0600 and directories 0700 whatever the umask.
    """

    def setUp(self) -> None:
        self.directory = makeTempDirectory(self)

    def test_createFile(self) -> None:
        """
        L{fsutil.createFile} makes a 0600 file under umask 022 and 000, and
        refuses an existing path.
        """
        for mask in (0o022, 0o000, 0o077):
            withUmask(self, mask)
            path = os.path.join(self.directory, f"f{mask:o}")
            os.close(fsutil.createFile(path))
            self.assertEqual(mode(path), 0o600)
            self.assertRaises(FileExistsError, fsutil.createFile, path)

    def test_createFileRefusesSymlink(self) -> None:
        """
        A symbolic link at the path is not followed.
        """
        target = os.path.join(self.directory, "target")
        link = os.path.join(self.directory, "link")
        os.symlink(target, link)
        self.assertRaises(FileExistsError, fsutil.createFile, link)
        self.assertFalse(os.path.exists(target))

    def test_makeDirectories(self) -> None:
        """
        L{fsutil.makeDirectories} makes every missing level 0700 under
        umask 022 and 000, and says which it created.
        """
        for mask in (0o022, 0o000):
            withUmask(self, mask)
            top = os.path.abspath(os.path.join(self.directory, f"d{mask:o}"))
            deep = os.path.join(top, "a", "b")
            self.assertEqual(fsutil.makeDirectories(deep), [top, os.path.join(top, "a"), deep])
            for path in (top, os.path.join(top, "a"), deep):
                self.assertEqual(mode(path), 0o700)
            self.assertEqual(fsutil.makeDirectories(deep), [])
            self.assertFalse(fsutil.makeDirectory(deep))

    def test_makeDirectoryOverFile(self) -> None:
        """
        A file where the directory should be is an error.
        """
        path = os.path.join(self.directory, "file")
        open(path, "w").close()
        self.assertRaises(FileExistsError, fsutil.makeDirectory, path)

    def test_openLockFile(self) -> None:
        """
        L{fsutil.openLockFile} creates a missing lock file 0600 and opens
        an existing one without changing it.
        """
        withUmask(self, 0o000)
        path = os.path.join(self.directory, "x.lock")
        os.close(fsutil.openLockFile(path))
        self.assertEqual(mode(path), 0o600)
        os.chmod(path, 0o640)
        os.close(fsutil.openLockFile(path))
        self.assertEqual(mode(path), 0o640)

    def test_replaceFile(self) -> None:
        """
        L{fsutil.replaceFile} writes a new file 0600 under umask 000 and
        replaces it, leaving no temporary file.
        """
        withUmask(self, 0o000)
        path = os.path.join(self.directory, "users")
        fsutil.replaceFile(path, b"one\n")
        self.assertEqual(mode(path), 0o600)
        fsutil.replaceFile(path, b"two\n")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"two\n")
        self.assertEqual(os.listdir(self.directory), ["users"])

    def test_replaceFileCrash(self) -> None:
        """
        A failed rename leaves the old file and no temporary file.
        """
        path = os.path.join(self.directory, "users")
        fsutil.replaceFile(path, b"one\n")

        def crash(src: str, dst: str) -> None:
            raise OSError(5, "simulated crash")

        self.assertRaises(OSError, fsutil.replaceFile, path, b"two\n", replace=crash)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"one\n")
        self.assertEqual(os.listdir(self.directory), ["users"])


class OwnerDecisionTests(SynchronousTestCase):
    """
    L{fsutil.ownerFor}: who owns what a process creates in the data
    directory.
    """

    def setUp(self) -> None:
        self.directory = makeTempDirectory(self)
        self.st = os.stat(self.directory)

    def fakeStat(self, uid: int, gid: int) -> os.stat_result:
        values = list(self.st)
        values[stat.ST_UID], values[stat.ST_GID] = uid, gid
        return os.stat_result(values)

    def test_rootKeepsOwner(self) -> None:
        """
        Root writes as the data directory's owner and group.
        """
        decided = fsutil.ownerFor("/srv/data", self.fakeStat(OTHER_UID, OTHER_GID), 0)
        self.assertEqual(decided, Owner(OTHER_UID, OTHER_GID))

    def test_ownerWritesAsItself(self) -> None:
        """
        The owner writes as itself.
        """
        decided = fsutil.ownerFor("/srv/data", self.fakeStat(OTHER_UID, OTHER_GID), OTHER_UID)
        self.assertEqual(decided, Owner(OTHER_UID, OTHER_GID))

    def test_otherUserRefused(self) -> None:
        """
        Anyone else is refused with one line naming the directory and both
        uids.
        """
        with self.assertRaises(ForeignDataDirectory) as e:
            fsutil.ownerFor("/srv/data", self.fakeStat(OTHER_UID, OTHER_GID), OTHER_UID + 1)
        text = str(e.exception)
        self.assertNotIn("\n", text)
        for fragment in ("/srv/data", f"uid {OTHER_UID}", f"uid {OTHER_UID + 1}"):
            self.assertIn(fragment, text)

    def test_dataDirectoryOwner(self) -> None:
        """
        L{fsutil.dataDirectoryOwner} decides from the directory's C{stat}
        and this process's effective uid unless told another.
        """
        st = os.stat(self.directory)
        self.assertEqual(fsutil.dataDirectoryOwner(self.directory), Owner(st.st_uid, st.st_gid))
        if os.geteuid() == 0 and st.st_uid == 0:
            self.assertRaises(ForeignDataDirectory, fsutil.dataDirectoryOwner, self.directory, OTHER_UID)


class OwnershipTests(SynchronousTestCase):
    """
    Root gives what it creates to the data directory's owner, and a
    replaced file keeps its owner.
    """

    def setUp(self) -> None:
        requireRoot(self)
        self.directory = makeTempDirectory(self)
        os.chown(self.directory, OTHER_UID, OTHER_GID)
        self.owner = fsutil.dataDirectoryOwner(self.directory)

    def test_createdBelongToOwner(self) -> None:
        """
        Files, lock files and directories root creates belong to the data
        directory's owner.
        """
        path = os.path.join(self.directory, "file")
        os.close(fsutil.createFile(path, self.owner))
        lock = os.path.join(self.directory, "x.lock")
        os.close(fsutil.openLockFile(lock, self.owner))
        deep = os.path.join(self.directory, "a", "b")
        fsutil.makeDirectories(deep, self.owner)
        for p in (path, lock, os.path.dirname(deep), deep):
            self.assertEqual(owner(p), (OTHER_UID, OTHER_GID), p)

    def test_replaceKeepsOldOwner(self) -> None:
        """
        A replaced file keeps the owner the old file had, even one that is
        not the data directory's owner; a new one gets the data directory's
        owner.
        """
        path = os.path.join(self.directory, "users")
        fsutil.replaceFile(path, b"one\n", self.owner)
        self.assertEqual(owner(path), (OTHER_UID, OTHER_GID))
        os.chown(path, OTHER_UID + 5, OTHER_GID + 5)
        fsutil.replaceFile(path, b"two\n", self.owner)
        self.assertEqual(owner(path), (OTHER_UID + 5, OTHER_GID + 5))


class PidLockTests(SynchronousTestCase):
    """
    L{fsutil.takePidLock}: one holder at a time, named by pid.
    """

    _HOLD = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, sys.argv[2].encode())\n"
        "sys.stdout.write('held\\n'); sys.stdout.flush()\n"
        "sys.stdin.read()\n"
    )

    def setUp(self) -> None:
        self.directory = makeTempDirectory(self)
        self.path = os.path.join(self.directory, "server.lock")

    def holdElsewhere(self, content: str) -> subprocess.Popen:
        """
        Hold the lock in another process, which wrote C{content} into the
        file, until the test ends.
        """
        proc = subprocess.Popen([sys.executable, "-c", self._HOLD, self.path, content],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)

        def stop() -> None:
            proc.stdin.close()
            proc.wait(10)
            proc.stdout.close()

        self.addCleanup(stop)
        self.assertEqual(proc.stdout.readline(), b"held\n")
        return proc

    def test_takeWritesPid(self) -> None:
        """
        The holder's pid is written into the 0600 lock file; releasing
        empties it and lets the next holder in.
        """
        withUmask(self, 0o022)
        fd = fsutil.takePidLock(self.path)
        with open(self.path) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")
        self.assertEqual(mode(self.path), 0o600)
        other = os.open(self.path, os.O_RDWR)
        self.addCleanup(os.close, other)
        self.assertRaises(BlockingIOError, fcntl.flock, other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fsutil.releasePidLock(fd)
        self.assertEqual(os.path.getsize(self.path), 0)
        fsutil.releasePidLock(fsutil.takePidLock(self.path))

    def test_heldByAnother(self) -> None:
        """
        While another process holds the lock, taking it fails at once with
        the pid that process wrote.
        """
        self.holdElsewhere("4242\n")
        with self.assertRaises(LockHeld) as e:
            fsutil.takePidLock(self.path)
        self.assertEqual((e.exception.path, e.exception.pid), (self.path, 4242))

    def test_heldWithoutPid(self) -> None:
        """
        A holder that has not written its pid yet is reported without one.
        """
        self.holdElsewhere("")
        with self.assertRaises(LockHeld) as e:
            fsutil.takePidLock(self.path)
        self.assertIsNone(e.exception.pid)
