"""
L{pop3gw.workerlink}: the worker's end of its channel to the supervisor.
"""

from __future__ import annotations

import socket

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.logger import (
    Logger,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.config import buildConfig
from pop3gw.workerlink import (
    InheritedListener,
    LogLineWriter,
    MetricsReporter,
    SharedPeerCounts,
    WorkerLink,
    WorkerSetup,
    decodeLogLine,
    decodeSetup,
    encodeLogEvent,
    encodeSetup,
    formatLogText,
    logTextEncoder,
)


class WorkerLinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lost: list[bool] = []
        self.link = WorkerLink(onLost=lambda: self.lost.append(True))
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)

    def test_claimAnswered(self) -> None:
        """
        Each claim is one numbered line; the supervisor's C{grant} line of
        that number answers it, whatever the order.
        """
        first = self.link.claim("192.0.2.1", 20)
        second = self.link.claim("2001:db8::/64", 20)
        self.assertEqual(self.transport.value(), b"claim 1 192.0.2.1 20\nclaim 2 2001:db8::/64 20\n")
        self.link.dataReceived(b"grant 2 0\ngrant 1 1\n")
        self.assertIs(self.successResultOf(first), True)
        self.assertIs(self.successResultOf(second), False)

    def test_releaseAndQueued(self) -> None:
        """
        Releases and queued messages are one line each, with no answer.
        """
        self.link.release("192.0.2.1")
        self.link.queued("0005f0e1a2b3c-0a1b2c3d")
        self.assertEqual(self.transport.value(), b"release 192.0.2.1\nqueued 0005f0e1a2b3c-0a1b2c3d\n")

    def test_alive(self) -> None:
        """
        C{alive} is one line with no answer; nothing once the supervisor
        is gone.
        """
        self.link.alive()
        self.assertEqual(self.transport.value(), b"alive\n")
        self.link.connectionLost(Failure(ConnectionDone()))
        self.link.alive()
        self.assertEqual(self.transport.value(), b"alive\n")

    def test_supervisorGone(self) -> None:
        """
        When stdin closes, the claims waiting fail, later claims fail at
        once, and C{onLost} is called.
        """
        waiting = self.link.claim("192.0.2.1", 20)
        self.link.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(waiting, ConnectionLost)
        self.failureResultOf(self.link.claim("192.0.2.1", 20), ConnectionLost)
        self.assertEqual(self.lost, [True])
        self.link.release("192.0.2.1")
        self.assertEqual(self.transport.value(), b"claim 1 192.0.2.1 20\n")

    def test_metricsReports(self) -> None:
        """
        L{MetricsReporter} sends the increments of the counters since its
        last report and the sessions open now, one C{metrics} line each
        time something changed, and nothing otherwise.
        """
        totals = {"pop3gw_logins": {"pop3": 0.0, "submission": 0.0}}
        sessions = {"pop3": 0}
        reporter = MetricsReporter(lambda: totals, lambda: dict(sessions), self.link)
        reporter.report()
        totals["pop3gw_logins"]["pop3"] = 2.0
        sessions["pop3"] = 1
        reporter.report()
        reporter.report()
        totals["pop3gw_logins"]["pop3"] = 3.0
        reporter.report()
        sessions["pop3"] = 0
        reporter.report()
        self.assertEqual(
            self.transport.value().splitlines(),
            [
                b'metrics {"counts":{},"sessions":{"pop3":0}}',
                b'metrics {"counts":{"pop3gw_logins":{"pop3":2}},"sessions":{"pop3":1}}',
                b'metrics {"counts":{"pop3gw_logins":{"pop3":1}},"sessions":{"pop3":1}}',
                b'metrics {"counts":{},"sessions":{"pop3":0}}',
            ],
        )

    def test_toldToStop(self) -> None:
        """
        A C{stop} line from the supervisor calls C{onStop}.
        """
        stopped: list = []
        self.link.onStop = lambda: stopped.append(True)
        self.link.dataReceived(b"stop\n")
        self.assertEqual(stopped, [True])

    def test_unexpectedLine(self) -> None:
        """
        A line that answers no claim is logged as an error and ignored.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.link.dataReceived(b"grant 7 1\nhello\n")
        self.assertEqual(
            [formatEvent(e) for e in events if e.get("log_namespace") == "pop3gw.worker"],
            ["worker: unexpected line from the supervisor (9 bytes)", "worker: unexpected line from the supervisor (5 bytes)"],
        )

    def test_sharedCounts(self) -> None:
        """
        L{SharedPeerCounts} counts a granted claim locally and passes its
        release on; a refused claim is not counted.
        """
        counts = SharedPeerCounts(self.link)
        granted = counts.claim("192.0.2.1", 2)
        refused = counts.claim("192.0.2.1", 2)
        self.link.dataReceived(b"grant 1 1\ngrant 2 0\n")
        self.assertEqual((self.successResultOf(granted), self.successResultOf(refused)), (True, False))
        self.assertEqual(counts.get("192.0.2.1"), 1)
        counts.release("192.0.2.1")
        self.assertEqual(counts.get("192.0.2.1"), 0)
        self.assertTrue(self.transport.value().endswith(b"release 192.0.2.1\n"))


class SetupTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        """
        The setup line carries the whole configuration and the listeners,
        as one line.
        """
        config = buildConfig({"data-dir": "/srv/mail", "domain": ["example.org"], "postmaster": "boss@example.org", "workers": "2"})
        setup = WorkerSetup(config, 2, (InheritedListener("pop3", "tcp:110", 4, socket.AF_INET),))
        line = encodeSetup(setup)
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(decodeSetup(line), setup)

    def test_notASetup(self) -> None:
        """
        A line that is not a setup is refused.
        """
        import base64
        import pickle

        self.assertRaises(ValueError, decodeSetup, base64.b64encode(pickle.dumps({"x": 1})))


class LogLineTests(SynchronousTestCase):
    """
    L{encodeLogEvent} and L{decodeLogLine}: a worker's log events as lines.
    """

    def test_roundTrip(self) -> None:
        """
        The supervisor's copy of an event formats as the worker's did, with
        the suffix; braces in the text stay literal.
        """
        events: list = []
        Logger(namespace="pop3gw.smtp.SubmissionServer", observer=events.append).info("login: user={user}", user='"a{0}b"')
        copy = decodeLogLine(encodeLogEvent(events[0]), " (worker 1)")
        self.assertEqual(formatEventAsClassicLogText(copy), formatEventAsClassicLogText(events[0]).replace("\n", " (worker 1)\n"))
        self.assertEqual(copy["log_level"], LogLevel.info)

    def test_failureAndSystem(self) -> None:
        """
        A failure's traceback is part of the text; an event's own system
        (a legacy C{log.msg} line) is kept.
        """
        failure = Failure(ZeroDivisionError("division by zero"))
        events: list = []
        Logger(namespace="pop3gw.x", observer=events.append).failure("it broke", failure)
        copy = decodeLogLine(encodeLogEvent(events[0]))
        text = formatEventAsClassicLogText(copy)
        self.assertIn("[pop3gw.x#critical] it broke\n\tTraceback (most recent call last):", text)
        self.assertIn("ZeroDivisionError", text)
        legacy = decodeLogLine(encodeLogEvent({"log_time": 1.0, "log_system": "-", "log_format": "(TCP Port 1 Closed)"}))
        self.assertEqual(formatEventAsClassicLogText(legacy).split(" ", 1)[1], "[-] (TCP Port 1 Closed)\n")

    def test_notALogLine(self) -> None:
        """
        Anything else is refused.
        """
        for line in (b"hello", b"[1]", b'{"t": 1}', b'{"t": "x", "x": "a"}'):
            self.assertRaises(ValueError, decodeLogLine, line)


class LogTextTests(SynchronousTestCase):
    """
    L{formatLogText}: a worker's log event as the line the supervisor's
    text log would hold.
    """

    def test_asTwistdWritesIt(self) -> None:
        """
        The line is the one C{twistd}'s text log observer writes for the
        same event, with the suffix at the end of the text; braces in
        field values stay literal, and events in one second and the next
        get their own time stamps.
        """
        events: list = []
        log = Logger(namespace="pop3gw.smtp.SubmissionServer", observer=events.append)
        log.info("login: user={user}", user='"a{0}b"')
        log.warn("authentication failed: user={user}", user="x")
        events[1]["log_time"] = events[0]["log_time"] + 1.0
        encode = logTextEncoder(" (worker 2)")
        for event in events + events:
            self.assertEqual(
                encode(event),
                formatEventAsClassicLogText(event).replace("\n", " (worker 2)\n").encode("utf-8"),
            )
        self.assertNotEqual(formatLogText(events[0])[:24], formatLogText(events[1])[:24])

    def test_failureOneLine(self) -> None:
        """
        A failure's traceback is part of the one line, its lines continued
        with a tab as C{twistd} writes them; the suffix ends the first line
        (the one a log reader matches), not a line of its own after the
        traceback.
        """
        events: list = []
        Logger(namespace="pop3gw.x", observer=events.append).failure("it broke", Failure(ZeroDivisionError("no")))
        line = formatLogText(events[0], " (worker 1)")
        self.assertEqual(
            line,
            formatEventAsClassicLogText(events[0]).replace("\n", " (worker 1)\n", 1).encode("utf-8"),
        )
        self.assertIn(b"[pop3gw.x#critical] it broke (worker 1)\n\tTraceback (most recent call last):", line)
        self.assertTrue(line.endswith(b"ZeroDivisionError: no\n\t\n"), line)

    def test_nothingToSay(self) -> None:
        """
        An event without text gives no line.
        """
        self.assertIsNone(formatLogText({"log_time": 1.0}))


class LogLineWriterTests(SynchronousTestCase):
    """
    L{LogLineWriter}: a worker's log observer.
    """

    def event(self, text: str) -> dict:
        events: list = []
        Logger(namespace="pop3gw.x", observer=events.append).info(text)
        return events[0]

    def test_gatheredPerTurn(self) -> None:
        """
        With a schedule, the lines of one turn are written together, once,
        when the scheduled flush runs; the next line schedules again.
        """
        written: list = []
        scheduled: list = []
        writer = LogLineWriter(written.append, scheduled.append)
        writer(self.event("one"))
        writer(self.event("two"))
        self.assertEqual((written, len(scheduled)), ([], 1))
        scheduled.pop()()
        [data] = written
        self.assertEqual([decodeLogLine(line)["log_format"] for line in data.splitlines()], ["one", "two"])
        writer(self.event("three"))
        self.assertEqual(len(scheduled), 1)

    def test_atOnceWithoutSchedule(self) -> None:
        """
        Without a schedule (the reactor is not running), each line is
        written at once, after any gathered before.
        """
        written: list = []
        scheduled: list = []
        writer = LogLineWriter(written.append, scheduled.append)
        writer(self.event("one"))
        writer.schedule = None
        writer(self.event("two"))
        self.assertEqual([decodeLogLine(line)["log_format"] for line in b"".join(written).splitlines()], ["one", "two"])
        self.assertEqual(len(written), 1)

    def test_encodedAsGiven(self) -> None:
        """
        The writer encodes each event with the function it is given (the
        text lines of L{formatLogText}); an event that gives no line adds
        nothing.
        """
        written: list = []
        writer = LogLineWriter(written.append, encode=logTextEncoder(" (worker 1)"))
        writer(self.event("one"))
        writer({"log_time": 1.0})
        self.assertEqual(len(written), 1)
        self.assertTrue(written[0].endswith(b"[pop3gw.x#info] one (worker 1)\n"), written)


class SetupLineTests(SynchronousTestCase):
    def test_restKept(self) -> None:
        """
        The worker reads its setup line alone from stdin; what the
        supervisor wrote after it (a C{stop}) is returned for the link.
        """
        import os

        from pop3gw.worker import readSetupLine

        r, w = os.pipe()
        self.addCleanup(os.close, r)
        os.write(w, b"c2V0dXA=\nstop\n")
        os.close(w)
        self.assertEqual(readSetupLine(r), (b"c2V0dXA=\n", b"stop\n"))


class WorkerSignalTests(SynchronousTestCase):
    def test_reloadIgnoredWhileStarting(self) -> None:
        """
        A worker ignores SIGHUP from its first moment, so a reload the
        supervisor passes on while the worker starts does not end it.
        """
        import signal

        from pop3gw.worker import ignoreReloadUntilReady

        previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        ignoreReloadUntilReady()
        self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_IGN)
