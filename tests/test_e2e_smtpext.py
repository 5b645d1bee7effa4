"""
End-to-end: SMTPUTF8 and CHUNKING on the real C{twistd -n pop3gw} with
C{--mx} on 127.0.0.1: Python's smtplib sends with SMTPUTF8 to a UTF-8
user, a raw socket sends BDAT chunks cut across TCP writes, and POP3 then
serves each message byte for byte.
"""

from __future__ import annotations

import email.generator
import email.message
import email.policy
import io
import poplib
import re
import smtplib
import socket

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess

JORG = "j\u00f6rg@example.org"
JORG_PW = "j\u00f6rg-secret"
BOB = "bob@example.org"
BOB_PW = "bob-secret"

#: The end of the MX listener's folded Received: field.
_RECEIVED_END = re.compile(rb"\A.*?\r\n\t[A-Z][a-z]{2}, [^\r\n]+\+0000\r\n", re.DOTALL)


class SMTPExtensionsEndToEndTests(SynchronousTestCase):
    """
    SMTPUTF8 and BDAT through the MX listener of a real server.
    """

    def setUp(self) -> None:
        self.server = Pop3gwProcess(self, args=["--domain", "example.org"], listeners=("pop3", "mx"))
        self.server.addUser(JORG, JORG_PW)
        self.server.addUser(BOB, BOB_PW)
        self.server.start()

    def fetchAll(self, user: str, password: str) -> list:
        """
        Every message in C{user}'s maildrop over POP3, after its
        C{Received:} field, as bytes with CRLF.
        """
        pop = poplib.POP3("127.0.0.1", self.server.ports["pop3"], timeout=30)
        self.addCleanup(pop.close)
        pop.user(user)
        pop.pass_(password)
        count, _ = pop.stat()
        out = []
        for i in range(1, count + 1):
            data = b"\r\n".join(pop.retr(i)[1]) + b"\r\n"
            m = _RECEIVED_END.match(data)
            self.assertIsNotNone(m, data[:400])
            assert m is not None
            out.append(data[m.end() :])
        pop.quit()
        return out

    def test_smtplibSMTPUTF8(self) -> None:
        """
        smtplib's C{send_message} with SMTPUTF8 from a UTF-8 sender to a
        UTF-8 user (written in another case) is accepted; the user fetches
        the message, UTF-8 header fields included, exactly as smtplib sent
        it.
        """
        msg = email.message.EmailMessage()
        msg["From"] = "J\u00fcrgen <j\u00fcrgen@m\u00fcnchen.example>"
        msg["To"] = JORG
        msg["Subject"] = "Gr\u00fc\u00dfe aus M\u00fcnchen"
        msg.set_content("Gr\u00fc\u00dfe, \u00e4\u00f6\u00fc \u20ac\n.leading dot\n", cte="8bit")
        # What smtplib sends: the message flattened with utf8=True, CRLF.
        out = io.BytesIO()
        email.generator.BytesGenerator(out, policy=msg.policy.clone(utf8=True)).flatten(msg, linesep="\r\n")
        expected = out.getvalue()
        self.assertFalse(expected.isascii())

        smtp = smtplib.SMTP("127.0.0.1", self.server.ports["mx"], local_hostname="client.example", timeout=30)
        self.addCleanup(smtp.close)
        smtp.ehlo("client.example")
        self.assertTrue(smtp.has_extn("smtputf8"))
        self.assertTrue(smtp.has_extn("chunking"))
        refused = smtp.send_message(
            msg, from_addr="j\u00fcrgen@m\u00fcnchen.example", to_addrs=["J\u00d6RG@example.org"], mail_options=["SMTPUTF8"]
        )
        self.assertEqual(refused, {})
        smtp.quit()
        self.assertEqual(self.fetchAll(JORG, JORG_PW), [expected])
        self.server.waitForLog(r"mx: accepted id=[0-9A-F]{16} rhost=127\.0\.0\.1 from=\"j\u00fcrgen@xn--mnchen-3ya\.example\"")

    def test_utf8WithoutSMTPUTF8Refused(self) -> None:
        """
        Without the SMTPUTF8 parameter a UTF-8 recipient is refused with
        553 5.6.7.
        """
        sock = self.connect()
        self.assertEqual(self.command(sock, b"MAIL FROM:<>\r\n"), b"250 2.1.0 OK\r\n")
        self.assertEqual(
            self.command(sock, "RCPT TO:<j\u00f6rg@example.org>\r\n".encode("utf-8")),
            b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n",
        )
        sock.close()

    def connect(self) -> socket.socket:
        """
        A raw connection to the MX listener, greeted and after EHLO.
        """
        sock = socket.create_connection(("127.0.0.1", self.server.ports["mx"]), timeout=30)
        self.addCleanup(sock.close)
        self.reader = sock.makefile("rb")
        self.addCleanup(self.reader.close)
        self.assertTrue(self.reader.readline().startswith(b"220 "))
        sock.sendall(b"EHLO client.example\r\n")
        lines = []
        while True:
            line = self.reader.readline()
            lines.append(line)
            if line[3:4] == b" ":
                break
        self.assertIn(b"250-CHUNKING\r\n", lines)
        return sock

    def command(self, sock: socket.socket, data: bytes) -> bytes:
        sock.sendall(data)
        return self.reader.readline()

    def test_rawBDAT(self) -> None:
        """
        A message in three BDAT chunks, each sent in several TCP writes cut
        inside lines and inside CRLFs, holding what looks like SMTP
        commands and CRLF.CRLF, is stored as sent (leading dots kept);
        the session goes on in step.
        """
        body = (
            b"From: carol@remote.example\r\nTo: bob@example.org\r\nSubject: chunks\r\n\r\n"
            b"..two dots stay\r\n.\r\nMAIL FROM:<evil@remote.example>\r\nRCPT TO:<carol@remote.example>\r\n"
            b"DATA\r\nQUIT\r\n" + (b"x" * 70 + b"\r\n") * 70 + b"last line\r\n"
        )
        sock = self.connect()
        self.assertEqual(self.command(sock, b"MAIL FROM:<carol@remote.example>\r\n"), b"250 2.1.0 OK\r\n")
        self.assertEqual(self.command(sock, b"RCPT TO:<bob@example.org>\r\n"), b"250 2.1.5 OK\r\n")
        cuts = [0, body.index(b"\r\n.\r\n") + 1, body.index(b"x" * 10) + 7, len(body)]
        for i, (start, end) in enumerate(zip(cuts, cuts[1:])):
            chunk = body[start:end]
            last = i == len(cuts) - 2
            sock.sendall(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b""))
            for j in range(0, len(chunk), 7):
                sock.sendall(chunk[j : j + 7])
            reply = self.reader.readline()
            if last:
                self.assertRegex(reply, rb"^250 2\.0\.0 OK queued as [0-9A-F]{16}\r\n$")
            else:
                self.assertEqual(reply, b"250 2.0.0 %d octets received\r\n" % len(chunk))
        self.assertEqual(self.command(sock, b"BDAT 6 LAST\r\nNOOP\r\n"), b"503 5.5.1 Error: need MAIL command\r\n")
        self.assertEqual(self.command(sock, b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(self.fetchAll(BOB, BOB_PW), [body])
        self.assertEqual(self.server.cli("queue", "list").stdout, b"")
