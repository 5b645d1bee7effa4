"""
L{pop3gw.supervisor.WorkerPool}: starting, restarting (with a growing
delay), stopping and listening to worker processes, driven by a fake
process spawner and a L{task.Clock}.
"""

from __future__ import annotations

import io

from twisted.internet import task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import (
    Logger,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.supervisor import (
    ALIVE_TIMEOUT,
    MAX_RESTART_DELAY,
    STOP_TIMEOUT,
    WATCH_INTERVAL,
    WorkerPool,
    WorkerProcess,
    textLogWriter,
)
from pop3gw.workerlink import CONTROL_FD, encodeLogEvent, formatLogText


class FakeProcessTransport:
    """
    The transport of a spawned worker: records what is written and the
    signals sent.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: list[bytes] = []
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


def crashed(signum: int = 9) -> Failure:
    return Failure(ProcessTerminated(None, signum, None))


class WorkerPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.spawned: list[WorkerProcess] = []
        self.events: list[dict] = []
        self.queued: list[str] = []
        self.reports: list = []
        self.endings: list[int] = []
        self.nextPid = 100
        self.pool = WorkerPool(
            2,
            self.spawn,
            lambda number: b"setup %d\n" % (number,),
            self.clock,
            onQueued=self.queued.append,
            onWorkerEnded=lambda: self.endings.append(len(self.endings)),
            publisher=self.events.append,
            onMetrics=lambda number, report: self.reports.append((number, report)),
            aliveTimeout=None,
        )
        self.logged: list[str] = []

        def observe(event: dict) -> None:
            if event.get("log_namespace") == "pop3gw.supervisor":
                self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def spawn(self, worker: WorkerProcess) -> None:
        self.nextPid += 1
        worker.makeConnection(FakeProcessTransport(self.nextPid))
        self.spawned.append(worker)

    def test_startsEveryWorker(self) -> None:
        """
        Starting the pool starts N workers, numbered 1 to N; each gets its
        setup line on stdin first, and its start is logged with its pid.
        """
        self.pool.startService()
        self.assertEqual([(w.number, w.pid) for w in self.spawned], [(1, 101), (2, 102)])
        self.assertEqual([w.transport.written for w in self.spawned], [[b"setup 1\n"], [b"setup 2\n"]])
        self.assertEqual(self.logged, ["worker 1 started (pid 101)", "worker 2 started (pid 102)"])

    def test_hungWorkerKilledAndReplaced(self) -> None:
        """
        A worker that says nothing on its control channel (not even the
        C{alive} line it sends every few seconds) for L{ALIVE_TIMEOUT}
        seconds is killed with SIGKILL, with one log line, and replaced
        once it has ended; one that keeps saying C{alive} is left alone,
        and so is a worker told to stop.
        """
        self.pool.aliveTimeout = ALIVE_TIMEOUT
        self.pool.startService()
        first, second = self.spawned
        for _ in range(int(ALIVE_TIMEOUT / WATCH_INTERVAL)):
            self.pool.workerLine(first, CONTROL_FD, b"alive")
            self.clock.advance(WATCH_INTERVAL)
        self.assertEqual((first.transport.signals, second.transport.signals), ([], ["KILL"]))
        self.assertIn(f"worker 2 (pid 102) has not answered for {ALIVE_TIMEOUT:.0f} s; killing it", self.logged)
        second.processEnded(crashed())
        self.clock.advance(0)
        self.assertEqual([(w.number, w.pid) for w in self.spawned], [(1, 101), (2, 102), (2, 103)])
        self.pool.stopService()
        self.clock.advance(ALIVE_TIMEOUT * 2)
        self.assertEqual(len([line for line in self.logged if "has not answered" in line]), 1)

    def test_crashedWorkerRestartedWithGrowingDelay(self) -> None:
        """
        A worker that ends after running a long time is restarted at once
        under the same number; one that keeps ending soon after starting
        waits 1, 2, 4, ... seconds, at most L{MAX_RESTART_DELAY}, so a crash
        loop does not spin.  Every ending is logged with how it ended.
        """
        self.pool.startService()
        self.clock.advance(100)
        self.spawned[0].processEnded(crashed())
        self.clock.advance(0)
        self.assertEqual([(w.number, w.pid) for w in self.spawned], [(1, 101), (2, 102), (1, 103)])
        self.assertEqual(self.logged[-2:], ["worker 1 (pid 101) ended (signal 9); restarting it in 0 s", "worker 1 started (pid 103)"])
        delays = []
        for _ in range(9):
            self.spawned[-1].processEnded(Failure(ProcessTerminated(3)))
            before = len(self.spawned)
            waited = 0.0
            while len(self.spawned) == before:
                self.clock.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, MAX_RESTART_DELAY, MAX_RESTART_DELAY, MAX_RESTART_DELAY])
        self.assertIn("worker 1 (pid 103) ended (exit status 3); restarting it in 1 s", self.logged)
        self.assertEqual(self.pool.workers[2].pid, 102)

    def test_stableRunResetsTheDelay(self) -> None:
        """
        After a restarted worker has run for a while, its next ending is
        restarted at once again.
        """
        self.pool.startService()
        self.spawned[0].processEnded(crashed())
        self.clock.advance(0)
        self.spawned[-1].processEnded(crashed())
        self.clock.advance(1)
        self.assertEqual(len(self.spawned), 4)
        self.clock.advance(60)
        self.spawned[-1].processEnded(crashed())
        self.clock.advance(0)
        self.assertEqual(len(self.spawned), 5)

    def test_stopTerminatesAndWaits(self) -> None:
        """
        Stopping tells every worker to stop (a C{stop} line on its stdin,
        no signal) and fires once all have ended; none is restarted.  One
        still running after L{STOP_TIMEOUT} seconds is killed.
        """
        self.pool.startService()
        d = self.pool.stopService()
        self.assertEqual([w.transport.written[-1:] for w in self.spawned], [[b"stop\n"], [b"stop\n"]])
        self.assertEqual([w.transport.signals for w in self.spawned], [[], []])
        self.spawned[0].processEnded(Failure(ProcessDone(0)))
        self.assertNoResult(d)
        self.clock.advance(STOP_TIMEOUT)
        self.assertEqual(self.spawned[1].transport.signals, ["KILL"])
        self.spawned[1].processEnded(crashed())
        self.successResultOf(d)
        self.clock.advance(100)
        self.assertEqual(len(self.spawned), 2)

    def test_signalledByOthersReplaced(self) -> None:
        """
        A worker that exits 0 without being told to stop (a SIGTERM from
        someone else: an operator) is replaced, after C{RESTART_DELAY},
        even when it had run long.
        """
        self.pool.startService()
        self.clock.advance(100)
        self.spawned[0].processEnded(Failure(ProcessDone(0)))
        self.assertIn("worker 1 (pid 101) ended (exit status 0); restarting it in 1 s", self.logged)
        self.clock.advance(0.5)
        self.assertEqual(len(self.spawned), 2)
        self.clock.advance(0.5)
        self.assertEqual([(w.number, w.pid) for w in self.spawned], [(1, 101), (2, 102), (1, 103)])

    def test_stopWithEveryProcessSignalled(self) -> None:
        """
        When the whole service is stopped by signalling every process
        (systemd's default KillMode), a worker that ends on its own SIGTERM
        just before the supervisor handles its own is not replaced.
        """
        self.pool.startService()
        self.clock.advance(100)
        self.spawned[0].processEnded(Failure(ProcessDone(0)))
        self.clock.advance(0.1)
        d = self.pool.stopService()
        self.assertEqual(self.spawned[1].transport.written[-1:], [b"stop\n"])
        self.spawned[1].processEnded(Failure(ProcessDone(0)))
        self.successResultOf(d)
        self.clock.advance(100)
        self.assertEqual(len(self.spawned), 2)

    def test_toldToStopNotReplaced(self) -> None:
        """
        A worker the supervisor told to stop is not replaced when it ends,
        even while the pool runs on.
        """
        self.pool.startService()
        self.spawned[0].stop()
        self.spawned[0].processEnded(Failure(ProcessDone(0)))
        self.clock.advance(100)
        self.assertEqual(len(self.spawned), 2)
        self.assertNotIn(1, self.pool.workers)

    def test_stopCancelsRestart(self) -> None:
        """
        A restart waiting for its delay does not happen once stopping.
        """
        self.pool.startService()
        self.spawned[0].processEnded(crashed())
        self.clock.advance(0)
        self.spawned[2].processEnded(crashed())
        d = self.pool.stopService()
        self.spawned[1].processEnded(Failure(ProcessDone(0)))
        self.successResultOf(d)
        self.clock.advance(100)
        self.assertEqual(len(self.spawned), 3)

    def test_signalAll(self) -> None:
        """
        A signal is passed on to each running worker, not to ended ones.
        """
        self.pool.startService()
        self.spawned[1].processEnded(crashed())
        self.pool.signalAll("HUP")
        self.assertEqual([w.transport.signals for w in self.spawned], [["HUP"], []])

    def test_claimsAcrossWorkers(self) -> None:
        """
        Claims for one client network count over all workers; a release
        frees a slot; the claims of a worker that ended are dropped.
        """
        self.pool.startService()
        one, two = self.spawned
        one.childDataReceived(3, b"claim 1 192.0.2.1 2\nclaim 2 192.0.2.1 2\n")
        two.childDataReceived(3, b"claim 1 192.0.2.1 2\n")
        self.assertEqual(one.transport.written[1:], [b"grant 1 1\n", b"grant 2 1\n"])
        self.assertEqual(two.transport.written[1:], [b"grant 1 0\n"])
        one.childDataReceived(3, b"release 192.0.2.1\n")
        two.childDataReceived(3, b"claim 2 192.0.2.1 2\nclaim 3 192.0.2.1 2\n")
        self.assertEqual(two.transport.written[2:], [b"grant 2 1\n", b"grant 3 0\n"])
        one.processEnded(crashed())
        two.childDataReceived(3, b"claim 4 192.0.2.1 2\n")
        self.assertEqual(two.transport.written[4:], [b"grant 4 1\n"])

    def test_queuedAndEnded(self) -> None:
        """
        A queued message a worker reports is passed on; the end of a worker
        is passed on too (after its claims are dropped).
        """
        self.pool.startService()
        self.spawned[0].childDataReceived(3, b"queued 0005f0e1a2b3c-0a1b2c3d\n")
        self.assertEqual(self.queued, ["0005f0e1a2b3c-0a1b2c3d"])
        self.spawned[0].processEnded(crashed())
        self.assertEqual(self.endings, [0])

    def test_metricsReported(self) -> None:
        """
        A worker's C{metrics} report is passed on with its number; when it
        ends, its end is passed on too (its sessions are gone).  A report
        that is not JSON is a bad control line.
        """
        self.pool.startService()
        self.spawned[1].childDataReceived(3, b'metrics {"counts":{"pop3gw_logins":{"pop3":2}},"sessions":{"pop3":1}}\n')
        self.spawned[1].childDataReceived(3, b"metrics {nope\n")
        self.spawned[1].processEnded(crashed())
        self.assertEqual(self.reports, [(2, {"counts": {"pop3gw_logins": {"pop3": 2}}, "sessions": {"pop3": 1}}), (2, None)])
        self.assertEqual(len([line for line in self.logged if "unexpected control line" in line]), 1)

    def test_badControlLine(self) -> None:
        """
        A control line the supervisor does not know is logged as an error
        (its size, not its text) and changes nothing.
        """
        self.pool.startService()
        self.spawned[0].childDataReceived(3, b"claim x\nfrobnicate\n")
        self.assertEqual(self.spawned[0].transport.written, [b"setup 1\n"])
        self.assertEqual(len([line for line in self.logged if "unexpected control line" in line]), 2)

    def test_logEvents(self) -> None:
        """
        A worker's log events (lines of L{encodeLogEvent} on its stdout,
        possibly split across reads) are published with the worker's number
        added to the text, keeping their namespace and level; other stdout
        and stderr lines are logged as text.
        """
        self.pool.startService()
        events: list = []
        Logger(namespace="pop3gw.pop3.POP3Server", observer=events.append).warn(
            "authentication failed: service={service} rhost={peer} user={user}", service="pop3", peer="192.0.2.7", user='"x{y}"'
        )
        line = encodeLogEvent(events[0])
        self.spawned[1].childDataReceived(1, line[:10])
        self.assertEqual(self.events, [])
        self.spawned[1].childDataReceived(1, line[10:] + b"not json\n")
        self.spawned[1].childDataReceived(2, b"Traceback (most recent call last):\n")
        self.assertEqual(
            [formatEventAsClassicLogText(e).split(" ", 1)[1] for e in self.events],
            ['[pop3gw.pop3.POP3Server#warn] authentication failed: service=pop3 rhost=192.0.2.7 user="x{y}" (worker 2)\n'],
        )
        self.assertEqual((self.events[0]["log_time"], self.events[0]["pop3gw_worker"]), (events[0]["log_time"], 2))
        self.assertEqual(self.logged[-2:], ["worker 2 (pid 102): not json", "worker 2 (pid 102): Traceback (most recent call last):"])

    def test_unfinishedLineAtEnd(self) -> None:
        """
        The last line of a worker's stderr without a line end is logged when
        the worker ends.
        """
        self.pool.startService()
        self.spawned[0].childDataReceived(2, b"MemoryError")
        self.spawned[0].processEnded(crashed())
        self.assertIn("worker 1 (pid 101): MemoryError", self.logged)


class TextLogTests(SynchronousTestCase):
    """
    Workers' log lines written as they are to the supervisor's text log.
    """

    def setUp(self) -> None:
        self.written: list[bytes] = []
        self.events: list[dict] = []
        self.spawned: list[WorkerProcess] = []
        self.pool = WorkerPool(
            1,
            self.spawn,
            lambda number: b"setup\n",
            task.Clock(),
            publisher=self.events.append,
            logWrite=self.written.append,
            aliveTimeout=None,
        )

    def spawn(self, worker: WorkerProcess) -> None:
        worker.makeConnection(FakeProcessTransport(101))
        self.spawned.append(worker)

    def test_wholeLinesAsTheyAre(self) -> None:
        """
        What a worker writes to its stdout reaches the log as it is, whole
        lines only, all the whole lines of one read in one write; nothing
        is published as an event.  A last line without its end is written
        with one when the worker ends.
        """
        self.pool.startService()
        worker = self.spawned[0]
        worker.childDataReceived(1, b"2026-12-02T02:00:00+0000 [x#info] one (worker 1)\n2026-12-02T02:00:00+0000 [x#in")
        worker.childDataReceived(1, b"fo] two (worker 1)\nthree (wor")
        worker.childDataReceived(1, b"ker 1)\nfour\n")
        worker.childDataReceived(1, b"five")
        self.assertEqual(
            self.written,
            [
                b"2026-12-02T02:00:00+0000 [x#info] one (worker 1)\n",
                b"2026-12-02T02:00:00+0000 [x#info] two (worker 1)\n",
                b"three (worker 1)\nfour\n",
            ],
        )
        worker.processEnded(crashed())
        self.assertEqual(self.written[3:], [b"five\n"])
        self.assertEqual([e for e in self.events if e.get("log_namespace") != "pop3gw.supervisor"], [])

    def test_findsTwistdTextLog(self) -> None:
        """
        L{textLogWriter} finds the one text log observer of a publisher
        that formats events as the workers do, and writes to its file;
        with none, two, or one of another time format, there is none to
        write to (the workers' events are then published one by one).
        """
        out = io.StringIO()
        publisher = LogPublisher(self.events.append, textFileLogObserver(out))
        write = textLogWriter(publisher)
        assert write is not None
        events: list = []
        Logger(namespace="pop3gw.x", observer=events.append).info("hello")
        line = formatLogText(events[0], " (worker 1)")
        assert line is not None
        write(line)
        self.assertEqual(out.getvalue(), formatEventAsClassicLogText(events[0]).replace("\n", " (worker 1)\n"))
        self.assertIsNone(textLogWriter(LogPublisher(self.events.append)))
        self.assertIsNone(textLogWriter(LogPublisher(textFileLogObserver(io.StringIO()), textFileLogObserver(io.StringIO()))))
        self.assertIsNone(textLogWriter(LogPublisher(textFileLogObserver(io.StringIO(), timeFormat="%H:%M"))))
