"""
Tests for L{pop3gw.apppasswords}: scoped app passwords, the main
password's scope, the checker's use of them, and the command line.
"""

import io
import os

from twisted.cred.error import UnauthorizedLogin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pop3gw import cli
from pop3gw.address import Address
from pop3gw.apppasswords import (
    AppPasswordError,
    AppPasswords,
    covers,
    generatePassword,
    looksGenerated,
)
from pop3gw.auth import PasswordChecker
from pop3gw.credentials import ClientCredentials
from pop3gw.interfaces import IAppPasswords, TemporaryFailure
from pop3gw.passwords import hashPassword
from pop3gw.testing import FakeUserDatabase, ImmediateThreadPool
from pop3gw.users import UsersFile
from tests.test_auth import DUMMY, HASH_PASSWORD, SpyVerifier, ThreadlessReactor
from tests.util import makeTempDirectory

ALICE = Address("alice", "example.org")


class FormatTests(SynchronousTestCase):
    def test_generated(self) -> None:
        """
        Generated passwords are four groups of five from the 32-letter
        alphabet, differ each time, and are recognised by their form.
        """
        seen = {generatePassword() for _ in range(200)}
        self.assertEqual(len(seen), 200)
        for password in seen:
            self.assertTrue(looksGenerated(password.encode()), password)
            self.assertRegex(password, r"^[a-km-np-z2-9]{5}(-[a-km-np-z2-9]{5}){3}$")
        for other in (b"password", b"abcde-fghij-kmnpq", b"abcde-fghij-kmnpq-rstu1", b"ABCDE-fghij-kmnpq-rstuv"):
            self.assertFalse(looksGenerated(other), other)

    def test_covers(self) -> None:
        """
        A scope covers its own service; C{all} every one; C{none} none; a
        service that does not name itself only C{all}.
        """
        self.assertTrue(covers("pop3", "pop3"))
        self.assertFalse(covers("pop3", "submission"))
        self.assertTrue(covers("all", "submission"))
        self.assertTrue(covers("all", None))
        self.assertFalse(covers("pop3", None))
        self.assertFalse(covers("none", "pop3"))


class AppPasswordsContract:
    """
    What every L{pop3gw.interfaces.IAppPasswords} does; C{setUp} sets
    C{self.apps} and C{self.other} (a second instance on the same store,
    as another node or process has).
    """

    apps: IAppPasswords
    other: IAppPasswords

    def test_interface(self) -> None:
        """
        The store provides L{IAppPasswords}.
        """
        self.assertTrue(verifyObject(IAppPasswords, self.apps))

    def test_addListRemove(self) -> None:
        """
        An added app password is found by its first group (whatever the
        case of the user); removing it by name removes only it.
        """
        phone = self.apps.add(ALICE, "phone", "pop3", lambda p: "{PLAIN}" + p, now=1764547200)
        laptop = self.apps.add(ALICE, "laptop", "all", lambda p: "{PLAIN}" + p, now=1764547300)
        self.assertEqual(
            [(e.name, e.scope, e.created, e.hashed, e.id) for e in self.apps.list(ALICE)],
            [("phone", "pop3", 1764547200, "{PLAIN}" + phone, phone[:5]),
             ("laptop", "all", 1764547300, "{PLAIN}" + laptop, laptop[:5])],
        )
        self.assertEqual(self.apps.find(Address("ALICE", "example.org"), laptop.encode()).name, "laptop")
        self.assertIsNone(self.apps.find(ALICE, b"password"))
        self.apps.remove(ALICE, "phone")
        self.assertIsNone(self.apps.find(ALICE, phone.encode()))
        self.assertEqual([e.name for e in self.apps.list(ALICE)], ["laptop"])

    def test_refusals(self) -> None:
        """
        A bad name, a bad scope, a name taken, removing what is not there:
        each an L{AppPasswordError} with the reason, nothing changed.
        """
        self.apps.add(ALICE, "phone", "pop3", lambda p: "{PLAIN}" + p)
        before = self.apps.list(ALICE)
        for name, scope in (("bad name", "pop3"), ("ok", "imap"), ("phone", "all")):
            self.assertRaises(AppPasswordError, self.apps.add, ALICE, name, scope, lambda p: "{PLAIN}" + p)
        e = self.assertRaises(AppPasswordError, self.apps.remove, ALICE, "tablet")
        self.assertEqual(str(e), "alice@example.org has no app password named tablet")
        self.assertRaises(AppPasswordError, self.apps.setMainScope, ALICE, "imap")
        self.assertEqual(self.apps.list(ALICE), before)

    def test_mainScope(self) -> None:
        """
        The main password's scope is C{all} unless restricted; C{all}
        removes the restriction again.
        """
        self.assertEqual(self.apps.mainScope(ALICE), "all")
        self.apps.setMainScope(ALICE, "none")
        self.assertEqual(self.apps.mainScope(ALICE), "none")
        self.assertEqual(self.apps.peekMainScope(ALICE), "none")
        self.apps.setMainScope(ALICE, "all")
        self.assertEqual(self.apps.mainScope(ALICE), "all")

    def test_removeUser(self) -> None:
        """
        Removing a user forgets its app passwords and scope, not another
        user's.
        """
        bob = Address("bob", "example.org")
        self.apps.add(ALICE, "phone", "pop3", lambda p: "{PLAIN}" + p)
        kept = self.apps.add(bob, "phone", "pop3", lambda p: "{PLAIN}" + p)
        self.apps.setMainScope(ALICE, "none")
        self.apps.removeUser(ALICE)
        self.assertEqual((self.apps.list(ALICE), self.apps.mainScope(ALICE)), ([], "all"))
        self.assertEqual(self.apps.find(bob, kept.encode()).name, "phone")

    def test_removedElsewhere(self) -> None:
        """
        An app password removed through another instance (another node) is
        not found at the next look-up, even right after it was found.
        """
        phone = self.apps.add(ALICE, "phone", "pop3", lambda p: "{PLAIN}" + p).encode()
        self.assertEqual(self.other.find(ALICE, phone).name, "phone")
        self.apps.remove(ALICE, "phone")
        self.assertIsNone(self.other.find(ALICE, phone))
        laptop = self.apps.add(ALICE, "laptop", "all", lambda p: "{PLAIN}" + p).encode()
        self.assertEqual(self.other.find(ALICE, laptop).name, "laptop")


