# -*- test-case-name: tests.test_runner -*-
"""
Tests for L{pop3gw.runner} and L{pop3gw.testing.HeldRunner}.
"""

import threading

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pop3gw.interfaces import IBlockingRunner, ServerStopping, TemporaryFailure
from pop3gw.runner import ImmediateRunner, IOThreadPool, ThreadPoolRunner, drainTogether
from pop3gw.testing import HeldRunner, HeldThreadPool
from tests.queuehelpers import ThreadClock


class RunnerTests(SynchronousTestCase):
    """
    Each runner returns a L{Deferred} with the work's result or failure.
    """

    def test_interface(self) -> None:
        """
        Every runner provides L{IBlockingRunner}.
        """
        for runner in (ImmediateRunner(), ThreadPoolRunner(ThreadClock(), HeldThreadPool()), HeldRunner()):
            self.assertTrue(verifyObject(IBlockingRunner, runner))

    def test_immediate(self) -> None:
        """
        L{ImmediateRunner} runs the work at once.
        """
        runner = ImmediateRunner()
        self.assertEqual(self.successResultOf(runner.run(lambda a, b: a + b, 1, 2)), 3)
        self.failureResultOf(runner.run(lambda: 1 / 0), ZeroDivisionError)

    def test_threadPool(self) -> None:
        """
        L{ThreadPoolRunner} runs the work in the pool and reports through
        the reactor.
        """
        pool = HeldThreadPool()
        runner = ThreadPoolRunner(ThreadClock(), pool)
        d = runner.run(lambda a: a * 2, 21)
        failing = runner.run(lambda: 1 / 0)
        self.assertNoResult(d)
        pool.runAll()
        self.assertEqual(self.successResultOf(d), 42)
        self.failureResultOf(failing, ZeroDivisionError)

    def test_held(self) -> None:
        """
        L{HeldRunner} holds jobs until the test runs them, oldest first.
        """
        runner = HeldRunner()
        order = []
        first = runner.run(order.append, 1)
        second = runner.run(order.append, 2)
        self.assertNoResult(first)
        runner.runNext()
        self.assertEqual(order, [1])
        self.successResultOf(first)
        self.assertNoResult(second)
        runner.runAll()
        self.assertEqual(order, [1, 2])


class DrainTests(SynchronousTestCase):
    """
    L{ThreadPoolRunner.drain} at shutdown: the work in flight is waited
    for, and once nothing is, the runner takes no more.
    """

    def test_workGivenWhileDrainingWaitedFor(self) -> None:
        """
        Work given while the drain waits for work in flight (the local
        part of a delivery, started from a callback) is run and waited
        for too.
        """
        pool = HeldThreadPool()
        runner = ThreadPoolRunner(ThreadClock(), pool)
        results: list = []
        first = runner.run(lambda: 1)
        first.addCallback(lambda _: runner.run(lambda: 2).addCallback(results.append))
        drained = runner.drain()
        pool.runAll()
        self.assertEqual(results, [2])
        self.assertNoResult(drained)
        runner.reactor.advance(0)
        self.assertIsNone(self.successResultOf(drained))

    def test_workAfterDrainRefused(self) -> None:
        """
        From the moment the drain finds nothing in flight, work given to
        the runner fails at once with L{ServerStopping} (a
        L{TemporaryFailure}: the client is told to try again) and never
        reaches the pool, even before the drain's result fires: work the
        pool ran while it stopped would be done with no one left to
        answer.
        """
        pool = HeldThreadPool()
        runner = ThreadPoolRunner(ThreadClock(), pool)
        done = runner.run(lambda: 1)
        drained = runner.drain()
        pool.runAll()
        self.successResultOf(done)
        late = runner.run(lambda: 2)
        failure = self.failureResultOf(late, ServerStopping)
        self.assertIsInstance(failure.value, TemporaryFailure)
        self.assertEqual(pool.pending, [])
        runner.reactor.advance(0)
        self.successResultOf(drained)
        self.failureResultOf(runner.run(lambda: 3), ServerStopping)
        self.assertEqual(pool.pending, [])

    def test_idleDrainRefusesAtOnce(self) -> None:
        """
        A drain of a runner with nothing in flight refuses later work at
        once.
        """
        pool = HeldThreadPool()
        runner = ThreadPoolRunner(ThreadClock(), pool)
        drained = runner.drain()
        self.failureResultOf(runner.run(lambda: 1), ServerStopping)
        self.assertEqual(pool.pending, [])
        runner.reactor.advance(0)
        self.successResultOf(drained)


