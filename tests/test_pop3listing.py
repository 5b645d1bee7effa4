# -*- test-case-name: tests.test_pop3listing -*-
"""
Tests for the listing side of L{pop3gw.pop3transaction} (STAT, LIST, UIDL
and LAST) over a real L{MaildirStore}, small, indexed and streamed, and for
the store's L{IMessageColumns}.
"""

from __future__ import annotations

import os
import time
import weakref

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pop3gw import maildir, pop3transaction
from pop3gw.address import Address
from pop3gw.interfaces import IMessageColumns
from pop3gw.maildir import MaildirStore
from pop3gw.pop3 import POP3Factory
from pop3gw.pop3import import writeUidMap
from pop3gw.pop3transaction import _InfoColumns
from pop3gw.testing import FakeMessageInfo
from tests.test_pop3 import _PausingTransport, _Realm, _RecordingStore, always
from tests.util import tempPath

ALICE = Address("alice", "example.org")
PEER = IPv4Address("TCP", "192.0.2.7", 40000)
LOGIN = b"USER alice@example.org\r\nPASS secret\r\n"
LOGGED_IN = b"+OK Send PASS.\r\n+OK Logged in.\r\n"

#: Message n (1 to 5) is C{"m" * n + "\n"}: n + 1 octets on disk, n + 2 in
#: wire form; messages 2 and 4 carry the seen flag.
NAMES = [
    "100000001.m1,S=2,W=3",
    "100000002.m2,S=3,W=4:2,S",
    "100000003.m3,S=4,W=5",
    "100000004.m4,S=5,W=6:2,RS",
    "100000005.m5,S=6,W=7",
]

FIRST_SESSION = [
    (b"STAT\r\n", b"+OK 5 25\r\n"),
    (b"LAST\r\n", b"+OK 4\r\n"),
    (
        b"LIST\r\n",
        b"+OK 5 messages (25 octets)\r\n1 3\r\n2 4\r\n3 5\r\n4 6\r\n5 7\r\n.\r\n",
    ),
    (
        b"UIDL\r\n",
        b"+OK Unique-ID listing follows.\r\n1 100000001.m1\r\n2 100000002.m2\r\n"
        b"3 100000003.m3\r\n4 100000004.m4\r\n5 100000005.m5\r\n.\r\n",
    ),
    (b"DELE 2\r\nDELE 5\r\n", b"+OK Message 2 deleted.\r\n+OK Message 5 deleted.\r\n"),
    (b"STAT\r\n", b"+OK 3 14\r\n"),
    (b"LIST\r\n", b"+OK 3 messages (14 octets)\r\n1 3\r\n3 5\r\n4 6\r\n.\r\n"),
    (
        b"UIDL\r\n",
        b"+OK Unique-ID listing follows.\r\n1 100000001.m1\r\n3 100000003.m3\r\n4 100000004.m4\r\n.\r\n",
    ),
    (b"LIST 5\r\nUIDL 2\r\nLIST 4\r\nUIDL 3\r\n",
     b"-ERR Message already deleted.\r\n-ERR Message already deleted.\r\n+OK 4 6\r\n+OK 3 100000003.m3\r\n"),
    (b"RETR 1\r\n", b"+OK 3 octets\r\nm\r\n.\r\n"),
    (b"LAST\r\n", b"+OK 4\r\n"),
    (b"RSET\r\n", b"+OK Maildrop has 5 messages (25 octets).\r\n"),
    (b"LIST\r\n", b"+OK 5 messages (25 octets)\r\n1 3\r\n2 4\r\n3 5\r\n4 6\r\n5 7\r\n.\r\n"),
    (b"DELE 2\r\nDELE 5\r\nRETR 3\r\n", b"+OK Message 2 deleted.\r\n+OK Message 5 deleted.\r\n+OK 5 octets\r\nmmm\r\n.\r\n"),
]


class _Session:
    """
    One POP3 session over a L{StringTransport}, logged in.
    """

    def __init__(self, testCase: SynchronousTestCase, portal: Portal, transport=None) -> None:
        self.events: list = []
        factory = POP3Factory(portal, always, task.Clock())
        self.proto = factory.buildProtocol(PEER)
        self.proto.log = Logger(observer=self.events.append)
        self.transport = transport if transport is not None else StringTransport(peerAddress=PEER)
        self.proto.makeConnection(self.transport)
        testCase.assertEqual(self.send(LOGIN), LOGGED_IN)

    def send(self, data: bytes) -> bytes:
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.transport.value()


