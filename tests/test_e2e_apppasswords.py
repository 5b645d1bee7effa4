"""
End-to-end: scoped app passwords on the real C{twistd pop3gw}.
"""

from __future__ import annotations

import poplib
import smtplib

from twisted.trial.unittest import SynchronousTestCase

from tests.test_e2e_submission import ALICE, ALICE_PW, BOB, SubmissionTestMixin, message


class AppPasswordEndToEndTests(SubmissionTestMixin, SynchronousTestCase):
    def pop3Login(self, server, password: str) -> bool:
        pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        try:
            pop.user(ALICE)
            try:
                pop.pass_(password)
            except poplib.error_proto:
                return False
            pop.quit()
            return True
        finally:
            pop.close()

    def test_scopes(self) -> None:
        """
        A pop3 app password made with the command works for POP3 at once
        and is refused on submission (535); after C{user scope ... none}
        the main password is refused on both, the app password still
        fetches, and C{app-password list} shows when and from where it
        was last used.
        """
        server = self.startServer()
        out = server.cli("user", "app-password", "add", ALICE, "--name", "phone", "--scope", "pop3").stdout
        phone = out.decode().splitlines()[-1]
        self.assertTrue(self.pop3Login(server, phone))
        client = self.smtp(server)
        self.assertRaises(smtplib.SMTPAuthenticationError, client.login, ALICE, phone)
        client.quit()
        server.cli("user", "scope", ALICE, "none")
        self.assertFalse(self.pop3Login(server, ALICE_PW))
        client = self.smtp(server)
        self.assertRaises(smtplib.SMTPAuthenticationError, client.login, ALICE, ALICE_PW)
        client.quit()
        self.assertTrue(self.pop3Login(server, phone))
        listing = server.cli("user", "app-password", "list", ALICE).stdout.decode()
        self.assertRegex(listing, r"^phone scope=pop3 created .* UTC, last used .* UTC from 127\.0\.0\.1\n$")
        server.cli("user", "scope", ALICE, "all")
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        client.sendmail(ALICE, [BOB], message())
        client.quit()
