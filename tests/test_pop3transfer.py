# -*- test-case-name: tests.test_pop3transfer -*-
"""
Tests for L{pop3gw.pop3transfer}: how a message is streamed for RETR.
"""

from __future__ import annotations

import io
import socket

from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.pop3transfer import (
    DIRECT_SEND_BUDGET,
    MERGED_END_SIZE,
    STUFF_FIND_LIMIT,
    _directSocket,
    _DotStuffer,
    _MessageSender,
)


class _Writes:
    """
    A transport that records each write.
    """

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


class _KnowsEnd(io.BytesIO):
    """
    A source that tells when it is exhausted, as the Maildir reader does.
    """

    @property
    def exhausted(self) -> bool:
        return self.tell() >= len(self.getbuffer())


class MessageSenderTests(SynchronousTestCase):
    """
    L{_MessageSender} streams a message dot-stuffed and ends it with the
    C{.} line.
    """

    def send(
        self, source, chunkSize: int = 1 << 18, head: bytes = b"", topLines=None
    ) -> tuple[list[bytes], list[int]]:
        transport = _Writes()
        sent: list[int] = []
        done: list = []
        sender = _MessageSender(
            transport, source, topLines, lambda s, f: done.append(f), lambda: None, sent.append, chunkSize, head
        )
        sender.start(paused=False)
        self.assertEqual(done, [None])
        return transport.writes, sent

    def test_smallMessageOneWrite(self) -> None:
        """
        A small message from a source that tells it is exhausted goes out
        in one write with the end of the response.
        """
        writes, sent = self.send(_KnowsEnd(b"a\r\n.b\r\n"))
        self.assertEqual(writes, [b"a\r\n..b\r\n.\r\n"])
        self.assertEqual(sent, [7])

    def test_sourceNotTellingItsEnd(self) -> None:
        """
        A source without C{exhausted} gets the same octets, the end in a
        write of its own.
        """
        writes, sent = self.send(io.BytesIO(b"a\r\n.b\r\n"))
        self.assertEqual(writes, [b"a\r\n..b\r\n", b".\r\n"])
        self.assertEqual(sent, [7])

    def test_noFinalLineEnd(self) -> None:
        """
        A source whose data does not end a line gets CRLF before the C{.}
        line, in the same write.
        """
        writes, _ = self.send(_KnowsEnd(b"a\r\nb"))
        self.assertEqual(writes, [b"a\r\nb\r\n.\r\n"])

    def test_largeLastPieceNotCopied(self) -> None:
        """
        A last piece larger than L{MERGED_END_SIZE} is written as it is,
        then the end.
        """
        data = b"x" * MERGED_END_SIZE + b"\r\n"
        writes, sent = self.send(_KnowsEnd(data))
        self.assertEqual(writes, [data, b".\r\n"])
        self.assertEqual(sent, [len(data)])

    def test_manyChunks(self) -> None:
        """
        A message of several chunks is written chunk by chunk, the last one
        with the end; every message octet is counted once.
        """
        data = b"0123456789\r\n" * 10
        writes, sent = self.send(_KnowsEnd(data), chunkSize=48)
        self.assertEqual(b"".join(writes), data + b".\r\n")
        self.assertEqual(writes[-1], data[96:] + b".\r\n")
        self.assertEqual(len(writes), 3)
        self.assertEqual(sum(sent), len(data))

    def test_statusLineWithSmallMessage(self) -> None:
        """
        The status line, a small message and the end of the response go out
        in one write.
        """
        writes, sent = self.send(_KnowsEnd(b".a\r\n"), head=b"+OK 5 octets\r\n")
        self.assertEqual(writes, [b"+OK 5 octets\r\n..a\r\n.\r\n"])
        self.assertEqual(sent, [4])

    def test_statusLineWithFirstChunk(self) -> None:
        """
        The status line goes out with the first chunk of a message of
        several chunks, and only there.
        """
        data = b"0123456789\r\n" * 10
        writes, sent = self.send(_KnowsEnd(data), chunkSize=48, head=b"+OK\r\n")
        self.assertEqual(writes, [b"+OK\r\n" + data[:48], data[48:96], data[96:] + b".\r\n"])
        self.assertEqual(sum(sent), len(data))

    def test_emptyMessage(self) -> None:
        """
        An empty message is the status line and the C{.} line, in one write.
        """
        writes, sent = self.send(_KnowsEnd(b""), head=b"+OK 0 octets\r\n")
        self.assertEqual(writes, [b"+OK 0 octets\r\n.\r\n"])
        self.assertEqual(sent, [])

    def test_topInOneWrite(self) -> None:
        """
        TOP of a message read in one chunk goes out in one write with its
        status line and end, cut after the asked body lines.
        """
        writes, sent = self.send(
            io.BytesIO(b"Subject: x\r\n\r\n.one\r\ntwo\r\nthree\r\n"), head=b"+OK\r\n", topLines=1
        )
        self.assertEqual(writes, [b"+OK\r\nSubject: x\r\n\r\n..one\r\n.\r\n"])
        self.assertEqual(sent, [20])

    def test_topWithoutLineEnd(self) -> None:
        """
        TOP of a message whose last line has no line end adds CRLF before
        the C{.} line.
        """
        writes, _ = self.send(_KnowsEnd(b"Subject: x\r\n\r\nlast"), head=b"+OK\r\n", topLines=5)
        self.assertEqual(writes, [b"+OK\r\nSubject: x\r\n\r\nlast\r\n.\r\n"])