class MaildirListingTestsMixin:
    """
    STAT, LIST, UIDL and LAST over a real maildrop, with deleted messages,
    across two sessions with a delivery between them.  Subclasses choose
    how the listing is made (C{prepare}).
    """

    def setUp(self) -> None:
        self.root = tempPath(self)
        self.store = MaildirStore(self.root, hostname="testhost")
        self.maildir = self.store.maildirPath(ALICE)
        self.successResultOf(self.store.openMaildrop(ALICE)).release()
        for n, name in enumerate(NAMES, 1):
            subdir = "cur" if ":2," in name else "new"
            with open(os.path.join(self.maildir, subdir, name), "wb") as f:
                f.write(b"m" * n + b"\n")
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(b"alice@example.org", b"secret")
        self.portal = Portal(_Realm(self.store), [checker])

    def prepare(self) -> None:
        """
        Called before the first session.
        """

    def settle(self) -> None:
        """
        Let a minute pass since the last change of the maildrop, as far as
        the listing cache knows (so its listing is kept).
        """
        now = time.time_ns() + 60 * 10**9
        self.store._listings.now = lambda: now

    def session(self) -> _Session:
        return _Session(self, self.portal)

    def test_twoSessions(self) -> None:
        """
        The first session sees every message numbered in order, deleted
        ones left out of STAT, LIST and UIDL (and refused by number) while
        the others keep their numbers and UIDLs; LAST starts at the last
        seen message.  Its QUIT removes the deleted ones and marks the
        retrieved one seen; a message delivered before the second session
        is listed after the others, which are renumbered.
        """
        self.prepare()
        session = self.session()
        for command, reply in FIRST_SESSION:
            self.assertEqual(session.send(command), reply, command)
        self.assertEqual(session.send(b"QUIT\r\n"), b"+OK pop3gw signing off.\r\n")
        delivery = self.store.beginDelivery([ALICE])
        delivery.write(b"new\n")
        self.successResultOf(delivery.commit())
        (name,) = [n for n in os.listdir(os.path.join(self.maildir, "new")) if not n.startswith("10000000")]
        uid = name.split(",")[0].encode()
        session = self.session()
        self.assertEqual(session.send(b"STAT\r\nLAST\r\n"), b"+OK 4 19\r\n+OK 3\r\n")
        self.assertEqual(
            session.send(b"LIST\r\nUIDL\r\n"),
            b"+OK 4 messages (19 octets)\r\n1 3\r\n2 5\r\n3 6\r\n4 5\r\n.\r\n"
            b"+OK Unique-ID listing follows.\r\n1 100000001.m1\r\n2 100000003.m3\r\n3 100000004.m4\r\n"
            b"4 " + uid + b"\r\n.\r\n",
        )
        self.assertEqual(
            session.send(b"DELE 4\r\nSTAT\r\nUIDL\r\n"),
            b"+OK Message 4 deleted.\r\n+OK 3 14\r\n+OK Unique-ID listing follows.\r\n1 100000001.m1\r\n"
            b"2 100000003.m3\r\n3 100000004.m4\r\n.\r\n",
        )
        session.send(b"QUIT\r\n")

    def test_importedUIDLs(self) -> None:
        """
        UIDLs imported from another server replace the unique names in
        UIDL, one by one and in the listing.
        """
        writeUidMap(self.maildir, {"100000002.m2": "old-2", "100000005.m5": "old-5"})
        self.prepare()
        session = self.session()
        self.assertEqual(
            session.send(b"UIDL\r\nUIDL 5\r\n"),
            b"+OK Unique-ID listing follows.\r\n1 100000001.m1\r\n2 old-2\r\n3 100000003.m3\r\n"
            b"4 100000004.m4\r\n5 old-5\r\n.\r\n+OK 5 old-5\r\n",
        )
        session.send(b"QUIT\r\n")


class SmallMaildropListingTests(MaildirListingTestsMixin, SynchronousTestCase):
    """
    A small maildrop: listed on the reactor thread at each login, the
    listing answered in one write.
    """


    def test_listingOneWrite(self) -> None:
        """
        The C{+OK} line, the message lines and the C{.} line of a short
        C{LIST} or C{UIDL} go out in one write (one system call, no turn
        of the reactor between them).
        """
        self.prepare()
        session = _Session(self, self.portal, _PausingTransport(peerAddress=PEER))
        for command in (b"LIST\r\n", b"UIDL\r\n"):
            del session.transport.writes[:]
            out = session.send(command)
            self.assertEqual(session.transport.writes, [out])
            self.assertTrue(out.startswith(b"+OK"), out)
            self.assertTrue(out.endswith(b"\r\n.\r\n"), out)
            self.assertEqual(out.count(b"\r\n"), len(NAMES) + 2)


