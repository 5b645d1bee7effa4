# -*- test-case-name: tests.test_workerlink -*-
"""
The channel between the supervisor and one worker process (C{--workers N}
with N > 1; see L{pop3gw.supervisor}).

The supervisor starts each worker with these descriptors:

  - 0, the worker's stdin: first one line, the L{WorkerSetup} (a base64
    pickle: the configuration and which listening sockets the worker
    got), then the supervisor's answers (C{grant ID 1|0}).  Its end of
    file means the supervisor is gone: the worker stops.  C{stop} tells
    the worker to stop (the supervisor is stopping it).
  - 1, stdout: the worker's log events, one line each.  When the
    supervisor logs to a text file or stream (C{twistd}'s own text log
    observer: C{--logfile FILE}, C{--logfile -}), each is the very line
    that log holds (L{formatLogText}), which the supervisor writes out as
    it is, whole lines only (L{WorkerSetup.logText}); otherwise (C{--syslog},
    C{--logger}) a JSON object with the event's text already formatted
    (L{encodeLogEvent}), which the supervisor logs as its own event
    (L{decodeLogLine}).
  - 2, stderr: text (a crash's traceback), logged by the supervisor.
  - 3: the worker's requests and notices, one line each:
    C{claim ID KEY LIMIT} (one more connection from client network KEY,
    if it has fewer than LIMIT over all workers), C{release KEY} (one of
    them closed), C{queued QUEUEID} (a message was queued for relay),
    C{metrics JSON} (with C{--metrics}: the worker's counter increments
    and open sessions, L{MetricsReporter}), C{alive} (every
    L{ALIVE_INTERVAL} seconds from the worker's event loop: a worker
    silent for L{pop3gw.supervisor.ALIVE_TIMEOUT} seconds is killed).
  - 4 and up: the listening sockets, in the order of
    L{WorkerSetup.listeners}.
"""

from __future__ import annotations

import base64
import json
import pickle
import threading
from abc import ABC, abstractmethod
from typing import Any, Callable, Optional

import attr
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.logger import ILogObserver, Logger, LogLevel, eventAsText, formatTime
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from pop3gw.limits import PeerCounts

log = Logger(namespace="pop3gw.worker")

#: The worker's descriptor for its requests and notices.
CONTROL_FD = 3
#: The worker's descriptor of its first listening socket.
FIRST_LISTENER_FD = 4
#: Seconds between two reports of a worker's metrics (C{--metrics}) to
#: the supervisor.
METRICS_INTERVAL = 1.0
#: Seconds between two C{alive} lines of a worker (see
#: L{pop3gw.supervisor.ALIVE_TIMEOUT}).
ALIVE_INTERVAL = 5.0


@attr.s(frozen=True, auto_attribs=True)
class InheritedListener:
    """
    One listening socket a worker gets from the supervisor.

    @ivar name: the listener (C{pop3}, C{submission}, ...).
    @ivar description: its endpoint description, for log lines.
    @ivar fd: the descriptor number in the worker.
    @ivar family: the socket's address family (C{socket.AF_INET}, ...).
    @ivar mode: a Unix socket's file permissions, as the supervisor set
        them; C{None} for other sockets.
    """

    name: str
    description: str
    fd: int
    family: int
    mode: Optional[int] = None


@attr.s(frozen=True, auto_attribs=True)
class WorkerSetup:
    """
    What a worker is told at start: the configuration (a
    L{pop3gw.config.Config}), its number (1 to N) and its listeners.

    @ivar logText: whether the worker writes its log events as the lines
        of the supervisor's text log (L{formatLogText}); if not, as
        L{encodeLogEvent} records.
    """

    config: object
    number: int
    listeners: tuple
    logText: bool = False


def encodeSetup(setup: WorkerSetup) -> bytes:
    """
    @return: C{setup} as the first line of a worker's stdin.
    """
    return base64.b64encode(pickle.dumps(setup)) + b"\n"


def decodeSetup(line: bytes) -> WorkerSetup:
    """
    @return: the L{WorkerSetup} of the line written by L{encodeSetup}.
    """
    setup = pickle.loads(base64.b64decode(line.strip()))
    if not isinstance(setup, WorkerSetup):
        raise ValueError("not a worker setup")
    return setup


def encodeLogEvent(event: dict) -> bytes:
    """
    One log event of a worker as the line it writes to its stdout: the
    time, level, namespace, system (if the event has one) and the text
    (a failure's traceback included), formatted here, so the supervisor
    only writes it out.
    """
    level = event.get("log_level")
    record = {
        "t": event.get("log_time"),
        "l": getattr(level, "name", "info"),
        "n": event.get("log_namespace"),
        "x": eventAsText(event, includeTimestamp=False, includeSystem=False),
    }
    if "log_system" in event:
        record["s"] = str(event["log_system"])
    return json.dumps(record).encode("utf-8") + b"\n"


