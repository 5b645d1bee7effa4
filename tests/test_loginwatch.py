"""
Tests for L{pop3gw.loginwatch}: warnings about logins that look like a
stolen password.
"""

import json
import os
import shutil
import stat
import tempfile

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pop3gw import loginwatch
from pop3gw.interfaces import ILoginHistory
from pop3gw.loginwatch import LoginHistoryFile, LoginWatch, mergeHistories, networkOf
from pop3gw.runner import ImmediateRunner

DAY = 86400.0
START = 1_780_000_000.0


class Wallclock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def warnings(events) -> list:
    return [formatEvent(e) for e in events if formatEvent(e).startswith("login warning:")]


class NetworkTests(SynchronousTestCase):
    def test_networks(self) -> None:
        """
        IPv4 clients are grouped by /16, IPv6 by /48 (IPv4-mapped as
        IPv4); loopback, Unix and unknown clients are not watched.
        """
        self.assertEqual(networkOf("203.0.113.9"), "203.0.0.0/16")
        self.assertEqual(networkOf("2001:db8:1:2::5"), "2001:db8:1::/48")
        self.assertEqual(networkOf("::ffff:198.51.100.7"), "198.51.0.0/16")
        for peer in ("127.0.0.1", "::1", "unix", "unknown", "not-an-address"):
            self.assertIsNone(networkOf(peer), peer)


class WatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.wallclock = Wallclock()
        self.watch = LoginWatch(self.clock, wallclock=self.wallclock)

    def login(self, peer: str, user: str = "alice@example.org") -> list:
        with capturedLogs() as events:
            self.watch.loggedIn(user, peer)
        return warnings(events)

    def test_burstOfNetworks(self) -> None:
        """
        Logins of one user from four /16 networks within an hour give one
        warning naming the user, the count and one address per network;
        more logins in the same hour give no second warning; other
        addresses of a network already seen do not count.
        """
        self.assertEqual(self.login("203.0.113.1"), [])
        self.assertEqual(self.login("203.0.7.7"), [])
        self.clock.advance(600)
        self.assertEqual(self.login("198.51.100.2"), [])
        self.assertEqual(self.login("192.0.2.3"), [])
        self.assertEqual(
            self.login("2001:db8:1::4"),
            ["login warning: many networks: user=alice@example.org networks=4 window=3600s "
             "rhosts=203.0.113.1,198.51.100.2,192.0.2.3,2001:db8:1::4"],
        )
        self.assertEqual(self.login("100.64.0.1"), [])

    def test_burstWindow(self) -> None:
        """
        Four networks spread over more than an hour are no burst; the
        users are counted apart.
        """
        for i, peer in enumerate(("203.0.113.1", "198.51.100.2", "192.0.2.3")):
            self.assertEqual(self.login(peer), [])
            self.assertEqual(self.login(f"10.{i}.0.1", user="bob@example.org"), [])
        self.clock.advance(3601)
        self.assertEqual(self.login("100.64.0.1"), [])

    def test_newNetworkAfterSettled(self) -> None:
        """
        After 30 days of logins from one network, a login from another
        gives one warning (naming the usual network and since when); the
        next login from it gives none.
        """
        self.assertEqual(self.login("203.0.113.1"), [])
        for _ in range(40):
            self.wallclock.now += DAY
            self.assertEqual(self.login("203.0.113.1"), [])
        self.assertEqual(
            self.login("198.51.100.2"),
            ["login warning: new network: user=alice@example.org rhost=198.51.100.2 network=198.51.0.0/16 "
             "usual=203.0.0.0/16 since=2026-05-28"],
        )
        self.assertEqual(self.login("198.51.100.9"), [])

    def test_newUserNotWarned(self) -> None:
        """
        A user with less than 30 days of history may log in from new
        networks without a warning.
        """
        self.assertEqual(self.login("203.0.113.1"), [])
        self.wallclock.now += 29 * DAY
        self.assertEqual(self.login("198.51.100.2"), [])

    def test_forgottenNetwork(self) -> None:
        """
        A network unseen for 180 days is new again.
        """
        self.login("203.0.113.1")
        self.wallclock.now += 40 * DAY
        self.login("198.51.100.2")
        self.wallclock.now += 181 * DAY
        self.login("198.51.100.2")
        self.wallclock.now += 40 * DAY
        self.assertEqual(len(self.login("203.0.113.1")), 1)

    def test_loopbackIgnored(self) -> None:
        """
        Loopback logins neither warn nor enter the history.
        """
        for host in ("127.0.0.1", "127.0.0.2", "::1", "unix"):
            self.assertEqual(self.login(host), [])
        self.assertEqual(self.watch.history, {})


