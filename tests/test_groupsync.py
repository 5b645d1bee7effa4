"""
Tests for L{pop3gw.groupsync}: group commit of directory C{fsync}s, alone
and under the deliveries of L{pop3gw.maildir.MaildirStore}.
"""

from __future__ import annotations

import errno
import os

from twisted.internet import task
from twisted.internet.address import UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pop3gw import smtplmtp
from pop3gw.address import Address
from pop3gw.groupsync import DirectorySyncer
from pop3gw.interfaces import TemporaryFailure
from pop3gw.maildir import MaildirStore
from pop3gw.queue import OutboundQueue
from pop3gw.runner import ImmediateRunner, ThreadPoolRunner
from pop3gw.testing import FakeUserDatabase, HeldRunner, HeldThreadPool
from tests.queuehelpers import ThreadClock
from tests.test_smtpmx import NoRelayRouter

ALICE = Address.parse("alice@example.org")
BOB = Address.parse("bob@example.org")


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


class GroupCommitDeliveryTests(SynchronousTestCase):
    """
    Deliveries of a L{MaildirStore} committing while a batch is being
    synced share the next C{fsync} of their C{new} directories, and a
    failed C{fsync} fails each of them.
    """

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.runner = HeldRunner()
        self.store = MaildirStore(self.root, self.runner, "host.example")
        for user in (ALICE, BOB):
            self.store._ensureMaildir(self.store.maildirPath(user))
        self.fsync = _FakeFsync()
        self.store.syncer = DirectorySyncer(self.runner, self.fsync)

    def listing(self, user: Address, subdir: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.store.maildirPath(user), subdir)))

    def commitTogether(self, recipients: list) -> list:
        """
        Begin, write and commit one delivery per entry of C{recipients},
        then let the runner run their jobs (oldest first, as a pool's
        threads take them).
        """
        results = []
        for n, rcpts in enumerate(recipients):
            delivery = self.store.beginDelivery(rcpts)
            delivery.write(b"Subject: %d\r\n\r\nbody\r\n" % (n,))
            results.append(delivery.commit())
        self.runner.runAll()
        return results

    def test_concurrentDeliveriesShareOneDirectoryFsync(self) -> None:
        """
        Three deliveries into one maildrop committing together are made
        durable by one C{fsync} of its C{new}; their tmp files are removed
        after it.
        """
        results = self.commitTogether([[ALICE], [ALICE], [ALICE]])
        for d in results:
            self.assertIsNone(self.successResultOf(d))
        newDir = os.path.join(self.store.maildirPath(ALICE), "new")
        self.assertEqual(self.fsync.calls, [newDir])
        self.assertEqual(len(self.listing(ALICE, "new")), 3)
        self.assertEqual(self.listing(ALICE, "tmp"), [])

    def test_failedFsyncFailsEveryDeliveryOfTheBatch(self) -> None:
        """
        When the C{fsync} of C{new} fails, every delivery of the batch into
        that maildrop fails with L{TemporaryFailure} (none succeeds) and
        leaves no file behind, in C{new} or C{tmp}, even one delivered to
        two maildrops; a delivery of the same batch to another maildrop,
        whose C{fsync} succeeded, is kept.
        """
        self.fsync.failing.add(os.path.join(self.store.maildirPath(ALICE), "new"))
        first, second, both, bobOnly = self.commitTogether([[ALICE], [ALICE], [BOB, ALICE], [BOB]])
        for d in (first, second, both):
            failure = self.failureResultOf(d, TemporaryFailure)
            self.assertEqual(str(failure.value), "cannot deliver message: Input/output error")
        self.assertIsNone(self.successResultOf(bobOnly))
        self.assertEqual(self.listing(ALICE, "new"), [])
        self.assertEqual(self.listing(ALICE, "tmp"), [])
        self.assertEqual(len(self.listing(BOB, "new")), 1)
        self.assertEqual(self.listing(BOB, "tmp"), [])


class GroupCommitLMTPTests(SynchronousTestCase):
    """
    Over the wire: messages whose deliveries share a failed directory
    C{fsync} each get a temporary failure, none a success.
    """

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.clock = task.Clock()
        self.clock.advance(1700000000)
        self.runner = HeldRunner()
        self.store = MaildirStore(self.root, self.runner, "host.example")
        self.store._ensureMaildir(self.store.maildirPath(ALICE))
        self.fsync = _FakeFsync()
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

    def deliverTwo(self) -> list[bytes]:
        """
        Two LMTP clients end their DATA together; the replies each got
        once the runner has run.
        """
        sessions = [self.connect(), self.connect()]
        for proto, _ in sessions:
            proto.dataReceived(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        self.runner.runAll()
        return [transport.value() for _, transport in sessions]

    def test_failedBatchGets451(self) -> None:
        """
        When the one C{fsync} of C{new} the two deliveries share fails,
        both clients get C{451} (and no C{250}), and nothing is left in the
        maildrop.
        """
        newDir = os.path.join(self.store.maildirPath(ALICE), "new")
        self.fsync.failing.add(newDir)
        replies = self.deliverTwo()
        self.assertEqual(replies, [b"451 4.3.0 Temporary failure, try again later\r\n"] * 2)
        self.assertEqual(self.fsync.calls, [newDir])
        self.assertEqual(os.listdir(newDir), [])

    def test_batchAcknowledgedAfterItsFsync(self) -> None:
        """
        Without a failure both clients get C{250} after the one shared
        C{fsync}, and both messages are in the maildrop.
        """
        newDir = os.path.join(self.store.maildirPath(ALICE), "new")
        replies = self.deliverTwo()
        self.assertEqual([r[:4] for r in replies], [b"250 "] * 2)
        self.assertEqual(self.fsync.calls, [newDir])
        self.assertEqual(len(os.listdir(newDir)), 2)


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
