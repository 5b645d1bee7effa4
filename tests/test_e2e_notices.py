"""
End-to-end: the real C{twistd -n pop3gw} sends the postmaster a notice
when a bounce cannot be returned to its sender.
"""

from __future__ import annotations

import poplib
import re
import signal
import smtplib

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess
from tests.test_e2e_submission import Sink

ALICE, ALICE_PW = "alice@example.org", "alice-secret"
BOB, BOB_PW = "bob@example.org", "bob-secret"
MESSAGE = (
    b"From: alice@example.org\r\n"
    b"To: carol@remote.example\r\n"
    b"Subject: to a mailbox that is gone\r\n"
    b"Date: Tue, 01 Dec 2026 12:00:00 +0000\r\n"
    b"Message-ID: <notice-e2e@example.org>\r\n"
    b"\r\n"
    b"Hello Carol.\r\n"
)


class PostmasterNoticeTests(SynchronousTestCase):
    """
    Notices to C{[pop3gw] postmaster}.
    """

    def test_senderGone(self) -> None:
        """
        Alice's message to a remote recipient is deferred (451), alice is
        removed, and the retry is refused for good (550): her bounce cannot
        be returned, so the postmaster, bob, gets the notice over POP3,
        naming the failed recipient and why; the log says so in one line
        and the queue is empty.
        """
        sink = Sink(self, replies=("451 4.3.0 try again later", "550 5.1.1 no such user"))
        server = Pop3gwProcess(
            self,
            args=["--domain", "example.org", "--relay-host", f"127.0.0.1:{sink.port}"],
            extraConfig="[pop3gw]\npostmaster = bob@example.org\n",
        )
        server.addUser(ALICE, ALICE_PW)
        server.addUser(BOB, BOB_PW)
        server.start()
        client = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
        self.addCleanup(client.close)
        client.login(ALICE, ALICE_PW)
        client.sendmail(ALICE, ["carol@remote.example"], MESSAGE)
        client.quit()
        server.waitForLog(r"relay: .*carol@remote\.example.*451 4\.3\.0 try again later")
        server.cli("user", "remove", ALICE)
        server.signal(signal.SIGHUP)
        server.waitForLog(r"SIGHUP: reloading users")
        server.cli("queue", "flush")
        line = server.waitForLog(r"relay: bounce for \S+ cannot be returned", timeout=30)
        queueId = re.search(r"bounce for (\S+) ", line).group(1)
        self.assertIn(f"relay: bounce for {queueId} cannot be returned: sender alice@example.org is not a local "
                      "user any more; notice sent to postmaster bob@example.org", line)
        pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        self.addCleanup(pop.close)
        pop.user(BOB)
        pop.pass_(BOB_PW)
        [notice] = [b"\r\n".join(pop.retr(i)[1]) + b"\r\n" for i in range(1, pop.stat()[0] + 1)]
        pop.quit()
        self.assertIn(b"\r\nTo: <bob@example.org>\r\nSubject: Postmaster Copy: Undelivered Mail\r\n", notice)
        self.assertIn(
            b"\r\nThe report could not be returned to its sender <alice@example.org>:\r\n"
            b"the sender is not a local user any more.\r\n", notice)
        self.assertIn(f"\r\nQueue id: {queueId}\r\n\r\n<carol@remote.example>: 550 5.1.1 no such user\r\n".encode(),
                      notice)
        self.assertIn(b"\r\nSubject: to a mailbox that is gone\r\n", notice)
        self.assertEqual(sink.attempts, 2)
        self.assertEqual(server.cli("queue", "list").stdout, b"")
