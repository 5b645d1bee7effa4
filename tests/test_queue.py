"""
Tests for L{pop3gw.queue}: the store's files, permissions, the CLI helpers
and the entry's state changes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import time

from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from pop3gw import fsutil
from pop3gw import queue as queuemodule
from pop3gw.address import Address
from pop3gw.interfaces import (
    IDelivery,
    InsufficientStorage,
    IOutboundQueue,
    IQueueStore,
    ITwoPhaseDelivery,
    TemporaryFailure,
)
from pop3gw.queue import (
    DELIVERED,
    FAILED,
    INDEX_FILE,
    ORPHAN_AGE,
    PENDING,
    PREFETCH_SIZE,
    Entry,
    OutboundQueue,
    Outcome,
    OutcomeKind,
    Recipient,
    RecipientState,
    _readRecord,
    formatEntry,
    listEntries,
    listText,
    requestFlush,
)
from pop3gw.runner import ThreadPoolRunner
from pop3gw.testing import FakeOutboundQueue, HeldThreadPool
from tests.queuehelpers import (
    ALICE,
    BOB,
    BODY,
    CAROL,
    DAVE,
    ERIN,
    STORED,
    TRACE,
    QueueTestMixin,
    ThreadClock,
    readJSON,
)


class StorageTests(QueueTestMixin, unittest.SynchronousTestCase):
    """
    Tests for L{OutboundQueue} files and the CLI helpers.
    """

    def setUp(self):
        self.setUpQueue()

    def test_interface(self):
        """
        L{OutboundQueue} provides L{IOutboundQueue}; its deliveries are
        two-phase.
        """
        self.assertTrue(verifyObject(IOutboundQueue, self.queue))
        d = self.queue.beginDelivery(ALICE, [BOB])
        self.assertTrue(verifyObject(ITwoPhaseDelivery, d))
        d.abort()

    def test_deliveryNamesQueueId(self):
        """
        A queue delivery's C{queueId} is, from the start, the id of the
        entry its commit makes.
        """
        announced = []
        self.queue.addListener(announced.append)
        d = self.queue.beginDelivery(ALICE, [BOB], TRACE)
        queueId = d.queueId
        d.write(BODY)
        self.successResultOf(d.commit())
        self.assertEqual([e.queueId for e in announced], [queueId])
        self.assertEqual([e.queueId for e in listEntries(self.root)], [queueId])

    def test_readEntryAndAnnounce(self):
        """
        L{OutboundQueue.readEntry} reads one entry another process (a
        worker) committed, or gives C{None} for one that does not exist,
        has no message file, or is no queue id; L{OutboundQueue.announce}
        hands it to the listeners.
        """
        other = OutboundQueue(self.root, self.clock)
        entry = self.enqueue(recipients=[BOB, CAROL])
        found = other.readEntry(entry.queueId)
        self.assertEqual((found.queueId, [str(r.address) for r in found.recipients]), (entry.queueId, ["bob@remote.example", "carol@remote.example"]))
        self.assertTrue(other.hasEntry(entry.queueId))
        announced = []
        other.addListener(announced.append)
        other.announce(found)
        self.assertEqual(announced, [found])
        self.assertIsNone(other.readEntry("0000000000000-00000000"))
        self.assertIsNone(other.readEntry("../users"))
        os.unlink(os.path.join(self.root, entry.queueId + ".msg"))
        self.assertIsNone(other.readEntry(entry.queueId))
        os.unlink(os.path.join(self.root, entry.queueId + ".json"))
        self.assertFalse(other.hasEntry(entry.queueId))

    def test_commitWritesFiles(self):
        """
        A commit writes C{<id>.msg} (trace first, LF made CRLF) and
        C{<id>.json} with the envelope.
        """
        entry = self.enqueue(recipients=[BOB, CAROL])
        with open(os.path.join(self.root, entry.queueId + ".msg"), "rb") as f:
            self.assertEqual(f.read(), STORED)
        self.assertEqual(
            readJSON(self.root, entry.queueId),
            {
                "version": 1,
                "id": entry.queueId,
                "sender": "alice@example.org",
                "created": 1000.0,
                "attempts": 0,
                "nextAttempt": 1000.0,
                "lastError": None,
                "smtputf8": False,
                "recipients": [
                    {"address": "bob@remote.example", "state": "pending", "status": None, "diagnostic": None, "notified": False},
                    {"address": "carol@remote.example", "state": "pending", "status": None, "diagnostic": None, "notified": False},
                ],
            },
        )
        self.assertEqual(sorted(n for n in os.listdir(self.root) if not n.startswith(".")), [entry.queueId + ".json", entry.queueId + ".msg"])

    def test_lineEndsAcrossWrites(self):
        """
        A CR at the end of one write and an LF at the start of the next make
        one CRLF; a missing final line end is added.
        """
        d = self.queue.beginDelivery(None, [BOB])
        d.write(b"a\r")
        d.write(b"\nb\n\nc")
        self.successResultOf(d.commit())
        [entry] = listEntries(self.root)
        self.assertIsNone(entry.sender)
        with open(os.path.join(self.root, entry.queueId + ".msg"), "rb") as f:
            self.assertEqual(f.read(), b"a\r\nb\r\n\r\nc\r\n")

    def test_finalCR(self):
        """
        A message ending in a bare CR gets the LF that completes it.
        """
        entry = self.enqueue(body=b"a\r\nxy\r", trace=b"")
        with open(os.path.join(self.root, entry.queueId + ".msg"), "rb") as f:
            self.assertEqual(f.read(), b"a\r\nxy\r\n")

    def test_abort(self):
        """
        Abort removes everything written; a second abort does nothing.
        """
        d = self.queue.beginDelivery(ALICE, [BOB], TRACE)
        d.write(BODY)
        d.abort()
        d.abort()
        self.assertEqual([n for n in os.listdir(self.root) if not n.startswith(".")], [])
        self.assertRaises(TemporaryFailure, d.write, b"x")

    def test_ids(self):
        """
        Queue ids are unique and file-name safe.
        """
        ids = {self.enqueue().queueId for _ in range(5)}
        self.assertEqual(len(ids), 5)
        for i in ids:
            self.assertRegex(i, r"^[0-9a-f]{13}-[0-9a-f]{8}$")

    def test_threadPool(self):
        """
        With a thread pool, the files are made durable there: nothing exists
        and the commit has not fired until the pool runs.
        """
        pool = HeldThreadPool()
        self.setUpQueue(pool)
        d = self.queue.beginDelivery(ALICE, [BOB], TRACE)
        d.write(BODY)
        committed = d.commit()
        self.assertNoResult(committed)
        self.assertEqual(listEntries(self.root), [])
        pool.runAll()
        self.successResultOf(committed)
        self.assertEqual(len(listEntries(self.root)), 1)

    def test_commitFailure(self):
        """
        If the files cannot be made durable the commit fails with
        L{TemporaryFailure} and the error is logged in one line, in words.
        """
        events: list = []
        self.queue.log = Logger(observer=events.append)
        d = self.queue.beginDelivery(ALICE, [BOB])
        d.write(BODY)
        os.rename(self.root, self.root + ".gone")
        self.addCleanup(os.rename, self.root + ".gone", self.root)
        self.failureResultOf(d.commit(), TemporaryFailure)
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertIn("No such file or directory", formatEvent(event))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_orphans(self):
        """
        At load, C{.tmp} files and C{.msg} files without C{.json} older than
        an hour are removed; younger ones and complete entries are kept.
        """
        entry = self.enqueue()
        old = os.path.join(self.root, "0000000000000-00000000.msg")
        young = os.path.join(self.root, "0000000000001-00000000.msg")
        oldTmp = os.path.join(self.root, "x.json.1234.tmp")
        for path in (old, young, oldTmp):
            with open(path, "wb") as f:
                f.write(b"x")
        past = os.stat(young).st_mtime - ORPHAN_AGE - 10
        os.utime(old, (past, past))
        os.utime(oldTmp, (past, past))
        os.utime(os.path.join(self.root, entry.queueId + ".msg"), (past, past))
        entries = self.queue.loadEntries()
        self.assertEqual([e.queueId for e in entries], [entry.queueId])
        self.assertFalse(os.path.exists(old))
        self.assertFalse(os.path.exists(oldTmp))
        self.assertTrue(os.path.exists(young))

    def test_badEntrySkipped(self):
        """
        An unparseable C{.json} or one without its C{.msg} is skipped.
        """
        good = self.enqueue()
        with open(os.path.join(self.root, "0000000000000-00000001.json"), "wb") as f:
            f.write(b"{not json")
        lonely = self.enqueue()
        os.unlink(os.path.join(self.root, lonely.queueId + ".msg"))
        self.assertEqual([e.queueId for e in self.queue.loadEntries()], [good.queueId])

    def test_entryRoundTrip(self):
        """
        L{Entry.fromJSON} reads back what L{Entry.toJSON} wrote.
        """
        entry = Entry(
            "0000000000abc-0123abcd",
            None,
            [Recipient(BOB, FAILED, "5.1.1", "550 no", True), Recipient(CAROL)],
            created=1.5,
            attempts=3,
            nextAttempt=99.0,
            lastError="451 later",
        )
        self.assertEqual(Entry.fromJSON(entry.toJSON()), entry)
        flagged = Entry("0000000000abc-0123abcd", BOB, [Recipient(CAROL)], created=1.5, smtputf8=True)
        self.assertEqual(Entry.fromJSON(flagged.toJSON()), flagged)
        self.assertRaises(ValueError, Entry.fromJSON, b'{"version": 2}')
        self.assertRaises(ValueError, Entry.fromJSON, b"[]")

    def test_entryWithoutSMTPUTF8Field(self):
        """
        An entry written before SMTPUTF8 was recorded (no C{smtputf8}
        field) reads as not needing it.
        """
        entry = Entry("0000000000abc-0123abcd", None, [Recipient(CAROL)], created=1.5)
        data = entry.toJSON().replace(b'"smtputf8": false,', b"")
        self.assertNotIn(b"smtputf8", data)
        self.assertFalse(Entry.fromJSON(data).smtputf8)

    def test_listEntriesMissingDirectory(self):
        """
        L{listEntries} of a queue directory that does not exist is empty.
        """
        self.assertEqual(listEntries(self.mktemp()), [])

    def test_requestFlush(self):
        """
        L{requestFlush} makes every entry due at C{now}, durably, touches
        C{.flush} and returns the count.
        """
        a = self.enqueue()
        b = self.enqueue()
        for entry in (a, b):
            entry.nextAttempt = 5000.0
            self.successResultOf(self.queue.saveEntry(entry))
        self.assertEqual(requestFlush(self.root, now=1234.0), 2)
        self.assertEqual([e.nextAttempt for e in listEntries(self.root)], [1234.0, 1234.0])
        self.assertTrue(os.path.exists(os.path.join(self.root, ".flush")))

    def test_formatEntry(self):
        """
        L{formatEntry} gives one line with id, sender, pending recipients,
        attempts, next attempt time and last error.
        """
        entry = Entry(
            "0000000000abc-0123abcd",
            ALICE,
            [Recipient(BOB, DELIVERED), Recipient(CAROL), Recipient(ERIN)],
            created=0.0,
            attempts=2,
            nextAttempt=86400.0,
            lastError="carol@remote.example: 451 4.3.0\r\nlater",
        )
        self.assertEqual(
            formatEntry(entry),
            "0000000000abc-0123abcd from=alice@example.org to=carol@remote.example,erin@other.example "
            "attempts=2 next=1970-01-02T00:00:00+00:00 error=carol@remote.example: 451 4.3.0 later",
        )
        entry.sender = None
        entry.lastError = None
        entry.recipients = []
        self.assertEqual(
            formatEntry(entry),
            "0000000000abc-0123abcd from=<> to=- attempts=2 next=1970-01-02T00:00:00+00:00 error=-",
        )

    def test_saveOrder(self):
        """
        Saves of one entry through a thread pool run one after the other, so
        the last state saved is the last written.
        """
        pool = HeldThreadPool()
        self.setUpQueue(pool)
        d = self.queue.beginDelivery(ALICE, [BOB])
        c = d.commit()
        pool.runAll()
        self.successResultOf(c)
        [entry] = listEntries(self.root)
        entry.attempts = 1
        first = self.queue.saveEntry(entry)
        entry.attempts = 2
        second = self.queue.saveEntry(entry)
        self.assertEqual(len(pool.pending), 1)
        pool.runAll()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(readJSON(self.root, entry.queueId)["attempts"], 2)


class FilePermissionTests(QueueTestMixin, unittest.SynchronousTestCase):
    """
    Every file the queue creates is 0600 and every directory 0700, whatever
    the umask; run as root, each belongs to the data directory's owner.
    """

    def setUmask(self, mask: int) -> None:
        previous = os.umask(mask)
        self.addCleanup(os.umask, previous)

    def modesUnderUmask(self, mask: int) -> dict:
        """
        Under umask C{mask}: create a queue, queue a message, leave a second
        one open, flush; return the mode of every path in the queue (the
        temp files included, seen as they are renamed into place).
        """
        self.setUmask(mask)
        modes = {}
        rename = os.rename

        def spy(src, dst):
            modes[os.path.basename(dst) + " (tmp)"] = os.stat(src).st_mode & 0o7777
            rename(src, dst)

        self.patch(os, "rename", spy)
        self.setUpQueue()
        self.enqueue()
        open_ = self.queue.beginDelivery(ALICE, [BOB], TRACE)
        self.addCleanup(open_.abort)
        requestFlush(self.root, now=1234.0)
        modes["/"] = os.stat(self.root).st_mode & 0o7777
        for name in os.listdir(self.root):
            modes[name] = os.stat(os.path.join(self.root, name)).st_mode & 0o7777
        return modes

    def assertPrivate(self, modes: dict) -> None:
        kinds = {name.split(".")[-1].split(" ")[0] for name in modes}
        self.assertEqual(kinds, {"/", "json", "msg", "tmp", "lock", "flush"})
        expected = {name: 0o700 if name == "/" else 0o600 for name in modes}
        self.assertEqual(modes, expected)

    def test_umask022(self):
        """
        Under the usual umask 022, the queue's files are 0600, not 0644.
        """
        self.assertPrivate(self.modesUnderUmask(0o022))

    def test_umask000(self):
        """
        Under umask 000, the queue's files are 0600 and its directory 0700.
        """
        self.assertPrivate(self.modesUnderUmask(0o000))

    def chownedParent(self, uid: int, gid: int) -> str:
        """
        A new directory owned by C{uid}:C{gid}, as a data directory of a
        service install is; only root can make one.
        """
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root to give files to another user")
        parent = self.mktemp()
        os.makedirs(parent)
        os.chown(parent, uid, gid)
        return parent

    def test_rootGivesFilesToTheDataDirOwner(self):
        """
        Run as root, the queue directory it creates belongs to the owner of
        the data directory, and so does every file the queue then creates
        (entries, temp files, the lock, the flush stamp).
        """
        parent = self.chownedParent(4242, 4343)
        owner = fsutil.dataDirectoryOwner(parent)
        self.clock = ThreadClock()
        self.root = os.path.join(parent, "queue")
        self.queue = OutboundQueue(self.root, self.clock, owner=owner)
        self.enqueue()
        open_ = self.queue.beginDelivery(ALICE, [BOB], TRACE)
        self.addCleanup(open_.abort)
        requestFlush(self.root, now=1234.0, owner=owner)
        owners = {".": os.stat(self.root)[4:6]}
        for name in os.listdir(self.root):
            owners[name] = os.stat(os.path.join(self.root, name))[4:6]
        self.assertEqual(len(owners), 6)
        self.assertEqual(set(owners.values()), {(4242, 4343)}, owners)

    def test_rootKeepsARewrittenFilesOwner(self):
        """
        Run as root, an entry rewritten by C{queue flush} keeps the owner
        its file had.
        """
        parent = self.chownedParent(4242, 4343)
        self.clock = ThreadClock()
        self.root = os.path.join(parent, "queue")
        owner = fsutil.dataDirectoryOwner(parent)
        self.queue = OutboundQueue(self.root, self.clock, owner=owner)
        entry = self.enqueue()
        path = os.path.join(self.root, entry.queueId + ".json")
        os.chown(path, 4444, 4545)
        requestFlush(self.root, now=1234.0, owner=owner)
        self.assertEqual(listEntries(self.root)[0].nextAttempt, 1234.0)
        self.assertEqual(os.stat(path)[4:6], (4444, 4545))


def makeEntry(*addresses, created=1000.0) -> Entry:
    return Entry("0000000000001-00000000", ALICE, [Recipient(a) for a in addresses], created=created, nextAttempt=created)


class EntryStateTests(unittest.SynchronousTestCase):
    """
    The state changes of an L{Entry}, pure methods without a reactor or
    files.
    """

    def test_beginAttempt(self):
        """
        L{Entry.beginAttempt} counts the attempt, sets the next one by the
        schedule (its last delay repeating) and returns the pending
        addresses.
        """
        entry = makeEntry(BOB, CAROL)
        entry.recipients[1].state = DELIVERED
        self.assertEqual(entry.beginAttempt(2000.0, (10, 20), 86400), [BOB])
        self.assertEqual((entry.attempts, entry.nextAttempt), (1, 2010.0))
        entry.beginAttempt(3000.0, (10, 20), 86400)
        entry.beginAttempt(4000.0, (10, 20), 86400)
        self.assertEqual((entry.attempts, entry.nextAttempt), (3, 4020.0))

    def test_beginAttemptNotPastLifetime(self):
        """
        The next attempt is due no later than the end of the lifetime.
        """
        entry = makeEntry(BOB)
        entry.beginAttempt(1090.0, (3600,), 100)
        self.assertEqual(entry.nextAttempt, 1100.0)

    def test_apply(self):
        """
        L{Entry.apply} marks delivered and failed recipients, keeps the
        deferred ones pending with their reasons as the last error, and
        leaves recipients without an outcome alone.
        """
        entry = makeEntry(BOB, CAROL, DAVE, ERIN)
        entry.apply(
            {
                BOB: Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 ok"),
                CAROL: Outcome(OutcomeKind.FAILED, "5.1.1", "550 5.1.1 unknown"),
                DAVE: Outcome(OutcomeKind.DEFERRED, "4.3.0", "451 4.3.0 later"),
            }
        )
        self.assertEqual([r.state for r in entry.recipients], [DELIVERED, FAILED, PENDING, PENDING])
        self.assertEqual((entry.recipients[1].status, entry.recipients[1].diagnostic), ("5.1.1", "550 5.1.1 unknown"))
        self.assertEqual(entry.lastError, "dave@remote.example: 451 4.3.0 later")
        self.assertEqual(entry.unnotified(), [entry.recipients[1]])
        self.assertFalse(entry.isFinished())

    def test_expire(self):
        """
        Past its lifetime, an entry with pending recipients is expired:
        each fails with 4.4.7 naming the last error.
        """
        entry = makeEntry(BOB, CAROL)
        entry.recipients[0].state = DELIVERED
        entry.lastError = "carol@remote.example: connection refused"
        self.assertFalse(entry.isExpired(1099.0, 100))
        self.assertTrue(entry.isExpired(1100.0, 100))
        self.assertEqual(entry.expire(), 1)
        carol = entry.recipients[1]
        self.assertEqual((carol.state, carol.status), (FAILED, "4.4.7"))
        self.assertEqual(carol.diagnostic, "delivery time expired; last error: carol@remote.example: connection refused")
        self.assertFalse(entry.isExpired(1100.0, 100))

    def test_stateValues(self):
        """
        The recipient states are written to the C{.json} file as the words
        C{pending}, C{delivered} and C{failed}.
        """
        self.assertEqual([s.value for s in RecipientState], ["pending", "delivered", "failed"])
        entry = makeEntry(BOB)
        entry.recipients[0].state = DELIVERED
        self.assertEqual(Entry.fromJSON(entry.toJSON()).recipients[0].state, DELIVERED)


class AttemptRecordTests(QueueTestMixin, unittest.SynchronousTestCase):
    """
    Tests for the durability of the relay's writes: attempt markers,
    removals and saves, their batched directory C{fsync}s and the queue
    lock.
    """

    def setUp(self):
        self.setUpQueue()

    def recordFsyncs(self):
        """
        Replace L{fsutil.fsync} with one that records, for each call,
        whether the queue's C{.lock} could be taken at that moment (it
        tries C{LOCK_EX | LOCK_NB} on a descriptor of its own).

        @return: the list of booleans, one per C{fsync}.
        """
        seen = []

        def fsync(fd):
            lock = os.open(os.path.join(self.root, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    seen.append(False)
                else:
                    seen.append(True)
            finally:
                os.close(lock)
            os.fsync(fd)

        self.patch(fsutil, "fsync", fsync)
        return seen

    def test_lockNotHeldDuringFsync(self):
        """
        No C{fsync} of the queue's writes (a commit, an attempt record, a
        save, a removal) is made while the queue lock is held: the lock
        covers only renames and unlinks.
        """
        seen = self.recordFsyncs()
        entry = self.enqueue()
        entry.beginAttempt(1000.0, [300], 86400)
        self.successResultOf(self.queue.recordAttempt(entry))
        self.successResultOf(self.queue.saveEntry(entry))
        self.successResultOf(self.queue.removeEntry(entry))
        self.assertEqual(seen, [True] * 8)

    def test_attemptIsMarkerName(self):
        """
        L{OutboundQueue.recordAttempt} leaves the C{.json} as it was and
        renames the entry's empty marker C{<id>.try-<attempts>-<next>}
        (created at the first attempt); the queue read again (a restart,
        C{queue list}) sees the attempt count and next attempt time, and
        the marker goes with the entry.
        """
        entry = self.enqueue()
        with open(os.path.join(self.root, entry.queueId + ".json"), "rb") as f:
            before = f.read()
        entry.beginAttempt(1000.0, [300, 900], 86400)
        self.successResultOf(self.queue.recordAttempt(entry))
        entry.beginAttempt(1300.0, [300, 900], 86400)
        self.successResultOf(self.queue.recordAttempt(entry))
        with open(os.path.join(self.root, entry.queueId + ".json"), "rb") as f:
            self.assertEqual(f.read(), before)
        marker = os.path.join(self.root, entry.queueId + ".try-2-2200.0")
        self.assertEqual((os.stat(marker).st_size, os.stat(marker).st_mode & 0o777), (0, 0o600))
        self.assertEqual(sorted(os.listdir(self.root)), sorted([".lock", entry.queueId + ".json", entry.queueId + ".msg", entry.queueId + ".try-2-2200.0"]))
        self.assertEqual([(e.attempts, e.nextAttempt) for e in listEntries(self.root)], [(2, 2200.0)])
        restarted = OutboundQueue(self.root, self.clock)
        [loaded] = restarted.loadEntries()
        self.assertEqual((loaded.queueId, loaded.attempts, loaded.nextAttempt), (entry.queueId, 2, 2200.0))
        loaded.beginAttempt(2200.0, [300, 900], 86400)
        self.successResultOf(restarted.recordAttempt(loaded))
        self.assertEqual([(e.attempts, e.nextAttempt) for e in listEntries(self.root)], [(3, 3100.0)])
        self.successResultOf(restarted.removeEntry(loaded))
        self.assertEqual(os.listdir(self.root), [".lock"])

    def test_savedStateOutranksOlderMarker(self):
        """
        A C{.json} saved after the attempt (its outcome, or C{queue
        flush}) wins over a marker with no more attempts than it records.
        """
        entry = self.enqueue()
        entry.beginAttempt(1000.0, [300], 86400)
        self.successResultOf(self.queue.recordAttempt(entry))
        self.assertEqual(requestFlush(self.root, now=1100.0), 1)
        self.assertEqual([(e.attempts, e.nextAttempt) for e in listEntries(self.root)], [(1, 1100.0)])
        entry.nextAttempt = 1200.0
        self.successResultOf(self.queue.saveEntry(entry))
        self.assertEqual([(e.attempts, e.nextAttempt) for e in listEntries(self.root)], [(1, 1200.0)])

    def heldQueue(self):
        """
        Replace the queue by one whose runner holds its jobs.

        @return: the L{HeldThreadPool} and the list the functions of the
            jobs handed to it are appended to.
        """
        pool = HeldThreadPool()
        handed = []
        hand = pool.callInThreadWithCallback

        def callInThreadWithCallback(onResult, f, *args, **kwargs):
            handed.append(f)
            hand(onResult, f, *args, **kwargs)

        pool.callInThreadWithCallback = callInThreadWithCallback
        self.queue = OutboundQueue(self.root, self.clock, ThreadPoolRunner(self.clock, pool))
        return pool, handed

    def test_attemptRecordsShareFsync(self):
        """
        The attempt records and removals asked for while a batch of them
        runs form the next batch: one job of the runner and one directory
        C{fsync} for all of them, and no file is fsynced for them.
        """
        entries = [self.enqueue() for _ in range(4)]
        pool, handed = self.heldQueue()
        seen = self.recordFsyncs()
        for e in entries:
            e.beginAttempt(1000.0, [300], 86400)
        recorded = [self.queue.recordAttempt(e) for e in entries]
        self.assertEqual(len(pool.pending), 1)
        pool.runAll()
        for d in recorded:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual((len(handed), len(seen)), (2, 2))
        removed = [self.queue.removeEntry(e) for e in entries]
        pool.runAll()
        for d in removed:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual((len(handed), len(seen)), (4, 4))
        self.assertEqual(os.listdir(self.root), [".lock"])

    def test_recordsAndRemovalsBatchedTogether(self):
        """
        Attempt records and removals asked for meanwhile go in the same
        batch; each marker is renamed and each removed entry's files
        (marker included) are gone once its Deferred fires.
        """
        first, second, third = [self.enqueue() for _ in range(3)]
        pool, handed = self.heldQueue()
        for e in (first, second, third):
            e.beginAttempt(1000.0, [300], 86400)
        ds = [self.queue.recordAttempt(first)]
        pool.runAll()
        self.successResultOf(ds[0])
        blocker = self.queue.recordAttempt(third)
        removed = self.queue.removeEntry(first)
        recorded = self.queue.recordAttempt(second)
        self.assertEqual(len(pool.pending), 1)
        pool.runAll()
        for d in (blocker, removed, recorded):
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(handed), 3)
        self.assertEqual(
            sorted(os.listdir(self.root)),
            sorted(
                [".lock"]
                + [e.queueId + suffix for e in (second, third) for suffix in (".json", ".msg", ".try-1-1300.0")]
            ),
        )

    def test_failedRemovalInBatchFailsOnlyIt(self):
        """
        A removal whose unlink fails fails alone: the other removals of
        its batch succeed, and the failed entry keeps its C{.json} (it is
        still queued).
        """
        first, second = self.enqueue(), self.enqueue()
        pool, handed = self.heldQueue()
        unlink = fsutil.unlinkIfThere

        def failing(path):
            if path.endswith(first.queueId + ".json"):
                raise OSError(errno.EIO, "I/O error")
            unlink(path)

        self.patch(fsutil, "unlinkIfThere", failing)
        ds = [self.queue.removeEntry(first), self.queue.removeEntry(second)]
        pool.runAll()
        self.assertEqual(self.failureResultOf(ds[0], OSError).value.errno, errno.EIO)
        self.assertIsNone(self.successResultOf(ds[1]))
        self.assertEqual(sorted(os.listdir(self.root)), sorted([".lock", first.queueId + ".json", first.queueId + ".msg"]))

    def test_lockFailureFailsEveryRemoval(self):
        """
        When the queue lock cannot be taken, every removal of the batch
        fails and every entry of it stays queued, files and all.
        """
        entries = [self.enqueue() for _ in range(3)]
        pool, handed = self.heldQueue()

        def noLock(path, owner=None):
            raise OSError(errno.EMFILE, "Too many open files")

        self.patch(fsutil, "openLockFile", noLock)
        removed = [self.queue.removeEntry(e) for e in entries]
        pool.runAll()
        for d in removed:
            self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.EMFILE)
        self.assertEqual(sorted(e.queueId for e in listEntries(self.root)), sorted(e.queueId for e in entries))

    def test_messageReadWithAttemptRecord(self):
        """
        A message of at most L{PREFETCH_SIZE} octets is read in the job
        that records its attempt: L{OutboundQueue.openMessage} then gives
        it without opening its file (here gone), once; the next call
        opens the file.
        """
        entry = self.enqueue()
        entry.beginAttempt(1000.0, [300], 86400)
        self.successResultOf(self.queue.recordAttempt(entry))
        path = os.path.join(self.root, entry.queueId + ".msg")
        os.rename(path, path + ".away")
        with self.queue.openMessage(entry) as f:
            self.assertEqual(f.read(), STORED)
        self.assertRaises(FileNotFoundError, self.queue.openMessage, entry)
        os.rename(path + ".away", path)
        with self.queue.openMessage(entry) as f:
            self.assertEqual(f.read(), STORED)

    def test_largeMessageNotReadWithAttemptRecord(self):
        """
        A message larger than L{PREFETCH_SIZE} is not read with its
        attempt record: L{OutboundQueue.openMessage} opens its file.
        """
        entry = self.enqueue(body=b"x" * PREFETCH_SIZE + b"\n")
        entry.beginAttempt(1000.0, [300], 86400)
        self.successResultOf(self.queue.recordAttempt(entry))
        path = os.path.join(self.root, entry.queueId + ".msg")
        os.rename(path, path + ".away")
        self.assertRaises(FileNotFoundError, self.queue.openMessage, entry)

    def test_messageReadDroppedWithSave(self):
        """
        A message read with an attempt record and not opened is dropped
        when the entry is saved (the attempt is over) or removed: the next
        L{OutboundQueue.openMessage} opens the file.
        """
        for end in (self.queue.saveEntry, self.queue.removeEntry):
            entry = self.enqueue()
            entry.beginAttempt(1000.0, [300], 86400)
            self.successResultOf(self.queue.recordAttempt(entry))
            self.successResultOf(end(entry))
            fsutil.unlinkIfThere(os.path.join(self.root, entry.queueId + ".msg"))
            self.assertRaises(FileNotFoundError, self.queue.openMessage, entry)

    def test_failedBatchFsyncFailsEveryEntry(self):
        """
        When the directory C{fsync} of a batch fails, every attempt record
        (and every removal) of the batch fails: none is reported durable.
        """
        entries = [self.enqueue() for _ in range(3)]
        pool = HeldThreadPool()
        self.queue = OutboundQueue(self.root, self.clock, ThreadPoolRunner(self.clock, pool))

        def fsync(fd):
            raise OSError(errno.EIO, "I/O error")

        self.patch(fsutil, "fsync", fsync)
        for e in entries:
            e.beginAttempt(1000.0, [300], 86400)
        recorded = [self.queue.recordAttempt(e) for e in entries]
        pool.runAll()
        for d in recorded:
            self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.EIO)
        removed = [self.queue.removeEntry(e) for e in entries]
        pool.runAll()
        for d in removed:
            self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.EIO)

    def test_loadedAddressesShared(self):
        """
        Entries read back share one L{Address} object per distinct
        address: a long queue names few senders and recipients, each
        parsed once.
        """
        ids = [self.enqueue(recipients=[BOB, CAROL]).queueId, self.enqueue(recipients=[CAROL]).queueId]
        read = {e.queueId: e for e in listEntries(self.root)}
        first, second = read[ids[0]], read[ids[1]]
        self.assertIs(first.sender, second.sender)
        self.assertIs(first.recipients[1].address, second.recipients[0].address)
        self.assertEqual(str(first.recipients[1].address), "carol@remote.example")

    def test_orphanMarkerRemoved(self):
        """
        At start-up, a marker whose entry is gone (a crash between the
        removal's unlinks) is removed once it is older than
        L{ORPHAN_AGE}; one whose entry exists stays.
        """
        entry = self.enqueue()
        entry.beginAttempt(1000.0, [300], 86400)
        self.successResultOf(self.queue.recordAttempt(entry))
        stray = os.path.join(self.root, "0000000000001-00000000.try-1-5.0")
        open(stray, "wb").close()
        old = os.stat(stray).st_mtime - ORPHAN_AGE - 10
        os.utime(stray, (old, old))
        os.utime(os.path.join(self.root, entry.queueId + ".try-1-1300.0"), (old, old))
        [loaded] = OutboundQueue(self.root, self.clock).loadEntries()
        self.assertEqual(loaded.attempts, 1)
        self.assertEqual(sorted(os.listdir(self.root)), sorted([".lock", entry.queueId + ".json", entry.queueId + ".msg", entry.queueId + ".try-1-1300.0"]))


class FlushStampTests(QueueTestMixin, unittest.SynchronousTestCase):
    """
    L{OutboundQueue.flushStamp} is how the relay learns of C{queue flush}.
    """

    def test_flushStamp(self):
        """
        The stamp is L{None} until a flush is requested, and changes with
        each request.
        """
        self.setUpQueue()
        self.assertIsNone(self.queue.flushStamp())
        requestFlush(self.root, now=1234.0)
        first = self.queue.flushStamp()
        self.assertIsNotNone(first)
        os.utime(os.path.join(self.root, ".flush"), ns=(1, 1))
        self.assertNotEqual(self.queue.flushStamp(), first)

    def test_interface(self):
        """
        L{OutboundQueue} provides L{IQueueStore}.
        """
        self.setUpQueue()
        self.assertTrue(verifyObject(IQueueStore, self.queue))


class FullDiskTests(QueueTestMixin, unittest.SynchronousTestCase):
    """
    A full disk or quota while a message is queued is L{InsufficientStorage}
    (submission answers C{452 4.3.1}), with the error in words, and leaves
    nothing behind.
    """

    def assertFullDisk(self, failure) -> None:
        failure.trap(InsufficientStorage)
        self.assertIn("No space left on device", str(failure.value))
        self.assertEqual(sorted(n for n in os.listdir(self.root) if not n.startswith(".")), [])

    def test_writeFails(self):
        """
        A write that fails with C{ENOSPC} raises L{InsufficientStorage}.
        """
        self.setUpQueue()
        delivery = self.queue.beginDelivery(ALICE, [BOB], TRACE)

        class FullFile:
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def close(self):
                pass

        delivery._file.close()
        delivery._file = FullFile()
        with self.assertRaises(InsufficientStorage) as e:
            delivery.write(b"Subject: x\r\n\r\nhi\r\n")
        self.assertIn("No space left on device", str(e.exception))

    def test_commitFails(self):
        """
        An fsync that fails with C{ENOSPC} at commit fails the commit with
        L{InsufficientStorage} and logs one line, not a traceback.
        """
        self.setUpQueue()
        delivery = self.queue.beginDelivery(ALICE, [BOB], TRACE)
        delivery.write(BODY)

        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(os, "fsync", full)
        self.assertFullDisk(self.failureResultOf(delivery.commit()))
        self.assertEqual(self.flushLoggedErrors(), [])


class OutboundQueueContract:
    """
    What every L{IOutboundQueue} does, checked over L{OutboundQueue} and
    L{pop3gw.testing.FakeOutboundQueue}: subclasses set C{self.queue} and
    implement L{entries}.
    """

    def entries(self) -> list:
        """
        @return: the committed entries as (sender, recipients, message).
        """
        raise NotImplementedError()

    def test_interface(self):
        """
        The queue provides L{IOutboundQueue}, and its deliveries
        L{IDelivery}.
        """
        self.assertTrue(verifyObject(IOutboundQueue, self.queue))
        self.assertTrue(verifyObject(IDelivery, self.queue.beginDelivery(ALICE, [BOB])))

    def test_commit(self):
        """
        A committed message is an entry with its sender, its recipients in
        order and the trace followed by the data, written in any chunks,
        stored with CRLF line ends; nothing is queued before the commit.
        """
        delivery = self.queue.beginDelivery(ALICE, [CAROL, BOB], TRACE)
        delivery.write(BODY[:5])
        delivery.write(BODY[5:])
        self.assertEqual(self.entries(), [])
        self.assertIsNone(self.successResultOf(delivery.commit()))
        self.assertEqual(self.entries(), [(ALICE, [CAROL, BOB], TRACE + BODY.replace(b"\n", b"\r\n"))])

    def flags(self) -> list:
        """
        @return: per committed entry, whether it needs SMTPUTF8.
        """
        raise NotImplementedError()

    def test_smtputf8(self):
        """
        A message begun with C{smtputf8=True} is an entry that needs
        SMTPUTF8; one begun without it is not.
        """
        for flag in (True, False):
            delivery = self.queue.beginDelivery(ALICE, [Address.parse("j\u00f6rg@remote.example")], TRACE, smtputf8=flag)
            delivery.write(BODY)
            self.successResultOf(delivery.commit())
        self.assertEqual(sorted(self.flags()), [False, True])

    def test_nullSender(self):
        """
        The null reverse path (a bounce) is queued with sender L{None}.
        """
        delivery = self.queue.beginDelivery(None, [BOB])
        delivery.write(BODY)
        self.successResultOf(delivery.commit())
        self.assertEqual(self.entries(), [(None, [BOB], BODY.replace(b"\n", b"\r\n"))])

    def test_abort(self):
        """
        An aborted delivery leaves no entry; aborting twice is harmless.
        """
        delivery = self.queue.beginDelivery(ALICE, [BOB], TRACE)
        delivery.write(BODY)
        delivery.abort()
        delivery.abort()
        self.assertEqual(self.entries(), [])


class OutboundQueueContractTests(OutboundQueueContract, unittest.SynchronousTestCase):
    """
    The L{IOutboundQueue} contract over L{OutboundQueue}.
    """

    def setUp(self):
        self.queue = OutboundQueue(self.mktemp(), ThreadClock())

    def flags(self):
        return [entry.smtputf8 for entry in self.queue.loadEntries()]

    def entries(self):
        found = []
        for entry in self.queue.loadEntries():
            with self.queue.openMessage(entry) as f:
                found.append((entry.sender, [r.address for r in entry.recipients], f.read()))
        return found


class FakeOutboundQueueContractTests(OutboundQueueContract, unittest.SynchronousTestCase):
    """
    The L{IOutboundQueue} contract over L{pop3gw.testing.FakeOutboundQueue}.
    """

    def setUp(self):
        self.queue = FakeOutboundQueue()

    def entries(self):
        return [(sender, list(recipients), data) for sender, recipients, data in self.queue.entries]

    def flags(self):
        return list(self.queue.smtputf8)


class QueueIndexTests(QueueTestMixin, unittest.SynchronousTestCase):
    """
    Tests for the queue's index (C{.index}): a cache of the parsed C{.json}
    files that C{pop3gw queue list} and the server's start-up read instead
    of each file, which never hides, invents or misstates an entry.
    """

    def setUp(self):
        self.setUpQueue()
        # Three entries: one for three recipients, one of them delivered,
        # one failed and notified (bounced); one deferred twice (attempt
        # marker, last error); one from the null sender.
        self.many = self.enqueue(recipients=(BOB, CAROL, ERIN))
        self.many.recipients[0].state = DELIVERED
        self.many.recipients[1].fail("5.1.1", "550 no such user")
        self.many.recipients[1].notified = True
        self.successResultOf(self.queue.saveEntry(self.many))
        self.clock.advance(1)
        self.deferred = self.enqueue(recipients=(DAVE,))
        self.deferred.beginAttempt(1001.0, (300.0,), 86400.0)
        self.deferred.lastError = "dave@remote.example: 451 4.3.0 later"
        self.successResultOf(self.queue.saveEntry(self.deferred))
        self.deferred.beginAttempt(1301.0, (300.0,), 86400.0)
        self.successResultOf(self.queue.recordAttempt(self.deferred))
        self.clock.advance(1)
        self.bounce = self.enqueue(sender=None, recipients=(ALICE,))
        self.expected = (
            f"{self.many.queueId} from=alice@example.org to=erin@other.example attempts=0"
            " next=1970-01-01T00:16:40+00:00 error=-\n"
            f"{self.deferred.queueId} from=alice@example.org to=dave@remote.example attempts=2"
            " next=1970-01-01T00:26:41+00:00 error=dave@remote.example: 451 4.3.0 later\n"
            f"{self.bounce.queueId} from=<> to=alice@example.org attempts=0"
            " next=1970-01-01T00:16:42+00:00 error=-\n"
        )

    def age(self, seconds=60.0):
        """
        Make every file of the queue C{seconds} older than now (files
        written less than L{INDEX_RACY} seconds ago are not indexed).
        """
        then = time.time() - seconds
        for name in os.listdir(self.root):
            os.utime(os.path.join(self.root, name), (then, then))

    def index(self):
        """
        Age the files and have the server load the queue, which writes the
        index.

        @return: the entries loaded.
        """
        self.age()
        entries = OutboundQueue(self.root, self.clock).loadEntries()
        self.assertTrue(os.path.exists(os.path.join(self.root, INDEX_FILE)))
        return entries

    def forbidReads(self):
        """
        Make every read of a C{.json} file fail the test.
        """

        def read(path):
            self.fail(f"read {path}")

        self.patch(queuemodule, "_readRecord", read)

    def test_listTextExact(self):
        """
        L{listText} gives the lines of L{formatEntry}, oldest first: the
        pending recipients of an entry with several, the attempts and next
        time of the latest attempt marker, the last error, C{<>} for the
        null sender.
        """
        self.assertEqual(listText(self.root), self.expected)
        self.assertEqual(listText(self.root), "".join(formatEntry(e) + "\n" for e in listEntries(self.root)))

    def test_listFromIndex(self):
        """
        Once the server has loaded the queue, L{listText} and a second
        start-up read no C{.json} file, and see the same entries.
        """
        before = [e.toJSON() for e in OutboundQueue(self.root, self.clock).loadEntries()]
        self.index()
        self.forbidReads()
        self.assertEqual(listText(self.root), self.expected)
        entries = OutboundQueue(self.root, self.clock).loadEntries()
        self.assertEqual([e.toJSON() for e in entries], before)
        self.assertEqual([(e.attempts, e.nextAttempt) for e in entries], [(0, 1000.0), (2, 1601.0), (0, 1002.0)])

    def test_noIndexWithoutLoad(self):
        """
        C{queue list} (read only) writes no index.
        """
        self.age()
        listText(self.root)
        self.assertFalse(os.path.exists(os.path.join(self.root, INDEX_FILE)))

    def test_recentFilesNotIndexed(self):
        """
        A C{.json} file written less than L{INDEX_RACY} seconds before the
        load is not put in the index (its next rewrite might have the same
        time stamps): it is read again next time.
        """
        self.index()
        self.deferred.lastError = "dave@remote.example: 452 4.2.2 full"
        self.successResultOf(self.queue.saveEntry(self.deferred))
        OutboundQueue(self.root, self.clock).loadEntries()
        read = []
        self.patch(queuemodule, "_readRecord", lambda path: read.append(path) or _readRecord(path))
        self.assertIn("error=dave@remote.example: 452 4.2.2 full\n", listText(self.root))
        self.assertEqual(read, [os.path.join(self.root, self.deferred.queueId + ".json")])

    def test_entryAdded(self):
        """
        An entry committed after the index was written, by another process
        (a worker, C{pop3gw deliver}), is listed and loaded.
        """
        self.index()
        other = OutboundQueue(self.root, self.clock)
        self.queue = other
        added = self.enqueue(recipients=(CAROL,))
        self.assertIn(f"{added.queueId} from=alice@example.org to=carol@remote.example attempts=0", listText(self.root))
        self.assertIn(added.queueId, [e.queueId for e in OutboundQueue(self.root, self.clock).loadEntries()])

    def test_entryRemoved(self):
        """
        An entry removed after the index was written is neither listed nor
        loaded.
        """
        self.index()
        self.successResultOf(self.queue.removeEntry(self.many))
        self.forbidReads()
        self.assertNotIn(self.many.queueId, listText(self.root))
        self.assertEqual(
            [e.queueId for e in OutboundQueue(self.root, self.clock).loadEntries()],
            [self.deferred.queueId, self.bounce.queueId],
        )

    def test_entryRewritten(self):
        """
        An entry rewritten after the index was written is listed as it is
        now, even with the same size and modification time as before.
        """
        self.index()
        path = os.path.join(self.root, self.deferred.queueId + ".json")
        old = os.stat(path)
        self.deferred.lastError = "dave@remote.example: 452 4.3.1 full!"
        self.successResultOf(self.queue.saveEntry(self.deferred))
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
        self.assertEqual(os.stat(path).st_size, old.st_size)
        self.assertIn(f"{self.deferred.queueId} from=alice@example.org to=dave@remote.example attempts=2 "
                      "next=1970-01-01T00:26:41+00:00 error=dave@remote.example: 452 4.3.1 full!\n", listText(self.root))

    def test_attemptAfterIndex(self):
        """
        An attempt recorded after the index was written (a marker renamed,
        the C{.json} untouched) shows in the listing and the loaded entry.
        """
        self.index()
        self.bounce.beginAttempt(2000.0, (300.0,), 86400.0)
        self.successResultOf(self.queue.recordAttempt(self.bounce))
        self.forbidReads()
        self.assertIn(f"{self.bounce.queueId} from=<> to=alice@example.org attempts=1 "
                      "next=1970-01-01T00:38:20+00:00 error=-\n", listText(self.root))
        [loaded] = [e for e in OutboundQueue(self.root, self.clock).loadEntries() if e.queueId == self.bounce.queueId]
        self.assertEqual((loaded.attempts, loaded.nextAttempt), (1, 2300.0))

    def writeIndex(self, data):
        with open(os.path.join(self.root, INDEX_FILE), "wb") as f:
            f.write(data)

    def readIndex(self):
        with open(os.path.join(self.root, INDEX_FILE), "rb") as f:
            return f.read()

    def assertIgnored(self, data):
        """
        With C{data} as the index, every entry is read from its file, the
        listing is exact, and loading the queue writes a valid index again.
        """
        self.writeIndex(data)
        read = []
        self.patch(queuemodule, "_readRecord", lambda path: read.append(path) or _readRecord(path))
        self.assertEqual(listText(self.root), self.expected)
        self.assertEqual(len(read), 3)
        OutboundQueue(self.root, self.clock).loadEntries()
        self.assertNotEqual(self.readIndex(), data)
        del read[:]
        self.assertEqual(listText(self.root), self.expected)
        self.assertEqual(read, [])

    def test_corruptIndex(self):
        """
        An index that does not match its checksum is ignored.
        """
        self.index()
        data = self.readIndex()
        self.assertIgnored(data.replace(b"alice@example.org", b"mallory@example.org", 1))

    def test_truncatedIndex(self):
        """
        A truncated index is ignored.
        """
        self.index()
        self.assertIgnored(self.readIndex()[:-20])

    def test_otherVersion(self):
        """
        An index of another version is ignored.
        """
        self.index()
        data = self.readIndex()
        header, body = data.split(b"\n", 1)
        self.assertEqual(header.split()[:2], [b"pop3gw-queue-index", b"1"])
        self.assertIgnored(header.replace(b" 1 ", b" 2 ") + b"\n" + body)

    def test_malformedLines(self):
        """
        Lines of the wrong shape in an index whose checksum matches are not
        used: those entries are read from their files.
        """
        self.index()
        lines = self.readIndex().split(b"\n")[1:]
        self.assertEqual(len(lines), 3)
        # A value of the wrong type, a key field missing, broken JSON.
        bad = [lines[0].replace(b",false,[[", b',"no",[[', 1), lines[1].replace(b" ", b"  ", 1), lines[2] + b"]"]
        self.assertEqual([a != b for a, b in zip(bad, lines)], [True, True, True])
        body = b"\n".join(bad)
        self.assertIgnored(b"pop3gw-queue-index 1 " + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
