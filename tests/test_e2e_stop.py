"""
End-to-end: what a client with a session open sees when the real C{twistd
pop3gw} stops (SIGTERM): a TLS session (implicit TLS, or after STLS or
STARTTLS) ends with the TLS close alert (close_notify), not a bare TCP
close; a client that stopped reading in the middle of a RETR has its
connection closed (not reset) once the stop's wait for it is over, and
the server exits in time.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time

from twisted.trial.unittest import SynchronousTestCase

from pop3gw.service import CLOSE_TIMEOUT
from tests.test_e2e_tls import ALICE, PASSWORD, TLSServerMixin

#: Seconds allowed past L{CLOSE_TIMEOUT} for the server to exit after
#: SIGTERM (start of the stop, the reactor's shutdown, a loaded machine).
MARGIN = 10.0


class _Lines:
    """
    Reads CRLF-ended lines from a socket.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed after {self.buffer[-200:]!r}")
            self.buffer += data
        out, _, self.buffer = self.buffer.partition(b"\r\n")
        return out

    def command(self, text: bytes) -> bytes:
        self.sock.sendall(text + b"\r\n")
        return self.line()

    def reply(self) -> bytes:
        """
        One SMTP reply, its last line.
        """
        while True:
            line = self.line()
            if line[3:4] != b"-":
                return line


