"""
End-to-end: the real C{twistd -n pop3gw} with C{--lmtp} on a Unix socket:
a message for two recipients delivered over LMTP is fetched back over POP3
byte for byte by each of them.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import socket
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess

ALICE, ALICE_PW = "alice@example.org", "alice-secret"
BOB, BOB_PW = "bob@example.org", "bob-secret"
MESSAGE = (
    b"From: Carol <carol@remote.example>\r\n"
    b"To: alice@example.org, bob@example.org\r\n"
    b"Subject: through LMTP\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"..leading dot\r\n"
    b"caf\xc3\xa9 8-bit\r\n"
)
_RECEIVED = re.compile(
    rb"^Received: from mta\.example\.org \(unix\)\r\n"
    rb"\tby mail\.example\.org \(pop3gw\) with LMTP id (?P<id>[0-9A-F]{16});\r\n"
    rb"\t[A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d \+0000\r\n"
)


class LMTPEndToEndTests(SynchronousTestCase):
    """
    The LMTP listener of a real server, on a Unix socket.
    """

    def setUp(self) -> None:
        socketDir = tempfile.mkdtemp(prefix="pop3gw-lmtp-")
        self.addCleanup(shutil.rmtree, socketDir, True)
        self.path = os.path.join(socketDir, "lmtp")
        self.server = Pop3gwProcess(
            self, args=["--domain", "example.org", "--lmtp", f"unix:{self.path}"], listeners=("pop3", "lmtp")
        )
        self.server.addUser(ALICE, ALICE_PW)
        self.server.addUser(BOB, BOB_PW)
        self.server.start()

    def fetchAll(self, user: str, password: str) -> list:
        pop = poplib.POP3("127.0.0.1", self.server.ports["pop3"], timeout=30)
        self.addCleanup(pop.close)
        pop.user(user)
        pop.pass_(password)
        count, _ = pop.stat()
        out = [b"\r\n".join(pop.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]
        pop.quit()
        return out

    def converse(self, sock: socket.socket, send: bytes, expect: bytes) -> None:
        """
        Send C{send} and read exactly the bytes of C{expect}.
        """
        sock.sendall(send)
        got = b""
        while len(got) < len(expect):
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
        self.assertEqual(re.sub(rb"queued as [0-9A-F]{16}", b"queued as ID", got), expect)

    def test_twoRecipients(self) -> None:
        """
        The socket the log names is the one given, mode 0660.  LHLO, MAIL,
        two accepted RCPTs and an unknown one refused with 550 5.1.1; after
        the data one 250 per accepted RCPT; each user fetches the message
        as sent (dot-unstuffed) after one Received: field naming LMTP.
        """
        self.assertEqual(self.server.paths["lmtp"], self.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o660)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.settimeout(30)
        sock.connect(self.path)
        self.converse(sock, b"", b"220 mail.example.org LMTP ready\r\n")
        self.converse(
            sock,
            b"LHLO mta.example.org\r\n",
            b"250-mail.example.org\r\n250-PIPELINING\r\n250-SIZE 41943040\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250-SMTPUTF8\r\n"
            b"250 XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE\r\n",
        )
        self.converse(
            sock,
            b"MAIL FROM:<carol@remote.example>\r\nRCPT TO:<alice@example.org>\r\n"
            b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n",
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n550 5.1.1 Recipient address rejected: user unknown\r\n"
            b"250 2.1.5 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
        )
        self.converse(sock, MESSAGE + b".\r\n", b"250 2.0.0 OK queued as ID\r\n" * 2)
        self.converse(sock, b"QUIT\r\n", b"221 2.0.0 Bye\r\n")
        for user, password in ((ALICE, ALICE_PW), (BOB, BOB_PW)):
            [fetched] = self.fetchAll(user, password)
            m = _RECEIVED.match(fetched)
            self.assertIsNotNone(m, fetched[:300])
            self.assertEqual(fetched[m.end():], MESSAGE.replace(b"\r\n..", b"\r\n."))
        self.server.waitForLog(r'lmtp: accepted id=' + m.group("id").decode()
                               + r' rhost=unix from="carol@remote\.example" recipients=2 size=\d+ failed=0')
