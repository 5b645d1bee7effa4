# -*- test-case-name: tests.test_pop3transfer -*-
"""
Tests for L{pop3gw.pop3transfer}: how a message is streamed for RETR.
"""

from __future__ import annotations

import io

from twisted.trial.unittest import SynchronousTestCase

from pop3gw.pop3transfer import MERGED_END_SIZE, _MessageSender


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

    def send(self, source, chunkSize: int = 1 << 18) -> tuple[list[bytes], list[int]]:
        transport = _Writes()
        sent: list[int] = []
        done: list = []
        sender = _MessageSender(
            transport, source, None, lambda s, f: done.append(f), lambda: None, sent.append, chunkSize
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