class HistoryStoreContract:
    """
    What every L{ILoginHistory} does, through L{LoginWatch}; C{store}
    returns a new instance on the test's one store (as another process or
    node has).
    """

    def setUp(self) -> None:
        self.wallclock = Wallclock()

    def store(self) -> ILoginHistory:
        raise NotImplementedError()

    def watch(self) -> LoginWatch:
        watch = LoginWatch(Clock(), runner=ImmediateRunner(), wallclock=self.wallclock, store=self.store())
        watch.load()
        return watch

    def test_interface(self) -> None:
        """
        The store provides L{ILoginHistory}.
        """
        self.assertTrue(verifyObject(ILoginHistory, self.store()))

    def test_survivesRestart(self) -> None:
        """
        The history is saved and read back by the next process: a network
        from before the restart is not new, and a settled user's new
        network still warns.
        """
        first = self.watch()
        first.loggedIn("alice@example.org", "203.0.113.1")
        self.successResultOf(first.save())
        self.wallclock.now += 40 * DAY
        second = self.watch()
        with capturedLogs() as events:
            second.loggedIn("alice@example.org", "203.0.113.50")
            second.loggedIn("alice@example.org", "198.51.100.2")
        self.assertEqual(len(warnings(events)), 1)
        self.assertIn("network=198.51.0.0/16", warnings(events)[0])

    def test_mergedWithOtherProcess(self) -> None:
        """
        Saving merges with what another process wrote meanwhile, and takes
        it in: a network one process saw is not new to the other.
        """
        one, two = self.watch(), self.watch()
        one.loggedIn("alice@example.org", "203.0.113.1")
        two.loggedIn("bob@example.org", "198.51.100.2")
        self.successResultOf(one.save())
        self.successResultOf(two.save())
        self.assertEqual(sorted(self.store().read()), ["alice@example.org", "bob@example.org"])
        self.assertIn("alice@example.org", two.history)
        self.wallclock.now += 40 * DAY
        with capturedLogs() as events:
            two.loggedIn("alice@example.org", "203.0.113.7")
        self.assertEqual(warnings(events), [])

    def test_loadLater(self) -> None:
        """
        L{LoginWatch.loadLater} reads the stored history in the runner and
        merges it with the logins seen before it came back: both count.
        """
        first = self.watch()
        first.loggedIn("alice@example.org", "203.0.113.1")
        self.successResultOf(first.save())
        later = LoginWatch(Clock(), runner=ImmediateRunner(), wallclock=self.wallclock, store=self.store())
        later.loggedIn("bob@example.org", "198.51.100.2")
        self.successResultOf(later.loadLater())
        self.assertEqual(sorted(later.history), ["alice@example.org", "bob@example.org"])
        self.assertEqual(list(later.history["alice@example.org"]), ["203.0.0.0/16"])


