"""
The C{pop3gw} command: users, local delivery with sysexits codes, queue.
"""

from __future__ import annotations

import errno
import io
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from pop3gw import __version__, cli
from pop3gw.address import Address
from pop3gw.interfaces import MaildropLocked
from pop3gw.users import UsersFile, verifyPassword

ALICE = Address("alice", "example.org")


class FakeStdin(io.StringIO):
    def __init__(self, text: str = "", data: bytes = b"") -> None:
        super().__init__(text)
        self.buffer = io.BytesIO(data)

    def isatty(self) -> bool:
        return False


class CLITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dataDir = self.mktemp()
        os.makedirs(self.dataDir)

    def runCLI(self, *args: str, text: str = "", data: bytes = b""):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--data-dir", self.dataDir, *args], stdin=FakeStdin(text, data), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def users(self) -> UsersFile:
        return UsersFile(os.path.join(self.dataDir, "users"))

    def test_userLifecycle(self) -> None:
        """
        C{user add} reads the password from stdin (spaces kept) and stores
        only a slow hash; C{passwd} changes it; C{list} lists; C{remove}
        removes; a second C{add} fails with one line on stderr.
        """
        self.assertEqual(self.runCLI("user", "add", "alice@Example.ORG", text="two words\n")[0], 0)
        with open(os.path.join(self.dataDir, "users")) as f:
            content = f.read()
        self.assertNotIn("two words", content)
        self.assertTrue(content.startswith("alice@example.org:{ARGON2ID}"), content)
        self.assertTrue(verifyPassword(self.users().passwordHash(ALICE), "two words"))
        status, _, err = self.runCLI("user", "add", "alice@example.org", text="x\n")
        self.assertEqual((status != 0, err.count("\n")), (True, 1))
        self.assertEqual(self.runCLI("user", "passwd", "alice@example.org", text="new\n")[0], 0)
        self.assertTrue(verifyPassword(self.users().passwordHash(ALICE), "new"))
        self.assertEqual(self.runCLI("user", "list"), (0, "alice@example.org\n", ""))
        self.assertEqual(self.runCLI("user", "remove", "alice@example.org")[0], 0)
        self.assertEqual(self.runCLI("user", "list"), (0, "", ""))
        status, _, err = self.runCLI("user", "remove", "alice@example.org")
        self.assertNotEqual(status, 0)
        self.assertIn("no such user", err)

    def test_badAddressesRefused(self) -> None:
        """
        An address that is not plain local@domain is refused and creates
        nothing.
        """
        for bad in ("../../etc@x.org", "a/b@example.org", "noat", "a..b@example.org", "a@b@c"):
            status, _, err = self.runCLI("user", "add", bad, text="pw\n")
            self.assertNotEqual(status, 0, bad)
            self.assertEqual(err.count("\n"), 1)
        self.assertFalse(os.path.exists(os.path.join(self.dataDir, "users")))

    def test_emptyPasswordRefused(self) -> None:
        """
        An empty password is refused.
        """
        self.assertNotEqual(self.runCLI("user", "add", "alice@example.org", text="\n")[0], 0)

    def test_deliver(self) -> None:
        """
        C{deliver} stores the message (exit 0) in the user's Maildir new/;
        unknown user exits 67, empty input 65, too large 65.
        """
        self.runCLI("user", "add", "alice@example.org", text="pw\n")
        self.assertEqual(self.runCLI("deliver", "alice@example.org", data=b"Subject: x\n\nhi\n")[0], 0)
        new = os.path.join(self.dataDir, "mail", "example.org", "alice", "new")
        files = os.listdir(new)
        self.assertEqual(len(files), 1)
        with open(os.path.join(new, files[0]), "rb") as f:
            self.assertEqual(f.read(), b"Subject: x\n\nhi\n")
        self.assertEqual(self.runCLI("deliver", "nobody@example.org", data=b"x\n")[0], cli.EX_NOUSER)
        self.assertEqual(self.runCLI("deliver", "bad/addr@example.org", data=b"x\n")[0], cli.EX_NOUSER)
        self.assertEqual(self.runCLI("deliver", "alice@example.org", data=b"")[0], cli.EX_DATAERR)
        with open(os.path.join(self.dataDir, "big.ini"), "w") as f:
            f.write(f"[pop3gw]\ndata-dir = {self.dataDir}\nmax-message-size = 2048\n")
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--config", os.path.join(self.dataDir, "big.ini"), "deliver", "alice@example.org"],
                          stdin=FakeStdin("", b"x" * 4096), stdout=out, stderr=err)
        self.assertEqual(status, cli.EX_DATAERR)
        self.assertEqual(len(os.listdir(new)), 1)
        self.assertEqual(os.listdir(os.path.join(self.dataDir, "mail", "example.org", "alice", "tmp")), [])

    def test_missingDataDir(self) -> None:
        """
        A data directory that does not exist is one clear error (75 for
        deliver, so the MTA retries).
        """
        out, err = io.StringIO(), io.StringIO()
        missing = os.path.join(self.dataDir, "missing")
        status = cli.main(["--data-dir", missing, "deliver", "alice@example.org"], stdin=FakeStdin("", b"x\n"),
                          stdout=out, stderr=err)
        self.assertEqual(status, cli.EX_TEMPFAIL)
        self.assertIn("does not exist", err.getvalue())
        status = cli.main(["--data-dir", missing, "user", "list"], stdin=FakeStdin(), stdout=out, stderr=err)
        self.assertNotEqual(status, 0)

    def test_queueListEmpty(self) -> None:
        """
        C{queue list} prints nothing for an empty queue; C{queue flush} says
        how many it scheduled.
        """
        self.assertEqual(self.runCLI("queue", "list"), (0, "", ""))
        status, out, _ = self.runCLI("queue", "flush")
        self.assertEqual(status, 0)
        self.assertIn("0 message(s)", out)


