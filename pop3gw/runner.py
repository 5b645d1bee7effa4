# -*- test-case-name: tests.test_runner -*-
"""
Runners for blocking work (L{IBlockingRunner}): one injected object decides
where blocking file-system work runs, so no storage method returns "a value
or a C{Deferred} depending on construction".

The server gives storage a L{ThreadPoolRunner} (work runs in a thread pool,
results come back on the reactor thread); the CLI and tests give it an
L{ImmediateRunner} (work runs at once, in the caller's thread).  Either way
the caller gets a C{Deferred}.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
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
        @return: a C{Deferred} already fired with C{f(*args)}'s result or
            failure.
        """
        return defer.maybeDeferred(f, *args)


@implementer(IBlockingRunner)
class ThreadPoolRunner:
    """
    Runs work in a thread pool; results are delivered on the reactor thread.

    @param reactor: where results are reported (C{callFromThread}).
    @param pool: a C{twisted.python.threadpool.ThreadPool} (or anything with
        its C{callInThreadWithCallback}).
    """

    def __init__(self, reactor: Any, pool: Any) -> None:
        self.reactor = reactor
        self.pool = pool
        self._inFlight = 0
        self._idleWaiters: list[defer.Deferred] = []

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """
        @return: a C{Deferred} fired on the reactor thread with C{f(*args)}'s
            result or failure, once a pool thread has run it.  The work
            counts as in flight (see L{drain}) until that C{Deferred}'s
            callbacks have run.
        """
        result: defer.Deferred = defer.Deferred()
        self._inFlight += 1

        def finish(outcome: Any) -> None:
            try:
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)
            finally:
                self._inFlight -= 1
                if not self._inFlight:
                    self._idle()

        deferToThreadPool(self.reactor, self.pool, f, *args).addBoth(finish)
        return result

    def _idle(self) -> None:
        waiters, self._idleWaiters = self._idleWaiters, []
        for waiter in waiters:
            # One reactor turn later: what the last callbacks wrote (a
            # reply to a client) leaves before the pool stops.
            self.reactor.callLater(0, waiter.callback, None)

    def drain(self) -> defer.Deferred:
        """
        Wait for the work in flight, including work it starts from its
        callbacks.

        @return: a C{Deferred} firing on a later reactor turn once nothing
            is in flight.
        """
        waiter: defer.Deferred = defer.Deferred()
        self._idleWaiters.append(waiter)
        if not self._inFlight:
            self._idle()
        return waiter
