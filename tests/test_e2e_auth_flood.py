"""
End to end: a password-guessing flood from one address does not keep users
who log in from another address out (the real server, real Argon2id, two
loopback source addresses).
"""

from __future__ import annotations

import base64
import socket
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess

FLOOD_SOURCE = "127.0.0.2"
GOOD_SOURCE = "127.0.0.3"
#: Bounds of each flood thread.
FLOOD_SECONDS = 60.0
FLOOD_ATTEMPTS = 100_000
#: Seconds any one read of a good login may take.
TIMEOUT = 30.0


def readLine(sock: socket.socket) -> bytes:
    """
    One line from C{sock} (at most 4096 octets), without its line end.
    """
    data = b""
    while not data.endswith(b"\n") and len(data) < 4096:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.rstrip(b"\r\n")


def readReply(sock: socket.socket) -> bytes:
    """
    The last line of an SMTP reply (at most 100 lines).
    """
    for _ in range(100):
        line = readLine(sock)
        if line[3:4] != b"-":
            return line
    return line


class AuthFloodTests(SynchronousTestCase):
    def test_floodDoesNotLockOthersOut(self) -> None:
        """
        While 32 connections from 127.0.0.2 each send a new wrong password
        and hang up without waiting for the answer, over and over (as a
        guesser does), ten users who have not logged
        in before (no cached password) all log in at once from 127.0.0.3,
        five over POP3 and five over submission.
        """
        for source in (FLOOD_SOURCE, GOOD_SOURCE):
            try:
                with socket.socket() as probe:
                    probe.bind((source, 0))
            except OSError as e:
                self.skipTest(f"cannot use {source} as a source address here: {e}")
        server = Pop3gwProcess(self)
        for i in range(1, 11):
            server.addUser(f"u{i}@example.org", "right password")
        server.start()
        pop3, submission = server.ports["pop3"], server.ports["submission"]
        stop = threading.Event()

        def flood(worker: int) -> None:
            deadline = time.monotonic() + FLOOD_SECONDS
            for n in range(FLOOD_ATTEMPTS):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    with socket.create_connection(("127.0.0.1", pop3), 5, source_address=(FLOOD_SOURCE, 0)) as sock:
                        # After the greeting, so that the guess is read
                        # before the close (a close with the greeting
                        # unread would be a reset).
                        readLine(sock)
                        sock.sendall(b"USER x\r\nPASS wrong %d %d\r\n" % (worker, n))
                except OSError:
                    time.sleep(0.01)

        threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(32)]
        for thread in threads:
            thread.start()
        self.addCleanup(stop.set)
        server.waitForLog(r"authentication failed: service=pop3 rhost=127\.0\.0\.2 ")
        time.sleep(1.0)  # let the flood run a while

        def login(i: int) -> bytes:
            user = b"u%d@example.org" % (i,)
            port = pop3 if i <= 5 else submission
            with socket.create_connection(("127.0.0.1", port), TIMEOUT, source_address=(GOOD_SOURCE, 0)) as sock:
                if i <= 5:
                    readLine(sock)
                    sock.sendall(b"USER " + user + b"\r\n")
                    readLine(sock)
                    sock.sendall(b"PASS right password\r\n")
                    reply = readLine(sock)
                else:
                    readReply(sock)
                    sock.sendall(b"EHLO client.example\r\n")
                    readReply(sock)
                    sock.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0right password") + b"\r\n")
                    reply = readReply(sock)
                sock.sendall(b"QUIT\r\n")
            return reply

        replies: dict = {}

        def record(i: int) -> None:
            try:
                replies[i] = login(i)
            except OSError as e:
                replies[i] = repr(e).encode()

        logins = [threading.Thread(target=record, args=(i,), daemon=True) for i in range(1, 11)]
        for thread in logins:
            thread.start()
        for thread in logins:
            thread.join(TIMEOUT * 4)
        stop.set()
        for thread in threads:
            thread.join(10)

        self.assertEqual(
            [replies.get(i) for i in range(1, 11)],
            [b"+OK Logged in."] * 5 + [b"235 2.7.0 Authentication successful"] * 5,
        )
