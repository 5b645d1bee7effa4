"""
End-to-end: one C{twistd pop3gw} per data directory, while the C{pop3gw}
command keeps working next to it.
"""

from __future__ import annotations

import poplib
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess

ALICE = "alice@example.org"
PASSWORD = "correct horse battery"
MESSAGE = b"From: bob@example.org\nSubject: hi\n\nbody\n"


class OneServerPerDataDirectoryTests(SynchronousTestCase):
    def retrieveAll(self, server: Pop3gwProcess) -> list:
        client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        try:
            client.user(ALICE)
            client.pass_(PASSWORD)
            count = client.stat()[0]
            messages = [b"\n".join(client.retr(i)[1]) + b"\n" for i in range(1, count + 1)]
            client.quit()
        finally:
            client.close()
        return messages

    def test_secondServerRefused(self) -> None:
        """
        A second C{twistd -n pop3gw} on the data directory of a running
        server exits non-zero, without listening, with one error line (on
        stderr, which twistd writes into its log) naming the running
        server's pid, and no traceback.  The C{pop3gw} command works next
        to the running server (C{user add}, C{deliver}, C{queue list}).
        Once the first server is killed (C{kill -9}), a new one starts on
        the same data directory and serves the mail.
        """
        first = Pop3gwProcess(self).start()
        first.addUser(ALICE, PASSWORD)
        first.deliver(ALICE, MESSAGE)
        self.assertEqual(first.cli("queue", "list").stdout, b"")

        second = Pop3gwProcess(self, dataDir=first.dataDir)
        result = subprocess.run(second.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=60)
        output = result.stdout.decode()
        self.assertNotEqual(result.returncode, 0, output)
        # twistd writes what goes to stderr into its log (here stdout).
        refusal = (f"pop3gw: another pop3gw server (pid {first.proc.pid}) is running on the data directory "
                   f"{first.dataDir}")
        errors = [line for line in output.splitlines() if "#error]" in line or "#critical]" in line]
        self.assertEqual(len(errors), 1, output)
        self.assertTrue(errors[0].endswith(" [stderr#error] " + refusal), output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("listening on", output)
        self.assertEqual(self.retrieveAll(first), [MESSAGE])

        first.proc.kill()
        first.proc.wait(15)
        third = Pop3gwProcess(self, dataDir=first.dataDir).start()
        self.assertEqual(self.retrieveAll(third), [MESSAGE])
