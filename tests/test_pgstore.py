"""
Tests for the PostgreSQL store (L{pop3gw.pgdatabase}, L{pop3gw.pgusers},
L{pop3gw.pgmail}): the maildrop and users contract suites over a private
cluster (L{tests.pgcluster}), then what only a shared database does: locks
across nodes, leases, schema versions, a database that cannot be reached.
"""

from __future__ import annotations

import io
import os
import tempfile

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from pop3gw import pgdatabase
from pop3gw.address import Address
from pop3gw.interfaces import (
    AliasNotLocal,
    AliasShadowsUser,
    MaildropLocked,
    TemporaryFailure,
    UnknownTarget,
)
from tests import pgcluster
from tests.test_maildir import ALICE, BOB, MaildropStoreContractMixin
from tests.test_passwords import HASH_A, HASH_B
from tests.test_users import UsersFileContract


def newDatabase(testcase, maxConnections: int = 4):
    """
    A new database with the schema, and a pool on it closed in the
    test's cleanups.

    @return: the L{pop3gw.pgdatabase.Database}.
    """
    from pop3gw.pgdatabase import Database, initSchema

    uri = pgcluster.database(testcase)
    database = Database(uri, maxConnections=maxConnections)
    testcase.addCleanup(database.close)
    initSchema(database)
    return database


class PostgresMaildropContractTests(MaildropStoreContractMixin, SynchronousTestCase):
    """
    The maildrop contract over L{pop3gw.pgmail.PostgresMaildropStore}.
    """

    def makeStore(self):
        from pop3gw.pgmail import PostgresMaildropStore

        self.database = newDatabase(self)
        return PostgresMaildropStore(self.database, node="node-a")


class PostgresUsersContractTests(UsersFileContract, SynchronousTestCase):
    """
    The users contract over L{pop3gw.pgusers.PostgresUsers}.
    """

    def setUp(self) -> None:
        from pop3gw.pgusers import PostgresUsers

        self.database = newDatabase(self)
        self.db = PostgresUsers(self.database)
        self.db.setPassword(Address("alice", "example.org"), HASH_A, True)
        self.db.setPassword(Address("bob", "example.org"), HASH_B, True)
        self.db.addAlias("postmaster@example.org", [Address("alice", "example.org")])


class SchemaTests(SynchronousTestCase):
    """
    L{pop3gw.pgdatabase.initSchema} and L{pop3gw.pgdatabase.checkSchema}.
    """

    def test_initIdempotent(self) -> None:
        """
        The first C{init} creates the schema; a second one changes nothing
        and keeps the data.
        """
        from pop3gw.pgdatabase import SCHEMA_VERSION, Database, checkSchema, initSchema
        from pop3gw.pgusers import PostgresUsers

        database = Database(pgcluster.database(self))
        self.addCleanup(database.close)
        self.assertEqual(
            checkSchema(database), "the database has no pop3gw schema: run 'pop3gw --store URI init' first"
        )
        self.assertEqual(initSchema(database), (0, SCHEMA_VERSION))
        PostgresUsers(database).setPassword(ALICE, HASH_A, True)
        self.assertEqual(initSchema(database), (SCHEMA_VERSION, SCHEMA_VERSION))
        self.assertIsNone(checkSchema(database))
        self.assertEqual(PostgresUsers(database).lookupUser(ALICE), (ALICE, HASH_A))

    def test_newerSchemaRefused(self) -> None:
        """
        A database whose schema is newer than the code is refused, not
        downgraded.
        """
        from pop3gw.pgdatabase import SCHEMA_VERSION, checkSchema, initSchema

        database = newDatabase(self)
        with database.transaction() as conn:
            conn.execute("UPDATE pop3gw_schema SET version = %s", (SCHEMA_VERSION + 1,))
        self.assertRaises(ValueError, initSchema, database)
        self.assertEqual(
            checkSchema(database),
            f"the database holds schema version {SCHEMA_VERSION + 1}, newer than this pop3gw ({SCHEMA_VERSION})",
        )

    def test_redact(self) -> None:
        """
        A URI's password never reaches a log line.
        """
        from pop3gw.pgdatabase import isDatabaseURI, redact

        self.assertEqual(redact("postgresql://u:secret@h1,h2/db?x=1"), "postgresql://u:***@h1,h2/db?x=1")
        self.assertEqual(redact("postgresql:///db?host=/run"), "postgresql:///db?host=/run")
        self.assertTrue(isDatabaseURI("postgres://h/db"))
        self.assertFalse(isDatabaseURI("maildir"))


class ConnectionCheckTests(SynchronousTestCase):
    """
    The pool checks a connection it hands out only if it was idle.
    """

    def test_checkedOnlyWhenIdle(self) -> None:
        """
        A connection handed out again less than L{pgdatabase.IDLE_CHECK}
        seconds after it came back costs no check (no extra round trip);
        one idle for longer is checked first.
        """
        import psycopg

        database = newDatabase(self, maxConnections=1)
        with database.transaction() as conn:
            conn.execute("SELECT 1")
        checked: list = []
        execute = psycopg.Connection.execute

        def recording(conn, query, *args, **kwargs):
            if query == "":
                checked.append(conn)
            return execute(conn, query, *args, **kwargs)

        self.patch(psycopg.Connection, "execute", recording)
        for _ in range(3):
            with database.transaction() as conn:
                conn.execute("SELECT 1")
        self.assertEqual(checked, [])
        self.patch(pgdatabase, "IDLE_CHECK", -1.0)
        with database.transaction() as conn:
            conn.execute("SELECT 1")
        self.assertEqual(len(checked), 1)


class UnreachableTests(SynchronousTestCase):
    """
    A database that cannot be reached fails every operation with
    L{TemporaryFailure}, and nothing is acknowledged.
    """

    def setUp(self) -> None:
        from pop3gw.pgdatabase import Database

        socketDir = tempfile.mkdtemp(prefix="pop3gw-nopg-")
        self.addCleanup(os.rmdir, socketDir)
        self.database = Database(f"postgresql:///nothing?host={socketDir}", timeout=0.5)
        self.addCleanup(self.database.close)

    def test_maildropAndDelivery(self) -> None:
        """
        Login (C{openMaildrop}) and a delivery's commit fail temporarily.
        """
        from pop3gw.pgmail import PostgresMaildropStore

        store = PostgresMaildropStore(self.database)
        self.failureResultOf(store.openMaildrop(ALICE), TemporaryFailure)
        delivery = store.beginDelivery([ALICE])
        delivery.write(b"Subject: x\r\n\r\nbody\r\n")
        self.failureResultOf(delivery.commit(), TemporaryFailure)

    def test_users(self) -> None:
        """
        Password lookups fail temporarily; a refresh keeps the snapshot,
        which answers temporarily failing until the database was read.
        """
        from pop3gw.pgusers import PostgresUsers

        users = PostgresUsers(self.database)
        self.assertRaises(TemporaryFailure, users.lookupUser, ALICE)
        self.assertRaises(TemporaryFailure, users.refresh().exists, ALICE)


