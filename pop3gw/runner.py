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
import queue
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3gw.interfaces import IBlockingRunner, ServerStopping

__all__ = ["IOThreadPool", "ImmediateRunner", "ProcessPoolRunner", "ThreadPoolRunner", "drainTogether"]


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


class _Draining:
    """
    The work in flight on a runner, counted so that a stopping server can
    wait for it and then refuse more (see L{drain}, L{drainTogether}).
    """

    reactor: Any

    def __init__(self) -> None:
        self._inFlight = 0
        self._idleWaiters: list[defer.Deferred] = []
        self._closed = False

    @property
    def inFlight(self) -> int:
        """
        How much work is in flight.
        """
        return self._inFlight

    @property
    def closed(self) -> bool:
        """
        Whether the runner refuses work (see L{close}).
        """
        return self._closed

    def _refusal(self) -> defer.Deferred:
        return defer.fail(ServerStopping("the server is stopping"))

    def _done(self) -> None:
        """
        One piece of work has finished and its callbacks have run.
        """
        self._inFlight -= 1
        if not self._inFlight:
            waiters, self._idleWaiters = self._idleWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    def whenIdle(self) -> defer.Deferred:
        """
        @return: a C{Deferred} firing, on the very turn on which it
            happens, once nothing is in flight (at once if nothing is).
        """
        waiter: defer.Deferred = defer.Deferred()
        if not self._inFlight:
            waiter.callback(None)
        else:
            self._idleWaiters.append(waiter)
        return waiter

    def close(self) -> None:
        """
        Take no more work: C{run} and L{track} refuse it from now on with
        L{ServerStopping}, so that no work is started that the stopping
        pool would finish with no one left to answer.
        """
        self._closed = True

    def track(self, d: defer.Deferred) -> defer.Deferred:
        """
        Count C{d} (an answer that waits on a timer, such as a failed
        login's delay) as work in flight until it has fired and the
        callbacks of the C{Deferred} returned have run.

        @return: a C{Deferred} firing with C{d}'s result; failed at once
            with L{ServerStopping} (and C{d} cancelled) if the runner is
            closed.
        """
        if self._closed:
            d.cancel()
            d.addErrback(lambda _: None)
            return self._refusal()
        result: defer.Deferred = defer.Deferred()
        self._inFlight += 1

        def finish(outcome: Any) -> None:
            try:
                result.callback(outcome)
            finally:
                self._done()

        d.addBoth(finish)
        return result

    def drain(self) -> defer.Deferred:
        """
        Wait for the work in flight, including work it starts from its
        callbacks, then take no more (L{close}): from the moment nothing is
        in flight, C{run} refuses work with L{ServerStopping}.  Work given
        while the drain waits is run and waited for.

        @return: a C{Deferred} firing on a later reactor turn once nothing
            is in flight.
        """
        waiter: defer.Deferred = defer.Deferred()

        def idle(_: object) -> None:
            # Closed on this very turn: work given from here on (an end of
            # data read before the waiter fires) would otherwise be run by
            # the stopping pool and answered after the connections closed.
            self.close()
            # One reactor turn later: what the last callbacks wrote (a
            # reply to a client) leaves before the pool stops.
            self.reactor.callLater(0, waiter.callback, None)

        self.whenIdle().addCallback(idle)
        return waiter


def drainTogether(runners: list) -> defer.Deferred:
    """
    Wait until none of C{runners} has work in flight on one and the same
    reactor turn, then close them all on that turn (see
    L{_Draining.close}).  Work on one runner may start work on another
    from its callbacks (a login's password check opens the maildrop on the
    I/O pool; a signature is followed by the store's commit): draining
    each alone could close one before the other's work reaches it.

    @param runners: L{ThreadPoolRunner}s and L{ProcessPoolRunner}s.
    @return: a C{Deferred} firing once they are closed.
    """
    done: defer.Deferred = defer.Deferred()

    def check(_: object = None) -> None:
        busy = [runner for runner in runners if runner.inFlight]
        if busy:
            busy[0].whenIdle().addCallback(check)
            return
        for runner in runners:
            runner.close()
        done.callback(None)

    check()
    return done


