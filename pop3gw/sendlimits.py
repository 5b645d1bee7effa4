# -*- test-case-name: tests.test_sendlimits -*-
"""
Per-user sending limits: what keeps a phished password from turning the
server into a spam cannon.

Each message a user submits is recorded (time, recipients, client).  A
user who would go over C{messages-per-hour} or C{recipients-per-day}
(C{[limits]} in the INI file, or the user's own values set with C{pop3gw
user limits}) is refused with C{451 4.7.1} and B{suspended} from sending
(fetching is untouched) until C{pop3gw user unsuspend}; the moment of
suspension is logged and reported to the postmaster once.

The records live in one SQLite database, C{DATA/accounts.sqlite}, so they
survive a restart and are shared by every process on the data directory
(the server's workers and the C{pop3gw} command).  Every method of
L{SendingLimits} blocks: the server calls them through its I/O runner.

The counts are read once per message (at its first recipient), so
sessions sending at the same moment may together go over a limit by the
messages they had in flight; the next message is refused.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import attr
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pop3gw import fsutil
from pop3gw.interfaces import ISendingRecords, SendingLimited

DATABASE = "accounts.sqlite"

#: How long a user's counts read from the records may be reused to let a
#: message through without asking again, when they are under half of
#: each limit; and how many users' counts are kept.
FAST_PATH_SECONDS = 10.0
FAST_PATH_USERS = 10000

#: Seconds a committed message's record may wait, so that the records of
#: messages sent close together are written in one transaction.
RECORD_DELAY = 1.0

#: Seconds between two warnings that the records cannot be used.
UNAVAILABLE_WARNING_INTERVAL = 60.0

HOUR = 3600.0
DAY = 86400.0

#: Default limits; 0 means no limit.
DEFAULT_MESSAGES_PER_HOUR = 200
DEFAULT_RECIPIENTS_PER_DAY = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sent (
    user TEXT NOT NULL,
    at REAL NOT NULL,
    recipients INTEGER NOT NULL,
    client TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sent_user_at ON sent (user, at);
CREATE TABLE IF NOT EXISTS overrides (
    user TEXT PRIMARY KEY,
    messages_per_hour INTEGER,
    recipients_per_day INTEGER
);
CREATE TABLE IF NOT EXISTS app_password_use (
    user TEXT NOT NULL,
    name TEXT NOT NULL,
    at REAL NOT NULL,
    client TEXT NOT NULL,
    PRIMARY KEY (user, name)
);
CREATE TABLE IF NOT EXISTS suspended (
    user TEXT PRIMARY KEY,
    since REAL NOT NULL,
    reason TEXT NOT NULL
);
"""


@attr.s(frozen=True, auto_attribs=True)
class Limits:
    """
    The limits that apply to one user (0: none).

    @ivar own: which of the two are the user's own (C{pop3gw user
        limits}) rather than the defaults, as C{(messages, recipients)}.
    """

    messagesPerHour: int
    recipientsPerDay: int
    own: Tuple[bool, bool] = (False, False)


@attr.s(frozen=True, auto_attribs=True)
class Usage:
    """
    Where one user stands, read at one moment.

    @ivar suspended: C{(since, reason)} while suspended, else C{None}.
    """

    limits: Limits
    messagesLastHour: int
    recipientsLastDay: int
    suspended: Optional[Tuple[float, str]] = None

    def plus(self, unwritten: Tuple[int, int]) -> "Usage":
        """
        This usage with C{(messages, recipients)} sent but not yet in the
        records added.
        """
        if unwritten == (0, 0):
            return self
        return attr.evolve(
            self,
            messagesLastHour=self.messagesLastHour + unwritten[0],
            recipientsLastDay=self.recipientsLastDay + unwritten[1],
        )

    def refusal(self, accepted: int) -> Optional[str]:
        """
        Why one more recipient, after C{accepted} in the message being
        sent, must be refused; C{None} if it may go.
        """
        if self.suspended is not None:
            return "suspended"
        mph, rpd = self.limits.messagesPerHour, self.limits.recipientsPerDay
        if mph and accepted == 0 and self.messagesLastHour + 1 > mph:
            return f"messages-per-hour: {self.messagesLastHour} sent in the last hour, limit {mph}"
        if rpd and self.recipientsLastDay + accepted + 1 > rpd:
            return (f"recipients-per-day: {self.recipientsLastDay + accepted} recipients in the last day, "
                    f"limit {rpd}")
        return None


