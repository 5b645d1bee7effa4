# -*- test-case-name: tests.test_pgstore -*-
"""
The outbound queue in PostgreSQL: L{IOutboundQueue} and L{IQueueStore}
over a L{pop3gw.pgdatabase.Database}, shared by several nodes.

Each entry is a row holding its L{pop3gw.queue.Entry} (the same JSON as
the file queue) and its message (in the maildrops' message tables), and a
lease: the node relaying it and until when.  A node relays only the entries
it holds: those queued through it, and those it claimed with
C{SELECT ... FOR UPDATE SKIP LOCKED} once their lease ran out (their node
died or stopped).  L{PostgresQueue.poll}, run every
L{QUEUE_POLL_INTERVAL} seconds in a database thread (the first time as the
server starts: L{PostgresQueue.loadEntries} reads nothing, so the relay's
start never waits for the database), renews the leases of the entries the
node holds, claims the free ones (handing them to the relay as new
entries, due at once) and reads the flush counter that C{pop3gw queue
flush} moves on any node.

The row's node column says who holds an entry: a claim changes it under
the row's lock, and every write of the holder checks it in the same
statement.  The relay service is the one the file queue has: it records
each attempt (L{saveEntry}) before making it and removes the entry when it
is done (L{removeEntry}); both fail with L{QueueEntryLost}, changing
nothing, once another node took the entry (this node lost the database
for longer than the lease), so two nodes never relay one entry at once,
and the relay forgets the entry.  A poll that finds entries taken from
this node tells the relay (L{PostgresQueue.addLossListener}), so it drops
them before their next attempt is due.

The relay reads a message on the reactor thread (L{openMessage} returns a
file), so a node keeps a copy of each message it holds in its own directory
(C{DATA/relay}), written when it queues or claims the entry.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import threading
from typing import IO, Any, Callable, Optional, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3gw import fsutil
from pop3gw.address import Address
from pop3gw.dsn import originalHeaders
from pop3gw.interfaces import (
    IBlockingRunner,
    IOutboundQueue,
    IQueuedDelivery,
    IQueueStore,
    ITwoPhaseDelivery,
    QueueEntryLost,
    TemporaryFailure,
)
from pop3gw.pgdatabase import Database
from pop3gw.pgmail import CHUNK_SIZE, MESSAGE_ID, SPOOL_MEMORY, storeMessage
from pop3gw.queue import CRLFDelivery, Entry, QueueListeners, Recipient
from pop3gw.runner import ImmediateRunner

__all__ = ["QUEUE_LEASE", "QUEUE_POLL_INTERVAL", "PostgresQueue", "listEntries", "requestFlush", "workerNode"]

_log = Logger()

#: Seconds an entry's lease lasts without renewal: the entries of a node
#: that died are relayed by another node after at most this long.
QUEUE_LEASE = 25

#: Seconds between two polls (lease renewal, claims, flush requests).
QUEUE_POLL_INTERVAL = 5.0

#: Most entries one poll claims.
CLAIM_BATCH = 100


def workerNode(supervisor: int) -> str:
    """
    @return: a new node name for a worker process of C{--workers N} whose
        supervisor has pid C{supervisor}: it starts with what
        L{PostgresQueue.adopt} of that supervisor takes over.
    """
    return f"{socket.gethostname()}:{supervisor}:w:{secrets.token_hex(4)}"


def listEntries(database: Database) -> list[Entry]:
    """
    Every entry of the queue, oldest first (C{pop3gw queue list}, from any
    node).
    """
    with database.transaction() as conn:
        rows = conn.execute("SELECT entry FROM pop3gw_queue ORDER BY created, id").fetchall()
    return [Entry.fromJSON(bytes(r[0])) for r in rows]


def requestFlush(database: Database) -> int:
    """
    Ask every node to retry the entries it holds now (C{pop3gw queue
    flush}); entries no node holds are due at once when claimed anyway.

    @return: how many entries there are.
    """
    with database.transaction() as conn:
        conn.execute("UPDATE pop3gw_queue_flush SET stamp = stamp + 1")
        return int(conn.execute("SELECT count(*) FROM pop3gw_queue").fetchone()[0])


@implementer(ITwoPhaseDelivery, IQueuedDelivery)
class _PostgresQueueDelivery(CRLFDelivery):
    """
    One message being queued: spooled with CRLF line ends, inserted with
    its entry (leased to this node) by L{prepare}, handed to the relay by
    L{release<CRLFDelivery.release>}.
    """

    def __init__(self, queue: "PostgresQueue", entry: Entry, trace: bytes) -> None:
        self._queue = queue
        self._entry = entry
        self.queueId = entry.queueId
        self._spool: Optional[IO[bytes]] = tempfile.SpooledTemporaryFile(SPOOL_MEMORY)
        self._startLines()
        self._size = 0
        self._state = "open"
        if trace:
            self.write(trace)

    def _append(self, data: bytes) -> None:
        assert self._spool is not None
        try:
            self._spool.write(data)
        except OSError as e:
            self._close()
            raise TemporaryFailure.fromOSError("cannot spool message", e) from None
        self._size += len(data)

    def _close(self) -> None:
        self._state = "aborted"
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()

    def prepare(self) -> defer.Deferred:
        """
        Insert the message and its entry, leased to this node, durably.
        """
        if self._state != "open":
            return defer.fail(TemporaryFailure("delivery is not open"))
        try:
            self._endLines()
        except TemporaryFailure:
            return defer.fail()
        self._state = "preparing"
        spool, self._spool = self._spool, None
        assert spool is not None
        d = self._queue._runner.run(self._queue._insert, self._entry, spool, self._size)

        def prepared(_: object) -> None:
            self._state = "prepared"

        def failed(f: Failure) -> Failure:
            self._state = "aborted"
            return f

        def closed(result: Any) -> Any:
            spool.close()
            return result

        return d.addCallbacks(prepared, failed).addBoth(closed)

    def discard(self) -> defer.Deferred:
        """
        Withdraw a prepared message (or abort an open one).
        """
        if self._state == "prepared":
            self._state = "aborted"
            return self._queue._runner.run(self._queue._delete, self._entry.queueId)
        self.abort()
        return defer.succeed(None)

    def commit(self) -> defer.Deferred:
        return self.prepare().addCallback(lambda _: self.release())

    def abort(self) -> None:
        if self._state == "open":
            self._close()


@implementer(IOutboundQueue, IQueueStore)
class PostgresQueue(QueueListeners):
    """
    The outbound queue in the database, as one node sees it.

    @param reactor: gives the time (C{seconds}).
    @param runner: where database work runs.
    @param node: this node's name in leases (shared with the maildrop
        locks).
    """

    log = Logger()

    def __init__(
        self,
        database: Database,
        reactor: Any,
        runner: Optional[IBlockingRunner] = None,
        node: str = "",
        copies: Optional[str] = None,
        owner: Optional[fsutil.Owner] = None,
        relays: bool = True,
    ) -> None:
        """
        @param copies: the directory of this node's message copies
            (C{DATA/relay} in the server; what a previous run left there is
            removed when the first copy is made); a new temporary directory
            if C{None}.
        @param owner: the data directory's owner, given the directory.
        @param relays: whether this process relays what it queues; a
            worker of C{--workers N} does not: it keeps no copies and
            renews no leases, and the supervisor takes each entry it
            queues over at once (L{adopt}).
        """
        self.database = database
        self.reactor = reactor
        self.node = node
        self._runner: IBlockingRunner = runner if runner is not None else ImmediateRunner()
        self._listeners: list[Callable[[Entry], None]] = []
        self._copies = copies if relays else None
        self.relays = relays
        self._owner = owner
        self._copiesReady = False
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._flushStamp: Optional[int] = None
        self._lost: set[str] = set()
        self._lossListeners: list[Callable[[str], None]] = []

    # -- IOutboundQueue

    def beginDelivery(
        self, sender: Optional[Address], recipients: Sequence[Address], trace: bytes = b"", smtputf8: bool = False
    ):
        now = self.reactor.seconds()
        micros = int(now * 1_000_000) & (16**13 - 1)
        entry = Entry(
            "%013x-%s" % (micros, os.urandom(4).hex()),
            sender,
            [Recipient(r) for r in recipients],
            created=now,
            nextAttempt=now,
            smtputf8=smtputf8,
        )
        return _PostgresQueueDelivery(self, entry, trace)

    # -- IQueueStore

    def loadEntries(self) -> list:
        """
        Nothing, at once: the relay starts on the reactor thread, and the
        entries no node holds are claimed by the first L{poll} (which the
        server runs in a database thread as it starts).
        """
        return []

    def saveEntry(self, entry: Entry) -> defer.Deferred:
        """
        Write C{entry}'s state, renewing its lease.

        @return: a Deferred failing with L{QueueEntryLost} if this node no
            longer holds the entry (its lease ran out and another node took
            it): the attempt is then not made.
        """
        return self._runner.run(self._save, entry.queueId, entry.toJSON(), entry.nextAttempt)

    def recordAttempt(self, entry: Entry) -> defer.Deferred:
        """
        Record an attempt: the entry's state is saved (L{saveEntry}).
        """
        return self.saveEntry(entry)

    def removeEntry(self, entry: Entry) -> defer.Deferred:
        """
        Remove C{entry} and its message.

        @return: a Deferred failing with L{QueueEntryLost} (and removing
            nothing) if another node holds the entry now.
        """
        return self._runner.run(self._delete, entry.queueId, True)

    def openMessage(self, entry: Entry) -> IO[bytes]:
        """
        @return: this node's copy of C{entry}'s message.
        @raise OSError: there is none.
        """
        return open(self._copyPath(entry.queueId), "rb")

    def readHeaders(self, entry: Entry) -> defer.Deferred:
        def read() -> bytes:
            try:
                with self.openMessage(entry) as f:
                    return originalHeaders(f.read(2 * 64 * 1024))
            except OSError:
                return b""

        return self._runner.run(read)

    def flushStamp(self) -> Optional[int]:
        """
        @return: the flush counter as the last poll read it.
        """
        return self._flushStamp

    # -- polling (blocking, in a database thread)

    def poll(self) -> list[Entry]:
        """
        Renew the leases of the entries this node holds, note those it no
        longer holds (for L{announceClaimed}), claim free ones, read the
        flush counter.

        @return: the entries claimed (to hand to the relay).
        """
        with self._lock:
            held = list(self._held)
        with self.database.transaction() as conn:
            if held:
                renewed = conn.execute(
                    "UPDATE pop3gw_queue SET lease_expires = now() + make_interval(secs => %s) "
                    "WHERE node = %s AND id = ANY(%s) RETURNING id",
                    (QUEUE_LEASE, self.node, held),
                ).fetchall()
                missing = sorted(set(held) - {r[0] for r in renewed})
                if missing:
                    # Taken by another node; the others were removed by this
                    # node meanwhile (done, or withdrawn).
                    taken = conn.execute(
                        "SELECT id FROM pop3gw_queue WHERE id = ANY(%s) AND node <> %s", (missing, self.node)
                    ).fetchall()
                    for (queueId,) in taken:
                        self._forget(queueId)
            self._flushStamp = int(conn.execute("SELECT stamp FROM pop3gw_queue_flush").fetchone()[0])
        return self._claim()

    def addLossListener(self, listener: Callable[[str], None]) -> None:
        """
        Call C{listener(queueId)} (on the reactor thread, from
        L{announceClaimed}) for each entry a poll found taken from this
        node.
        """
        self._lossListeners.append(listener)

    def announceClaimed(self, entries: list[Entry]) -> None:
        """
        Tell the relay which entries the last L{poll} found lost, and hand
        it those it claimed (on the reactor thread).
        """
        with self._lock:
            lost, self._lost = sorted(self._lost), set()
        for queueId in lost:
            self.log.warn("queue: {queueId} is relayed by another node now", queueId=queueId)
            for listener in list(self._lossListeners):
                listener(queueId)
        for entry in entries:
            self.log.info("queue: {queueId} taken over by this node", queueId=entry.queueId)
            self._announce(entry)

    def releaseAll(self) -> None:
        """
        Give up every entry this node holds, so another node relays them at
        its next poll (blocking; when the server stops, after the relay
        recorded its attempts), and remove the local copies.
        """
        with self._lock:
            held, self._held = list(self._held), set()
        try:
            if held:
                with self.database.transaction() as conn:
                    conn.execute(
                        "UPDATE pop3gw_queue SET lease_expires = now() - interval '1 second' "
                        "WHERE node = %s AND id = ANY(%s)",
                        (self.node, held),
                    )
        except TemporaryFailure as e:
            self.log.warn("queue: cannot release the entries this node holds: {error}", error=str(e))
        if self._copies is not None:
            shutil.rmtree(self._copies, ignore_errors=True)

    def _copyPath(self, queueId: str) -> str:
        """
        Where this node keeps its copy of C{queueId}'s message; the
        directory is made (emptied of a previous run's copies) on first
        use.
        """
        with self._lock:
            if self._copies is None:
                self._copies = tempfile.mkdtemp(prefix="pop3gw-queue-")
                self._copiesReady = True
            elif not self._copiesReady:
                shutil.rmtree(self._copies, ignore_errors=True)
                fsutil.makeDirectory(self._copies, self._owner)
                self._copiesReady = True
        return os.path.join(self._copies, queueId)

    def announce(self, entry: Entry) -> None:
        """
        Hand an entry L{adopt} took over to the relay (on the reactor
        thread), as a new entry.
        """
        self._announce(entry)

    def adopt(self, queueId: str) -> Optional[Entry]:
        """
        Take entry C{queueId} over from the worker of this process that
        queued it (see C{relays}), whatever its lease, with its message
        (blocking).

        @return: the entry (to hand to the relay with L{announce}),
            or C{None} if no worker of this process holds it any more
            (withdrawn, or claimed by another node after the worker's
            lease ran out).
        """
        prefix = workerNode(os.getpid()).rpartition(":")[0] + ":"
        with self.database.transaction() as conn:
            row = conn.execute(
                "UPDATE pop3gw_queue SET node = %s, lease_expires = now() + make_interval(secs => %s) "
                "WHERE id = %s AND starts_with(node, %s) RETURNING entry, message_id",
                (self.node, QUEUE_LEASE, queueId, prefix),
            ).fetchone()
            if row is None:
                return None
            self._copyMessage(conn, queueId, row[1])
        with self._lock:
            self._held.add(queueId)
        return Entry.fromJSON(bytes(row[0]))

    def _claim(self) -> list[Entry]:
        with self.database.transaction() as conn:
            rows = conn.execute(
                "SELECT id, entry, message_id FROM pop3gw_queue WHERE lease_expires < now() "
                "ORDER BY created, id LIMIT %s FOR UPDATE SKIP LOCKED",
                (CLAIM_BATCH,),
            ).fetchall()
            if not rows:
                return []
            conn.execute(
                "UPDATE pop3gw_queue SET node = %s, lease_expires = now() + make_interval(secs => %s) "
                "WHERE id = ANY(%s)",
                (self.node, QUEUE_LEASE, [r[0] for r in rows]),
            )
            claimed = []
            for queueId, data, message in rows:
                self._copyMessage(conn, queueId, message)
                claimed.append(Entry.fromJSON(bytes(data)))
        with self._lock:
            self._held.update(e.queueId for e in claimed)
        return claimed

    def _copyMessage(self, conn: Any, queueId: str, message: int) -> None:
        with open(self._copyPath(queueId), "wb") as out:
            seq = 0
            while True:
                row = conn.execute(
                    "SELECT data FROM pop3gw_message_chunks WHERE message_id = %s AND seq = %s", (message, seq)
                ).fetchone()
                if row is None:
                    break
                out.write(row[0])
                seq += 1

    def _storeRow(self, entry: Entry, spool: IO[bytes], size: int) -> None:
        """
        Store the message and its queue row, leased to this node, in one
        transaction.
        """
        spool.seek(0)
        with self.database.transaction(pipeline=size <= SPOOL_MEMORY) as conn:
            storeMessage(conn, spool, size, [])
            conn.execute(
                "INSERT INTO pop3gw_queue (id, entry, message_id, node, lease_expires) "
                f"VALUES (%s, %s, {MESSAGE_ID}, %s, now() + make_interval(secs => %s))",
                (entry.queueId, entry.toJSON(), self.node, QUEUE_LEASE),
            )

    def _insert(self, entry: Entry, spool: IO[bytes], size: int) -> None:
        if not self.relays:
            self._storeRow(entry, spool, size)
            return
        copyPath = self._copyPath(entry.queueId)
        try:
            spool.seek(0)
            with open(copyPath, "wb") as copy:
                while True:
                    chunk = spool.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    copy.write(chunk)
            self._storeRow(entry, spool, size)
        except BaseException as e:
            try:
                os.unlink(copyPath)
            except FileNotFoundError:
                pass
            if isinstance(e, OSError):
                raise TemporaryFailure.fromOSError("cannot queue message", e) from None
            raise
        with self._lock:
            self._held.add(entry.queueId)

    def _save(self, queueId: str, data: bytes, nextAttempt: float) -> None:
        with self.database.transaction() as conn:
            cursor = conn.execute(
                "UPDATE pop3gw_queue SET entry = %s, lease_expires = now() + make_interval(secs => %s) "
                "WHERE id = %s AND node = %s",
                (data, QUEUE_LEASE, queueId, self.node),
            )
            if cursor.rowcount == 0:
                self._forget(queueId)
                raise QueueEntryLost(f"queue entry {queueId} is no longer held by this node")

    def _delete(self, queueId: str, done: bool = False) -> None:
        """
        Delete an entry this node holds, and its message.

        @param done: the relay is done with it: an entry this node no
            longer holds raises L{QueueEntryLost} (a withdrawn delivery's
            entry that is already gone is not an error).
        """
        with self.database.transaction() as conn:
            row = conn.execute(
                "DELETE FROM pop3gw_queue WHERE id = %s AND node = %s RETURNING message_id", (queueId, self.node)
            ).fetchone()
            if row is not None:
                conn.execute("DELETE FROM pop3gw_messages WHERE id = %s", (row[0],))
        self._forget(queueId, lost=row is None and done)
        if row is None and done:
            raise QueueEntryLost(f"queue entry {queueId} is no longer held by this node")

    def _forget(self, queueId: str, lost: bool = True) -> None:
        """
        Stop holding C{queueId} (renewing its lease), remove this node's
        copy of its message, and note it for the loss listeners if
        C{lost}.
        """
        with self._lock:
            self._held.discard(queueId)
            if lost:
                self._lost.add(queueId)
        try:
            os.unlink(self._copyPath(queueId))
        except FileNotFoundError:
            pass
