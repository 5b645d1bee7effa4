"""
End-to-end: distribution lists, sub-addresses and the C{pop3gw alias}
command against the real C{twistd pop3gw}.
"""

from __future__ import annotations

import smtplib
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.test_e2e_submission import (
    ALICE,
    ALICE_PW,
    BOB,
    BOB_PW,
    SubmissionTestMixin,
    message,
    stripTrace,
)

CAROL, CAROL_PW = "carol@example.org", "carol secret"

#: How long the server may take to notice a changed aliases file (it
#: checks every two seconds).
RELOAD_DEADLINE = 20.0


class AliasesEndToEndTests(SubmissionTestMixin, SynchronousTestCase):
    def test_listAndSubaddress(self) -> None:
        """
        With the server running, C{pop3gw alias add team@ alice bob} is
        picked up without a restart: a message submitted (by carol) to
        C{team@} and C{alice+news@} lands once in alice's and once in
        bob's maildrop, and POP3 serves it byte for byte after the
        C{Received:} trace.
        """
        server = self.startServer()
        server.addUser(CAROL, CAROL_PW)
        team = "team@example.org"
        client = self.smtp(server)
        client.ehlo()
        client.login(CAROL, CAROL_PW)
        client.mail(CAROL)
        self.assertEqual(client.rcpt(team)[0], 550)
        client.rset()
        result = server.cli("alias", "add", team, ALICE, BOB)
        self.assertEqual(result.stdout, b"team@example.org: alice@example.org, bob@example.org\n")
        deadline = time.monotonic() + RELOAD_DEADLINE
        while True:
            client.mail(CAROL)
            code, reply = client.rcpt(team)
            if code == 250 or time.monotonic() > deadline:
                break
            client.rset()
            time.sleep(0.2)
        self.assertEqual((code, reply), (250, b"2.1.5 OK"))
        self.assertEqual(client.rcpt("alice+news@example.org")[0], 250)
        msg = message(sender=CAROL, to=f"{team}, alice+news@example.org", subject="news")
        self.assertEqual(client.data(msg)[0], 250)
        client.quit()
        for user, password in ((ALICE, ALICE_PW), (BOB, BOB_PW)):
            fetched = self.fetchAll(server, user, password)
            self.assertEqual([stripTrace(m) for m in fetched], [msg], user)
        self.assertEqual(self.fetchAll(server, CAROL, CAROL_PW), [])

    def test_sendAsSubaddress(self) -> None:
        """
        A user submits with C{MAIL FROM:<alice+tag@...>} and a matching
        C{From:}; someone else's sub-address is refused with 553.
        """
        server = self.startServer()
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        msg = message(sender="alice+shop@example.org", to=BOB)
        client.sendmail("alice+shop@example.org", [BOB], msg)
        self.assertRaises(smtplib.SMTPSenderRefused, client.sendmail, "bob+x@example.org", [BOB], msg)
        client.quit()
        self.assertEqual([stripTrace(m) for m in self.fetchAll(server, BOB, BOB_PW)], [msg])