class _TimeStamps:
    """
    The time stamps of C{twistd}'s text log (C{formatTime}, to the second),
    each made once per second: formatting a time zone aware time costs more
    than the rest of a log line.  Safe from any thread (the last stamp is
    kept as one tuple).
    """

    def __init__(self) -> None:
        self._last: tuple = (None, "-")

    def __call__(self, when: Optional[float]) -> str:
        if when is None:
            return formatTime(when)
        second = int(when // 1)
        last = self._last
        if last[0] != second:
            last = self._last = (second, formatTime(second))
        return last[1]


def formatLogText(event: dict, suffix: str = "", stamps: Optional[_TimeStamps] = None) -> Optional[bytes]:
    """
    One log event of a worker as the line C{twistd}'s text log observer
    (C{textFileLogObserver}, RFC 3339 time stamps) would write for it, with
    C{suffix} at the end of its first line: C{time [namespace#level] text
    suffix}, a traceback's lines following, continued with a tab.

    @param stamps: where the time stamps come from (one per writer, made
        once per second); by default each is made anew.
    @return: the line (UTF-8, ending in a newline), or C{None} if the
        event has no text.
    """
    text = eventAsText(event, formatTime=stamps if stamps is not None else formatTime)
    if not text:
        return None
    return (withSuffix(text, suffix).replace("\n", "\n\t") + "\n").encode("utf-8")


def withSuffix(text: str, suffix: str) -> str:
    """
    C{text} with C{suffix} at the end of its first line (a traceback's
    lines follow it, as they are).

    >>> withSuffix("it broke\\nTraceback...\\nError: no\\n", " (worker 1)")
    'it broke (worker 1)\\nTraceback...\\nError: no\\n'
    """
    first, newline, rest = text.partition("\n")
    return first + suffix + newline + rest


def logTextEncoder(suffix: str) -> Callable[[dict], Optional[bytes]]:
    """
    @return: the C{encode} of a L{LogLineWriter} writing L{formatLogText}
        lines ending in C{suffix}.
    """
    stamps = _TimeStamps()
    return lambda event: formatLogText(event, suffix, stamps)


def decodeLogLine(line: bytes, suffix: str = "") -> dict:
    """
    The log event a line of L{encodeLogEvent} stands for, with C{suffix}
    appended to its text.

    @raise ValueError: the line is not such a record.
    """
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get("x"), str):
        raise ValueError("not a log record")
    text = withSuffix(record["x"], suffix)
    event = {
        "log_time": float(record["t"]),
        "log_level": LogLevel.levelWithName(record.get("l") or "info"),
        "log_namespace": str(record.get("n") or "pop3gw.worker"),
        "log_format": text.replace("{", "{{").replace("}", "}}"),
        "log_source": None,
    }
    if "s" in record:
        event["log_system"] = str(record["s"])
    return event


class TurnBatch(ABC):
    """
    A log observer that gathers the lines of one reactor turn and writes
    them at once: the first line of a batch asks C{schedule} for a
    L{flush}; without a C{schedule} each line is written at once.
    Callable from any thread; the lines keep the order the events came.

    Subclasses give L{line} (an event's line, or nothing) and L{flush}
    (write L{_pending} and empty it, under L{_lock}).

    @ivar schedule: C{schedule(f)} calls C{f} soon (after the current
        reactor turn), from any thread; C{None} while the reactor is not
        running.
    """

    def __init__(self, schedule: Optional[Callable[[Callable[[], None]], object]], lock: Any) -> None:
        self.schedule = schedule
        self._pending: list = []
        self._lock = lock

    @abstractmethod
    def line(self, event: dict) -> Any:
        """
        @return: C{event}'s line, or a false value for none.
        """

    @abstractmethod
    def flush(self) -> None:
        """
        Write the lines gathered so far.
        """

    def __call__(self, event: dict) -> None:
        line = self.line(event)
        if not line:
            return
        with self._lock:
            self._pending.append(line)
            first = len(self._pending) == 1
        schedule = self.schedule
        if schedule is None:
            self.flush()
        elif first:
            schedule(self.flush)


@implementer(ILogObserver)
class LogLineWriter(TurnBatch):
    """
    A worker's log observer: each event as a line (C{encode(event)}, by
    default L{encodeLogEvent}), written by C{write}.  With a C{schedule}, the lines of one reactor turn
    are gathered and written at once (one write, and one read by the
    supervisor, for many lines); without, each is written at once.

    @ivar schedule: C{schedule(f)} calls C{f} soon (after the current
        reactor turn), from any thread; C{None} while the reactor is not
        running.
    """

    def __init__(
        self,
        write: Callable[[bytes], object],
        schedule: Optional[Callable[[Callable[[], None]], object]] = None,
        encode: Callable[[dict], Optional[bytes]] = encodeLogEvent,
    ) -> None:
        super().__init__(schedule, threading.Lock())
        self._write = write
        self._encode = encode

    def line(self, event: dict) -> Optional[bytes]:
        return self._encode(event)

    def flush(self) -> None:
        """
        Write the lines gathered so far.
        """
        with self._lock:
            data = b"".join(self._pending)
            self._pending.clear()
        if data:
            self._write(data)


