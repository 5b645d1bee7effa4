"""
End-to-end: the real C{twistd -n pop3gw} with C{--mx} on 127.0.0.1: mail
from the world delivered with Python's smtplib and with swaks (with and
without STARTTLS) is fetched back over POP3 byte for byte; relaying is
refused and nothing is queued.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import smtplib
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess, requireProgram, requireSwaksTLS

BOB = "bob@example.org"
BOB_PW = "bob-secret"
MESSAGE = (
    b"From: Carol <carol@remote.example>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: from the world\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".leading dot\r\n"
    b"caf\xc3\xa9 8-bit\r\n"
)
#: The folded Received: field the MX listener writes, from the peer
#: 127.0.0.1 (its reverse name: "unknown", since the test name server
#: never answers).
_RECEIVED = re.compile(
    rb"^Received: from (?P<helo>\S+) \((?P<reverse>\S+) \[127\.0\.0\.1\]\)\r\n"
    rb"(?:\t\(using (?P<tls>TLSv[\d.]+ with cipher \S+)\)\r\n)?"
    rb"\tby mail\.example\.org \(pop3gw\) with (?P<protocol>E?SMTPS?) id (?P<id>[0-9A-F]{16});\r\n"
    rb"\t[A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d \+0000\r\n"
)


class MXEndToEndTests(SynchronousTestCase):
    """
    The MX listener of a real server.
    """

    def setUp(self) -> None:
        # The user exists before the server starts: it reads the users
        # file at start-up (and later only every few seconds).
        self.server = Pop3gwProcess(self, args=["--domain", "example.org"], listeners=("pop3", "mx"))
        self.server.addUser(BOB, BOB_PW)
        self.server.start()

    def fetchAll(self) -> list:
        """
        Every message in bob's maildrop, over POP3, as bytes with CRLF.
        """
        pop = poplib.POP3("127.0.0.1", self.server.ports["pop3"], timeout=30)
        self.addCleanup(pop.close)
        pop.user(BOB)
        pop.pass_(BOB_PW)
        count, _ = pop.stat()
        out = [b"\r\n".join(pop.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]
        pop.quit()
        return out

    def splitReceived(self, data: bytes) -> tuple:
        """
        The C{Received:} field's parts and the message after it.
        """
        m = _RECEIVED.match(data)
        self.assertIsNotNone(m, data[:400])
        assert m is not None
        return m, data[m.end():]

    def test_smtplibNullSender(self) -> None:
        """
        smtplib delivers with the null reverse path; bob fetches the message
        as sent after one Received: field naming the HELO name, the
        peer's address and ESMTP; the accepted line is logged.
        """
        smtp = smtplib.SMTP("127.0.0.1", self.server.ports["mx"], local_hostname="client.example", timeout=30)
        self.addCleanup(smtp.close)
        smtp.ehlo("client.example")
        self.assertFalse(smtp.has_extn("auth"))
        self.assertEqual(smtp.sendmail("", [BOB], MESSAGE), {})
        smtp.quit()
        [fetched] = self.fetchAll()
        m, rest = self.splitReceived(fetched)
        self.assertEqual(rest, MESSAGE)
        self.assertEqual((m.group("helo"), m.group("protocol"), m.group("tls")), (b"client.example", b"ESMTP", None))
        self.server.waitForLog(
            r'mx: accepted id=' + m.group("id").decode() + r' rhost=127\.0\.0\.1 from="" recipients=1 size=\d+ tls=no'
        )

    def test_relayRefused(self) -> None:
        """
        A remote recipient, however disguised, is refused with 550 5.7.1,
        an unknown local user with 550 5.1.1; nothing is queued for relay
        and nothing delivered.
        """
        smtp = smtplib.SMTP("127.0.0.1", self.server.ports["mx"], local_hostname="client.example", timeout=30)
        self.addCleanup(smtp.close)
        smtp.ehlo("client.example")
        self.assertEqual(smtp.mail("spammer@remote.example")[0], 250)
        for rcpt in ("carol@remote.example", "carol%remote.example@example.org", "bob@example.org.",
                     "remote.example!carol@example.org", "bob@[127.0.0.1]"):
            self.assertEqual(smtp.rcpt(rcpt), (550, b"5.7.1 Relay access denied"), rcpt)
        self.assertEqual(smtp.rcpt("nobody@example.org"), (550, b"5.1.1 Recipient address rejected: user unknown"))
        self.assertEqual(smtp.docmd("DATA")[0], 554)
        smtp.quit()
        self.server.waitForLog(r'mx: refused recipient rhost=127\.0\.0\.1 .*to="nobody@example\.org".*reason="unknown user"')
        self.assertEqual(self.server.cli("queue", "list").stdout, b"")
        self.assertEqual(self.fetchAll(), [])
        self.assertNotIn("authentication failed", self.server.log())

    def test_swaksAddressLiteralSender(self) -> None:
        """
        swaks with a sender at an address literal: the message arrives as
        sent, the accepted line names the sender; the reverse lookup of the
        client went to the configured name server and wrote no UDP port
        lines.
        """
        _m, rest = self.splitReceived(self.swaks(sender="carol@[IPv6:2001:DB8::7]"))
        self.assertEqual(rest, MESSAGE)
        self.server.waitForLog(r'mx: accepted id=\S+ rhost=127\.0\.0\.1 from="carol@\[IPv6:2001:db8::7\]" ')
        self.assertNotIn("UDP Port", self.server.log())
        self.assertNotIn("DNSDatagramProtocol", self.server.log())

    def swaks(self, *extra: str, sender: str = "carol@remote.example") -> bytes:
        swaks = requireSwaksTLS(self) if "--tls" in extra else requireProgram(self, "swaks")
        work = tempfile.mkdtemp(prefix="pop3gw-swaks-")
        self.addCleanup(shutil.rmtree, work, True)
        path = os.path.join(work, "message.eml")
        with open(path, "wb") as f:
            # swaks ends the data with CRLF . CRLF after the file's text.
            f.write(MESSAGE[:-2])
        result = subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(self.server.ports["mx"]), "--ehlo", "swaks.example",
             "--from", sender, "--to", BOB, "--data", "@" + path, *extra],
            capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        [fetched] = self.fetchAll()
        return fetched

    def test_swaksPlain(self) -> None:
        """
        swaks without TLS: the message arrives as sent, with ESMTP.
        """
        m, rest = self.splitReceived(self.swaks())
        self.assertEqual(rest, MESSAGE)
        self.assertEqual((m.group("helo"), m.group("protocol"), m.group("tls")), (b"swaks.example", b"ESMTP", None))

    def test_swaksSTARTTLS(self) -> None:
        """
        swaks with STARTTLS (the generated certificate): the message
        arrives as sent, with ESMTPS and the TLS version and cipher.
        """
        m, rest = self.splitReceived(self.swaks("--tls"))
        self.assertEqual(rest, MESSAGE)
        self.assertEqual(m.group("protocol"), b"ESMTPS")
        self.assertRegex(m.group("tls").decode(), r"^TLSv1\.[23] with cipher [A-Z0-9_-]+$")
        self.server.waitForLog(r"mx: accepted id=\S+ rhost=127\.0\.0\.1 .* tls=TLSv1\.[23]")