class TTYStdin(FakeStdin):
    def isatty(self) -> bool:
        return True


class UndecodableStdin(FakeStdin):
    def readline(self, *args: object) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


class PasswordInputTests(SynchronousTestCase):
    """
    How C{user add} and C{user passwd} read the password.
    """

    def setUp(self) -> None:
        self.dataDir = self.mktemp()
        os.makedirs(self.dataDir)
        self.prompts: list = []
        self.answers: list = []
        self.patch(cli.getpass, "getpass", self.fakeGetpass)

    def fakeGetpass(self, prompt: str = "Password: ") -> str:
        self.prompts.append(prompt)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def runCLI(self, *args: str, stdin: FakeStdin):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--data-dir", self.dataDir, *args], stdin=stdin, stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def users(self) -> UsersFile:
        return UsersFile(os.path.join(self.dataDir, "users"))

    def test_ttyPromptsTwice(self) -> None:
        """
        On a TTY the password is prompted for twice, without echo
        (C{getpass}), and stored when both agree.
        """
        self.answers = ["s3cret pass", "s3cret pass"]
        status, _, err = self.runCLI("user", "add", "alice@example.org", stdin=TTYStdin())
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(len(self.prompts), 2)
        self.assertTrue(verifyPassword(self.users().passwordHash(ALICE), "s3cret pass"))

    def test_ttyMismatch(self) -> None:
        """
        Two different answers on a TTY change nothing and fail with one
        line.
        """
        self.answers = ["one", "two"]
        status, _, err = self.runCLI("user", "add", "alice@example.org", stdin=TTYStdin())
        self.assertEqual((status, err), (1, "pop3gw: passwords do not match\n"))
        self.assertFalse(os.path.exists(os.path.join(self.dataDir, "users")))

    def test_ttyEndOfInput(self) -> None:
        """
        End of input (^D) or ^C at the prompt is one line on stderr and a
        non-zero exit, not a traceback.
        """
        for interruption in (EOFError(), KeyboardInterrupt()):
            self.answers = [interruption]
            status, _, err = self.runCLI("user", "add", "alice@example.org", stdin=TTYStdin())
            self.assertEqual((status, err), (1, "pop3gw: no password given\n"))
        self.assertFalse(os.path.exists(os.path.join(self.dataDir, "users")))

    def test_notUTF8(self) -> None:
        """
        A password read from stdin that is not UTF-8 is refused with one
        line: undecodable bytes that the locale turned into surrogates
        (C{surrogateescape}), and a strict decoder's error alike.
        """
        for stdin in (FakeStdin("p\udcffw\n"), UndecodableStdin()):
            status, _, err = self.runCLI("user", "add", "alice@example.org", stdin=stdin)
            self.assertEqual((status, err), (1, "pop3gw: password is not valid UTF-8\n"))
        self.assertFalse(os.path.exists(os.path.join(self.dataDir, "users")))

    def test_lengthInOctets(self) -> None:
        """
        The length limit counts octets of UTF-8, like the login check
        (which refuses longer passwords unhashed): a password that could
        never log in is refused.
        """
        from pop3gw.users import MAX_PASSWORD_BYTES, verifyPassword as verify

        self.assertEqual(cli.MAX_PASSWORD_LENGTH, MAX_PASSWORD_BYTES)
        status, _, err = self.runCLI("user", "add", "alice@example.org", stdin=FakeStdin("\u00e9" * 600 + "\n"))
        self.assertEqual((status, err), (1, "pop3gw: password too long or contains NUL\n"))
        longest = "\u00e9" * 512
        self.assertEqual(self.runCLI("user", "add", "alice@example.org", stdin=FakeStdin(longest + "\n"))[0], 0)
        self.assertTrue(verify(self.users().passwordHash(ALICE), longest))


