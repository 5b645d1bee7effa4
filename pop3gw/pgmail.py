# -*- test-case-name: tests.test_pgstore -*-
"""
Maildrops in PostgreSQL: L{IMaildropStore} over a
L{pop3gw.pgdatabase.Database}, for several nodes on one database.

A message is stored once, in wire form (CRLF line ends, final CRLF), split
into rows of L{CHUNK_SIZE} octets, with its exact size; each recipient's
maildrop gets an entry pointing at it, with a position and a UIDL taken
from one sequence (so never reused) and a seen flag.  A delivery spools
what it is given (in memory, then in a temporary file) and inserts it in
one transaction: nothing is acknowledged before that commits.  A POP3
C{RETR} fetches the message chunk by chunk into a temporary file off the
reactor thread and streams it from there, so a large message costs neither
memory nor a connection while it is sent.  C{DELE} only marks; the commit
at C{QUIT} deletes the entries, marks the seen ones and releases the lock
in one transaction.

The lock across nodes is a row per locked maildrop (node, session token,
expiry), not a connection: taking it is an insert that succeeds only if no
live row exists; the node renews the expiry of the rows it holds every
L{LOCK_RENEW_INTERVAL} seconds (one statement for all its sessions); a
session ending deletes its row; the rows of a node that died go stale
after L{LOCK_LEASE} seconds and are then taken over.  The database's clock
is the only one used.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import socket
import tempfile
import threading
from typing import IO, Any, Iterable, Iterator, Optional, Sequence, Union

import attr
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3gw.address import Address
from pop3gw.interfaces import (
    BadMessageData,
    IBlockingRunner,
    IDelivery,
    IMaildrop,
    IMaildropStore,
    IMessageInfo,
    MaildropLocked,
    ServerStopping,
    TemporaryFailure,
)
from pop3gw.pgdatabase import Database
from pop3gw.runner import ImmediateRunner
from pop3gw.wire import MessageDataCheck, WireConverter

__all__ = ["CHUNK_SIZE", "LOCK_LEASE", "LOCK_RENEW_INTERVAL", "PostgresMaildropStore", "UIDLInUse", "storeMessage"]

_log = Logger()

#: Octets of a message per row (and per read when fetching it).
CHUNK_SIZE = 256 * 1024

#: Octets a delivery keeps in memory before spooling to a temporary file.
SPOOL_MEMORY = 1024 * 1024

#: Seconds a maildrop lock lives without renewal: a node that died (or lost
#: the database) frees its maildrops within this time of its death (its last
#: renewal was at most L{LOCK_RENEW_INTERVAL} earlier).
LOCK_LEASE = 25

#: Seconds between two renewals of a node's locks (a lease survives four
#: missed renewals).
LOCK_RENEW_INTERVAL = 5.0


#: The id of the message L{storeMessage} inserted last on this connection
#: (an SQL expression), for the statements after it.
MESSAGE_ID = "currval(pg_get_serial_sequence('pop3gw_messages', 'id'))"

#: A UIDL of the form pop3gw gives new mail (C{P} and a position).
_OWN_UIDL = re.compile(r"^P([1-9][0-9]{0,17})$")


class UIDLInUse(Exception):
    """
    An imported UIDL is already the UIDL of another message of the
    maildrop.

    @ivar uid: that UIDL.
    """

    def __init__(self, uid: str) -> None:
        super().__init__(uid)
        self.uid = uid


def reservePositions(conn: Any, uids: Iterable[str]) -> None:
    """
    Move the position sequence past every imported UIDL of the form
    pop3gw gives new mail (C{P} and a position), so that no later delivery
    is given one of them.

    @param conn: a connection in a transaction.
    """
    highest = max((int(m.group(1)) for m in map(_OWN_UIDL.match, uids) if m), default=0)
    if highest:
        conn.execute(
            "SELECT setval('pop3gw_position', %s) FROM pop3gw_position WHERE last_value < %s", (highest, highest)
        )


def storeMessage(
    conn: Any, source: Union[IO[bytes], io.RawIOBase], size: int, entries: Sequence[tuple[str, Optional[str], bool]]
) -> None:
    """
    Insert a message read from C{source} (in wire form, C{size} octets) in
    rows of L{CHUNK_SIZE}, and one entry per C{(maildrop, uid, seen)}: last
    in that maildrop, with a new UIDL (C{"P"} and its position, from a
    sequence that never goes back) when C{uid} is C{None}, else C{uid} (a
    migration or an import keeping UIDLs; one of the form of a new UIDL
    moves the sequence past it, see L{reservePositions}).  No statement
    needs the result of another (the message's id is L{MESSAGE_ID}), so
    they can be pipelined.

    @param conn: a connection in a transaction.
    """
    conn.execute("INSERT INTO pop3gw_messages (size) VALUES (%s)", (size,))
    seq = 0
    while True:
        chunk = source.read(CHUNK_SIZE)
        if not chunk:
            break
        conn.execute(
            f"INSERT INTO pop3gw_message_chunks (message_id, seq, data) VALUES ({MESSAGE_ID}, %s, %s)", (seq, chunk)
        )
        seq += 1
    reservePositions(conn, [uid for _, uid, _ in entries if uid is not None])
    for maildrop, uid, seen in entries:
        conn.execute(
            "INSERT INTO pop3gw_maildrop (maildrop, message_id, position, uid, seen) "
            f"SELECT %s, {MESSAGE_ID}, p, coalesce(%s, 'P' || p), %s FROM (SELECT nextval('pop3gw_position') AS p) AS s",
            (maildrop, uid, seen),
        )


@implementer(IMessageInfo)
@attr.s(auto_attribs=True, frozen=True)
class PostgresMessageInfo:
    """
    One message of a snapshot.

    @ivar size: octets in wire form.
    @ivar uid: the UIDL value.
    @ivar seen: whether an earlier session retrieved it.
    @ivar entry: the maildrop entry's row id.
    @ivar message: the message's row id.
    """

    size: int
    uid: str
    seen: bool
    entry: int
    message: int


@implementer(IMaildrop)
class PostgresMaildrop:
    """
    One POP3 session's locked snapshot of a maildrop.
    """

    def __init__(self, store: "PostgresMaildropStore", maildrop: str, token: str, messages: list) -> None:
        self._store = store
        self._maildrop = maildrop
        self._token = token
        self._state = "open"
        self.messages = messages

    def _info(self, index: int) -> PostgresMessageInfo:
        if not 0 <= index < len(self.messages):
            raise IndexError(index)
        info: PostgresMessageInfo = self.messages[index]
        return info

    def openMessage(self, index: int) -> defer.Deferred:
        """
        Fetch message C{index} into a temporary file off the reactor
        thread, chunk by chunk.

        @return: a C{Deferred} firing with the file (positioned at its
            start), or failing with L{TemporaryFailure} (the database
            failed, the message is gone or its size changed, or the
            maildrop is no longer locked) or C{IndexError}.
        """
        try:
            info = self._info(index)
        except IndexError:
            return defer.fail()
        if self._state != "open":
            return defer.fail(TemporaryFailure("maildrop is not locked"))
        return self._store._runner.run(self._store._fetch, info)

    def commit(self, deleted: Iterable[int], seen: Iterable[int] = ()) -> defer.Deferred:
        """
        See L{IMaildrop.commit}: one transaction deletes the entries,
        marks the seen ones and deletes the lock row, after checking the
        lock is still this session's (a session whose node lost the
        database for longer than L{LOCK_LEASE} may have lost it).
        """
        if self._state != "open":
            return defer.fail(TemporaryFailure("maildrop is not locked"))
        deleted = set(deleted)
        try:
            gone = [self._info(i) for i in sorted(deleted)]
            marked = [self._info(i) for i in sorted(set(seen) - deleted)]
        except IndexError:
            self.release()
            return defer.fail()
        self._state = "committing"
        d = self._store._runner.run(self._store._commit, self._maildrop, self._token, gone, marked)

        def failed(reason: Failure) -> Failure:
            self._state = "open"
            self.release()
            return reason

        def done(result: None) -> None:
            self._state = "released"
            self._store._forget(self._token)

        return d.addCallbacks(done, failed)

    def release(self) -> None:
        """
        Delete the lock row (through the runner; a failure is logged, and
        the row then goes stale after L{LOCK_LEASE}).  Idempotent; does
        nothing while a commit runs.  A session closed by a stopping
        server finds the runner closed (L{ServerStopping}): the stop has
        already deleted every lock row of this server
        (L{PostgresMaildropStore.releaseAll}), so nothing is logged.
        """
        if self._state != "open":
            return
        self._state = "released"
        self._store._forget(self._token)
        d = self._store._runner.run(self._store._unlock, self._maildrop, self._token)
        d.addErrback(lambda f: f.trap(ServerStopping))
        d.addErrback(lambda f: _log.warn("cannot release maildrop lock: {error}", error=str(f.value)))


@implementer(IDelivery)
class PostgresDelivery:
    """
    One message being delivered: spooled, then inserted with an entry per
    recipient in one transaction.
    """

    def __init__(self, store: "PostgresMaildropStore", recipients: Sequence[Address], uid: Optional[str] = None) -> None:
        self._store = store
        self._recipients = list(recipients)
        self._uid = uid
        self._spool: Optional[IO[bytes]] = tempfile.SpooledTemporaryFile(SPOOL_MEMORY)
        self._converter = WireConverter()
        self._check = MessageDataCheck()
        self._size = 0
        self.state = "open"

    def _append(self, data: bytes) -> None:
        if data:
            assert self._spool is not None
            self._spool.write(data)
            self._size += len(data)

    def write(self, data: bytes) -> None:
        """
        See L{IDelivery.write}.
        """
        if self.state != "open":
            raise TemporaryFailure("delivery is not open")
        problem = self._check.feed(data)
        if problem is not None:
            self._fail()
            raise BadMessageData(f"it contains a {problem}")
        try:
            self._append(self._converter.feed(data))
        except OSError as e:
            self._fail()
            raise TemporaryFailure.fromOSError("cannot spool message", e) from e

    def commit(self) -> defer.Deferred:
        """
        See L{IDelivery.commit}: fires once the transaction inserting the
        message and its entries has committed.
        """
        if self.state != "open":
            return defer.fail(TemporaryFailure("delivery is not open"))
        problem = self._check.finish()
        if problem is not None:
            self._fail()
            return defer.fail(BadMessageData(f"it contains a {problem}"))
        try:
            self._append(self._converter.finish())
        except OSError as e:
            self._fail()
            return defer.fail(TemporaryFailure.fromOSError("cannot spool message", e))
        self.state = "committing"
        spool, self._spool = self._spool, None
        d = self._store._runner.run(self._store._insert, self._recipients, spool, self._size, self._uid)

        def finished(result: Any) -> Any:
            self.state = "committed" if not isinstance(result, Failure) else "failed"
            assert spool is not None
            spool.close()
            return result

        return d.addBoth(finished)

    def _fail(self) -> None:
        self.state = "failed"
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()

    def abort(self) -> None:
        """
        See L{IDelivery.abort}.
        """
        if self.state == "open":
            self._fail()
            self.state = "aborted"


@implementer(IMaildropStore)
class PostgresMaildropStore:
    """
    The users' maildrops in the database.

    @param database: the pool to use.
    @param runner: where database work runs (the server's database thread
        pool; at once for the CLI and tests).
    @param node: this node's name in lock rows (host name and pid by
        default, with a random part so a restarted node holds nothing).
    """

    def __init__(self, database: Database, runner: Optional[IBlockingRunner] = None, node: Optional[str] = None) -> None:
        self.database = database
        self._runner: IBlockingRunner = runner if runner is not None else ImmediateRunner()
        self.node = node if node is not None else f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._held: set[str] = set()
        self._heldLock = threading.Lock()

    # -- IMaildropStore

    def openMaildrop(self, address: Address) -> defer.Deferred:
        """
        See L{IMaildropStore.openMaildrop}: take the lock row and the
        snapshot in one transaction, off the reactor thread.
        """
        return self._runner.run(self._lockAndSnapshot, address)

    def beginDelivery(self, recipients: Sequence[Address], trace: bytes = b"") -> PostgresDelivery:
        """
        See L{IMaildropStore.beginDelivery}.

        @raise ValueError: no recipients.
        """
        unique = list(dict.fromkeys(recipients))
        if not unique:
            raise ValueError("no recipients")
        delivery = PostgresDelivery(self, unique)
        if trace:
            delivery.write(trace)
        return delivery

    # -- lock lease

    def renewLocks(self) -> int:
        """
        Push back the expiry of every lock this node's sessions hold
        (blocking; the server runs it every L{LOCK_RENEW_INTERVAL} seconds).

        @return: how many rows were renewed.
        """
        with self._heldLock:
            tokens = list(self._held)
        if not tokens:
            return 0
        with self.database.transaction() as conn:
            cursor = conn.execute(
                "UPDATE pop3gw_locks SET expires = now() + make_interval(secs => %s) "
                "WHERE node = %s AND token = ANY(%s)",
                (LOCK_LEASE, self.node, tokens),
            )
            return int(cursor.rowcount)

    def releaseAll(self) -> int:
        """
        Delete every lock row of this node (blocking; the server runs it
        when it stops, so its maildrops are free at once rather than after
        L{LOCK_LEASE}).  Sessions still open then fail their commit.

        @return: how many rows were deleted.
        """
        with self._heldLock:
            self._held.clear()
        with self.database.transaction() as conn:
            return int(conn.execute("DELETE FROM pop3gw_locks WHERE node = %s", (self.node,)).rowcount)

    def _forget(self, token: str) -> None:
        with self._heldLock:
            self._held.discard(token)

    # -- blocking work, through the runner

    def _lockAndSnapshot(self, address: Address) -> PostgresMaildrop:
        maildrop = str(address)
        token = secrets.token_hex(8)
        # One round trip: the listing is read after the lock is taken (a
        # statement of its own, so it sees what a session that held the
        # lock committed), and read for nothing if the lock was not.
        with self.database.transaction(pipeline=True) as conn:
            locked = conn.execute(
                "INSERT INTO pop3gw_locks (maildrop, node, token, expires) "
                "VALUES (%s, %s, %s, now() + make_interval(secs => %s)) "
                "ON CONFLICT (maildrop) DO UPDATE SET node = EXCLUDED.node, token = EXCLUDED.token, "
                "expires = EXCLUDED.expires WHERE pop3gw_locks.expires < now() RETURNING token",
                (maildrop, self.node, token, LOCK_LEASE),
            )
            listing = conn.execute(
                "SELECT e.id, e.uid, e.seen, m.size, m.id FROM pop3gw_maildrop e "
                "JOIN pop3gw_messages m ON m.id = e.message_id WHERE e.maildrop = %s ORDER BY e.position",
                (maildrop,),
            )
        if locked.fetchone() is None:
            raise MaildropLocked(maildrop)
        rows = listing.fetchall()
        with self._heldLock:
            self._held.add(token)
        messages = [PostgresMessageInfo(size, uid, seen, entry, message) for entry, uid, seen, size, message in rows]
        return PostgresMaildrop(self, maildrop, token, messages)

    def _unlock(self, maildrop: str, token: str) -> None:
        with self.database.connection() as conn:
            conn.execute("DELETE FROM pop3gw_locks WHERE maildrop = %s AND token = %s", (maildrop, token))

    def _fetch(self, info: PostgresMessageInfo) -> IO[bytes]:
        """
        Copy a message into an anonymous temporary file, one chunk per
        query (L{messageChunks}).

        @raise TemporaryFailure: the database failed, or the message is
            gone or not the size the snapshot said.
        """
        out = tempfile.TemporaryFile()
        try:
            for chunk in self.messageChunks(info):
                out.write(chunk)
            out.seek(0)
        except OSError as e:
            out.close()
            raise TemporaryFailure.fromOSError("cannot spool message", e) from e
        except BaseException:
            out.close()
            raise
        return out

    def messageChunks(self, info: PostgresMessageInfo) -> Iterator[bytes]:
        """
        A message in wire form, one stored row (at most L{CHUNK_SIZE}
        octets) at a time, one query each, blocking: a large message is
        never held whole.  The iteration holds a connection until it ends.

        @raise TemporaryFailure: the database failed, or the message is
            gone or not the size the snapshot said (once every row is read).
        """
        written = 0
        seq = 0
        # One statement per chunk, each its own transaction (a message's
        # rows never change; one deleted meanwhile shows as a short read),
        # and none after the last: one round trip for a message of one
        # chunk.
        with self.database.connection() as conn:
            while written < info.size:
                row = conn.execute(
                    "SELECT data FROM pop3gw_message_chunks WHERE message_id = %s AND seq = %s",
                    (info.message, seq),
                ).fetchone()
                if row is None:
                    break
                chunk = bytes(row[0])
                written += len(chunk)
                seq += 1
                yield chunk
        if written != info.size:
            raise TemporaryFailure("message vanished or changed during the session")

    def _insert(self, recipients: Sequence[Address], spool: IO[bytes], size: int, uid: Optional[str] = None) -> None:
        """
        Insert one message and an entry per recipient, in one transaction
        (with the UIDL C{uid}, an imported message, else a new one).
        """
        spool.seek(0)
        # One round trip for a message held in memory.
        with self.database.transaction(pipeline=size <= SPOOL_MEMORY) as conn:
            storeMessage(conn, spool, size, [(str(r), uid, False) for r in recipients])

    def importMessage(self, address: Address, data: bytes, uid: str) -> None:
        """
        Store one message (C{pop3gw import}) in C{address}'s maildrop
        with the UIDL C{uid} (blocking with the default runner): the
        message and its UIDL are committed in one transaction.

        @raise BadMessageData: the message cannot be stored unchanged.
        @raise TemporaryFailure: the database failed.
        """
        delivery = PostgresDelivery(self, [address], uid)
        delivery.write(data)
        failures: list = []
        delivery.commit().addErrback(failures.append)
        if failures:
            failures[0].raiseException()

    def setUIDLs(self, maildrop: str, uids: dict[int, str]) -> None:
        """
        Give the entries of C{maildrop} named by id the UIDLs of C{uids}
        (C{pop3gw user import-uidl}), in one transaction; an entry not in
        the maildrop is ignored.

        @raise UIDLInUse: a UIDL is another entry's (nothing changed).
        """
        with self.database.transaction() as conn:
            rows = conn.execute(
                "SELECT id, uid FROM pop3gw_maildrop WHERE maildrop = %s FOR UPDATE", (maildrop,)
            ).fetchall()
            present = {entry for entry, _ in rows}
            uids = {entry: uid for entry, uid in uids.items() if entry in present}
            others = {uid for entry, uid in rows if entry not in uids}
            for uid in uids.values():
                if uid in others:
                    raise UIDLInUse(uid)
            if not uids:
                return
            # Through a value no UIDL can be (it has a space), so that two
            # entries may swap UIDLs under the unique constraint.
            conn.execute("UPDATE pop3gw_maildrop SET uid = ' ' || id WHERE id = ANY(%s)", (list(uids),))
            conn.cursor().executemany(
                "UPDATE pop3gw_maildrop SET uid = %s WHERE id = %s", [(uid, entry) for entry, uid in uids.items()]
            )
            reservePositions(conn, uids.values())

    def maildrops(self) -> list[str]:
        """
        Every maildrop that holds messages (C{pop3gw migrate}).
        """
        with self.database.transaction() as conn:
            return [r[0] for r in conn.execute("SELECT DISTINCT maildrop FROM pop3gw_maildrop ORDER BY maildrop")]

    def listMessages(self, maildrop: str) -> list[PostgresMessageInfo]:
        """
        The messages of C{maildrop} in order, without locking it
        (C{pop3gw migrate}).
        """
        with self.database.transaction() as conn:
            rows = conn.execute(
                "SELECT e.id, e.uid, e.seen, m.size, m.id FROM pop3gw_maildrop e "
                "JOIN pop3gw_messages m ON m.id = e.message_id WHERE e.maildrop = %s ORDER BY e.position",
                (maildrop,),
            ).fetchall()
        return [PostgresMessageInfo(size, uid, seen, entry, message) for entry, uid, seen, size, message in rows]

    def _commit(self, maildrop: str, token: str, gone: list, marked: list) -> None:
        """
        Apply a session's deletions and seen flags and release its lock,
        in one transaction and one round trip (the statements are
        pipelined): each change holds only while the lock row is still
        this session's, which the first statement locks, so a session that
        lost its lock changes nothing.  A session that changed nothing
        only deletes its lock row.

        @raise TemporaryFailure: the lock was lost; nothing was changed.
        """
        if not gone and not marked:
            with self.database.connection() as conn:
                held = conn.execute(
                    "DELETE FROM pop3gw_locks WHERE maildrop = %s AND token = %s RETURNING 1", (maildrop, token)
                ).fetchone()
            if held is None:
                raise TemporaryFailure("maildrop lock lost (lease expired)")
            return
        mine = "EXISTS (SELECT 1 FROM pop3gw_locks WHERE maildrop = %s AND token = %s)"
        with self.database.transaction(pipeline=True) as conn:
            locked = conn.execute(
                "SELECT 1 FROM pop3gw_locks WHERE maildrop = %s AND token = %s FOR UPDATE", (maildrop, token)
            )
            if gone:
                messages = sorted({info.message for info in gone})
                # Lock the messages first (in one order): a message shared
                # with another maildrop is removed by whichever commit
                # deletes its last entry.
                conn.execute(
                    f"SELECT id FROM pop3gw_messages WHERE id = ANY(%s) AND {mine} ORDER BY id FOR UPDATE",
                    (messages, maildrop, token),
                )
                conn.execute(
                    f"DELETE FROM pop3gw_maildrop WHERE id = ANY(%s) AND {mine}",
                    ([info.entry for info in gone], maildrop, token),
                )
                conn.execute(
                    "DELETE FROM pop3gw_messages m WHERE m.id = ANY(%s) AND NOT EXISTS "
                    "(SELECT 1 FROM pop3gw_maildrop e WHERE e.message_id = m.id)",
                    (messages,),
                )
            if marked:
                conn.execute(
                    f"UPDATE pop3gw_maildrop SET seen = true WHERE id = ANY(%s) AND {mine}",
                    ([info.entry for info in marked], maildrop, token),
                )
            conn.execute("DELETE FROM pop3gw_locks WHERE maildrop = %s AND token = %s", (maildrop, token))
        if locked.fetchone() is None:
            raise TemporaryFailure("maildrop lock lost (lease expired)")
