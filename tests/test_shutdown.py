# -*- test-case-name: tests.test_shutdown -*-
"""
Shutdown order (L{pop3gw.service.ServerLockService.stopService}): the
listeners stop first, then the services (the relay), then the thread pools,
each pool only once the work in flight on it has reported.
"""

from __future__ import annotations

import os
import re

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.maildir import MaildirStore
from pop3gw.relay.service import RelayService
from pop3gw.runner import ThreadPoolRunner, drainTogether
from pop3gw.service import STOP_LISTENERS, ServerLockService, ThreadPoolService
from pop3gw.testing import HeldThreadPool
from tests.queuehelpers import (
    ALICE,
    BOB,
    BODY,
    GREETING,
    TRACE,
    FakeEndpoint,
    FakeResolver,
    QueueTestMixin,
    ThreadClock,
    readJSON,
)
from tests.test_smtp import SessionMixin
from tests.test_smtplmtp import MESSAGE, RCPT_OK, SENDER_OK, START_DATA, TEMPFAIL, LMTPTestsMixin


class RecordingPool(HeldThreadPool):
    """
    A L{HeldThreadPool} that records when it is started and stopped.
    """

    def __init__(self, events: list, onStop=lambda: None) -> None:
        super().__init__()
        self.events = events
        self.onStop = onStop

    def start(self) -> None:
        self.events.append("pool started")

    def stop(self) -> None:
        self.onStop()
        self.events.append("pool stopped")


class RecordingService(Service):
    """
    A part that records its stop and stops when the test says so.
    """

    def __init__(self, name: str, events: list, stopStage=None) -> None:
        self.name = name
        self.events = events
        self.stopped: defer.Deferred = defer.Deferred()
        if stopStage is not None:
            self.stopStage = stopStage

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self.events.append(f"{self.name} stopping")
        return self.stopped


class ShutdownOrderTests(SynchronousTestCase):
    """
    The parts of the server stop in stages.
    """

    def test_poolsStopLast(self) -> None:
        """
        The listeners stop first; the other services only once every
        listener has stopped; the pools only once those have; the server
        lock is released at the end.
        """
        events: list = []
        top = ServerLockService(os.path.abspath(self.mktemp()))
        os.makedirs(top.dataDir)
        ThreadPoolService(RecordingPool(events)).setServiceParent(top)
        listener = RecordingService("listener", events, STOP_LISTENERS)
        listener.setServiceParent(top)
        relay = RecordingService("relay", events)
        relay.setServiceParent(top)
        top.startService()
        self.assertEqual(events, ["pool started"])
        d = top.stopService()
        self.assertEqual(events, ["pool started", "listener stopping"])
        listener.stopped.callback(None)
        self.assertEqual(events, ["pool started", "listener stopping", "relay stopping"])
        self.assertIsNotNone(top._lockFD)
        relay.stopped.callback(None)
        self.successResultOf(d)
        self.assertEqual(events, ["pool started", "listener stopping", "relay stopping", "pool stopped"])
        self.assertIsNone(top._lockFD)


class SubmissionCommitAtShutdownTests(SessionMixin, SynchronousTestCase):
    """
    A submission commit in flight at shutdown is answered before the pool
    stops.
    """

    def test_commitAnsweredBeforePoolStops(self) -> None:
        """
        The end of data was received and the message is being stored in the
        pool when the server stops: the pool stops only after the client
        got its C{250}.
        """
        from tests.queuehelpers import ThreadClock

        reactor = ThreadClock()
        events: list = []
        pool = RecordingPool(events, lambda: events.append(("client got", self.transport.value())))
        runner = ThreadPoolRunner(reactor, pool)
        self.router.store = MaildirStore(self.mktemp(), runner, hostname="testhost")
        self.login()
        self.envelope()
        self.assertEqual(self.feed(b"Subject: x\r\n\r\nhi\r\n.\r\n"), b"")
        self.assertNotEqual(pool.pending, [])

        top = ServerLockService(os.path.abspath(self.mktemp()))
        os.makedirs(top.dataDir)
        ThreadPoolService(pool, runner).setServiceParent(top)
        top.startService()
        d = top.stopService()
        self.assertNoResult(d)
        self.assertEqual(events, ["pool started"])
        pool.runAll()
        reactor.advance(0)
        self.successResultOf(d)
        self.assertEqual(len(events), 3)
        self.assertEqual(events[2], "pool stopped")
        label, sent = events[1]
        self.assertEqual(label, "client got")
        self.assertTrue(sent.startswith(b"250 2.0.0 "), sent)