class _Recorder(Protocol):
    """
    A protocol for a test connection; it does nothing.
    """


class DirectSendTests(SynchronousTestCase):
    """
    On Twisted's TCP connection (here over a Unix socket pair), a transfer
    whose transport has nothing buffered goes straight to the socket,
    without registering the connection for writing; anything else keeps
    the order of the transport's buffer.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        theirs.setblocking(False)
        self.peer = theirs
        self.connection = tcp.Connection(ours, _Recorder(), self.reactor)
        self.connection.connected = 1

    def received(self) -> bytes:
        out = []
        while True:
            try:
                data = self.peer.recv(1 << 20)
            except BlockingIOError:
                return b"".join(out)
            out.append(data)

    def flush(self) -> None:
        """
        Let the connection write its buffer, as the reactor would.
        """
        while self.connection in self.reactor.getWriters():
            self.connection.doWrite()

    def send(self, transport, data: bytes, chunkSize: int = 1 << 18) -> list:
        done: list = []
        sender = _MessageSender(
            transport, _KnowsEnd(data), None, lambda s, f: done.append(f), lambda: None, lambda n: None,
            chunkSize, b"+OK\r\n",
        )
        sender.start(paused=False)
        return done

    def test_directSocketFound(self) -> None:
        """
        L{_directSocket} finds the socket of an idle connection, also under
        a L{ProtocolWrapper}.  (It reads attributes of Twisted's
        C{FileDescriptor} outside its interface: this fails if they change.)
        """
        self.assertIs(_directSocket(self.connection), self.connection.socket)
        wrapper = ProtocolWrapper(WrappingFactory(Factory()), _Recorder())
        wrapper.makeConnection(self.connection)
        self.assertIs(_directSocket(wrapper), self.connection.socket)

    def test_notDirect(self) -> None:
        """
        A connection running TLS, closing, or with octets waiting in its
        buffer is not written to directly.
        """
        self.connection.TLS = True
        self.assertIsNone(_directSocket(self.connection))
        self.connection.TLS = False
        self.connection.disconnecting = True
        self.assertIsNone(_directSocket(self.connection))
        self.connection.disconnecting = False
        self.connection.write(b"x")
        self.assertIsNone(_directSocket(self.connection))
        self.assertIsNone(_directSocket(_Writes()))

    def test_smallMessageOneSend(self) -> None:
        """
        A small message and its status line go out to the socket at once:
        the connection has nothing buffered and is not registered for
        writing.
        """
        done = self.send(self.connection, b".a\r\nb\r\n")
        self.assertEqual(done, [None])
        self.assertEqual(self.received(), b"+OK\r\n..a\r\nb\r\n.\r\n")
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual(self.connection.dataBuffer, b"")

    def test_behindBufferedOctets(self) -> None:
        """
        With octets already in the connection's buffer, the transfer is
        buffered behind them, in order.
        """
        self.connection.write(b"+OK earlier\r\n")
        self.send(self.connection, b"a\r\n")
        self.assertEqual(self.received(), b"")
        self.flush()
        self.assertEqual(self.received(), b"+OK earlier\r\n+OK\r\na\r\n.\r\n")

    def test_socketFull(self) -> None:
        """
        What the socket does not take is left in the connection's buffer
        and follows in order.
        """
        data = bytes(range(10, 110)) * 30000 + b"\r\n"
        self.send(self.connection, data, chunkSize=1 << 16)
        self.assertIn(self.connection, self.reactor.getWriters())
        out = [self.received()]
        while self.connection in self.reactor.getWriters():
            self.connection.doWrite()
            if self.connection.producer is not None:
                self.connection.producer.resumeProducing()
            out.append(self.received())
        self.assertEqual(b"".join(out), b"+OK\r\n" + data + b".\r\n")

    def test_budget(self) -> None:
        """
        At most L{DIRECT_SEND_BUDGET} octets go straight to the socket in
        one run of the sender; the next chunk is left in the buffer.
        """
        self.connection.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * DIRECT_SEND_BUDGET)
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * DIRECT_SEND_BUDGET)
        chunk = 1 << 18
        data = b"x" * (DIRECT_SEND_BUDGET + 2 * chunk - 2) + b"\r\n"
        done = self.send(self.connection, data, chunkSize=chunk)
        self.assertEqual(done, [None])
        direct = self.received()
        self.assertEqual(len(direct), len(b"+OK\r\n") + DIRECT_SEND_BUDGET)
        self.flush()
        self.assertEqual(direct + self.received(), b"+OK\r\n" + data + b".\r\n")


class DotStuffingTests(SynchronousTestCase):
    """
    L{_DotStuffer} doubles the C{.} that begins a line, whatever the chunks
    and however many such lines a chunk holds.
    """

    def stuffed(self, data: bytes, size: int) -> bytes:
        stuffer = _DotStuffer()
        return b"".join(stuffer.stuff(data[i : i + size]) for i in range(0, len(data), size))

    def test_fewDotLines(self) -> None:
        """
        A chunk with a few lines beginning with C{.} among many without.
        """
        data = b"a.b\r\n" * 50 + b".one\r\n" + b"x\r\n" * 30 + b"..two\r\n.\r\nend.\r\n"
        expected = b"a.b\r\n" * 50 + b"..one\r\n" + b"x\r\n" * 30 + b"...two\r\n..\r\nend.\r\n"
        self.assertEqual(self.stuffed(data, len(data)), expected)

    def test_manyDotLines(self) -> None:
        """
        A chunk in which more than L{STUFF_FIND_LIMIT} lines begin with
        C{.}, and one in which exactly that many do.
        """
        for count in (STUFF_FIND_LIMIT, STUFF_FIND_LIMIT + 1, 5 * STUFF_FIND_LIMIT):
            data = b"head\r\n" + b".dot\r\nplain\r\n" * count
            expected = b"head\r\n" + b"..dot\r\nplain\r\n" * count
            self.assertEqual(self.stuffed(data, len(data)), expected, count)

    def test_everyChunking(self) -> None:
        """
        The same result for every chunk size, with dots at chunk starts,
        ends and after a line end split between chunks.
        """
        data = b".a\r\n" + b"b.\r\n.\r\n..c\r\nd\r\n" * 7 + b".\r\n"
        expected = b"..a\r\n" + b"b.\r\n..\r\n...c\r\nd\r\n" * 7 + b"..\r\n"
        for size in range(1, len(data) + 1):
            self.assertEqual(self.stuffed(data, size), expected, size)