@attr.s(frozen=True, auto_attribs=True)
class Records:
    """
    Everything the sending records hold, as rows (C{pop3gw migrate}).

    @ivar overrides: C{(user, messages per hour, recipients per day)}, a
        value C{None} where the default applies.
    @ivar suspended: C{(user, since, reason)}.
    @ivar sent: C{(user, at, recipients, client)}.
    @ivar uses: C{(user, app password name, at, client)}.
    """

    overrides: List[Tuple[str, Optional[int], Optional[int]]] = attr.ib(factory=list)
    suspended: List[Tuple[str, float, str]] = attr.ib(factory=list)
    sent: List[Tuple[str, float, int, str]] = attr.ib(factory=list)
    uses: List[Tuple[str, str, float, str]] = attr.ib(factory=list)


@attr.s(frozen=True, auto_attribs=True)
class Suspension:
    """
    A suspension that has just begun: what the postmaster is told.
    """

    user: str
    reason: str
    clients: Tuple[str, ...]
    messagesLastHour: int
    recipientsLastDay: int



def limitsFromRow(defaults: Limits, row: Optional[tuple]) -> Limits:
    """
    A user's limits from a stored row of overrides (messages per hour,
    recipients per day; C{NULL} for the default), or the defaults when
    there is no row.
    """
    if row is None:
        return defaults
    mph, rpd = row
    return Limits(defaults.messagesPerHour if mph is None else mph,
                  defaults.recipientsPerDay if rpd is None else rpd,
                  (mph is not None, rpd is not None))