class LockTests(SynchronousTestCase):
    """
    The maildrop lock across nodes: two stores on one database stand for
    two nodes.
    """

    def setUp(self) -> None:
        from pop3gw.pgmail import PostgresMaildropStore

        self.database = newDatabase(self)
        self.nodeA = PostgresMaildropStore(self.database, node="node-a")
        self.nodeB = PostgresMaildropStore(self.database, node="node-b")

    def expire(self, node: str) -> None:
        """
        Make C{node}'s locks stale, as if it had stopped renewing them
        L{pop3gw.pgmail.LOCK_LEASE} seconds ago.
        """
        with self.database.transaction() as conn:
            conn.execute("UPDATE pop3gw_locks SET expires = now() - interval '1 second' WHERE node = %s", (node,))

    def test_lockedOnOtherNode(self) -> None:
        """
        A maildrop held on one node is L{MaildropLocked} on the other until
        the session ends.
        """
        drop = self.successResultOf(self.nodeA.openMaildrop(ALICE))
        self.failureResultOf(self.nodeB.openMaildrop(ALICE), MaildropLocked)
        self.successResultOf(self.nodeB.openMaildrop(BOB)).release()
        drop.release()
        self.successResultOf(self.nodeB.openMaildrop(ALICE)).release()

    def test_staleLockTakenOver(self) -> None:
        """
        A lock whose lease ran out (its node died) is taken by the next
        login; the dead session's commit then fails and changes nothing.
        """
        delivery = self.nodeA.beginDelivery([ALICE])
        delivery.write(b"one\r\n")
        self.successResultOf(delivery.commit())
        dead = self.successResultOf(self.nodeA.openMaildrop(ALICE))
        self.expire("node-a")
        alive = self.successResultOf(self.nodeB.openMaildrop(ALICE))
        self.failureResultOf(dead.commit([0]), TemporaryFailure)
        self.assertEqual(len(alive.messages), 1)
        self.failureResultOf(self.nodeA.openMaildrop(ALICE), MaildropLocked)
        alive.release()

    def test_lostLockCommitChangesNothing(self) -> None:
        """
        A session whose lock was taken over fails its commit whatever it
        asked for (deletions, seen marks only, or nothing): no entry is
        deleted or marked, and the new holder keeps its lock.
        """
        for data in (b"one\r\n", b"two\r\n"):
            delivery = self.nodeA.beginDelivery([ALICE])
            delivery.write(data)
            self.successResultOf(delivery.commit())
        for deleted, seen in (([0], [1]), ([], [0, 1]), ([], [])):
            dead = self.successResultOf(self.nodeA.openMaildrop(ALICE))
            self.expire("node-a")
            alive = self.successResultOf(self.nodeB.openMaildrop(ALICE))
            self.failureResultOf(dead.commit(deleted, seen), TemporaryFailure)
            self.assertEqual([m.seen for m in alive.messages], [False, False])
            self.failureResultOf(self.nodeA.openMaildrop(ALICE), MaildropLocked)
            self.successResultOf(alive.commit([]))

    def test_renewKeepsLock(self) -> None:
        """
        C{renewLocks} pushes back the expiry of the locks this node's
        sessions hold, and only those.
        """
        drop = self.successResultOf(self.nodeA.openMaildrop(ALICE))
        other = self.successResultOf(self.nodeB.openMaildrop(BOB))
        self.expire("node-a")
        self.expire("node-b")
        self.assertEqual(self.nodeA.renewLocks(), 1)
        self.failureResultOf(self.nodeB.openMaildrop(ALICE), MaildropLocked)
        self.successResultOf(self.nodeA.openMaildrop(BOB)).release()
        drop.release()
        other.release()
        self.assertEqual(self.nodeA.renewLocks(), 0)


    def test_releaseAll(self) -> None:
        """
        C{releaseAll} (a node stopping) frees every maildrop the node's
        sessions hold, and only those.
        """
        held = self.successResultOf(self.nodeA.openMaildrop(ALICE))
        other = self.successResultOf(self.nodeB.openMaildrop(BOB))
        self.assertEqual(self.nodeA.releaseAll(), 1)
        self.successResultOf(self.nodeB.openMaildrop(ALICE)).release()
        self.failureResultOf(self.nodeA.openMaildrop(BOB), MaildropLocked)
        self.failureResultOf(held.commit([]), TemporaryFailure)
        other.release()


class MessageTests(SynchronousTestCase):
    """
    Storage details of the database maildrops.
    """

    def setUp(self) -> None:
        from pop3gw.pgmail import PostgresMaildropStore

        self.database = newDatabase(self)
        self.store = PostgresMaildropStore(self.database)

    def deliver(self, recipients, data: bytes) -> None:
        delivery = self.store.beginDelivery(recipients)
        delivery.write(data)
        self.successResultOf(delivery.commit())

    def test_largeMessageInChunks(self) -> None:
        """
        A message larger than several chunks is stored in chunk-sized rows
        and served byte-exact with its exact CRLF size.
        """
        from pop3gw.pgmail import CHUNK_SIZE

        body = b"".join(b"line %07d .\n" % (i,) for i in range(60000))
        self.deliver([ALICE], b"Subject: big\n\n" + body)
        expected = (b"Subject: big\n\n" + body).replace(b"\n", b"\r\n")
        drop = self.successResultOf(self.store.openMaildrop(ALICE))
        self.assertEqual(drop.messages[0].size, len(expected))
        with self.successResultOf(drop.openMessage(0)) as f:
            self.assertEqual(f.read(), expected)
        drop.release()
        with self.database.transaction() as conn:
            sizes = [r[0] for r in conn.execute("SELECT length(data) FROM pop3gw_message_chunks ORDER BY seq")]
        self.assertEqual(sizes[:-1], [CHUNK_SIZE] * (len(sizes) - 1))
        self.assertEqual(sum(sizes), len(expected))

    def test_uidsNeverReused(self) -> None:
        """
        After every message was deleted, new messages get UIDLs never seen
        before.
        """
        self.deliver([ALICE], b"one\n")
        drop = self.successResultOf(self.store.openMaildrop(ALICE))
        first = drop.messages[0].uid
        self.successResultOf(drop.commit([0]))
        self.deliver([ALICE], b"two\n")
        drop = self.successResultOf(self.store.openMaildrop(ALICE))
        self.assertNotEqual(drop.messages[0].uid, first)
        drop.release()

    def test_sharedMessageRemovedWithLastEntry(self) -> None:
        """
        A message delivered to two users is stored once and removed when
        the second one deletes it.
        """
        self.deliver([ALICE, BOB], b"to both\n")

        def count() -> int:
            with self.database.transaction() as conn:
                return conn.execute("SELECT count(*) FROM pop3gw_messages").fetchone()[0]

        self.assertEqual(count(), 1)
        self.successResultOf(self.successResultOf(self.store.openMaildrop(ALICE)).commit([0]))
        self.assertEqual(count(), 1)
        self.successResultOf(self.successResultOf(self.store.openMaildrop(BOB)).commit([0]))
        self.assertEqual(count(), 0)


