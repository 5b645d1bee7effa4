"""
Tests for L{pop3gw.pop3import}: old UIDLs onto imported messages, and the
resumable copy from another POP3 server.
"""

import io
import os

from twisted.trial.unittest import SynchronousTestCase

from pop3gw.address import Address
from pop3gw.maildir import MaildirStore
from pop3gw.pop3import import (
    COPY_CHUNK,
    UIDLIST,
    Importer,
    MaildirTarget,
    MigrationError,
    PostgresTarget,
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


class UIDLTargetContract:
    """
    L{IUIDLTarget} over a real maildrop store holding three messages of
    alice: the Maildir store (with its C{pop3gw-uidlist}) and the
    PostgreSQL one (the entries' UIDL column).
    """

    def makeStore(self):
        raise NotImplementedError()

    def target(self):
        raise NotImplementedError()

    def setUp(self) -> None:
        self.store = self.makeStore()
        for i in range(3):
            delivery = self.store.beginDelivery([ALICE])
            delivery.write(b"Subject: %d\n\nbody\n" % (i,))
            self.successResultOf(delivery.commit())

    def served(self) -> list:
        """
        The UIDLs and message data POP3 serves, in order.
        """
        maildrop = self.successResultOf(self.store.openMaildrop(ALICE))
        try:
            out = []
            for index, message in enumerate(maildrop.messages):
                f = self.successResultOf(maildrop.openMessage(index))
                out.append((message.uid, f.read()))
                f.close()
            return out
        finally:
            maildrop.release()

    def test_listingServed(self) -> None:
        """
        After a listing is imported, POP3 serves the old UIDLs, in order,
        for the same messages.
        """
        before = self.served()
        self.assertEqual(importUIDLs(self.target(), "+OK\r\n1 old-1\r\n2 old-2\r\n3 old-3\r\n.\r\n"), 3)
        self.assertEqual(self.served(), [(u, data) for u, (_, data) in zip(["old-1", "old-2", "old-3"], before)])

    def test_reimportSwaps(self) -> None:
        """
        A listing imported again replaces the UIDLs, even when two
        messages exchange theirs.
        """
        importUIDLs(self.target(), "1 a\n2 b\n3 c\n")
        self.assertEqual(importUIDLs(self.target(), "1 b\n2 a\n3 c\n"), 3)
        self.assertEqual([u for u, _ in self.served()], ["b", "a", "c"])

    def test_mismatchWritesNothing(self) -> None:
        """
        A listing of another number of messages, or with a UIDL twice, is
        refused and nothing is written.
        """
        before = self.served()
        for text, message in [("1 a\n2 b\n", "the listing numbers 2 messages but the maildrop holds 3: "
                                                "import the listing right after copying the messages, "
                                                "before any new mail"),
                              ("1 a\n2 b\n3 a\n", "UIDL a appears twice")]:
            with self.assertRaises(MigrationError) as e:
                importUIDLs(self.target(), text)
            self.assertEqual(str(e.exception), message)
        self.assertEqual(self.served(), before)

    def test_usedUIDLRefused(self) -> None:
        """
        A UIDL that another message of the maildrop already has is refused
        with one line, and nothing is changed.
        """
        target = self.target()
        importUIDLs(target, "1 a\n2 b\n3 c\n")
        keys = list(target.messageKeys())
        with self.assertRaises(MigrationError) as e:
            target.setUIDLs({keys[0]: "z", keys[1]: "c"})
        self.assertEqual(str(e.exception), "UIDL c is already the UIDL of another message of the maildrop")
        self.assertEqual([u for u, _ in self.served()], ["a", "b", "c"])

    def test_importResumable(self) -> None:
        """
        The importer copies every message with its UIDL; a run cut short
        by a failure is resumed without a duplicate; a further run copies
        nothing.
        """
        messages = [(b"u1", b"A: 1\r\n\r\nx\r\n"), (b"u2", b"A: 2\r\n\r\n.y\r\n"), (b"u3", b"A: 3\r\n\r\nz\r\n")]
        target = self.target()
        real = target.deliver
        calls: list = []

        def failing(data: bytes, uidl: str) -> None:
            calls.append(uidl)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            real(data, uidl)

        target.deliver = failing
        self.assertRaises(OSError, Importer(target).run, FakeSession(messages), "alice", "pw")
        session = FakeSession(messages)
        self.assertEqual(Importer(self.target()).run(session, "alice", "pw"), (2, 1))
        self.assertEqual(session.retrieved, [2, 3])
        self.assertEqual(Importer(self.target()).run(FakeSession(messages), "alice", "pw"), (0, 3))
        served = self.served()
        self.assertEqual(len(served), 6)
        self.assertEqual(sorted(served[3:]), [("u1", messages[0][1]), ("u2", messages[1][1]), ("u3", messages[2][1])])


class MaildirTargetTests(UIDLTargetContract, SynchronousTestCase):
    def makeStore(self):
        return MaildirStore(makeTempDirectory(self), hostname="mail.example.org")

    def target(self):
        def keys():
            return self.successResultOf(self.store.openMaildrop(ALICE)).keysAndRelease()

        def deliver(chunks, before):
            delivery = self.store.beginDelivery([ALICE])
            before(delivery.uniqueName)
            for chunk in chunks:
                delivery.write(chunk)
            self.successResultOf(delivery.commit())
            return delivery.uniqueName

        return MaildirTarget(self.store.maildirPath(ALICE), keys, deliver)

    def test_dovecotServed(self) -> None:
        """
        A dovecot-uidlist maps by file name; messages it does not name keep
        their own UIDL.
        """
        keys = list(self.target().messageKeys())
        text = f"3 V1 N9\n7 :{keys[1]}\n"
        self.assertEqual(importUIDLs(self.target(), text), 1)
        self.assertEqual([u for u, _ in self.served()], [keys[0], "0000000700000001", keys[2]])

    def test_nothingWrittenOnMismatch(self) -> None:
        """
        A refused listing leaves no C{pop3gw-uidlist} behind.
        """
        self.assertRaises(MigrationError, importUIDLs, self.target(), "1 a\n")
        self.assertFalse(os.path.exists(os.path.join(self.store.maildirPath(ALICE), UIDLIST)))


class PostgresTargetTests(UIDLTargetContract, SynchronousTestCase):
    def makeStore(self):
        from pop3gw.pgmail import PostgresMaildropStore
        from tests.test_pgstore import newDatabase

        return PostgresMaildropStore(newDatabase(self), node="node-a")

    def target(self):
        return PostgresTarget(self.store, ALICE)

    def test_deliverRaceOneLine(self) -> None:
        """
        A message whose UIDL another run stored meanwhile (after this run
        read the maildrop's UIDLs) is one line, and nothing is stored
        twice.
        """
        target = self.target()
        importUIDLs(target, "1 a\n2 b\n3 c\n")
        with self.assertRaises(MigrationError) as e:
            target.deliver([b"A: 1\r\n\r\nx\r\n"], "b")
        self.assertEqual(str(e.exception), "UIDL b was stored meanwhile, by another import? run again")
        self.assertEqual(len(self.served()), 3)

    def test_ownFormReserved(self) -> None:
        """
        An imported UIDL of the form pop3gw gives new mail (P and a
        position) is never given to a later message.
        """
        importUIDLs(self.target(), "1 P5\n2 P6\n3 x\n")
        Importer(self.target()).run(FakeSession([(b"P8", b"A: 1\r\n\r\nx\r\n")]), "alice", "pw")
        for _ in range(3):
            delivery = self.store.beginDelivery([ALICE])
            delivery.write(b"Subject: new\n\nbody\n")
            self.successResultOf(delivery.commit())
        uids = [u for u, _ in self.served()]
        self.assertEqual(uids[:4], ["P5", "P6", "x", "P8"])
        self.assertEqual(len(set(uids)), 7)


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

    # What the importer streams a message with: poplib's command and status
    # primitives and its socket file, over the message in wire form
    # (dot-stuffed, with the final "." line).
    def _putcmd(self, line: str) -> None:
        verb, number = line.split(" ")
        assert verb == "RETR", line
        self.retrieved.append(int(number))
        message = self.messages[int(number) - 1][1]
        stuffed = b"".join(b"." + line if line.startswith(b".") else line for line in message.splitlines(True))
        self.file = io.BytesIO(stuffed + b".\r\n")

    def _getresp(self) -> bytes:
        return b"+OK"

    def quit(self):
        return b"+OK"


class ImporterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = makeTempDirectory(self)
        self.stored: dict = {}
        self.chunks: list = []
        self.failAt = None

    def deliver(self, chunks, before) -> str:
        key = f"k{len(self.stored) + (1 if self.failAt is None else 100)}"
        before(key)
        if self.failAt is not None and len(self.stored) == self.failAt:
            raise OSError(28, "No space left on device")
        chunks = list(chunks)
        self.chunks.append(chunks)
        self.stored[key] = b"".join(chunks)
        return key

    def importer(self) -> Importer:
        return Importer(MaildirTarget(self.dir, lambda: list(self.stored), self.deliver))

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

    def test_messageStreamed(self) -> None:
        """
        A message is copied as it arrives, in chunks of at most
        L{COPY_CHUNK} octets and a line, never whole: the store gets its
        exact octets, dot-stuffing undone.
        """
        body = b"".join(b"%05d " % i + b"x" * 993 + b"\r\n" for i in range(1024))
        message = b"Subject: big\r\n\r\n..two dots\r\n.\r\n" + body + b".\r\n"
        self.assertEqual(self.importer().run(FakeSession([(b"u1", message)]), "alice", "pw"), (1, 0))
        self.assertEqual(list(self.stored.values()), [message])
        [chunks] = self.chunks
        self.assertGreaterEqual(len(chunks), len(message) // COPY_CHUNK)
        self.assertLessEqual(max(map(len, chunks)), COPY_CHUNK + 1002)

    def test_refusedRetrieval(self) -> None:
        """
        A RETR the server refuses is one clear error, and nothing is
        stored for it.
        """
        import poplib

        session = FakeSession([(b"u1", b"A: 1\r\n\r\nx\r\n")])

        def refuse():
            session._pending = []
            raise poplib.error_proto(b"-ERR gone")

        session._getresp = refuse  # type: ignore[method-assign]
        with self.assertRaises(MigrationError) as e:
            self.importer().run(session, "alice", "pw")
        self.assertEqual(str(e.exception), "RETR 1 refused: b'-ERR gone'")
        self.assertEqual(self.stored, {})

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

    def test_longLines(self) -> None:
        """
        Lines longer than C{poplib}'s 2048 octets are copied exactly: one
        of 10,000 octets, one longer than L{COPY_CHUNK}, one whose CRLF
        falls across two reads, bare LF line ends (made CRLF, as
        C{poplib} does), and a stuffed dot at the start of a long line;
        no chunk handed to the store is much over L{COPY_CHUNK}.
        """
        message = (b"Subject: long\r\n\r\n" + b"a" * 10000 + b"\r\n" + b"b" * (3 * COPY_CHUNK + 7) + b"\r\n"
                   + b"c" * (COPY_CHUNK - 1) + b"\r\n" + b"." + b"d" * 5000 + b"\r\nend\r\n")
        served = FakeSession([(b"u1", message), (b"u2", b"A: 2\nbare\n")])
        self.assertEqual(self.importer().run(served, "alice", "pw"), (2, 0))
        self.assertEqual(list(self.stored.values()), [message, b"A: 2\r\nbare\r\n"])
        self.assertLessEqual(max(len(c) for chunks in self.chunks for c in chunks), 2 * COPY_CHUNK + 2)

    def test_lineOverBoundRefused(self) -> None:
        """
        A message with a line over the bound is read to its end and left
        out, nothing stored for it, with one line saying why; the
        messages after it are copied, and a second run copies none of the
        others again.
        """
        messages = [(b"u1", b"A: 1\r\n\r\nx\r\n"), (b"u2", b"A: 2\r\n\r\n" + b"y" * 10001 + b"\r\n"),
                    (b"u3", b"A: 3\r\n\r\nz\r\n")]
        importer = Importer(MaildirTarget(self.dir, lambda: list(self.stored), self.deliver), maxLine=10000)
        lines: list = []
        self.assertEqual(importer.run(FakeSession(messages), "alice", "pw", lines.append), (2, 0))
        self.assertEqual(importer.refused, ["message 2 (UIDL u2) not copied: it has a line longer than 10000 octets"])
        self.assertIn(importer.refused[0], lines)
        self.assertEqual(sorted(self.stored.values()), [messages[0][1], messages[2][1]])
        again = FakeSession(messages)
        self.assertEqual(importer.run(again, "alice", "pw"), (0, 2))
        self.assertEqual(again.retrieved, [2])
        self.assertEqual(len(importer.refused), 1)

    def test_connectionLost(self) -> None:
        """
        A connection that ends in the middle of a message is one clear
        error, and nothing is stored for that message.
        """
        session = FakeSession([(b"u1", b"A: 1\r\n\r\nx\r\n")])
        putcmd = session._putcmd

        def cut(line: str) -> None:
            putcmd(line)
            session.file = io.BytesIO(session.file.getvalue()[:8])

        session._putcmd = cut  # type: ignore[method-assign]
        with self.assertRaises(MigrationError) as e:
            self.importer().run(session, "alice", "pw")
        self.assertEqual(str(e.exception), "the server closed the connection in the middle of a message")
        self.assertEqual(self.stored, {})

    def test_loopbackServer(self) -> None:
        """
        Over a real C{poplib.POP3} session with a POP3 server on loopback,
        a message with a 10,000-octet line is copied byte for byte, and
        C{poplib}'s module-wide line limit is left as it was.
        """
        import poplib

        message = b"Subject: wide\r\n\r\n" + b"QUJD" * 2500 + b"\r\n..dot\r\n"
        port = _servePOP3(self, [(b"wide-1", message)])
        limit = poplib._MAXLINE  # type: ignore[attr-defined]
        session = poplib.POP3("127.0.0.1", port, timeout=10)
        try:
            self.assertEqual(self.importer().run(session, "alice", "pw"), (1, 0))
        finally:
            session.close()
        self.assertEqual(list(self.stored.values()), [message])
        self.assertEqual(readUidMap(self.dir), {"k1": "wide-1"})
        self.assertEqual(poplib._MAXLINE, limit)  # type: ignore[attr-defined]


def _servePOP3(testCase: SynchronousTestCase, messages: list) -> int:
    """
    A minimal POP3 server on a loopback port, in a thread, for one
    session over C{messages} (C{(uidl, message)}, the message in wire
    form): any USER and PASS, UIDL, RETR, QUIT.  Closed when the test ends.

    @return: its port.
    """
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"+OK ready\r\n")
            for raw in lines:
                verb, _, arg = raw.strip().partition(b" ")
                verb = verb.upper()
                if verb == b"UIDL":
                    conn.sendall(b"+OK\r\n" + b"".join(b"%d %s\r\n" % (i + 1, u) for i, (u, _) in enumerate(messages))
                                 + b".\r\n")
                elif verb == b"RETR":
                    body = messages[int(arg) - 1][1]
                    stuffed = b"".join(b"." + line if line.startswith(b".") else line for line in body.splitlines(True))
                    conn.sendall(b"+OK\r\n" + stuffed + b".\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"+OK bye\r\n")
                    return
                else:
                    conn.sendall(b"+OK\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop() -> None:
        listener.close()
        thread.join(10)

    testCase.addCleanup(stop)
    return listener.getsockname()[1]


class CommandTests(SynchronousTestCase):
    """
    C{pop3gw user import-uidl} with C{--store postgresql://...}.
    """

    def setUp(self) -> None:
        from pop3gw.pgdatabase import Database
        from pop3gw.pgmail import PostgresMaildropStore
        from tests import pgcluster

        uri = pgcluster.database(self)
        self.argv = ["--store", uri]
        self.assertEqual(self.command("init")[0], 0)
        self.assertEqual(self.command("user", "add", str(ALICE), stdin="pw\n")[0], 0)
        database = Database(uri, maxConnections=1)
        self.addCleanup(database.close)
        self.store = PostgresMaildropStore(database, node="test")
        for i in range(2):
            delivery = self.store.beginDelivery([ALICE])
            delivery.write(b"Subject: %d\n\nbody\n" % (i,))
            self.successResultOf(delivery.commit())

    def command(self, *argv: str, stdin: str = ""):
        import io

        from pop3gw import cli

        out, err = io.StringIO(), io.StringIO()
        status = cli.main([*self.argv, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def test_importUIDL(self) -> None:
        """
        The listing's UIDLs become the messages' UIDLs in the database; a
        listing that does not fit is one line, exit 65; a maildrop in use
        by a POP3 session is one line, exit 75.
        """
        self.assertEqual(self.command("user", "import-uidl", str(ALICE), stdin="+OK\n1 old-1\n2 old-2\n.\n"),
                         (0, "alice@example.org: 2 of 2 messages now have their old UIDL\n", ""))
        self.assertEqual([m.uid for m in self.store.listMessages(str(ALICE))], ["old-1", "old-2"])
        self.assertEqual(self.command("user", "import-uidl", str(ALICE), stdin="1 x\n"),
                         (65, "", "pop3gw: cannot import UIDLs: the listing numbers 1 messages but the maildrop "
                                  "holds 2: import the listing right after copying the messages, before any new "
                                  "mail\n"))
        maildrop = self.successResultOf(self.store.openMaildrop(ALICE))
        self.addCleanup(maildrop.release)
        self.assertEqual(self.command("user", "import-uidl", str(ALICE), stdin="1 a\n2 b\n"),
                         (75, "", "pop3gw: the maildrop of alice@example.org is in use by a POP3 session; "
                                  "try again\n"))
        self.assertEqual([m.uid for m in self.store.listMessages(str(ALICE))], ["old-1", "old-2"])
