# -*- test-case-name: tests.test_runner -*-
"""
Runners for blocking work (L{IBlockingRunner}): one injected object decides
where blocking file-system work runs, so no storage method returns "a value
or a L{Deferred} depending on construction".

The server gives storage a L{ThreadPoolRunner} (work runs in a thread pool,
results come back on the reactor thread); the CLI and tests give it an
L{ImmediateRunner} (work runs at once, in the caller's thread).  Either way
the caller gets a L{Deferred}.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from pop3gw.interfaces import IBlockingRunner

__all__ = ["ImmediateRunner", "ThreadPoolRunner"]


@implementer(IBlockingRunner)
class ImmediateRunner:
    """
    Runs work at once in the calling thread (the CLI, tests).
    """

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """
        @return: a L{Deferred} already fired with C{f(*args)}'s result or
            failure.
        """
        return defer.maybeDeferred(f, *args)


@implementer(IBlockingRunner)
class ThreadPoolRunner:
    """
    Runs work in a thread pool; results are delivered on the reactor thread.

    @param reactor: where results are reported (C{callFromThread}).
    @param pool: a L{twisted.python.threadpool.ThreadPool} (or anything with
        its C{callInThreadWithCallback}).
    """

    def __init__(self, reactor: Any, pool: Any) -> None:
        self.reactor = reactor
        self.pool = pool

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """
        @return: a L{Deferred} fired on the reactor thread with C{f(*args)}'s
            result or failure, once a pool thread has run it.
        """
        return deferToThreadPool(self.reactor, self.pool, f, *args)
