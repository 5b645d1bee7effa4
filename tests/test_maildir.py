# -*- test-case-name: tests.test_maildir -*-
"""
Tests for L{pop3gw.maildir}: one contract suite over both L{MaildirStore}
and L{pop3gw.testing.FakeMaildropStore}, then Maildir-specific behaviour.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import tracemalloc

from twisted.internet import defer
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pop3gw import maildelivery, maildir
from pop3gw.address import Address
from pop3gw.fsutil import Owner
from pop3gw.interfaces import (
    BadMessageData,
    IDelivery,
    IMaildrop,
    IMaildropStore,
    IMessageInfo,
    InsufficientStorage,
    MaildropLocked,
    PermanentFailure,
    TemporaryFailure,
)
from pop3gw.maildir import MaildirStore
from pop3gw.runner import ThreadPoolRunner
from pop3gw.testing import FakeMaildropStore, HeldRunner, ImmediateThreadPool, wireForm
from tests.util import OTHER_GID, OTHER_UID, requireRoot, tempPath, treeModesAndOwners, withUmask

ALICE = Address("alice", "example.org")
BOB = Address("bob", "example.org")
CAROL = Address("carol", "example.net")

_UNIQUE = re.compile(r"^[0-9]+\.M[0-9]{6}P[0-9]+Q[0-9]+R[0-9a-f]{16}\.testhost$")


class MaildropStoreContractMixin:
    """
    Behaviour every L{IMaildropStore} shares.  Subclasses define
    C{makeStore}.
    """

    def setUp(self) -> None:
        self.store = self.makeStore()

    def deliver(self, recipients, data: bytes, trace: bytes = b"", store=None) -> None:
        delivery = (store or self.store).beginDelivery(recipients, trace)
        delivery.write(data)
        self.assertIsNone(self.successResultOf(delivery.commit()))

    def openDrop(self, address: Address = ALICE):
        return self.successResultOf(self.store.openMaildrop(address))

    def read(self, drop, index: int) -> bytes:
        f = self.successResultOf(drop.openMessage(index))
        try:
            return f.read()
        finally:
            f.close()

    def commit(self, drop, deleted, seen=None) -> None:
        if seen is None:
            result = defer.maybeDeferred(drop.commit, deleted)
        else:
            result = defer.maybeDeferred(drop.commit, deleted, seen)
        self.successResultOf(result)

    def seenFlags(self, address: Address = ALICE) -> list:
        drop = self.openDrop(address)
        try:
            return [m.seen for m in drop.messages]
        finally:
            drop.release()

    def contents(self, address: Address = ALICE) -> list:
        drop = self.openDrop(address)
        try:
            return [self.read(drop, i) for i in range(len(drop.messages))]
        finally:
            drop.release()

    def test_interfaces(self) -> None:
        """
        The store, its maildrops, message infos and deliveries provide their
        interfaces.
        """
        self.assertTrue(verifyObject(IMaildropStore, self.store))
        delivery = self.store.beginDelivery([ALICE])
        self.assertTrue(verifyObject(IDelivery, delivery))
        delivery.write(b"x\n")
        self.successResultOf(delivery.commit())
        drop = self.openDrop()
        self.assertTrue(verifyObject(IMaildrop, drop))
        self.assertTrue(verifyObject(IMessageInfo, drop.messages[0]))
        drop.release()

    def test_emptyMaildrop(self) -> None:
        """
        A user who never got mail has an empty maildrop.
        """
        drop = self.openDrop(CAROL)
        self.assertEqual(list(drop.messages), [])
        drop.release()

    def test_deliverAndRead(self) -> None:
        """
        A delivered message is served in wire form, trace first, with a size
        equal to the served length.
        """
        self.deliver([ALICE], b"Subject: hi\n\nline\r\nlf\nend", trace=b"Received: x\r\n")
        drop = self.openDrop()
        self.assertEqual(len(drop.messages), 1)
        self.assertEqual(
            self.read(drop, 0),
            b"Received: x\r\nSubject: hi\r\n\r\nline\r\nlf\r\nend\r\n",
        )
        self.assertEqual(drop.messages[0].size, 43)
        drop.release()

    def test_sizesEqualWireForm(self) -> None:
        """
        Each message's size is the length of its wire form, whatever its line
        ends.
        """
        bodies = [b"a\n", b"a", b"a\r\n\r\n", b"\r\n\n", b"x" * 1000 + b"\r\n", b"\n"]
        for body in bodies:
            self.deliver([ALICE], body)
        drop = self.openDrop()
        self.assertEqual([m.size for m in drop.messages], [len(wireForm(b)) for b in bodies])
        self.assertEqual([self.read(drop, i) for i in range(len(bodies))], [wireForm(b) for b in bodies])
        drop.release()

    def test_orderOfDelivery(self) -> None:
        """
        Messages are listed in the order they were delivered.
        """
        for i in range(5):
            self.deliver([ALICE], b"message %d\n" % (i,))
        self.assertEqual(self.contents(), [b"message %d\r\n" % (i,) for i in range(5)])

    def test_uidsStableAndUnique(self) -> None:
        """
        UIDs are distinct, 1..70 characters in 0x21..0x7E, and the same in
        the next session.
        """
        for i in range(3):
            self.deliver([ALICE], b"m%d\n" % (i,))
        drop = self.openDrop()
        uids = [m.uid for m in drop.messages]
        drop.release()
        self.assertEqual(len(set(uids)), 3)
        for uid in uids:
            self.assertTrue(1 <= len(uid) <= 70, uid)
            self.assertTrue(all(0x21 <= ord(c) <= 0x7E for c in uid), uid)
        drop = self.openDrop()
        self.assertEqual([m.uid for m in drop.messages], uids)
        drop.release()

    def test_commitDeletes(self) -> None:
        """
        Commit removes exactly the given indexes; the others keep their UIDs.
        """
        for i in range(3):
            self.deliver([ALICE], b"m%d\n" % (i,))
        drop = self.openDrop()
        uids = [m.uid for m in drop.messages]
        self.commit(drop, [0, 2])
        drop = self.openDrop()
        self.assertEqual([m.uid for m in drop.messages], [uids[1]])
        self.assertEqual(self.read(drop, 0), b"m1\r\n")
        drop.release()

    def test_deleteOnlyAtCommit(self) -> None:
        """
        Nothing is removed before commit: a session that ends with
        C{release} leaves every message, readable.
        """
        self.deliver([ALICE], b"one\n")
        self.deliver([ALICE], b"two\n")
        drop = self.openDrop()
        drop.release()
        self.assertEqual(self.contents(), [b"one\r\n", b"two\r\n"])

    def test_commitNothing(self) -> None:
        """
        Commit with no deleted indexes removes nothing and releases the lock.
        """
        self.deliver([ALICE], b"one\n")
        drop = self.openDrop()
        self.commit(drop, [])
        self.assertEqual(self.contents(), [b"one\r\n"])

    def test_newMessagesNotSeen(self) -> None:
        """
        Delivered messages are not seen; a commit without C{seen} (or a
        release) marks nothing.
        """
        self.deliver([ALICE], b"one\n")
        self.deliver([ALICE], b"two\n")
        self.assertEqual(self.seenFlags(), [False, False])
        self.commit(self.openDrop(), [])
        self.openDrop().release()
        self.assertEqual(self.seenFlags(), [False, False])

    def test_commitSeen(self) -> None:
        """
        Commit marks the C{seen} indexes seen, for later snapshots, without
        changing UIDs, contents or order.
        """
        for i in range(3):
            self.deliver([ALICE], b"m%d\n" % (i,))
        drop = self.openDrop()
        uids = [m.uid for m in drop.messages]
        self.commit(drop, [], [0, 2])
        drop = self.openDrop()
        self.assertEqual([m.uid for m in drop.messages], uids)
        self.assertEqual([m.seen for m in drop.messages], [True, False, True])
        self.assertEqual([m.size for m in drop.messages], [4, 4, 4])
        self.assertEqual([self.read(drop, i) for i in range(3)], [b"m0\r\n", b"m1\r\n", b"m2\r\n"])
        self.commit(drop, [], [0, 1])
        self.assertEqual(self.seenFlags(), [True, True, True])

    def test_commitSeenAndDeleted(self) -> None:
        """
        An index both deleted and seen is only deleted; the others are
        marked seen.
        """
        for i in range(3):
            self.deliver([ALICE], b"m%d\n" % (i,))
        drop = self.openDrop()
        uids = [m.uid for m in drop.messages]
        self.commit(drop, [0], [0, 1])
        drop = self.openDrop()
        self.assertEqual([(m.uid, m.seen) for m in drop.messages], [(uids[1], True), (uids[2], False)])
        drop.release()

    def test_seenPerRecipient(self) -> None:
        """
        Marking one recipient's copy seen leaves the other copies unseen.
        """
        self.deliver([ALICE, BOB], b"to both\n")
        self.commit(self.openDrop(ALICE), [], [0])
        self.assertEqual(self.seenFlags(ALICE), [True])
        self.assertEqual(self.seenFlags(BOB), [False])

    def test_commitSeenBadIndex(self) -> None:
        """
        An out-of-range C{seen} index raises L{IndexError}, changes nothing
        and releases the lock.
        """
        self.deliver([ALICE], b"one\n")
        drop = self.openDrop()
        self.failureResultOf(drop.commit([0], [1]), IndexError)
        self.assertEqual(self.contents(), [b"one\r\n"])
        self.assertEqual(self.seenFlags(), [False])

    def test_secondOpenLocked(self) -> None:
        """
        A second session on a locked maildrop fails with L{MaildropLocked};
        other users' maildrops are unaffected.
        """
        drop = self.openDrop()
        self.failureResultOf(self.store.openMaildrop(ALICE), MaildropLocked)
        other = self.openDrop(BOB)
        other.release()
        drop.release()

    def test_lockReleasedAfterCommit(self) -> None:
        """
        After commit the maildrop can be opened again.
        """
        drop = self.openDrop()
        self.commit(drop, [])
        self.openDrop().release()

    def test_lockReleasedAfterRelease(self) -> None:
        """
        After release the maildrop can be opened again; release is
        idempotent.
        """
        drop = self.openDrop()
        drop.release()
        drop.release()
        again = self.openDrop()
        drop.release()
        self.failureResultOf(self.store.openMaildrop(ALICE), MaildropLocked)
        again.release()

    def test_deliveryAfterSnapshot(self) -> None:
        """
        A message delivered during a session is not in its snapshot, and
        committing every index of the snapshot does not remove it.
        """
        self.deliver([ALICE], b"old\n")
        drop = self.openDrop()
        self.deliver([ALICE], b"new\n")
        self.assertEqual(len(drop.messages), 1)
        self.commit(drop, range(len(drop.messages)))
        self.assertEqual(self.contents(), [b"new\r\n"])

    def test_multipleRecipients(self) -> None:
        """
        One delivery reaches every recipient; deleting one copy leaves the
        others.
        """
        self.deliver([ALICE, BOB, CAROL], b"to all\n")
        for user in (ALICE, BOB, CAROL):
            self.assertEqual(self.contents(user), [b"to all\r\n"])
        self.commit(self.openDrop(ALICE), [0])
        self.assertEqual(self.contents(ALICE), [])
        self.assertEqual(self.contents(BOB), [b"to all\r\n"])

    def test_abort(self) -> None:
        """
        An aborted delivery leaves nothing; abort is idempotent.
        """
        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"never\n")
        delivery.abort()
        delivery.abort()
        self.assertEqual(self.contents(), [])

    def test_chunkedWrites(self) -> None:
        """
        A message written in many chunks is stored as their concatenation.
        """
        data = b"a\r\nb\nc\nd\r\n\r\n\ne"
        delivery = self.store.beginDelivery([ALICE])
        for i in range(len(data)):
            delivery.write(data[i : i + 1])
        self.successResultOf(delivery.commit())
        self.assertEqual(self.contents(), [wireForm(data)])

    def assertRefused(self, chunks, refusedAt) -> None:
        """
        Writing C{chunks} in turn, the one at index C{refusedAt} (or the
        commit, at C{len(chunks)}) fails with L{BadMessageData}; the
        delivery then takes nothing more, and nothing is stored.
        """
        delivery = self.store.beginDelivery([ALICE])
        for chunk in chunks[:refusedAt]:
            delivery.write(chunk)
        if refusedAt < len(chunks):
            self.assertRaises(BadMessageData, delivery.write, chunks[refusedAt])
            self.assertRaises(TemporaryFailure, delivery.write, b"more\n")
        self.failureResultOf(delivery.commit())
        delivery.abort()
        self.assertEqual(self.contents(), [])

    def test_bareCRRefused(self) -> None:
        """
        A bare CR (a CR not followed by LF) is never turned into a line
        break: the write holding it fails with L{BadMessageData}, a
        L{PermanentFailure}, and nothing is stored.  A CR ending one write
        is judged by the next write, or by the commit if none follows.
        """
        self.assertTrue(issubclass(BadMessageData, PermanentFailure))
        self.assertRefused([b"Subject: hi\rFrom: ceo@example.org\n\nbody\n"], 0)
        self.assertRefused([b"Subject: hi\n", b"\nab\r\r\n"], 1)
        self.assertRefused([b"Subject: hi\r", b"From: ceo@example.org\n"], 1)
        self.assertRefused([b"Subject: hi\n\nend\r"], 1)
        self.assertRefused([b"Subject: hi\n\nend\r", b""], 2)

    def test_nulRefused(self) -> None:
        """
        A NUL octet is refused the same way, wherever it is.
        """
        self.assertRefused([b"Subject: \x00hi\n\nbody\n"], 0)
        self.assertRefused([b"Subject: hi\n\n", b"\x00"], 1)
        self.assertRefused([b"Subject: hi\r", b"\x00\n"], 1)

    def test_bareCRInTraceRefused(self) -> None:
        """
        The trace given to C{beginDelivery} obeys the same rule.
        """
        self.assertRaises(BadMessageData, self.store.beginDelivery, [ALICE], b"Received: a\rb\r\n")
        self.assertEqual(self.contents(), [])


class MaildirContractTests(MaildropStoreContractMixin, SynchronousTestCase):
    """
    The contract over L{MaildirStore}.
    """

    def makeStore(self):
        return MaildirStore(tempPath(self), hostname="testhost")


class FakeContractTests(MaildropStoreContractMixin, SynchronousTestCase):
    """
    The contract over L{FakeMaildropStore}.
    """

    def makeStore(self):
        return FakeMaildropStore()


class _QueuedReactor:
    """
    A reactor whose C{callFromThread} queues calls until L{runQueued}.
    """

    def __init__(self) -> None:
        self.queued: list = []

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.queued.append((f, args, kwargs))

    def runQueued(self) -> None:
        while self.queued:
            f, args, kwargs = self.queued.pop(0)
            f(*args, **kwargs)


class MaildirTestsMixin:
    def setUp(self) -> None:
        self.root = tempPath(self)
        self.store = MaildirStore(self.root, hostname="testhost")

    def deliver(self, recipients, data: bytes, trace: bytes = b"") -> None:
        delivery = self.store.beginDelivery(recipients, trace)
        delivery.write(data)
        self.successResultOf(delivery.commit())

    def path(self, address: Address, *parts: str) -> str:
        return os.path.join(self.root, address.domain, address.localpart, *parts)

    def listing(self, address: Address, subdir: str) -> list:
        return sorted(os.listdir(self.path(address, subdir)))

    def stored(self, address: Address = ALICE) -> list:
        """
        The contents of the files in C{new/} and C{cur/}.
        """
        out = []
        for subdir in ("new", "cur"):
            for name in self.listing(address, subdir):
                with open(self.path(address, subdir, name), "rb") as f:
                    out.append(f.read())
        return out

    def openDrop(self, address: Address = ALICE):
        return self.successResultOf(self.store.openMaildrop(address))

    def read(self, drop, index: int) -> bytes:
        with self.successResultOf(drop.openMessage(index)) as f:
            return f.read()

    def putFile(self, address: Address, subdir: str, name: str, data: bytes) -> str:
        self.store.openMaildrop(address).addCallback(lambda d: d.release())
        path = self.path(address, subdir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path


class MaildirLayoutTests(MaildirTestsMixin, SynchronousTestCase):
    """
    Where and how L{MaildirStore} stores messages.
    """

    def test_layoutAndModes(self) -> None:
        """
        The first delivery creates C{<root>/<domain>/<localpart>/} with
        C{cur}, C{new} and C{tmp}, mode 0700; the message is in C{new/}, mode
        0600, and C{tmp/} is empty.
        """
        self.deliver([ALICE], b"hello\n")
        for parts in [(), ("cur",), ("new",), ("tmp",)]:
            mode = stat.S_IMODE(os.stat(self.path(ALICE, *parts)).st_mode)
            self.assertEqual(mode & 0o077, 0, parts)
        self.assertEqual(self.listing(ALICE, "tmp"), [])
        self.assertEqual(self.listing(ALICE, "cur"), [])
        [name] = self.listing(ALICE, "new")
        self.assertEqual(stat.S_IMODE(os.stat(self.path(ALICE, "new", name)).st_mode) & 0o077, 0)

    def test_nameCarriesSizes(self) -> None:
        """
        A delivered file is named C{<unique>,S=<file size>,W=<wire size>},
        and W is the file size plus the number of LFs.
        """
        data = b"a\r\nbb\nccc\n"
        self.deliver([ALICE], data)
        [name] = self.listing(ALICE, "new")
        unique, sizes = name.split(",", 1)
        self.assertRegex(unique, _UNIQUE)
        self.assertEqual(sizes, "S=%d,W=%d" % (len(b"a\nbb\nccc\n"), len(wireForm(data))))
        self.assertEqual(os.path.getsize(self.path(ALICE, "new", name)), 9)

    def test_uidIsUniqueName(self) -> None:
        """
        The UIDL of a delivered message is its unique name, without sizes.
        """
        self.deliver([ALICE], b"x\n")
        [name] = self.listing(ALICE, "new")
        drop = self.openDrop()
        self.assertEqual(drop.messages[0].uid, name.split(",")[0])
        drop.release()

    def test_uniqueNamesDiffer(self) -> None:
        """
        Two deliveries at the same instant get different unique names.
        """
        self.store._now = lambda: 1700000000.25
        self.deliver([ALICE], b"1\n")
        self.deliver([ALICE], b"2\n")
        names = self.listing(ALICE, "new")
        self.assertEqual(len(names), 2)
        for name in names:
            self.assertTrue(name.startswith("1700000000.M250000P%d" % (os.getpid(),)), name)

    def test_hostnameEscaped(self) -> None:
        """
        C{/}, C{:} and C{,} in the host name are escaped in octal, so the name
        stays one path component with no info or size field.
        """
        store = MaildirStore(self.root, hostname="a/b:c,d")
        delivery = store.beginDelivery([ALICE])
        delivery.write(b"x\n")
        self.successResultOf(delivery.commit())
        [name] = self.listing(ALICE, "new")
        self.assertTrue(name.split(",S=")[0].endswith(".a\\057b\\072c\\054d"), name)

    def test_lineEndsByteByByte(self) -> None:
        """
        CRLF and LF become LF even when written one byte at a time (a CR
        ending one write and an LF starting the next are one line end), and
        the stored file ends with LF.
        """
        data = b"a\r\nb\nc\nd\r\n\r\n\ne"
        delivery = self.store.beginDelivery([ALICE])
        for i in range(len(data)):
            delivery.write(data[i : i + 1])
        self.successResultOf(delivery.commit())
        self.assertEqual(self.stored(), [b"a\nb\nc\nd\n\n\ne\n"])

    def test_crlfSplitAcrossWrites(self) -> None:
        """
        CR at the end of one write and LF at the start of the next make one
        line end, not two, also with empty writes between them.
        """
        delivery = self.store.beginDelivery([ALICE])
        for chunk in [b"a\r", b"\nb\r", b"", b"\n\r", b"\nc", b""]:
            delivery.write(chunk)
        self.successResultOf(delivery.commit())
        self.assertEqual(self.stored(), [b"a\nb\n\nc\n"])

    def test_traceConverted(self) -> None:
        """
        The trace is prepended with the same conversion, as one stream with
        the body.
        """
        self.deliver([ALICE], b"\nBody\r\n", trace=b"Received: a\r\n\tb\r")
        self.assertEqual(self.stored(), [b"Received: a\n\tb\nBody\n"])

    def test_emptyMessage(self) -> None:
        """
        An empty message is stored empty and served as zero octets.
        """
        self.deliver([ALICE], b"")
        self.assertEqual(self.stored(), [b""])
        drop = self.openDrop()
        self.assertEqual(drop.messages[0].size, 0)
        self.assertEqual(self.read(drop, 0), b"")
        drop.release()

    def test_largeWriteBuffered(self) -> None:
        """
        Writes beyond the buffer size reach the tmp file before commit.
        """
        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"x" * (maildir.WRITE_BUFFER + 1))
        [name] = self.listing(ALICE, "tmp")
        self.assertEqual(os.path.getsize(self.path(ALICE, "tmp", name)), maildir.WRITE_BUFFER + 1)
        delivery.abort()
        self.assertEqual(self.listing(ALICE, "tmp"), [])

    def test_hardLinkedRecipients(self) -> None:
        """
        Recipients on one file system share one inode; removing one link
        leaves the other.
        """
        self.deliver([ALICE, BOB], b"shared\n")
        [a] = self.listing(ALICE, "new")
        [b] = self.listing(BOB, "new")
        self.assertEqual(a, b)
        sa = os.stat(self.path(ALICE, "new", a))
        sb = os.stat(self.path(BOB, "new", b))
        self.assertEqual(sa.st_ino, sb.st_ino)
        self.assertEqual(sa.st_nlink, 2)
        self.assertEqual(self.listing(ALICE, "tmp"), [])
        drop = self.openDrop(ALICE)
        self.successResultOf(drop.commit([0]))
        self.assertEqual(self.stored(BOB), [b"shared\n"])

    def test_crossDeviceCopy(self) -> None:
        """
        If linking fails with C{EXDEV}, the message is copied into the other
        maildrop through its C{tmp/}, and no tmp file remains.
        """
        realLink = os.link

        def link(src, dst):
            if self.path(BOB) in dst and self.path(ALICE) in src:
                raise OSError(errno.EXDEV, "cross-device link")
            return realLink(src, dst)

        self.patch(os, "link", link)
        self.deliver([ALICE, BOB], b"copied\n")
        self.assertEqual(self.stored(ALICE), [b"copied\n"])
        self.assertEqual(self.stored(BOB), [b"copied\n"])
        self.assertEqual(self.listing(ALICE, "new"), self.listing(BOB, "new"))
        self.assertNotEqual(
            os.stat(self.path(ALICE, "new", self.listing(ALICE, "new")[0])).st_ino,
            os.stat(self.path(BOB, "new", self.listing(BOB, "new")[0])).st_ino,
        )
        self.assertEqual(self.listing(ALICE, "tmp"), [])
        self.assertEqual(self.listing(BOB, "tmp"), [])

    def test_duplicateRecipients(self) -> None:
        """
        A recipient listed twice gets the message once.
        """
        self.deliver([ALICE, ALICE, BOB, ALICE], b"once\n")
        self.assertEqual(self.stored(ALICE), [b"once\n"])
        self.assertEqual(self.stored(BOB), [b"once\n"])

    def test_noRecipients(self) -> None:
        """
        A delivery needs at least one recipient.
        """
        self.assertRaises(ValueError, self.store.beginDelivery, [])

    def recordFileSystemCalls(self) -> list:
        """
        Record the C{fsync}, C{link}, C{unlink} and C{rename} calls made
        from now on (and still make them): C{("fsync", file name or
        directory path)}, C{("link", to directory)}, C{("unlink", in
        directory)}, C{("rename", from directory, to directory)}.
        """
        events: list = []
        realFsync, realLink, realUnlink, realRename = os.fsync, os.link, os.unlink, os.rename

        def fsync(fd):
            target = os.readlink("/proc/self/fd/%d" % (fd,))
            events.append(("fsync", os.path.basename(target) if not os.path.isdir(target) else target))
            return realFsync(fd)

        def link(src, dst):
            events.append(("link", os.path.dirname(dst)))
            return realLink(src, dst)

        def unlink(path):
            events.append(("unlink", os.path.dirname(path)))
            return realUnlink(path)

        def rename(src, dst):
            events.append(("rename", os.path.dirname(src), os.path.dirname(dst)))
            return realRename(src, dst)

        self.patch(os, "fsync", fsync)
        self.patch(os, "link", link)
        self.patch(os, "unlink", unlink)
        self.patch(os, "rename", rename)
        return events

    def test_durabilityOrder(self) -> None:
        """
        Commit fsyncs the file before moving it from C{tmp/} into C{new/}
        (one C{rename}: nothing is left to remove), then fsyncs C{new/};
        neither C{link} nor C{unlink} is used for a single recipient.
        """
        self.deliver([ALICE], b"first\n")
        events = self.recordFileSystemCalls()
        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"second\n")
        self.assertEqual(self.listing(ALICE, "tmp"), [])
        self.successResultOf(delivery.commit())
        tmpName = delivery.uniqueName
        newDir = os.path.abspath(self.path(ALICE, "new"))
        tmpDir = os.path.abspath(self.path(ALICE, "tmp"))
        self.assertEqual(
            events,
            [
                ("fsync", tmpName),
                ("rename", tmpDir, newDir),
                ("fsync", newDir),
            ],
        )
        self.assertEqual(self.listing(ALICE, "tmp"), [])

    def test_durabilityOrderSeveralRecipients(self) -> None:
        """
        With several recipients the file is fsynced, linked into every other
        recipient's C{new/}, then moved into the first's; every C{new/} is
        fsynced after the last of them, and the tmp name is gone.
        """
        self.deliver([ALICE, BOB], b"first\n")
        events = self.recordFileSystemCalls()
        delivery = self.store.beginDelivery([ALICE, BOB])
        delivery.write(b"second\n")
        self.successResultOf(delivery.commit())
        aliceNew = os.path.abspath(self.path(ALICE, "new"))
        bobNew = os.path.abspath(self.path(BOB, "new"))
        tmpDir = os.path.abspath(self.path(ALICE, "tmp"))
        self.assertEqual(
            events[:3], [("fsync", delivery.uniqueName), ("link", bobNew), ("rename", tmpDir, aliceNew)]
        )
        self.assertEqual(sorted(events[3:]), sorted([("fsync", aliceNew), ("fsync", bobNew)]))
        self.assertEqual(self.listing(ALICE, "tmp"), [])
        self.assertEqual(len(self.listing(ALICE, "new")), 2)
        self.assertEqual(len(self.listing(BOB, "new")), 2)

    def test_existingMaildropNotLookedAt(self) -> None:
        """
        A delivery to an existing maildrop creates its tmp file at once: no
        C{stat} of the maildrop's directories.
        """
        self.deliver([ALICE], b"first\n")
        looked = []
        realStat = os.stat

        def stat(path, *args, **kwargs):
            looked.append(path)
            return realStat(path, *args, **kwargs)

        self.patch(os, "stat", stat)
        self.deliver([ALICE], b"second\n")
        self.assertEqual(looked, [])
        self.assertEqual(len(self.listing(ALICE, "new")), 2)

    def test_missingNewCompleted(self) -> None:
        """
        A maildrop whose C{new/} was removed (its C{tmp/} is there) gets it
        back at the next delivery, which succeeds.
        """
        self.deliver([ALICE], b"first\n")
        shutil.rmtree(self.path(ALICE, "new"))
        self.deliver([ALICE], b"second\n")
        self.assertEqual(self.stored(ALICE), [b"second\n"])
        self.assertEqual(self.listing(ALICE, "tmp"), [])

    def test_otherRecipientsMaildropCreated(self) -> None:
        """
        A message for an existing maildrop and a new one creates the new
        one, with its C{cur/}, C{new/} and C{tmp/}, when it is linked there.
        """
        self.deliver([ALICE], b"first\n")
        self.assertFalse(os.path.exists(self.path(BOB)))
        self.deliver([ALICE, BOB], b"both\n")
        self.assertEqual(self.stored(BOB), [b"both\n"])
        self.assertEqual(sorted(os.listdir(self.path(BOB))), ["cur", "new", "tmp"])
        self.assertEqual(self.listing(ALICE, "tmp"), [])

    def test_newMaildirDirectoriesFsynced(self) -> None:
        """
        Creating a maildrop fsyncs the parent of every directory it makes,
        the store's missing root included.
        """
        synced = []
        realFsync = os.fsync

        def fsync(fd):
            synced.append(os.readlink("/proc/self/fd/%d" % (fd,)))
            return realFsync(fd)

        self.patch(os, "fsync", fsync)
        self.store.openMaildrop(ALICE).addCallback(lambda d: d.release())
        root = os.path.abspath(self.root)
        drop = os.path.join(root, "example.org", "alice")
        self.assertEqual(synced, [os.path.dirname(root), root, os.path.dirname(drop), drop, drop, drop])


class MaildirFailureTests(MaildirTestsMixin, SynchronousTestCase):
    """
    Disk trouble during delivery and sessions.
    """

    def assertNothingLeft(self, *addresses: Address) -> None:
        for address in addresses:
            for subdir in ("tmp", "new", "cur"):
                self.assertEqual(self.listing(address, subdir), [], (address, subdir))

    def test_fsyncENOSPC(self) -> None:
        """
        C{ENOSPC} from fsync fails the commit with L{InsufficientStorage}
        (a L{TemporaryFailure}) naming the error in words, and leaves no
        file in any C{tmp/} or C{new/}.
        """

        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        for user in (ALICE, BOB):
            self.store._ensureMaildir(self.store.maildirPath(user))
        delivery = self.store.beginDelivery([ALICE, BOB])
        delivery.write(b"doomed\n")
        self.patch(os, "fsync", fsync)
        failure = self.failureResultOf(delivery.commit(), InsufficientStorage)
        self.assertIsInstance(failure.value, TemporaryFailure)
        self.assertEqual(str(failure.value), "cannot deliver message: No space left on device")
        self.assertEqual(delivery.state, "failed")
        delivery.abort()
        self.assertNothingLeft(ALICE, BOB)

    def test_writeENOSPC(self) -> None:
        """
        C{ENOSPC} while writing raises L{TemporaryFailure} from C{write},
        removes the tmp file, and later writes and commit fail too.
        """
        realWrite = os.write

        def write(fd, data):
            if len(data) > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return realWrite(fd, data)

        self.patch(os, "write", write)
        delivery = self.store.beginDelivery([ALICE])
        self.assertRaises(InsufficientStorage, delivery.write, b"y" * maildir.WRITE_BUFFER)
        self.assertNothingLeft(ALICE)
        self.assertRaises(TemporaryFailure, delivery.write, b"z")
        self.failureResultOf(delivery.commit(), TemporaryFailure)
        delivery.abort()

    def test_commitFlushENOSPC(self) -> None:
        """
        C{ENOSPC} writing the buffered tail at commit fails the commit and
        leaves nothing.
        """

        def write(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"tail")
        self.patch(os, "write", write)
        self.failureResultOf(delivery.commit(), InsufficientStorage)
        self.assertNothingLeft(ALICE)

    def test_writeEDQUOT(self) -> None:
        """
        An exhausted disk quota (C{EDQUOT}) is insufficient storage too.
        """

        def write(fd, data):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"tail")
        self.patch(os, "write", write)
        failure = self.failureResultOf(delivery.commit(), InsufficientStorage)
        self.assertEqual(str(failure.value), "cannot deliver message: Disk quota exceeded")
        self.assertNothingLeft(ALICE)

    def test_beginDeliveryENOSPC(self) -> None:
        """
        C{ENOSPC} creating the tmp file fails the commit with
        L{InsufficientStorage}.
        """
        self.deliver([ALICE], b"x\n")
        realOpen = os.open

        def open(path, flags, mode=0o777, **kwargs):
            if "/tmp/" in path:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return realOpen(path, flags, mode, **kwargs)

        self.patch(os, "open", open)
        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"x\n")
        failure = self.failureResultOf(delivery.commit(), InsufficientStorage)
        self.assertEqual(str(failure.value), "cannot start delivery: No space left on device")

    def test_otherErrorsNotStorage(self) -> None:
        """
        Other I/O errors stay plain L{TemporaryFailure}s, not
        L{InsufficientStorage}.
        """

        def write(fd, data):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"tail")
        self.patch(os, "write", write)
        failure = self.failureResultOf(delivery.commit(), TemporaryFailure)
        self.assertNotIsInstance(failure.value, InsufficientStorage)
        self.assertEqual(str(failure.value), "cannot deliver message: Input/output error")

    def assertTwoRecipientCommitUndone(self, name: str, replacement) -> None:
        """
        With both maildrops there, a commit to alice and bob whose C{os}
        function C{name} is C{replacement} (patched once the message is
        written) fails with L{TemporaryFailure} and leaves nothing in
        either maildrop.
        """
        for user in (ALICE, BOB):
            self.store._ensureMaildir(self.store.maildirPath(user))
        delivery = self.store.beginDelivery([ALICE, BOB])
        delivery.write(b"x\n")
        self.patch(os, name, replacement)
        self.failureResultOf(delivery.commit(), TemporaryFailure)
        self.assertNothingLeft(ALICE, BOB)

    def test_linkFailureUndone(self) -> None:
        """
        If linking into the second recipient's C{new/} fails, the first
        recipient's link is removed too.
        """
        realLink = os.link

        def link(src, dst):
            if self.path(BOB) in dst:
                raise OSError(errno.EIO, "I/O error")
            return realLink(src, dst)

        self.assertTwoRecipientCommitUndone("link", link)

    def test_renameFailureUndone(self) -> None:
        """
        If moving the file into the first recipient's C{new/} fails, the
        link already made into the second recipient's is removed, and no
        tmp file is left.
        """

        def rename(src, dst):
            raise OSError(errno.EIO, "I/O error")

        self.assertTwoRecipientCommitUndone("rename", rename)

    def test_directoryFsyncFailureUndone(self) -> None:
        """
        If fsyncing a C{new/} directory fails, every link is removed.
        """
        realFsync = os.fsync

        def fsync(fd):
            if os.path.isdir("/proc/self/fd/%d" % (fd,)):
                raise OSError(errno.EIO, "I/O error")
            return realFsync(fd)

        self.assertTwoRecipientCommitUndone("fsync", fsync)

    def test_crossDeviceCopyFailureUndone(self) -> None:
        """
        A failing cross-device copy leaves no copy in the other C{tmp/}.
        """
        realFsync = os.fsync

        def link(src, dst):
            raise OSError(errno.EXDEV, "cross-device link")

        def fsync(fd):
            if self.path(BOB, "tmp") in os.readlink("/proc/self/fd/%d" % (fd,)):
                raise OSError(errno.ENOSPC, "No space left on device")
            return realFsync(fd)

        delivery = self.store.beginDelivery([ALICE, BOB])
        delivery.write(b"x\n")
        self.patch(os, "link", link)
        self.patch(os, "fsync", fsync)
        self.failureResultOf(delivery.commit(), TemporaryFailure)
        self.assertNothingLeft(ALICE, BOB)

    def test_beginDeliveryFailure(self) -> None:
        """
        A maildrop that cannot be created fails the delivery's commit with
        L{TemporaryFailure} (with a runner that works at once).
        """
        os.makedirs(os.path.join(self.root, "example.org"))
        with open(self.path(ALICE), "wb"):
            pass
        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"x\n")
        self.failureResultOf(delivery.commit(), TemporaryFailure)
        self.failureResultOf(self.store.openMaildrop(ALICE), TemporaryFailure)

    def test_commitAfterCommit(self) -> None:
        """
        A delivery commits once; a second commit fails and leaves the
        message.
        """
        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"x\n")
        self.successResultOf(delivery.commit())
        self.assertEqual(delivery.state, "committed")
        self.failureResultOf(delivery.commit(), TemporaryFailure)
        delivery.abort()
        self.assertEqual(self.stored(), [b"x\n"])

    def test_snapshotFailureReleasesLock(self) -> None:
        """
        An I/O error while taking the snapshot fails with
        L{TemporaryFailure} and does not keep the lock.
        """
        self.openDrop().release()
        os.rmdir(self.path(ALICE, "cur"))
        with open(self.path(ALICE, "cur"), "wb"):
            pass
        self.failureResultOf(self.store.openMaildrop(ALICE), TemporaryFailure)
        os.unlink(self.path(ALICE, "cur"))
        os.mkdir(self.path(ALICE, "cur"))
        self.openDrop().release()

    def test_commitUnlinkFailure(self) -> None:
        """
        An unlink error at commit raises L{TemporaryFailure}, still removes
        the other messages, and releases the lock.
        """
        self.deliver([ALICE], b"1\n")
        self.deliver([ALICE], b"2\n")
        drop = self.openDrop()
        first = os.path.join(drop.path, "new", self.listing(ALICE, "new")[0])
        realUnlink = os.unlink

        def unlink(path):
            if path == first:
                raise OSError(errno.EIO, "I/O error")
            return realUnlink(path)

        self.patch(os, "unlink", unlink)
        self.failureResultOf(drop.commit([0, 1]), TemporaryFailure)
        self.assertEqual(self.stored(), [b"1\n"])
        self.openDrop().release()

    def test_commitVanishedCountsAsDeleted(self) -> None:
        """
        A message removed by someone else during the session counts as
        deleted at commit.
        """
        self.deliver([ALICE], b"1\n")
        drop = self.openDrop()
        for name in self.listing(ALICE, "new"):
            os.unlink(self.path(ALICE, "new", name))
        self.assertIsNone(self.successResultOf(drop.commit([0])))
        self.openDrop().release()

    def test_openVanished(self) -> None:
        """
        Opening a message removed by someone else fails with
        L{TemporaryFailure}.
        """
        self.deliver([ALICE], b"1\n")
        drop = self.openDrop()
        for name in self.listing(ALICE, "new"):
            os.unlink(self.path(ALICE, "new", name))
        self.failureResultOf(drop.openMessage(0), TemporaryFailure)
        drop.release()

    def test_openChangedSize(self) -> None:
        """
        A message whose file changed size during the session fails with
        L{TemporaryFailure} rather than being served with a wrong size.
        """
        self.deliver([ALICE], b"1\n")
        drop = self.openDrop()
        [name] = self.listing(ALICE, "new")
        with open(self.path(ALICE, "new", name), "ab") as f:
            f.write(b"more\n")
        self.failureResultOf(drop.openMessage(0), TemporaryFailure)
        drop.release()

    def test_useAfterRelease(self) -> None:
        """
        A released maildrop cannot be read or committed.
        """
        self.deliver([ALICE], b"1\n")
        drop = self.openDrop()
        drop.release()
        self.failureResultOf(drop.openMessage(0), TemporaryFailure)
        self.failureResultOf(drop.commit([0]), TemporaryFailure)
        self.assertEqual(self.stored(), [b"1\n"])

    def test_badIndex(self) -> None:
        """
        Out-of-range indexes raise L{IndexError}; a bad commit still
        releases the lock and deletes nothing.
        """
        self.deliver([ALICE], b"1\n")
        drop = self.openDrop()
        self.failureResultOf(drop.openMessage(1), IndexError)
        self.failureResultOf(drop.openMessage(-1), IndexError)
        self.failureResultOf(drop.commit([0, 5]), IndexError)
        self.assertEqual(self.stored(), [b"1\n"])
        self.openDrop().release()


class ForeignFileTests(MaildirTestsMixin, SynchronousTestCase):
    """
    Files put into a maildrop by other tools.
    """

    def test_noSizeCRLF(self) -> None:
        """
        A file without sizes in its name, with CRLF line ends and no final
        newline, is served correctly and renamed into C{cur/} with C{S=},
        C{W=} and C{:2,}; its UIDL is its unique name.
        """
        data = b"Subject: x\r\n\r\nbody\r\nlast"
        self.putFile(ALICE, "new", "1600000000.foreign.example", data)
        drop = self.openDrop()
        self.assertEqual(drop.messages[0].size, len(wireForm(data)))
        self.assertEqual(drop.messages[0].uid, "1600000000.foreign.example")
        self.assertEqual(self.read(drop, 0), wireForm(data))
        self.assertEqual(self.listing(ALICE, "new"), [])
        self.assertEqual(
            self.listing(ALICE, "cur"),
            ["1600000000.foreign.example,S=%d,W=%d:2," % (len(data), len(wireForm(data)))],
        )
        drop.release()

    def test_sizeOnlyWithFlags(self) -> None:
        """
        A file with C{,S=} only and flags gets C{,W=} added in place, its
        flags and UIDL kept.
        """
        data = b"a\nb\r\n"
        self.putFile(ALICE, "cur", "1600000000.x.example,S=%d:2,RS" % (len(data),), data)
        drop = self.openDrop()
        self.assertEqual(drop.messages[0].size, 6)
        self.assertEqual(drop.messages[0].uid, "1600000000.x.example")
        self.assertEqual(self.listing(ALICE, "cur"), ["1600000000.x.example,S=5,W=6:2,RS"])
        drop.release()

    def test_readOnce(self) -> None:
        """
        A foreign file is read to size it at the first snapshot only; later
        snapshots trust its name.
        """
        self.putFile(ALICE, "new", "1600000000.once", b"x\r\n")
        self.openDrop().release()
        self.patch(maildir, "_measureFile", lambda path: self.fail("file read again"))
        drop = self.openDrop()
        self.assertEqual(drop.messages[0].size, 3)
        self.assertEqual(drop.messages[0].uid, "1600000000.once")
        drop.release()

    def test_wrongSizeRecomputed(self) -> None:
        """
        Sizes in a name are trusted at login without a C{stat} (a large
        maildrop is listed from its directory entries alone).  A name
        whose C{S=} disagrees with the file fails when the message is
        opened, and loses its sizes then, so the next login measures the
        file again and renames it; its UIDL never changes.
        """
        self.putFile(ALICE, "cur", "1600000000.liar,S=1,W=2:2,", b"line\nline\n")
        drop = self.openDrop()
        self.assertEqual(drop.messages[0], maildir.MaildirMessageInfo(2, "1600000000.liar"))
        self.failureResultOf(drop.openMessage(0), TemporaryFailure)
        self.assertEqual(self.listing(ALICE, "cur"), ["1600000000.liar:2,"])
        drop.release()
        drop = self.openDrop()
        self.assertEqual(drop.messages[0], maildir.MaildirMessageInfo(12, "1600000000.liar"))
        self.assertEqual(self.listing(ALICE, "cur"), ["1600000000.liar,S=10,W=12:2,"])
        with self.successResultOf(drop.openMessage(0)) as f:
            self.assertEqual(f.read(), b"line\r\nline\r\n")
        drop.release()

    def test_listingOrderAndViews(self) -> None:
        """
        Messages are numbered by the leading number of their unique names
        (as a number, then as text), a name in both C{new/} and C{cur/} is
        listed once, and going through C{messages} gives what indexing it
        gives: sizes, UIDLs (a digest for an unusable unique name) and seen
        flags.
        """
        long = "1600000003." + "x" * 80
        self.putFile(ALICE, "cur", "99.b,S=2,W=3:2,S", b"x\n")
        self.putFile(ALICE, "new", "100.a,S=2,W=3", b"x\n")
        self.putFile(ALICE, "cur", "100.a,S=2,W=3:2,", b"x\n")
        self.putFile(ALICE, "new", "1600000002.c", b"yy\n")
        self.putFile(ALICE, "cur", long + ",S=2,W=3:2,FS", b"x\n")
        self.putFile(ALICE, "cur", "1600000001.d,S=4,W=5:2,RS", b"abc\n")
        drop = self.openDrop()
        expected = [
            maildir.MaildirMessageInfo(3, "99.b", True),
            maildir.MaildirMessageInfo(3, "100.a", False),
            maildir.MaildirMessageInfo(5, "1600000001.d", True),
            maildir.MaildirMessageInfo(4, "1600000002.c", False),
            maildir.MaildirMessageInfo(3, maildir.uidForKey(long), True),
        ]
        self.assertEqual(list(drop.messages), expected)
        self.assertEqual([drop.messages[i] for i in range(len(drop.messages))], expected)
        self.assertEqual(drop.messages[-1], expected[-1])
        self.assertEqual(drop.messages[1:3], expected[1:3])
        self.assertRaises(IndexError, drop.messages.__getitem__, 5)
        with self.successResultOf(drop.openMessage(3)) as f:
            self.assertEqual(f.read(), b"yy\r\n")
        drop.release()

    def test_plainNamesNotStatted(self) -> None:
        """
        A maildrop whose names all carry both sizes is listed without a
        C{stat} of any message file; a directory or a symbolic link with
        such a name is still left out.
        """
        self.deliver([ALICE], b"x\n")
        self.deliver([ALICE], b"y\n")
        path = self.store.maildirPath(ALICE)
        os.mkdir(os.path.join(path, "cur", "1600000000.dir,S=1,W=2:2,"))
        os.symlink("/etc/passwd", os.path.join(path, "cur", "1600000000.link,S=1,W=2:2,"))
        self.openDrop().release()
        stats: list = []
        realStat = os.DirEntry.stat

        class Entry:
            def __init__(self, entry: os.DirEntry) -> None:
                self._entry = entry
                self.name = entry.name

            def is_file(self, follow_symlinks: bool = True) -> bool:
                return self._entry.is_file(follow_symlinks=follow_symlinks)

            def stat(self, follow_symlinks: bool = True):
                stats.append(self.name)
                return realStat(self._entry, follow_symlinks=follow_symlinks)

        realScandir = os.scandir

        class Scandir:
            def __init__(self, p: str) -> None:
                self._it = realScandir(p)

            def __enter__(self):
                return (Entry(e) for e in self._it)

            def __exit__(self, *exc: object) -> None:
                self._it.close()

        self.patch(os, "scandir", Scandir)
        drop = self.openDrop()
        self.assertEqual([m.size for m in drop.messages], [3, 3])
        self.assertEqual(stats, [])
        drop.release()

    def test_otherFieldsKept(self) -> None:
        """
        Comma fields other than C{S=}/C{W=} stay in the name and the UIDL.
        """
        self.putFile(ALICE, "new", "1600000000.y,X=1", b"q")
        drop = self.openDrop()
        self.assertEqual(drop.messages[0].uid, "1600000000.y,X=1")
        self.assertEqual(self.listing(ALICE, "cur"), ["1600000000.y,X=1,S=1,W=3:2,"])
        drop.release()

    def test_uidUnchangedByFlags(self) -> None:
        """
        Another tool moving a message to C{cur/} and adding flags does not
        change its UIDL.
        """
        self.deliver([ALICE], b"x\n")
        drop = self.openDrop()
        uid = drop.messages[0].uid
        drop.release()
        [name] = self.listing(ALICE, "new")
        os.rename(self.path(ALICE, "new", name), self.path(ALICE, "cur", name + ":2,"))
        drop = self.openDrop()
        self.assertEqual(drop.messages[0].uid, uid)
        drop.release()
        os.rename(self.path(ALICE, "cur", name + ":2,"), self.path(ALICE, "cur", name + ":2,S"))
        drop = self.openDrop()
        self.assertEqual(drop.messages[0].uid, uid)
        drop.release()

    def test_renamedDuringSession(self) -> None:
        """
        A message renamed by another tool during the session is still read
        and deleted.
        """
        self.deliver([ALICE], b"x\n")
        drop = self.openDrop()
        [name] = self.listing(ALICE, "new")
        os.rename(self.path(ALICE, "new", name), self.path(ALICE, "cur", name + ":2,S"))
        self.assertEqual(self.read(drop, 0), b"x\r\n")
        os.rename(self.path(ALICE, "cur", name + ":2,S"), self.path(ALICE, "cur", name + ":2,RS"))
        self.successResultOf(drop.commit([0]))
        self.assertEqual(self.stored(), [])

    def test_uidCharsetAndLength(self) -> None:
        """
        A unique name longer than 70 characters or with characters outside
        0x21..0x7E gets a digest UIDL, C{"H"} and 40 hex digits.
        """
        long = "1600000001." + "a" * 70
        spaced = "1600000002.with space"
        accented = "1600000003.caf\u00e9"
        exact = "1600000004." + "b" * 59
        for name in (long, spaced, accented, exact):
            self.putFile(ALICE, "cur", name + ":2,", b"x\n")
        drop = self.openDrop()
        uids = [m.uid for m in drop.messages]
        drop.release()
        for name, uid in zip((long, spaced, accented), uids):
            expected = "H" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:40]
            self.assertEqual(uid, expected)
        self.assertEqual(uids[3], exact)
        self.assertEqual(len(exact), 70)

    def test_ignored(self) -> None:
        """
        Dot files, directories, symlinks and files in C{tmp/} are not
        messages.
        """
        self.putFile(ALICE, "new", ".hidden", b"x")
        self.putFile(ALICE, "tmp", "1600000000.partial", b"x")
        os.mkdir(self.path(ALICE, "cur", "1600000000.dir"))
        os.symlink("/etc/passwd", self.path(ALICE, "cur", "1600000000.link"))
        drop = self.openDrop()
        self.assertEqual(list(drop.messages), [])
        drop.release()

    def test_order(self) -> None:
        """
        Messages are ordered by the leading integer of the name (numerically),
        then by the name; names without one come first.
        """
        for name in ["10.b", "9.z", "10.a", "nodate", "100.a"]:
            self.putFile(ALICE, "new", name, name.encode("ascii"))
        drop = self.openDrop()
        self.assertEqual([m.uid for m in drop.messages], ["nodate", "9.z", "10.a", "10.b", "100.a"])
        drop.release()

    def test_unreadableFileSkipped(self) -> None:
        """
        A foreign file that cannot be read (permissions, I/O error) is left
        out of the snapshot with a warning instead of making every login
        fail; the other messages are served and the file stays untouched.
        """
        self.openDrop().release()
        for name in ("1600000000.good", "1600000001.unreadable", "1600000002.broken"):
            with open(self.path(ALICE, "new", name), "wb") as f:
                f.write(name.encode("ascii") + b"\n")
        bad = self.path(ALICE, "new", "1600000001.unreadable")
        measure = maildir._measureFile
        errors = {"1600000001.unreadable": errno.EACCES, "1600000002.broken": errno.EIO}

        def failing(path):
            code = errors.get(os.path.basename(path))
            if code is not None:
                raise OSError(code, os.strerror(code), path)
            return measure(path)

        self.patch(maildir, "_measureFile", failing)
        logged: list = []
        self.patch(maildir, "_log", Logger(observer=logged.append))
        drop = self.openDrop()
        self.assertEqual([m.uid for m in drop.messages], ["1600000000.good"])
        self.assertEqual(self.read(drop, 0), b"1600000000.good\r\n")
        self.successResultOf(drop.commit([0]))
        self.assertTrue(os.path.exists(bad))
        self.assertEqual(
            sorted(formatEvent(e) for e in logged),
            [
                "Skipping unreadable message 1600000001.unreadable: Permission denied",
                "Skipping unreadable message 1600000002.broken: Input/output error",
            ],
        )

    def test_snapshotResourceErrorFails(self) -> None:
        """
        Running out of file descriptors while measuring a file is a
        temporary failure of the whole login, not a silently shorter
        maildrop.
        """
        self.putFile(ALICE, "new", "1600000000.x", b"x\n")

        def failing(path):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)

        self.patch(maildir, "_measureFile", failing)
        self.failureResultOf(self.store.openMaildrop(ALICE), TemporaryFailure)

    def test_sameKeyInNewAndCur(self) -> None:
        """
        A unique name present in both C{new/} and C{cur/} is listed once.
        """
        self.putFile(ALICE, "new", "1600000000.dup,S=2,W=3", b"x\n")
        self.putFile(ALICE, "cur", "1600000000.dup,S=2,W=3:2,S", b"x\n")
        drop = self.openDrop()
        self.assertEqual([m.uid for m in drop.messages], ["1600000000.dup"])
        drop.release()


class SeenFlagTests(MaildirTestsMixin, SynchronousTestCase):
    """
    L{MaildirMaildrop.commit} records retrieved messages with the standard
    Maildir C{S} flag, as Dovecot does for POP3.
    """

    def logged(self) -> list:
        events: list = []
        self.patch(maildir, "_log", Logger(observer=events.append))
        return events

    def test_newMovesToCur(self) -> None:
        """
        A message in C{new/} flagged seen moves to C{cur/} as
        C{<name>:2,S}; its UIDL and size stay the same.
        """
        self.deliver([ALICE], b"x\n")
        [name] = self.listing(ALICE, "new")
        drop = self.openDrop()
        before = drop.messages[0]
        self.assertFalse(before.seen)
        self.assertIsNone(self.successResultOf(drop.commit([], [0])))
        self.assertEqual(self.listing(ALICE, "new"), [])
        self.assertEqual(self.listing(ALICE, "cur"), [name + ":2,S"])
        drop = self.openDrop()
        self.assertEqual(drop.messages[0], maildir.MaildirMessageInfo(before.size, before.uid, True))
        drop.release()

    def test_flagsKeptSorted(self) -> None:
        """
        C{S} joins the existing flags in ASCII order (Dovecot keywords, in
        lower case, come after); other fields of the name are kept.
        """
        names = [
            "1600000001.a,S=2,W=3:2,",
            "1600000002.b,S=2,W=3:2,FR",
            "1600000003.c,S=2,W=3:2,PT",
            "1600000004.d,S=2,W=3:2,Fab",
            "1600000005.e,X=1,S=2,W=3:2,D",
        ]
        for name in names:
            self.putFile(ALICE, "cur", name, b"x\n")
        drop = self.openDrop()
        uids = [m.uid for m in drop.messages]
        self.successResultOf(drop.commit([], range(5)))
        self.assertEqual(
            self.listing(ALICE, "cur"),
            [
                "1600000001.a,S=2,W=3:2,S",
                "1600000002.b,S=2,W=3:2,FRS",
                "1600000003.c,S=2,W=3:2,PST",
                "1600000004.d,S=2,W=3:2,FSab",
                "1600000005.e,X=1,S=2,W=3:2,DS",
            ],
        )
        drop = self.openDrop()
        self.assertEqual([m.uid for m in drop.messages], uids)
        self.assertEqual([m.seen for m in drop.messages], [True] * 5)
        drop.release()

    def test_seenAtSnapshot(self) -> None:
        """
        C{seen} reflects the C{S} flag of C{:2,} info only.
        """
        for name in (
            "1600000001.a,S=2,W=3:2,S",
            "1600000002.b,S=2,W=3:2,RS",
            "1600000003.c,S=2,W=3:2,R",
            "1600000004.d,S=2,W=3:1,S",
            "1600000005.e,S=2,W=3",
        ):
            self.putFile(ALICE, "cur", name, b"x\n")
        drop = self.openDrop()
        self.assertEqual([m.seen for m in drop.messages], [True, True, False, False, False])
        drop.release()

    def test_alreadySeenOrOtherInfoUntouched(self) -> None:
        """
        A message already flagged seen, or whose info is not C{:2,} flags,
        is not renamed.
        """
        names = ["1600000001.a,S=2,W=3:2,RS", "1600000002.b,S=2,W=3:1,xyz"]
        for name in names:
            self.putFile(ALICE, "cur", name, b"x\n")
        drop = self.openDrop()
        self.patch(os, "rename", lambda *a: self.fail("renamed"))
        self.assertIsNone(self.successResultOf(drop.commit([], [0, 1])))
        self.assertEqual(self.listing(ALICE, "cur"), names)

    def test_renamedByOtherTool(self) -> None:
        """
        A message another tool renamed during the session (to C{cur/} with
        flags) is found again and gets C{S} added to the flags it has now.
        """
        self.deliver([ALICE], b"x\n")
        self.deliver([ALICE], b"y\n")
        first, second = self.listing(ALICE, "new")
        drop = self.openDrop()
        uids = [m.uid for m in drop.messages]
        os.rename(self.path(ALICE, "new", first), self.path(ALICE, "cur", first + ":2,R"))
        os.rename(self.path(ALICE, "new", second), self.path(ALICE, "cur", second + ":2,"))
        events = self.logged()
        self.assertIsNone(self.successResultOf(drop.commit([], [0, 1])))
        self.assertEqual(self.listing(ALICE, "cur"), [first + ":2,RS", second + ":2,S"])
        self.assertEqual(events, [])
        drop = self.openDrop()
        self.assertEqual([(m.uid, m.seen) for m in drop.messages], [(uids[0], True), (uids[1], True)])
        drop.release()

    def test_listedOnceForRenamedFiles(self) -> None:
        """
        However many messages another tool renamed, the maildrop is listed
        again at most once per commit.
        """
        for i in range(3):
            self.deliver([ALICE], b"%d\n" % (i,))
        drop = self.openDrop()
        for name in self.listing(ALICE, "new"):
            os.rename(self.path(ALICE, "new", name), self.path(ALICE, "cur", name + ":2,"))
        scans = []
        realScan = maildir._scan

        def scan(path):
            scans.append(path)
            return realScan(path)

        self.patch(maildir, "_scan", scan)
        self.successResultOf(drop.commit([], [0, 1, 2]))
        self.assertEqual(len(scans), 1)
        self.assertEqual([n.endswith(":2,S") for n in self.listing(ALICE, "cur")], [True] * 3)

    def test_removedByOtherTool(self) -> None:
        """
        A retrieved message another tool removed during the session is
        skipped quietly; the others are still flagged.
        """
        self.deliver([ALICE], b"x\n")
        self.deliver([ALICE], b"y\n")
        first, second = self.listing(ALICE, "new")
        drop = self.openDrop()
        os.unlink(self.path(ALICE, "new", first))
        events = self.logged()
        self.assertIsNone(self.successResultOf(drop.commit([], [0, 1])))
        self.assertEqual(events, [])
        self.assertEqual(self.listing(ALICE, "cur"), [second + ":2,S"])

    def test_renameFailureLogged(self) -> None:
        """
        A flag that cannot be set is logged as a warning (one line per
        commit, without raising), the lock is released and the message is
        left as it was.
        """
        self.deliver([ALICE], b"x\n")
        self.deliver([ALICE], b"y\n")
        drop = self.openDrop()

        def rename(src, dst):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))

        self.patch(os, "rename", rename)
        events = self.logged()
        self.assertIsNone(self.successResultOf(drop.commit([], [0, 1])))
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["Could not mark 2 message(s) seen in %s: Permission denied" % (drop.path,)],
        )
        self.assertEqual([e["log_level"].name for e in events], ["warn"])
        self.assertEqual(len(self.listing(ALICE, "new")), 2)
        self.openDrop().release()

    def test_renameFailureKeepsDeletions(self) -> None:
        """
        When flags cannot be set, the deletions of the same commit still
        happen and the commit succeeds.
        """
        self.deliver([ALICE], b"x\n")
        self.deliver([ALICE], b"y\n")
        drop = self.openDrop()

        def rename(src, dst):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        self.patch(os, "rename", rename)
        events = self.logged()
        self.assertIsNone(self.successResultOf(drop.commit([0], [0, 1])))
        self.assertEqual(self.stored(), [b"y\n"])
        self.assertEqual(len(events), 1)
        self.openDrop().release()

    def test_unexpectedErrorNotRaised(self) -> None:
        """
        Even a bug while flagging does not fail the commit: it is logged as
        a failure and the lock is released.
        """
        self.deliver([ALICE], b"x\n")
        drop = self.openDrop()

        def seenName(name):
            raise RuntimeError("bug")

        self.patch(maildir, "seenName", seenName)
        events = self.logged()
        self.assertIsNone(self.successResultOf(drop.commit([], [0])))
        [event] = events
        self.assertIsInstance(event["log_failure"].value, RuntimeError)
        self.flushLoggedErrors(RuntimeError)
        self.openDrop().release()

    def test_renamesNotFsynced(self) -> None:
        """
        Flag renames are not fsynced; deletions in the same commit still
        fsync their directory.
        """
        for i in range(3):
            self.deliver([ALICE], b"%d\n" % (i,))
        synced = []
        self.patch(maildir, "_fsyncDirectory", synced.append)
        self.successResultOf(self.openDrop().commit([], [0]))
        self.assertEqual(synced, [])
        self.successResultOf(self.openDrop().commit([1], [2]))
        self.assertEqual(synced, [os.path.abspath(self.path(ALICE, "new"))])
        self.assertEqual(self.stored(), [b"0\n", b"2\n"])
        self.assertEqual(self.listing(ALICE, "new"), [])

    def test_seenNameHelper(self) -> None:
        """
        C{seenName} adds C{S} in order, appends C{:2,S} without info and
        leaves seen or non-flag names alone.
        """
        self.assertEqual(maildir.seenName("1.a"), "1.a:2,S")
        self.assertEqual(maildir.seenName("1.a,S=1,W=2:2,"), "1.a,S=1,W=2:2,S")
        self.assertEqual(maildir.seenName("1.a:2,RT"), "1.a:2,RST")
        self.assertEqual(maildir.seenName("1.a:2,a"), "1.a:2,Sa")
        self.assertIsNone(maildir.seenName("1.a:2,S"))
        self.assertIsNone(maildir.seenName("1.a:1,foo"))


class StreamingTests(MaildirTestsMixin, SynchronousTestCase):
    """
    L{MaildirMaildrop.openMessage} streams.
    """

    def test_smallReads(self) -> None:
        """
        A multi-megabyte message read in small pieces equals its wire form,
        and the total is its listed size.
        """
        line = b"0123456789" * 7
        data = b"".join(line + end for end in [b"\r\n", b"\n"] * 30000) + b"end"
        delivery = self.store.beginDelivery([ALICE])
        for i in range(0, len(data), 4093):
            delivery.write(data[i : i + 4093])
        self.successResultOf(delivery.commit())
        drop = self.openDrop()
        pieces = []
        with self.successResultOf(drop.openMessage(0)) as f:
            while True:
                piece = f.read(997)
                if not piece:
                    break
                self.assertLessEqual(len(piece), 997)
                pieces.append(piece)
        served = b"".join(pieces)
        self.assertEqual(served, wireForm(data))
        self.assertEqual(len(served), drop.messages[0].size)
        drop.release()

    def test_endKnownWithLastOctets(self) -> None:
        """
        A message reader tells it is C{exhausted} as soon as it has handed
        out the last octets of the message, the line end added to a file
        lacking one included, so no further C{read} is needed to find the
        end.
        """
        self.putFile(ALICE, "cur", "1600000000.a:2,", b"one\ntwo")
        self.putFile(ALICE, "cur", "1600000001.b:2,", b"x" * (maildir.READ_CHUNK + 5) + b"\n")
        drop = self.openDrop()
        with self.successResultOf(drop.openMessage(0)) as f:
            self.assertFalse(f.exhausted)
            self.assertEqual(f.read(100), b"one\r\ntwo\r\n")
            self.assertTrue(f.exhausted)
            self.assertEqual(f.read(100), b"")
        with self.successResultOf(drop.openMessage(1)) as f:
            self.assertEqual(f.read(maildir.READ_CHUNK), b"x" * maildir.READ_CHUNK)
            self.assertFalse(f.exhausted)
            self.assertEqual(f.read(3), b"xxx")
            self.assertFalse(f.exhausted)
            self.assertEqual(f.read(100), b"xx\r\n")
            self.assertTrue(f.exhausted)
        drop.release()

    def test_foreignCRLFChunkBoundary(self) -> None:
        """
        A CRLF file whose CR and LF fall on either side of a read chunk
        boundary is served with one CRLF there; bare CRs and a missing final
        newline are fixed.
        """
        data = b"a" * (maildir.READ_CHUNK - 1) + b"\r\n" + b"b\r" * 10 + b"\rc"
        self.putFile(ALICE, "cur", "1600000000.crlf:2,", data)
        drop = self.openDrop()
        with self.successResultOf(drop.openMessage(0)) as f:
            served = f.read()
        self.assertEqual(served, wireForm(data))
        self.assertEqual(drop.messages[0].size, len(served))
        drop.release()

    def test_readline(self) -> None:
        """
        The message object supports C{readline} and iteration, like a file.
        """
        self.deliver([ALICE], b"one\ntwo\r\nthree")
        drop = self.openDrop()
        with self.successResultOf(drop.openMessage(0)) as f:
            self.assertEqual(f.readline(), b"one\r\n")
            self.assertEqual(list(f), [b"two\r\n", b"three\r\n"])
        drop.release()

    def test_flatMemory(self) -> None:
        """
        Streaming a 20 MB message allocates far less than its size.
        """
        chunk = (b"x" * 78 + b"\n") * 1000
        delivery = self.store.beginDelivery([ALICE])
        for _ in range(20 * 1024 * 1024 // len(chunk)):
            delivery.write(chunk)
        self.successResultOf(delivery.commit())
        drop = self.openDrop()
        total = 0
        tracemalloc.start()
        try:
            with self.successResultOf(drop.openMessage(0)) as f:
                while True:
                    piece = f.read(8192)
                    if not piece:
                        break
                    total += len(piece)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(total, drop.messages[0].size)
        self.assertLess(peak, 1024 * 1024)
        drop.release()


class LockTests(MaildirTestsMixin, SynchronousTestCase):
    """
    The maildrop lock across processes.
    """

    _HOLD = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "if sys.argv[2] == 'crash':\n"
        "    os._exit(0)\n"
        "sys.stdout.write('locked\\n')\n"
        "sys.stdout.flush()\n"
        "sys.stdin.read()\n"
    )

    def lockPath(self) -> str:
        self.openDrop().release()
        return self.path(ALICE, maildir.LOCK_NAME)

    def test_crashedHolderDoesNotBlock(self) -> None:
        """
        A process that took the lock and died without unlocking does not
        block the next session.
        """
        subprocess.run([sys.executable, "-c", self._HOLD, self.lockPath(), "crash"], check=True)
        self.openDrop().release()

    def test_otherProcessBlocks(self) -> None:
        """
        A lock held by another live process makes the open fail with
        L{MaildropLocked}; once it exits, the open succeeds.
        """
        holder = subprocess.Popen(
            [sys.executable, "-c", self._HOLD, self.lockPath(), "hold"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            self.assertEqual(holder.stdout.readline(), b"locked\n")
            self.failureResultOf(self.store.openMaildrop(ALICE), MaildropLocked)
        finally:
            holder.stdin.close()
            holder.wait()
            holder.stdout.close()
        self.openDrop().release()

    def test_twoStoresSameProcess(self) -> None:
        """
        Two stores over one root in one process exclude each other.
        """
        other = MaildirStore(self.root, hostname="testhost")
        drop = self.openDrop()
        self.failureResultOf(other.openMaildrop(ALICE), MaildropLocked)
        drop.release()
        self.successResultOf(other.openMaildrop(ALICE)).release()


class PathTests(MaildirTestsMixin, SynchronousTestCase):
    """
    Addresses cannot name paths outside the root.
    """

    def test_maildirPath(self) -> None:
        """
        A maildrop is C{<root>/<domain>/<localpart>}.
        """
        self.assertEqual(
            self.store.maildirPath(Address("Alice.B", "example.org")),
            os.path.join(os.path.abspath(self.root), "example.org", "Alice.B"),
        )

    def test_escapesRefused(self) -> None:
        """
        Addresses built without parsing that would escape the root or its
        layout fail with L{PermanentFailure} and create nothing.
        """
        bad = [
            Address("..", "example.org"),
            Address(".", "example.org"),
            Address("", "example.org"),
            Address("a/../../b", "example.org"),
            Address("x\0", "example.org"),
            Address("alice", ".."),
            Address("alice", "../etc"),
            Address("alice", ""),
        ]
        for address in bad:
            self.assertRaises(PermanentFailure, self.store.maildirPath, address)
            self.assertRaises(PermanentFailure, self.store.beginDelivery, [address])
            self.failureResultOf(self.store.openMaildrop(address), PermanentFailure)
        self.assertFalse(os.path.exists(self.root))


class ThreadPoolTests(MaildirTestsMixin, SynchronousTestCase):
    """
    With a thread pool, blocking work leaves the reactor thread.
    """

    def setUp(self) -> None:
        super().setUp()
        self.pool = ImmediateThreadPool()
        self.reactor = _QueuedReactor()
        self.store = MaildirStore(self.root, ThreadPoolRunner(self.reactor, self.pool), hostname="testhost")

    def deliver(self, recipients, data: bytes, trace: bytes = b"") -> None:
        delivery = self.store.beginDelivery(recipients, trace)
        delivery.write(data)
        d = delivery.commit()
        self.reactor.runQueued()
        self.successResultOf(d)

    def openedOnce(self, address: Address = ALICE) -> None:
        """
        Open and release C{address}'s maildrop through the pool, as this
        process's first login to it does (its C{tmp} is cleaned then).
        """
        d = self.store.openMaildrop(address)
        self.reactor.runQueued()
        self.successResultOf(d).release()

    def test_deliveryCommit(self) -> None:
        """
        The commit runs in the pool and fires only through the reactor.
        """
        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"threaded\n")
        d = delivery.commit()
        self.assertNoResult(d)
        self.assertEqual(len(self.pool.calls), 1)
        self.reactor.runQueued()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(delivery.state, "committed")
        self.assertEqual(self.stored(), [b"threaded\n"])

    def test_deliveryCommitFailure(self) -> None:
        """
        A failing threaded commit fails with L{TemporaryFailure}.
        """

        def fsync(fd):
            raise OSError(errno.EIO, "I/O error")

        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"x\n")
        self.patch(os, "fsync", fsync)
        d = delivery.commit()
        self.reactor.runQueued()
        self.failureResultOf(d, TemporaryFailure)
        self.assertEqual(delivery.state, "failed")

    def test_sessionThreaded(self) -> None:
        """
        A small maildrop whose sizes are all in its file names is opened at
        once, without the pool; committing deletions runs in the pool and
        returns a L{Deferred}; locking still excludes a second session.
        """
        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"x\n")
        d = delivery.commit()
        self.reactor.runQueued()
        self.successResultOf(d)
        self.openedOnce()
        drop = self.successResultOf(self.store.openMaildrop(ALICE))
        self.failureResultOf(self.store.openMaildrop(ALICE), MaildropLocked)
        d = drop.commit([0])
        self.assertIsInstance(d, defer.Deferred)
        drop.release()
        self.assertNoResult(d)
        self.reactor.runQueued()
        self.successResultOf(d)
        self.assertEqual(self.stored(), [])
        self.successResultOf(self.store.openMaildrop(ALICE)).release()

    def test_firstOpenInPool(self) -> None:
        """
        A maildrop that does not exist yet, or whose C{tmp} is due for
        clean-up (the first login of this process), is created, cleaned and
        snapshotted in the pool: nothing is created or removed on the
        reactor thread.
        """
        d = self.store.openMaildrop(ALICE)
        self.assertNoResult(d)
        self.assertEqual(self.pool.calls, [self.store._lockAndSnapshot])
        self.reactor.runQueued()
        self.successResultOf(d).release()
        stale = os.path.join(self.store.maildirPath(ALICE), "tmp", "stale")
        with open(stale, "wb"):
            pass
        os.utime(stale, (0, 0))
        self.store._tmpCleaned.clear()
        del self.pool.calls[:]
        d = self.store.openMaildrop(ALICE)
        self.assertNoResult(d)
        self.assertEqual(self.pool.calls, [self.store._lockAndSnapshot])
        self.reactor.runQueued()
        self.successResultOf(d).release()
        self.assertFalse(os.path.exists(stale))

    def test_firstDeliveryCreatesInPool(self) -> None:
        """
        The first delivery to a maildrop creates it (directories, fsyncs)
        and its tmp file in the pool, in the commit's one job; what is
        written before is kept.
        """
        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"first\n")
        self.assertEqual(self.pool.calls, [])
        d = delivery.commit()
        self.assertEqual(self.pool.calls, [delivery._doCommit])
        self.assertNoResult(d)
        self.reactor.runQueued()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.stored(), [b"first\n"])
        self.assertEqual(self.listing(ALICE, "tmp"), [])

    def test_firstDeliveryAbortedWhileCreating(self) -> None:
        """
        A first delivery aborted before its tmp file is open leaves no tmp
        file once it is (a message large enough to need its file before
        the commit).
        """
        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"x" * maildelivery.WRITE_BUFFER)
        self.assertEqual([call.func for call in self.pool.calls], [self.store._createDeliveryFile])
        delivery.abort()
        self.reactor.runQueued()
        self.assertEqual(delivery.state, "aborted")
        self.assertEqual(self.listing(ALICE, "tmp"), [])
        self.assertEqual(self.stored(), [])

    def test_firstDeliveryCannotCreate(self) -> None:
        """
        A maildrop that cannot be created fails the write or commit that
        follows with L{TemporaryFailure}.
        """

        def makeDirectory(path, owner=None):
            raise OSError(errno.EACCES, "Permission denied")

        self.patch(maildir.fsutil, "makeDirectory", makeDirectory)
        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"x\n")
        d = delivery.commit()
        self.reactor.runQueued()
        self.failureResultOf(d, TemporaryFailure)
        self.assertRaises(TemporaryFailure, delivery.write, b"y\n")

    def test_quickSnapshotCountsEntries(self) -> None:
        """
        Whether a maildrop is small enough to be snapshotted on the reactor
        thread depends on how many entries it has, not on its directories'
        C{st_size} (tmpfs and XFS grow it differently from ext4): many
        entries in directories reporting a small size go to the pool.
        """
        self.deliver([ALICE], b"x\n")
        self.openedOnce()
        path = self.store.maildirPath(ALICE)
        [name] = self.listing(ALICE, "new")
        for i in range(maildir.QUICK_SNAPSHOT_ENTRIES):
            os.link(os.path.join(path, "new", name), os.path.join(path, "cur", f"{i}{name}"))
        realStat = os.stat

        def stat(p, *args, **kwargs):
            st = realStat(p, *args, **kwargs)
            if p in (os.path.join(path, "new"), os.path.join(path, "cur")):
                return os.stat_result((st.st_mode, *st[1:6], 60) + tuple(st[7:]))
            return st

        self.patch(os, "stat", stat)
        d = self.store.openMaildrop(ALICE)
        self.assertNoResult(d)
        self.reactor.runQueued()
        drop = self.successResultOf(d)
        self.assertEqual(len(drop.messages), maildir.QUICK_SNAPSHOT_ENTRIES + 1)
        drop.release()

    def test_quickSnapshotLargeDirectoryFewEntries(self) -> None:
        """
        A maildrop with few entries is snapshotted at once even if its
        directories report a large C{st_size} (an ext4 directory never
        shrinks after holding many files).
        """
        self.deliver([ALICE], b"x\n")
        self.openedOnce()
        path = self.store.maildirPath(ALICE)
        realStat = os.stat

        def stat(p, *args, **kwargs):
            st = realStat(p, *args, **kwargs)
            if p in (os.path.join(path, "new"), os.path.join(path, "cur")):
                return os.stat_result((st.st_mode, *st[1:6], 1 << 30) + tuple(st[7:]))
            return st

        self.patch(os, "stat", stat)
        drop = self.successResultOf(self.store.openMaildrop(ALICE))
        self.assertEqual(len(drop.messages), 1)
        drop.release()

    def test_largeMaildropOpenedInPool(self) -> None:
        """
        A maildrop whose directories are larger than
        L{maildir.QUICK_SNAPSHOT_ENTRIES} is listed in the pool, and
        the lock is taken only there.
        """
        self.patch(maildir, "QUICK_SNAPSHOT_ENTRIES", 0)
        d = self.store.openMaildrop(ALICE)
        self.assertNoResult(d)
        self.reactor.runQueued()
        drop = self.successResultOf(d)
        second = self.store.openMaildrop(ALICE)
        self.reactor.runQueued()
        self.failureResultOf(second, MaildropLocked)
        drop.release()

    def test_unmeasuredFileOpenedInPool(self) -> None:
        """
        A file that must be read to learn its size sends the snapshot to the
        pool (no file is read on the reactor thread), and no lock is left
        behind by the abandoned quick attempt.
        """
        path = self.store.maildirPath(ALICE)
        self.openedOnce()
        with open(os.path.join(path, "new", "1700000000.foreign.host"), "wb") as f:
            f.write(b"a\r\nb\r\n")
        d = self.store.openMaildrop(ALICE)
        self.assertNoResult(d)
        self.reactor.runQueued()
        drop = self.successResultOf(d)
        self.assertEqual([m.size for m in drop.messages], [6])
        drop.release()

    def test_commitNothingNoThread(self) -> None:
        """
        A commit with nothing to delete (the usual QUIT) releases the lock
        at once, without a trip through the pool.
        """
        d = self.store.openMaildrop(ALICE)
        self.reactor.runQueued()
        drop = self.successResultOf(d)
        del self.pool.calls[:]
        self.assertIsNone(self.successResultOf(drop.commit([])))
        self.assertEqual(self.pool.calls, [])
        d = self.store.openMaildrop(ALICE)
        self.reactor.runQueued()
        self.successResultOf(d).release()


    def test_commitSeenNoThread(self) -> None:
        """
        A commit that only flags a few messages of a small maildrop (the
        usual QUIT of a client that keeps its mail) renames at once,
        without a trip through the pool.
        """
        self.deliver([ALICE], b"x\n")
        self.openedOnce()
        drop = self.successResultOf(self.store.openMaildrop(ALICE))
        del self.pool.calls[:]
        self.assertIsNone(self.successResultOf(drop.commit([], [0])))
        self.assertEqual(self.pool.calls, [])
        self.assertTrue(self.listing(ALICE, "cur")[0].endswith(":2,S"))
        self.successResultOf(self.store.openMaildrop(ALICE)).release()

    def test_commitManySeenInPool(self) -> None:
        """
        More than L{maildir.QUICK_FLAG_RENAMES} flag renames go to the pool.
        """
        self.patch(maildir, "QUICK_FLAG_RENAMES", 1)
        self.deliver([ALICE], b"x\n")
        self.deliver([ALICE], b"y\n")
        self.openedOnce()
        drop = self.successResultOf(self.store.openMaildrop(ALICE))
        del self.pool.calls[:]
        d = drop.commit([], [0, 1])
        self.assertNoResult(d)
        self.assertEqual(len(self.pool.calls), 1)
        self.reactor.runQueued()
        self.successResultOf(d)
        self.assertEqual([n.endswith(":2,S") for n in self.listing(ALICE, "cur")], [True, True])

    def test_largeMaildropSeenInPool(self) -> None:
        """
        Flags of a maildrop too large to be snapshotted on the reactor
        thread are set in the pool.
        """
        self.deliver([ALICE], b"x\n")
        self.patch(maildir, "QUICK_SNAPSHOT_ENTRIES", 0)
        d = self.store.openMaildrop(ALICE)
        self.reactor.runQueued()
        drop = self.successResultOf(d)
        del self.pool.calls[:]
        d = drop.commit([], [0])
        self.assertEqual(len(self.pool.calls), 1)
        self.reactor.runQueued()
        self.successResultOf(d)

    def test_commitDeleteAndSeenInPool(self) -> None:
        """
        Deletions and flags of one commit run together in the pool.
        """
        self.deliver([ALICE], b"x\n")
        self.deliver([ALICE], b"y\n")
        self.openedOnce()
        drop = self.successResultOf(self.store.openMaildrop(ALICE))
        del self.pool.calls[:]
        d = drop.commit([0], [1])
        self.assertEqual(len(self.pool.calls), 1)
        self.reactor.runQueued()
        self.successResultOf(d)
        self.assertEqual(self.stored(), [b"y\n"])
        self.assertEqual(self.listing(ALICE, "new"), [])


class DeliveryJobTests(SynchronousTestCase):
    """
    A delivery does no file-system work on the reactor thread for a
    message smaller than L{WRITE_BUFFER}: its commit's one job of the
    runner creates the tmp file, writes, C{fsync}s and links.
    """

    def setUp(self) -> None:
        self.root = tempPath(self)
        self.runner = HeldRunner()
        self.store = MaildirStore(self.root, self.runner, hostname="testhost")

    def path(self, address: Address, *parts: str) -> str:
        return os.path.join(self.root, address.domain, address.localpart, *parts)

    def test_smallMessageOneJob(self) -> None:
        """
        Beginning and writing a small message creates nothing (not even
        the maildrop) and hands the runner nothing; the commit is one job,
        which creates the maildrop and delivers the message.
        """
        delivery = self.store.beginDelivery([ALICE], b"Received: x\r\n")
        delivery.write(b"Subject: hi\r\n\r\nbody\r\n")
        self.assertEqual(self.runner.jobs, [])
        self.assertFalse(os.path.exists(self.path(ALICE)))
        d = delivery.commit()
        self.assertEqual(len(self.runner.jobs), 1)
        self.runner.runNext()
        self.assertIsNone(self.successResultOf(d))
        [name] = os.listdir(self.path(ALICE, "new"))
        with open(self.path(ALICE, "new", name), "rb") as f:
            self.assertEqual(f.read(), b"Received: x\nSubject: hi\n\nbody\n")
        self.assertEqual(os.listdir(self.path(ALICE, "tmp")), [])

    def test_abortBeforeAnyFile(self) -> None:
        """
        Aborting a small message before its commit leaves nothing behind
        and hands the runner nothing.
        """
        self.store._ensureMaildir(self.store.maildirPath(ALICE))
        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"Subject: hi\r\n\r\nbody\r\n")
        delivery.abort()
        self.assertEqual(self.runner.jobs, [])
        self.assertEqual(os.listdir(self.path(ALICE, "tmp")), [])
        self.assertEqual(delivery.state, "aborted")

    def test_largeMessageWrittenAsItComes(self) -> None:
        """
        A message outgrowing L{WRITE_BUFFER} has its tmp file created
        through the runner; what comes meanwhile is buffered, and once the
        file is open the next write writes it all; the commit is then one
        more job.
        """
        chunk = b"x" * 1023 + b"\n"
        count = maildelivery.WRITE_BUFFER // len(chunk)
        delivery = self.store.beginDelivery([ALICE])
        for _ in range(count):
            delivery.write(chunk)
        self.assertEqual(len(self.runner.jobs), 1)
        delivery.write(chunk)
        self.assertEqual(len(self.runner.jobs), 1)
        self.runner.runNext()
        [tmpName] = os.listdir(self.path(ALICE, "tmp"))
        self.assertEqual(os.path.getsize(self.path(ALICE, "tmp", tmpName)), 0)
        delivery.write(chunk)
        self.assertEqual(os.path.getsize(self.path(ALICE, "tmp", tmpName)), (count + 2) * len(chunk))
        d = delivery.commit()
        self.assertEqual(len(self.runner.jobs), 1)
        self.runner.runNext()
        self.assertIsNone(self.successResultOf(d))
        [name] = os.listdir(self.path(ALICE, "new"))
        self.assertEqual(os.path.getsize(self.path(ALICE, "new", name)), (count + 2) * len(chunk))
        self.assertEqual(os.listdir(self.path(ALICE, "tmp")), [])

    def test_maildropCannotBeCreated(self) -> None:
        """
        A maildrop that cannot be created fails the commit with
        L{TemporaryFailure}, and nothing is left.
        """
        os.makedirs(os.path.join(self.root, "example.org"))
        with open(self.path(ALICE), "wb"):
            pass
        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"x\n")
        d = delivery.commit()
        self.runner.runAll()
        self.failureResultOf(d, TemporaryFailure)
        self.assertEqual(delivery.state, "failed")
        self.assertEqual(os.listdir(os.path.join(self.root, "example.org")), ["alice"])


class HelperTests(SynchronousTestCase):
    """
    Name parsing and conversion helpers.
    """

    def test_parseName(self) -> None:
        """
        C{parseName} separates the unique key, sizes and info.
        """
        parsed = maildir.parseName("123.abc,S=10,W=12:2,FS")
        self.assertEqual(
            (parsed.key, parsed.fileSize, parsed.wireSize, parsed.info),
            ("123.abc", 10, 12, ":2,FS"),
        )
        parsed = maildir.parseName("123.abc,W=4,Z=1,S=x")
        self.assertEqual((parsed.key, parsed.fileSize, parsed.wireSize, parsed.info), ("123.abc,Z=1,S=x", None, 4, ""))

    def test_wireConverterMatchesWireForm(self) -> None:
        """
        The streaming converter, fed in every two-piece split, equals
        C{wireForm} on the whole.
        """
        data = b"\r\na\rb\n\r\r\n\nc\r"
        for cut in range(len(data) + 1):
            converter = maildir._WireConverter()
            out = converter.feed(data[:cut]) + converter.feed(data[cut:]) + converter.finish()
            self.assertEqual(out, wireForm(data), cut)


class TmpCleanupTests(MaildirTestsMixin, SynchronousTestCase):
    def test_staleTmpFilesRemovedAtLogin(self) -> None:
        """
        At login, files in C{tmp/} older than 36 hours (debris of an
        interrupted delivery) are removed and fresher ones kept; one process
        looks again in the same maildrop only after
        L{maildir.TMP_CLEAN_INTERVAL}.
        """
        now = [1_800_000_000.0]
        self.store._now = lambda: now[0]
        self.successResultOf(self.store.openMaildrop(ALICE)).release()
        tmp = os.path.join(self.store.maildirPath(ALICE), "tmp")

        def debris(name: str, age: float) -> str:
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(b"partial")
            os.utime(path, (now[0] - age, now[0] - age))
            return path

        now[0] += maildir.TMP_CLEAN_INTERVAL
        old = debris("old", maildir.TMP_MAX_AGE + 60)
        fresh = debris("fresh", 60)
        self.successResultOf(self.store.openMaildrop(ALICE)).release()
        self.assertFalse(os.path.exists(old))
        self.assertTrue(os.path.exists(fresh))

        old2 = debris("old2", maildir.TMP_MAX_AGE + 60)
        self.successResultOf(self.store.openMaildrop(ALICE)).release()
        self.assertTrue(os.path.exists(old2))
        now[0] += maildir.TMP_CLEAN_INTERVAL
        self.successResultOf(self.store.openMaildrop(ALICE)).release()
        self.assertFalse(os.path.exists(old2))
        self.assertTrue(os.path.exists(fresh))


class MaildirModesAndOwnerTests(SynchronousTestCase):
    """
    Everything the store creates is private whatever the umask, and
    belongs to the data directory's owner.
    """

    def deliverAndOpen(self, store: MaildirStore) -> None:
        delivery = store.beginDelivery([ALICE, CAROL])
        delivery.write(b"Subject: x\n\nhi\n")
        self.successResultOf(delivery.commit())
        self.successResultOf(store.openMaildrop(ALICE)).release()

    def test_modesWhateverUmask(self) -> None:
        """
        Under umask 022, 000 and 277 a delivery to two new maildrops and a
        login leave only 0700 directories (the root included) and 0600
        files (messages, lock file).
        """
        for mask in (0o022, 0o000, 0o277):
            withUmask(self, mask)
            root = tempPath(self)
            self.deliverAndOpen(MaildirStore(root, hostname="testhost"))
            found = treeModesAndOwners(root)
            self.assertIn("example.org/alice/pop3gw.lock", found)
            self.assertEqual(len([p for p in found if "/new/" in p]), 2)
            for path, (kind, mode, _, _) in found.items():
                self.assertEqual(mode, 0o700 if kind == "d" else 0o600, (oct(mask), path))

    def test_ownerGiven(self) -> None:
        """
        Run as root with the data directory's owner, every directory and
        file the store creates belongs to that owner.
        """
        requireRoot(self)
        root = tempPath(self)
        self.deliverAndOpen(MaildirStore(root, hostname="testhost", owner=Owner(OTHER_UID, OTHER_GID)))
        found = treeModesAndOwners(root)
        self.assertIn("example.org/alice/pop3gw.lock", found)
        for path, (_, _, uid, gid) in found.items():
            self.assertEqual((uid, gid), (OTHER_UID, OTHER_GID), path)


class ListingCacheTests(MaildirTestsMixin, SynchronousTestCase):
    """
    A small maildrop whose C{new/} and C{cur/} have not changed since its
    last settled listing is not listed again at login.
    """

    def settle(self, address: Address = ALICE) -> None:
        """
        Let a minute pass since the last change of C{new/} and C{cur/}, as
        far as the listing cache knows.
        """
        now = time.time_ns() + 60 * 10**9
        self.store._listings.now = lambda: now

    def countScans(self) -> list:
        calls: list = []
        realScandir = os.scandir

        def scandir(path):
            calls.append(path)
            return realScandir(path)

        self.patch(os, "scandir", scandir)
        return calls

    def test_unchangedMaildropListedOnce(self) -> None:
        """
        Once listed after its last change had settled, an unchanged
        maildrop's next snapshot comes without reading its directories,
        with the same messages.
        """
        self.deliver([ALICE], b"one\n")
        self.deliver([ALICE], b"two\n")
        self.settle()
        first = self.openDrop()
        uids = [m.uid for m in first.messages]
        first.release()
        scans = self.countScans()
        second = self.openDrop()
        self.assertEqual(scans, [])
        self.assertEqual([m.uid for m in second.messages], uids)
        self.assertEqual(self.read(second, 1), b"two\r\n")
        second.release()

    def test_changeListedAgain(self) -> None:
        """
        A delivery, a deletion or a flag change since the cached listing
        changes a directory's mtime, so the next snapshot lists it again and
        sees the change.
        """
        self.deliver([ALICE], b"one\n")
        self.settle()
        self.openDrop().release()
        self.deliver([ALICE], b"two\n")
        drop = self.openDrop()
        self.assertEqual(len(drop.messages), 2)
        self.successResultOf(drop.commit([0]))
        self.assertEqual(len(self.openDrop().messages), 1)

    def test_recentChangeNotCached(self) -> None:
        """
        A listing taken less than L{maildir.LISTING_SETTLED_NS} after the
        last change of a directory is not kept: another change within the
        same tick of the file system's clock would leave the mtime as it
        was.
        """
        self.deliver([ALICE], b"one\n")
        self.openDrop().release()
        scans = self.countScans()
        self.openDrop().release()
        self.assertEqual(len(scans), 2)

    def test_cachedLoginStats(self) -> None:
        """
        A login to an unchanged small maildrop whose listing is cached
        looks at its C{tmp/}, C{new/} and C{cur/} with one C{stat} each:
        the stamp of C{new/} and C{cur/} also tells that they are there.
        """
        self.deliver([ALICE], b"one\n")
        self.settle()
        self.openDrop().release()
        stats: list = []
        realStat = os.stat
        base = self.path(ALICE)

        def stat(path, *args, **kwargs):
            stats.append(os.path.relpath(path, base))
            return realStat(path, *args, **kwargs)

        self.patch(os, "stat", stat)
        drop = self.openDrop()
        self.assertEqual(sorted(stats), ["cur", "new", "tmp"])
        self.assertEqual(len(drop.messages), 1)
        drop.release()

    def test_missingDirectoryAtQuickLogin(self) -> None:
        """
        A maildrop whose C{new/} or C{cur/} went missing is made whole again
        at login, and is locked once, by that login.
        """
        for missing in ("new", "cur"):
            self.openDrop().release()
            os.rmdir(self.path(ALICE, missing))
            drop = self.openDrop()
            self.assertTrue(os.path.isdir(self.path(ALICE, missing)))
            self.assertEqual(len(drop.messages), 0)
            self.failureResultOf(self.store.openMaildrop(ALICE), MaildropLocked)
            drop.release()

    def test_rewrittenInPlaceRefused(self) -> None:
        """
        A message file another tool rewrote in place (which Maildir never
        does, and which leaves the directory's mtime alone) after a cached
        listing is refused when opened, not served with a wrong size.
        """
        self.deliver([ALICE], b"one\n")
        self.settle()
        self.openDrop().release()
        [name] = self.listing(ALICE, "new")
        with open(self.path(ALICE, "new", name), "r+b") as f:
            f.write(b"longer text\n")
        drop = self.openDrop()
        self.assertEqual(drop.messages[0].size, 5)
        self.failureResultOf(drop.openMessage(0), TemporaryFailure)
        drop.release()


class ListingIndexTests(MaildirTestsMixin, SynchronousTestCase):
    """
    A maildrop of more than L{maildir.INDEX_MIN_ENTRIES} messages keeps its
    settled listing in L{maildir.INDEX_NAME}, trusted only while C{new/}
    and C{cur/} are the same directories with the same mtimes and ctimes;
    any change, or an index that is damaged or of another format, makes the
    next login list the directories again.
    """

    def setUp(self) -> None:
        super().setUp()
        self.patch(maildir, "QUICK_SNAPSHOT_ENTRIES", 2)
        self.patch(maildir, "INDEX_MIN_ENTRIES", 2)
        for n in range(3):
            self.deliver([ALICE], b"message %d\n" % (n,))
        self.putFile(ALICE, "cur", "1.odd.host:2,S", b"no sizes\n")
        self.putFile(ALICE, "new", "2.other,S=4,W=5", b"abc\n")

    def settle(self, address: Address = ALICE, ago: int = 60) -> None:
        """
        Let C{ago} seconds pass since the last change of C{new/} and
        C{cur/}, as far as the listing cache knows.
        """
        now = time.time_ns() + ago * 10**9
        self.store._listings.now = lambda: now

    def countScans(self) -> list:
        calls: list = []
        realScandir = os.scandir

        def scandir(path):
            calls.append(path)
            return realScandir(path)

        self.patch(os, "scandir", scandir)
        return calls

    def indexPath(self, address: Address = ALICE) -> str:
        return self.path(address, maildir.INDEX_NAME)

    def view(self, drop) -> list:
        """
        What a session sees of C{drop}: every message's size, UIDL and seen
        flag, and the contents of the first and last message.
        """
        view = [tuple(m) for m in drop.messages]
        view.append(self.read(drop, 0))
        view.append(self.read(drop, len(drop.messages) - 1))
        return view

    def indexedView(self) -> list:
        """
        Settle the maildrop, log in once (which writes the index) and
        return what that session saw.
        """
        self.settle()
        drop = self.openDrop()
        view = self.view(drop)
        drop.release()
        self.assertTrue(os.path.exists(self.indexPath()))
        return view

    def test_indexedListingServedWithoutScan(self) -> None:
        """
        Once a settled listing is indexed, the next login reads no directory
        and sees the same messages, UIDLs, sizes, seen flags and contents,
        odd names included.
        """
        view = self.indexedView()
        self.assertEqual(len(view), 5 + 2)
        self.assertIn((10, "1.odd.host", True), view)
        scans = self.countScans()
        drop = self.openDrop()
        self.assertEqual(scans, [])
        self.assertEqual(self.view(drop), view)
        drop.release()

    def test_namesReadInPieces(self) -> None:
        """
        An index is written and read a few names at a time (so no buffer of
        its whole size is made), whatever the pieces' boundaries.
        """
        self.patch(maildir, "_INDEX_NAMES_AT_ONCE", 2)
        self.patch(maildir, "_INDEX_DECODE_CHUNK", 7)
        view = self.indexedView()
        for chunk in (7, 60, 100):
            self.patch(maildir, "_INDEX_DECODE_CHUNK", chunk)
            scans = self.countScans()
            drop = self.openDrop()
            self.assertEqual(scans, [])
            self.assertEqual(self.view(drop), view)
            drop.release()

    def test_newDeliverySeen(self) -> None:
        """
        A message delivered after the index was written is listed at the
        next login; the earlier UIDLs are unchanged.
        """
        view = self.indexedView()
        self.deliver([ALICE], b"late\n")
        drop = self.openDrop()
        messages = [tuple(m) for m in drop.messages]
        self.assertEqual(messages[:5], view[:5])
        self.assertEqual(len(messages), 6)
        self.assertEqual(self.read(drop, 5), b"late\r\n")
        drop.release()

    def test_fileRemovedByHand(self) -> None:
        """
        A message file removed by another tool after the index was written
        is not listed at the next login.
        """
        view = self.indexedView()
        os.unlink(self.path(ALICE, "cur", "1.odd.host,S=9,W=10:2,S"))
        drop = self.openDrop()
        self.assertEqual([tuple(m) for m in drop.messages], [v for v in view[:5] if v[1] != "1.odd.host"])
        drop.release()

    def test_mtimeRestored(self) -> None:
        """
        A change whose directory is given back its earlier mtime (as a tool
        copying timestamps does, or a clock too coarse to tell two changes
        apart) still invalidates the index: the directories' ctimes moved.
        """
        self.indexedView()
        cur = self.path(ALICE, "cur")
        before = os.stat(cur)
        os.unlink(os.path.join(cur, "1.odd.host,S=9,W=10:2,S"))
        os.utime(cur, ns=(before.st_atime_ns, before.st_mtime_ns))
        self.assertEqual(os.stat(cur).st_mtime_ns, before.st_mtime_ns)
        drop = self.openDrop()
        self.assertEqual(len(drop.messages), 4)
        drop.release()

    def test_recentChangeNotIndexed(self) -> None:
        """
        A listing taken less than L{maildir.LISTING_SETTLED_NS} after the
        last change of a directory is not indexed: a second change within
        the same tick of the file system's clock would leave the
        directory's times as they were.
        """
        self.settle(ago=1)
        self.openDrop().release()
        self.assertFalse(os.path.exists(self.indexPath()))

    def test_smallMaildropNotIndexed(self) -> None:
        """
        A maildrop of at most L{maildir.INDEX_MIN_ENTRIES} messages gets no
        index (its listing is cheap and kept in memory).
        """
        self.patch(maildir, "INDEX_MIN_ENTRIES", 5)
        self.settle()
        self.openDrop().release()
        self.assertFalse(os.path.exists(self.indexPath()))

    def test_staleIndexOfSmallListingRemoved(self) -> None:
        """
        An index left from when the maildrop was larger than
        L{maildir.INDEX_MIN_ENTRIES} is removed by the next settled listing
        taken in the thread pool, not left to grow stale.
        """
        self.indexedView()
        self.patch(maildir, "INDEX_MIN_ENTRIES", 10)
        self.deliver([ALICE], b"late\n")
        self.settle()
        drop = self.openDrop()
        self.assertEqual(len(drop.messages), 6)
        drop.release()
        self.assertFalse(os.path.exists(self.indexPath()))

    def assertRebuilt(self, view: list) -> None:
        """
        The next login lists the directories, sees C{view}, and leaves an
        index the login after it trusts.
        """
        scans = self.countScans()
        drop = self.openDrop()
        self.assertEqual(self.view(drop), view)
        drop.release()
        self.assertNotEqual(scans, [])
        del scans[:]
        drop = self.openDrop()
        self.assertEqual(scans, [])
        self.assertEqual(self.view(drop), view)
        drop.release()

    def rewriteIndex(self, change) -> None:
        with open(self.indexPath(), "rb") as f:
            data = f.read()
        with open(self.indexPath(), "wb") as f:
            f.write(change(data))

    def test_corruptIndexRebuilt(self) -> None:
        """
        An index whose contents were damaged (one octet changed) is not
        trusted: the maildrop is listed again and the index rewritten.
        """
        view = self.indexedView()

        def flip(data: bytes) -> bytes:
            middle = len(data) - 20
            return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]

        self.rewriteIndex(flip)
        self.assertRebuilt(view)

    def test_truncatedIndexRebuilt(self) -> None:
        """
        An index cut short (a crash while it was written) or empty is not
        trusted.
        """
        view = self.indexedView()
        self.rewriteIndex(lambda data: data[: len(data) // 2])
        self.assertRebuilt(view)
        self.rewriteIndex(lambda data: b"")
        self.assertRebuilt(view)

    def test_otherFormatRebuilt(self) -> None:
        """
        An index of another format version (an older pop3gw's) is not
        trusted.
        """
        view = self.indexedView()
        self.rewriteIndex(lambda data: data.replace(b" 1\n", b" 0\n", 1))
        self.assertRebuilt(view)

    def test_indexOfAnotherMaildrop(self) -> None:
        """
        An index copied from another maildrop (other directories, even with
        the same times) is not trusted.
        """
        view = self.indexedView()
        for n in range(3):
            self.deliver([BOB], b"bob %d\n" % (n,))
        self.settle(BOB)
        self.openDrop(BOB).release()
        for subdir in ("new", "cur"):
            st = os.stat(self.path(ALICE, subdir))
            os.utime(self.path(BOB, subdir), ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(self.indexPath(), self.indexPath(BOB))
        drop = self.openDrop(BOB)
        uids = [m.uid for m in drop.messages]
        self.assertEqual(len(uids), 3)
        self.assertEqual(set(uids) & {v[1] for v in view[:5]}, set())
        self.assertEqual(self.read(drop, 0), b"bob 0\r\n")
        drop.release()

    def test_commitThenIndexAgain(self) -> None:
        """
        Deletions and seen flags committed by a session change the
        directories, so the next login lists them again, and its index
        then serves the login after.
        """
        self.indexedView()
        drop = self.openDrop()
        self.read(drop, 0)
        self.successResultOf(drop.commit([1], [0]))
        self.settle()
        drop = self.openDrop()
        view = self.view(drop)
        drop.release()
        self.assertEqual(len(view), 4 + 2)
        self.assertTrue(view[0][2])
        scans = self.countScans()
        drop = self.openDrop()
        self.assertEqual(scans, [])
        self.assertEqual(self.view(drop), view)
        drop.release()