class AcrossNodesUsersTests(SynchronousTestCase):
    """
    Users and aliases seen from two nodes (two L{PostgresUsers} on one
    database).
    """

    def setUp(self) -> None:
        from pop3gw.pgusers import PostgresUsers

        self.database = newDatabase(self)
        self.nodeA = PostgresUsers(self.database)
        self.nodeB = PostgresUsers(self.database)
        self.nodeA.setPassword(ALICE, HASH_A, True)

    def test_passwordChangeSeenAtOnce(self) -> None:
        """
        A password changed through one node is what the other node's next
        lookup returns.
        """
        self.assertEqual(self.nodeB.lookupUser(ALICE), (ALICE, HASH_A))
        self.nodeA.setPassword(ALICE, HASH_B, False)
        self.assertEqual(self.nodeB.lookupUser(ALICE), (ALICE, HASH_B))

    def test_refreshFollowsChanges(self) -> None:
        """
        The other node's snapshot shows a new user and alias after its
        next refresh.
        """
        self.assertFalse(self.nodeB.refresh().exists(BOB))
        self.nodeA.setPassword(BOB, HASH_B, True)
        self.nodeA.addAlias("info@example.org", [ALICE, BOB])
        snapshot = self.nodeB.refresh()
        self.assertTrue(snapshot.exists(BOB))
        self.assertEqual(snapshot.resolve(Address("info", "example.org")), (ALICE, BOB))

    def test_aliasRules(self) -> None:
        """
        C{alias add} refuses what the aliases file refuses: an alias that
        is a user, a domain that is not local, a target that is not a
        user; C{alias list} shows the aliases as the file would.
        """
        self.assertRaises(AliasShadowsUser, self.nodeA.addAlias, "alice@example.org", [ALICE])
        self.assertRaises(AliasNotLocal, self.nodeA.addAlias, "x@example.net", [ALICE])
        self.assertRaises(UnknownTarget, self.nodeA.addAlias, "x@example.org", [BOB])
        self.nodeA.addAlias("@example.org", [ALICE])
        self.assertEqual(
            [(n, line.raw) for n, line in self.nodeA.aliasLines()], [(1, b"@example.org: alice@example.org")]
        )


class CommandTests(SynchronousTestCase):
    """
    The C{pop3gw} command with C{--store postgresql://...}: C{init}, users,
    aliases and C{deliver} work on the database, with no data directory.
    """

    def setUp(self) -> None:
        self.uri = pgcluster.database(self)

    def runCLI(self, *args: str, text: str = "", data: bytes = b"", store: str = ""):
        from pop3gw import cli
        from tests.test_cli import FakeStdin

        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--store", store or self.uri, *args], stdin=FakeStdin(text, data), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def test_initIdempotent(self) -> None:
        """
        C{init} creates the schema, then says it is current.
        """
        from pop3gw.pgdatabase import SCHEMA_VERSION

        self.assertEqual(self.runCLI("init"), (0, f"created the pop3gw schema (version {SCHEMA_VERSION})\n", ""))
        self.assertEqual(self.runCLI("init"), (0, f"the pop3gw schema is current (version {SCHEMA_VERSION})\n", ""))

    def test_withoutSchema(self) -> None:
        """
        Before C{init}, a command says to run it, with one line.
        """
        self.assertEqual(
            self.runCLI("user", "list"),
            (1, "", "pop3gw: the database has no pop3gw schema: run 'pop3gw --store URI init' first\n"),
        )

    def test_initNeedsDatabase(self) -> None:
        """
        C{init} without a database store is refused with one line.
        """
        self.assertEqual(
            self.runCLI("init", store="maildir"), (64, "", "pop3gw: init needs --store postgresql://...\n")
        )

    def test_usersAliasesAndDeliver(self) -> None:
        """
        Users and aliases are added, listed, changed and removed in the
        database; C{deliver} stores a message there for a user reached
        through an alias; no data directory is made.
        """
        from pop3gw.passwords import verifyPassword
        from pop3gw.pgdatabase import Database
        from pop3gw.pgmail import PostgresMaildropStore
        from pop3gw.pgusers import PostgresUsers

        self.runCLI("init")
        self.assertEqual(self.runCLI("user", "add", "alice@example.org", text="pw1\n"), (0, "added alice@example.org\n", ""))
        self.assertEqual(self.runCLI("user", "add", "bob@example.org", text="pw2\n")[0], 0)
        self.assertEqual(
            self.runCLI("user", "add", "Alice@example.org", text="x\n"),
            (1, "", "pop3gw: user Alice@example.org already exists as alice@example.org\n"),
        )
        self.assertEqual(
            self.runCLI("user", "passwd", "ALICE@example.org", text="pw3\n"),
            (0, "changed password of alice@example.org\n", ""),
        )
        self.assertEqual(
            self.runCLI("alias", "add", "info@example.org", "alice@example.org", "bob@example.org"),
            (0, "info@example.org: alice@example.org, bob@example.org\n", ""),
        )
        self.assertEqual(self.runCLI("alias", "list"), (0, "info@example.org: alice@example.org, bob@example.org\n", ""))
        self.assertEqual(self.runCLI("user", "list"), (0, "alice@example.org\nbob@example.org\n", ""))
        self.assertEqual(self.runCLI("deliver", "info@example.org", data=b"Subject: hi\n\nbody\n"), (0, "", ""))
        self.assertEqual(
            self.runCLI("deliver", "nobody@example.org", data=b"x\n"), (67, "", "pop3gw: no such user nobody@example.org\n")
        )
        self.assertEqual(
            self.runCLI("user", "remove", "bob@example.org"), (0, "removed bob@example.org (its maildrop is kept)\n", "")
        )
        self.assertEqual(self.runCLI("alias", "remove", "info@example.org"), (0, "removed info@example.org\n", ""))
        self.assertFalse(os.path.exists("pop3gw-data"))

        database = Database(self.uri)
        self.addCleanup(database.close)
        users = PostgresUsers(database)
        self.assertEqual(users.refresh().addresses(), [ALICE])
        found = users.lookupUser(ALICE)
        assert found is not None
        self.assertTrue(verifyPassword(found[1], "pw3"))
        store = PostgresMaildropStore(database)
        for user in (ALICE, BOB):
            drop = self.successResultOf(store.openMaildrop(user))
            with self.successResultOf(drop.openMessage(0)) as f:
                self.assertEqual(f.read(), b"Subject: hi\r\n\r\nbody\r\n")
            drop.release()

    def test_queue(self) -> None:
        """
        C{queue list} and C{queue flush} work on the database's queue, from
        any node, without a data directory.
        """
        self.runCLI("init")
        self.assertEqual(self.runCLI("queue", "list"), (0, "", ""))
        self.assertEqual(
            self.runCLI("queue", "flush"),
            (0, "0 message(s) scheduled for immediate retry; the nodes holding them pick them up within seconds\n", ""),
        )
        self.assertFalse(os.path.exists("pop3gw-data"))

    def test_deliverDatabaseDown(self) -> None:
        """
        C{deliver} exits 75 (try again later) when the database cannot be
        reached; other commands exit 1, with one line.
        """
        socketDir = tempfile.mkdtemp(prefix="pop3gw-nopg-")
        self.addCleanup(os.rmdir, socketDir)
        self.patch(pgdatabase, "CONNECT_TIMEOUT", 0.5)
        down = f"postgresql:///nothing?host={socketDir}"
        status, out, err = self.runCLI("deliver", "alice@example.org", data=b"x\n", store=down)
        self.assertEqual((status, out), (75, ""))
        self.assertRegex(err, r"^pop3gw: database unavailable: [^\n]+\n$")
        status, out, err = self.runCLI("user", "list", store=down)
        self.assertEqual((status, out), (1, ""))
        self.assertRegex(err, r"^pop3gw: database unavailable: [^\n]+\n$")


