"""
Tests for L{pop3gw.apppasswords}: scoped app passwords, the main
password's scope, the checker's use of them, and the command line.
"""

import io
import os

from twisted.cred.error import UnauthorizedLogin
from twisted.trial.unittest import SynchronousTestCase

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
from pop3gw.passwords import hashPassword
from pop3gw.testing import ImmediateThreadPool
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


class FileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = makeTempDirectory(self)
        self.path = os.path.join(self.dir, "app-passwords")
        self.apps = AppPasswords(self.path, os.path.join(self.dir, "users.lock"))

    def test_addListRemove(self) -> None:
        """
        An added app password is stored as a passwd-file line (hash, id,
        name, scope, created) and found by its first group; removing it
        by name removes only it.
        """
        phone = self.apps.add(ALICE, "phone", "pop3", lambda p: "{PLAIN}" + p, now=1764547200)
        laptop = self.apps.add(ALICE, "laptop", "all", lambda p: "{PLAIN}" + p, now=1764547300)
        with open(self.path, "rb") as f:
            first = f.read().split(b"\n")[0]
        self.assertEqual(
            first,
            f"alice@example.org:{{PLAIN}}{phone}::::::id={phone[:5]} name=phone scope=pop3 created=1764547200".encode(),
        )
        self.assertEqual([e.name for e in self.apps.list(ALICE)], ["phone", "laptop"])
        self.assertEqual(self.apps.find(Address("ALICE", "example.org"), laptop.encode()).name, "laptop")
        self.apps.remove(ALICE, "phone")
        self.assertIsNone(self.apps.find(ALICE, phone.encode()))
        self.assertEqual([e.name for e in self.apps.list(ALICE)], ["laptop"])

    def test_refusals(self) -> None:
        """
        A bad name, a bad scope, a name taken, removing what is not there:
        each an L{AppPasswordError} with the reason, the file unchanged.
        """
        self.apps.add(ALICE, "phone", "pop3", lambda p: "{PLAIN}" + p)
        with open(self.path, "rb") as f:
            before = f.read()
        for name, scope in (("bad name", "pop3"), ("ok", "imap"), ("phone", "all")):
            self.assertRaises(AppPasswordError, self.apps.add, ALICE, name, scope, lambda p: "{PLAIN}" + p)
        self.assertRaises(AppPasswordError, self.apps.remove, ALICE, "tablet")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_mainScope(self) -> None:
        """
        The main password's scope is C{all} unless restricted; C{all}
        removes the restriction line again.
        """
        self.assertEqual(self.apps.mainScope(ALICE), "all")
        self.apps.setMainScope(ALICE, "none")
        self.assertEqual(self.apps.mainScope(ALICE), "none")
        self.assertEqual(self.apps.peekMainScope(ALICE), "none")
        self.apps.setMainScope(ALICE, "all")
        self.assertEqual(self.apps.mainScope(ALICE), "all")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"")


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
        self.dir = makeTempDirectory(self)
        self.command("user", "add", "alice@example.org", stdin="pw-alice\n")

    def command(self, *argv: str, stdin: str = ""):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--data-dir", self.dir, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def test_addPrintsPasswordLast(self) -> None:
        """
        C{app-password add} prints the password alone on its last line;
        C{list} shows name, scope, created and never used, not the
        password; C{remove} removes it; the users file is untouched.
        """
        with open(os.path.join(self.dir, "users"), "rb") as f:
            users = f.read()
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
        with open(os.path.join(self.dir, "users"), "rb") as f:
            self.assertEqual(f.read(), users)

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
