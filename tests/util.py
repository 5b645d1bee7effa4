"""
Small helpers shared by the test modules.
"""

from __future__ import annotations

import os
import shutil

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