class DrainTogetherTests(SynchronousTestCase):
    """
    L{drainTogether}: the pools' runners are closed together, on a turn on
    which none has work in flight.
    """

    def test_workHandedOnIsRun(self) -> None:
        """
        Work on one runner that gives work to another from its callbacks
        (a password check, then the maildrop's opening on the I/O pool)
        is run on both, although the second had nothing in flight when the
        drain began; then both refuse work with L{ServerStopping}.
        """
        clock = ThreadClock()
        hashPool, ioPool = HeldThreadPool(), HeldThreadPool()
        hashRunner, ioRunner = ThreadPoolRunner(clock, hashPool), ThreadPoolRunner(clock, ioPool)
        opened: list = []
        check = hashRunner.run(lambda: "alice")
        check.addCallback(lambda user: ioRunner.run(lambda: user + "'s maildrop").addCallback(opened.append))
        drained = drainTogether([hashRunner, ioRunner])
        self.assertNoResult(drained)
        hashPool.runAll()
        self.assertNoResult(drained)
        ioPool.runAll()
        self.assertEqual(opened, ["alice's maildrop"])
        self.successResultOf(drained)
        for runner, pool in ((hashRunner, hashPool), (ioRunner, ioPool)):
            self.failureResultOf(runner.run(lambda: 1), ServerStopping)
            self.assertEqual(pool.pending, [])

    def test_idle(self) -> None:
        """
        Runners with nothing in flight are closed at once.
        """
        runner = ThreadPoolRunner(ThreadClock(), HeldThreadPool())
        self.successResultOf(drainTogether([runner]))
        self.assertTrue(runner.closed)

    def test_trackedAnswer(self) -> None:
        """
        A C{Deferred} given to L{ThreadPoolRunner.track} (a failed login's
        delayed answer) counts as work in flight until it has fired and the
        callbacks of the one returned have run; once the runner is closed,
        C{track} refuses with L{ServerStopping} and cancels what it was
        given.
        """
        from twisted.internet import defer

        runner = ThreadPoolRunner(ThreadClock(), HeldThreadPool())
        answer: defer.Deferred = defer.Deferred()
        seen: list = []
        tracked = runner.track(answer)
        tracked.addCallback(lambda result: seen.append((result, runner.inFlight)))
        drained = drainTogether([runner])
        self.assertNoResult(drained)
        answer.callback("no")
        self.assertEqual(seen, [("no", 1)])
        self.successResultOf(drained)
        cancelled: list = []
        late: defer.Deferred = defer.Deferred(cancelled.append)
        self.failureResultOf(runner.track(late), ServerStopping)
        self.assertEqual(cancelled, [late])


class _CallsFromThreads:
    """
    A reactor's C{callFromThread} that keeps the calls for the test's
    thread to run.
    """

    def __init__(self) -> None:
        self.calls: list = []

    def callFromThread(self, f, *args) -> None:
        self.calls.append((f, args))

    def runCalls(self) -> None:
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


