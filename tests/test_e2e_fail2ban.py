"""
End-to-end: the failed-login lines the real server writes are matched by
the shipped fail2ban filter (checked with fail2ban's own C{fail2ban-regex}).
"""

from __future__ import annotations

import base64
import os
import poplib
import re
import smtplib
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess, requireProgram

FILTER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "fail2ban", "filter.d",
                      "pop3gw.conf")


class Fail2banTests(SynchronousTestCase):
    def test_filterMatchesFailedLogins(self) -> None:
        """
        A wrong POP3 password and a wrong submission password each produce
        one line that the shipped filter matches with the client's address
        (127.0.0.1); successful logins are not matched.
        """
        regex = requireProgram(self, "fail2ban-regex")
        server = Pop3gwProcess(self).start()
        server.addUser("alice@example.org", "right")
        pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        self.addCleanup(pop.close)
        pop.user("alice@example.org")
        self.assertRaises(poplib.error_proto, pop.pass_, "wrong")
        pop.user("alice@example.org")
        pop.pass_("right")
        pop.quit()
        smtp = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
        self.addCleanup(smtp.close)
        smtp.ehlo("client.example")
        token = base64.b64encode(b"\0nobody@example.org\0wrong").decode()
        self.assertEqual(smtp.docmd("AUTH", "PLAIN " + token)[0], 535)
        smtp.quit()
        server.waitForLog(r"authentication failed: service=submission")

        work = tempfile.mkdtemp(prefix="pop3gw-f2b-")
        self.addCleanup(__import__("shutil").rmtree, work, True)
        logPath = os.path.join(work, "pop3gw.log")
        with open(logPath, "w") as f:
            f.write(server.log())
            # Remote text that made it into another log line (a relay
            # error, say) must never name an address to ban.
            f.write(
                "2026-11-26T16:25:11+0000 [pop3gw.queue.RelayService#warn] relay: Q1 error=\"421 "
                "[pop3gw.pop3.POP3Server#warn] authentication failed: service=pop3 rhost=203.0.113.9 user=x\"\n"
            )
        result = subprocess.run([regex, "--print-all-matched", logPath, FILTER], capture_output=True, timeout=120)
        out = result.stdout.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 0, out + result.stderr.decode())
        self.assertRegex(out, r"Failregex: 2 total")
        section = out.split("Matched line(s):", 1)[1].split("`-", 1)[0]
        matched = [line for line in section.splitlines() if re.match(r"\|\s+\d{4}-\d\d-\d\dT", line)]
        self.assertEqual(len(matched), 2, out)
        self.assertTrue(all(re.search(r"rhost=127\.0\.0\.1 ", line) for line in matched))
        self.assertNotIn("203.0.113.9", section)

    def test_mxRefusalsNotMatched(self) -> None:
        """
        Recipients the MX listener refuses (relay denied, unknown user) are
        logged, and the shipped filter matches none of those lines: they
        are not failed logins.
        """
        regex = requireProgram(self, "fail2ban-regex")
        server = Pop3gwProcess(self, args=["--domain", "example.org"], listeners=("pop3", "mx"))
        server.addUser("alice@example.org", "right")
        server.start()
        smtp = smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30)
        self.addCleanup(smtp.close)
        smtp.ehlo("client.example")
        smtp.mail("someone@remote.example")
        for rcpt in ("carol@remote.example", "nobody@example.org", "alice%remote.example@example.org"):
            self.assertEqual(smtp.rcpt(rcpt)[0], 550)
        self.assertEqual(smtp.docmd("AUTH", "PLAIN AGFsaWNlAHdyb25n")[0], 500)
        smtp.quit()
        server.waitForLog(r'mx: refused recipient .*to="alice%remote\.example@example\.org"')

        work = tempfile.mkdtemp(prefix="pop3gw-f2b-")
        self.addCleanup(__import__("shutil").rmtree, work, True)
        logPath = os.path.join(work, "pop3gw.log")
        with open(logPath, "w") as f:
            f.write(server.log())
        self.assertEqual(len(re.findall(r"mx: refused recipient rhost=127\.0\.0\.1 ", server.log())), 3)
        result = subprocess.run([regex, logPath, FILTER], capture_output=True, timeout=120)
        out = result.stdout.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 0, out + result.stderr.decode())
        self.assertRegex(out, r"Failregex: 0 total")
