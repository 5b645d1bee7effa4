# -*- test-case-name: tests.test_textlog -*-
"""
A cheaper writer of C{twistd}'s text log, for a server in one process.

C{twistd --logfile FILE} (or C{--logfile -}) logs through Twisted's
C{textFileLogObserver}: for every event it formats a time zone aware time
stamp with C{strftime} and does one C{write} and one C{flush} of the file,
a system call per line.  A submission logs three lines (login, the
accepted message, logout) and a POP3 session two, which made Twisted's
observer some 5 % of the reactor thread's time per submission.

While the server runs, L{TextLogService} puts a L{TurnLogObserver} in
that observer's place: the same lines, byte for byte (checked against
the observer it replaces before it does, see L{findTextObserver}), to the
same file (so C{twistd}'s size-based rotation and its C{SIGUSR1} rotation
still apply), with each second's time stamp made once, and the lines of
one reactor turn written together by one C{write} and one C{flush} at the
end of that turn.  When the server stops, the lines gathered so far are
written and Twisted's observer is put back.  With C{--syslog} or
C{--logger} (no text file observer) nothing changes.
"""

from __future__ import annotations

import threading
from typing import IO, Any, Callable, Optional

from twisted.application.service import Service
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    LogPublisher,
    eventAsText,
    globalLogPublisher,
)
from twisted.python.compat import ioType
from zope.interface import implementer

from pop3gw.workerlink import TurnBatch, _TimeStamps

#: Events the observer to be replaced must format exactly as a
#: L{TurnLogObserver} does: one with a field, one with a system and a
#: line break in its text, and one whose format formats as itself (a
#: line break in it too).
_PROBES = (
    {
        "log_time": 1700000000.25,
        "log_format": "probe {x}",
        "x": "{}",
        "log_namespace": "pop3gw.textlog",
        "log_level": LogLevel.info,
    },
    {
        "log_time": 1700000001.75,
        "log_format": "probe\nsecond line",
        "log_system": "probe-system",
        "log_level": LogLevel.warn,
    },
    {
        "log_time": 1700000002.5,
        "log_format": 'probe: rhost=192.0.2.7 user="a"\nsecond line',
        "log_namespace": "pop3gw.textlog",
        "log_level": LogLevel.info,
    },
)


def formatLine(event: dict, stamps: Callable[[Optional[float]], str]) -> Optional[str]:
    """
    C{event} as C{textFileLogObserver} (RFC 3339 time stamps) writes it:
    C{time [namespace#level] text}, further lines (a traceback's)
    continued with a tab, ending in a newline.

    @param stamps: formats a time stamp (a L{_TimeStamps}).
    @return: the line, or C{None} if the event has no text.
    """
    format = event.get("log_format")
    if (
        format
        and type(format) is str
        and "{" not in format
        and "}" not in format
        and "log_system" not in event
        and "log_failure" not in event
        and "log_flattened" not in event
    ):
        # A format that formats as itself (the session and message lines,
        # see L{pop3gw.events.literal}): the line Twisted makes of it, made
        # without parsing the format.
        level = event.get("log_level")
        text = (
            f"{stamps(event.get('log_time'))} [{event.get('log_namespace', '-')}#"
            f"{'-' if level is None else level.name}] {format}"
        )
    else:
        text = eventAsText(event, formatTime=stamps)
    if not text:
        return None
    return text.replace("\n", "\n\t") + "\n"


@implementer(ILogObserver)
class TurnLogObserver(TurnBatch):
    """
    Writes events to C{outFile} as L{formatLine} lines, those of one
    reactor turn at once (see L{TurnBatch}; without a C{schedule}, after
    L{stop}, each line is written at once).

    @ivar schedule: C{schedule(f)} calls C{f} from the reactor thread
        after the current turn (from any thread), or C{None}.
    """

    def __init__(self, outFile: IO[Any], schedule: Optional[Callable[[Callable[[], None]], object]]) -> None:
        # Reentrant: an event logged while the file is written (by whatever
        # the file does) is gathered for the next batch.
        super().__init__(schedule, threading.RLock())
        self._outFile = outFile
        self._encode = ioType(outFile) is not str
        self._stamps = _TimeStamps()

    def line(self, event: dict) -> Optional[str]:
        return formatLine(event, self._stamps)

    def flush(self) -> None:
        """
        Write the lines gathered so far: one C{write}, one C{flush}.  If
        the file refuses them (a full disk), they are dropped.
        """
        with self._lock:
            if not self._pending:
                return
            text = "".join(self._pending)
            self._pending.clear()
            # Written under the lock, so that batches taken by two threads
            # cannot reach the file out of order.
            try:
                self._outFile.write(text.encode("utf-8") if self._encode else text)
                self._outFile.flush()
            except Exception:
                # A full disk: the batch is lost, as Twisted's observer
                # loses its lines then.  Raised into the reactor, the error
                # would be logged, and so flushed and raised again, each turn.
                pass

    def stop(self) -> None:
        """
        Write every line from now on at once, and the gathered ones now.
        """
        self.schedule = None
        self.flush()


def findTextObserver(publisher: LogPublisher) -> Optional[FileLogObserver]:
    """
    The one text file observer of C{publisher} (C{twistd}'s, for
    C{--logfile FILE} or C{--logfile -}), if it formats events exactly as
    L{formatLine} does; else C{None} (no such observer, several, or
    another time format).
    """
    observers = [o for o in getattr(publisher, "_observers", ()) if isinstance(o, FileLogObserver)]
    if len(observers) != 1:
        return None
    [observer] = observers
    if getattr(observer, "_outFile", None) is None:
        return None
    stamps = _TimeStamps()
    for probe in _PROBES:
        if observer.formatEvent(dict(probe)) != formatLine(dict(probe), stamps):
            return None
    return observer


class TextLogService(Service):
    """
    While running, C{twistd}'s text log observer is replaced by a
    L{TurnLogObserver} writing to its file (see the module's docstring).

    @param reactor: runs the flushes (C{callLater}, C{callFromThread});
        the thread that starts the service is taken as its thread.
    @param publisher: where the observers are.
    """

    def __init__(self, reactor: Any, publisher: LogPublisher = globalLogPublisher) -> None:
        self.reactor = reactor
        self.publisher = publisher
        self._replaced: Optional[FileLogObserver] = None
        self.observer: Optional[TurnLogObserver] = None

    def startService(self) -> None:
        super().startService()
        replaced = findTextObserver(self.publisher)
        if replaced is None:
            return
        reactor = self.reactor
        reactorThread = threading.get_ident()

        def soon(f: Callable[[], None]) -> None:
            if threading.get_ident() == reactorThread:
                reactor.callLater(0, f)
            else:
                reactor.callFromThread(f)

        observer = TurnLogObserver(replaced._outFile, soon)
        self._replaced, self.observer = replaced, observer
        _swap(self.publisher, replaced, observer)

    def stopService(self):
        super().stopService()
        replaced, observer = self._replaced, self.observer
        self._replaced = self.observer = None
        if replaced is None or observer is None:
            return
        _swap(self.publisher, observer, replaced)
        observer.stop()


def _swap(publisher: LogPublisher, old: Any, new: Any) -> None:
    """
    Put C{new} in C{old}'s place among C{publisher}'s observers, in one
    step: an event from another thread meanwhile reaches one of them, not
    both or neither.
    """
    observers = publisher._observers
    try:
        observers[observers.index(old)] = new
    except ValueError:
        publisher.addObserver(new)
