"""
Small helpers shared by the test modules.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from typing import Iterator

from twisted.trial.unittest import SynchronousTestCase


def makeTempDirectory(testCase: SynchronousTestCase) -> str:
    """
    Make an empty directory with L{tempPath}.
    """
    path = tempPath(testCase)
    os.mkdir(path)
    return path


def tempPath(testCase: SynchronousTestCase) -> str:
    """
    A fresh path from C{testCase.mktemp()} (nothing created there yet),
    removed with the per-test parents C{mktemp} made when the test ends
    (under pytest C{mktemp} works in the current directory, not in
    C{_trial_temp}).
    """
    path = testCase.mktemp()
    unique = os.path.dirname(path)

    def clean() -> None:
        shutil.rmtree(unique, ignore_errors=True)
        try:
            os.removedirs(os.path.dirname(unique))
        except OSError:
            pass

    testCase.addCleanup(clean)
    return path


#: A uid and gid no account on the test machine has, for data directories
#: that belong to someone else.
OTHER_UID = 54321
OTHER_GID = 54322


def withUmask(testCase: SynchronousTestCase, mask: int) -> None:
    """
    Set the process umask until the test ends.
    """
    old = os.umask(mask)
    testCase.addCleanup(os.umask, old)


def requireRoot(testCase: SynchronousTestCase) -> None:
    """
    Skip the test unless it runs as root: only root can give files to
    another uid, or act as one.
    """
    if os.geteuid() != 0:
        testCase.skipTest("needs root: only root can give files to another uid or act as one")


@contextlib.contextmanager
def effectiveUser(uid: int, gid: int) -> Iterator[None]:
    """
    Run the block with effective uid C{uid} and gid C{gid} (as root; the
    real uid stays root, so the old identity comes back afterwards).
    """
    oldGid, oldUid = os.getegid(), os.geteuid()
    os.setegid(gid)
    try:
        os.seteuid(uid)
        try:
            yield
        finally:
            os.seteuid(oldUid)
    finally:
        os.setegid(oldGid)


def treeModesAndOwners(top: str) -> dict[str, tuple[str, int, int, int]]:
    """
    Every file and directory under C{top} (itself included), by path
    relative to C{top}: C{("d" or "f", mode, uid, gid)}.
    """
    found = {}
    for directory, _subdirs, files in os.walk(top):
        for name in [None, *files]:
            path = directory if name is None else os.path.join(directory, name)
            st = os.lstat(path)
            kind = "d" if stat.S_ISDIR(st.st_mode) else "f"
            found[os.path.relpath(path, top)] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return found
