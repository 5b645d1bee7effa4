"""
Server CPU of POP3 work measured in one process, without a client process
or a reactor loop competing for the CPU: a L{pop3gw.pop3.POP3Server} on a
real TCP socket pair (C{tcp.Server} under a C{MemoryReactorClock}, so
replies go to the kernel as in the server), a real L{pop3gw.maildir.MaildirStore}
of messages like the yardstick's, and an in-memory password checker (so a
login costs what the session around the checker costs, not a password
hash or the users file).  Only the server's calls are timed
(C{time.process_time}); the peer's reads are not.

    python bench/pop3_cpu.py [--rounds 7] [--sessions 2000] [--retrs 2000]

prints, per figure, the best and the median of the rounds in microseconds:

  - C{session}: connection made (greeting), USER, PASS, STAT, LIST, UIDL,
    QUIT and the close, of a 20 x 2 KB maildrop;
  - C{retr 10 KB}: one RETR of a 10 KB message (200 in the maildrop, taken
    in order, as a client fetching everything does).

Run it against another checkout with C{PYTHONPATH=CHECKOUT}: it imports
whichever C{pop3gw} comes first, and says which.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import tcp
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

import pop3gw
from pop3gw.address import Address
from pop3gw.interfaces import IPOP3Avatar
from pop3gw.maildir import MaildirStore
from pop3gw.pop3 import POP3Factory
from pop3gw.testing import FakePOP3Avatar

FILLER = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab"


def message(size: int, number: int) -> bytes:
    """
    A message of C{size} octets with LF line ends, shaped like the
    yardstick's seed (a body line beginning with a dot, then filler lines).
    """
    head = (
        f"From: seed@example.org\nTo: user@example.org\nSubject: bench seed {number}\n"
        f"Message-ID: <seed.{number}@bench.invalid>\nDate: Thu, 01 Jan 2026 00:00:00 +0000\n\n"
        f".this line starts with a dot\n"
    ).encode()
    full, partial = divmod(size - len(head), len(FILLER) + 1)
    body = (FILLER + b"\n") * full
    if partial:
        body += FILLER[: partial - 1] + b"\n"
    return head + body


def seed(root: str, address: Address, count: int, size: int) -> None:
    path = os.path.join(root, address.domain, address.localpart)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    for number in range(count):
        data = message(size, number)
        name = f"1700000000.M{number:06d}P1Q{number}.bench,S={len(data)}"
        with open(os.path.join(path, "cur", name + ":2,"), "wb") as f:
            f.write(data)


@implementer(IRealm)
class Realm:
    def __init__(self, store: MaildirStore) -> None:
        self.store = store

    def requestAvatar(self, avatarId, mind, *interfaces):
        return IPOP3Avatar, FakePOP3Avatar(Address.parse(avatarId.decode()), self.store), lambda: None


class _Port:
    _realPortNumber = 110


class Bench:
    def __init__(self, root: str) -> None:
        self.store = MaildirStore(root, hostname="bench")
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(b"s@example.org", b"pw")
        checker.addUser(b"r@example.org", b"pw")
        self.reactor = MemoryReactorClock()
        self.factory = POP3Factory(Portal(Realm(self.store), [checker]), lambda secure, peer: True, self.reactor)

    def connect(self):
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        proto = self.factory.buildProtocol(None)
        connection = tcp.Server(ours, proto, ("127.0.0.1", 40000), _Port(), 1, self.reactor)
        return proto, connection, peer

    def turn(self, connection) -> None:
        """
        What the reactor would do next for C{connection}: its timed calls
        due now, and a write turn if it waits to write.
        """
        self.reactor.advance(0)
        while connection in self.reactor.writers and not connection.disconnected:
            why = connection.doWrite()
            if why:
                connection.connectionLost(Failure(why))

    @staticmethod
    def drain(peer: socket.socket, end: bytes) -> None:
        data = b""
        while not data.endswith(end):
            data += peer.recv(1 << 20)

    def session(self) -> float:
        proto, connection, peer = self.connect()
        spent = 0.0
        t = time.process_time()
        proto.makeConnection(connection)
        spent += time.process_time() - t
        self.drain(peer, b"\r\n")
        for line, end in [
            (b"USER s@example.org\r\n", b"\r\n"),
            (b"PASS pw\r\n", b"\r\n"),
            (b"STAT\r\n", b"\r\n"),
            (b"LIST\r\n", b"\r\n.\r\n"),
            (b"UIDL\r\n", b"\r\n.\r\n"),
            (b"QUIT\r\n", b"\r\n"),
        ]:
            t = time.process_time()
            peer.sendall(line)
            connection.doRead()
            self.turn(connection)
            spent += time.process_time() - t
            self.drain(peer, end)
        assert connection.disconnected, "the session did not close"
        peer.close()
        return spent

    def retrs(self, count: int) -> float:
        proto, connection, peer = self.connect()
        proto.makeConnection(connection)
        self.drain(peer, b"\r\n")
        for line in (b"USER r@example.org\r\n", b"PASS pw\r\n"):
            peer.sendall(line)
            connection.doRead()
            self.drain(peer, b"\r\n")
        spent = 0.0
        for number in range(1, count + 1):
            peer.sendall(b"RETR %d\r\n" % (number,))
            t = time.process_time()
            connection.doRead()
            self.turn(connection)
            spent += time.process_time() - t
            self.drain(peer, b"\r\n.\r\n")
        peer.sendall(b"QUIT\r\n")
        connection.doRead()
        self.turn(connection)
        peer.close()
        return spent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--retrs", type=int, default=200, help="RETRs per round (at most 200)")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="pop3-cpu-")
    try:
        seed(root, Address("s", "example.org"), 20, 2048)
        seed(root, Address("r", "example.org"), 200, 10240)
        # The listing cache keeps only listings of directories last changed
        # more than two seconds before (mtime and ctime), as a server
        # serving maildrops delivered to earlier does.
        time.sleep(2.5)
        bench = Bench(root)
        bench.session()
        bench.retrs(10)
        sessions, retrs = [], []
        for _ in range(args.rounds):
            sessions.append(sum(bench.session() for _ in range(args.sessions)) / args.sessions * 1e6)
            retrs.append(bench.retrs(args.retrs) / args.retrs * 1e6)
        print(f"pop3gw from {os.path.dirname(pop3gw.__file__)}")
        for name, values in (("session", sessions), ("retr 10 KB", retrs)):
            print(f"{name:12s} best {min(values):7.1f} us  median {statistics.median(values):7.1f} us")
    finally:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
