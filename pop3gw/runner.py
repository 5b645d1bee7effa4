# -*- test-case-name: tests.test_runner -*-
"""
Runners for blocking work (L{IBlockingRunner}): one injected object decides
where blocking file-system work runs, so no storage method returns "a value
or a C{Deferred} depending on construction".

The server gives storage a L{ThreadPoolRunner} (work runs in a thread pool,
results come back on the reactor thread); the CLI and tests give it an
L{ImmediateRunner} (work runs at once, in the caller's thread).  Either way
the caller gets a C{Deferred}.

CPU-bound Python work (DKIM signing: dkimpy canonicalises a body with
regular expressions, which hold the GIL for the whole call) would stall
the reactor thread even from a pool thread; it goes to a
L{ProcessPoolRunner}, whose work runs in other processes (the function
and its arguments must be picklable: a module-level function and plain
values).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3gw.interfaces import IBlockingRunner

__all__ = ["ImmediateRunner", "ProcessPoolRunner", "ThreadPoolRunner"]


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
        # One Deferred and one hop back per job: the pool's callback (in
        # its thread) hands the outcome to the reactor thread directly,
        # without the second Deferred of deferToThreadPool.
        callFromThread = self.reactor.callFromThread

        def finish(success: bool, outcome: Any) -> None:
            try:
                if success:
                    result.callback(outcome)
                else:
                    result.errback(outcome)
            finally:
                self._inFlight -= 1
                if not self._inFlight:
                    self._idle()

        def onResult(success: bool, outcome: Any) -> None:
            callFromThread(finish, success, outcome)

        self.pool.callInThreadWithCallback(onResult, f, *args)
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


@implementer(IBlockingRunner)
class ProcessPoolRunner:
    """
    Runs work in a pool of processes, made at the first job; results are
    delivered on the reactor thread.  The processes are started with
    C{spawn} (a fresh interpreter: forking a process that runs threads and
    a reactor is unsafe).

    @param reactor: where results are reported (C{callFromThread},
        C{callLater}).
    @param workers: how many processes at most (default: the number of
        CPUs, at most 4).
    @param executorFactory: makes the C{concurrent.futures} executor (for
        tests).
    """

    def __init__(
        self, reactor: Any, workers: Optional[int] = None, executorFactory: Optional[Callable[[], Any]] = None
    ) -> None:
        self.reactor = reactor
        self.workers = workers or min(4, os.cpu_count() or 1)
        self._executorFactory = executorFactory or self._defaultExecutor
        self._executor: Any = None
        self._inFlight = 0
        self._idleWaiters: list[defer.Deferred] = []

    def _defaultExecutor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """
        @return: a C{Deferred} fired on the reactor thread with C{f(*args)}'s
            result or failure, once a pool process has run it.
        """
        if self._executor is None:
            self._executor = self._executorFactory()
        result: defer.Deferred = defer.Deferred()
        try:
            future = self._executor.submit(f, *args)
        except Exception:
            return defer.fail()
        self._inFlight += 1

        def done(future: Future) -> None:
            # Called in one of the executor's threads (or at once).
            self.reactor.callFromThread(self._finish, future, result)

        future.add_done_callback(done)
        return result

    def _finish(self, future: Future, result: defer.Deferred) -> None:
        try:
            error = future.exception()
            if error is not None:
                result.errback(Failure(error))
            else:
                result.callback(future.result())
        finally:
            self._inFlight -= 1
            if not self._inFlight:
                waiters, self._idleWaiters = self._idleWaiters, []
                for waiter in waiters:
                    self.reactor.callLater(0, waiter.callback, None)

    def drain(self) -> defer.Deferred:
        """
        Wait for the work in flight (see L{ThreadPoolRunner.drain}).
        """
        waiter: defer.Deferred = defer.Deferred()
        self._idleWaiters.append(waiter)
        if not self._inFlight:
            self._idleWaiters.remove(waiter)
            self.reactor.callLater(0, waiter.callback, None)
        return waiter

    def stop(self) -> None:
        """
        Shut the pool down (its processes exit once idle); a later job
        starts a new one.
        """
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)