class IOThreadPoolTests(SynchronousTestCase):
    """
    L{IOThreadPool} runs jobs in its own threads and reports each outcome
    from there.
    """

    def test_results(self) -> None:
        """
        Each job runs in one of the pool's threads, not the caller's, and
        its result or failure is given to its callback (in that thread);
        after C{stop}, every job queued before has run.
        """
        pool = IOThreadPool(3, name="test-io")
        outcomes: list = []
        pool.start()
        try:
            pool.callInThreadWithCallback(
                lambda ok, r: outcomes.append(("sum", ok, r)),
                lambda a, b: (a + b, threading.current_thread().name),
                1,
                b=2,
            )
            pool.callInThreadWithCallback(lambda ok, r: outcomes.append(("div", ok, r.type)), lambda: 1 / 0)
        finally:
            pool.stop()
        [(_, ok, (total, thread))] = [o for o in outcomes if o[0] == "sum"]
        self.assertEqual((ok, total), (True, 3))
        self.assertTrue(thread.startswith("test-io-"), thread)
        self.assertIn(("div", False, ZeroDivisionError), outcomes)

    def test_queuedBeforeStart(self) -> None:
        """
        Jobs given before C{start} wait, and run once the pool starts.
        """
        pool = IOThreadPool(1)
        ran: list = []
        pool.callInThreadWithCallback(lambda ok, r: ran.append(r), lambda: "early")
        self.assertEqual(ran, [])
        pool.start()
        pool.stop()
        self.assertEqual(ran, ["early"])

    def test_stopRunsQueuedWork(self) -> None:
        """
        C{stop} lets every job queued before it run (in order, with one
        thread), then ends the threads.
        """
        pool = IOThreadPool(1, name="test-stop")
        release = threading.Event()
        order: list = []
        pool.start()
        pool.callInThread(release.wait)
        for n in range(5):
            pool.callInThreadWithCallback(lambda ok, r: order.append(r), lambda n=n: n)
        release.set()
        pool.stop()
        self.assertEqual(order, [0, 1, 2, 3, 4])
        self.assertEqual([t for t in threading.enumerate() if t.name.startswith("test-stop-")], [])

    def test_failuresLogged(self) -> None:
        """
        A failing job given without a callback, and a callback that
        fails, are logged; the thread goes on with the next job.
        """
        pool = IOThreadPool(1)
        ran: list = []
        pool.start()
        pool.callInThread(lambda: 1 / 0)
        pool.callInThreadWithCallback(lambda ok, r: 1 / 0, lambda: None)
        pool.callInThreadWithCallback(lambda ok, r: ran.append(r), lambda: "after")
        pool.stop()
        self.assertEqual(ran, ["after"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)

    def test_noThreads(self) -> None:
        """
        A pool of no threads is refused.
        """
        self.assertRaises(ValueError, IOThreadPool, 0)

    def test_runner(self) -> None:
        """
        A L{ThreadPoolRunner} over an L{IOThreadPool} fires its C{Deferred}s
        on the reactor thread (through C{callFromThread}), not in the
        pool's threads.
        """
        reactor = _CallsFromThreads()
        pool = IOThreadPool(2)
        runner = ThreadPoolRunner(reactor, pool)
        pool.start()
        d = runner.run(lambda a: a * 2, 21)
        failing = runner.run(lambda: 1 / 0)
        pool.stop()
        self.assertNoResult(d)
        self.assertNoResult(failing)
        reactor.runCalls()
        self.assertEqual(self.successResultOf(d), 42)
        self.failureResultOf(failing, ZeroDivisionError)


class _HeldExecutor:
    """
    A C{concurrent.futures} executor whose jobs run when the test says.
    """

    def __init__(self) -> None:
        self.jobs: list = []
        self.shutdowns: list = []

    def submit(self, f, *args):
        from concurrent.futures import Future

        future: Future = Future()
        self.jobs.append((future, f, args))
        return future

    def runAll(self) -> None:
        jobs, self.jobs = self.jobs, []
        for future, f, args in jobs:
            try:
                future.set_result(f(*args))
            except Exception as e:
                future.set_exception(e)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self.shutdowns.append(wait)


class ProcessPoolRunnerTests(SynchronousTestCase):
    """
    L{ProcessPoolRunner} runs work in other processes (CPU work that would
    hold the GIL) and reports on the reactor.
    """

    def test_results(self) -> None:
        """
        Results and failures come back through the reactor once the pool
        has run the work; the pool is made at the first job only, and
        L{ProcessPoolRunner.drain} waits for the work in flight.
        """
        from pop3gw.runner import ProcessPoolRunner

        made: list = []

        def factory():
            made.append(_HeldExecutor())
            return made[-1]

        clock = ThreadClock()
        runner = ProcessPoolRunner(clock, executorFactory=factory)
        self.assertTrue(verifyObject(IBlockingRunner, runner))
        self.assertEqual(made, [])
        d = runner.run(pow, 2, 10)
        failing = runner.run(divmod, 1, 0)
        drained = runner.drain()
        self.assertNoResult(d)
        made[0].runAll()
        self.assertEqual(self.successResultOf(d), 1024)
        self.failureResultOf(failing, ZeroDivisionError)
        self.assertNoResult(drained)
        clock.advance(0)
        self.successResultOf(drained)
        runner.stop()
        self.assertEqual((len(made), made[0].shutdowns), (1, [False]))
