"""
End-to-end: users in the real C{twistd pop3gw} and C{pop3gw} command:
importing a Dovecot passwd-file, the first login of a migrated user, and
addresses in any case.
"""

from __future__ import annotations

import os
import poplib
import smtplib
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess

ERR_AUTH_TEMP = b"-ERR [SYS/TEMP] Authentication temporarily unavailable."

# "openssl passwd -5 -salt saltsalt password"
SHA256_CRYPT = "{SHA256-CRYPT}$5$saltsalt$gOjOtoMpVhru2uyjeJSEc/JaLQWOXMNmlOnj6T4AtC."
CRAM_MD5 = "{CRAM-MD5}4b4d1e4cbd12d2c8fbd1a4d6b83a4cb3d1a1c4f9c9b2a8e3b4c5d6e7f8091a2b"


def _closeQuietly(client) -> None:
    try:
        client.close()
    except OSError:
        pass


class UsersEndToEndTests(SynchronousTestCase):
    def pop(self, server: Pop3gwProcess) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        self.addCleanup(_closeQuietly, client)
        return client

    def usersFile(self, server: Pop3gwProcess) -> str:
        with open(os.path.join(server.dataDir, "users")) as f:
            return f.read()

    def test_importAndFirstLoginUpgrade(self) -> None:
        """
        C{pop3gw user import} of a Dovecot passwd-file takes the
        C{{SHA256-CRYPT}} and C{{PLAIN}} lines (the plain one hashed with
        Argon2id, never stored in clear) and reports the C{{CRAM-MD5}} one
        with exit 65.  The server warns at load about a user it cannot
        verify and refuses a C{{PLAIN}} line at login as a server-side
        problem (C{[SYS/TEMP]}), not as a failed login fail2ban would count;
        so is a hash malformed for its scheme.  Each is warned about once,
        not again when the re-hash rewrite makes the file reload.  The migrated user
        logs in over POP3 (in another case) with its old password, and at
        that first login its line in the users file becomes C{{ARGON2ID}},
        logged; it keeps logging in.
        """
        server = Pop3gwProcess(self)
        source = os.path.join(server.dataDir, "dovecot-users")
        with open(source, "w") as f:
            f.write(
                f"bob@example.org:{SHA256_CRYPT}:1000:1000::/home/bob::\n"
                "carol@example.org:{PLAIN}carol's secret\n"
                f"dave@example.org:{CRAM_MD5}\n"
            )
        result = server.cli("user", "import", source, check=False)  # the server is not running yet
        self.assertEqual(result.returncode, 65, result.stderr)
        self.assertEqual(
            result.stdout.decode(),
            f"imported 2 user(s) from {source} (1 plain-text password(s) hashed with Argon2id); 1 line(s) not taken\n",
        )
        self.assertEqual(
            result.stderr.decode(),
            f"pop3gw: {source}:3: dave@example.org: password scheme CRAM-MD5 cannot be verified by pop3gw\n",
        )
        self.assertEqual(server.cli("user", "list").stdout, b"bob@example.org\ncarol@example.org\n")
        content = self.usersFile(server)
        self.assertIn(f"bob@example.org:{SHA256_CRYPT}:1000:1000::/home/bob::\n", content)
        self.assertNotIn("carol's secret", content)
        # A plain-text line written by hand is warned about and refused.
        with open(os.path.join(server.dataDir, "users"), "a") as f:
            f.write("erin@example.org:{PLAIN}erin's secret\n")
            # So is a hash malformed for its scheme.
            f.write("frank@example.org:{SSHA512}!!notbase64!!\n")

        server.start()
        server.waitForLog(r"users file .* line 3: erin@example\.org has password scheme PLAIN, which pop3gw does not")
        client = self.pop(server)
        client.user("erin@example.org")
        with self.assertRaises(poplib.error_proto) as refused:
            client.pass_("erin's secret")
        self.assertEqual(refused.exception.args[0], ERR_AUTH_TEMP)
        server.waitForLog(r'authentication unavailable: service=pop3 rhost=127\.0\.0\.1 user="erin@example\.org" error="the password scheme of erin')
        server.waitForLog(r"users file .* line 4: frank@example\.org has a malformed SSHA512 hash, which pop3gw does not")
        client = self.pop(server)
        client.user("frank@example.org")
        with self.assertRaises(poplib.error_proto) as refused:
            client.pass_("anything")
        self.assertEqual(refused.exception.args[0], ERR_AUTH_TEMP)
        server.waitForLog(r'authentication unavailable: service=pop3 rhost=127\.0\.0\.1 user="frank@example\.org" '
                          r'error="the password hash of frank@example\.org is malformed for its scheme"')
        self.assertNotIn("authentication failed", server.log())

        client = self.pop(server)
        client.user("BOB@Example.ORG")
        self.assertTrue(client.pass_("password").startswith(b"+OK"))
        client.quit()
        server.waitForLog(r"upgraded the password hash of bob@example\.org from SHA256-CRYPT to ARGON2ID")
        server.waitForLog(r'login: service=pop3 rhost=127\.0\.0\.1 user="bob@example\.org" tls=no')
        bob = [line for line in self.usersFile(server).splitlines() if line.startswith("bob@")]
        self.assertEqual(len(bob), 1)
        self.assertRegex(bob[0], r"^bob@example\.org:\{ARGON2ID\}\$argon2id\$v=19\$[^:]+:1000:1000::/home/bob::$")

        for user, password in (("bob@example.org", "password"), ("carol@example.org", "carol's secret")):
            client = self.pop(server)
            client.user(user)
            self.assertTrue(client.pass_(password).startswith(b"+OK"), user)
            client.quit()
        self.assertNotIn("secret", server.log())
        self.assertNotIn("notbase64", server.log())
        # The re-hash rewrote the file, which was then read again: the users
        # already warned about are not warned about again.
        self.assertEqual(server.log().count("erin@example.org has password scheme PLAIN"), 1)
        self.assertEqual(server.log().count("frank@example.org has a malformed SSHA512 hash"), 1)

    def test_addressesInAnyCase(self) -> None:
        """
        Mail for C{ALICE@Example.ORG} reaches alice's maildrop (the stored
        spelling); she logs in as C{Alice@example.org} and retrieves it;
        she submits as C{ALICE@...} with C{From: Alice <ALICE@Example.ORG>}
        to C{Alice@...}; the log names her as stored every time.
        """
        server = Pop3gwProcess(self).start()
        server.addUser("alice@example.org", "pw")
        self.assertEqual(server.cli("user", "add", "Alice@example.org", input=b"x\n", check=False).returncode, 1)
        server.deliver("ALICE@Example.ORG", b"Subject: one\n\nhi\n")
        self.assertEqual(len(os.listdir(os.path.join(server.maildir("alice@example.org"), "new"))), 1)

        submission = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
        self.addCleanup(_closeQuietly, submission)
        submission.login("ALICE@example.org", "pw")
        submission.sendmail(
            "Alice@example.org",
            ["ALICE@example.org"],
            b"From: Alice <ALICE@Example.ORG>\r\nTo: alice@example.org\r\nSubject: two\r\n\r\nhello\r\n",
        )
        submission.quit()
        server.waitForLog(r'login: service=submission rhost=127\.0\.0\.1 user="alice@example\.org"')

        client = self.pop(server)
        client.user("Alice@example.org")
        client.pass_("pw")
        self.assertEqual(client.stat()[0], 2)
        client.quit()
        server.waitForLog(r'login: service=pop3 rhost=127\.0\.0\.1 user="alice@example\.org" tls=no')
        server.waitForLog(r'logout: service=pop3 rhost=127\.0\.0\.1 user="alice@example\.org"')
        self.assertEqual(os.listdir(os.path.join(server.dataDir, "mail", "example.org")), ["alice"])

    def test_newUserIsRecipientWithoutRestart(self) -> None:
        """
        A user added with C{pop3gw user add} while the server runs is a
        valid recipient at once for a session that logs in afterwards, and
        soon (the directory is re-read in the background) for a session
        that was already logged in; neither needs a restart or SIGHUP.
        """
        server = Pop3gwProcess(self).start()
        server.addUser("alice@example.org", "pw")
        early = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
        self.addCleanup(_closeQuietly, early)
        early.login("alice@example.org", "pw")
        early.mail("alice@example.org")
        self.assertEqual(early.rcpt("carol@example.org")[0], 550)
        server.addUser("carol@example.org", "pw")

        late = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
        self.addCleanup(_closeQuietly, late)
        late.login("alice@example.org", "pw")
        late.mail("alice@example.org")
        self.assertEqual(late.rcpt("carol@example.org")[0], 250)
        late.quit()

        deadline = time.monotonic() + 10
        while early.rcpt("carol@example.org")[0] != 250:
            self.assertLess(time.monotonic(), deadline, "the running session never saw the new user")
            time.sleep(0.2)
        early.quit()
