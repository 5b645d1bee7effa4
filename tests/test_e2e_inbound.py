"""
End-to-end: the real C{twistd -n pop3gw} with C{--mx}, asking a DNS server
on loopback (L{tests.dnshelpers} run as a process) for SPF, DKIM and DMARC:
signed, aligned mail is delivered with one C{Authentication-Results:} field
(a forged one removed), mail failing a p=reject DMARC policy is refused with
550 at the end of its data, and the shipped fail2ban filter does not take
that refusal for a failed login.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.dnshelpers import rsaKey, sign
from tests.e2e import Pop3gwProcess, requireProgram

BOB = "bob@example.org"
BOB_PW = "bob-secret"
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dnshelpers.py")
FILTER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "fail2ban", "filter.d",
                      "pop3gw.conf")
GOOD = (
    b"From: Alice <alice@good.example>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: signed\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <1@good.example>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)
FORGED = b"Authentication-Results: MAIL.example.org; dmarc=pass header.from=bad.example\r\n"
SPOOF = (
    b"From: The Boss <boss@bad.example>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: urgent\r\n"
    b"\r\n"
    b"Pay this.\r\n"
)


class InboundEndToEndTests(SynchronousTestCase):
    """
    The inbound checks of a real server against a real DNS server.
    """

    def startDNS(self, zone: dict) -> int:
        work = tempfile.mkdtemp(prefix="pop3gw-dns-")
        self.addCleanup(shutil.rmtree, work, True)
        path = os.path.join(work, "zone.json")
        with open(path, "w") as f:
            json.dump(zone, f)
        proc = subprocess.Popen([sys.executable, HELPER, path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)

        def stop() -> None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            assert proc.stdout is not None
            proc.stdout.close()

        self.addCleanup(stop)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        m = re.match(r"port=(\d+)$", line.strip())
        if m is None:
            raise AssertionError(f"the DNS server did not start: {line!r}")
        return int(m.group(1))

    def test_checkedDeliveredAndRefused(self) -> None:
        """
        Signed mail from an SPF-authorised address of a p=reject domain is
        delivered with spf=pass, dkim=pass and dmarc=pass recorded above the
        C{Received:} field and the forged results removed; mail whose From
        domain fails its p=reject policy gets 550 5.7.1 and is not stored;
        fail2ban's filter matches neither.
        """
        pem, public = rsaKey()
        port = self.startDNS({
            "good.example": [["TXT", "v=spf1 ip4:127.0.0.1 -all"]],
            "sel._domainkey.good.example": [["TXT", f"v=DKIM1; k=rsa; p={public}"]],
            "_dmarc.good.example": [["TXT", "v=DMARC1; p=reject"]],
            "bad.example": [["TXT", "v=spf1 ip4:192.0.2.1 -all"]],
            "_dmarc.bad.example": [["TXT", "v=DMARC1; p=reject"]],
        })
        server = Pop3gwProcess(self, args=["--domain", "example.org"], listeners=("pop3", "mx"),
                               extraConfig=f"[inbound]\ndns-server = 127.0.0.1:{port}\ndns-timeout = 5\n")
        server.addUser(BOB, BOB_PW)
        server.start()

        smtp = smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=60)
        self.addCleanup(smtp.close)
        smtp.ehlo("client.good.example")
        self.assertEqual(smtp.sendmail("alice@good.example", [BOB], FORGED + sign(GOOD, "good.example", "sel", pem)), {})
        smtp.mail("boss@bad.example")
        smtp.rcpt(BOB)
        code, text = smtp.data(SPOOF)
        self.assertEqual((code, text), (550, b"5.7.1 Message rejected by the sender domain's DMARC policy"))
        smtp.quit()

        pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        self.addCleanup(pop.close)
        pop.user(BOB)
        pop.pass_(BOB_PW)
        count, _ = pop.stat()
        self.assertEqual(count, 1)
        data = b"\r\n".join(pop.retr(1)[1]) + b"\r\n"
        pop.quit()
        self.assertTrue(data.startswith(
            b"Authentication-Results: mail.example.org;\r\n"
            b"\tspf=pass smtp.mailfrom=alice@good.example;\r\n"
            b"\tdkim=pass header.d=good.example header.s=sel;\r\n"
            b"\tdmarc=pass header.from=good.example policy.dmarc=reject\r\n"
            b"Received: from client.good.example "), data)
        self.assertNotIn(b"MAIL.example.org", data)
        self.assertTrue(data.endswith(GOOD), data)

        server.waitForLog(r"mx: refused message rhost=127\.0\.0\.1 .*550 5\.7\.1")
        self.assertRegex(server.log(), r'mx: checked rhost=127\.0\.0\.1 from="boss@bad\.example" spf=fail '
                                       r'dkim=none dmarc=fail\(reject\) action=reject')
        regex = requireProgram(self, "fail2ban-regex")
        work = tempfile.mkdtemp(prefix="pop3gw-f2b-")
        self.addCleanup(shutil.rmtree, work, True)
        logPath = os.path.join(work, "pop3gw.log")
        with open(logPath, "w") as f:
            f.write(server.log())
        result = subprocess.run([regex, logPath, FILTER], capture_output=True, timeout=120)
        out = result.stdout.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 0, out + result.stderr.decode())
        self.assertRegex(out, r"Failregex: 0 total")
