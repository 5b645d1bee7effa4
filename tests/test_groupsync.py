"""
Tests for L{pop3gw.groupsync}: group commit of directory C{fsync}s, alone
and under the deliveries of L{pop3gw.maildir.MaildirStore}.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time

from twisted.internet import defer, task
from twisted.internet.address import UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pop3gw import smtplmtp
from pop3gw.address import Address
from pop3gw.groupsync import DirectorySyncer
from pop3gw.interfaces import ServerStopping, TemporaryFailure
from pop3gw.maildir import MaildirStore
from pop3gw.queue import OutboundQueue
from pop3gw.runner import ImmediateRunner, IOThreadPool, ThreadPoolRunner
from pop3gw.testing import FakeUserDatabase, HeldRunner, HeldThreadPool
from tests.queuehelpers import ThreadClock
from tests.test_smtpmx import NoRelayRouter

ALICE = Address.parse("alice@example.org")
BOB = Address.parse("bob@example.org")

#: Seconds a test waits for another thread before it fails (never reached
#: unless something hangs).
WAIT = 30.0


class _FakeFsync:
    """
    Records the directories synced; fails those in C{failing}.
    """

    def __init__(self, failing: frozenset = frozenset()) -> None:
        self.calls: list[str] = []
        self.failing = set(failing)

    def __call__(self, path: str) -> None:
        self.calls.append(path)
        if path in self.failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)


class DirectorySyncerTests(SynchronousTestCase):
    """
    L{DirectorySyncer} gathers the requests made until the runner gets to
    its batch, and those made while a batch is being synced, into one batch.
    """

    def setUp(self) -> None:
        self.runner = HeldRunner()
        self.fsync = _FakeFsync()
        self.syncer = DirectorySyncer(self.runner, self.fsync)

    def test_requestsGatheredIntoOneBatch(self) -> None:
        """
        The first request hands the runner an empty job; the requests made
        before the runner gets to it share one C{fsync} per directory, in
        one job of the runner, and nothing is answered before it ran.
        """
        first = self.syncer.sync(["/d/a/new"])
        self.assertEqual(len(self.runner.jobs), 1)
        second = self.syncer.sync(["/d/a/new", "/d/b/new"])
        third = self.syncer.sync(["/d/a/new"])
        self.assertEqual(len(self.runner.jobs), 1)
        self.runner.runNext()
        self.assertEqual(self.fsync.calls, [])
        self.assertNoResult(first)
        self.runner.runAll()
        self.assertEqual(self.fsync.calls, ["/d/a/new", "/d/b/new"])
        for d in (first, second, third):
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual((self.syncer.batches, self.syncer.fsyncs), (1, 2))

    def test_requestDuringFlightWaitsForNextBatch(self) -> None:
        """
        Requests made while a batch is being synced are not answered by
        that batch (whose C{fsync} may have started before their entries
        were made) but by the next one, which they share.
        """
        first = self.syncer.sync(["/d/a/new"])
        self.runner.runNext()
        second = self.syncer.sync(["/d/a/new"])
        third = self.syncer.sync(["/d/a/new"])
        self.assertEqual(len(self.runner.jobs), 1)
        self.runner.runNext()
        self.assertIsNone(self.successResultOf(first))
        self.assertNoResult(second)
        self.assertEqual(self.fsync.calls, ["/d/a/new"])
        self.runner.runAll()
        self.assertEqual(self.fsync.calls, ["/d/a/new", "/d/a/new"])
        self.assertIsNone(self.successResultOf(second))
        self.assertIsNone(self.successResultOf(third))
        self.assertEqual(self.syncer.batches, 2)

    def test_immediateRunner(self) -> None:
        """
        With a runner that works at once (the CLI), a request is synced at
        once.
        """
        syncer = DirectorySyncer(ImmediateRunner(), self.fsync)
        self.assertIsNone(self.successResultOf(syncer.sync(["/d/a/new"])))
        self.assertEqual(self.fsync.calls, ["/d/a/new"])

    def test_failedFsyncFailsEveryRequestNamingIt(self) -> None:
        """
        When a directory's C{fsync} fails, every request of the batch that
        named it fails with that C{OSError} (none succeeds) and none of
        their C{afterwards} work runs; a request for another directory of
        the batch that synced succeeds and its work runs.
        """
        self.fsync.failing.add("/d/a/new")
        ran = []
        first = self.syncer.sync(["/d/a/new"], lambda: ran.append("first"))
        second = self.syncer.sync(["/d/b/new", "/d/a/new"], lambda: ran.append("second"))
        other = self.syncer.sync(["/d/b/new"], lambda: ran.append("other"))
        self.runner.runAll()
        for d in (first, second):
            self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.EIO)
        self.assertIsNone(self.successResultOf(other))
        self.assertEqual(ran, ["other"])

    def test_stoppedRunnerFailsQuietly(self) -> None:
        """
        A runner that refuses work because the server is stopping fails
        every request of the batch with an C{OSError} (nothing is known to
        be durable), and no traceback is logged: the stop is not a fault.
        """

        class StoppedRunner:
            def run(self, f, *args):
                return defer.fail(ServerStopping("the server is stopping"))

        syncer = DirectorySyncer(StoppedRunner(), self.fsync)
        d = syncer.sync(["/d/a/new"])
        self.failureResultOf(d, OSError)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.fsync.calls, [])

    def test_runnerNeverIdleBetween(self) -> None:
        """
        A batch asked for from the callbacks of the runner's work is handed
        to the runner before that work counts as finished, so the runner's
        C{drain} (at shutdown) waits for the batch too.
        """
        clock = ThreadClock()
        pool = HeldThreadPool()
        runner = ThreadPoolRunner(clock, pool)
        syncer = DirectorySyncer(runner, self.fsync)
        synced = runner.run(lambda: None).addCallback(lambda _: syncer.sync(["/d/a/new"]))
        drained = runner.drain()
        pool.runAll()
        clock.advance(0)
        self.assertEqual(self.fsync.calls, ["/d/a/new"])
        self.assertIsNone(self.successResultOf(synced))
        self.assertIsNone(self.successResultOf(drained))


class _Pump:
    """
    A reactor stand-in for a L{ThreadPoolRunner} over real threads: what
    the pool's threads hand back with C{callFromThread} is run on the
    test's thread by L{runUntil}.
    """

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue = queue.SimpleQueue()

    def callFromThread(self, f, *args) -> None:
        self.calls.put((f, args))

    def runUntil(self, done) -> None:
        """
        Run what the threads handed back until C{done()} is true.
        """
        while not done():
            f, args = self.calls.get(timeout=WAIT)
            f(*args)


def _waitFor(condition) -> None:
    """
    Wait until C{condition()} is true (another thread makes it so); fail
    after L{WAIT} seconds rather than hang.
    """
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("gave up waiting")
        time.sleep(0.001)


class _GatedFsync(_FakeFsync):
    """
    A L{_FakeFsync} whose first call waits until the test sets C{release}
    (C{entered} is set once it waits), and whose calls numbered in
    C{failingCalls} (from 1) fail.
    """

    def __init__(self, failingCalls: frozenset = frozenset()) -> None:
        super().__init__()
        self.failingCalls = failingCalls
        self.entered = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, path: str) -> None:
        with self._lock:
            self.calls.append(path)
            number = len(self.calls)
        if number == 1:
            self.entered.set()
            if not self.release.wait(WAIT):
                raise AssertionError("never released")
        if number in self.failingCalls:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)


class SyncNowTests(SynchronousTestCase):
    """
    L{DirectorySyncer.syncNow}, called in several threads at once: the
    callers arriving while an C{fsync} of their directory runs share the
    next one.
    """

    def setUp(self) -> None:
        self.results: dict = {}
        self.threads: list[threading.Thread] = []

    def call(self, syncer: DirectorySyncer, name: str, paths: list) -> None:
        """
        Call C{syncer.syncNow(paths)} in a new thread; its outcome goes in
        C{self.results[name]}.
        """

        def run() -> None:
            try:
                syncer.syncNow(paths)
            except OSError as e:
                self.results[name] = e
            else:
                self.results[name] = None

        thread = threading.Thread(target=run)
        self.threads.append(thread)
        thread.start()

    def joinAll(self) -> None:
        for thread in self.threads:
            thread.join(WAIT)
            self.assertFalse(thread.is_alive())

    def threeCallers(self, fsync: _GatedFsync) -> DirectorySyncer:
        """
        C{a} syncs C{/d/a/new} (its C{fsync} held), then C{b} and C{c} ask
        for the same directory and wait; then the C{fsync} goes on.
        """
        syncer = DirectorySyncer(ImmediateRunner(), fsync)
        self.call(syncer, "a", ["/d/a/new"])
        self.assertTrue(fsync.entered.wait(WAIT))
        self.call(syncer, "b", ["/d/a/new"])
        self.call(syncer, "c", ["/d/a/new"])
        _waitFor(lambda: syncer.waiting == 2)
        self.assertEqual(fsync.calls, ["/d/a/new"])
        fsync.release.set()
        self.joinAll()
        return syncer

    def test_callersDuringAnFsyncShareTheNext(self) -> None:
        """
        Two callers arriving while the directory's C{fsync} runs are not
        answered by it (it may have started before their entries were
        made) but by one more C{fsync}, which they share.
        """
        fsync = _GatedFsync()
        syncer = self.threeCallers(fsync)
        self.assertEqual(fsync.calls, ["/d/a/new", "/d/a/new"])
        self.assertEqual(self.results, {"a": None, "b": None, "c": None})
        self.assertEqual((syncer.batches, syncer.fsyncs, syncer.waiting), (2, 2, 0))

    def test_failedFsyncFailsEveryCallerOfItsBatch(self) -> None:
        """
        When the C{fsync} two callers share fails, both get its error (and
        neither is told it succeeded); the caller answered by the C{fsync}
        before is not affected.
        """
        fsync = _GatedFsync(failingCalls=frozenset({2}))
        self.threeCallers(fsync)
        self.assertIsNone(self.results["a"])
        for name in ("b", "c"):
            self.assertEqual(self.results[name].errno, errno.EIO)
            self.assertEqual(self.results[name].filename, "/d/a/new")

    def test_otherDirectoryNotHeldUp(self) -> None:
        """
        A caller for another directory syncs it at once, while an
        C{fsync} of the first one runs.
        """
        fsync = _GatedFsync()
        syncer = DirectorySyncer(ImmediateRunner(), fsync)
        self.call(syncer, "a", ["/d/a/new"])
        self.assertTrue(fsync.entered.wait(WAIT))
        syncer.syncNow(["/d/b/new", "/d/b/new"])
        self.assertEqual(fsync.calls, ["/d/a/new", "/d/b/new"])
        fsync.release.set()
        self.joinAll()
        self.assertEqual(self.results, {"a": None})


class GroupCommitDeliveryTests(SynchronousTestCase):
    """
    A delivery of a L{MaildirStore} commits in one job of the runner; the
    deliveries committing while an C{fsync} of their C{new} directory runs
    share the next one, and a failed C{fsync} fails each of them.
    """

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.pump = _Pump()
        pool = IOThreadPool(4, name="test-io")
        pool.start()
        self.addCleanup(pool.stop)
        self.runner = ThreadPoolRunner(self.pump, pool)
        self.store = MaildirStore(self.root, self.runner, "host.example")
        for user in (ALICE, BOB):
            self.store._ensureMaildir(self.store.maildirPath(user))
        self.fsync = _GatedFsync()
        self.store.syncer = DirectorySyncer(self.runner, self.fsync)

    def listing(self, user: Address, subdir: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.store.maildirPath(user), subdir)))

    def commit(self, recipients: list, n: int) -> defer.Deferred:
        delivery = self.store.beginDelivery(recipients)
        delivery.write(b"Subject: %d\r\n\r\nbody\r\n" % (n,))
        return delivery.commit()

    def commitTogether(self, recipients: list) -> list:
        """
        Commit one delivery to C{recipients[0]} and hold its directory
        C{fsync}; commit one delivery per further entry meanwhile, and let
        the C{fsync} go on once they all wait for theirs.
        """
        results = [self.commit(recipients[0], 0)]
        self.assertTrue(self.fsync.entered.wait(WAIT))
        for n, rcpts in enumerate(recipients[1:], 1):
            results.append(self.commit(rcpts, n))
        _waitFor(lambda: self.store.syncer.waiting == len(recipients) - 1)
        self.fsync.release.set()
        pending = list(results)
        self.pump.runUntil(lambda: all(d.called for d in pending))
        return results

    def test_commitIsOneJob(self) -> None:
        """
        A delivery's commit is one job of the runner: writing, the file's
        C{fsync}, the link into C{new}, the C{fsync} of C{new} and the
        removal of the tmp file; its result fires when that job ends.
        """
        runner = HeldRunner()
        store = MaildirStore(self.mktemp(), runner, "host.example")
        store._ensureMaildir(store.maildirPath(ALICE))
        fsync = _FakeFsync()
        store.syncer = DirectorySyncer(runner, fsync)
        delivery = store.beginDelivery([ALICE])
        delivery.write(b"Subject: one\r\n\r\nbody\r\n")
        d = delivery.commit()
        self.assertEqual(len(runner.jobs), 1)
        runner.runNext()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(runner.jobs, [])
        maildir = store.maildirPath(ALICE)
        self.assertEqual(fsync.calls, [os.path.join(maildir, "new")])
        self.assertEqual(len(os.listdir(os.path.join(maildir, "new"))), 1)
        self.assertEqual(os.listdir(os.path.join(maildir, "tmp")), [])

    def test_concurrentDeliveriesShareOneDirectoryFsync(self) -> None:
        """
        Three deliveries into one maildrop committing while an C{fsync} of
        its C{new} runs are made durable by one more C{fsync} of it; their
        tmp files are removed after it.
        """
        results = self.commitTogether([[ALICE], [ALICE], [ALICE], [ALICE]])
        for d in results:
            self.assertIsNone(self.successResultOf(d))
        newDir = os.path.join(self.store.maildirPath(ALICE), "new")
        self.assertEqual(self.fsync.calls, [newDir, newDir])
        self.assertEqual(len(self.listing(ALICE, "new")), 4)
        self.assertEqual(self.listing(ALICE, "tmp"), [])

    def test_failedFsyncFailsEveryDeliveryOfTheBatch(self) -> None:
        """
        When the C{fsync} of C{new} that deliveries share fails, every
        delivery of that batch fails with L{TemporaryFailure} (none
        succeeds) and leaves no file behind, in C{new} or C{tmp}, even one
        delivered to two maildrops; the delivery synced before, and one of
        the same moment to another maildrop, whose C{fsync} succeeded, are
        kept.
        """
        self.fsync.failingCalls = frozenset({2})
        first, second, third, both = self.commitTogether([[ALICE], [ALICE], [ALICE], [ALICE, BOB]])
        self.assertIsNone(self.successResultOf(first))
        for d in (second, third, both):
            failure = self.failureResultOf(d, TemporaryFailure)
            self.assertEqual(str(failure.value), "cannot deliver message: Input/output error")
        self.assertEqual(len(self.listing(ALICE, "new")), 1)
        self.assertEqual(self.listing(ALICE, "tmp"), [])
        self.assertEqual(self.listing(BOB, "new"), [])
        self.assertEqual(self.listing(BOB, "tmp"), [])
        bob = self.commit([BOB], 9)
        self.pump.runUntil(lambda: bob.called)
        self.assertIsNone(self.successResultOf(bob))
        self.assertEqual(len(self.listing(BOB, "new")), 1)


class GroupCommitLMTPTests(SynchronousTestCase):
    """
    Over the wire: messages whose deliveries share a failed directory
    C{fsync} each get a temporary failure, none a success.
    """

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.clock = task.Clock()
        self.clock.advance(1700000000)
        self.pump = _Pump()
        pool = IOThreadPool(4, name="test-io")
        pool.start()
        self.addCleanup(pool.stop)
        self.runner = ThreadPoolRunner(self.pump, pool)
        self.store = MaildirStore(self.root, self.runner, "host.example")
        self.store._ensureMaildir(self.store.maildirPath(ALICE))
        self.fsync = _GatedFsync()
        self.store.syncer = DirectorySyncer(self.runner, self.fsync)
        users = FakeUserDatabase({ALICE: "x"})
        self.router = NoRelayRouter(domains=("example.org",), users=users, store=self.store)
        self.factory = smtplmtp.LMTPFactory(self.router, self.clock, "mail.example.org")

    def connect(self):
        proto = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=UNIXAddress(None))
        proto.makeConnection(transport)
        proto.dataReceived(b"LHLO client.example\r\nMAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
        transport.clear()
        return proto, transport

    def deliverThree(self) -> list[bytes]:
        """
        One LMTP client ends its DATA and its directory C{fsync} is held;
        two more end theirs meanwhile; the replies each got once all is
        done.
        """
        sessions = [self.connect(), self.connect(), self.connect()]
        sessions[0][0].dataReceived(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        self.assertTrue(self.fsync.entered.wait(WAIT))
        for proto, _ in sessions[1:]:
            proto.dataReceived(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        _waitFor(lambda: self.store.syncer.waiting == 2)
        self.fsync.release.set()
        self.pump.runUntil(lambda: all(transport.value() for _, transport in sessions))
        return [transport.value() for _, transport in sessions]

    def test_failedBatchGets451(self) -> None:
        """
        When the one C{fsync} of C{new} two deliveries share fails, both
        clients get C{451} (and no C{250}), and nothing of theirs is left
        in the maildrop; the client answered by the C{fsync} before gets
        C{250}.
        """
        newDir = os.path.join(self.store.maildirPath(ALICE), "new")
        self.fsync.failingCalls = frozenset({2})
        replies = self.deliverThree()
        self.assertEqual(replies[0][:4], b"250 ")
        self.assertEqual(replies[1:], [b"451 4.3.0 Temporary failure, try again later\r\n"] * 2)
        self.assertEqual(self.fsync.calls, [newDir, newDir])
        self.assertEqual(len(os.listdir(newDir)), 1)

    def test_batchAcknowledgedAfterItsFsync(self) -> None:
        """
        Without a failure all three clients get C{250}, the two that
        waited after one shared C{fsync}, and the messages are in the
        maildrop.
        """
        newDir = os.path.join(self.store.maildirPath(ALICE), "new")
        replies = self.deliverThree()
        self.assertEqual([r[:4] for r in replies], [b"250 "] * 3)
        self.assertEqual(self.fsync.calls, [newDir, newDir])
        self.assertEqual(len(os.listdir(newDir)), 3)


class GroupCommitQueueTests(SynchronousTestCase):
    """
    The outbound queue's entries committing together share the C{fsync}s
    of the queue directory, and a failed one fails each of them.
    """

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.clock = task.Clock()
        self.clock.advance(1700000000)
        self.runner = HeldRunner()
        self.fsync = _FakeFsync()
        self.syncer = DirectorySyncer(self.runner, self.fsync)
        self.queue = OutboundQueue(self.root, self.clock, self.runner, syncer=self.syncer)
        self.announced: list = []
        self.queue.addListener(self.announced.append)

    def commitTogether(self, count: int, errback=None) -> list:
        """
        Commit C{count} entries together, each C{Deferred} given
        C{errback} (called with the failure and the entry's id) first if
        any, then let the runner run.
        """
        results = []
        for n in range(count):
            delivery = self.queue.beginDelivery(ALICE, [Address.parse("x@remote.example")])
            delivery.write(b"Subject: %d\r\n\r\nbody\r\n" % (n,))
            results.append(delivery.commit())
            if errback is not None:
                results[-1].addErrback(errback, delivery.queueId)
        self.runner.runAll()
        return results

    def test_entriesShareDirectoryFsyncs(self) -> None:
        """
        Three entries committed together share one C{fsync} of the queue
        directory making their C{.msg} files durable before any C{.json}
        is written, then one for the C{.json} files: two in all instead of
        six, and all three reach the relay.
        """
        root = os.path.abspath(self.root)
        for d in self.commitTogether(3):
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual([os.path.abspath(p) for p in self.fsync.calls], [root, root])
        self.assertEqual(len(self.announced), 3)
        self.assertEqual(len(self.queue.loadEntries()), 3)

    def test_failedFsyncFailsEveryEntryOfTheBatch(self) -> None:
        """
        When the C{fsync} that would make the C{.json} files durable fails,
        every entry of the batch fails with L{TemporaryFailure}, none
        reaches the relay, and their files are removed before the failure
        is reported (so not even a restart relays them).
        """
        real = self.fsync

        def fsync(path: str) -> None:
            real(path)
            if len(real.calls) > 1:
                raise OSError(errno.EIO, os.strerror(errno.EIO), path)

        self.syncer._fsync = fsync
        seen = []

        def listed(reason, queueId):
            seen.append([name for name in os.listdir(self.root) if name.startswith(queueId)])
            return reason

        for d in self.commitTogether(2, listed):
            failure = self.failureResultOf(d, TemporaryFailure)
            self.assertEqual(str(failure.value), "cannot commit queue entry: Input/output error")
        # Each entry's files were gone before its client was told.
        self.assertEqual(seen, [[], []])
        self.flushLoggedErrors()
        self.assertEqual(self.announced, [])
        self.assertEqual(self.queue.loadEntries(), [])
        self.assertEqual(sorted(os.listdir(self.root)), [".lock"])