class NextTurnReactor(Clock):
    """
    A clock whose C{callFromThread} calls run on the reactor's next turn
    (L{runThreadCalls}), as a real reactor's do: after the timed calls of
    the turn under way.
    """

    def __init__(self) -> None:
        super().__init__()
        self.threadCalls: list = []

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.threadCalls.append((f, args, kwargs))

    def runThreadCalls(self) -> None:
        calls, self.threadCalls = self.threadCalls, []
        for f, args, kwargs in calls:
            f(*args, **kwargs)


class StoppingPool(RecordingPool):
    """
    A L{RecordingPool} whose C{stop} runs the jobs still queued first, as
    L{pop3gw.runner.IOThreadPool.stop} does (their results reach the
    reactor on a later turn).
    """

    def stop(self) -> None:
        self.runAll()
        super().stop()


class EndOfDataWhileStoppingTests(SessionMixin, SynchronousTestCase):
    """
    A message whose end of data arrives while the I/O pool stops is either
    stored and acknowledged before the connections close, or refused and
    not stored: never stored without its C{250}.
    """

    def test_endOfDataAfterDrainRefused(self) -> None:
        """
        Two sessions: A's end of data is being stored when the server
        stops; B's arrives on the reactor turn on which A's commit has
        reported, so the drain has found the pool idle but the pool has not
        stopped yet.  A gets its C{250} and B a C{451} before the pool stops
        (the connections close right after), and only A's message is
        stored.  Before, B's commit was queued, run by the stopping pool,
        and its C{250} written only after the connections had closed: a
        message stored whose client would send it again.
        """
        reactor = NextTurnReactor()
        events: list = []
        pool = StoppingPool(events, lambda: events.append(("clients got", a.value(), b.value())))
        runner = ThreadPoolRunner(reactor, pool)
        store = MaildirStore(self.mktemp(), runner, hostname="testhost")
        self.router.store = store
        self.login()
        self.envelope()
        a = self.transport
        self.assertEqual(self.feed(b"Subject: a\r\n\r\nhi\r\n.\r\n"), b"")
        self.proto = None
        self.login()
        self.envelope()
        b = self.transport
        self.assertEqual(self.feed(b"Subject: b\r\n\r\nhi\r\n"), b"")

        top = ServerLockService(os.path.abspath(self.mktemp()))
        os.makedirs(top.dataDir)
        ThreadPoolService(pool, runner).setServiceParent(top)
        top.startService()
        d = top.stopService()
        pool.runAll()
        reactor.runThreadCalls()
        self.proto.dataReceived(b".\r\n")
        reactor.advance(0)
        reactor.runThreadCalls()
        self.successResultOf(d)
        label, gotA, gotB = events[1]
        self.assertEqual(label, "clients got")
        self.assertTrue(gotA.startswith(b"250 2.0.0 OK queued as "), gotA)
        self.assertEqual(gotB, b"451 4.3.0 Temporary failure, try again later\r\n")
        self.assertEqual(events[2], "pool stopped")
        self.assertEqual(b.value(), gotB)
        stored = []
        for sub in ("new", "cur"):
            folder = os.path.join(store.root, "example.org", "bob", sub)
            for name in os.listdir(folder) if os.path.isdir(folder) else []:
                with open(os.path.join(folder, name), "rb") as f:
                    stored.append(re.search(rb"^Subject: (.*?)\r?$", f.read(), re.M).group(1))
        self.assertEqual(stored, [b"a"])