class IndexedMaildropListingTests(MaildirListingTestsMixin, SynchronousTestCase):
    """
    A maildrop above L{maildir.INDEX_MIN_ENTRIES} messages (lowered to 2):
    the first session's listing comes from the index written by an earlier
    login.
    """

    def prepare(self) -> None:
        self.patch(maildir, "QUICK_SNAPSHOT_ENTRIES", 2)
        self.patch(maildir, "INDEX_MIN_ENTRIES", 2)
        self.settle()
        session = self.session()
        session.send(b"QUIT\r\n")
        self.assertTrue(os.path.exists(os.path.join(self.maildir, maildir.INDEX_NAME)))
        scans: list = []
        realScandir = os.scandir

        def scandir(path):
            scans.append(path)
            return realScandir(path)

        self.patch(os, "scandir", scandir)
        self.addCleanup(self.assertEqual, scans[:1], [])


class StreamedListingTests(MaildirListingTestsMixin, SynchronousTestCase):
    """
    Listings longer than L{pop3transaction.LISTING_LINES_AT_ONCE} (lowered
    to 2) are streamed a piece at a time: the bytes are the same.
    """

    def prepare(self) -> None:
        self.patch(pop3transaction, "LISTING_LINES_AT_ONCE", 2)


class MessageColumnsTests(SynchronousTestCase):
    """
    L{MaildirStore}'s C{messages} provide L{IMessageColumns}, answering
    what the L{IMessageInfo}s say, for a listed, a cached and an indexed
    maildrop, odd names and imported UIDLs included; L{_InfoColumns}
    answers the same from the infos of a store that does not.
    """

    def setUp(self) -> None:
        self.root = tempPath(self)
        self.store = MaildirStore(self.root, hostname="testhost")
        self.maildir = self.store.maildirPath(ALICE)
        self.successResultOf(self.store.openMaildrop(ALICE)).release()
        files = NAMES + ["100000006.odd:2,S", "100000007." + "x" * 80 + ",S=2,W=3"]
        contents = [b"m" * n + b"\n" for n in range(1, 6)] + [b"odd\n", b"x\n"]
        for name, data in zip(files, contents):
            with open(os.path.join(self.maildir, "cur" if ":2," in name else "new", name), "wb") as f:
                f.write(data)

    def check(self, messages) -> None:
        columns = messages if IMessageColumns.providedBy(messages) else _InfoColumns(messages)
        self.assertTrue(verifyObject(IMessageColumns, columns))
        infos = list(messages)
        self.assertEqual(len(infos), 7)
        self.assertEqual(columns.totalSize(), sum(m.size for m in infos))
        self.assertEqual(columns.lastSeen(), 6)
        for start, stop in [(0, 7), (2, 5), (6, 7), (3, 3)]:
            self.assertEqual(list(columns.sizes(start, stop)), [m.size for m in infos[start:stop]])
            self.assertEqual(list(columns.uids(start, stop)), [m.uid for m in infos[start:stop]])

    def test_listed(self) -> None:
        """
        A maildrop listed at login, then cached, then with imported UIDLs.
        """
        for _turn in range(2):
            drop = self.successResultOf(self.store.openMaildrop(ALICE))
            self.assertTrue(IMessageColumns.providedBy(drop.messages))
            self.check(drop.messages)
            drop.release()
        writeUidMap(self.maildir, {"100000003.m3": "old-3"})
        drop = self.successResultOf(self.store.openMaildrop(ALICE))
        self.assertEqual(list(drop.messages.uids(1, 4)), ["100000002.m2", "old-3", "100000004.m4"])
        self.check(drop.messages)
        drop.release()

    def test_indexed(self) -> None:
        """
        A maildrop whose listing comes from its index.
        """
        self.patch(maildir, "QUICK_SNAPSHOT_ENTRIES", 2)
        self.patch(maildir, "INDEX_MIN_ENTRIES", 2)
        now = time.time_ns() + 60 * 10**9
        self.store._listings.now = lambda: now
        # (The first login renames the odd name to carry its sizes.)
        for _turn in range(2):
            self.successResultOf(self.store.openMaildrop(ALICE)).release()
        self.assertTrue(os.path.exists(os.path.join(self.maildir, maildir.INDEX_NAME)))
        drop = self.successResultOf(self.store.openMaildrop(ALICE))
        self.check(drop.messages)
        drop.release()

    def test_noneSeen(self) -> None:
        """
        With no message seen, C{lastSeen} is 0.
        """
        infos = [FakeMessageInfo(3, "a"), FakeMessageInfo(4, "b")]
        self.assertEqual(_InfoColumns(infos).lastSeen(), 0)
        for name in os.listdir(os.path.join(self.maildir, "cur")):
            os.rename(os.path.join(self.maildir, "cur", name), os.path.join(self.maildir, "new", name.split(":")[0]))
        drop = self.successResultOf(self.store.openMaildrop(ALICE))
        self.assertEqual(drop.messages.lastSeen(), 0)
        drop.release()

    def test_infoColumns(self) -> None:
        """
        L{_InfoColumns} of a list of infos answers as the store's columns.
        """
        drop = self.successResultOf(self.store.openMaildrop(ALICE))
        self.check([FakeMessageInfo(m.size, m.uid, m.seen) for m in drop.messages])
        drop.release()


