"""
End-to-end: the real C{twistd -n pop3gw} with C{--mx}, asking a DNS server
on loopback (L{tests.dnshelpers} run as a process) for SPF, DKIM and DMARC:
signed, aligned mail is delivered with one C{Authentication-Results:} field
(a forged one removed), mail failing a p=reject DMARC policy is refused with
550 at the end of its data, and the shipped fail2ban filter does not take
that refusal for a failed login.  Behind a front MTA (LMTP on a Unix
socket with XFORWARD, and C{pop3gw deliver} with the client options),
with C{lmtp-checks = yes}: passing mail gets its results, failing mail is
tagged rather than refused.
"""

from __future__ import annotations

import os
import poplib
import shutil
import smtplib
import socket
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.dnshelpers import rsaKey, sign, startProcess
from tests.e2e import Pop3gwProcess, requireProgram

BOB = "bob@example.org"
BOB_PW = "bob-secret"
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
        return startProcess(self, zone)

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

    def test_behindFrontMTA(self) -> None:
        """
        LMTP on a Unix socket and C{pop3gw deliver}, each with one signed,
        SPF-authorised message of a p=reject domain (dmarc=pass) and one
        spoofed message failing that policy (delivered with
        C{X-Spam-Flag: YES} and the subject tag: the default for mail a
        front MTA already accepted): POP3 serves each with the results on
        top.
        """
        pem, public = rsaKey()
        port = self.startDNS({
            "good.example": [["TXT", "v=spf1 ip4:192.0.2.10 -all"]],
            "sel._domainkey.good.example": [["TXT", f"v=DKIM1; k=rsa; p={public}"]],
            "_dmarc.good.example": [["TXT", "v=DMARC1; p=reject"]],
            "bad.example": [["TXT", "v=spf1 ip4:192.0.2.1 -all"]],
            "_dmarc.bad.example": [["TXT", "v=DMARC1; p=reject"]],
        })
        socketDir = tempfile.mkdtemp(prefix="pop3gw-lmtp-")
        self.addCleanup(shutil.rmtree, socketDir, True)
        path = os.path.join(socketDir, "lmtp")
        server = Pop3gwProcess(self, args=["--domain", "example.org", "--lmtp", f"unix:{path}"],
                               listeners=("pop3", "lmtp"),
                               extraConfig=f"[pop3gw]\nhostname = mail.example.org\n"
                                           f"[inbound]\ndns-server = 127.0.0.1:{port}\nlmtp-checks = yes\n"
                                           f"trusted-authserv-ids = mx1.example.org\n")
        server.addUser(BOB, BOB_PW)
        server.start()
        signed = sign(GOOD, "good.example", "sel", pem)

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.settimeout(60)
        sock.connect(path)
        reader = sock.makefile("rb")
        self.addCleanup(reader.close)

        def reply() -> bytes:
            lines = [reader.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(reader.readline())
            return b"".join(lines)

        self.assertEqual(reply(), b"220 mail.example.org LMTP ready\r\n")
        sock.sendall(b"LHLO mta.example.org\r\n")
        self.assertIn(b"250 XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE\r\n", reply())
        for sender, address, message in (("alice@good.example", "192.0.2.10", signed),
                                          ("boss@bad.example", "192.0.2.99", SPOOF)):
            for command in (f"XFORWARD ADDR={address} HELO=client.example".encode(),
                            f"MAIL FROM:<{sender}>".encode(), b"RCPT TO:<bob@example.org>"):
                sock.sendall(command + b"\r\n")
                self.assertEqual(reply()[:4], b"250 ", command)
            sock.sendall(b"DATA\r\n")
            self.assertEqual(reply()[:4], b"354 ")
            sock.sendall(message + b".\r\n")
            self.assertEqual(reply()[:4], b"250 ")
        sock.sendall(b"QUIT\r\n")
        self.assertEqual(reply(), b"221 2.0.0 Bye\r\n")

        for sender, address, message in (("alice@good.example", "192.0.2.10", signed),
                                          ("boss@bad.example", "192.0.2.99", SPOOF)):
            server.cli("--config", server.config, "deliver", "--client-address", address, "--client-helo",
                       "client.example", "--sender", sender, BOB, input=message.replace(b"\r\n", b"\n"))

        pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        self.addCleanup(pop.close)
        pop.user(BOB)
        pop.pass_(BOB_PW)
        count, _ = pop.stat()
        fetched = [b"\r\n".join(pop.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]
        pop.quit()
        self.assertEqual(len(fetched), 4)
        passed = (b"Authentication-Results: mail.example.org;\r\n"
                  b"\tspf=pass smtp.mailfrom=alice@good.example;\r\n"
                  b"\tdkim=pass header.d=good.example header.s=sel;\r\n"
                  b"\tdmarc=pass header.from=good.example policy.dmarc=reject\r\n")
        failed = (b"Authentication-Results: mail.example.org;\r\n"
                  b"\tspf=fail smtp.mailfrom=boss@bad.example;\r\n"
                  b"\tdkim=none;\r\n"
                  b"\tdmarc=fail header.from=bad.example policy.dmarc=reject\r\n"
                  b"X-Spam-Flag: YES\r\n")
        tagged = SPOOF.replace(b"Subject: urgent", b"Subject: [SPAM] urgent")
        lmtpPass, lmtpFail, deliverPass, deliverFail = fetched
        self.assertTrue(lmtpPass.startswith(passed + b"Received: from mta.example.org (unix)\r\n"), lmtpPass)
        self.assertTrue(lmtpPass.endswith(signed), lmtpPass)
        self.assertTrue(lmtpFail.startswith(failed + b"Received: from mta.example.org (unix)\r\n"), lmtpFail)
        self.assertTrue(lmtpFail.endswith(tagged), lmtpFail)
        self.assertEqual(deliverPass, passed + signed)
        self.assertEqual(deliverFail, failed + tagged)
        self.assertRegex(server.log(), r'lmtp: checked rhost=unix client=192\.0\.2\.99 from="boss@bad\.example" '
                                       r'spf=fail dkim=none dmarc=fail\(reject\) action=quarantine')
