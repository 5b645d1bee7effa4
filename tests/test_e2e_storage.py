"""
End-to-end: the real C{twistd pop3gw} and C{pop3gw deliver} on a data
directory whose file system is full (a 1 MiB tmpfs, mounted for the test and
unmounted after it; skipped where mounting is not permitted).
"""

from __future__ import annotations

import errno
import os
import poplib
import re
import smtplib
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess

ALICE, ALICE_PW = "alice@example.org", "alice secret"
BOB, BOB_PW = "bob@example.org", "bob secret"
MESSAGE = (
    f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: full disk\r\nMessage-ID: <full@example.org>\r\n"
    "Date: Thu, 26 Nov 2026 12:00:00 +0000\r\n\r\nhello\r\n"
).encode()


def mountTmpfs(testcase, size: str = "1m") -> str:
    """
    Mount a tmpfs of C{size} on a new directory, unmounted and removed in
    the test's cleanups (registered before anything else may use it, so
    they run last); skip the test where it cannot be mounted.
    """
    if os.geteuid() != 0:
        testcase.skipTest("mounting a tmpfs needs root")
    path = tempfile.mkdtemp(prefix="pop3gw-full-")
    testcase.addCleanup(os.rmdir, path)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
                            capture_output=True, timeout=30)
    if result.returncode != 0:
        testcase.skipTest(f"cannot mount a tmpfs here: {result.stderr.decode(errors='replace').strip()}")
    testcase.addCleanup(subprocess.run, ["umount", path], check=True, timeout=30)
    return path


def fill(path: str) -> str:
    """
    Write a file under C{path} until the file system is full.

    @return: the file's path.
    """
    filler = os.path.join(path, "filler")
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return filler


class FullDiskTests(SynchronousTestCase):
    def test_fullDiskNamed(self) -> None:
        """
        On a full disk, submission answers C{452 4.3.1 Insufficient system
        storage} and logs the error in words, C{deliver} exits 75 with one
        line naming it, POP3 still serves and deletes what is stored, and
        once space is freed submission accepts again.
        """
        dataDir = mountTmpfs(self)
        server = Pop3gwProcess(self, args=["--domain", "example.org"], dataDir=dataDir).start()
        server.addUser(ALICE, ALICE_PW)
        server.addUser(BOB, BOB_PW)
        server.deliver(BOB, MESSAGE)
        filler = fill(dataDir)

        client = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
        self.addCleanup(client.close)
        client.login(ALICE, ALICE_PW)
        with self.assertRaises(smtplib.SMTPDataError) as caught:
            client.sendmail(ALICE, [BOB], MESSAGE)
        self.assertEqual(caught.exception.args, (452, b"4.3.1 Insufficient system storage"))
        server.waitForLog(
            re.escape(f'submission: refused message user="{ALICE}" from="{ALICE}" '
                      'reply="452 4.3.1 Insufficient system storage" error="')
            + r'cannot (start delivery|deliver message): No space left on device"'
        )

        result = server.cli("deliver", BOB, input=MESSAGE, check=False)
        self.assertEqual(result.returncode, 75, result.stderr)
        self.assertRegex(
            result.stderr.decode(),
            r"\Apop3gw: cannot deliver to bob@example\.org: insufficient storage: "
            r"cannot (start delivery|deliver message): No space left on device\n\Z",
        )

        pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        self.addCleanup(pop.close)
        pop.user(BOB)
        pop.pass_(BOB_PW)
        self.assertEqual(pop.stat(), (1, len(MESSAGE)))
        self.assertEqual(b"\r\n".join(pop.retr(1)[1]) + b"\r\n", MESSAGE)
        pop.dele(1)
        pop.quit()

        os.unlink(filler)
        client.sendmail(ALICE, [BOB], MESSAGE)
        client.quit()
