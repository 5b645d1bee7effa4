# -*- test-case-name: tests.test_apppasswords,tests.test_sendlimits -*-
"""
The per-user state every node must share, in the database store (schema
version 2): app passwords and main-password scopes
(L{PostgresAppPasswords}, the database side of L{pop3gw.apppasswords}),
and sending records, per-user limits and suspensions
(L{PostgresSendingLimits}, the database side of L{pop3gw.sendlimits}).

Every method blocks (except L{PostgresAppPasswords.peekMainScope}): the
server calls them in its database or hash threads, the C{pop3gw} command
directly.  Database failures raise L{TemporaryFailure}.

An app password is looked up in the database at each login that offers
one (a password of the generated form), so one removed through any node
is refused on every node at the next login, as a changed password is (see
L{pop3gw.pgusers}).  Logins with a main password do not pay a round trip
for the app passwords: the main-password scopes (a few rows: only
restricted users have one) are re-read at most every
L{MAIN_SCOPES_SECONDS}, so a scope change reaches every node within that
time.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from zope.interface import implementer

from pop3gw.address import Address
from pop3gw.apppasswords import (
    AppPassword,
    AppPasswordError,
    checkMainScope,
    checkNew,
    generatePassword,
    looksGenerated,
    passwordId,
)
from pop3gw.interfaces import IAppPasswords, ISendingRecords, TemporaryFailure
from pop3gw.pgdatabase import Database, redact
from pop3gw.sendlimits import (
    DAY,
    DEFAULT_MESSAGES_PER_HOUR,
    DEFAULT_RECIPIENTS_PER_DAY,
    HOUR,
    Limits,
    Records,
    Suspension,
    Usage,
    limitsFromRow,
)

__all__ = ["MAIN_SCOPES_SECONDS", "PostgresAppPasswords", "PostgresSendingLimits", "insertAppPasswords",
           "insertRecords"]

#: How long the main-password scopes read from the database are used
#: before they are read again.
MAIN_SCOPES_SECONDS = 2.0


def _key(user: object) -> str:
    return str(user).lower()


@implementer(IAppPasswords)
class PostgresAppPasswords:
    """
    App passwords and main-password scopes in the database; see the module
    docstring.

    @param clock: for the age of the main scopes read.
    """

    def __init__(self, database: Database, clock: Callable[[], float] = time.monotonic) -> None:
        self.database = database
        self.path = redact(database.uri)
        self._clock = clock
        self._lock = threading.Lock()
        self._scopes: Optional[Dict[str, str]] = None
        self._read = 0.0

    def _row(self, row: tuple) -> AppPassword:
        address, hashed, id, name, scope, created = row
        return AppPassword(Address.parse(address), hashed, id, name, scope, created)

    def find(self, user: Address, password: bytes) -> Optional[AppPassword]:
        """
        See L{IAppPasswords.find}: one query, only for a password of the
        generated form.
        """
        if not looksGenerated(password):
            return None
        with self.database.transaction() as conn:
            row = conn.execute(
                "SELECT address, hash, id, name, scope, created FROM pop3gw_app_passwords "
                "WHERE user_key = %s AND id = %s",
                (_key(user), passwordId(password)),
            ).fetchone()
        return None if row is None else self._row(row)

    def _mainScopes(self) -> Dict[str, str]:
        with self._lock:
            if self._scopes is None or self._clock() - self._read >= MAIN_SCOPES_SECONDS:
                with self.database.transaction() as conn:
                    rows = conn.execute("SELECT user_key, scope FROM pop3gw_main_scopes").fetchall()
                self._scopes = dict(rows)
                self._read = self._clock()
            return self._scopes

    def mainScope(self, user: Address) -> str:
        """
        See L{IAppPasswords.mainScope}: from the scopes read at most
        L{MAIN_SCOPES_SECONDS} ago.
        """
        return self._mainScopes().get(_key(user), "all")

    def peekMainScope(self, user: Address) -> Optional[str]:
        """
        See L{IAppPasswords.peekMainScope}.
        """
        scopes = self._scopes
        if scopes is None or self._clock() - self._read >= MAIN_SCOPES_SECONDS:
            return None
        return scopes.get(_key(user), "all")

    def list(self, user: Address) -> List[AppPassword]:
        """
        See L{IAppPasswords.list}.
        """
        with self.database.transaction() as conn:
            rows = conn.execute(
                "SELECT address, hash, id, name, scope, created FROM pop3gw_app_passwords "
                "WHERE user_key = %s ORDER BY created, name",
                (_key(user),),
            ).fetchall()
        return [self._row(row) for row in rows]

    def listAll(self) -> List[AppPassword]:
        """
        Every app password (C{pop3gw migrate}).
        """
        with self.database.transaction() as conn:
            rows = conn.execute(
                "SELECT address, hash, id, name, scope, created FROM pop3gw_app_passwords ORDER BY created, name"
            ).fetchall()
        return [self._row(row) for row in rows]

    def mainScopes(self) -> List[Tuple[str, str]]:
        """
        C{(user, scope)} for every restricted main password (C{pop3gw
        migrate}).
        """
        with self.database.transaction() as conn:
            return [tuple(r) for r in conn.execute("SELECT address, scope FROM pop3gw_main_scopes ORDER BY address")]

    def add(self, user: Address, name: str, scope: str, hashPassword, now: Optional[float] = None) -> str:
        """
        See L{IAppPasswords.add}.
        """
        checkNew(name, scope)
        with self.database.transaction() as conn:
            # Serialises the changes of one user's app passwords.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("app-passwords " + _key(user),))
            taken = {
                row[0]: row[1]
                for row in conn.execute("SELECT id, name FROM pop3gw_app_passwords WHERE user_key = %s", (_key(user),))
            }
            if name in taken.values():
                raise AppPasswordError(f"{user} already has an app password named {name}")
            while True:
                password = generatePassword()
                if passwordId(password.encode("ascii")) not in taken:
                    break
            conn.execute(
                "INSERT INTO pop3gw_app_passwords (user_key, address, id, name, hash, scope, created) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (_key(user), str(user), passwordId(password.encode("ascii")), name, hashPassword(password), scope,
                 time.time() if now is None else now),
            )
        return password

    def remove(self, user: Address, name: str) -> None:
        """
        See L{IAppPasswords.remove}.
        """
        with self.database.transaction() as conn:
            gone = conn.execute(
                "DELETE FROM pop3gw_app_passwords WHERE user_key = %s AND name = %s", (_key(user), name)
            ).rowcount
            if not gone:
                raise AppPasswordError(f"{user} has no app password named {name}")
            conn.execute("DELETE FROM pop3gw_app_password_use WHERE user_key = %s AND name = %s", (_key(user), name))

    def setMainScope(self, user: Address, scope: str) -> None:
        """
        See L{IAppPasswords.setMainScope}.
        """
        checkMainScope(scope)
        with self.database.transaction() as conn:
            conn.execute("DELETE FROM pop3gw_main_scopes WHERE user_key = %s", (_key(user),))
            if scope != "all":
                conn.execute(
                    "INSERT INTO pop3gw_main_scopes (user_key, address, scope) VALUES (%s, %s, %s)",
                    (_key(user), str(user), scope),
                )
        with self._lock:
            self._scopes = None

    def removeUser(self, user: Address) -> None:
        """
        See L{IAppPasswords.removeUser}.
        """
        with self.database.transaction() as conn:
            for table in ("pop3gw_app_passwords", "pop3gw_main_scopes", "pop3gw_app_password_use"):
                conn.execute(f"DELETE FROM {table} WHERE user_key = %s", (_key(user),))
        with self._lock:
            self._scopes = None


@implementer(ISendingRecords)
class PostgresSendingLimits:
    """
    The sending records in the database: every node counts the messages of
    every node, and a user is suspended (and the postmaster told) once.
    """

    errors: Tuple[type, ...] = (TemporaryFailure,)

    def __init__(
        self,
        database: Database,
        messagesPerHour: int = DEFAULT_MESSAGES_PER_HOUR,
        recipientsPerDay: int = DEFAULT_RECIPIENTS_PER_DAY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.database = database
        self.path = redact(database.uri)
        self.defaults = Limits(messagesPerHour, recipientsPerDay)
        self._clock = clock

    def close(self) -> None:
        """
        Nothing to do: the connections are the pool's.
        """

    def now(self) -> float:
        """
        See L{ISendingRecords.now}.
        """
        return self._clock()

    def _limitsOf(self, conn: Any, key: str) -> Limits:
        row = conn.execute(
            "SELECT messages_per_hour, recipients_per_day FROM pop3gw_limit_overrides WHERE user_key = %s", (key,)
        ).fetchone()
        return limitsFromRow(self.defaults, row)

    def limitsOf(self, user: str) -> Limits:
        """
        See L{ISendingRecords.limitsOf}.
        """
        with self.database.transaction() as conn:
            return self._limitsOf(conn, _key(user))

    def _usage(self, conn: Any, key: str, now: float) -> Usage:
        messages, recipients = conn.execute(
            "SELECT COUNT(*) FILTER (WHERE at > %s), COALESCE(SUM(recipients), 0) "
            "FROM pop3gw_sent WHERE user_key = %s AND at > %s",
            (now - HOUR, key, now - DAY),
        ).fetchone()
        row = conn.execute("SELECT since, reason FROM pop3gw_suspended WHERE user_key = %s", (key,)).fetchone()
        return Usage(self._limitsOf(conn, key), messages, int(recipients), (row[0], row[1]) if row else None)

    def usage(self, user: str) -> Usage:
        """
        See L{ISendingRecords.usage}.
        """
        with self.database.transaction() as conn:
            return self._usage(conn, _key(user), self._clock())

    def admit(self, user: str, accepted: int, client: str) -> Tuple[Optional[str], Optional[Suspension]]:
        """
        See L{ISendingRecords.admit}.
        """
        refusal, suspension, _ = self.admitWithUsage(user, accepted, client)
        return refusal, suspension

    def admitWithUsage(
        self, user: str, accepted: int, client: str, unwritten: Tuple[int, int] = (0, 0)
    ) -> Tuple[Optional[str], Optional[Suspension], Usage]:
        """
        See L{ISendingRecords.admitWithUsage}: one transaction; of two nodes
        refusing the same user at once, only one suspends it.
        """
        key, now = _key(user), self._clock()
        with self.database.transaction() as conn:
            usage = self._usage(conn, key, now).plus(unwritten)
            refusal = usage.refusal(accepted)
            if refusal is None or usage.suspended is not None:
                return refusal, None, usage
            inserted = conn.execute(
                "INSERT INTO pop3gw_suspended (user_key, since, reason) VALUES (%s, %s, %s) "
                "ON CONFLICT (user_key) DO NOTHING",
                (key, now, refusal),
            ).rowcount
            if not inserted:
                return refusal, None, usage
            clients = [row[0] for row in conn.execute(
                "SELECT client FROM pop3gw_sent WHERE user_key = %s AND at > %s GROUP BY client "
                "ORDER BY MAX(at) DESC LIMIT 20",
                (key, now - DAY),
            )]
        if client not in clients:
            clients.insert(0, client)
        suspension = Suspension(user, refusal, tuple(clients), usage.messagesLastHour, usage.recipientsLastDay)
        return refusal, suspension, usage

    def record(self, user: str, recipients: int, client: str) -> None:
        """
        See L{ISendingRecords.record}.
        """
        self.recordMany([(user, self._clock(), recipients, client)])

    def recordMany(self, rows: Iterable[Tuple[str, float, int, str]]) -> None:
        """
        See L{ISendingRecords.recordMany}; records older than a day are
        forgotten.
        """
        with self.database.transaction() as conn:
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO pop3gw_sent (user_key, at, recipients, client) VALUES (%s, %s, %s, %s)",
                    [(_key(user), at, recipients, client) for user, at, recipients, client in rows],
                )
            conn.execute("DELETE FROM pop3gw_sent WHERE at <= %s", (self._clock() - DAY,))

    def unsuspend(self, user: str) -> bool:
        """
        See L{ISendingRecords.unsuspend}.
        """
        with self.database.transaction() as conn:
            was = conn.execute("DELETE FROM pop3gw_suspended WHERE user_key = %s", (_key(user),)).rowcount
            conn.execute("DELETE FROM pop3gw_sent WHERE user_key = %s", (_key(user),))
        return bool(was)

    def setLimits(self, user: str, messagesPerHour: Optional[int] = None, recipientsPerDay: Optional[int] = None,
                  clear: Iterable[str] = ()) -> None:
        """
        See L{ISendingRecords.setLimits}.
        """
        key, clear = _key(user), set(clear)
        with self.database.transaction() as conn:
            conn.execute(
                "INSERT INTO pop3gw_limit_overrides (user_key) VALUES (%s) ON CONFLICT (user_key) DO NOTHING", (key,)
            )
            if messagesPerHour is not None or "messages-per-hour" in clear:
                conn.execute("UPDATE pop3gw_limit_overrides SET messages_per_hour = %s WHERE user_key = %s",
                             (messagesPerHour, key))
            if recipientsPerDay is not None or "recipients-per-day" in clear:
                conn.execute("UPDATE pop3gw_limit_overrides SET recipients_per_day = %s WHERE user_key = %s",
                             (recipientsPerDay, key))
            conn.execute(
                "DELETE FROM pop3gw_limit_overrides WHERE messages_per_hour IS NULL AND recipients_per_day IS NULL"
            )

    def recordUse(self, user: str, name: str, client: str) -> None:
        """
        See L{ISendingRecords.recordUse}.
        """
        with self.database.transaction() as conn:
            conn.execute(
                "INSERT INTO pop3gw_app_password_use (user_key, name, at, client) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (user_key, name) DO UPDATE SET at = excluded.at, client = excluded.client",
                (_key(user), name, self._clock(), client),
            )

    def lastUses(self, user: str) -> Dict[str, Tuple[float, str]]:
        """
        See L{ISendingRecords.lastUses}.
        """
        with self.database.transaction() as conn:
            rows = conn.execute(
                "SELECT name, at, client FROM pop3gw_app_password_use WHERE user_key = %s", (_key(user),)
            ).fetchall()
        return {name: (at, client) for name, at, client in rows}

    def suspendedUsers(self) -> List[Tuple[str, float, str]]:
        """
        See L{ISendingRecords.suspendedUsers}.
        """
        with self.database.transaction() as conn:
            rows = conn.execute("SELECT user_key, since, reason FROM pop3gw_suspended ORDER BY user_key").fetchall()
        return [(user, since, reason) for user, since, reason in rows]

    def export(self) -> Records:
        """
        Every row (C{pop3gw migrate}).
        """
        with self.database.transaction() as conn:
            return Records(
                [tuple(r) for r in conn.execute("SELECT user_key, messages_per_hour, recipients_per_day "
                                                "FROM pop3gw_limit_overrides ORDER BY user_key")],
                [tuple(r) for r in conn.execute(
                    "SELECT user_key, since, reason FROM pop3gw_suspended ORDER BY user_key")],
                [tuple(r) for r in conn.execute(
                    "SELECT user_key, at, recipients, client FROM pop3gw_sent ORDER BY at")],
                [tuple(r) for r in conn.execute(
                    "SELECT user_key, name, at, client FROM pop3gw_app_password_use ORDER BY user_key, name")],
            )


def insertRecords(conn: Any, records: Records) -> None:
    """
    Add C{records} (exported from another store) in C{conn}'s transaction.
    """
    with conn.cursor() as cursor:
        for table, width, rows in (
            ("pop3gw_limit_overrides", 3, records.overrides),
            ("pop3gw_suspended", 3, records.suspended),
            ("pop3gw_sent", 4, records.sent),
            ("pop3gw_app_password_use", 4, records.uses),
        ):
            if rows:
                values = ", ".join(["%s"] * width)
                cursor.executemany(f"INSERT INTO {table} VALUES ({values})",
                                   [(row[0].lower(), *row[1:]) for row in rows])


def insertAppPasswords(conn: Any, passwords: Iterable[AppPassword], mainScopes: Iterable[Tuple[str, str]]) -> None:
    """
    Add app passwords and main-password scopes (from another store) in
    C{conn}'s transaction.
    """
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO pop3gw_app_passwords (user_key, address, id, name, hash, scope, created) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [(_key(e.user), str(e.user), e.id, e.name, e.hashed, e.scope, e.created) for e in passwords],
        )
        cursor.executemany(
            "INSERT INTO pop3gw_main_scopes (user_key, address, scope) VALUES (%s, %s, %s)",
            [(_key(user), str(user), scope) for user, scope in mainScopes],
        )