class PersistenceTests(HistoryStoreContract, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "logins.json")

    def store(self) -> LoginHistoryFile:
        return LoginHistoryFile(self.path)

    def test_onlyChangedUsersWritten(self) -> None:
        """
        A save hands the store only the users whose history changed since
        the last save (their whole history), not everyone's.
        """
        merged: list = []
        store = self.store()

        class Recording:
            where = store.where
            read = store.read

            def merge(self, changes, now):
                merged.append(sorted(changes))
                return store.merge(changes, now)

        watch = LoginWatch(Clock(), runner=ImmediateRunner(), wallclock=self.wallclock, store=Recording())
        watch.loggedIn("alice@example.org", "203.0.113.1")
        watch.loggedIn("bob@example.org", "198.51.100.2")
        self.successResultOf(watch.save())
        watch.loggedIn("bob@example.org", "192.0.2.1")
        watch.loggedIn("alice@example.org", "203.0.113.9")
        self.successResultOf(watch.save())
        self.assertEqual(merged, [["alice@example.org", "bob@example.org"], ["bob@example.org"]])

    def test_fileMode(self) -> None:
        """
        The history file is written mode 0600, as C{{"version": 1,
        "users": ...}}.
        """
        watch = LoginWatch(Clock(), self.path, ImmediateRunner(), wallclock=self.wallclock)
        watch.loggedIn("alice@example.org", "203.0.113.1")
        self.successResultOf(watch.save())
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path) as f:
            self.assertEqual(json.load(f), {"version": 1, "users": {"alice@example.org": {
                "203.0.0.0/16": [START, START]}}})

    def test_unchangedNotWritten(self) -> None:
        """
        A save with nothing new writes nothing.
        """
        watch = LoginWatch(Clock(), self.path, ImmediateRunner(), wallclock=self.wallclock)
        watch.load()
        self.successResultOf(watch.save())
        self.assertFalse(os.path.exists(self.path))

    def test_malformedFile(self) -> None:
        """
        A malformed history file is logged and replaced by a new history.
        """
        with open(self.path, "w") as f:
            f.write("{not json")
        with capturedLogs() as events:
            watch = LoginWatch(Clock(), self.path, ImmediateRunner(), wallclock=self.wallclock)
            watch.load()
        self.assertEqual(watch.history, {})
        self.assertTrue(any("unreadable" in formatEvent(e) for e in events))

    def test_mergeDropsOld(self) -> None:
        """
        Merging keeps the earliest first-seen and latest last-seen, and
        drops networks unseen for longer than the history keeps them.
        """
        now = START + 400 * DAY
        merged = mergeHistories(
            {"a": {"n1": [START + 300 * DAY, now], "old": [START, START]}},
            {"a": {"n1": [START + 250 * DAY, START + 260 * DAY]}, "b": {"old": [START, START + DAY]}},
            now,
        )
        self.assertEqual(merged, {"a": {"n1": [START + 250 * DAY, now]}})
        self.assertEqual(loginwatch.HISTORY_KEEP, 180 * DAY)


class PostgresHistoryTests(HistoryStoreContract, SynchronousTestCase):
    """
    The contract over L{pop3gw.pglogins.PostgresLoginHistory}: each
    instance is another node on the same database.
    """

    def setUp(self) -> None:
        from tests.test_pgstore import newDatabase

        super().setUp()
        self.database = newDatabase(self)

    def store(self):
        from pop3gw.pglogins import PostgresLoginHistory

        return PostgresLoginHistory(self.database)

    def test_databaseDown(self) -> None:
        """
        A database that cannot be reached at start-up is logged and the
        history starts empty; a failed save is logged and retried at the
        next one.
        """
        from pop3gw.pgdatabase import Database
        from pop3gw.pglogins import PostgresLoginHistory

        socketDir = tempfile.mkdtemp(prefix="pop3gw-nopg-")
        self.addCleanup(os.rmdir, socketDir)
        down = Database(f"postgresql:///nothing?host={socketDir}", timeout=0.5)
        self.addCleanup(down.close)
        watch = LoginWatch(Clock(), runner=ImmediateRunner(), wallclock=self.wallclock,
                           store=PostgresLoginHistory(down))
        with capturedLogs() as events:
            watch.load()
            watch.loggedIn("alice@example.org", "203.0.113.1")
            self.successResultOf(watch.save())
        self.assertEqual([formatEvent(e).split(":")[0] for e in events],
                         ["cannot read the login history postgresql", "cannot write login history postgresql"])
        watch._store = self.store()
        self.successResultOf(watch.save())
        self.assertEqual(list(self.store().read()), ["alice@example.org"])