class FileTests(AppPasswordsContract, SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = makeTempDirectory(self)
        self.path = os.path.join(self.dir, "app-passwords")
        self.apps = AppPasswords(self.path, os.path.join(self.dir, "users.lock"))
        self.other = AppPasswords(self.path, os.path.join(self.dir, "users.lock"))

    def test_fileFormat(self) -> None:
        """
        An app password is stored as a passwd-file line (hash, id, name,
        scope, created); a restriction of the main password as a line of
        its own, removed again by C{all}.
        """
        phone = self.apps.add(ALICE, "phone", "pop3", lambda p: "{PLAIN}" + p, now=1764547200)
        with open(self.path, "rb") as f:
            first = f.read().split(b"\n")[0]
        self.assertEqual(
            first,
            f"alice@example.org:{{PLAIN}}{phone}::::::id={phone[:5]} name=phone scope=pop3 created=1764547200".encode(),
        )
        self.apps.remove(ALICE, "phone")
        self.apps.setMainScope(ALICE, "none")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"alice@example.org:!::::::main-scope=none\n")
        self.apps.setMainScope(ALICE, "all")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"")


class PostgresTests(AppPasswordsContract, SynchronousTestCase):
    """
    The contract over L{pop3gw.pgaccounts.PostgresAppPasswords}, two
    instances on one database.
    """

    def setUp(self) -> None:
        from pop3gw.pgaccounts import PostgresAppPasswords
        from tests.test_pgstore import newDatabase

        database = newDatabase(self)
        self.clock = [0.0]
        self.apps = PostgresAppPasswords(database, clock=lambda: self.clock[0])
        self.other = PostgresAppPasswords(database, clock=lambda: self.clock[0])

    def test_mainScopeElsewhere(self) -> None:
        """
        A main-password scope set through another node is used once the
        scopes read are L{MAIN_SCOPES_SECONDS} old; until then they are
        not read again (no round trip per login).
        """
        from pop3gw.pgaccounts import MAIN_SCOPES_SECONDS

        self.assertEqual(self.apps.mainScope(ALICE), "all")
        self.other.setMainScope(ALICE, "pop3")
        self.assertEqual(self.apps.mainScope(ALICE), "all")
        self.clock[0] += MAIN_SCOPES_SECONDS
        self.assertIsNone(self.apps.peekMainScope(ALICE))
        self.assertEqual(self.apps.mainScope(ALICE), "pop3")
        self.assertEqual(self.apps.peekMainScope(ALICE), "pop3")


    def checker(self, apps, users):
        reactor = ThreadlessReactor()
        checker = PasswordChecker(users, reactor, ImmediateThreadPool(), verifier=SpyVerifier(), dummy=lambda: DUMMY,
                                  appPasswords=apps)

        def login(password: bytes, service: str = "pop3"):
            d = checker.requestAvatarId(ClientCredentials(b"alice@example.org", password, "192.0.2.7", service))
            reactor.advance(2)
            return d

        return login

    def test_removedRefusedOnOtherNode(self) -> None:
        """
        An app password removed through one node is refused at the next
        login on another node that has just accepted it (and cached it);
        the main password keeps working there.
        """
        from pop3gw.pgusers import PostgresUsers

        users = PostgresUsers(self.apps.database)
        users.setPassword(ALICE, HASH_PASSWORD, True)
        loginB = self.checker(self.other, PostgresUsers(self.apps.database))
        phone = self.apps.add(ALICE, "phone", "all", hashPassword).encode()
        self.assertEqual(self.successResultOf(loginB(phone)), "alice@example.org")
        self.assertEqual(self.successResultOf(loginB(phone)), "alice@example.org")
        self.apps.remove(ALICE, "phone")
        self.failureResultOf(loginB(phone), UnauthorizedLogin)
        self.assertEqual(self.successResultOf(loginB(b"password")), "alice@example.org")

    def test_databaseDown(self) -> None:
        """
        With the database unreachable, an app-password login fails with
        L{TemporaryFailure} (C{[SYS/TEMP]}, C{454}), like any other.
        """
        import tempfile

        from pop3gw.pgaccounts import PostgresAppPasswords
        from pop3gw.pgdatabase import Database

        socketDir = tempfile.mkdtemp(prefix="pop3gw-nopg-")
        self.addCleanup(os.rmdir, socketDir)
        database = Database(f"postgresql:///nothing?host={socketDir}", timeout=0.5)
        self.addCleanup(database.close)
        apps = PostgresAppPasswords(database)
        login = self.checker(apps, FakeUserDatabase({ALICE: HASH_PASSWORD}))
        self.assertRaises(TemporaryFailure, apps.find, ALICE, b"k3mzq-7vd2p-x8hta-2mwe9")
        self.failureResultOf(login(b"k3mzq-7vd2p-x8hta-2mwe9"), TemporaryFailure)
        self.failureResultOf(login(b"password"), TemporaryFailure)


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = makeTempDirectory(self)
        usersPath = os.path.join(self.dir, "users")
        with open(usersPath, "w") as f:
            f.write(f"alice@example.org:{HASH_PASSWORD}\n")
        self.users = UsersFile(usersPath)
        self.apps = AppPasswords(os.path.join(self.dir, "app-passwords"), usersPath + ".lock")
        self.reactor = ThreadlessReactor()
        self.verifier = SpyVerifier()
        self.uses: list = []
        self.checker = PasswordChecker(
            self.users, self.reactor, ImmediateThreadPool(), verifier=self.verifier, dummy=lambda: DUMMY,
            appPasswords=self.apps, recordUse=lambda *a: self.uses.append(a),
        )

    def login(self, password: bytes, service: str):
        d = self.checker.requestAvatarId(ClientCredentials(b"alice@example.org", password, "192.0.2.7", service))
        self.reactor.advance(2)
        return d

    def test_scopedAppPassword(self) -> None:
        """
        A pop3 app password logs in to POP3 and not to submission; the
        main password still works for both.
        """
        phone = self.apps.add(ALICE, "phone", "pop3", hashPassword).encode()
        self.assertEqual(self.successResultOf(self.login(phone, "pop3")), "alice@example.org")
        self.failureResultOf(self.login(phone, "submission"), UnauthorizedLogin)
        for service in ("pop3", "submission"):
            self.assertEqual(self.successResultOf(self.login(b"password", service)), "alice@example.org")

    def test_mainScopeNone(self) -> None:
        """
        With the main password restricted to C{none}, it is refused
        everywhere (even from the cache), and an app password still works.
        """
        self.assertEqual(self.successResultOf(self.login(b"password", "pop3")), "alice@example.org")
        laptop = self.apps.add(ALICE, "laptop", "all", hashPassword).encode()
        self.apps.setMainScope(ALICE, "none")
        for service in ("pop3", "submission"):
            self.failureResultOf(self.login(b"password", service), UnauthorizedLogin)
            self.assertEqual(self.successResultOf(self.login(laptop, service)), "alice@example.org")

    def test_cachedAndRecorded(self) -> None:
        """
        A repeated app-password login is confirmed by the cache (one
        hash), and its use is recorded once within a minute, with the
        client; a wrong password of the app form is refused.
        """
        phone = self.apps.add(ALICE, "phone", "all", hashPassword).encode()
        for _ in range(3):
            self.assertEqual(self.successResultOf(self.login(phone, "pop3")), "alice@example.org")
        self.assertEqual(len(self.verifier.calls), 1)
        self.assertEqual(self.uses, [("alice@example.org", "phone", "192.0.2.7")])
        self.reactor.advance(60)
        self.successResultOf(self.login(phone, "pop3"))
        self.assertEqual(len(self.uses), 2)
        wrong = phone[:6] + (b"a" if phone[6:7] != b"a" else b"b") + phone[7:]
        self.failureResultOf(self.login(wrong, "pop3"), UnauthorizedLogin)


class CommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = ["--data-dir", makeTempDirectory(self)]
        self.command("user", "add", "alice@example.org", stdin="pw-alice\n")

    def command(self, *argv: str, stdin: str = ""):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main([*self.store, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def test_addPrintsPasswordLast(self) -> None:
        """
        C{app-password add} prints the password alone on its last line;
        C{list} shows name, scope, created and never used, not the
        password; C{remove} removes it; the users file is untouched.
        """
        users = self.command("user", "list")
        status, out, err = self.command("user", "app-password", "add", "alice@example.org", "--name", "phone",
                                        "--scope", "pop3")
        self.assertEqual((status, err), (0, ""))
        password = out.splitlines()[-1]
        self.assertTrue(looksGenerated(password.encode()), out)
        status, out, _ = self.command("user", "app-password", "list", "alice@example.org")
        self.assertRegex(out, r"^phone scope=pop3 created \d{4}-\d\d-\d\d \d\d:\d\d UTC, never used\n$")
        self.assertNotIn(password, out)
        self.assertEqual(self.command("user", "app-password", "remove", "alice@example.org", "phone")[0], 0)
        self.assertEqual(self.command("user", "app-password", "list", "alice@example.org")[1], "")
        self.assertEqual(self.command("user", "list"), users)

    def test_scopeAndErrors(self) -> None:
        """
        C{user scope} restricts the main password; unknown users and
        unknown names are one line with a non-zero exit.
        """
        self.assertEqual(self.command("user", "scope", "alice@example.org", "none"),
                         (0, "alice@example.org: main password scope none\n", ""))
        self.assertEqual(self.command("user", "app-password", "remove", "alice@example.org", "tablet"),
                         (1, "", "pop3gw: alice@example.org has no app password named tablet\n"))
        self.assertEqual(self.command("user", "app-password", "list", "bob@example.org")[0], 67)

    def test_userRemoveForgets(self) -> None:
        """
        Removing a user removes its app passwords.
        """
        self.command("user", "app-password", "add", "alice@example.org", "--name", "phone", "--scope", "all")
        self.command("user", "remove", "alice@example.org")
        self.command("user", "add", "alice@example.org", stdin="pw2\n")
        self.assertEqual(self.command("user", "app-password", "list", "alice@example.org")[1], "")


class DatabaseCommandTests(CommandTests):
    """
    The same commands with C{--store postgresql://...}: the app passwords
    are in the database.
    """

    def setUp(self) -> None:
        from tests import pgcluster

        self.store = ["--store", pgcluster.database(self)]
        self.assertEqual(self.command("init")[0], 0)
        self.command("user", "add", "alice@example.org", stdin="pw-alice\n")

    def test_usedFromAnotherNode(self) -> None:
        """
        C{list} shows when and from where a node last used each app
        password.
        """
        from pop3gw.pgaccounts import PostgresSendingLimits
        from pop3gw.pgdatabase import Database

        self.command("user", "app-password", "add", "alice@example.org", "--name", "phone", "--scope", "all")
        database = Database(self.store[1], maxConnections=1)
        self.addCleanup(database.close)
        PostgresSendingLimits(database, clock=lambda: 1764547200.0).recordUse("alice@example.org", "phone",
                                                                              "192.0.2.7")
        self.assertRegex(self.command("user", "app-password", "list", "alice@example.org")[1],
                         r"^phone scope=all created .*, last used 2025-12-01 00:00 UTC from 192.0.2.7\n$")