class StopTests(TLSServerMixin, SynchronousTestCase):
    def tlsClient(self, sock: socket.socket) -> ssl.SSLSocket:
        """
        Start TLS on C{sock}; a TCP close without the TLS close alert then
        raises C{ssl.SSLEOFError} instead of reading as the end.
        """
        tls = self.clientContext().wrap_socket(sock, server_hostname="127.0.0.1", suppress_ragged_eofs=False)
        self.addCleanup(tls.close)
        return tls

    def connect(self, port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=CLOSE_TIMEOUT + MARGIN)
        self.addCleanup(sock.close)
        return sock

    def login(self, lines: _Lines) -> None:
        self.assertTrue(lines.command(b"USER " + ALICE.encode()).startswith(b"+OK"))
        self.assertTrue(lines.command(b"PASS " + PASSWORD.encode()).startswith(b"+OK"))

    def stopAndReadToEnd(self, server, sock) -> float:
        """
        SIGTERM the server, read C{sock} to its end (the server's close),
        and wait for the server to exit.

        @return: the seconds from the signal to the end of the connection.
        """
        start = time.monotonic()
        server.signal(signal.SIGTERM)
        rest = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            rest += data
        ended = time.monotonic() - start
        self.assertEqual(rest, b"")
        assert server.proc is not None
        self.assertIn(server.proc.wait(CLOSE_TIMEOUT + MARGIN), (0, -signal.SIGTERM), server.log())
        self.assertCleanLog(server)
        return ended

    def assertCleanLog(self, server) -> None:
        """
        The server logged no traceback and no failure.
        """
        for word in ("Traceback", "Unhandled", "failed", "error"):
            self.assertNotIn(word, server.log())

    def assertTLSCloseOnStop(self, server, tls: ssl.SSLSocket) -> None:
        """
        The server's stop ends C{tls} with close_notify: the read returns
        the end (no C{SSLEOFError}) and the TLS shutdown completes.
        """
        ended = self.stopAndReadToEnd(server, tls)
        self.assertLess(ended, CLOSE_TIMEOUT, "the close waited for the stop's time limit")
        self.assertNotIn("did not take their last output", server.log())
        tls.unwrap()

    def test_implicitTLSClosedWithCloseNotify(self) -> None:
        """
        A POP3S session, logged in, open when the server is told to stop,
        is ended with the TLS close alert, at once.
        """
        server = self.startServer(listeners=("pop3s",))
        tls = self.tlsClient(self.connect(server.ports["pop3s"]))
        lines = _Lines(tls)
        self.assertTrue(lines.line().startswith(b"+OK"))
        self.login(lines)
        self.assertTLSCloseOnStop(server, tls)

    def test_stlsClosedWithCloseNotify(self) -> None:
        """
        A POP3 session after STLS is ended with the TLS close alert when
        the server stops.
        """
        server = self.startServer(listeners=("pop3",))
        sock = self.connect(server.ports["pop3"])
        plain = _Lines(sock)
        self.assertTrue(plain.line().startswith(b"+OK"))
        self.assertTrue(plain.command(b"STLS").startswith(b"+OK"))
        tls = self.tlsClient(sock)
        self.login(_Lines(tls))
        self.assertTLSCloseOnStop(server, tls)

    def test_starttlsClosedWithCloseNotify(self) -> None:
        """
        A submission session after STARTTLS is ended with the TLS close
        alert when the server stops.
        """
        server = self.startServer(listeners=("submission",))
        sock = self.connect(server.ports["submission"])
        plain = _Lines(sock)
        self.assertTrue(plain.reply().startswith(b"220"))
        sock.sendall(b"EHLO client.example.net\r\n")
        self.assertTrue(plain.reply().startswith(b"250"))
        self.assertTrue(plain.command(b"STARTTLS").startswith(b"220"))
        tls = self.tlsClient(sock)
        lines = _Lines(tls)
        tls.sendall(b"EHLO client.example.net\r\n")
        self.assertTrue(lines.reply().startswith(b"250"))
        self.assertTLSCloseOnStop(server, tls)

    def test_workersCloseTLSWithCloseNotify(self) -> None:
        """
        With C{--workers 2} each worker closes its own sessions: a POP3S
        session ends with the TLS close alert when the server stops.
        """
        server = self.startServer("--workers", "2", listeners=("pop3s",))
        server.waitForLog(r"ready: serving", timeout=30)
        tls = self.tlsClient(self.connect(server.ports["pop3s"]))
        lines = _Lines(tls)
        self.assertTrue(lines.line().startswith(b"+OK"))
        self.login(lines)
        self.assertTLSCloseOnStop(server, tls)

    def stalledRetr(self, pipelined: bytes = b"") -> None:
        """
        Log in, RETR a large message without reading it (the client's
        receive buffer small), send C{pipelined} after it, stop the server
        and check that it exits in time and that the connection ends with
        its end, not a reset, after the octets that were on their way.
        """
        server = self.startServer(listeners=("pop3",))
        maildir = server.maildir(ALICE)
        for sub in ("new", "cur", "tmp"):
            os.makedirs(os.path.join(maildir, sub), exist_ok=True)
        size = 100000 * 79
        with open(os.path.join(maildir, "new", "1000000.M1P1.stop-test"), "wb") as f:
            f.write(b"Subject: big\n\n" + (b"y" * 78 + b"\n") * 100000)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(CLOSE_TIMEOUT + MARGIN)
        sock.connect(("127.0.0.1", server.ports["pop3"]))
        lines = _Lines(sock)
        self.assertTrue(lines.line().startswith(b"+OK"))
        self.login(lines)
        sock.sendall(b"RETR 1\r\n" + pipelined)
        # The server fills what the client's socket takes, then waits.
        time.sleep(1.0)
        start = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.proc is not None
        self.assertIn(server.proc.wait(CLOSE_TIMEOUT + MARGIN), (0, -signal.SIGTERM), server.log())
        self.assertLess(time.monotonic() - start, CLOSE_TIMEOUT + MARGIN)
        self.assertCleanLog(server)
        self.assertIn("stopping: 1 connection(s) did not take their last output", server.log())
        received = len(lines.buffer)
        while True:
            data = sock.recv(65536)  # a reset raises ConnectionResetError
            if not data:
                break
            received += len(data)
        self.assertGreater(received, 0)
        self.assertLess(received, size)

    def test_stalledRetrClosedNotReset(self) -> None:
        """
        A client that stopped reading in the middle of a large RETR has its
        connection closed by the server when the server stops: after the
        octets that were on their way, the end of the connection, not a
        reset.  The server exits within L{CLOSE_TIMEOUT} and a margin.
        """
        self.stalledRetr()

    def test_stalledRetrPausedReadingClosedNotReset(self) -> None:
        """
        The same when the client also sent more commands than the server
        reads ahead, so that the server stopped reading the connection:
        what it did not read is discarded before it closes the connection
        (closing a socket with unread input would reset it).
        """
        self.stalledRetr(b"NOOP\r\n" * 50000)
