# -*- test-case-name: tests.test_supervisor -*-
"""
C{--workers N}: the supervisor's side.  The C{twistd} process binds every
listener, holds the data directory's lock and runs the outbound queue;
N worker processes (L{pop3gw.worker}) serve the listeners' connections.
L{WorkerPool} starts them, restarts one that exits (after a delay that
grows while it keeps exiting soon after starting), forwards signals to
them, writes their log lines to its log, keeps the per-address connection
counts of all of them (L{pop3gw.limits.PeerTokens}) and hands queued
messages to the relay.  The channel is described in L{pop3gw.workerlink}.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import (
    FileLogObserver,
    InvalidLogLevelError,
    Logger,
    LogLevel,
    globalLogPublisher,
)
from twisted.python.failure import Failure

from pop3gw.limits import PeerTokens
from pop3gw.workerlink import CONTROL_FD, decodeLogLine, formatLogText

log = Logger(namespace="pop3gw.supervisor")

#: Delay before restarting a worker that exited soon after starting; it
#: doubles with each such exit in a row, up to L{MAX_RESTART_DELAY}.
RESTART_DELAY = 1.0
#: The longest delay before a restart.
MAX_RESTART_DELAY = 60.0
#: A worker that ran at least this long is restarted at once when it
#: exits, and its count of quick exits starts again.
STABLE_AFTER = 30.0
#: Seconds workers have to stop once told to before they are killed.
STOP_TIMEOUT = 30.0
#: Longest line kept from a worker's output; the rest of it is dropped.
MAX_LINE = 256 * 1024
#: A worker that has said nothing on its control channel for this many
#: seconds is taken as hung and killed (it says C{alive} every
#: L{pop3gw.workerlink.ALIVE_INTERVAL} seconds from its event loop), then
#: replaced like any worker that ended: its sessions are lost anyway, and
#: the maildrop locks they hold are released with the process.
ALIVE_TIMEOUT = 60.0
#: Seconds between two looks at when each worker was last heard from.
WATCH_INTERVAL = 5.0


class WorkerProcess(ProcessProtocol):
    """
    One worker process, as the supervisor sees it: splits its output into
    lines for the L{WorkerPool}.

    @ivar number: the worker's number, 1 to N; a restarted worker keeps
        its predecessor's.
    @ivar started: when it was started (the pool's clock).
    """

    def __init__(self, pool: "WorkerPool", number: int, setup: bytes, started: float) -> None:
        self.pool = pool
        self.number = number
        self.setup = setup
        self.started = started
        self.pid: Optional[int] = None
        self.ended = False
        self.stopAsked = False
        #: When the worker last said something on its control channel.
        self.heard = started
        self._buffers: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid if self.transport is not None else None
        assert self.transport is not None
        self.transport.write(self.setup)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1 and self.pool.logWrite is not None:
            self._logText(data)
            return
        buffer = self._buffers.get(childFD, b"") + data
        *lines, rest = buffer.split(b"\n")
        if len(rest) > MAX_LINE:
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            self.pool.workerLine(self, childFD, line)

    def _logText(self, data: bytes) -> None:
        """
        Write the whole lines of the worker's log text to the log as they
        are, keeping the last line's start until its end comes.
        """
        rest = self._buffers.pop(1, b"")
        if rest:
            data = rest + data
        end = data.rfind(b"\n") + 1
        if end:
            self.pool.logWrite(data[:end])  # type: ignore[misc]
        if end < len(data) and len(data) - end <= MAX_LINE:
            self._buffers[1] = data[end:]

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        for childFD, rest in sorted(self._buffers.items()):
            if not rest:
                continue
            if childFD == 1 and self.pool.logWrite is not None:
                self.pool.logWrite(rest + b"\n")
            else:
                self.pool.workerLine(self, childFD, rest)
        self._buffers.clear()
        self.pool.workerEnded(self, reason)

    def stop(self) -> None:
        """
        Tell the worker to stop (a C{stop} line on its stdin): it stops as a
        single server does on SIGTERM, and is not replaced.
        """
        self.stopAsked = True
        self.answer(b"stop\n")

    def answer(self, line: bytes) -> None:
        """
        Write one line to the worker's stdin.
        """
        if not self.ended and self.transport is not None:
            self.transport.write(line)

    def signal(self, name: str) -> None:
        """
        Send the signal C{name} (C{"TERM"}, C{"HUP"}, C{"KILL"}) unless the
        worker has ended.
        """
        if self.ended or self.transport is None:
            return
        try:
            self.transport.signalProcess(name)
        except OSError:
            pass
        except Exception:  # ProcessExitedAlready: it is ending
            pass


def describeExit(reason: Failure) -> str:
    """
    How a worker ended, for the log: C{exit status 3}, C{signal 9}.
    """
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exit status 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"signal {value.signal}"
        return f"exit status {value.exitCode}"
    return str(value)


#: An event formatted both by the supervisor's text log observer and by
#: L{formatLogText}: the workers may write their lines themselves only if
#: the two agree.
_PROBE = {
    "log_time": 1700000000.25,
    "log_format": "probe {x}",
    "x": "{}",
    "log_namespace": "pop3gw.supervisor",
    "log_level": LogLevel.info,
}


def textLogWriter(publisher=globalLogPublisher) -> Optional[Callable[[bytes], None]]:
    """
    Where the workers' log lines can be written as they are: the file of
    the one text log observer of C{publisher} (C{twistd}'s, for
    C{--logfile FILE} or C{--logfile -}), if it formats events as
    L{formatLogText} does.

    @return: a function writing whole lines (UTF-8) to that file, or
        C{None} if there is no such observer (C{--syslog}, C{--logger}).
    """
    observers = [o for o in getattr(publisher, "_observers", ()) if isinstance(o, FileLogObserver)]
    if len(observers) != 1:
        return None
    [observer] = observers
    out = getattr(observer, "_outFile", None)
    if out is None or observer.formatEvent(dict(_PROBE)) != (formatLogText(dict(_PROBE)) or b"").decode("utf-8"):
        return None

    def write(data: bytes) -> None:
        out.write(data.decode("utf-8", "replace"))
        out.flush()

    return write


class WorkerPool(Service):
    """
    Keeps C{count} workers running.

    @param spawn: starts one worker: C{spawn(processProtocol)}, where the
        protocol is a L{WorkerProcess} (the server passes
        C{reactor.spawnProcess} with the listening sockets; tests a fake).
    @param setup: C{setup(number)} is the first line written to worker
        C{number}'s stdin (L{pop3gw.workerlink.encodeSetup}).
    @param clock: the C{IReactorTime} for restart delays.
    @param onQueued: called with a queue id a worker reports.
    @param onWorkerEnded: called after any worker ended, once the pool has
        forgotten its connections (the server rescans the queue then: a
        worker that died may have queued a message without reporting it).
    @param publisher: where the workers' log events go.
    @param onMetrics: called with a worker's number and each report of
        its metrics (a dict, see L{pop3gw.workerlink.MetricsReporter}),
        and with the number and C{None} when that worker ended.
    @param logWrite: if not C{None}, the workers write their log events
        as the lines of the log (L{formatLogText}), and their whole lines
        are passed to C{logWrite} as they are (see L{textLogWriter});
        otherwise each line is an event (L{decodeLogLine}) published to
        C{publisher}.
    @param findLogWrite: if given, called when the pool starts (once the
        log has begun) for its C{logWrite} (the server passes
        L{textLogWriter}).
    @param aliveTimeout: seconds of silence after which a worker is
        killed as hung (L{ALIVE_TIMEOUT}); C{None}: workers are not
        watched.
    """

    stopStage = 0  # stops with the listeners (see pop3gw.service)

    def __init__(
        self,
        count: int,
        spawn: Callable[[WorkerProcess], object],
        setup: Callable[[int], bytes],
        clock,
        onQueued: Callable[[str], object] = lambda queueId: None,
        onWorkerEnded: Callable[[], object] = lambda: None,
        publisher: Callable[[dict], None] = globalLogPublisher,
        onMetrics: Callable[[int, Optional[dict]], object] = lambda number, report: None,
        logWrite: Optional[Callable[[bytes], None]] = None,
        findLogWrite: Optional[Callable[[], Optional[Callable[[bytes], None]]]] = None,
        aliveTimeout: Optional[float] = ALIVE_TIMEOUT,
    ) -> None:
        self.logWrite = logWrite
        self.aliveTimeout = aliveTimeout
        self._watch: Optional[LoopingCall] = None
        self.findLogWrite = findLogWrite
        self.count = count
        self.spawn = spawn
        self.setup = setup
        self.clock = clock
        self.onQueued = onQueued
        self.onWorkerEnded = onWorkerEnded
        self.publisher = publisher
        self.onMetrics = onMetrics
        self.tokens = PeerTokens()
        self.workers: dict[int, WorkerProcess] = {}
        self._quickExits: dict[int, int] = {}
        self._restarts: dict[int, object] = {}
        self._stopping = False
        self._stopped: Optional[defer.Deferred] = None

    # -- life ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        if self.findLogWrite is not None:
            self.logWrite = self.findLogWrite()
        for number in range(1, self.count + 1):
            self._start(number)
        if self.aliveTimeout is not None:
            self._watch = LoopingCall(self._watchWorkers)
            self._watch.clock = self.clock
            self._watch.start(WATCH_INTERVAL, now=False)

    def _watchWorkers(self) -> None:
        """
        Kill every worker not heard from for L{aliveTimeout} seconds: its
        event loop is stuck (or it was stopped with SIGSTOP).
        """
        assert self.aliveTimeout is not None
        now = self.clock.seconds()
        for worker in self._alive():
            silent = now - worker.heard
            if silent >= self.aliveTimeout and not worker.stopAsked:
                log.error(
                    "worker {number} (pid {pid}) has not answered for {seconds:.0f} s; killing it",
                    number=worker.number,
                    pid=worker.pid,
                    seconds=silent,
                )
                worker.heard = now
                worker.signal("KILL")

    def _start(self, number: int) -> None:
        self._restarts.pop(number, None)
        worker = WorkerProcess(self, number, self.setup(number), self.clock.seconds())
        self.workers[number] = worker
        try:
            self.spawn(worker)
        except Exception:
            log.failure("worker {number}: cannot start", number=number)
            worker.ended = True
            self._scheduleRestart(worker)
            return
        log.info("worker {number} started (pid {pid})", number=number, pid=worker.pid)

    def workerEnded(self, worker: WorkerProcess, reason: Failure) -> None:
        """
        A worker process ended: forget its connections, then restart it
        (unless stopping).
        """
        self.tokens.dropOwner(worker)
        if self.workers.get(worker.number) is worker:
            self.onMetrics(worker.number, None)
            if self._stopping or worker.stopAsked:
                del self.workers[worker.number]
            else:
                # Exit status 0 without a stop from here: a SIGTERM from
                # someone else.  It is replaced (an operator who stops a
                # worker by hand expects it back), after RESTART_DELAY:
                # systemd's default KillMode signals every process of the
                # unit, and the supervisor's own SIGTERM, which cancels
                # the restart, may be handled after the worker's.
                clean = isinstance(reason.value, ProcessDone)
                self._scheduleRestart(worker, describeExit(reason), RESTART_DELAY if clean else 0.0)
        try:
            self.onWorkerEnded()
        except Exception:
            log.failure("after worker {number} ended", number=worker.number)
        if self._stopping and self._stopped is not None and not self._alive():
            d, self._stopped = self._stopped, None
            d.callback(None)

    def _scheduleRestart(self, worker: WorkerProcess, how: str = "did not start", least: float = 0.0) -> None:
        number = worker.number
        if self.clock.seconds() - worker.started >= STABLE_AFTER:
            self._quickExits[number] = 0
        quick = self._quickExits.get(number, 0)
        delay = 0.0 if quick == 0 else min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (quick - 1))
        delay = max(delay, least)
        self._quickExits[number] = quick + 1
        log.warn(
            "worker {number} (pid {pid}) ended ({how}); restarting it in {delay:g} s",
            number=number,
            pid=worker.pid,
            how=how,
            delay=delay,
        )
        self._restarts[number] = self.clock.callLater(delay, self._start, number)

    def _alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if not w.ended]

    def signalAll(self, name: str) -> None:
        """
        Send the signal C{name} to every running worker.
        """
        for worker in self._alive():
            worker.signal(name)

    def stopService(self) -> defer.Deferred:
        """
        Tell every worker to stop (they finish what is in progress, as a
        single server does on SIGTERM), and kill those still running after
        L{STOP_TIMEOUT} seconds.

        @return: a Deferred firing once every worker has ended.
        """
        super().stopService()
        self._stopping = True
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self._watch = None
        for call in self._restarts.values():
            if call.active():  # type: ignore[attr-defined]
                call.cancel()  # type: ignore[attr-defined]
        self._restarts.clear()
        if not self._alive():
            return defer.succeed(None)
        self._stopped = defer.Deferred()
        for worker in self._alive():
            worker.stop()
        killer = self.clock.callLater(STOP_TIMEOUT, self._kill)

        def done(result: object) -> object:
            if killer.active():
                killer.cancel()
            return result

        return self._stopped.addBoth(done)

    def _kill(self) -> None:
        for worker in self._alive():
            log.warn("worker {number} (pid {pid}) did not stop; killing it", number=worker.number, pid=worker.pid)
            worker.signal("KILL")

    # -- what workers say ------------------------------------------------

    def workerLine(self, worker: WorkerProcess, childFD: int, line: bytes) -> None:
        """
        One line from C{worker}'s descriptor C{childFD}.
        """
        if childFD == 1:
            self._logEvent(worker, line)
        elif childFD == CONTROL_FD:
            self._control(worker, line)
        elif line.strip():
            log.warn(
                "worker {number} (pid {pid}): {line}",
                number=worker.number,
                pid=worker.pid,
                line=line.decode("utf-8", "replace").rstrip(),
            )

    def _logEvent(self, worker: WorkerProcess, line: bytes) -> None:
        try:
            event = decodeLogLine(line, f" (worker {worker.number})")
        except (ValueError, TypeError, KeyError, InvalidLogLevelError):
            if line.strip():
                log.info(
                    "worker {number} (pid {pid}): {line}",
                    number=worker.number,
                    pid=worker.pid,
                    line=line.decode("utf-8", "replace").rstrip(),
                )
            return
        event["pop3gw_worker"] = worker.number
        self.publisher(event)

    def _control(self, worker: WorkerProcess, line: bytes) -> None:
        worker.heard = self.clock.seconds()
        parts = line.split()
        if parts == [b"alive"]:
            return
        try:
            if parts[0] == b"claim" and len(parts) == 4:
                granted = self.tokens.acquire(worker, parts[2].decode("ascii"), int(parts[3]))
                worker.answer(b"grant %s %d\n" % (parts[1], granted))
                return
            if parts[0] == b"release" and len(parts) == 2:
                self.tokens.release(worker, parts[1].decode("ascii"))
                return
            if parts[0] == b"queued" and len(parts) == 2:
                self.onQueued(parts[1].decode("ascii"))
                return
            if parts[0] == b"metrics" and len(parts) == 2:
                report = json.loads(parts[1])
                if isinstance(report, dict):
                    self.onMetrics(worker.number, report)
                    return
        except (IndexError, ValueError):
            pass
        log.error("worker {number} (pid {pid}): unexpected control line ({size} bytes)", number=worker.number, pid=worker.pid, size=len(line))

