"""
End-to-end: per-user sending limits on the real C{twistd pop3gw}.
"""

from __future__ import annotations

import time

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess
from tests.test_e2e_submission import ALICE, ALICE_PW, BOB, BOB_PW, SubmissionTestMixin, message

POSTMASTER, POSTMASTER_PW = "admin@example.org", "admin secret"


class SendingLimitEndToEndTests(SubmissionTestMixin, SynchronousTestCase):
    def test_suspendAndLift(self) -> None:
        """
        With messages-per-hour 2: the third message is refused 451 4.7.1
        at RCPT, the postmaster gets one notice naming the user, C{user
        list} marks alice, a restart keeps the suspension, fetching still
        works, and C{user unsuspend} lets alice send again.
        """
        config = f"messages-per-hour = 2\n[pop3gw]\npostmaster = {POSTMASTER}\n"
        server = self.startServer(extraConfig=config)
        server.addUser(POSTMASTER, POSTMASTER_PW)
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        for i in range(2):
            client.sendmail(ALICE, [BOB], message(subject=f"m{i}"))
        client.mail(ALICE)
        self.assertEqual(client.rcpt(BOB), (451, b"4.7.1 Sending limit reached; ask your administrator"))
        client.rset()
        server.waitForLog(r"sending suspended: user=alice@example\.org rhost=127\.0\.0\.1 reason=messages-per-hour")
        # The warning is logged as the notice is handed to local delivery:
        # wait (bounded) for it to be stored.
        deadline = time.monotonic() + 10
        notices = self.fetchAll(server, POSTMASTER, POSTMASTER_PW)
        while not notices and time.monotonic() < deadline:
            time.sleep(0.1)
            notices = self.fetchAll(server, POSTMASTER, POSTMASTER_PW)
        self.assertEqual(len(notices), 1)
        self.assertIn(b"Subject: sending suspended for alice@example.org\r\n", notices[0])
        self.assertIn(b"  127.0.0.1\r\n", notices[0])
        self.assertIn(b"alice@example.org (sending suspended)\n", server.cli("user", "list").stdout)
        client.quit()

        server.stop()
        server = Pop3gwProcess(self, args=["--domain", "example.org"], dataDir=server.dataDir,
                               config=server.config).start()
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        client.mail(ALICE)
        self.assertEqual(client.rcpt(BOB)[0], 451)
        client.rset()
        self.assertEqual(len(self.fetchAll(server, ALICE, ALICE_PW)), 0)
        self.assertEqual(len(self.fetchAll(server, BOB, BOB_PW)), 2)

        self.assertEqual(server.cli("user", "unsuspend", ALICE).stdout,
                         b"alice@example.org: sending allowed again; counters cleared\n")
        client.sendmail(ALICE, [BOB], message(subject="again"))
        client.quit()
        self.assertEqual(len(self.fetchAll(server, BOB, BOB_PW)), 3)
