"""
Tests for L{pop3gw.auth}: the credentials checker, its cache, the
plaintext policy, the realm and its avatars.
"""

from __future__ import annotations

import base64
import os

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface
from zope.interface.verify import verifyObject

from pop3gw import passwords as passwordsModule
from pop3gw import users as usersModule
from pop3gw.address import Address
from pop3gw.anvil import CHECKS_PER_CLIENT, PENALTY_MAX_DELAY, AuthAccounting
from pop3gw.auth import (
    CACHE_TTL,
    PasswordChecker,
    PlaintextAuthPolicy,
    POP3Avatar,
    Realm,
    SubmissionAvatar,
    VerifiedCredentialsCache,
)
from pop3gw.credentials import ClientCredentials
from pop3gw.interfaces import (
    AuthenticationBusy,
    IPOP3Avatar,
    ISubmissionAvatar,
    TemporaryFailure,
    UnknownUser,
)
from pop3gw.passwords import verifyPassword
from pop3gw.pop3 import POP3Factory
from pop3gw.smtp import SubmissionFactory
from pop3gw.testing import (
    ClockedThreadPool,
    FakeMaildropStore,
    FakeRouter,
    FakeUserDatabase,
    HeldThreadPool,
    ImmediateThreadPool,
)
from pop3gw.users import UsersFile
from tests.util import makeTempDirectory

ALICE = Address("alice", "example.org")
BOB = Address("bob", "example.org")
POSTMASTER = Address("postmaster", "example.org")

# sha512-crypt (fast enough for tests) of "password" and of "hunter2".
HASH_PASSWORD = (
    "{SHA512-CRYPT}$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/"
    "jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/"
)
HASH_ARGON2 = passwordsModule.hashPassword("password")
HASH_HUNTER2 = "{BLF-CRYPT}$2y$05$abcdefghijklmnopqrstuuoXuKqgZXLiJqzfmMXDDhSFPIvxV7t8."
DUMMY = "{TEST}dummy"


class ThreadlessReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} whose C{callFromThread} calls at once.
    """

    def callFromThread(self, f, *args, **kwargs) -> None:
        f(*args, **kwargs)


class SpyVerifier:
    """
    Wraps L{verifyPassword}, recording each (stored, password) call; may
    also advance the clock to simulate a slow hash.
    """

    def __init__(self, clock=None, cost: float = 0.0) -> None:
        self.calls: list = []
        self.clock = clock
        self.cost = cost

    def __call__(self, stored: str, password: bytes) -> bool:
        self.calls.append((stored, password))
        if self.clock is not None and self.cost:
            self.clock.advance(self.cost)
        if stored == DUMMY:
            return False
        return verifyPassword(stored, password)


class PasswordCheckerTests(SynchronousTestCase):
    """
    Tests for L{PasswordChecker}.
    """

    def setUp(self) -> None:
        self.reactor = ThreadlessReactor()
        self.pool = ImmediateThreadPool()
        self.verifier = SpyVerifier()
        directory = makeTempDirectory(self)
        self.usersPath = os.path.join(directory, "users")
        with open(self.usersPath, "w") as f:
            f.write(f"alice@example.org:{HASH_PASSWORD}\n")
        self.users = UsersFile(self.usersPath)
        self.checker = self.makeChecker(self.users)

    def makeChecker(self, users, threadpool=None, accounting=None) -> PasswordChecker:
        return PasswordChecker(
            users,
            self.reactor,
            threadpool or self.pool,
            verifier=self.verifier,
            dummy=lambda: DUMMY,
            accounting=accounting,
        )

    def assertFailsAfterDelay(self, d, delay: float = 2.0) -> None:
        """
        C{d} has no result until C{delay} seconds have passed, then fails
        with a bare L{UnauthorizedLogin}.
        """
        self.assertNoResult(d)
        self.reactor.advance(delay - 0.001)
        self.assertNoResult(d)
        self.reactor.advance(0.001)
        failure = self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(failure.value.args, ())

    def test_interface(self) -> None:
        """
        L{PasswordChecker} provides L{ICredentialsChecker} for username and
        password credentials.
        """
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))
        self.assertTrue(
            verifyObject(
                ICredentialsChecker,
                PasswordChecker(self.users, self.reactor, self.pool),
            )
        )

    def test_success(self) -> None:
        """
        The right password succeeds at once with the normalised address as
        text, for text and for UTF-8 bytes credentials, via the thread pool.
        """
        d = self.checker.requestAvatarId(UsernamePassword("alice@example.org", "password"))
        self.assertEqual(self.successResultOf(d), "alice@example.org")
        self.assertEqual(len(self.pool.calls), 1)
        self.checker.cache = VerifiedCredentialsCache()
        d = self.checker.requestAvatarId(UsernamePassword(b"alice@EXAMPLE.Org", b"password"))
        self.assertEqual(self.successResultOf(d), "alice@example.org")
        # The first login stored an Argon2id hash in place of the old one.
        self.assertEqual(
            self.verifier.calls, [(HASH_PASSWORD, b"password"), (self.users.passwordHash(ALICE), b"password")]
        )

    def test_workRunsInThreadPool(self) -> None:
        """
        Lookup and verification happen in the thread pool, not in
        C{requestAvatarId} itself.
        """
        pool = HeldThreadPool()
        checker = self.makeChecker(self.users, pool)
        d = checker.requestAvatarId(UsernamePassword("alice@example.org", "password"))
        self.assertNoResult(d)
        self.assertEqual(self.verifier.calls, [])
        pool.runAll()
        self.assertEqual(self.successResultOf(d), "alice@example.org")

    def test_boundedPendingChecks(self) -> None:
        """
        Once C{maxPending} password checks are in the pool in all, a login
        of a further client waits without queueing hashing work; when the
        backlog drains, it is checked.
        """
        pool = HeldThreadPool()
        checker = self.makeChecker(self.users, pool, AuthAccounting(self.reactor, maxPending=3))
        waiting = [
            checker.requestAvatarId(ClientCredentials(b"alice@example.org", b"wrong", f"192.0.2.{i}")) for i in range(3)
        ]
        extra = checker.requestAvatarId(ClientCredentials(b"alice@example.org", b"password", "192.0.2.9"))
        self.assertNoResult(extra)
        self.assertEqual(len(pool.pending), 3)
        pool.runAll()
        self.reactor.advance(10)
        for d in waiting:
            self.failureResultOf(d, UnauthorizedLogin)
        pool.runAll()
        self.assertEqual(self.successResultOf(extra), "alice@example.org")

    def test_perClientShare(self) -> None:
        """
        One client (the credentials' C{peer}) gets its share of the pool;
        its further checks wait without taking a thread, then are refused
        at once; another client goes straight to the pool.  Credentials
        without a peer count as one client, C{unknown}.
        """
        pool = HeldThreadPool()
        accounting = AuthAccounting(self.reactor, checksPerClient=2, waitingPerClient=1)
        checker = self.makeChecker(self.users, pool, accounting)
        flood = [
            checker.requestAvatarId(ClientCredentials(b"x", b"wrong", "192.0.2.66")) for _ in range(3)
        ]
        self.assertEqual(len(pool.pending), 2)
        self.failureResultOf(
            checker.requestAvatarId(ClientCredentials(b"x", b"wrong", "192.0.2.66")), AuthenticationBusy
        )
        good = checker.requestAvatarId(ClientCredentials(b"alice@example.org", b"password", "198.51.100.7"))
        self.assertEqual(len(pool.pending), 3)
        pool.runAll()  # the waiting check enters the pool once one of its client's is done
        self.assertEqual(self.successResultOf(good), "alice@example.org")
        self.assertEqual(self.verifier.calls.count((DUMMY, b"wrong")), 3)
        self.reactor.advance(10)
        for d in flood:
            self.failureResultOf(d, UnauthorizedLogin)
        for _ in range(3):
            checker.requestAvatarId(UsernamePassword(b"x", b"wrong"))
        self.assertEqual((accounting.running("unknown"), accounting.held("unknown")), (2, 3))

    def test_failuresDelayNextCheck(self) -> None:
        """
        A client with repeated failures waits before its next check, even
        with the right password (the check is not started before); a
        cached login is not delayed.
        """
        creds = ClientCredentials(b"alice@example.org", b"password", "192.0.2.66")
        self.successResultOf(self.checker.requestAvatarId(creds))
        for i in range(4):
            d = self.checker.requestAvatarId(ClientCredentials(b"alice@example.org", b"guess%d" % (i,), "192.0.2.66"))
            self.reactor.advance(20)
            self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(self.checker.accounting.delayFor("192.0.2.66"), 4.0)
        self.assertEqual(self.successResultOf(self.checker.requestAvatarId(creds)), "alice@example.org")
        self.checker.cache = VerifiedCredentialsCache()
        calls = len(self.pool.calls)
        d = self.checker.requestAvatarId(creds)
        self.reactor.advance(3.9)
        self.assertNoResult(d)
        self.assertEqual(len(self.pool.calls), calls)
        self.reactor.advance(0.1)
        self.assertEqual(self.successResultOf(d), "alice@example.org")

    def test_malformedCredentialsCount(self) -> None:
        """
        Credentials that are not valid UTF-8 count as failures of their
        client.
        """
        for i in range(3):
            d = self.checker.requestAvatarId(ClientCredentials(b"\xff%d" % (i,), b"pw", "192.0.2.66"))
            self.reactor.advance(2)
            self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(self.checker.accounting.delayFor("192.0.2.66"), 2.0)

    def test_clientCredentials(self) -> None:
        """
        L{ClientCredentials} are username/password credentials that name
        the client, and their repr never shows the password.
        """
        creds = ClientCredentials(b"alice@example.org", b"password", "192.0.2.7")
        self.assertTrue(verifyObject(IUsernamePassword, creds))
        self.assertTrue(creds.checkPassword(b"password"))
        self.assertEqual(
            repr(creds), "<ClientCredentials username=b'alice@example.org' peer='192.0.2.7'>"
        )

    def test_successfulLoginsWatched(self) -> None:
        """
        Every successful login, checked or confirmed by the cache, is
        reported to the login watch with the user as stored and the
        client; failed ones are not.
        """
        seen: list = []

        class Watch:
            def loggedIn(self, user: str, peer: str) -> None:
                seen.append((user, peer))

        checker = PasswordChecker(self.users, self.reactor, self.pool, verifier=self.verifier,
                                  dummy=lambda: DUMMY, watch=Watch())
        for peer in ("192.0.2.7", "198.51.100.9"):
            d = checker.requestAvatarId(ClientCredentials(b"ALICE@example.org", b"password", peer))
            self.assertEqual(self.successResultOf(d), "alice@example.org")
        d = checker.requestAvatarId(ClientCredentials(b"alice@example.org", b"wrong", "203.0.113.1"))
        self.reactor.advance(2)
        self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(seen, [("alice@example.org", "192.0.2.7"), ("alice@example.org", "198.51.100.9")])
        # The second login was confirmed by the cache: one hash for it,
        # one for the failure.
        self.assertEqual(len(self.verifier.calls), 2)

    def test_slotHeldUntilCheckFinishes(self) -> None:
        """
        A client that hangs up right after PASS keeps its check counted
        until the check has finished in the pool, so hanging up does not
        free its share; its failure is still logged.
        """
        pool = HeldThreadPool()
        checker = self.makeChecker(self.users, pool)
        store = FakeMaildropStore()
        portal = Portal(Realm(self.users, store, FakeRouter(users=self.users, store=store)), [checker])
        factory = POP3Factory(portal, lambda secure, peer: True, self.reactor)
        peer = IPv4Address("TCP", "192.0.2.66", 40000)
        proto = factory.buildProtocol(peer)
        events: list = []
        proto.log = Logger(observer=events.append)
        proto.makeConnection(StringTransport(peerAddress=peer))
        proto.dataReceived(b"USER alice@example.org\r\nPASS wrong\r\n")
        proto.connectionLost(Failure(ConnectionError()))
        self.assertEqual(checker.accounting.running("192.0.2.66"), 1)
        pool.runAll()
        self.assertEqual(checker.accounting.running("192.0.2.66"), 0)
        self.reactor.advance(2)
        self.assertIn("authentication failed: service=pop3 rhost=192.0.2.66", formatEvent(events[-1]))

    def test_wrongPassword(self) -> None:
        """
        A wrong password fails with L{UnauthorizedLogin} only after the
        failure delay.
        """
        d = self.checker.requestAvatarId(UsernamePassword("alice@example.org", "wrong"))
        self.assertFailsAfterDelay(d)

    def test_customDelay(self) -> None:
        """
        The failure delay is the C{failureDelay} given.
        """
        checker = PasswordChecker(self.users, self.reactor, self.pool, 5.0, verifier=self.verifier, dummy=lambda: DUMMY)
        self.assertFailsAfterDelay(checker.requestAvatarId(UsernamePassword("alice@example.org", "x")), 5.0)

    def test_delayCountsFromStart(self) -> None:
        """
        The delay is measured from the start of the attempt: time spent
        hashing counts towards it, and a hash slower than the delay fails at
        once.
        """
        self.verifier.clock = self.reactor
        self.verifier.cost = 1.5
        d = self.checker.requestAvatarId(UsernamePassword("alice@example.org", "wrong"))
        self.assertFailsAfterDelay(d, 0.5)
        self.verifier.cost = 3.0
        d = self.checker.requestAvatarId(UsernamePassword("alice@example.org", "wrong"))
        self.failureResultOf(d, UnauthorizedLogin)

    def test_unknownUser(self) -> None:
        """
        An unknown user is verified against the dummy hash, so it costs the
        same, and fails after the delay like a wrong password.
        """
        d = self.checker.requestAvatarId(UsernamePassword("nobody@example.org", "password"))
        self.assertEqual(self.verifier.calls, [(DUMMY, b"password")])
        self.assertFailsAfterDelay(d)

    def test_defaultDummyHash(self) -> None:
        """
        By default unknown users are verified against
        L{pop3gw.passwords.DUMMY_HASH}.
        """
        spy = SpyVerifier()
        checker = PasswordChecker(self.users, self.reactor, self.pool, verifier=spy)
        d = checker.requestAvatarId(UsernamePassword("nobody@example.org", "pw"))
        self.assertEqual(spy.calls, [(passwordsModule.DUMMY_HASH, b"pw")])
        self.assertFailsAfterDelay(d)

    def test_unparseableName(self) -> None:
        """
        A login name that is not an address is treated exactly like an
        unknown user, without consulting the users database.
        """
        users = FakeUserDatabase()
        looked: list = []
        users.lookupUser = lambda address: looked.append(address)
        checker = self.makeChecker(users)
        d = checker.requestAvatarId(UsernamePassword("alice", "password"))
        self.assertEqual(self.verifier.calls, [(DUMMY, b"password")])
        self.assertEqual(looked, [])
        self.assertFailsAfterDelay(d)

    def test_invalidUTF8(self) -> None:
        """
        A user name or password that is not valid UTF-8 fails after the
        delay.
        """
        for creds in [
            UsernamePassword(b"alice@example.org", b"\xffpassword"),
            UsernamePassword(b"\xffalice@example.org", b"password"),
        ]:
            self.assertFailsAfterDelay(self.checker.requestAvatarId(creds))

    def test_databaseFault(self) -> None:
        """
        A users database that raises gives L{TemporaryFailure} at once (a
        server fault, logged) rather than a login failure; a
        L{TemporaryFailure} it raises itself is passed through unlogged.
        """

        class Broken(FakeUserDatabase):
            def lookupUser(self, address):
                raise OSError("disk on fire")

        d = self.makeChecker(Broken()).requestAvatarId(UsernamePassword("alice@example.org", "password"))
        self.failureResultOf(d, TemporaryFailure)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

        class Busy(FakeUserDatabase):
            def lookupUser(self, address):
                raise TemporaryFailure("database busy")

        d = self.makeChecker(Busy()).requestAvatarId(UsernamePassword("alice@example.org", "password"))
        self.failureResultOf(d, TemporaryFailure)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_cacheHit(self) -> None:
        """
        A repeat login with the same password skips verification.
        """
        creds = UsernamePassword("alice@example.org", "password")
        self.successResultOf(self.checker.requestAvatarId(creds))
        self.successResultOf(self.checker.requestAvatarId(creds))
        self.successResultOf(self.checker.requestAvatarId(creds))
        self.assertEqual(len(self.verifier.calls), 1)

    def test_cacheHitNeedsNoThread(self) -> None:
        """
        A cached login is confirmed on the reactor thread when the users
        database has the stored hash at hand: no thread pool work at all.
        """
        creds = UsernamePassword("alice@example.org", "password")
        self.successResultOf(self.checker.requestAvatarId(creds))
        self.assertEqual(len(self.pool.calls), 1)
        self.assertEqual(self.successResultOf(self.checker.requestAvatarId(creds)), "alice@example.org")
        self.assertEqual(len(self.pool.calls), 1)

    def test_cacheWithBlockingDatabase(self) -> None:
        """
        With a users database whose lookups would block
        (L{LookupWouldBlock}), even a cached login is confirmed in the
        thread pool, still without verifying the hash again.
        """
        users = FakeUserDatabase({Address("alice", "example.org"): HASH_PASSWORD})
        users.blocking = True
        checker = self.makeChecker(users)
        creds = UsernamePassword("alice@example.org", "password")
        self.successResultOf(checker.requestAvatarId(creds))
        self.successResultOf(checker.requestAvatarId(creds))
        self.assertEqual(len(self.pool.calls), 2)
        self.assertEqual(len(self.verifier.calls), 1)

    def test_cacheNotUsedForOtherPasswords(self) -> None:
        """
        A cached login does not let a different password in, and failures
        are never cached.
        """
        self.successResultOf(self.checker.requestAvatarId(UsernamePassword("alice@example.org", "password")))
        for _ in range(2):
            d = self.checker.requestAvatarId(UsernamePassword("alice@example.org", "passwore"))
            self.assertFailsAfterDelay(d)
        self.assertEqual(len(self.verifier.calls), 3)
        self.assertEqual(len(self.checker.cache), 1)

    def test_cacheInvalidatedByHashChange(self) -> None:
        """
        A cached login stops counting once the user's stored hash changes:
        the old password is verified again, against the new hash, and
        fails.
        """
        creds = UsernamePassword("alice@example.org", "password")
        self.successResultOf(self.checker.requestAvatarId(creds))
        self.users.setPassword(ALICE, HASH_HUNTER2, False)
        self.assertFailsAfterDelay(self.checker.requestAvatarId(creds))
        self.assertEqual(self.verifier.calls[-1], (HASH_HUNTER2, b"password"))
        d = self.checker.requestAvatarId(UsernamePassword("alice@example.org", "hunter2"))
        self.assertEqual(self.successResultOf(d), "alice@example.org")

    def test_cacheInvalidatedByRemoval(self) -> None:
        """
        A removed user cannot log in with a cached password.
        """
        creds = UsernamePassword("alice@example.org", "password")
        self.successResultOf(self.checker.requestAvatarId(creds))
        self.users.remove(ALICE)
        self.assertFailsAfterDelay(self.checker.requestAvatarId(creds))

    def test_cacheInvalidatedByCommand(self) -> None:
        """
        C{pop3gw user passwd} and C{pop3gw user remove}, run while the
        server holds a cached login, take effect at the next login: the old
        password fails after the delay, the new one succeeds, and after
        removal nothing succeeds.
        """
        import io

        from pop3gw import cli

        class Stdin(io.StringIO):
            def isatty(self) -> bool:
                return False

        def run(*args: str, text: str = "") -> int:
            return cli.main(
                ["--data-dir", os.path.dirname(self.usersPath), *args],
                stdin=Stdin(text),
                stdout=io.StringIO(),
                stderr=io.StringIO(),
            )

        old = UsernamePassword("alice@example.org", "password")
        new = UsernamePassword("alice@example.org", "new one")
        self.successResultOf(self.checker.requestAvatarId(old))
        self.successResultOf(self.checker.requestAvatarId(old))
        self.assertEqual(len(self.verifier.calls), 1)
        self.assertEqual(run("user", "passwd", "alice@example.org", text="new one\n"), 0)
        self.assertFailsAfterDelay(self.checker.requestAvatarId(old))
        self.assertEqual(self.successResultOf(self.checker.requestAvatarId(new)), "alice@example.org")
        self.assertEqual(run("user", "remove", "alice@example.org"), 0)
        self.assertFailsAfterDelay(self.checker.requestAvatarId(new))
        self.assertEqual(self.verifier.calls[-1], (DUMMY, b"new one"))

    def test_cacheExpires(self) -> None:
        """
        A cache entry is trusted for less than L{CACHE_TTL} seconds, then the
        password is verified again.
        """
        creds = UsernamePassword("alice@example.org", "password")
        self.successResultOf(self.checker.requestAvatarId(creds))
        self.reactor.advance(CACHE_TTL - 1)
        self.successResultOf(self.checker.requestAvatarId(creds))
        self.assertEqual(len(self.verifier.calls), 1)
        self.reactor.advance(1)
        self.successResultOf(self.checker.requestAvatarId(creds))
        self.assertEqual(len(self.verifier.calls), 2)

    def test_loginInAnyCase(self) -> None:
        """
        A login name in any case logs in the user as stored: the avatar ID
        is the stored spelling, and the verified login is cached under it,
        so another spelling with the same password skips the hash, on the
        reactor thread.
        """
        with open(self.usersPath, "w") as f:
            f.write(f"Alice@example.org:{HASH_ARGON2}\n")
        d = self.checker.requestAvatarId(UsernamePassword("ALICE@Example.ORG", "password"))
        self.assertEqual(self.successResultOf(d), "Alice@example.org")
        self.assertEqual((len(self.verifier.calls), len(self.pool.calls)), (1, 1))
        d = self.checker.requestAvatarId(UsernamePassword(b"alice@example.org", b"password"))
        self.assertEqual(self.successResultOf(d), "Alice@example.org")
        self.assertEqual((len(self.verifier.calls), len(self.pool.calls)), (1, 1))

    def test_rehashAtFirstLogin(self) -> None:
        """
        The first successful login of a user whose hash is in an older
        scheme replaces it in the users file with an Argon2id hash of the
        same password (the other fields of the line kept), logged without
        the hash; the new hash is what the cache remembers, so the next
        login is a cache hit.  A failed login changes nothing.
        """
        events: list = []
        self.patch(usersModule, "_log", Logger(observer=events.append))
        with open(self.usersPath, "w") as f:
            f.write(f"alice@example.org:{HASH_PASSWORD}:1000:1000::/home/alice\n")
        self.assertFailsAfterDelay(self.checker.requestAvatarId(UsernamePassword("alice@example.org", "wrong")))
        self.assertEqual(self.users.passwordHash(ALICE), HASH_PASSWORD)
        d = self.checker.requestAvatarId(UsernamePassword("Alice@example.org", "password"))
        self.assertEqual(self.successResultOf(d), "alice@example.org")
        with open(self.usersPath) as f:
            user, stored, rest = f.read().split(":", 2)
        self.assertEqual((user, rest), ("alice@example.org", "1000:1000::/home/alice\n"))
        self.assertTrue(stored.startswith("{ARGON2ID}$argon2id$"), stored)
        self.assertTrue(verifyPassword(stored, "password"))
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["upgraded the password hash of alice@example.org from SHA512-CRYPT to ARGON2ID"],
        )
        calls = len(self.verifier.calls)
        self.successResultOf(self.checker.requestAvatarId(UsernamePassword("alice@example.org", "password")))
        self.assertEqual(len(self.verifier.calls), calls)

    def test_noRehashOfCurrentScheme(self) -> None:
        """
        A user whose hash is already Argon2 is not rewritten at login.
        """
        with open(self.usersPath, "w") as f:
            f.write(f"alice@example.org:{HASH_ARGON2}\n")
        before = os.stat(self.usersPath)
        self.successResultOf(self.checker.requestAvatarId(UsernamePassword("alice@example.org", "password")))
        after = os.stat(self.usersPath)
        self.assertEqual((after.st_ino, after.st_mtime_ns), (before.st_ino, before.st_mtime_ns))
        self.assertEqual(self.users.passwordHash(ALICE), HASH_ARGON2)

    def test_rehashFailureStillLogsIn(self) -> None:
        """
        If the users file cannot be rewritten, the login succeeds anyway,
        the failure is logged as one error line, and the old hash stays.
        """
        events: list = []
        self.patch(usersModule, "_log", Logger(observer=events.append))

        def fail(src: str, dst: str) -> None:
            raise OSError(28, "No space left on device")

        self.patch(self.users, "_replace", fail)
        d = self.checker.requestAvatarId(UsernamePassword("alice@example.org", "password"))
        self.assertEqual(self.successResultOf(d), "alice@example.org")
        self.assertEqual(self.users.passwordHash(ALICE), HASH_PASSWORD)
        self.assertEqual(
            [formatEvent(e) for e in events],
            [f"cannot upgrade the password hash of alice@example.org in {self.usersPath}: No space left on device"],
        )

    def test_unverifiableSchemeIsNotAFailedLogin(self) -> None:
        """
        A user whose stored hash pop3gw does not accept (plain text,
        CRAM-MD5) is never let in, not even with the password the file
        holds; the refusal is a L{TemporaryFailure} at once (a server-side
        problem, already warned about when the file was loaded), not a
        failed login that fail2ban would count against the real user.
        """
        for stored in ("{PLAIN}hunter9", "{CRAM-MD5}4b4d1e4cbd12d2c8fbd1a4d6b83a4cb3", "hunter9"):
            with open(self.usersPath, "w") as f:
                f.write(f"alice@example.org:{stored}\n")
            d = self.checker.requestAvatarId(UsernamePassword("alice@example.org", "hunter9"))
            message = str(self.failureResultOf(d, TemporaryFailure).value)
            self.assertNotIn("hunter9", message)
            self.assertNotIn("4b4d1e", message)
        self.assertEqual(self.verifier.calls, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_malformedHashIsNotAFailedLogin(self) -> None:
        """
        A user whose hash is in a scheme pop3gw verifies but malformed for
        it (no password can match it) is refused like an unverifiable
        scheme: a L{TemporaryFailure} naming the problem but not the hash,
        nothing verified, no failure counted for the client.
        """
        for stored in ("{ARGON2ID}$argon2id$garbage", "{BLF-CRYPT}notbcrypt", "{SHA256-CRYPT}$5$short",
                       "{SHA512-CRYPT}*0", "{SSHA512}!!notbase64!!", "{SSHA256.hex}zz"):
            with open(self.usersPath, "w") as f:
                f.write(f"alice@example.org:{stored}\n")
            d = self.checker.requestAvatarId(UsernamePassword("alice@example.org", "hunter9"))
            message = str(self.failureResultOf(d, TemporaryFailure).value)
            self.assertEqual(message, "the password hash of alice@example.org is malformed for its scheme", stored)
        self.assertEqual(self.verifier.calls, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_portal(self) -> None:
        """
        With a L{Realm} in a L{Portal}, a login yields a POP3 avatar for the
        user.
        """
        store = FakeMaildropStore()
        portal = Portal(Realm(self.users, store, FakeRouter(users=self.users, store=store)), [self.checker])
        d = portal.login(UsernamePassword(b"alice@example.org", b"password"), None, IPOP3Avatar)
        interface, avatar, logout = self.successResultOf(d)
        self.assertIs(interface, IPOP3Avatar)
        self.assertEqual(avatar.address, ALICE)
        self.assertIsNone(logout())


class VerifiedCredentialsCacheTests(SynchronousTestCase):
    """
    Tests for L{VerifiedCredentialsCache}.
    """

    def test_key(self) -> None:
        """
        Keys are 32-byte MACs that differ per address, per password and per
        cache instance, and never contain the password.
        """
        cache = VerifiedCredentialsCache()
        key = cache.key(ALICE, b"password")
        self.assertEqual(len(key), 32)
        self.assertNotIn(b"password", key)
        self.assertEqual(key, cache.key(ALICE, b"password"))
        self.assertNotEqual(key, cache.key(BOB, b"password"))
        self.assertNotEqual(key, cache.key(ALICE, b"passwore"))
        self.assertNotEqual(key, VerifiedCredentialsCache().key(ALICE, b"password"))

    def test_keyIsKeyedBlake2b(self) -> None:
        """
        A key is the keyed BLAKE2b-256 (RFC 7693's MAC mode) of the address,
        a NUL and the password, under the cache's own random key: computed
        while holding the GIL for input this short, where OpenSSL's HMAC
        lets it go for every call and the reactor thread then waits to get
        it back from the I/O threads.
        """
        import hashlib

        cache = VerifiedCredentialsCache()
        self.assertEqual(
            cache.key(ALICE, b"password"),
            hashlib.blake2b(str(ALICE).encode("utf-8") + b"\0password", key=cache._macKey, digest_size=32).digest(),
        )

    def test_hitRules(self) -> None:
        """
        A hit needs the same stored hash and an age under the TTL; a miss
        for a changed hash drops the entry.
        """
        cache = VerifiedCredentialsCache(ttl=10)
        cache.add(b"k", "{X}a", 100.0)
        self.assertTrue(cache.hit(b"k", "{X}a", 109.9))
        self.assertFalse(cache.hit(b"k", "{X}a", 110.0))
        self.assertFalse(cache.hit(b"k", "{X}a", 100.0))
        cache.add(b"k", "{X}a", 100.0)
        self.assertFalse(cache.hit(b"k", "{X}b", 101.0))
        self.assertEqual(len(cache), 0)
        self.assertFalse(cache.hit(b"other", "{X}a", 101.0))

    def test_evictsOldest(self) -> None:
        """
        Beyond the size limit the oldest entries are evicted.
        """
        cache = VerifiedCredentialsCache(maxSize=2)
        cache.add(b"a", "{X}", 1.0)
        cache.add(b"b", "{X}", 2.0)
        cache.add(b"c", "{X}", 3.0)
        self.assertEqual(len(cache), 2)
        self.assertFalse(cache.hit(b"a", "{X}", 4.0))
        self.assertTrue(cache.hit(b"b", "{X}", 4.0))
        self.assertTrue(cache.hit(b"c", "{X}", 4.0))


class PlaintextAuthPolicyTests(SynchronousTestCase):
    """
    Tests for L{PlaintextAuthPolicy}.
    """

    def test_modes(self) -> None:
        """
        TLS always allows; C{always} allows anywhere; C{loopback} allows
        loopback peers only; C{never} refuses without TLS.
        """
        cases = [
            ("never", True, "192.0.2.1", True),
            ("never", False, "127.0.0.1", False),
            ("loopback", False, "127.0.0.1", True),
            ("loopback", False, "127.1.2.3", True),
            ("loopback", False, "::1", True),
            ("loopback", False, "192.0.2.1", False),
            ("loopback", False, "2001:db8::1", False),
            ("loopback", True, "192.0.2.1", True),
            ("always", False, "192.0.2.1", True),
        ]
        for mode, secure, host, expected in cases:
            self.assertEqual(PlaintextAuthPolicy(mode).allows(secure, host), expected, (mode, secure, host))

    def test_badMode(self) -> None:
        """
        An unknown mode is a L{ValueError}.
        """
        self.assertRaises(ValueError, PlaintextAuthPolicy, "sometimes")


class RealmTests(SynchronousTestCase):
    """
    Tests for L{Realm} and its avatars.
    """

    def setUp(self) -> None:
        self.users = FakeUserDatabase({ALICE: HASH_PASSWORD, BOB: HASH_HUNTER2}, {POSTMASTER: ALICE})
        self.store = FakeMaildropStore()
        self.router = FakeRouter(users=self.users, store=self.store)
        self.realm = Realm(self.users, self.store, self.router)

    def test_interface(self) -> None:
        """
        L{Realm} provides L{IRealm}.
        """
        self.assertTrue(verifyObject(IRealm, self.realm))

    def test_pop3Avatar(self) -> None:
        """
        An L{IPOP3Avatar} request gives the user's POP3 avatar, whose
        maildrop is the store's maildrop for that address; text and bytes
        avatar IDs both work.
        """
        for avatarId in ["alice@example.org", b"alice@example.org"]:
            interface, avatar, logout = self.realm.requestAvatar(avatarId, None, IPOP3Avatar)
            self.assertIs(interface, IPOP3Avatar)
            self.assertTrue(verifyObject(IPOP3Avatar, avatar))
            self.assertIsInstance(avatar, POP3Avatar)
            self.assertEqual(avatar.address, ALICE)
            self.assertIsNone(logout())
        self.store.add(ALICE, b"Subject: hi\n\nbody\n")
        drop = self.successResultOf(avatar.openMaildrop())
        self.assertEqual(len(drop.messages), 1)
        self.assertIn(ALICE, self.store.locked)

    def test_submissionAvatar(self) -> None:
        """
        An L{ISubmissionAvatar} request gives the user's submission avatar:
        it may send as its own address and aliases only, and recipient
        checks and deliveries go to the router.
        """
        interface, avatar, logout = self.realm.requestAvatar("alice@example.org", None, ISubmissionAvatar)
        self.assertIs(interface, ISubmissionAvatar)
        self.assertTrue(verifyObject(ISubmissionAvatar, avatar))
        self.assertIsInstance(avatar, SubmissionAvatar)
        self.assertTrue(avatar.mayUseSender(ALICE))
        self.assertTrue(avatar.mayUseSender(POSTMASTER))
        self.assertFalse(avatar.mayUseSender(BOB))
        self.assertEqual(avatar.checkRecipient(POSTMASTER), (ALICE,))
        remote = Address("x", "elsewhere.example")
        self.assertEqual(avatar.checkRecipient(remote), (remote,))
        self.assertRaises(UnknownUser, avatar.checkRecipient, Address("nobody", "example.org"))
        delivery = avatar.beginDelivery(ALICE, [BOB, remote], b"Received: x\r\n")
        delivery.write(b"body\r\n")
        self.successResultOf(delivery.commit())
        self.assertEqual(self.store.boxes[BOB][0][1], b"Received: x\r\nbody\r\n")
        self.assertEqual(self.router.queue.entries, [(ALICE, [remote], b"Received: x\r\nbody\r\n")])

    def test_submissionAvatarPrefetchesSenders(self) -> None:
        """
        The submission avatar takes what its user may send as from the
        directory once, at login: C{mayUseSender} then asks the directory
        nothing (it may run for every C{MAIL FROM} and C{From:} on the
        reactor thread), and an alias added later counts from the next
        login.
        """
        _, avatar, _ = self.realm.requestAvatar("alice@example.org", None, ISubmissionAvatar)
        abuse = Address("abuse", "example.org")
        self.users.aliases[abuse] = ALICE

        def noLookups():
            raise AssertionError("the directory was asked after login")

        snapshot = self.users.snapshot
        self.users.snapshot = noLookups
        self.assertTrue(avatar.mayUseSender(Address("PostMaster", "example.org")))
        self.assertFalse(avatar.mayUseSender(abuse))
        self.users.snapshot = snapshot
        _, avatar, _ = self.realm.requestAvatar("alice@example.org", None, ISubmissionAvatar)
        self.assertTrue(avatar.mayUseSender(abuse))

    def test_firstSupportedInterface(self) -> None:
        """
        Unsupported interfaces are skipped; the first supported one is
        used.
        """

        class IOther(Interface):
            pass

        interface, avatar, _ = self.realm.requestAvatar("bob@example.org", None, IOther, ISubmissionAvatar, IPOP3Avatar)
        self.assertIs(interface, ISubmissionAvatar)
        self.assertEqual(avatar.address, BOB)

    def test_unsupportedInterface(self) -> None:
        """
        A request for no supported interface raises L{NotImplementedError}.
        """

        class IOther(Interface):
            pass

        self.assertRaises(NotImplementedError, self.realm.requestAvatar, "alice@example.org", None, IOther)


class FloodTests(SynchronousTestCase):
    """
    A flood of wrong passwords from one client (an address, or a whole
    IPv6 /64), at 32 connections that each send one guess and hang up at
    once, does not keep other clients' users out: POP3 and submission
    logins share one accounting, and each client has its own share of the
    hash threads.
    """

    #: Seconds of hash time per check in the fake pool (twice what the
    #: default Argon2id costs on a small machine).
    COST = 0.1
    #: Seconds between two rounds of the flood's 32 connections.
    TICK = 0.05
    #: Seconds the flood lasts; the good logins start one second in.
    FLOOD = 8.0
    GOOD_PEER = "198.51.100.7"

    def setUp(self) -> None:
        self.reactor = ThreadlessReactor()
        self.pool = ClockedThreadPool(self.reactor, threads=2, cost=self.COST)
        self.users = FakeUserDatabase({Address(f"u{i}", "example.org"): HASH_PASSWORD for i in range(1, 11)})
        store = FakeMaildropStore()
        self.checker = PasswordChecker(self.users, self.reactor, self.pool, verifier=SpyVerifier(), dummy=lambda: DUMMY)
        portal = Portal(Realm(self.users, store, FakeRouter(users=self.users, store=store)), [self.checker])
        self.pop3 = POP3Factory(portal, lambda secure, peer: True, self.reactor)
        self.smtp = SubmissionFactory(portal, lambda secure, peer: True, self.reactor, "mail.example.org")
        self.attempts = 0

    def open(self, factory, host: str):
        address = IPv6Address("TCP", host, 40000) if ":" in host else IPv4Address("TCP", host, 40000)
        proto = factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        proto.makeConnection(transport)
        return proto, transport

    def guess(self, host: str, samePassword: bool) -> None:
        """
        One flood connection: one wrong password (POP3 or submission, in
        turn), then hang up without waiting for the answer.
        """
        self.attempts += 1
        password = b"wrong" if samePassword else b"wrong%d" % (self.attempts,)
        if self.attempts % 2:
            proto, _ = self.open(self.pop3, host)
            proto.dataReceived(b"USER x\r\nPASS " + password + b"\r\n")
        else:
            proto, _ = self.open(self.smtp, host)
            proto.dataReceived(b"EHLO x\r\nAUTH PLAIN " + base64.b64encode(b"\0x\0" + password) + b"\r\n")
        proto.connectionLost(Failure(ConnectionError()))

    def flood(self, floodHosts, samePassword: bool) -> dict:
        """
        Run the flood from C{floodHosts} (one per connection, in turn) and,
        one second in, log in users u1 to u10 from L{GOOD_PEER} at once
        (u1-u5 over POP3, u6-u10 over submission).

        @return: each good user's login time (seconds from its start), or
            its last reply if it did not get in.
        """
        good: dict = {}
        started = None
        for tick in range(int(self.FLOOD / self.TICK)):
            for connection in range(32):
                self.guess(floodHosts[(tick * 32 + connection) % len(floodHosts)], samePassword)
            if tick == int(1.0 / self.TICK):
                started = self.reactor.seconds()
                for i in range(1, 11):
                    user = b"u%d@example.org" % (i,)
                    if i <= 5:
                        proto, transport = self.open(self.pop3, self.GOOD_PEER)
                        proto.dataReceived(b"USER " + user + b"\r\nPASS password\r\n")
                    else:
                        proto, transport = self.open(self.smtp, self.GOOD_PEER)
                        response = base64.b64encode(b"\0" + user + b"\0password")
                        proto.dataReceived(b"EHLO c\r\nAUTH PLAIN " + response + b"\r\n")
                    good[user] = transport
            self.reactor.advance(self.TICK)
            for user, transport in list(good.items()):
                if isinstance(transport, StringTransport) and (
                    b"+OK Logged in." in transport.value() or b"235 2.7.0" in transport.value()
                ):
                    good[user] = self.reactor.seconds() - started
        self.reactor.advance(60)
        return {user: (value if isinstance(value, float) else value.value()) for user, value in good.items()}

    def assertAllIn(self, results: dict, within: float = 3.0) -> None:
        self.assertEqual(len(results), 10)
        for user, result in results.items():
            self.assertIsInstance(result, float, f"{user!r} got {result!r}")
            self.assertLessEqual(result, within, user)

    def test_floodFromOneAddress(self) -> None:
        """
        32 connections from one address, each sending C{USER x}/C{PASS
        wrong} and hanging up: ten users from another address all log in,
        each within 3 s, while the flood never has more than its share in
        the hash pool.
        """
        results = self.flood(["192.0.2.66"], samePassword=True)
        self.assertAllIn(results)
        self.assertGreater(self.attempts, 5000)
        self.assertLessEqual(self.pool.mostQueued, 2 * CHECKS_PER_CLIENT)

    def test_floodFromManyClients(self) -> None:
        """
        The same flood from 32 clients at once (addresses without a failure
        penalty, as on loopback, so each keeps its share busy), with the
        hash threads full all the time: the ten users from elsewhere are
        not refused but wait their turns, which go round the clients, and
        all log in.
        """
        hosts = [f"127.0.1.{i}" for i in range(1, 33)]
        results = self.flood(hosts, samePassword=False)
        self.assertAllIn(results, within=self.FLOOD - 1.0)
        self.assertLessEqual(self.pool.mostQueued, self.checker.accounting.maxPending)

    def test_floodFromOne64(self) -> None:
        """
        The same flood spread over many addresses of one IPv6 /64, each
        guess a new password: the /64 is one client, its penalty grows, and
        ten users from elsewhere all log in, each within 3 s.
        """
        hosts = [f"2001:db8:bad:1::{i:x}" for i in range(1, 200)]
        results = self.flood(hosts, samePassword=False)
        self.assertAllIn(results)
        self.assertEqual(self.checker.accounting.delayFor("2001:db8:bad:1::1"), PENALTY_MAX_DELAY)
