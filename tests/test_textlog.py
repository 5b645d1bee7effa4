"""
L{pop3gw.textlog}: the text log of a server in one process, written once
per reactor turn.
"""

from __future__ import annotations

import io
from typing import Callable

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, LogPublisher, textFileLogObserver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pop3gw import events as pop3gwEvents
from pop3gw.textlog import TextLogService, TurnLogObserver, findTextObserver


class RecordingFile(io.StringIO):
    """
    A text file that records each C{write} and C{flush} call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def write(self, text: str) -> int:
        self.calls.append(("write", text))
        return super().write(text)

    def flush(self) -> None:
        self.calls.append(("flush",))
        super().flush()


class ThreadReactor(MemoryReactorClock):
    """
    A memory reactor whose C{callFromThread} calls are kept for the test
    to run.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fromThreads: list = []

    def callFromThread(self, f: Callable, *args) -> None:
        self.fromThreads.append((f, args))


def events() -> list:
    """
    A few events as the server logs them: plain, with a system, with
    braces, non-ASCII text and a failure's traceback.
    """
    out: list = []
    log = Logger(namespace="pop3gw.smtp.SubmissionServer", observer=out.append)
    log.info("login: service=submission rhost=127.0.0.1 user={user}", user='"u1@example.org"')
    log.info("literal {{braces}} and \u00e9t\u00e9")
    log.warn("two\nlines")
    log.failure("it broke", Failure(ZeroDivisionError("division by zero")))
    pop3gwEvents.loginSucceeded(log, "submission", "u1@example.org", "127.0.0.1", False)
    pop3gwEvents.loginSucceeded(log, "submission", "{u2}@example.org", "127.0.0.1", True)
    pop3gwEvents.loggedOut(log, "submission", "été@example.org", "::1", messages=1, bytes=10)
    out.append({"log_format": "with a system", "log_system": "pop3gw-dns", "log_time": 1700000000.5})
    out.append({"log_format": "no level, no namespace", "log_time": 1700000000.5})
    out.append({"log_format": "no time", "log_namespace": "pop3gw.x", "log_level": LogLevel.error})
    out.append({"log_format": b"a bytes format", "log_time": 1700000000.5})
    out.append({"log_format": "", "log_time": 1700000000.5})
    out[0]["log_time"] = out[1]["log_time"] = 1700000000.999
    return out


class TurnLogObserverTests(SynchronousTestCase):
    def writeBoth(self, twisted, ours):
        """
        Log L{events} through Twisted's text file observer to C{twisted}
        and through a L{TurnLogObserver} to C{ours}, and assert that both
        files hold the same.

        @return: C{ours}.
        """
        original = textFileLogObserver(twisted)
        observer = TurnLogObserver(ours, None)
        for event in events():
            original(dict(event))
            observer(dict(event))
        self.assertEqual(ours.getvalue(), twisted.getvalue())
        return ours

    def test_sameLinesAsTwisted(self) -> None:
        """
        Every event is written as the very line Twisted's text file
        observer writes for it (time stamp, system, text, a traceback's
        lines continued with a tab); an event without text writes nothing.
        """
        ours = self.writeBoth(io.StringIO(), io.StringIO())
        self.assertIn("\n\tTraceback (most recent call last):\n\tFailure: builtins.ZeroDivisionError: division by zero\n", ours.getvalue())

    def test_binaryFile(self) -> None:
        """
        To a binary file the lines are written as UTF-8, as Twisted's
        observer writes them.
        """
        self.writeBoth(io.BytesIO(), io.BytesIO())

    def test_oneWritePerTurn(self) -> None:
        """
        With a schedule, the lines logged before the scheduled flush runs
        are written by one C{write} and one C{flush}; only the first line
        of a batch asks for a flush.
        """
        out = RecordingFile()
        scheduled: list = []
        observer = TurnLogObserver(out, scheduled.append)
        log = Logger(namespace="pop3gw.x", observer=observer)
        log.info("one")
        log.info("two")
        self.assertEqual((out.calls, len(scheduled)), ([], 1))
        scheduled.pop()()
        self.assertEqual([c[0] for c in out.calls], ["write", "flush"])
        self.assertEqual([line.split(" ", 1)[1] for line in out.getvalue().splitlines()], ["[pop3gw.x#info] one", "[pop3gw.x#info] two"])
        log.info("three")
        self.assertEqual(len(scheduled), 1)

    def test_failedWriteDropped(self) -> None:
        """
        A batch the file refuses (a full disk) is dropped, as Twisted's
        observer loses its lines then: the flush raises nothing (into the
        reactor, whose error would be logged, flushed and fail again) and
        asks for no other; the next line is written when the file takes
        it again.
        """

        class FullFile(RecordingFile):
            full = True

            def write(self, text: str) -> int:
                if self.full:
                    raise OSError(28, "No space left on device")
                return super().write(text)

        out = FullFile()
        scheduled: list = []
        observer = TurnLogObserver(out, scheduled.append)
        log = Logger(namespace="pop3gw.x", observer=observer)
        log.info("lost")
        scheduled.pop()()
        self.assertEqual((out.getvalue(), scheduled), ("", []))
        out.full = False
        log.info("kept")
        scheduled.pop()()
        self.assertEqual([line.split(" ", 1)[1] for line in out.getvalue().splitlines()], ["[pop3gw.x#info] kept"])

    def test_stopWritesAtOnce(self) -> None:
        """
        L{TurnLogObserver.stop} writes the gathered lines; later lines are
        written at once.
        """
        out = RecordingFile()
        scheduled: list = []
        observer = TurnLogObserver(out, scheduled.append)
        log = Logger(namespace="pop3gw.x", observer=observer)
        log.info("one")
        observer.stop()
        self.assertEqual(out.getvalue().count("\n"), 1)
        log.info("two")
        self.assertEqual(out.getvalue().count("\n"), 2)
        self.assertEqual(len(scheduled), 1)


class TextLogServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = RecordingFile()
        self.original = textFileLogObserver(self.out)
        self.publisher = LogPublisher(self.original)
        self.reactor = ThreadReactor()
        self.log = Logger(namespace="pop3gw.x", observer=self.publisher)

    def test_replacedWhileRunning(self) -> None:
        """
        While the service runs, Twisted's text observer is replaced: the
        lines of one turn reach the file by one C{write} and one C{flush}
        when the reactor runs its next calls.  When it stops, the gathered
        lines are written and Twisted's observer is back.
        """
        service = TextLogService(self.reactor, self.publisher)
        service.startService()
        self.assertNotIn(self.original, self.publisher._observers)
        self.log.info("one")
        self.log.info("two")
        self.assertEqual(self.out.calls, [])
        self.reactor.advance(0)
        self.assertEqual([c[0] for c in self.out.calls], ["write", "flush"])
        self.assertEqual(self.out.getvalue().count("\n"), 2)
        self.log.info("three")
        service.stopService()
        self.assertEqual(self.publisher._observers, [self.original])
        self.assertEqual(self.out.getvalue().count("\n"), 3)
        self.log.info("four")
        self.assertEqual(self.out.getvalue().count("\n"), 4)
        self.assertEqual(self.reactor.fromThreads, [])

    def test_fromAnotherThread(self) -> None:
        """
        A line logged from another thread asks the reactor for the flush
        through C{callFromThread}.
        """
        import threading

        service = TextLogService(self.reactor, self.publisher)
        service.startService()
        thread = threading.Thread(target=self.log.info, args=("from a thread",))
        thread.start()
        thread.join()
        self.assertEqual((self.out.calls, len(self.reactor.fromThreads), self.reactor.getDelayedCalls()), ([], 1, []))
        f, args = self.reactor.fromThreads.pop()
        f(*args)
        self.assertIn("[pop3gw.x#info] from a thread\n", self.out.getvalue())
        service.stopService()

    def test_otherFormatKept(self) -> None:
        """
        A text observer with another time format, or none at all (syslog),
        is left as it is.
        """
        other = textFileLogObserver(io.StringIO(), timeFormat="%H:%M")
        publisher = LogPublisher(other)
        service = TextLogService(self.reactor, publisher)
        service.startService()
        self.assertEqual(publisher._observers, [other])
        service.stopService()
        self.assertIsNone(findTextObserver(LogPublisher(lambda event: None)))
        self.assertIsNone(findTextObserver(LogPublisher(self.original, textFileLogObserver(io.StringIO()))))