class WorkerLink(LineOnlyReceiver):
    """
    The worker's end of the channel: asks for per-address connection
    claims and reports queued messages.  Its transport reads the
    supervisor's answers (stdin) and writes to L{CONTROL_FD}.

    @ivar onLost: called when the supervisor is gone (stdin closed).
    @ivar onStop: called when the supervisor tells the worker to stop.
    """

    delimiter = b"\n"

    def __init__(
        self, onLost: Optional[Callable[[], None]] = None, onStop: Optional[Callable[[], None]] = None
    ) -> None:
        self.onLost = onLost
        self.onStop = onStop
        self._next = 0
        self._waiting: dict[int, defer.Deferred] = {}
        self._gone = False

    def claim(self, key: str, limit: int) -> defer.Deferred:
        """
        Ask the supervisor for one more connection from C{key}.

        @return: a Deferred firing with whether it was granted.
        """
        if self._gone or self.transport is None:
            return defer.fail(ConnectionLost("the supervisor is gone"))
        self._next += 1
        d: defer.Deferred = defer.Deferred()
        self._waiting[self._next] = d
        self.transport.write(b"claim %d %s %d\n" % (self._next, key.encode("ascii"), limit))
        return d

    def release(self, key: str) -> None:
        """
        Give back one connection from C{key} granted by L{claim}.
        """
        if not self._gone and self.transport is not None:
            self.transport.write(b"release %s\n" % (key.encode("ascii"),))

    def queued(self, queueId: str) -> None:
        """
        Tell the supervisor (which runs the relay) that C{queueId} was
        queued.
        """
        if not self._gone and self.transport is not None:
            self.transport.write(b"queued %s\n" % (queueId.encode("ascii"),))

    def metrics(self, report: dict) -> None:
        """
        Send the supervisor a report of this worker's metrics (see
        L{MetricsReporter}).
        """
        if not self._gone and self.transport is not None:
            self.transport.write(b"metrics " + json.dumps(report, separators=(",", ":")).encode("utf-8") + b"\n")

    def alive(self) -> None:
        """
        Tell the supervisor that this worker's event loop turns.
        """
        if not self._gone and self.transport is not None:
            self.transport.write(b"alive\n")

    def lineReceived(self, line: bytes) -> None:
        parts = line.split()
        if len(parts) == 3 and parts[0] == b"grant" and parts[1].isdigit():
            d = self._waiting.pop(int(parts[1]), None)
            if d is not None:
                d.callback(parts[2] == b"1")
                return
        if parts == [b"stop"] and self.onStop is not None:
            self.onStop()
            return
        log.error("worker: unexpected line from the supervisor ({size} bytes)", size=len(line))

    def connectionLost(self, reason=None) -> None:
        self._gone = True
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(ConnectionLost("the supervisor is gone"))
        if self.onLost is not None:
            self.onLost()


class SharedPeerCounts(PeerCounts):
    """
    A worker's per-address counts: its own connections are counted here,
    and the per-address cap is decided by the supervisor over every
    worker's connections (through a L{WorkerLink}).
    """

    def __init__(self, link: WorkerLink) -> None:
        super().__init__()
        self.link = link

    def claim(self, host: str, limit: int) -> defer.Deferred:
        def answered(granted: bool) -> bool:
            if granted:
                self.add(host)
            return granted

        return self.link.claim(host, limit).addCallback(answered)

    def release(self, host: str) -> None:
        self.remove(host)
        self.link.release(host)


class MetricsReporter:
    """
    A worker's metrics for the supervisor, which serves C{--metrics}: at
    each L{report}, the increments of the worker's counters
    (L{pop3gw.metrics.Metrics.counterTotals}) since the last report and
    the connections open now per listener, if anything changed.

    @param totals: the worker's counter totals now.
    @param sessions: the worker's open connections per listener now.
    """

    def __init__(self, totals: Callable[[], dict], sessions: Callable[[], dict], link: WorkerLink) -> None:
        self.totals = totals
        self.sessions = sessions
        self.link = link
        self._sent: dict = {}
        self._sessions: Optional[dict] = None

    def report(self) -> None:
        """
        Send what changed since the last report.
        """
        counts: dict = {}
        for name, byLabel in self.totals().items():
            sent = self._sent.setdefault(name, {})
            for label, total in byLabel.items():
                increment = total - sent.get(label, 0)
                if increment > 0:
                    counts.setdefault(name, {})[label] = int(increment) if increment == int(increment) else increment
                    sent[label] = total
        sessions = self.sessions()
        if counts or sessions != self._sessions:
            self._sessions = sessions
            self.link.metrics({"counts": counts, "sessions": sessions})
