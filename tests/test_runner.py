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
