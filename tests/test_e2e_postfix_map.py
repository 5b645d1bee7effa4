"""
End-to-end: the real C{twistd -n pop3gw} with C{--postfix-map} on a Unix
socket, asked by Postfix's own C{postmap -q} (with a private, empty
Postfix configuration directory: never the system one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess, requireProgram


class PostfixMapEndToEndTests(SynchronousTestCase):
    """
    Postfix's socketmap client against a running server.
    """

    def setUp(self) -> None:
        self.postmap = requireProgram(self, "postmap")
        self.tmp = tempfile.mkdtemp(prefix="pop3gw-map-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.postfixConfig = os.path.join(self.tmp, "postfix")
        os.mkdir(self.postfixConfig)
        open(os.path.join(self.postfixConfig, "main.cf"), "w").close()
        self.socket = os.path.join(self.tmp, "map")
        self.server = Pop3gwProcess(
            self,
            args=["--domain", "example.org", "--domain", "example.net", "--postfix-map", f"unix:{self.socket}"],
            listeners=("pop3",),
        )
        self.server.addUser("alice@example.org", "alice-secret")
        self.server.addUser("bob@example.net", "bob-secret")
        self.server.cli("alias", "add", "team@example.org", "alice@example.org", "bob@example.net")
        self.server.cli("alias", "add", "@example.net", "bob@example.net")
        self.server.start()
        self.server.waitForLog(r"postfix-map listening on ")

    def query(self, key: str, map: str = "recipients") -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.postmap, "-c", self.postfixConfig, "-q", key, f"socketmap:unix:{self.socket}:{map}"],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )

    def test_lookups(self) -> None:
        """
        C{postmap -q} finds users in any case, sub-addresses, lists and
        catch-all addresses (printing the users they go to) and does not
        find unknown users of a domain without a catch-all, nor other
        domains.
        """
        found = {
            "alice@example.org": b"alice@example.org\n",
            "ALICE+tag@Example.ORG": b"alice@example.org\n",
            "team@example.org": b"alice@example.org,bob@example.net\n",
            "anyone@example.net": b"bob@example.net\n",
        }
        for key, value in found.items():
            result = self.query(key)
            self.assertEqual((result.returncode, result.stdout), (0, value), (key, result.stderr))
        for key in ("nobody@example.org", "alice@example.com", "@example.org"):
            result = self.query(key)
            self.assertEqual((result.returncode, result.stdout, result.stderr), (1, b"", b""), key)

    def test_unknownMap(self) -> None:
        """
        Another map name is a permanent error Postfix reports.
        """
        result = self.query("alice@example.org", map="aliases")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"socketmap server permanent error: unknown map", result.stderr)

    def test_batch(self) -> None:
        """
        C{postmap -q -} asks several keys on one connection; only the
        found ones are printed, in order.
        """
        result = subprocess.run(
            [self.postmap, "-c", self.postfixConfig, "-q", "-", f"socketmap:unix:{self.socket}:recipients"],
            input=b"alice@example.org\nnobody@example.org\nteam@example.org\n",
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(
            result.stdout,
            b"alice@example.org\talice@example.org\nteam@example.org\talice@example.org,bob@example.net\n",
        )
