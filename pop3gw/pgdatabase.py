# -*- test-case-name: tests.test_pgstore -*-
"""
The PostgreSQL database behind C{--store postgresql://...}: a connection
pool (psycopg 3 and psycopg_pool), the schema and its versions, and the
mapping of database failures to L{TemporaryFailure}.

Every method here blocks: the server calls them only from its database
thread pool (through an L{pop3gw.interfaces.IBlockingRunner}) or from the
hash threads (password lookups), the C{pop3gw} command directly.  The pool
holds at most as many connections as there are threads that may use it, so
a thread never waits for a connection while the database is up.

The schema is versioned: L{SCHEMA} lists the statements that bring a
database from one version to the next, and L{initSchema} (C{pop3gw --store
URI init}) applies the missing ones in one transaction, under a lock, so it
is idempotent and safe to run from several nodes at once.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import weakref
from typing import Any, Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

from twisted.logger import Logger

from pop3gw.interfaces import TemporaryFailure

__all__ = ["SCHEMA", "SCHEMA_VERSION", "Database", "initSchema", "isDatabaseURI", "redact"]

_log = Logger()

#: Seconds a thread waits for a pooled connection (or for the database to
#: answer a new connection) before the work fails with L{TemporaryFailure}.
CONNECT_TIMEOUT = 5.0

#: Seconds a thread waits for a pooled connection once the database was
#: found unreachable (until a transaction succeeds again): while it is down,
#: logins and deliveries fail at once rather than after L{CONNECT_TIMEOUT}.
DOWN_TIMEOUT = 0.5

#: Seconds the pool keeps retrying one connection (with a growing delay)
#: before it gives that attempt up; the next request for a connection then
#: starts a new attempt at once.  This bounds how long a database that came
#: back stays unused.
RECONNECT_TIMEOUT = 10.0

#: Seconds a pooled connection may have been idle and still be handed out
#: unchecked: one idle for longer is checked first (an empty query), so a
#: connection broken by a restart or failover is replaced rather than
#: failing the work; one in steady use costs no extra round trip.
IDLE_CHECK = 1.0

#: How long one statement may run (milliseconds) before the database
#: cancels it; a lock wait counts.
STATEMENT_TIMEOUT_MS = 30_000

#: The schema, one list of statements per version: entry C{n} brings a
#: database from version C{n} to C{n + 1}.
SCHEMA: list[list[str]] = [
    [
        """CREATE TABLE pop3gw_users (
            address text PRIMARY KEY,
            lookup_key text NOT NULL UNIQUE,
            hash text NOT NULL,
            position bigserial NOT NULL)""",
        """CREATE TABLE pop3gw_aliases (
            name text PRIMARY KEY,
            lookup_key text NOT NULL UNIQUE,
            targets text[] NOT NULL,
            position bigserial NOT NULL)""",
        # Bumped by every change to users or aliases (and locked by it, so
        # changes are serialised): nodes re-read the directory only when it
        # moved.
        """CREATE TABLE pop3gw_directory_version (
            id integer PRIMARY KEY CHECK (id = 1),
            version bigint NOT NULL)""",
        "INSERT INTO pop3gw_directory_version VALUES (1, 1)",
        """CREATE TABLE pop3gw_messages (
            id bigserial PRIMARY KEY,
            size bigint NOT NULL,
            created timestamptz NOT NULL DEFAULT now())""",
        """CREATE TABLE pop3gw_message_chunks (
            message_id bigint NOT NULL REFERENCES pop3gw_messages ON DELETE CASCADE,
            seq integer NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (message_id, seq))""",
        # Never goes back, so a UIDL made from it is never reused.
        "CREATE SEQUENCE pop3gw_position",
        """CREATE TABLE pop3gw_maildrop (
            id bigserial PRIMARY KEY,
            maildrop text NOT NULL,
            message_id bigint NOT NULL REFERENCES pop3gw_messages,
            position bigint NOT NULL,
            uid text NOT NULL,
            seen boolean NOT NULL DEFAULT false,
            UNIQUE (maildrop, uid))""",
        "CREATE INDEX pop3gw_maildrop_order ON pop3gw_maildrop (maildrop, position)",
        "CREATE INDEX pop3gw_maildrop_message ON pop3gw_maildrop (message_id)",
        # One row per maildrop held by a POP3 session: which node, which
        # session, and until when (the node renews its rows; a dead node's
        # rows go stale).
        """CREATE TABLE pop3gw_locks (
            maildrop text PRIMARY KEY,
            node text NOT NULL,
            token text NOT NULL,
            expires timestamptz NOT NULL)""",
        # The outbound queue: the entry (JSON, as the file queue writes
        # it), its message, and the node relaying it until lease_expires.
        """CREATE TABLE pop3gw_queue (
            id text PRIMARY KEY,
            entry bytea NOT NULL,
            message_id bigint NOT NULL REFERENCES pop3gw_messages,
            node text NOT NULL,
            lease_expires timestamptz NOT NULL,
            created timestamptz NOT NULL DEFAULT now())""",
        "CREATE INDEX pop3gw_queue_lease ON pop3gw_queue (lease_expires)",
        """CREATE TABLE pop3gw_queue_flush (
            id integer PRIMARY KEY CHECK (id = 1),
            stamp bigint NOT NULL)""",
        "INSERT INTO pop3gw_queue_flush VALUES (1, 0)",
    ],
    # Version 2: the state every node must share beyond users and mail
    # (see pop3gw.pgaccounts and pop3gw.pgdkim): app passwords and
    # main-password scopes, sending records, per-user limits, suspensions,
    # DKIM keys.
    [
        """CREATE TABLE pop3gw_app_passwords (
            user_key text NOT NULL,
            address text NOT NULL,
            id text NOT NULL,
            name text NOT NULL,
            hash text NOT NULL,
            scope text NOT NULL,
            created double precision NOT NULL,
            PRIMARY KEY (user_key, id),
            UNIQUE (user_key, name))""",
        """CREATE TABLE pop3gw_main_scopes (
            user_key text PRIMARY KEY,
            address text NOT NULL,
            scope text NOT NULL)""",
        """CREATE TABLE pop3gw_app_password_use (
            user_key text NOT NULL,
            name text NOT NULL,
            at double precision NOT NULL,
            client text NOT NULL,
            PRIMARY KEY (user_key, name))""",
        """CREATE TABLE pop3gw_sent (
            user_key text NOT NULL,
            at double precision NOT NULL,
            recipients integer NOT NULL,
            client text NOT NULL)""",
        "CREATE INDEX pop3gw_sent_user_at ON pop3gw_sent (user_key, at)",
        "CREATE INDEX pop3gw_sent_at ON pop3gw_sent (at)",
        """CREATE TABLE pop3gw_limit_overrides (
            user_key text PRIMARY KEY,
            messages_per_hour integer,
            recipients_per_day integer)""",
        """CREATE TABLE pop3gw_suspended (
            user_key text PRIMARY KEY,
            since double precision NOT NULL,
            reason text NOT NULL)""",
        """CREATE TABLE pop3gw_dkim_keys (
            domain text NOT NULL,
            selector text NOT NULL,
            algorithm text NOT NULL,
            created text NOT NULL,
            active boolean NOT NULL,
            private_key bytea NOT NULL,
            position bigserial NOT NULL,
            PRIMARY KEY (domain, selector))""",
        # Bumped by every change to the keys (and locked by it, so changes
        # are serialised): nodes re-read the keys only when it moved.
        """CREATE TABLE pop3gw_dkim_version (
            id integer PRIMARY KEY CHECK (id = 1),
            version bigint NOT NULL)""",
        "INSERT INTO pop3gw_dkim_version VALUES (1, 1)",
    ],
    # Version 3: the login history (see pop3gw.pglogins).
    [
        """CREATE TABLE pop3gw_login_history (
            user_key text NOT NULL,
            network text NOT NULL,
            first_seen double precision NOT NULL,
            last_seen double precision NOT NULL,
            PRIMARY KEY (user_key, network))""",
        "CREATE INDEX pop3gw_login_history_last ON pop3gw_login_history (last_seen)",
    ],
]

#: The version this code reads and writes.
SCHEMA_VERSION = len(SCHEMA)

#: Arbitrary key of the advisory lock L{initSchema} holds.
_INIT_LOCK = 0x706F7033


def isDatabaseURI(store: str) -> bool:
    """
    @return: whether C{store} names a PostgreSQL database (a libpq URI).
    """
    return re.match(r"postgres(ql)?://", store) is not None


def redact(uri: str) -> str:
    """
    @return: C{uri} without its password, for logs and messages.
    """
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def _temporary(error: Exception) -> TemporaryFailure:
    """
    The L{TemporaryFailure} for a database that cannot be reached or
    answered an operational error.
    """
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return TemporaryFailure(f"database unavailable: {text}")


class Database:
    """
    A pool of connections to one database.

    @param uri: a libpq connection URI (multi-host URIs with
        C{target_session_attrs=read-write} follow a promoted standby).
    @param maxConnections: the most connections held; give the number of
        threads that may use the pool.
    @param timeout: seconds to wait for a connection before failing with
        L{TemporaryFailure}.
    """

    def __init__(
        self, uri: str, maxConnections: int = 4, minConnections: int = 1, timeout: float = CONNECT_TIMEOUT
    ) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        # psycopg_pool reports each failed connection attempt through the
        # standard logging module, which would print them on stderr: the
        # failures that matter reach the callers as TemporaryFailure, which
        # they log (or print) once, in one line.
        poolLog = logging.getLogger("psycopg.pool")
        poolLog.propagate = False
        if not poolLog.handlers:
            poolLog.addHandler(logging.NullHandler())
        self.uri = uri
        self.timeout = timeout
        self._returned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._errors: tuple = (psycopg.OperationalError, psycopg.InterfaceError)
        # Set while the database is known to be unreachable: the last
        # transaction failed to connect or lost its connection.
        self.down = False
        self._pool = ConnectionPool(
            uri,
            min_size=max(0, min(minConnections, maxConnections)),
            max_size=max(1, maxConnections),
            open=False,
            timeout=timeout,
            reconnect_timeout=RECONNECT_TIMEOUT,
            # A connection broken by a restart or failover is found and
            # replaced when taken, not handed out, if it was idle.
            check=self._checkIdle,
            reset=self._noteReturned,
            # Autocommit: a transaction is an explicit BEGIN ... COMMIT
            # (L{transaction}), and a single statement (L{connection})
            # commits on its own, in one round trip.
            kwargs={
                "connect_timeout": max(1, int(timeout)),
                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                "autocommit": True,
            },
            name="pop3gw",
        )
        # Opened without waiting: a database down at start-up is retried in
        # the background, and work meanwhile fails temporarily.
        self._pool.open(wait=False)

    def _checkIdle(self, conn: Any) -> None:
        """
        The pool's check of a connection it hands out: an empty query if
        the connection was idle for more than L{IDLE_CHECK} seconds.
        """
        from psycopg_pool import ConnectionPool

        if time.monotonic() - self._returned.get(conn, 0.0) > IDLE_CHECK:
            ConnectionPool.check_connection(conn)

    def _noteReturned(self, conn: Any) -> None:
        self._returned[conn] = time.monotonic()

    @contextlib.contextmanager
    def connection(self, pipeline: bool = False) -> Iterator[Any]:
        """
        A pooled connection in autocommit mode: each statement is its own
        transaction, in one round trip.

        @param pipeline: send the statements of the block together, in
            one round trip (libpq's pipeline mode); their results are read
            once the block ends.
        @raise TemporaryFailure: see L{transaction}.
        """
        from psycopg_pool import PoolTimeout

        try:
            with self._pool.connection(timeout=min(DOWN_TIMEOUT, self.timeout) if self.down else None) as conn:
                if pipeline:
                    with conn.pipeline():
                        yield conn
                else:
                    yield conn
        except PoolTimeout as e:
            self.down = True
            raise _temporary(e) from None
        except self._errors as e:
            self.down = True
            raise _temporary(e) from None
        self.down = False

    @contextlib.contextmanager
    def transaction(self, pipeline: bool = False) -> Iterator[Any]:
        """
        A pooled connection in a transaction, committed when the block ends
        (rolled back if it raises).

        @param pipeline: send C{BEGIN}, the statements of the block and
            C{COMMIT} together, in one round trip; the results are read
            once the block ends, so the block must not need them (and must
            not raise once it queued a change).
        @raise TemporaryFailure: no connection within L{CONNECT_TIMEOUT},
            or the database failed (connection lost, shut down, serialization
            trouble); whatever the block did is rolled back.
        """
        with self.connection(pipeline) as conn:
            with conn.transaction():
                yield conn

    def probe(self) -> None:
        """
        Connect once, outside the pool, and check the schema (blocking, for
        start-up: a database that refuses connections answers at once,
        rather than after the pool's L{CONNECT_TIMEOUT}; one that does not
        answer at all costs at most two seconds, libpq's shortest connect
        timeout).

        @raise TemporaryFailure: the database cannot be reached.
        @raise ValueError: the schema is missing or not this code's: the
            text says what to do (one line).
        """
        import psycopg

        try:
            with psycopg.connect(self.uri, connect_timeout=2, autocommit=True) as conn:
                problem = schemaProblem(schemaVersion(conn))
        except self._errors as e:
            self.down = True
            raise _temporary(e) from None
        if problem is not None:
            raise ValueError(problem)

    def close(self) -> None:
        """
        Close every connection.
        """
        self._pool.close()


def schemaVersion(conn: Any) -> int:
    """
    @return: the version of the schema C{conn}'s database holds (0: none).
    """
    exists = conn.execute("SELECT to_regclass('pop3gw_schema') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    row = conn.execute("SELECT version FROM pop3gw_schema").fetchone()
    return row[0] if row is not None else 0


def initSchema(database: Database) -> tuple[int, int]:
    """
    Create the schema or bring it to L{SCHEMA_VERSION}, in one transaction
    under an advisory lock (several nodes may run it at once).

    @return: the versions before and after.
    @raise TemporaryFailure: the database cannot be reached.
    @raise ValueError: the database holds a newer schema than this code.
    """
    with database.transaction() as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_INIT_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS pop3gw_schema (version integer NOT NULL)")
        before = schemaVersion(conn)
        if before > SCHEMA_VERSION:
            raise ValueError(f"the database holds schema version {before}, newer than this pop3gw ({SCHEMA_VERSION})")
        for version in range(before, SCHEMA_VERSION):
            for statement in SCHEMA[version]:
                conn.execute(statement)
        conn.execute("DELETE FROM pop3gw_schema")
        conn.execute("INSERT INTO pop3gw_schema VALUES (%s)", (SCHEMA_VERSION,))
    if before != SCHEMA_VERSION:
        _log.info("database schema brought from version {before} to {after}", before=before, after=SCHEMA_VERSION)
    return before, SCHEMA_VERSION


def checkSchema(database: Database) -> Optional[str]:
    """
    @return: why this code cannot use the database's schema (one line
        for the operator), or C{None} if it can.
    @raise TemporaryFailure: the database cannot be reached.
    """
    with database.transaction() as conn:
        version = schemaVersion(conn)
    return schemaProblem(version)


def schemaProblem(version: int) -> Optional[str]:
    """
    @return: why this code cannot use a database holding schema
        C{version} (one line for the operator), or C{None} if it can.
    """
    if version == SCHEMA_VERSION:
        return None
    if version == 0:
        return "the database has no pop3gw schema: run 'pop3gw --store URI init' first"
    if version < SCHEMA_VERSION:
        return f"the database holds schema version {version}: run 'pop3gw --store URI init' to upgrade it"
    return f"the database holds schema version {version}, newer than this pop3gw ({SCHEMA_VERSION})"
