# -*- test-case-name: tests.test_runner -*-
"""
Tests for L{pop3gw.runner} and L{pop3gw.testing.HeldRunner}.
"""

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pop3gw.interfaces import IBlockingRunner
from pop3gw.runner import ImmediateRunner, ThreadPoolRunner
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