class UnreadableDataTests(SynchronousTestCase):
    """
    A data directory whose users file exists but cannot be read (as for a
    directory the command's user may not read).  Tests run as root, so the
    unreadable file is simulated with a directory in its place (C{open}
    fails with C{EISDIR} where it would fail with C{EACCES}).
    """

    def setUp(self) -> None:
        self.dataDir = self.mktemp()
        os.makedirs(os.path.join(self.dataDir, "users"))

    def runCLI(self, *args: str, text: str = "", data: bytes = b""):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--data-dir", self.dataDir, *args], stdin=FakeStdin(text, data), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def test_userCommands(self) -> None:
        """
        C{user list}, C{passwd}, C{remove} and C{add} fail with one line
        naming the users file instead of acting on an empty user list.
        """
        for args in (("list",), ("passwd", "alice@example.org"), ("remove", "alice@example.org"),
                     ("add", "alice@example.org")):
            with self.subTest(args=args):
                status, out, err = self.runCLI("user", *args, text="pw\n")
                self.assertNotEqual(status, 0)
                self.assertEqual(out, "")
                self.assertEqual(err.count("\n"), 1, err)
                self.assertTrue(err.startswith("pop3gw: "), err)
                self.assertIn("users", err)

    def test_deliverDefers(self) -> None:
        """
        C{deliver} exits 75 (the MTA retries) rather than 67 (the MTA
        bounces the mail as for an unknown user).
        """
        status, _, err = self.runCLI("deliver", "alice@example.org", data=b"Subject: x\n\nhi\n")
        self.assertEqual(status, cli.EX_TEMPFAIL)
        self.assertEqual(err.count("\n"), 1)


class DeliverTests(SynchronousTestCase):
    """
    C{deliver}'s exit statuses in failure cases.
    """

    def setUp(self) -> None:
        self.dataDir = self.mktemp()
        os.makedirs(self.dataDir)
        self.runCLI("user", "add", "alice@example.org", text="pw\n")
        self.maildir = os.path.join(self.dataDir, "mail", "example.org", "alice")

    def runCLI(self, *args: str, text: str = "", data: bytes = b""):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--data-dir", self.dataDir, *args], stdin=FakeStdin(text, data), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def test_diskFull(self) -> None:
        """
        A full disk while writing the message exits 75 with one line and
        leaves nothing in the maildrop's C{tmp/} or C{new/}.
        """
        from pop3gw import maildir

        def full(fd: int, data: bytes) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(maildir, "_writeAll", full)
        status, _, err = self.runCLI("deliver", "alice@example.org", data=b"Subject: x\n\n" + b"y" * 300000)
        self.assertEqual(status, cli.EX_TEMPFAIL)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("No space left on device", err)
        for sub in ("tmp", "new", "cur"):
            self.assertEqual(os.listdir(os.path.join(self.maildir, sub)), [])

    def test_lockedMaildrop(self) -> None:
        """
        Delivery does not wait for, or fail on, a POP3 session's lock on
        the maildrop.
        """
        from pop3gw.maildir import MaildirStore

        store = MaildirStore(os.path.join(self.dataDir, "mail"))
        opened: list = []
        store.openMaildrop(ALICE).addCallback(opened.append)
        self.assertEqual(len(opened), 1)
        self.failureResultOf(store.openMaildrop(ALICE), MaildropLocked)
        self.assertEqual(self.runCLI("deliver", "alice@example.org", data=b"Subject: x\n\nhi\n")[0], 0)
        self.assertEqual(len(os.listdir(os.path.join(self.maildir, "new"))), 1)
        opened[0].release()


class VersionTests(SynchronousTestCase):
    def test_version(self) -> None:
        """
        C{pop3gw --version} prints C{pop3gw} and its version on stdout and
        exits 0, without needing a command or a data directory.
        """
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "argv", ["pop3gw", "--version"])
        with self.assertRaises(SystemExit) as e:
            cli.run()
        self.assertEqual(e.exception.code, 0)
        self.assertEqual(out.getvalue(), f"pop3gw {__version__}\n")