class StreamingTests(SynchronousTestCase):
    """
    A listing longer than L{pop3transaction.LISTING_LINES_AT_ONCE} (lowered
    to 2) goes out a piece per write while the client reads, and the next
    command waits for its end.
    """

    def setUp(self) -> None:
        self.patch(pop3transaction, "LISTING_LINES_AT_ONCE", 2)
        self.store = _RecordingStore()
        for n in range(1, 6):
            self.store.add(ALICE, b"m" * n + b"\r\n", uid="u%d" % (n,))
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(b"alice@example.org", b"secret")
        self.portal = Portal(_Realm(self.store), [checker])
        self.session = _Session(self, self.portal, _PausingTransport(peerAddress=PEER))
        self.transport = self.session.transport

    def resume(self) -> bytes:
        """
        Let the transport accept one more write.
        """
        self.transport.clear()
        self.transport.producer.resumeProducing()
        return self.transport.value()

    def test_piecesWhileReading(self) -> None:
        """
        Each write the transport accepts carries one piece of the listing
        (deleted messages left out); the last piece carries the C{.} line,
        and only then is the pipelined STAT answered.
        """
        self.assertEqual(self.session.send(b"DELE 3\r\n"), b"+OK Message 3 deleted.\r\n")
        self.transport.pausing = True
        self.assertEqual(self.session.send(b"UIDL\r\nSTAT\r\n"), b"+OK Unique-ID listing follows.\r\n")
        self.assertEqual(self.resume(), b"1 u1\r\n2 u2\r\n")
        self.assertEqual(self.resume(), b"4 u4\r\n")
        self.assertEqual(self.resume(), b"5 u5\r\n.\r\n")
        self.assertEqual(self.resume(), b"+OK 4 %d\r\n" % (3 + 4 + 6 + 7,))
        self.transport.pausing = False
        self.assertEqual(self.resume(), b"")
        self.assertEqual(
            self.session.send(b"LIST\r\n"),
            b"+OK 4 messages (20 octets)\r\n1 3\r\n2 4\r\n4 6\r\n5 7\r\n.\r\n",
        )
        self.assertEqual(
            self.transport.writes[-4:],
            [b"+OK 4 messages (20 octets)\r\n", b"1 3\r\n2 4\r\n", b"4 6\r\n", b"5 7\r\n.\r\n"],
        )

    def test_hangUpMidListing(self) -> None:
        """
        A client that hangs up in the middle of a streamed listing gets
        nothing more, and the server no longer holds the listing.
        """
        ref = weakref.ref(self.store.opened[-1].messages)
        self.transport.pausing = True
        self.assertEqual(self.session.send(b"LIST\r\n"), b"+OK 5 messages (25 octets)\r\n")
        self.session.proto.connectionLost(Failure(ConnectionDone()))
        self.transport.clear()
        self.assertIsNone(self.transport.producer)
        self.assertIsNone(self.session.proto._sender)
        self.store.opened[-1].messages = []
        self.assertIsNone(ref())

    def test_formattingFails(self) -> None:
        """
        A listing that cannot be formatted midway (a server fault) is logged
        and the connection closed, never ended with a C{.} line that would
        make it look whole.
        """

        class Broken:
            size = 1

            @property
            def uid(self):
                raise RuntimeError("broken")

        self.session.proto._messages[3] = Broken()
        self.assertEqual(self.session.send(b"UIDL\r\n"), b"+OK Unique-ID listing follows.\r\n1 u1\r\n2 u2\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(
            [e["log_failure"].type for e in self.session.events if "log_failure" in e], [RuntimeError]
        )