@implementer(IBlockingRunner)
class ThreadPoolRunner(_Draining):
    """
    Runs work in a thread pool; results are delivered on the reactor thread.

    @param reactor: where results are reported (C{callFromThread}).
    @param pool: a C{twisted.python.threadpool.ThreadPool} (or anything with
        its C{callInThreadWithCallback}).
    """

    def __init__(self, reactor: Any, pool: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.pool = pool

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """
        @return: a C{Deferred} fired on the reactor thread with C{f(*args)}'s
            result or failure, once a pool thread has run it.  The work
            counts as in flight (see L{drain}) until that C{Deferred}'s
            callbacks have run.  Once the runner is closed (a L{drain}
            found nothing in flight), the C{Deferred} fails at once with
            L{ServerStopping} and C{f} is never run.
        """
        if self._closed:
            return self._refusal()
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
                self._done()

        def onResult(success: bool, outcome: Any) -> None:
            callFromThread(finish, success, outcome)

        self.pool.callInThreadWithCallback(onResult, f, *args)
        return result


#: Put in an L{IOThreadPool}'s queue to end one of its threads.
_STOP = object()


class IOThreadPool:
    """
    A fixed set of threads taking jobs from one queue: what
    L{ThreadPoolRunner} needs of C{twisted.python.threadpool.ThreadPool}
    (C{start}, C{stop}, C{callInThreadWithCallback}) at a third of its
    cost per job.

    Twisted's pool hands each job through its coordinator (a lock, a
    Python queue and a condition per job) and runs it in the caller's
    logging context; every delivery makes two or three such hops.  Here a
    job is one C{put} on a C{queue.SimpleQueue} (a C lock), taken by
    whichever thread is free.  The threads start with the pool; jobs given
    before are run once it starts, and C{stop} lets the jobs already
    queued run before the threads end.

    @param threads: how many threads.
    @param name: prefix of the threads' names.
    """

    log = Logger()

    def __init__(self, threads: int, name: str = "pool") -> None:
        if threads < 1:
            raise ValueError("an IOThreadPool needs at least one thread")
        self.max = threads
        self.name = name
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.started = False

    def start(self) -> None:
        """
        Start the threads (once).
        """
        if self.started:
            return
        self.started = True
        for number in range(self.max):
            thread = threading.Thread(target=self._work, name=f"{self.name}-{number}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        """
        Let the jobs queued so far run, then end the threads and wait for
        them.
        """
        threads, self._threads = self._threads, []
        self.started = False
        for _ in threads:
            self._queue.put(_STOP)
        for thread in threads:
            thread.join()

    def callInThreadWithCallback(
        self, onResult: Optional[Callable[[bool, Any], None]], f: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> None:
        """
        Run C{f(*args, **kwargs)} in one of the threads, then call
        C{onResult(True, result)} or C{onResult(False, failure)} there.
        """
        self._queue.put((onResult, f, args, kwargs))

    def callInThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """
        Run C{f(*args, **kwargs)} in one of the threads; a failure is
        logged.
        """
        self._queue.put((None, f, args, kwargs))

    def _work(self) -> None:
        get = self._queue.get
        while True:
            job = get()
            if job is _STOP:
                return
            onResult, f, args, kwargs = job
            try:
                result = f(*args, **kwargs)
                ok = True
            except BaseException:
                result = Failure()
                ok = False
            del job, f, args, kwargs
            try:
                if onResult is not None:
                    onResult(ok, result)
                elif not ok:
                    self.log.failure("{name}: job failed", result, name=self.name)
            except BaseException:
                self.log.failure("{name}: reporting a result failed", name=self.name)
            del onResult, result


@implementer(IBlockingRunner)
class ProcessPoolRunner(_Draining):
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
        super().__init__()
        self.reactor = reactor
        self.workers = workers or min(4, os.cpu_count() or 1)
        self._executorFactory = executorFactory or self._defaultExecutor
        self._executor: Any = None

    def _defaultExecutor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """
        @return: a C{Deferred} fired on the reactor thread with C{f(*args)}'s
            result or failure, once a pool process has run it; failed with
            L{ServerStopping} once a L{drain} has found nothing in flight.
        """
        if self._closed:
            return self._refusal()
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
            self._done()

    def stop(self) -> None:
        """
        Shut the pool down (its processes exit once idle).
        """
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)
