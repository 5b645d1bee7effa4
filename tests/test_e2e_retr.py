"""
End-to-end: RETR and TOP answered byte for byte by the real C{twistd
pop3gw} over plain TCP (where a response goes straight to the socket), after
STLS and over implicit TLS, for message files with dot lines (also at a
read-chunk boundary), mixed line ends, no final line end, no body or no
octets at all, and for files changed or removed after the listing.
"""

from __future__ import annotations

import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from pop3gw.pop3transfer import READ_CHUNK_SIZE
from tests.test_e2e_tls import ALICE, PASSWORD, TLSServerMixin

#: Message files as stored, in listing order (the names sort that way).
FILES = [
    b".leading dot\n..two dots\n.\nafter a lone dot\n",
    b"Subject: mixed\r\n\r\nCRLF line\r\nbare LF line\n.dot\r\nlast line without end",
    b"",
    b"Subject: only a header\n",
    # A line starting with a dot right at a read-chunk boundary, chunks
    # without any dot, and a last chunk with dot lines.
    b"Subject: big\n\n"
    + b"x" * (READ_CHUNK_SIZE - 15)
    + b"\n.at the boundary\n"
    + b"y" * (READ_CHUNK_SIZE - 18)
    + b"\n"
    + b"z\n" * (READ_CHUNK_SIZE // 2)
    + b".\n.split\n",
    b"Subject: removed\n\nbody\n",
    b"Subject: changed\n\nbody\n",
]

UNAVAILABLE = b"-ERR [SYS/TEMP] Message temporarily unavailable.\r\n"


def wireForm(content: bytes) -> bytes:
    """
    The reference conversion: every line end CRLF, a last one added.
    """
    text = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return text.replace(b"\n", b"\r\n")


def response(lines: list[bytes], status: bytes) -> bytes:
    """
    A multi-line response: C{status}, the lines dot-stuffed, the C{.} line.
    """
    body = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return status + b"\r\n" + body + b".\r\n"


def retrResponse(content: bytes) -> bytes:
    wire = wireForm(content)
    return response(wire.split(b"\r\n")[:-1], b"+OK %d octets" % (len(wire),))


def topResponse(content: bytes, count: int) -> bytes:
    lines = wireForm(content).split(b"\r\n")[:-1]
    out = []
    inHeader = True
    for line in lines:
        if not inHeader:
            if count == 0:
                break
            count -= 1
        out.append(line)
        if inHeader and line == b"":
            inHeader = False
    return response(out, b"+OK Top of message follows.")


class _Conversation:
    """
    A POP3 client on a socket that reads whole responses.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _until(self, end: bytes) -> bytes:
        while True:
            i = self.buffer.find(end)
            if i >= 0:
                out, self.buffer = self.buffer[: i + len(end)], self.buffer[i + len(end) :]
                return out
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("closed after %r" % (self.buffer[-200:],))
            self.buffer += data

    def line(self, command: bytes) -> bytes:
        self.sock.sendall(command + b"\r\n")
        return self._until(b"\r\n")

    def multi(self, command: bytes) -> bytes:
        """
        @return: the status line and, after a C{+OK}, the lines up to and
            including the C{.} line.
        """
        status = self.line(command)
        if not status.startswith(b"+OK"):
            return status
        if self.buffer.startswith(b".\r\n") or (len(self.buffer) < 3 and self._peek(3) == b".\r\n"):
            self.buffer = self.buffer[3:]
            return status + b".\r\n"
        return status + self._until(b"\r\n.\r\n")

    def _peek(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = self.sock.recv(1 << 20)
            if not data:
                break
            self.buffer += data
        return self.buffer[:n]


class RetrBytesTests(TLSServerMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.server = self.startServer(listeners=("pop3", "pop3s"))

    def seed(self) -> None:
        """
        Write L{FILES} into the maildrop's C{new/} (any earlier ones
        removed).
        """
        maildir = self.server.maildir(ALICE)
        for sub in ("new", "cur", "tmp"):
            os.makedirs(os.path.join(maildir, sub), exist_ok=True)
            for name in os.listdir(os.path.join(maildir, sub)):
                os.unlink(os.path.join(maildir, sub, name))
        for i, content in enumerate(FILES):
            with open(os.path.join(maildir, "new", "%d.M%dP1.retr-test" % (1000000 + i, i)), "wb") as f:
                f.write(content)

    def path(self, index: int) -> str:
        """
        @return: where the file of L{FILES}C{[index]} is now (the login may
            have moved and renamed it).
        """
        maildir = self.server.maildir(ALICE)
        prefix = "%d.M%dP1.retr-test" % (1000000 + index, index)
        for sub in ("new", "cur"):
            for name in os.listdir(os.path.join(maildir, sub)):
                if name.startswith(prefix):
                    return os.path.join(maildir, sub, name)
        raise AssertionError(prefix)

    def connect(self, kind: str) -> _Conversation:
        port = self.server.ports["pop3s" if kind == "implicit" else "pop3"]
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.addCleanup(sock.close)
        if kind == "implicit":
            sock = self.clientContext().wrap_socket(sock, server_hostname="127.0.0.1")
            self.addCleanup(sock.close)
        conversation = _Conversation(sock)
        self.assertTrue(conversation._until(b"\r\n").startswith(b"+OK"))
        if kind == "stls":
            self.assertTrue(conversation.line(b"STLS").startswith(b"+OK"))
            sock = self.clientContext().wrap_socket(sock, server_hostname="127.0.0.1")
            self.addCleanup(sock.close)
            conversation = _Conversation(sock)
        self.assertTrue(conversation.line(b"USER " + ALICE.encode()).startswith(b"+OK"))
        self.assertTrue(conversation.line(b"PASS " + PASSWORD.encode()).startswith(b"+OK"))
        return conversation

    def check(self, kind: str) -> None:
        self.seed()
        conversation = self.connect(kind)
        self.assertEqual(conversation.line(b"STAT").split()[1], b"%d" % (len(FILES),))
        os.unlink(self.path(5))
        with open(self.path(6), "wb") as f:
            f.write(b"Subject: changed\n\nanother body\n")
        for number in (1, 2, 3, 4, 5, 1):
            content = FILES[number - 1]
            self.assertEqual(conversation.multi(b"RETR %d" % (number,)), retrResponse(content), number)
            for count in (0, 1, 2):
                self.assertEqual(
                    conversation.multi(b"TOP %d %d" % (number, count)), topResponse(content, count), (number, count)
                )
        self.assertEqual(conversation.multi(b"RETR 6"), UNAVAILABLE)
        self.assertEqual(conversation.multi(b"TOP 7 0"), UNAVAILABLE)
        self.assertEqual(conversation.multi(b"RETR 7"), UNAVAILABLE)
        self.assertEqual(conversation.multi(b"RETR 2"), retrResponse(FILES[1]))
        self.assertTrue(conversation.line(b"QUIT").startswith(b"+OK"))

    def test_plain(self) -> None:
        """
        Over plain TCP every RETR and TOP response is exactly the stored
        message in wire form, dot-stuffed, with its status line and end; a
        message removed or changed after the listing gets C{-ERR} and the
        session goes on.
        """
        self.check("plain")

    def test_stls(self) -> None:
        """
        The same bytes after STLS.
        """
        self.check("stls")

    def test_implicitTLS(self) -> None:
        """
        The same bytes over implicit TLS (POP3S).
        """
        self.check("implicit")
