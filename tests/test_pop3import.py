"""
Tests for L{pop3gw.pop3import}: old UIDLs onto imported messages, and the
resumable copy from another POP3 server.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from pop3gw.address import Address
from pop3gw.maildir import MaildirStore
from pop3gw.pop3import import (
    UIDLIST,
    Importer,
    MigrationError,
    importUIDLs,
    parseDovecotUidlist,
    parseSource,
    parseUIDLListing,
    readUidMap,
)
from tests.util import makeTempDirectory

ALICE = Address("alice", "example.org")


class ParseTests(SynchronousTestCase):
    def test_listing(self) -> None:
        """
        A captured UIDL listing: +OK and . lines ignored; a line that is
        not 'N uidl' is refused, naming it.
        """
        self.assertEqual(parseUIDLListing("+OK\r\n1 abc\r\n2 d-e\r\n.\r\n"), [(1, "abc"), (2, "d-e")])
        with self.assertRaises(MigrationError) as e:
            parseUIDLListing("1 abc\n2\n")
        self.assertEqual(str(e.exception), "line 2: expected 'N uidl', got '2'")

    def test_dovecot(self) -> None:
        """
        Dovecot's uidlist: Dovecot's default POP3 UIDL (uid and UID
        validity, 8 hex digits each), or the P extension's value; the
        file name is reduced to the Maildir unique name.
        """
        text = ("3 V1234567890 N4 G0123\n"
                "1 :1700000000.M1P2.host,S=5,W=6\n"
                "3 W1300 :1700000001.M2P2.host\n"
                "2 P0000abcd :1700000002.M3P2.host:2,S\n")
        self.assertEqual(parseDovecotUidlist(text), {
            "1700000000.M1P2.host": "00000001499602D2",
            "1700000001.M2P2.host": "00000003499602D2",
            "1700000002.M3P2.host": "0000abcd",
        })
        self.assertRaises(MigrationError, parseDovecotUidlist, "1 :x\n")

    def test_source(self) -> None:
        """
        pop3:// (STLS, 110) and pop3s:// (995) URLs, the user possibly a
        full address.
        """
        self.assertEqual(parseSource("pop3s://alice@example.org@old.example:1995"),
                         ("alice@example.org", "old.example", 1995, True))
        self.assertEqual(parseSource("pop3://bob%40example.org@old.example"),
                         ("bob@example.org", "old.example", 110, False))
        for bad in ("imap://a@b", "pop3://old.example", "pop3://a@b:x"):
            self.assertRaises(MigrationError, parseSource, bad)


class MaildropTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MaildirStore(makeTempDirectory(self), hostname="mail.example.org")
        for i in range(3):
            delivery = self.store.beginDelivery([ALICE])
            delivery.write(b"Subject: %d\n\nbody\n" % (i,))
            self.successResultOf(delivery.commit())

    def maildrop(self):
        return self.successResultOf(self.store.openMaildrop(ALICE))

    def test_listingServed(self) -> None:
        """
        After a listing is imported, POP3 serves the old UIDLs, in order.
        """
        maildrop = self.maildrop()
        keys = maildrop.keys()
        self.assertEqual([m.uid for m in maildrop.messages], keys)
        maildrop.release()
        self.assertEqual(importUIDLs(self.store.maildirPath(ALICE), keys, "1 old-1\n2 old-2\n3 old-3\n"), 3)
        maildrop = self.maildrop()
        self.assertEqual([m.uid for m in maildrop.messages], ["old-1", "old-2", "old-3"])
        maildrop.release()

    def test_dovecotServed(self) -> None:
        """
        A dovecot-uidlist maps by file name; messages it does not name keep
        their own UIDL.
        """
        maildrop = self.maildrop()
        keys = maildrop.keys()
        maildrop.release()
        text = f"3 V1 N9\n7 :{keys[1]}\n"
        self.assertEqual(importUIDLs(self.store.maildirPath(ALICE), keys, text), 1)
        maildrop = self.maildrop()
        self.assertEqual([m.uid for m in maildrop.messages], [keys[0], "0000000700000001", keys[2]])
        maildrop.release()

    def test_mismatchWritesNothing(self) -> None:
        """
        A listing of another number of messages, or with a UIDL twice, is
        refused and nothing is written.
        """
        path = self.store.maildirPath(ALICE)
        maildrop = self.maildrop()
        keys = maildrop.keys()
        maildrop.release()
        for text in ("1 a\n2 b\n", "1 a\n2 b\n3 a\n"):
            self.assertRaises(MigrationError, importUIDLs, path, keys, text)
        self.assertFalse(os.path.exists(os.path.join(path, UIDLIST)))


class FakeSession:
    """
    The part of C{poplib.POP3} the importer uses, over a fixed mailbox.
    """

    def __init__(self, messages, password="pw") -> None:
        self.messages = messages
        self.password = password
        self.retrieved: list = []

    def user(self, name):
        return b"+OK"

    def pass_(self, password):
        import poplib

        if password != self.password:
            raise poplib.error_proto(b"-ERR no")
        return b"+OK"

    def uidl(self):
        return b"+OK", [b"%d %s" % (i + 1, uid) for i, (uid, _) in enumerate(self.messages)], 0

    def retr(self, number):
        self.retrieved.append(number)
        return b"+OK", self.messages[number - 1][1].split(b"\r\n")[:-1], 0

    def quit(self):
        return b"+OK"


class ImporterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = makeTempDirectory(self)
        self.stored: dict = {}
        self.failAt = None

    def deliver(self, data: bytes, before) -> str:
        key = f"k{len(self.stored) + (1 if self.failAt is None else 100)}"
        before(key)
        if self.failAt is not None and len(self.stored) == self.failAt:
            raise OSError(28, "No space left on device")
        self.stored[key] = data
        return key

    def importer(self) -> Importer:
        return Importer(self.dir, self.deliver, lambda: list(self.stored))

    def test_resumable(self) -> None:
        """
        Every message is copied with its UIDL; a second run copies
        nothing; a run cut short by a failure is resumed without a
        duplicate, and the entry of the message that failed is dropped.
        """
        messages = [(b"u1", b"A: 1\r\n\r\nx\r\n"), (b"u2", b"A: 2\r\n\r\ny\r\n"), (b"u3", b"A: 3\r\n\r\nz\r\n")]
        self.failAt = 1
        self.assertRaises(OSError, self.importer().run, FakeSession(messages), "alice", "pw")
        self.assertEqual(list(self.stored.values()), [messages[0][1]])
        self.failAt = None
        session = FakeSession(messages)
        self.assertEqual(self.importer().run(session, "alice", "pw"), (2, 1))
        self.assertEqual(session.retrieved, [2, 3])
        self.assertEqual(sorted(self.stored.values()), sorted(m[1] for m in messages))
        uids = {k: v for k, v in readUidMap(self.dir).items() if k in self.stored}
        self.assertEqual(sorted(uids.values()), ["u1", "u2", "u3"])
        self.assertEqual({self.stored[k]: v for k, v in uids.items()}[messages[2][1]], "u3")
        self.assertEqual(self.importer().run(FakeSession(messages), "alice", "pw"), (0, 3))

    def test_badLogin(self) -> None:
        """
        A refused login is one clear error.
        """
        with self.assertRaises(MigrationError) as e:
            self.importer().run(FakeSession([]), "alice", "wrong")
        self.assertEqual(str(e.exception), "login as alice refused")

    def test_unusableListing(self) -> None:
        """
        A UIDL listing the importer cannot rely on (a line that is not
        C{N uidl}, a UIDL that is not 1 to 70 printable ASCII characters
        as RFC 1939 requires, or a UIDL given twice) is one clear error
        before any message is copied, rather than a traceback, a message
        copied again at every run (a UIDL the map cannot keep) or one
        skipped (a repeated UIDL).
        """
        cases = [
            ([b"1 a b"], "malformed UIDL listing line 1: '1 a b'"),
            ([b"x abc"], "malformed UIDL listing line 1: 'x abc'"),
            ([b"1"], "malformed UIDL listing line 1: '1'"),
            ([b"1 u1", b"2 " + b"u" * 71], "malformed UIDL listing line 2: '2 " + "u" * 58 + "...'"),
            ([b"1 \xc3\xa9"], "malformed UIDL listing line 1: '1 \\xc3\\xa9'"),
            ([b"1 \x1b[2J"], "malformed UIDL listing line 1: '1 \\x1b[2J'"),
            ([b"1 u1", b"2 u1"], "UIDL listing names u1 twice"),
        ]
        for lines, message in cases:
            session = FakeSession([(b"u1", b"A: 1\r\n\r\nx\r\n"), (b"u2", b"A: 2\r\n\r\ny\r\n")])
            session.uidl = lambda lines=lines: (b"+OK", lines, 0)  # type: ignore[method-assign]
            with self.assertRaises(MigrationError) as e:
                self.importer().run(session, "alice", "pw")
            self.assertEqual(str(e.exception), message)
            self.assertEqual((session.retrieved, self.stored), ([], {}))
