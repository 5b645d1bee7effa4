"""
L{pop3gw.runner.ProcessPoolRunner} with real processes.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from pop3gw.runner import ProcessPoolRunner


class RealProcessTests(TestCase):
    @defer.inlineCallbacks
    def test_otherProcess(self):
        """
        The work runs in another process (its pid differs), and its result
        comes back on the reactor.
        """
        from twisted.internet import reactor

        runner = ProcessPoolRunner(reactor, workers=1)
        self.addCleanup(runner.stop)
        pid = yield runner.run(os.getpid)
        self.assertNotEqual(pid, os.getpid())
        self.assertEqual((yield runner.run(pow, 3, 4)), 81)
