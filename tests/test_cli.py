"""
The C{pop3gw} command: users, local delivery with sysexits codes, queue.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import stat
import sys
import tempfile

from twisted.internet import reactor, threads
from twisted.internet.protocol import Factory
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pop3gw import __version__, cli, fsutil
from pop3gw.address import Address
from pop3gw.interfaces import MaildropLocked
from pop3gw.maildir import MaildirStore
from pop3gw.passwords import verifyPassword
from pop3gw.users import UsersFile
from tests.dnshelpers import listen, txt

from .util import (
    OTHER_GID,
    OTHER_UID,
    effectiveUser,
    makeTempDirectory,
    requireRoot,
    treeModesAndOwners,
    withUmask,
)

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
        self.assertEqual(
            self.runCLI("user", "remove", "alice@example.org"), (67, "", "pop3gw: no such user alice@example.org\n")
        )
        self.assertEqual(
            self.runCLI("user", "passwd", "nobody@example.org", text="x\n"),
            (67, "", "pop3gw: no such user nobody@example.org\n"),
        )

    def test_caseVariants(self) -> None:
        """
        Addresses are matched whatever the case of the local part: a user
        that differs from an existing one only in case is refused (naming
        the existing spelling) and the file is untouched; C{passwd},
        C{remove} and C{deliver} in another case act on the stored user
        and name it as stored.
        """
        self.assertEqual(self.runCLI("user", "add", "alice@example.org", text="pw\n")[0], 0)
        with open(os.path.join(self.dataDir, "users"), "rb") as f:
            before = f.read()
        status, out, err = self.runCLI("user", "add", "Alice@Example.org", text="other\n")
        self.assertEqual((status, out, err), (1, "", "pop3gw: user Alice@example.org already exists as alice@example.org\n"))
        with open(os.path.join(self.dataDir, "users"), "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(self.runCLI("user", "passwd", "ALICE@example.org", text="new\n"),
                         (0, "changed password of alice@example.org\n", ""))
        self.assertTrue(verifyPassword(self.users().passwordHash(ALICE), "new"))
        self.assertEqual(self.runCLI("deliver", "ALICE@Example.ORG", data=b"Subject: x\n\nhi\n")[0], 0)
        self.assertEqual(len(os.listdir(os.path.join(self.dataDir, "mail", "example.org", "alice", "new"))), 1)
        self.assertFalse(os.path.exists(os.path.join(self.dataDir, "mail", "example.org", "ALICE")))
        self.assertEqual(self.runCLI("user", "list"), (0, "alice@example.org\n", ""))
        self.assertEqual(self.runCLI("user", "remove", "aLiCe@example.org"),
                         (0, "removed alice@example.org (its maildrop is kept)\n", ""))
        self.assertEqual(self.runCLI("user", "list"), (0, "", ""))

    def test_importPasswdFile(self) -> None:
        """
        C{user import FILE} adds the users of a Dovecot passwd-file in one
        rewrite: hashes pop3gw verifies are kept as they are (with the
        line's other fields), plain-text passwords are hashed with Argon2id
        on the way in, and every line it cannot take is reported on stderr
        with its number and why (never the secret); the exit status is 65
        when a line was not taken.
        """
        self.runCLI("user", "add", "zoe@example.org", text="pw\n")
        source = os.path.join(self.dataDir, "dovecot.passwd")
        sha256 = "{SHA256-CRYPT}$5$saltsalt$gOjOtoMpVhru2uyjeJSEc/JaLQWOXMNmlOnj6T4AtC."
        ssha512 = (
            "{SSHA512}MKbQg3rPvz03V+1S0+/jlDdn0B0IiGGxl7kZMimdo1IHHWN6DtzxJMCchsX5U1lrRY7apW/oopOgERexYda1nAECAwQ="
        )
        with open(source, "wb") as f:
            f.write(
                b"# from dovecot\n"
                b"alice@example.org:{PLAIN}two words::::::\n"
                + f"bob@example.org:{sha256}:1000:1000::/home/bob\n".encode()
                + b"carol@example.org:{CRAM-MD5}4b4d1e4cbd12d2c8fbd1a4d6b83a4cb3d1a1c4f9c9b2a8e3b4c5d6e7f8091a2b\n"
                b"dave:{PLAIN}nodomain\n"
                + f"erin@example.org:{ssha512}\n".encode()
                + b"ALICE@example.org:{PLAIN}again\n"
                b"frank@example.org:\n"
                b"grace@example.org:$1$salt$md5crypthash\n"
                b"Zoe@example.org:{PLAIN}zoesecret\n"
                b"heidi@example.org:{PLAIN.B64}c2VjcmV0\n"
                b"ivan@example.org:{PLAIN}\n"
                b"just garbage\n"
                b"\xff@example.org:{PLAIN}x\n"
            )
        status, out, err = self.runCLI("user", "import", source)
        self.assertEqual(status, cli.EX_DATAERR)
        self.assertEqual(
            out, f"imported 4 user(s) from {source} (2 plain-text password(s) hashed with Argon2id); 9 line(s) not taken\n"
        )
        self.assertEqual(
            err.splitlines(),
            [
                f"pop3gw: {source}:4: carol@example.org: password scheme CRAM-MD5 cannot be verified by pop3gw",
                f"pop3gw: {source}:5: 'dave' is not an address (user@domain)",
                f"pop3gw: {source}:7: ALICE@example.org: same user as line 2",
                f"pop3gw: {source}:8: frank@example.org: no password",
                f"pop3gw: {source}:9: grace@example.org: no {{SCHEME}} prefix, so the hash cannot be told apart",
                f"pop3gw: {source}:10: Zoe@example.org: user exists already as zoe@example.org",
                f"pop3gw: {source}:12: ivan@example.org: plain-text password empty, too long, with NUL or badly encoded",
                f"pop3gw: {source}:13: not a user:password line",
                f"pop3gw: {source}:14: not valid UTF-8",
            ],
        )
        for secret in ("two words", "nodomain", "again", "zoesecret", "4b4d1e", "md5crypthash", "$5$"):
            self.assertNotIn(secret, out + err)
        users = self.users()
        self.assertEqual(users.snapshot().addresses(), [ALICE, Address("bob", "example.org"), Address("erin", "example.org"),
                                             Address("heidi", "example.org"), Address("zoe", "example.org")])
        self.assertTrue(users.passwordHash(ALICE).startswith("{ARGON2ID}$argon2id$"))
        self.assertTrue(verifyPassword(users.passwordHash(ALICE), "two words"))
        self.assertTrue(verifyPassword(users.passwordHash(Address("heidi", "example.org")), "secret"))
        self.assertEqual(users.passwordHash(Address("bob", "example.org")), sha256)
        self.assertEqual(users.passwordHash(Address("erin", "example.org")), ssha512)
        with open(os.path.join(self.dataDir, "users")) as f:
            content = f.read()
        self.assertIn(f"bob@example.org:{sha256}:1000:1000::/home/bob\n", content)
        self.assertNotIn("two words", content)
        self.assertNotIn("{PLAIN", content)
        # Importing the same file again takes nothing and says why.
        status, out, err = self.runCLI("user", "import", source)
        self.assertEqual(status, cli.EX_DATAERR)
        self.assertTrue(out.startswith(f"imported 0 user(s) from {source}"), out)

    def test_importMalformedHashes(self) -> None:
        """
        A hash in a scheme pop3gw verifies but malformed for it (a broken
        Argon2 string, bcrypt or SHA-crypt hash, glibc's C{*0} error
        string, SSHA that is not base64 or hex of a salted digest) is a
        line not taken, reported with its number and never the hash; the
        well-formed line beside them is imported and the exit status is 65.
        """
        source = os.path.join(self.dataDir, "broken.passwd")
        with open(source, "w") as f:
            f.write(
                "a@example.org:{ARGON2ID}$argon2id$garbage\n"
                "b@example.org:{BLF-CRYPT}notbcrypt\n"
                "c@example.org:{SHA256-CRYPT}$5$short\n"
                "d@example.org:{SHA512-CRYPT}*0\n"
                "e@example.org:{SSHA512}!!notbase64!!\n"
                "f@example.org:{SSHA256.hex}zz\n"
                "g@example.org:{SHA256-CRYPT}$5$saltsalt$gOjOtoMpVhru2uyjeJSEc/JaLQWOXMNmlOnj6T4AtC.\n"
            )
        status, out, err = self.runCLI("user", "import", source)
        self.assertEqual((status, out), (cli.EX_DATAERR, f"imported 1 user(s) from {source}; 6 line(s) not taken\n"))
        self.assertEqual(
            err.splitlines(),
            [
                f"pop3gw: {source}:1: a@example.org: malformed ARGON2ID hash, which pop3gw cannot verify",
                f"pop3gw: {source}:2: b@example.org: malformed BLF-CRYPT hash, which pop3gw cannot verify",
                f"pop3gw: {source}:3: c@example.org: malformed SHA256-CRYPT hash, which pop3gw cannot verify",
                f"pop3gw: {source}:4: d@example.org: malformed SHA512-CRYPT hash, which pop3gw cannot verify",
                f"pop3gw: {source}:5: e@example.org: malformed SSHA512 hash, which pop3gw cannot verify",
                f"pop3gw: {source}:6: f@example.org: malformed SSHA256.HEX hash, which pop3gw cannot verify",
            ],
        )
        # The path (a random temporary name) is taken out first: it may
        # contain a secret's letters by chance.
        said = (out + err).replace(source, "SOURCE")
        for secret in ("garbage", "notbcrypt", "short", "*0", "notbase64", "zz"):
            self.assertNotIn(secret, said)
        self.assertEqual(self.users().snapshot().addresses(), [Address("g", "example.org")])

    def test_importCleanFile(self) -> None:
        """
        A file whose every line is taken exits 0 with nothing on stderr; a
        missing file is one line and exit 66.
        """
        source = os.path.join(self.dataDir, "clean.passwd")
        with open(source, "w") as f:
            f.write("alice@example.org:{PLAIN}pw\n\n# end\n")
        self.assertEqual(
            self.runCLI("user", "import", source),
            (0, f"imported 1 user(s) from {source} (1 plain-text password(s) hashed with Argon2id)\n", ""),
        )
        missing = os.path.join(self.dataDir, "missing.passwd")
        status, out, err = self.runCLI("user", "import", missing)
        self.assertEqual((status, out, err), (66, "", f"pop3gw: cannot read {missing}: No such file or directory\n"))

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
        from pop3gw.passwords import MAX_PASSWORD_BYTES
        from pop3gw.passwords import verifyPassword as verify

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

    def test_commandsLoadOnlyWhatTheyUse(self) -> None:
        """
        C{deliver} and C{user list}, run once per message behind an MTA or
        from scripts, load neither the cryptography library (the DKIM
        keys' and certificates') nor the login checker (C{pop3gw.auth},
        Twisted's cred); C{dkim list} loads the DKIM keys' module but not
        cryptography, which only makes and reads keys.
        """
        import subprocess

        probe = (
            "import sys\n"
            "from pop3gw import cli\n"
            "status = cli.main(sys.argv[1:])\n"
            "heavy = ('cryptography', 'pop3gw.auth', 'twisted.cred.checkers', 'pop3gw.dkimkeys')\n"
            "print(status, sorted(m for m in heavy if m in sys.modules))\n"
        )

        def run(*args: str) -> str:
            done = subprocess.run(
                [sys.executable, "-c", probe, "--data-dir", self.dataDir, *args],
                input=b"Subject: x\n\nhi\n",
                capture_output=True,
                timeout=60,
            )
            return done.stdout.decode().splitlines()[-1]

        self.assertEqual(run("deliver", "alice@example.org"), "0 []")
        self.assertEqual(run("user", "list"), "0 []")
        self.assertEqual(run("dkim", "list"), "0 ['pop3gw.dkimkeys']")

    def test_deliverLoadsNoCheckLibraries(self) -> None:
        """
        An MTA starts one C{deliver} process per message: without C{[inbound]
        lmtp-checks} it stores the message without loading the inbound
        checks, their DNS and DKIM libraries or Twisted's web server (a
        third of a second of start-up); with the checks it loads them.
        """
        import subprocess

        probe = (
            "import sys\n"
            "from pop3gw import cli\n"
            "status = cli.main(sys.argv[1:])\n"
            "heavy = ('pop3gw.inbound', 'pop3gw.mailauth', 'dkim', 'twisted.web.server', 'twisted.web.client')\n"
            "print(status, sorted(m for m in heavy if m in sys.modules))\n"
        )

        def deliver(*extra: str) -> str:
            done = subprocess.run(
                [sys.executable, "-c", probe, "--data-dir", self.dataDir, *extra, "deliver", "alice@example.org"],
                input=b"Subject: x\n\nhi\n",
                capture_output=True,
                timeout=60,
            )
            return done.stdout.decode()

        self.assertEqual(deliver(), "0 []\n")
        ini = os.path.join(self.dataDir, "checks.ini")
        with open(ini, "w") as f:
            f.write("[inbound]\nlmtp-checks = yes\nchecks = no\n")
        self.assertEqual(deliver("--config", ini), "0 ['dkim', 'pop3gw.inbound', 'pop3gw.mailauth', 'twisted.web.client']\n")
        self.assertEqual(len(os.listdir(os.path.join(self.maildir, "new"))), 2)

    def test_diskFull(self) -> None:
        """
        A full disk while writing the message exits 75 with one line and
        leaves nothing in the maildrop's C{tmp/} or C{new/}.
        """
        from pop3gw import maildelivery

        def full(fd: int, data: bytes) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(maildelivery, "_writeAll", full)
        status, _, err = self.runCLI("deliver", "alice@example.org", data=b"Subject: x\n\n" + b"y" * 300000)
        self.assertEqual(status, cli.EX_TEMPFAIL)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("No space left on device", err)
        for sub in ("tmp", "new", "cur"):
            self.assertEqual(os.listdir(os.path.join(self.maildir, sub)), [])

    def test_diskFullAtCommit(self) -> None:
        """
        A full disk (C{ENOSPC}) or an exhausted quota (C{EDQUOT}) when a
        small message is written out at commit exits 75 with one line
        naming the error in words; nothing is left in the maildrop.
        """
        from pop3gw import maildelivery

        for code in (errno.ENOSPC, errno.EDQUOT):

            def full(fd: int, data: bytes, code: int = code) -> None:
                raise OSError(code, os.strerror(code))

            self.patch(maildelivery, "_writeAll", full)
            status, _, err = self.runCLI("deliver", "alice@example.org", data=b"Subject: x\n\nhi\n")
            self.assertEqual(status, cli.EX_TEMPFAIL)
            self.assertEqual(
                err,
                f"pop3gw: cannot deliver to alice@example.org: insufficient storage: "
                f"cannot deliver message: {os.strerror(code)}\n",
            )
            for sub in ("tmp", "new", "cur"):
                self.assertEqual(os.listdir(os.path.join(self.maildir, sub)), [])

    def test_bareCRAndNULRefused(self) -> None:
        """
        A bare CR (which would otherwise become a line break, here a second
        From: field) or a NUL exits 65 with one line, as submission refuses
        them; nothing is stored.
        """
        for data, why in [
            (b"Subject: hi\rFrom: ceo@example.org\n\nhi\n", "bare CR (a CR not followed by LF)"),
            (b"Subject: hi\n\nend\r", "bare CR (a CR not followed by LF)"),
            (b"Subject: hi\n\n\x00\n", "NUL octet"),
        ]:
            status, _, err = self.runCLI("deliver", "alice@example.org", data=data)
            self.assertEqual(status, cli.EX_DATAERR, data)
            self.assertEqual(err, f"pop3gw: message refused: it contains a {why}\n")
            # Nothing is created before the message is accepted: the
            # maildrop is missing or empty.
            for sub in ("tmp", "new", "cur"):
                path = os.path.join(self.maildir, sub)
                self.assertEqual(os.listdir(path) if os.path.isdir(path) else [], [])

    def test_crlfAcrossReads(self) -> None:
        """
        A CRLF split between two reads of the input is one line end: the
        message is stored with LF, unchanged otherwise.
        """
        head = b"Subject: x\r\n\r\n" + b"y" * (cli.READ_CHUNK - 15)
        data = head + b"\r\nlast\r\n"
        self.assertEqual(data[cli.READ_CHUNK - 1 : cli.READ_CHUNK + 1], b"\r\n")
        self.assertEqual(self.runCLI("deliver", "alice@example.org", data=data)[0], cli.EX_OK)
        [name] = os.listdir(os.path.join(self.maildir, "new"))
        with open(os.path.join(self.maildir, "new", name), "rb") as f:
            self.assertEqual(f.read(), data.replace(b"\r\n", b"\n"))

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


class NewDataDirectoryTests(SynchronousTestCase):
    """
    C{user add} creates a missing data directory, and says so.
    """

    def test_createdIsSaid(self) -> None:
        """
        C{user add} on a data directory that does not exist creates it
        (mode 0700), succeeds as before, and says
        C{created new data directory PATH} on stderr; the next C{user add}
        says nothing there.
        """
        dataDir = os.path.abspath(os.path.join(makeTempDirectory(self), "typo"))
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--data-dir", dataDir, "user", "add", "alice@example.org"], stdin=FakeStdin("pw\n"),
                          stdout=out, stderr=err)
        self.assertEqual((status, out.getvalue(), err.getvalue()),
                         (0, "added alice@example.org\n", f"pop3gw: created new data directory {dataDir}\n"))
        self.assertEqual(stat.S_IMODE(os.stat(dataDir).st_mode), 0o700)
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--data-dir", dataDir, "user", "add", "bob@example.org"], stdin=FakeStdin("pw\n"),
                          stdout=out, stderr=err)
        self.assertEqual((status, out.getvalue(), err.getvalue()), (0, "added bob@example.org\n", ""))


class ModesTests(SynchronousTestCase):
    """
    Everything the command creates is private whatever the umask.
    """

    def test_everyFilePrivate(self) -> None:
        """
        Under umask 022, 000 and 277, C{user add} on a new data directory
        and C{deliver} leave only 0700 directories and 0600 files (data
        directory, users file, its lock, maildrop, its lock file, message).
        """
        for mask in (0o022, 0o000, 0o277):
            withUmask(self, mask)
            dataDir = os.path.join(makeTempDirectory(self), "data")
            for args, text, data in ((("user", "add", "alice@example.org"), "pw\n", b""),
                                     (("deliver", "alice@example.org"), "", b"Subject: x\n\nhi\n")):
                status = cli.main(["--data-dir", dataDir, *args], stdin=FakeStdin(text, data),
                                  stdout=io.StringIO(), stderr=io.StringIO())
                self.assertEqual(status, 0)
            store = MaildirStore(os.path.join(dataDir, "mail"))
            self.successResultOf(store.openMaildrop(ALICE)).release()
            found = treeModesAndOwners(dataDir)
            self.assertIn("users", found)
            self.assertIn("mail/example.org/alice/pop3gw.lock", found)
            self.assertEqual(len([p for p in found if p.startswith("mail/example.org/alice/new/")]), 1)
            for path, (kind, mode, _, _) in found.items():
                self.assertEqual(mode, 0o700 if kind == "d" else 0o600, (oct(mask), path))


class DataDirectoryOwnerTests(SynchronousTestCase):
    """
    Commands keep the data directory's owner: run as root they give what
    they write to that owner; run as anyone else but the owner they refuse.
    """

    def setUp(self) -> None:
        requireRoot(self)
        # Under /tmp: pytest's per-test directories are closed to other uids.
        parent = tempfile.mkdtemp(prefix="pop3gw-owner-")
        self.addCleanup(shutil.rmtree, parent, True)
        os.chmod(parent, 0o755)
        self.dataDir = os.path.join(parent, "data")
        os.mkdir(self.dataDir, 0o700)
        os.chown(self.dataDir, OTHER_UID, OTHER_GID)

    def runCLI(self, *args: str, text: str = "", data: bytes = b""):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--data-dir", self.dataDir, *args], stdin=FakeStdin(text, data), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def test_rootKeepsOwner(self) -> None:
        """
        C{user add}, C{passwd}, C{remove} and C{deliver} run as root leave
        every file and directory they create or rewrite (users file, its
        lock, the maildrop's directories and lock, the message) owned by
        the data directory's uid and gid.
        """
        self.assertEqual(self.runCLI("user", "add", "alice@example.org", text="pw\n")[0], 0)
        self.assertEqual(self.runCLI("user", "add", "bob@example.org", text="pw\n")[0], 0)
        self.assertEqual(self.runCLI("user", "passwd", "alice@example.org", text="new\n")[0], 0)
        self.assertEqual(self.runCLI("user", "remove", "bob@example.org")[0], 0)
        self.assertEqual(self.runCLI("deliver", "alice@example.org", data=b"Subject: x\n\nhi\n")[0], 0)
        store = MaildirStore(os.path.join(self.dataDir, "mail"), owner=fsutil.dataDirectoryOwner(self.dataDir))
        self.successResultOf(store.openMaildrop(ALICE)).release()
        found = treeModesAndOwners(self.dataDir)
        for expected in ("users", "users.lock", "mail", "mail/example.org", "mail/example.org/alice",
                         "mail/example.org/alice/new", "mail/example.org/alice/pop3gw.lock"):
            self.assertIn(expected, found)
        for path, (_, _, uid, gid) in found.items():
            self.assertEqual((uid, gid), (OTHER_UID, OTHER_GID), path)

    def test_rootQueueFlushKeepsOwner(self) -> None:
        """
        C{queue flush} run as root leaves the queue's directory, lock, entry
        rewrites and flush stamp owned by the data directory's uid and gid.
        """
        from twisted.internet.task import Clock

        from pop3gw.queue import OutboundQueue

        owner = fsutil.dataDirectoryOwner(self.dataDir)
        queue = OutboundQueue(os.path.join(self.dataDir, "queue"), Clock(), owner=owner)
        delivery = queue.beginDelivery(ALICE, [Address("bob", "remote.example")])
        delivery.write(b"Subject: x\r\n\r\nhi\r\n")
        self.successResultOf(delivery.commit())
        self.assertEqual(self.runCLI("queue", "flush")[0], 0)
        found = treeModesAndOwners(self.dataDir)
        for expected in ("queue", "queue/.lock", "queue/.flush"):
            self.assertIn(expected, found)
        for path, (_, _, uid, gid) in found.items():
            self.assertEqual((uid, gid), (OTHER_UID, OTHER_GID), path)

    def test_rewriteKeepsFileOwner(self) -> None:
        """
        A users file that belongs to someone else than the data directory
        keeps its owner when root rewrites it.
        """
        self.assertEqual(self.runCLI("user", "add", "alice@example.org", text="pw\n")[0], 0)
        users = os.path.join(self.dataDir, "users")
        os.chown(users, OTHER_UID + 2, OTHER_GID + 2)
        self.assertEqual(self.runCLI("user", "add", "bob@example.org", text="pw\n")[0], 0)
        st = os.stat(users)
        self.assertEqual((st.st_uid, st.st_gid), (OTHER_UID + 2, OTHER_GID + 2))

    def test_otherUserRefused(self) -> None:
        """
        A user who is neither root nor the owner, though the group may
        write the data directory, is refused with one line: C{user add}
        and C{queue flush} exit 77 (EX_NOPERM), C{deliver} 75 (the MTA
        retries); nothing is written.  Reading (C{user list}) still works.
        """
        os.chmod(self.dataDir, 0o770)
        with effectiveUser(OTHER_UID + 1, OTHER_GID):
            results = [
                self.runCLI("user", "add", "alice@example.org", text="pw\n"),
                self.runCLI("deliver", "alice@example.org", data=b"Subject: x\n\nhi\n"),
                self.runCLI("queue", "flush"),
                self.runCLI("user", "list"),
            ]
        line = (f"pop3gw: data directory {os.path.abspath(self.dataDir)} belongs to uid {OTHER_UID}, "
                f"not to uid {OTHER_UID + 1}: run this as its owner (or as root, which keeps that owner)\n")
        self.assertEqual(results, [(cli.EX_NOPERM, "", line), (cli.EX_TEMPFAIL, "", line), (cli.EX_NOPERM, "", line),
                                   (0, "", "")])
        self.assertEqual(os.listdir(self.dataDir), [])

    def test_ownerMayWrite(self) -> None:
        """
        The owner itself writes as before.
        """
        with effectiveUser(OTHER_UID, OTHER_GID):
            status, _, err = self.runCLI("user", "add", "alice@example.org", text="pw\n")
        self.assertEqual((status, err), (0, ""))
        st = os.stat(os.path.join(self.dataDir, "users"))
        self.assertEqual((st.st_uid, st.st_gid), (OTHER_UID, OTHER_GID))

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


class AliasCommandTests(SynchronousTestCase):
    """
    C{pop3gw alias add|remove|list}.
    """

    def setUp(self) -> None:
        from tests.test_passwords import HASH_A, HASH_B

        self.dataDir = os.path.abspath(self.mktemp())
        os.makedirs(self.dataDir)
        self.aliases = os.path.join(self.dataDir, "aliases")
        with open(os.path.join(self.dataDir, "users"), "w") as f:
            f.write(f"alice@example.org:{HASH_A}\nBob@example.org:{HASH_B}\n")

    def runCLI(self, *args: str):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--data-dir", self.dataDir, *args], stdin=FakeStdin(), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def read(self) -> bytes:
        with open(self.aliases, "rb") as f:
            return f.read()

    def test_addListRemove(self) -> None:
        """
        C{alias add} writes one line per alias (targets named as stored,
        each once; a second C{add} adds targets to the same line, found in
        any case); C{@domain} is the catch-all; C{list} prints them;
        C{remove} removes one; comments are kept.
        """
        with open(self.aliases, "wb") as f:
            f.write(b"# ours\n")
        self.assertEqual(
            self.runCLI("alias", "add", "team@example.org", "alice@example.org", "bob@example.org", "ALICE@example.org"),
            (0, "team@example.org: alice@example.org, Bob@example.org\n", ""),
        )
        self.assertEqual(self.runCLI("alias", "add", "@Example.ORG", "alice@example.org")[0], 0)
        self.assertEqual(self.runCLI("alias", "add", "TEAM@example.org", "bob@example.org")[0], 0)
        self.assertEqual(
            self.read(), b"# ours\nteam@example.org: alice@example.org, Bob@example.org\n@example.org: alice@example.org\n"
        )
        self.assertEqual(
            self.runCLI("alias", "list"), (0, "team@example.org: alice@example.org, Bob@example.org\n@example.org: alice@example.org\n", "")
        )
        users = UsersFile(os.path.join(self.dataDir, "users"), self.aliases)
        self.assertEqual(users.refresh().resolve(Address("team", "example.org")), (ALICE, Address("Bob", "example.org")))
        self.assertEqual(users.refresh().resolve(Address("any", "example.org")), (ALICE,))
        self.assertEqual(self.runCLI("alias", "remove", "Team@example.org"), (0, "removed Team@example.org\n", ""))
        self.assertEqual(self.runCLI("alias", "remove", "@example.org")[0], 0)
        self.assertEqual(self.read(), b"# ours\n")
        self.assertEqual(self.runCLI("alias", "list"), (0, "", ""))

    def test_refusals(self) -> None:
        """
        A bad address exits 64, an alias that is a user 65, a target that
        is not a local user 67, removing a missing alias 1: each with one
        line on stderr, and the file unchanged (not even created).
        """
        for args, status, message in [
            (("add", "bad/alias@example.org", "alice@example.org"), cli.EX_USAGE, "bad/alias@example.org"),
            (("add", "@bad..domain", "alice@example.org"), 1, "is not an address (alias@domain) or @domain"),
            (("add", "team@example.org", "not-an-address"), cli.EX_USAGE, "not-an-address"),
            (("add", "BOB@example.org", "alice@example.org"), cli.EX_DATAERR, "BOB@example.org is a user"),
            (("add", "team@example.org", "carol@example.org"), cli.EX_NOUSER, "carol@example.org is not a local user"),
            (("remove", "team@example.org"), 1, "no such alias team@example.org"),
        ]:
            result, out, err = self.runCLI("alias", *args)
            self.assertEqual((result, out, err.count("\n")), (status, "", 1), args)
            self.assertTrue(err.startswith("pop3gw: "), err)
            self.assertIn(message, err)
        self.assertFalse(os.path.exists(self.aliases))

    def test_aliasOutsideLocalDomains(self) -> None:
        """
        An alias (or catch-all) in a domain no user has and not a local
        domain of the configuration (C{domain}, C{--domain}) is refused
        with exit 65 and one line (mail for it would never be accepted);
        with the configuration naming it, it is taken.
        """
        for name in ("info@example.com", "@example.com"):
            status, out, err = self.runCLI("alias", "add", name, "alice@example.org")
            self.assertEqual((status, out, err.count("\n")), (cli.EX_DATAERR, "", 1), name)
            self.assertIn("example.com is not a local domain", err)
        self.assertFalse(os.path.exists(self.aliases))
        config = os.path.join(self.dataDir, "pop3gw.ini")
        with open(config, "w") as f:
            f.write(f"[pop3gw]\ndata-dir = {self.dataDir}\ndomain = example.com\n")
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(
            ["--config", config, "alias", "add", "info@example.com", "alice@example.org"],
            stdin=FakeStdin(), stdout=out, stderr=err,
        )
        self.assertEqual((status, err.getvalue()), (0, ""))
        self.assertEqual(self.read(), b"info@example.com: alice@example.org\n")

    def test_userAddRefusesAlias(self) -> None:
        """
        C{user add} of an address that is an alias (in any case) is refused
        with one line saying how to make it a user, and the users file is
        unchanged.
        """
        self.assertEqual(self.runCLI("alias", "add", "team@example.org", "alice@example.org")[0], 0)
        users = os.path.join(self.dataDir, "users")
        with open(users, "rb") as f:
            before = f.read()
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--data-dir", self.dataDir, "user", "add", "Team@example.org"],
                          stdin=FakeStdin("pw\n"), stdout=out, stderr=err)
        self.assertEqual((status, out.getvalue()), (1, ""))
        self.assertIn("Team@example.org is an alias; remove it first", err.getvalue())
        with open(users, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_malformedLines(self) -> None:
        """
        Malformed lines and second definitions are reported on stderr with
        their line numbers (C{list} then exits 65 after listing the good
        ones), and kept as written by a rewrite.
        """
        with open(self.aliases, "wb") as f:
            f.write(b"sales@example.org: alice@example.org\nbroken\nx@example.org: a@b, bad..addr@example.org\n"
                    b"sales@example.org: Bob@example.org\n")
        status, out, err = self.runCLI("alias", "list")
        self.assertEqual((status, out), (cli.EX_DATAERR, "sales@example.org: alice@example.org\n"))
        self.assertEqual(
            err,
            f"pop3gw: {self.aliases}:2: not an 'alias@domain: user@domain' line; line ignored\n"
            f"pop3gw: {self.aliases}:3: target 'bad..addr@example.org' is not an address; line ignored\n"
            f"pop3gw: {self.aliases}:4: defined again (line 1 is used); line ignored\n",
        )
        status, _, err = self.runCLI("alias", "add", "new@example.org", "alice@example.org")
        self.assertEqual((status, err.count("\n")), (0, 3))
        self.assertTrue(self.read().endswith(b"sales@example.org: Bob@example.org\nnew@example.org: alice@example.org\n"))

    def test_atomicUnderLock(self) -> None:
        """
        A rewrite waits for the users file's lock (a concurrent C{user}
        command), and a crash at the rename leaves the old file whole.
        """
        import fcntl

        with open(self.aliases, "wb") as f:
            f.write(b"old@example.org: alice@example.org\n")
        users = UsersFile(os.path.join(self.dataDir, "users"), self.aliases)
        self.assertEqual(users.lockPath, os.path.join(self.dataDir, "users.lock"))
        attempts = []
        real = fcntl.flock

        def flock(fd, op):
            attempts.append((os.readlink(f"/proc/self/fd/{fd}"), op))
            return real(fd, op)

        self.patch(fcntl, "flock", flock)

        def crash(src, dst):
            raise OSError(errno.EIO, "I/O error")

        self.patch(UsersFile, "_replace", staticmethod(crash))
        status, _, err = self.runCLI("alias", "add", "new@example.org", "alice@example.org")
        self.assertEqual(status, cli.EX_CANTCREAT)
        self.assertIn("cannot write aliases file", err)
        self.assertEqual(attempts, [(users.lockPath, fcntl.LOCK_EX)])
        self.assertEqual(self.read(), b"old@example.org: alice@example.org\n")
        self.assertEqual(sorted(os.listdir(self.dataDir)), ["aliases", "users", "users.lock"])


class DeliverToListTests(SynchronousTestCase):
    """
    C{deliver} to a distribution list, a sub-address and a catch-all.
    """

    def setUp(self) -> None:
        from tests.test_passwords import HASH_A, HASH_B

        self.dataDir = self.mktemp()
        os.makedirs(self.dataDir)
        with open(os.path.join(self.dataDir, "users"), "w") as f:
            f.write(f"alice@example.org:{HASH_A}\nbob@example.org:{HASH_B}\n")
        with open(os.path.join(self.dataDir, "aliases"), "w") as f:
            f.write("team@example.org: alice@example.org, bob@example.org, alice@example.org\n@example.org: bob@example.org\n")

    def runCLI(self, *args: str, data: bytes = b""):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--data-dir", self.dataDir, *args], stdin=FakeStdin("", data), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def newMessages(self, user: str) -> list:
        new = os.path.join(self.dataDir, "mail", "example.org", user, "new")
        result = []
        for name in sorted(os.listdir(new)) if os.path.isdir(new) else ():
            with open(os.path.join(new, name), "rb") as f:
                result.append(f.read())
        return result

    def test_list(self) -> None:
        """
        A message delivered to a list lands once, unchanged, in each
        target's maildrop (exit 0).
        """
        self.assertEqual(self.runCLI("deliver", "TEAM@example.org", data=b"Subject: x\n\nhi\n"), (0, "", ""))
        self.assertEqual(self.newMessages("alice"), [b"Subject: x\n\nhi\n"])
        self.assertEqual(self.newMessages("bob"), [b"Subject: x\n\nhi\n"])

    def test_subaddressAndCatchAll(self) -> None:
        """
        A sub-address goes to its base user, any other address of the
        domain to the catch-all; another domain is still unknown (67).
        """
        self.assertEqual(self.runCLI("deliver", "alice+news@example.org", data=b"A\n")[0], 0)
        self.assertEqual(self.runCLI("deliver", "whoever@example.org", data=b"B\n")[0], 0)
        self.assertEqual(self.newMessages("alice"), [b"A\n"])
        self.assertEqual(self.newMessages("bob"), [b"B\n"])
        self.assertEqual(self.runCLI("deliver", "whoever@example.net", data=b"C\n")[0], cli.EX_NOUSER)

    def test_listFailureTemporary(self) -> None:
        """
        If one copy cannot be stored, the command exits 75 and no target
        keeps a copy (the MTA retries the whole list).
        """
        os.makedirs(os.path.join(self.dataDir, "mail", "example.org"))
        with open(os.path.join(self.dataDir, "mail", "example.org", "bob"), "w") as f:
            f.write("not a maildir")
        status, _, err = self.runCLI("deliver", "team@example.org", data=b"Subject: x\n\nhi\n")
        self.assertEqual((status, err.count("\n")), (cli.EX_TEMPFAIL, 1))
        self.assertEqual(self.newMessages("alice"), [])


SPOOF = b"From: The Boss <boss@bad.example>\nSubject: urgent\n\nPay this.\n"


class DeliverCheckTests(TestCase):
    """
    C{deliver} with C{[inbound] lmtp-checks = yes}: the checks of C{--mx}
    against a DNS server on loopback (the command runs in a thread, the
    server in the reactor), the client named by C{--client-address} and
    C{--client-helo} (Postfix pipe(8)'s C{${client_address}} and
    C{${client_helo}}), the sender by C{--sender}.
    """

    def setUp(self) -> None:
        self.dataDir = self.mktemp()
        os.makedirs(self.dataDir)
        status = cli.main(["--data-dir", self.dataDir, "user", "add", "alice@example.org"],
                          stdin=FakeStdin("pw\n"), stdout=io.StringIO(), stderr=io.StringIO())
        self.assertEqual(status, 0)
        self.maildir = os.path.join(self.dataDir, "mail", "example.org", "alice")
        self.authority, port, ports = listen(reactor, {
            "bad.example": [txt("v=spf1 ip4:192.0.2.1 -all")],
            "_dmarc.bad.example": [txt("v=DMARC1; p=reject")],
        })
        for p in ports:
            self.addCleanup(p.stopListening)
        self.port = port

    async def deliver(self, *options: str, settings: str = "", data: bytes = SPOOF):
        ini = os.path.join(self.dataDir, "test.ini")
        with open(ini, "w") as f:
            f.write(f"[pop3gw]\nhostname = mail.example.org\n[inbound]\nlmtp-checks = yes\n"
                    f"dns-server = 127.0.0.1:{self.port}\ntrusted-authserv-ids = mx1.example.org\n{settings}")
        out, err = io.StringIO(), io.StringIO()
        status = await threads.deferToThread(
            cli.main, ["--config", ini, "--data-dir", self.dataDir, "deliver", *options, "alice@example.org"],
            stdin=FakeStdin("", data), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def stored(self) -> list:
        out = []
        new = os.path.join(self.maildir, "new")
        for name in sorted(os.listdir(new) if os.path.isdir(new) else []):
            with open(os.path.join(self.maildir, "new", name), "rb") as f:
                out.append(f.read())
        return out

    async def test_quarantinedByDefault(self) -> None:
        """
        SPF fail from the named client, no DKIM, p=reject: stored (exit 0)
        with the results on top, C{X-Spam-Flag: YES} and the subject tag.
        """
        result = await self.deliver("--client-address", "192.0.2.99", "--client-helo", "client.bad.example",
                                    "--sender", "boss@bad.example")
        self.assertEqual(result, (cli.EX_OK, "", ""))
        self.assertEqual(self.stored(), [
            b"Authentication-Results: mail.example.org;\n\tspf=fail smtp.mailfrom=boss@bad.example;\n"
            b"\tdkim=none;\n\tdmarc=fail header.from=bad.example policy.dmarc=reject\n"
            b"X-Spam-Flag: YES\nFrom: The Boss <boss@bad.example>\nSubject: [SPAM] urgent\n\nPay this.\n"])

    def rspamd(self, answer: dict) -> tuple:
        """
        A fake rspamd on loopback answering C{answer}; the settings that
        name it.
        """
        from twisted.web import server

        from tests.test_inbound import RspamdResource

        fake = RspamdResource(json.dumps(answer).encode())
        site = server.Site(fake)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return fake, f"checks = no\nrspamd-url = http://127.0.0.1:{port.getHost().port}/checkv2\n"

    async def test_rspamdAsked(self) -> None:
        """
        With C{rspamd-url}, C{deliver} asks rspamd too (blocking), with the
        envelope in its request headers: C{reject} exits 77 (EX_NOPERM)
        with one line and stores nothing; C{add header} stores the message
        flagged as spam.
        """
        fake, settings = self.rspamd({"action": "reject", "score": 20.0})
        result = await self.deliver("--client-address", "192.0.2.99", "--client-helo", "client.example",
                                    "--sender", "x@remote.example", settings=settings, data=b"Subject: hi\n\nyes\n")
        self.assertEqual(result, (cli.EX_NOPERM, "", "pop3gw: message refused: 550 5.7.1 Message rejected as spam\n"))
        self.assertEqual(self.stored(), [])
        [(path, headers, body)] = fake.requests
        self.assertEqual((path, body), (b"/checkv2", b"Subject: hi\r\n\r\nyes\r\n"))
        self.assertEqual(
            (headers[b"Ip"], headers[b"Helo"], headers[b"From"], headers[b"Rcpt"], headers[b"Mta-Name"]),
            ([b"192.0.2.99"], [b"client.example"], [b"x@remote.example"], [b"alice@example.org"], [b"mail.example.org"]),
        )
        fake, settings = self.rspamd({"action": "add header", "score": 7.5})
        result = await self.deliver(settings=settings, data=b"Subject: hi\n\nyes\n")
        self.assertEqual(result, (cli.EX_OK, "", ""))
        self.assertEqual(self.stored(), [b"X-Spam-Flag: YES\nX-Spam-Score: 7.50\nSubject: [SPAM] hi\n\nyes\n"])

    async def test_rspamdUnreachable(self) -> None:
        """
        rspamd that cannot be reached: stored without its verdict (fail
        open, the default) with a warning; C{rspamd-failure = defer} exits 75.
        """
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        closed = port.getHost().port
        await port.stopListening()
        settings = f"checks = no\nrspamd-url = http://127.0.0.1:{closed}/checkv2\nrspamd-timeout = 5\n"
        with capturedLogs() as events:
            result = await self.deliver(settings=settings, data=b"Subject: hi\n\nyes\n")
        self.assertEqual(result, (cli.EX_OK, "", ""))
        self.assertEqual(len(self.stored()), 1)
        self.assertIn("deliver: rspamd not usable: ", "".join(formatEvent(e) for e in events))
        result = await self.deliver(settings=settings + "rspamd-failure = defer\n", data=b"Subject: hi\n\nyes\n")
        self.assertEqual(result[0], cli.EX_TEMPFAIL)
        self.assertEqual(len(self.stored()), 1)

    async def test_rejectExits77(self) -> None:
        """
        With C{lmtp-dmarc-reject = yes} the failure exits 77 (EX_NOPERM:
        the MTA bounces) with one line, and nothing is stored.
        """
        result = await self.deliver("--client-address", "192.0.2.99", "--sender", "boss@bad.example",
                                    settings="lmtp-dmarc-reject = yes\n")
        self.assertEqual(result, (cli.EX_NOPERM, "",
                                  "pop3gw: message refused: 550 5.7.1 Message rejected by the sender domain's "
                                  "DMARC policy\n"))
        self.assertEqual(self.stored(), [])

    async def test_noClientAddress(self) -> None:
        """
        Without a client address (or with Postfix's C{unknown}) SPF is
        C{none} and DMARC rests on DKIM alone: it fails here, and the
        message is tagged.
        """
        result = await self.deliver("--client-address", "unknown", "--sender", "")
        self.assertEqual(result, (cli.EX_OK, "", ""))
        [data] = self.stored()
        self.assertTrue(data.startswith(
            b"Authentication-Results: mail.example.org;\n\tspf=none;\n\tdkim=none;\n"
            b"\tdmarc=fail header.from=bad.example policy.dmarc=reject\nX-Spam-Flag: YES\n"), data)

    async def test_trustedFrontUnchanged(self) -> None:
        """
        A message whose topmost C{Authentication-Results:} names a trusted
        front MTA is stored unchanged, without a DNS query.
        """
        data = b"Authentication-Results: mx1.example.org; dmarc=pass header.from=bad.example\n" + SPOOF
        result = await self.deliver("--client-address", "192.0.2.99", "--sender", "boss@bad.example", data=data)
        self.assertEqual(result, (cli.EX_OK, "", ""))
        self.assertEqual(self.stored(), [data])
        self.assertEqual(self.authority.queries, [])


class DeliverClientOptionsTests(SynchronousTestCase):
    """
    C{deliver}'s C{--client-address}, C{--client-helo} and C{--sender}
    are checked before anything is read.
    """

    def test_bad(self) -> None:
        """
        A client address that is not an IP address, a HELO name with a
        space, or a sender that is not an address exits 64 with one line.
        """
        dataDir = self.mktemp()
        os.makedirs(dataDir)
        for options, message in (
            (("--client-address", "mx.example"), "--client-address: 'mx.example' is not an IP address"),
            (("--client-helo", "a b"), "--client-helo: 'a b' is not a host name"),
            (("--sender", "no-at-sign"), "--sender: 'no-at-sign' is not an address"),
        ):
            out, err = io.StringIO(), io.StringIO()
            status = cli.main(["--data-dir", dataDir, "deliver", *options, "alice@example.org"],
                              stdin=FakeStdin("", b"Subject: x\n\nhi\n"), stdout=out, stderr=err)
            self.assertEqual((status, err.getvalue()), (cli.EX_USAGE, f"pop3gw: {message}\n"))

    def test_nullSenderAndUnknownClient(self) -> None:
        """
        The null sender written C{<>} or empty, Postfix's C{unknown}
        client address and an empty HELO are taken (no client, no sender).
        """
        dataDir = self.mktemp()
        os.makedirs(dataDir)
        cli.main(["--data-dir", dataDir, "user", "add", "alice@example.org"], stdin=FakeStdin("pw\n"),
                 stdout=io.StringIO(), stderr=io.StringIO())
        for sender in ("<>", ""):
            out, err = io.StringIO(), io.StringIO()
            status = cli.main(["--data-dir", dataDir, "deliver", "--sender", sender, "--client-address", "unknown",
                               "--client-helo", "", "alice@example.org"],
                              stdin=FakeStdin("", b"Subject: x\n\nhi\n"), stdout=out, stderr=err)
            self.assertEqual((status, err.getvalue()), (cli.EX_OK, ""))