@implementer(ISendingRecords)
class SendingLimits:
    """
    The sending records of one data directory; see the module docstring
    (L{pop3gw.pgaccounts.PostgresSendingLimits} keeps them in the
    database store).

    Blocking: call from a thread (the server's I/O runner) or the command
    line.
    """

    #: What a failure to use the records raises.
    errors: Tuple[type, ...] = (sqlite3.Error, OSError)

    def __init__(self, dataDir: str, messagesPerHour: int = DEFAULT_MESSAGES_PER_HOUR,
                 recipientsPerDay: int = DEFAULT_RECIPIENTS_PER_DAY, owner: Optional[fsutil.Owner] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = os.path.join(dataDir, DATABASE)
        self.defaults = Limits(messagesPerHour, recipientsPerDay)
        self._owner = owner
        self._clock = clock
        self._local = threading.local()
        self._created = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            with self._created:
                if not os.path.exists(self.path):
                    # Created by pop3gw, so it gets pop3gw's mode and owner;
                    # SQLite gives its -wal and -shm files the same.
                    try:
                        os.close(fsutil.createFile(self.path, self._owner))
                    except FileExistsError:
                        pass
                db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
            self._local.db = db
        return db

    def close(self) -> None:
        """
        Close this thread's connection, if any.
        """
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def limitsOf(self, user: str) -> Limits:
        row = self._db().execute(
            "SELECT messages_per_hour, recipients_per_day FROM overrides WHERE user = ?", (user.lower(),)
        ).fetchone()
        return limitsFromRow(self.defaults, row)

    def usage(self, user: str) -> Usage:
        """
        The user's limits, counts and suspension, now.
        """
        key, now = user.lower(), self._clock()
        db = self._db()
        messages = db.execute("SELECT COUNT(*) FROM sent WHERE user = ? AND at > ?", (key, now - HOUR)).fetchone()[0]
        recipients = db.execute(
            "SELECT COALESCE(SUM(recipients), 0) FROM sent WHERE user = ? AND at > ?", (key, now - DAY)
        ).fetchone()[0]
        row = db.execute("SELECT since, reason FROM suspended WHERE user = ?", (key,)).fetchone()
        return Usage(self.limitsOf(user), messages, recipients, (row[0], row[1]) if row else None)

    def admit(self, user: str, accepted: int, client: str) -> Tuple[Optional[str], Optional[Suspension]]:
        """
        Decide on one more recipient for C{user}, with C{accepted} already
        accepted in the message being sent.

        @return: C{(refusal, suspension)}: C{refusal} says why the
            recipient is refused (C{None}: accepted); C{suspension} is set
            when this decision suspended the user (it was not suspended
            before), for the notice.
        """
        refusal, suspension, _ = self.admitWithUsage(user, accepted, client)
        return refusal, suspension

    def admitWithUsage(
        self, user: str, accepted: int, client: str, unwritten: Tuple[int, int] = (0, 0)
    ) -> Tuple[Optional[str], Optional[Suspension], Usage]:
        """
        L{admit}, and the L{Usage} the decision was made on.

        @param unwritten: C{(messages, recipients)} this process sent that
            are not in the records yet (see L{SendingPolicy.flush}).
        """
        usage = self.usage(user).plus(unwritten)
        refusal = usage.refusal(accepted)
        if refusal is None or usage.suspended is not None:
            return refusal, None, usage
        key, now = user.lower(), self._clock()
        db = self._db()
        inserted = db.execute(
            "INSERT OR IGNORE INTO suspended (user, since, reason) VALUES (?, ?, ?)", (key, now, refusal)
        ).rowcount
        if not inserted:
            return refusal, None, usage  # another process suspended the user first, and told the postmaster
        clients = [row[0] for row in db.execute(
            "SELECT client FROM sent WHERE user = ? AND at > ? GROUP BY client ORDER BY MAX(at) DESC LIMIT 20",
            (key, now - DAY))]
        if client not in clients:
            clients.insert(0, client)
        return refusal, Suspension(user, refusal, tuple(clients), usage.messagesLastHour, usage.recipientsLastDay), usage

    def record(self, user: str, recipients: int, client: str) -> None:
        """
        Note one message sent by C{user} to C{recipients} recipients, and
        forget records older than a day.
        """
        key, now = user.lower(), self._clock()
        db = self._db()
        db.execute("INSERT INTO sent (user, at, recipients, client) VALUES (?, ?, ?, ?)", (key, now, recipients, client))
        db.execute("DELETE FROM sent WHERE at <= ?", (now - DAY,))

    def now(self) -> float:
        """
        The time records are stamped with (POSIX seconds).
        """
        return self._clock()

    def recordMany(self, rows: Iterable[Tuple[str, float, int, str]]) -> None:
        """
        Note several messages, C{(user, at, recipients, client)} each, in
        one transaction, and forget records older than a day.
        """
        db = self._db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO sent (user, at, recipients, client) VALUES (?, ?, ?, ?)",
                [(user.lower(), at, recipients, client) for user, at, recipients, client in rows],
            )
            db.execute("DELETE FROM sent WHERE at <= ?", (self._clock() - DAY,))

    def unsuspend(self, user: str) -> bool:
        """
        Lift a suspension and clear the user's counters.

        @return: whether the user was suspended.
        """
        key = user.lower()
        db = self._db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            was = db.execute("DELETE FROM suspended WHERE user = ?", (key,)).rowcount
            db.execute("DELETE FROM sent WHERE user = ?", (key,))
        return bool(was)

    def setLimits(self, user: str, messagesPerHour: Optional[int] = None, recipientsPerDay: Optional[int] = None,
                  clear: Iterable[str] = ()) -> None:
        """
        Set the user's own limits (C{None}: unchanged); C{clear} names the
        ones (C{"messages-per-hour"}, C{"recipients-per-day"}) that go back
        to the defaults.
        """
        key = user.lower()
        db = self._db()
        clear = set(clear)
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT OR IGNORE INTO overrides (user) VALUES (?)", (key,))
            if messagesPerHour is not None or "messages-per-hour" in clear:
                db.execute("UPDATE overrides SET messages_per_hour = ? WHERE user = ?", (messagesPerHour, key))
            if recipientsPerDay is not None or "recipients-per-day" in clear:
                db.execute("UPDATE overrides SET recipients_per_day = ? WHERE user = ?", (recipientsPerDay, key))
            db.execute("DELETE FROM overrides WHERE messages_per_hour IS NULL AND recipients_per_day IS NULL")

    def recordUse(self, user: str, name: str, client: str) -> None:
        """
        Note that C{user}'s app password C{name} was just used from
        C{client}.
        """
        self._db().execute(
            "INSERT OR REPLACE INTO app_password_use (user, name, at, client) VALUES (?, ?, ?, ?)",
            (user.lower(), name, self._clock(), client),
        )

    def lastUses(self, user: str) -> Dict[str, Tuple[float, str]]:
        """
        When and from where each of C{user}'s app passwords was last used.
        """
        if not os.path.exists(self.path):
            return {}
        rows = self._db().execute("SELECT name, at, client FROM app_password_use WHERE user = ?", (user.lower(),))
        return {name: (at, client) for name, at, client in rows}

    def suspendedUsers(self) -> List[Tuple[str, float, str]]:
        """
        C{(user, since, reason)} for every suspended user.
        """
        if not os.path.exists(self.path):
            return []
        return [tuple(row) for row in self._db().execute("SELECT user, since, reason FROM suspended ORDER BY user")]

    def export(self) -> Records:
        """
        Every row (none if the database was never created).
        """
        if not os.path.exists(self.path):
            return Records()
        db = self._db()
        return Records(
            [tuple(r) for r in db.execute(
                "SELECT user, messages_per_hour, recipients_per_day FROM overrides ORDER BY user")],
            self.suspendedUsers(),
            [tuple(r) for r in db.execute("SELECT user, at, recipients, client FROM sent ORDER BY at")],
            [tuple(r) for r in db.execute("SELECT user, name, at, client FROM app_password_use ORDER BY user, name")],
        )

    def load(self, records: Records) -> None:
        """
        Add C{records} (exported from another store), in one transaction.
        """
        db = self._db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR REPLACE INTO overrides VALUES (?, ?, ?)", records.overrides)
            db.executemany("INSERT OR REPLACE INTO suspended VALUES (?, ?, ?)", records.suspended)
            db.executemany("INSERT INTO sent VALUES (?, ?, ?, ?)", records.sent)
            db.executemany("INSERT OR REPLACE INTO app_password_use VALUES (?, ?, ?, ?)", records.uses)