class LoginAtShutdownTests(SessionMixin, SynchronousTestCase):
    """
    A login whose password check is in flight when the server stops is
    answered before the connections close; one started later is refused
    with a temporary failure.
    """

    def setUpChecker(self, verifier=None):
        """
        Log in through a L{PasswordChecker} whose checks run in a held
        hash pool, as the server's do.

        @return: the hash pool, its runner and the clock.
        """
        from twisted.cred.portal import Portal

        from pop3gw.auth import PasswordChecker
        from pop3gw.users import UsersFile
        from tests.test_auth import DUMMY, HASH_PASSWORD

        clock = NextTurnReactor()
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"alice@example.org:{HASH_PASSWORD}\n")
        hashPool = HeldThreadPool()
        hashRunner = ThreadPoolRunner(clock, hashPool)
        checker = PasswordChecker(
            UsersFile(path), clock, hashPool, 2.0, runner=hashRunner, dummy=lambda: DUMMY, verifier=verifier or (lambda stored, password: password == b"password")
        )
        self.portal = Portal(self.realm, [checker])
        self.clock = clock
        return hashPool, hashRunner, clock

    def stopWith(self, hashPool, hashRunner, events):
        top = ServerLockService(os.path.abspath(self.mktemp()))
        os.makedirs(top.dataDir)
        ioPool = RecordingPool(events)
        ThreadPoolService(ioPool, ThreadPoolRunner(self.clock, ioPool)).setServiceParent(top)
        ThreadPoolService(hashPool, hashRunner).setServiceParent(top)
        top.startService()
        return top.stopService()

    def test_checkInFlightAnswered(self) -> None:
        """
        The check of AUTH PLAIN is running in the hash pool when the server
        stops: the pools stop only once the client has its C{235}; AUTH on
        another connection afterwards (a password the cache cannot
        confirm) gets C{454} at once, and no check is started for it.
        """
        from tests.test_smtp import plain

        hashPool, hashRunner, clock = self.setUpChecker()
        events: list = []
        hashPool.start = hashPool.stop = lambda: None
        self.connect()
        self.assertEqual(self.feed(b"EHLO client.example\r\n")[:4], b"250-")
        self.assertEqual(self.feed(b"AUTH PLAIN " + plain(b"", b"alice@example.org", b"password") + b"\r\n"), b"")
        first = self.transport
        d = self.stopWith(hashPool, hashRunner, events)
        self.assertEqual(events, ["pool started"])
        hashPool.runAll()
        clock.runThreadCalls()
        self.assertEqual(first.value(), b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(events, ["pool started"])
        clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(events, ["pool started", "pool stopped"])
        self.connect()
        self.feed(b"EHLO client.example\r\n")
        self.assertEqual(
            self.feed(b"AUTH PLAIN " + plain(b"", b"alice@example.org", b"other") + b"\r\n"),
            b"454 4.7.0 Temporary authentication failure\r\n",
        )
        self.assertEqual(hashPool.pending, [])
        self.flushLoggedErrors()

    def test_delayedFailureAnswered(self) -> None:
        """
        A wrong password whose failure is being delayed when the server
        stops: the pools stop once the C{535} has been written, not before
        (the connections would close without it).
        """
        from tests.test_smtp import plain

        hashPool, hashRunner, clock = self.setUpChecker()
        events: list = []
        hashPool.start = hashPool.stop = lambda: None
        self.connect()
        self.feed(b"EHLO client.example\r\n")
        self.assertEqual(self.feed(b"AUTH PLAIN " + plain(b"", b"alice@example.org", b"wrong") + b"\r\n"), b"")
        hashPool.runAll()
        clock.runThreadCalls()
        self.assertEqual(self.transport.value(), b"")
        d = self.stopWith(hashPool, hashRunner, events)
        clock.advance(1)
        self.assertNoResult(d)
        self.assertEqual(events, ["pool started"])
        clock.advance(1)
        self.assertEqual(self.transport.value(), b"535 5.7.8 Authentication credentials invalid\r\n")
        clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(events, ["pool started", "pool stopped"])


class RelayAttemptAtShutdownTests(QueueTestMixin, SynchronousTestCase):
    """
    A relay attempt in flight at shutdown is recorded before the pool
    stops.
    """

    def test_attemptRecordedBeforePoolStops(self) -> None:
        """
        The relay aborts the session in progress; the deferral is written
        to the entry (through the pool, which is still running) before the
        pool stops, and the stop does not wait for the grace period.
        """
        events: list = []
        connects: list = []
        pool = RecordingPool(events)
        self.setUpQueue(pool)
        relay = RelayService(
            self.queue,
            self.clock,
            "mx.example.org",
            lambda sender, data: defer.succeed(None),
            resolver=FakeResolver(mx={"remote.example": [(10, "mx.remote.example")]}),
            endpointFactory=lambda host, port: FakeEndpoint(host, port, connects),
        )
        top = ServerLockService(os.path.abspath(self.mktemp()))
        os.makedirs(top.dataDir)
        ThreadPoolService(pool, self.queue.runner).setServiceParent(top)
        relay.setServiceParent(top)
        top.startService()
        delivery = self.queue.beginDelivery(ALICE, [BOB], TRACE)
        delivery.write(BODY)
        committed = delivery.commit()
        pool.runAll()
        self.successResultOf(committed)
        self.clock.advance(0)
        pool.runAll()
        [endpoint] = connects
        endpoint.open()
        endpoint.feed(GREETING)
        [entry] = relay.entries.values()

        d = top.stopService()
        self.assertTrue(endpoint.transport.disconnected)
        endpoint.close()
        self.assertEqual(events, ["pool started"])
        pool.runAll()
        self.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(events, ["pool started", "pool stopped"])
        recorded = readJSON(self.root, entry.queueId)
        self.assertEqual(recorded["recipients"][0]["state"], "pending")
        self.assertIn("mx.remote.example", recorded["lastError"])


class ProcessPoolServiceTests(SynchronousTestCase):
    def test_drainThenStop(self) -> None:
        """
        L{ProcessPoolService} stops its runner's pool only once the work in
        flight (a message being signed) has reported, so that commit is
        answered.
        """
        from pop3gw.runner import ProcessPoolRunner
        from pop3gw.service import STOP_POOLS, ProcessPoolService
        from tests.queuehelpers import ThreadClock
        from tests.test_runner import _HeldExecutor

        executor = _HeldExecutor()
        clock = ThreadClock()
        runner = ProcessPoolRunner(clock, executorFactory=lambda: executor)
        service = ProcessPoolService(runner)
        self.assertEqual(service.stopStage, STOP_POOLS)
        service.startService()
        signed = runner.run(len, b"message")
        stopped = service.stopService()
        clock.advance(0)
        self.assertNoResult(stopped)
        self.assertEqual(executor.shutdowns, [])
        executor.runAll()
        self.assertEqual(self.successResultOf(signed), 7)
        clock.advance(0)
        self.successResultOf(stopped)
        self.assertEqual(executor.shutdowns, [False])


class LMTPAfterStopTests(LMTPTestsMixin, SynchronousTestCase):
    """
    An LMTP end of data (or BDAT LAST) that arrives once the stopping
    server's runners are closed is refused for every recipient, and
    nothing is stored, the same for all of them.
    """

    def setUp(self) -> None:
        super().setUp()
        self.pool = HeldThreadPool()
        self.runner = ThreadPoolRunner(ThreadClock(), self.pool)
        self.store = MaildirStore(self.mktemp(), self.runner, hostname="testhost")
        self.router.store = self.store
        self.feed(b"LHLO mta.example.org\r\n")

    def assertNothingStored(self) -> None:
        for user in ("alice", "bob"):
            folder = os.path.join(self.store.root, "example.org", user, "new")
            self.assertEqual(os.listdir(folder) if os.path.isdir(folder) else [], [], user)
        self.assertEqual(self.pool.pending, [])

    def test_dataRefusedPerRecipient(self) -> None:
        """
        DATA with two recipients, its end arriving after the drain closed
        the runner: two C{451} replies, no maildrop holds the message.
        """
        self.successResultOf(drainTogether([self.runner]))
        out = self.feed(
            b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
            b"DATA\r\n" + MESSAGE + b".\r\n"
        )
        self.assertEqual(out, SENDER_OK + RCPT_OK * 2 + START_DATA + TEMPFAIL * 2)
        self.assertNothingStored()
        self.flushLoggedErrors()

    def test_lastChunkRefusedPerRecipient(self) -> None:
        """
        BDAT LAST with two recipients after the drain closed the runner:
        two C{451} replies, nothing stored.
        """
        self.successResultOf(drainTogether([self.runner]))
        out = self.feed(
            b"MAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
            b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE
        )
        self.assertEqual(out, SENDER_OK + RCPT_OK * 2 + TEMPFAIL * 2)
        self.assertNothingStored()