class ServiceTests(SynchronousTestCase):
    """
    C{twistd pop3gw --store postgresql://...}: L{makeService} wires the
    database stores.
    """

    def build(self, uri: str, *args: str):
        from twisted.internet.testing import MemoryReactorClock

        from pop3gw.service import makeService
        from tests.test_service import options

        self.dataDir = os.path.abspath(self.mktemp())
        return makeService(
            options("--data-dir", self.dataDir, "--hostname", "mail.example.org", "--store", uri, *args),
            MemoryReactorClock(),
        )

    def test_databaseStores(self) -> None:
        """
        Users, aliases, maildrops and the outbound queue come from the
        database (users read once at start-up); the data directory holds
        no maildrops and no queue; the maildrop locks are renewed every
        L{pop3gw.pgmail.LOCK_RENEW_INTERVAL} seconds and the queue polled.
        """
        from twisted.application.internet import TimerService

        from pop3gw.pgmail import LOCK_RENEW_INTERVAL, PostgresMaildropStore
        from pop3gw.pgqueue import PostgresQueue
        from pop3gw.pgusers import PostgresUsers
        from pop3gw.relay import RelayService
        from pop3gw.service import ListenerService, QueuePollService

        database = newDatabase(self)
        from pop3gw.pgusers import PostgresUsers as Users

        Users(database).setPassword(ALICE, HASH_A, True)
        top = self.build(database.uri)
        pop3 = next(s for s in top if isinstance(s, ListenerService) and s.listenerName == "pop3")
        realm = pop3.factory.wrappedFactory.portal.realm
        self.addCleanup(realm.store.database.close)
        self.assertIsInstance(realm.store, PostgresMaildropStore)
        self.assertIsInstance(realm.users, PostgresUsers)
        self.assertEqual(realm.users.snapshot().addresses(), [ALICE])
        self.assertFalse(os.path.exists(os.path.join(self.dataDir, "mail")))
        self.assertFalse(os.path.exists(os.path.join(self.dataDir, "queue")))
        self.assertIn(LOCK_RENEW_INTERVAL, [s.step for s in top if isinstance(s, TimerService)])
        relay = next(s for s in top if isinstance(s, RelayService))
        self.assertIsInstance(relay.queue, PostgresQueue)
        self.assertEqual([type(s) for s in top if isinstance(s, QueuePollService)], [QueuePollService])

    def test_databaseDownAtStart(self) -> None:
        """
        A node whose database refuses connections starts without waiting
        for its connection pool: neither building the service nor starting
        the relay runs a pooled transaction on the calling thread (which
        the reactor's will be); the schema check fails at once, is logged
        as a warning, and the users directory answers with temporary
        failures until a refresh reaches the database.
        """
        import threading

        from twisted.logger import capturedLogs

        from pop3gw.pgdatabase import Database
        from pop3gw.relay import RelayService

        socketDir = tempfile.mkdtemp(prefix="pop3gw-nopg-")
        self.addCleanup(os.rmdir, socketDir)
        called: list = []
        transaction = Database.transaction

        def recording(database):
            called.append(threading.current_thread())
            return transaction(database)

        self.patch(Database, "transaction", recording)
        with capturedLogs() as events:
            top = self.build(f"postgresql:///nothing?host={socketDir}")
            relay = next(s for s in top if isinstance(s, RelayService))
            relay.startService()
            self.addCleanup(relay.stopService)
        self.addCleanup(relay.queue.database.close)
        self.assertEqual(called, [])
        self.assertEqual(relay.entries, {})
        warnings = [e["log_format"] for e in events if e.get("error", "").startswith("database unavailable: ")]
        self.assertEqual(warnings, ["cannot check the database schema: {error}"])
        pop3 = next(s for s in top if getattr(s, "listenerName", None) == "pop3")
        self.assertRaises(TemporaryFailure, pop3.factory.wrappedFactory.portal.realm.users.snapshot().exists, ALICE)

    def test_workers(self) -> None:
        """
        C{--workers 2} with a database store: the supervisor runs the one
        relay on the database queue, polled, with a connection pool of its
        own sized by C{database-threads} (it checks no passwords); each
        worker has its own pool (C{database-threads} plus C{hash-threads}
        connections), runs no relay, and its queue leaves relaying to the
        supervisor under a node name the supervisor takes over from.
        """
        import socket

        from twisted.internet.testing import MemoryReactorClock

        from pop3gw.config import buildConfig
        from pop3gw.pgqueue import PostgresQueue
        from pop3gw.relay import RelayService
        from pop3gw.service import QueuePollService, makeService, makeWorkerService
        from pop3gw.supervisor import WorkerPool
        from pop3gw.workerlink import InheritedListener, WorkerLink, WorkerSetup

        database = newDatabase(self)
        self.dataDir = os.path.abspath(self.mktemp())
        ini = os.path.abspath(self.mktemp())
        with open(ini, "w") as f:
            f.write("[limits]\ndatabase-threads = 3\nhash-threads = 2\n")
        config = buildConfig(
            {"data-dir": self.dataDir, "hostname": "mail.example.org", "workers": "2", "store": database.uri}, ini
        )
        top = makeService(config, MemoryReactorClock())
        [pool] = [s for s in top if isinstance(s, WorkerPool)]
        self.assertEqual(pool.count, 2)
        [relay] = [s for s in top if isinstance(s, RelayService)]
        self.addCleanup(relay.queue.database.close)
        self.assertIsInstance(relay.queue, PostgresQueue)
        self.assertTrue(relay.queue.relays)
        self.assertEqual(relay.queue.database._pool.max_size, 3)
        self.assertEqual(len([s for s in top if isinstance(s, QueuePollService)]), 1)

        fd = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(lambda: os.close(fd) if _isOpen(fd) else None)
        setup = WorkerSetup(config, 1, (InheritedListener("pop3", "tcp:1110", fd, socket.AF_INET),))
        worker = makeWorkerService(setup, MemoryReactorClock(), WorkerLink())
        self.assertEqual([s for s in worker if isinstance(s, RelayService)], [])
        self.assertEqual([s for s in worker if isinstance(s, QueuePollService)], [])
        realm = next(s for s in worker if getattr(s, "listener", None) is not None).factory.wrappedFactory.portal.realm
        self.addCleanup(realm.store.database.close)
        self.assertIsNot(realm.store.database, relay.queue.database)
        self.assertEqual(realm.store.database._pool.max_size, 5)
        queue = realm.router._queue.queue
        self.assertFalse(queue.relays)
        self.assertTrue(queue.node.startswith(f"{socket.gethostname()}:{os.getppid()}:w:"), queue.node)

    def test_noSchema(self) -> None:
        """
        A database without the schema stops start-up with one line.
        """
        uri = pgcluster.database(self)
        with self.assertRaises(SystemExit) as caught:
            self.build(uri)
        self.assertEqual(
            str(caught.exception),
            "pop3gw: the database has no pop3gw schema: run 'pop3gw --store URI init' first",
        )


