"""
The C{pop3gw} command: users, local delivery with sysexits codes, queue.
"""

from __future__ import annotations

import io
import os

from twisted.trial.unittest import SynchronousTestCase

from pop3gw import cli
from pop3gw.address import Address
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