def noticeMessage(suspension: Suspension, hostname: str, postmaster: str, date: str, messageId: str) -> bytes:
    """
    The notice the postmaster gets when a user is suspended.
    """
    clients = "\n".join(f"  {c}" for c in suspension.clients)
    body = (
        f"pop3gw on {hostname} has suspended sending for {suspension.user}.\n\n"
        f"Reason: {suspension.reason}\n"
        f"Messages sent in the last hour: {suspension.messagesLastHour}\n"
        f"Recipients in the last day: {suspension.recipientsLastDay}\n"
        f"Client addresses (most recent first):\n{clients}\n\n"
        "The user can still fetch mail.  If the password may have been stolen,\n"
        "change it (pop3gw user passwd), then lift the suspension with:\n\n"
        f"  pop3gw user unsuspend {suspension.user}\n"
    )
    headers = (
        f"From: pop3gw <{postmaster}>\n"
        f"To: <{postmaster}>\n"
        f"Subject: sending suspended for {suspension.user}\n"
        f"Date: {date}\n"
        f"Message-ID: {messageId}\n"
        "Auto-Submitted: auto-generated\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n"
    )
    return (headers + "\n" + body).encode("utf-8")


class SendingPolicy:
    """
    The server's side of L{SendingLimits}: the blocking calls run in the
    I/O runner, the decisions are logged, and a new suspension is reported
    to the postmaster through C{notify}.
    """

    log = Logger()

    def __init__(
        self,
        limits: ISendingRecords,
        runner,
        notify: Callable[[Suspension], defer.Deferred],
        clock: Callable[[], float] = time.monotonic,
        reactor: Any = None,
    ) -> None:
        """
        @param runner: an L{pop3gw.interfaces.IBlockingRunner}.
        @param notify: delivers the notice of a new suspension.
        @param clock: for the fast path's age.
        @param reactor: when given, records are written at most
            L{RECORD_DELAY} seconds after their message, several in one
            transaction; without it, each at once.
        """
        self.limits = limits
        self._runner = runner
        self._notify = notify
        self._clock = clock
        self._reactor = reactor
        self._pending: list[Tuple[str, float, int, str]] = []
        self._flushCall: Any = None
        self._lastWarned: Optional[float] = None
        #: user key -> (when read, messages in the hour, recipients in the
        #: day, limits), for users far below their limits.
        self._recent: dict[str, Tuple[float, int, int, Limits]] = {}

    def admit(self, user: str, accepted: int, client: str) -> defer.Deferred:
        """
        Decide on one more recipient (see L{SendingLimits.admit}).  A user
        whose counts, read less than L{FAST_PATH_SECONDS} ago, are under
        half of each limit is let through without asking the records
        again (they are asked again after that, or once half a limit is
        near): the common case costs no thread hop.

        @return: a C{Deferred} firing with C{None}, or failing with
            L{SendingLimited}.
        """
        key = user.lower()
        recent = self._recent.get(key)
        if recent is not None:
            at, messages, recipients, limits = recent
            mph, rpd = limits.messagesPerHour, limits.recipientsPerDay
            if (
                self._clock() - at < FAST_PATH_SECONDS
                and (not mph or 2 * (messages + 1) <= mph)
                and (not rpd or 2 * (recipients + accepted + 1) <= rpd)
            ):
                return defer.succeed(None)
            del self._recent[key]
        unwritten = (
            sum(1 for row in self._pending if row[0].lower() == key),
            sum(row[2] for row in self._pending if row[0].lower() == key),
        )
        d = self._runner.run(self.limits.admitWithUsage, user, accepted, client, unwritten)
        d.addCallbacks(self._decided, self._unavailable, callbackArgs=(user, client))
        return d

    def _unavailable(self, reason) -> None:
        """
        The records cannot be read or written (a full disk, say): the
        recipient is let through, so mail does not stop for the sake of
        its accounting; a warning is logged at most once a minute.
        """
        reason.trap(*self.limits.errors)
        now = time.monotonic()
        if self._lastWarned is None or now - self._lastWarned >= UNAVAILABLE_WARNING_INTERVAL:
            self._lastWarned = now
            error = getattr(reason.value, "strerror", None) or str(reason.value)
            self.log.warn("sending limits unavailable ({error}): not enforced until {path} works again",
                          error=error, path=self.limits.path)

    def _decided(self, decision: Tuple[Optional[str], Optional[Suspension], Usage], user: str, client: str) -> None:
        refusal, suspension, usage = decision
        if refusal is None:
            if usage.suspended is None:
                self._recent[user.lower()] = (
                    self._clock(), usage.messagesLastHour, usage.recipientsLastDay, usage.limits
                )
                if len(self._recent) > FAST_PATH_USERS:
                    self._recent.pop(next(iter(self._recent)))
            return
        if suspension is not None:
            self.log.warn(
                "sending suspended: user={user} rhost={peer} reason={reason}",
                user=user, peer=client, reason=refusal,
            )
            d = defer.maybeDeferred(self._notify, suspension)
            d.addErrback(lambda f: self.log.failure("cannot send the suspension notice for {user}", f, user=user))
        else:
            self.log.info("sending refused: user={user} rhost={peer} reason={reason}",
                          user=user, peer=client, reason=refusal)
        raise SendingLimited(refusal)

    def record(self, user: str, recipients: int, client: str) -> defer.Deferred:
        """
        Note a committed message; a failure to write is logged (the
        message is already accepted).
        """
        recent = self._recent.get(user.lower())
        if recent is not None:
            at, messages, count, limits = recent
            self._recent[user.lower()] = (at, messages + 1, count + recipients, limits)
        self._pending.append((user, self.limits.now(), recipients, client))
        if self._reactor is None:
            return self.flush()
        if self._flushCall is None:
            self._flushCall = self._reactor.callLater(RECORD_DELAY, self.flush)
        return defer.succeed(None)

    def flush(self) -> defer.Deferred:
        """
        Write the records noted since the last flush, in one transaction
        (in the runner); a failure is logged.
        """
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        rows, self._pending = self._pending, []
        if not rows:
            return defer.succeed(None)
        d = self._runner.run(self.limits.recordMany, rows)
        d.addErrback(lambda f: self.log.failure("cannot record {count} messages sent", f, count=len(rows)))
        return d