def _isOpen(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class MigrateTests(SynchronousTestCase):
    """
    C{pop3gw migrate} from a data directory to a database and back.
    """

    def setUp(self) -> None:
        self.uri = pgcluster.database(self)
        self.runCLI("init")

    runCLI = CommandTests.runCLI

    def test_thereAndBack(self) -> None:
        """
        Users (hashes untouched), aliases and maildrops go to the database
        and back: every UIDL, seen flag and message is unchanged, and
        messages delivered in the database meanwhile come back too.
        """
        from pop3gw.maildir import MaildirStore
        from pop3gw.users import UsersFile

        source = os.path.abspath(self.mktemp())
        os.makedirs(source)
        with open(os.path.join(source, "users"), "w") as f:
            f.write(f"alice@example.org:{HASH_A}\nbob@example.org:{HASH_B}\n")
        with open(os.path.join(source, "aliases"), "w") as f:
            f.write("team@example.org: alice@example.org, bob@example.org\n@example.org: alice@example.org\n")
        maildir = MaildirStore(os.path.join(source, "mail"), hostname="testhost")
        for body in (b"Subject: one\n\nfirst\n", b"Subject: two\n\n.dot\n", b"Subject: three\n\nthird\n"):
            delivery = maildir.beginDelivery([ALICE])
            delivery.write(body)
            self.successResultOf(delivery.commit())
        drop = self.successResultOf(maildir.openMaildrop(ALICE))
        before = [(m.uid, m.size) for m in drop.messages]
        self.successResultOf(drop.commit([], [1]))

        status, out, err = self.runCLI("migrate", "--from", f"maildir:{source}", "--to", self.uri)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(
            out, f"migrated 2 user(s), 2 alias(es), 3 message(s) in 1 maildrop(s) from maildir:{source} to {self.uri}\n"
        )
        self.assertEqual(self.runCLI("deliver", "bob@example.org", data=b"Subject: new\n\nin the database\n")[0], 0)
        again = self.runCLI("migrate", "--from", f"maildir:{source}", "--to", self.uri)
        self.assertEqual(again, (1, "", "pop3gw: the database is not empty (it holds users, aliases or messages)\n"))

        target = os.path.abspath(self.mktemp())
        status, out, err = self.runCLI("migrate", "--from", self.uri, "--to", f"maildir:{target}")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(
            out, f"migrated 2 user(s), 2 alias(es), 4 message(s) in 2 maildrop(s) from {self.uri} to maildir:{target}\n"
        )
        back = MaildirStore(os.path.join(target, "mail"), hostname="testhost")
        drop = self.successResultOf(back.openMaildrop(ALICE))
        self.assertEqual([(m.uid, m.size) for m in drop.messages], before)
        self.assertEqual([m.seen for m in drop.messages], [False, True, False])
        with self.successResultOf(drop.openMessage(1)) as f:
            self.assertEqual(f.read(), b"Subject: two\r\n\r\n.dot\r\n")
        drop.release()
        drop = self.successResultOf(back.openMaildrop(BOB))
        with self.successResultOf(drop.openMessage(0)) as f:
            self.assertEqual(f.read(), b"Subject: new\r\n\r\nin the database\r\n")
        drop.release()
        users = UsersFile(os.path.join(target, "users"), os.path.join(target, "aliases"))
        self.assertEqual(users.lookupUser(ALICE), (ALICE, HASH_A))
        self.assertEqual(users.lookupUser(BOB), (BOB, HASH_B))
        self.assertEqual(users.snapshot().resolve(Address("team", "example.org")), (ALICE, BOB))
        self.assertEqual(users.snapshot().resolve(Address("anyone", "example.org")), (ALICE,))

    def maildirSource(self, body: bytes) -> tuple:
        """
        A data directory with alice in its users file and C{body} delivered
        to her maildrop.

        @return: the directory, its L{MaildirStore} and the delivery.
        """
        from pop3gw.maildir import MaildirStore

        source = os.path.abspath(self.mktemp())
        os.makedirs(source)
        with open(os.path.join(source, "users"), "w") as f:
            f.write(f"alice@example.org:{HASH_A}\n")
        maildir = MaildirStore(os.path.join(source, "mail"), hostname="testhost")
        delivery = maildir.beginDelivery([ALICE])
        delivery.write(body)
        self.successResultOf(delivery.commit())
        return source, maildir, delivery

    def test_largeMessageStreamed(self) -> None:
        """
        A 20 MiB message goes to the database and back byte for byte (a
        CRLF split between two stored chunks included), read and written
        a stored chunk at a time: the Python memory allocated at once stays
        a small fraction of the message in both directions, and no write to
        the Maildir file is over L{CHUNK_SIZE}.
        """
        import tracemalloc

        from pop3gw import migrate
        from pop3gw.pgmail import CHUNK_SIZE, PostgresMaildropStore

        head = b"Subject: big\n\n"
        # In wire form the first line's CR is the last octet of the first
        # stored chunk, and its LF the first of the second.
        body = head + b"a" * (CHUNK_SIZE - 1 - (len(head) + 2)) + b"\n"
        line = b"".join(b"%07d " % i + b"x" * 990 + b"\n" for i in range(1000))
        while len(body) < 20 * 1024 * 1024:
            body += line
        source, _, _ = self.maildirSource(body)

        def peak(*args: str) -> int:
            tracemalloc.start()
            try:
                status, out, err = self.runCLI(*args)
                self.assertEqual((status, err), (0, ""))
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

        self.assertLess(peak("migrate", "--from", f"maildir:{source}", "--to", self.uri), len(body) // 4)
        database = pgdatabase.Database(self.uri, maxConnections=1)
        self.addCleanup(database.close)
        [info] = PostgresMaildropStore(database).listMessages(str(ALICE))
        wire = body.replace(b"\n", b"\r\n")
        self.assertEqual(info.size, len(wire))
        self.assertEqual(b"".join(PostgresMaildropStore(database).messageChunks(info)), wire)

        writes: list = []
        writeAll = migrate.fsutil.writeAll

        def recordingWriteAll(fd: int, data: bytes) -> None:
            writes.append(len(data))
            writeAll(fd, data)

        self.patch(migrate.fsutil, "writeAll", recordingWriteAll)
        target = os.path.abspath(self.mktemp())
        self.assertLess(peak("migrate", "--from", self.uri, "--to", f"maildir:{target}"), len(body) // 4)
        self.assertLessEqual(max(writes), CHUNK_SIZE)
        folder = os.path.join(target, "mail", "example.org", "alice", "cur")
        [name] = os.listdir(folder)
        with open(os.path.join(folder, name), "rb") as f:
            self.assertEqual(f.read(), body)
        self.assertEqual(name, f"{info.uid},S={len(body)},W={len(wire)}:2,")
        self.assertEqual(os.listdir(os.path.join(target, "mail", "example.org", "alice", "tmp")), [])

    def test_importedOwnFormUIDL(self) -> None:
        """
        A message imported into a data directory with a UIDL of the form
        pop3gw gives new mail in a database (C{P} and a position) keeps it
        through C{migrate}, and no message delivered afterwards is given
        it: every delivery succeeds with a UIDL of its own.
        """
        from pop3gw.pgmail import PostgresMaildropStore
        from pop3gw.pop3import import writeUidMap

        source, maildir, delivery = self.maildirSource(b"Subject: old\n\nimported\n")
        writeUidMap(maildir.maildirPath(ALICE), {delivery.uniqueName: "P3"})
        self.assertEqual(self.runCLI("migrate", "--from", f"maildir:{source}", "--to", self.uri)[0], 0)
        for _ in range(3):
            status, out, err = self.runCLI("deliver", "alice@example.org", data=b"Subject: new\n\nbody\n")
            self.assertEqual((status, err), (0, ""))
        database = pgdatabase.Database(self.uri, maxConnections=1)
        self.addCleanup(database.close)
        store = PostgresMaildropStore(database)
        uids = [m.uid for m in store.listMessages("alice@example.org")]
        self.assertEqual(uids[0], "P3")
        self.assertEqual(len(set(uids)), 4)

    def test_accountStateThereAndBack(self) -> None:
        """
        App passwords (hashes untouched), main-password scopes, per-user
        limits, suspensions, sending counts, app-password uses, DKIM keys
        (order, active flags, private keys) and the login history go to
        the database and back unchanged.
        """
        import time

        from pop3gw.apppasswords import AppPasswords
        from pop3gw.dkimkeys import KeyStore
        from pop3gw.loginwatch import LoginHistoryFile
        from pop3gw.pgaccounts import PostgresAppPasswords, PostgresSendingLimits
        from pop3gw.pgdatabase import Database
        from pop3gw.pgdkim import PostgresKeyStore
        from pop3gw.pglogins import PostgresLoginHistory
        from pop3gw.sendlimits import SendingLimits

        source = os.path.abspath(self.mktemp())
        os.makedirs(source)
        with open(os.path.join(source, "users"), "w") as f:
            f.write(f"alice@example.org:{HASH_A}\nbob@example.org:{HASH_B}\n")
        apps = AppPasswords(os.path.join(source, "app-passwords"), os.path.join(source, "users.lock"))
        phone = apps.add(ALICE, "phone", "pop3", lambda p: "{PLAIN}" + p, now=1764547200)
        apps.setMainScope(BOB, "submission")
        records = SendingLimits(source, 1, 10, clock=lambda: 1764547300.0)
        self.addCleanup(records.close)
        records.setLimits("bob@example.org", messagesPerHour=5)
        records.record("alice@example.org", 2, "192.0.2.7")
        records.recordUse("alice@example.org", "phone", "192.0.2.8")
        self.assertIsNotNone(records.admit("alice@example.org", 0, "192.0.2.7")[1])
        exported = records.export()
        with open(os.path.join(source, "app-passwords"), "rb") as f:
            appFile = f.read()
        keys = KeyStore(source)
        keys.generate("example.org", "old", "ed25519", created="2026-11-01T00:00:00Z")
        keys.generate("example.org", "new", "ed25519", created="2026-12-01T00:00:00Z")
        keys.activate("example.org", "new")
        keys.generate("example.net", "s1", "ed25519", created="2026-12-01T00:00:00Z")
        keyRows = [(r, keys.privateKey(r)) for r in keys.records()]
        history = {"alice@example.org": {"203.0.0.0/16": [time.time() - 86400, time.time()]}}
        LoginHistoryFile(os.path.join(source, "logins.json")).merge(history, time.time())

        status, out, err = self.runCLI("migrate", "--from", f"maildir:{source}", "--to", self.uri)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(
            out, f"migrated 2 user(s), 0 alias(es), 1 app password(s), 3 DKIM key(s), 0 message(s) in 0 maildrop(s) "
                 f"from maildir:{source} to {self.uri}\n"
        )
        database = Database(self.uri, maxConnections=1)
        self.addCleanup(database.close)
        self.assertEqual(PostgresAppPasswords(database).find(ALICE, phone.encode()).hashed, "{PLAIN}" + phone)
        self.assertEqual(PostgresAppPasswords(database).mainScope(BOB), "submission")
        self.assertEqual(PostgresSendingLimits(database).export(), exported)
        self.assertEqual(PostgresLoginHistory(database).read(), history)
        inDatabase = PostgresKeyStore(database)
        self.assertEqual([(r, inDatabase.privateKey(r)) for r in inDatabase.records()], keyRows)

        target = os.path.abspath(self.mktemp())
        status, out, err = self.runCLI("migrate", "--from", self.uri, "--to", f"maildir:{target}")
        self.assertEqual((status, err), (0, ""))
        with open(os.path.join(target, "app-passwords"), "rb") as f:
            self.assertEqual(f.read(), appFile)
        back = SendingLimits(target)
        self.addCleanup(back.close)
        self.assertEqual(back.export(), exported)
        self.assertEqual(LoginHistoryFile(os.path.join(target, "logins.json")).read(), history)
        keysBack = KeyStore(target)
        self.assertEqual([(r, keysBack.privateKey(r)) for r in keysBack.records()], keyRows)

    def test_caseVariantsRefused(self) -> None:
        """
        A users file with two users differing only in case (possible in
        old files) is refused with one line naming both; nothing is copied.
        """
        source = os.path.abspath(self.mktemp())
        os.makedirs(source)
        with open(os.path.join(source, "users"), "w") as f:
            f.write(f"alice@example.org:{HASH_A}\nAlice@example.org:{HASH_B}\n")
        self.assertEqual(
            self.runCLI("migrate", "--from", f"maildir:{source}", "--to", self.uri),
            (1, "", "pop3gw: alice@example.org and Alice@example.org differ only in case: "
                    "remove or rename one of them before migrating\n"),
        )
        self.assertEqual(self.runCLI("user", "list"), (0, "", ""))

    def test_bothSidesSameKind(self) -> None:
        """
        A migration needs one data directory and one database.
        """
        self.assertEqual(
            self.runCLI("migrate", "--from", self.uri, "--to", self.uri),
            (64, "", "pop3gw: migrate copies between a data directory (maildir:DATA_DIR) and a database\n"),
        )


class QueueTests(SynchronousTestCase):
    """
    The outbound queue in the database (L{pop3gw.pgqueue}): two
    L{PostgresQueue}s on one database stand for two nodes.
    """

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from pop3gw.pgqueue import PostgresQueue

        self.database = newDatabase(self)
        clock = Clock()
        clock.advance(1_800_000_000)
        self.nodeA = PostgresQueue(self.database, clock, node="node-a")
        self.nodeB = PostgresQueue(self.database, clock, node="node-b")
        for node in (self.nodeA, self.nodeB):
            self.addCleanup(node.releaseAll)
        self.announced: list = []
        self.nodeA.addListener(self.announced.append)

    def queue(self, data: bytes = b"Subject: out\n\nbody") -> object:
        delivery = self.nodeA.beginDelivery(ALICE, [Address("carol", "example.net")], b"Received: x\r\n")
        delivery.write(data)
        self.successResultOf(delivery.commit())
        return delivery

    def expire(self) -> None:
        with self.database.transaction() as conn:
            conn.execute("UPDATE pop3gw_queue SET lease_expires = now() - interval '1 second'")

    def test_queueAndRead(self) -> None:
        """
        A committed delivery is one entry, announced to the relay, listed
        from any node, its message stored with CRLF line ends; removing it
        leaves nothing.
        """
        from pop3gw.pgqueue import listEntries

        delivery = self.queue()
        self.assertEqual([e.queueId for e in self.announced], [delivery.queueId])
        self.assertEqual([e.queueId for e in listEntries(self.database)], [delivery.queueId])
        entry = self.announced[0]
        with self.nodeA.openMessage(entry) as f:
            self.assertEqual(f.read(), b"Received: x\r\nSubject: out\r\n\r\nbody\r\n")
        self.assertEqual(self.successResultOf(self.nodeA.readHeaders(entry)), b"Received: x\r\nSubject: out\r\n")
        entry.attempts = 1
        self.successResultOf(self.nodeA.saveEntry(entry))
        self.assertEqual(listEntries(self.database)[0].attempts, 1)
        self.successResultOf(self.nodeA.removeEntry(entry))
        self.assertEqual(listEntries(self.database), [])
        with self.database.transaction() as conn:
            self.assertEqual(conn.execute("SELECT count(*) FROM pop3gw_messages").fetchone()[0], 0)

    def test_leaseHandsOver(self) -> None:
        """
        Another node cannot take an entry while its node renews the lease;
        once the lease ran out it claims it (with its message), and the
        first node's next save is refused, so it makes no attempt.
        """
        self.queue()
        entry = self.announced[0]
        self.assertEqual(self.nodeB.poll(), [])
        self.expire()
        self.assertEqual(self.nodeA.poll(), [])
        self.assertEqual(self.nodeB.poll(), [])
        self.expire()
        claimed = self.nodeB.poll()
        self.assertEqual([e.queueId for e in claimed], [entry.queueId])
        with self.nodeB.openMessage(claimed[0]) as f:
            self.assertEqual(f.read(), b"Received: x\r\nSubject: out\r\n\r\nbody\r\n")
        self.failureResultOf(self.nodeA.saveEntry(entry), TemporaryFailure)
        self.successResultOf(self.nodeB.saveEntry(claimed[0]))

    def test_releaseAllHandsOverAtOnce(self) -> None:
        """
        A node stopping gives up its entries: the next poll of another node
        claims them.
        """
        self.queue()
        self.nodeA.releaseAll()
        self.assertEqual(len(self.nodeB.poll()), 1)

    def test_discardAndFlush(self) -> None:
        """
        A prepared entry withdrawn leaves nothing; C{requestFlush} moves
        the flush counter every node reads at its next poll.
        """
        from pop3gw.pgqueue import listEntries, requestFlush

        delivery = self.nodeA.beginDelivery(ALICE, [Address("carol", "example.net")])
        delivery.write(b"x\n")
        self.successResultOf(delivery.prepare())
        self.successResultOf(delivery.discard())
        self.assertEqual((listEntries(self.database), self.announced), ([], []))
        self.nodeB.poll()
        before = self.nodeB.flushStamp()
        self.queue()
        self.assertEqual(requestFlush(self.database), 1)
        self.nodeB.poll()
        self.assertNotEqual(self.nodeB.flushStamp(), before)

    def test_copiesDirectory(self) -> None:
        """
        A node keeps its copies in the directory it is given: what a
        previous run left there is removed at the first copy, and the
        directory goes when the node gives up its entries (it stops).
        """
        from twisted.internet.task import Clock

        from pop3gw.pgqueue import PostgresQueue

        copies = os.path.abspath(self.mktemp())
        os.makedirs(copies)
        with open(os.path.join(copies, "stale"), "w") as f:
            f.write("left by a killed node\n")
        node = PostgresQueue(self.database, Clock(), node="node-c", copies=copies)
        delivery = node.beginDelivery(ALICE, [Address("carol", "example.net")])
        delivery.write(b"x\n")
        self.successResultOf(delivery.commit())
        self.assertEqual(os.listdir(copies), [delivery.queueId])
        node.releaseAll()
        self.assertFalse(os.path.exists(copies))


class QueueLeaseLostTests(SynchronousTestCase):
    """
    A node whose lease on a queue entry ran out, and which another node
    took: it neither attempts nor completes the entry, and forgets it
    (L{pop3gw.interfaces.QueueEntryLost}).  Two L{PostgresQueue}s on one
    database stand for two nodes; node A runs a relay on a fake clock.
    """

    def setUp(self) -> None:
        from pop3gw.pgqueue import PostgresQueue
        from pop3gw.relay.service import RelayService
        from tests.queuehelpers import FakeResolver, ThreadClock
        from tests.test_relay_service import FakeDeliverOnce

        self.database = newDatabase(self)
        self.clock = ThreadClock()
        self.clock.advance(1_800_000_000)
        self.nodeA = PostgresQueue(self.database, self.clock, node="node-a")
        self.nodeB = PostgresQueue(self.database, self.clock, node="node-b")
        for node in (self.nodeA, self.nodeB):
            self.addCleanup(node.releaseAll)
        self.deliver = FakeDeliverOnce()
        self.relay = RelayService(
            self.nodeA,
            self.clock,
            "mx.example.org",
            lambda sender, data: defer.succeed(None),
            resolver=FakeResolver(mx={"example.net": [(10, "mx.example.net")]}),
            endpointFactory=lambda host, port: (host, port),
            deliverOnce=self.deliver,
            schedule=(60, 600),
        )
        self.nodeA.addLossListener(self.relay.dropEntry)
        self.relay.startService()
        self.addCleanup(self.relay.stopService)

    def queue(self):
        """
        Queue a message through node A.

        @return: its entry, as A's relay holds it.
        """
        delivery = self.nodeA.beginDelivery(ALICE, [Address("carol", "example.net")], b"Received: x\r\n")
        delivery.write(b"Subject: out\n\nbody")
        self.successResultOf(delivery.commit())
        return self.relay.entries[delivery.queueId]

    def takeOver(self) -> list:
        """
        Node A's lease runs out (it could not renew it) and node B claims
        the entry.
        """
        with self.database.transaction() as conn:
            conn.execute("UPDATE pop3gw_queue SET lease_expires = now() - interval '1 second'")
        claimed = self.nodeB.poll()
        self.assertEqual(len(claimed), 1)
        return claimed

    def failFirstAttempt(self) -> None:
        from pop3gw.relay.client import SessionResult

        self.clock.advance(0)
        [call] = self.deliver.calls
        call.result.callback(SessionResult.broken("connection refused"))

    def holder(self, queueId: str) -> str:
        with self.database.transaction() as conn:
            return str(conn.execute("SELECT node FROM pop3gw_queue WHERE id = %s", (queueId,)).fetchone()[0])

    def test_loadEntriesReadsNothing(self) -> None:
        """
        The relay starts without waiting for the database:
        L{PostgresQueue.loadEntries} claims nothing; the entries no node
        holds are claimed by the first poll (which the server runs in a
        database thread).
        """
        self.queue()
        self.nodeA.releaseAll()
        self.assertEqual(self.nodeB.loadEntries(), [])
        self.assertEqual(len(self.nodeB.poll()), 1)

    def test_dueAttemptNotMade(self) -> None:
        """
        When the next attempt of an entry node A lost comes due, its save
        of the attempt is refused: no attempt is made, the entry is
        forgotten (not rescheduled), B's row is untouched, and A's copy of
        the message is removed.
        """
        entry = self.queue()
        self.failFirstAttempt()
        claimed = self.takeOver()
        copy = os.path.join(self.nodeA._copies, entry.queueId)
        self.assertTrue(os.path.exists(copy))
        self.clock.advance(60)
        self.assertEqual(len(self.deliver.calls), 1)
        self.assertEqual(self.relay.entries, {})
        self.assertNotIn(entry.queueId, self.relay._scheduled)
        self.assertFalse(os.path.exists(copy))
        self.assertEqual(self.holder(entry.queueId), "node-b")
        self.successResultOf(self.nodeB.saveEntry(claimed[0]))

    def test_pollDropsLostEntry(self) -> None:
        """
        Node A's next poll finds the entry taken and tells its relay,
        which forgets it before its next attempt is due: nothing is
        scheduled for it any more.
        """
        entry = self.queue()
        self.failFirstAttempt()
        self.takeOver()
        self.assertIn(entry.queueId, self.relay._scheduled)
        self.nodeA.announceClaimed(self.nodeA.poll())
        self.assertEqual(self.relay.entries, {})
        self.assertNotIn(entry.queueId, self.relay._scheduled)
        self.clock.advance(600)
        self.assertEqual(len(self.deliver.calls), 1)
        self.assertEqual(self.holder(entry.queueId), "node-b")

    def test_completionRefused(self) -> None:
        """
        An attempt that ends after the entry was taken cannot complete it:
        removing the entry fails with L{QueueEntryLost}, and B's entry and
        message stay.
        """
        from pop3gw.interfaces import QueueEntryLost

        entry = self.queue()
        self.takeOver()
        self.failureResultOf(self.nodeA.removeEntry(entry), QueueEntryLost)
        self.assertEqual(self.holder(entry.queueId), "node-b")
        with self.database.transaction() as conn:
            self.assertEqual(conn.execute("SELECT count(*) FROM pop3gw_messages").fetchone()[0], 1)


class WorkerQueueTests(SynchronousTestCase):
    """
    The database queue of C{--workers N}: a worker queues without
    relaying, and its supervisor takes each entry over at once.
    """

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from pop3gw.pgqueue import PostgresQueue, workerNode

        self.database = newDatabase(self)
        clock = Clock()
        self.worker = PostgresQueue(self.database, clock, node=workerNode(os.getpid()), relays=False)
        self.supervisor = PostgresQueue(self.database, clock, node="supervisor")
        self.other = PostgresQueue(self.database, clock, node="other-node")
        for node in (self.worker, self.supervisor, self.other):
            self.addCleanup(node.releaseAll)

    def queue(self, node) -> str:
        delivery = node.beginDelivery(ALICE, [Address("carol", "example.net")])
        delivery.write(b"Subject: out\n\nbody")
        self.successResultOf(delivery.commit())
        return delivery.queueId

    def holder(self, queueId: str) -> str:
        with self.database.transaction() as conn:
            return str(conn.execute("SELECT node FROM pop3gw_queue WHERE id = %s", (queueId,)).fetchone()[0])

    def test_supervisorAdopts(self) -> None:
        """
        A worker's entry is stored leased to the worker (no other node
        claims it), with no local copy; its supervisor's L{adopt} takes it
        over with its message, and relays it from then on.
        """
        queueId = self.queue(self.worker)
        self.assertIsNone(self.worker._copies)
        self.assertEqual(self.other.poll(), [])
        entry = self.supervisor.adopt(queueId)
        assert entry is not None
        self.assertEqual(entry.queueId, queueId)
        self.assertEqual(self.holder(queueId), "supervisor")
        with self.supervisor.openMessage(entry) as f:
            self.assertEqual(f.read(), b"Subject: out\r\n\r\nbody\r\n")
        self.successResultOf(self.supervisor.saveEntry(entry))

    def test_notFromOtherNodes(self) -> None:
        """
        L{adopt} takes nothing another node holds (one that claimed a
        worker's entry after its lease ran out, or queued it itself).
        """
        queueId = self.queue(self.other)
        self.assertIsNone(self.supervisor.adopt(queueId))
        self.assertEqual(self.holder(queueId), "other-node")
        self.assertIsNone(self.supervisor.adopt("no-such-entry"))
