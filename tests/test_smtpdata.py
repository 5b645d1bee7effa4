"""
Tests for L{pop3gw.smtpdata._MessageReader}: the data after DATA and the
chunks of BDAT read a chunk at a time give exactly what a line-by-line
reading gives, however the input is cut into TCP reads.
"""

from __future__ import annotations

from typing import Optional

import hypothesis
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.smtpdata import _MessageReader
from pop3gw.smtpreplies import (
    BARE_CR,
    DATA_LINE_TOO_LONG,
    HEADER_TOO_BIG,
    MAX_DATA_LINE,
    MAX_HEADER_SECTION,
    NUL_IN_DATA,
    TOO_BIG,
    Reply,
)
from pop3gw.testing import FakeDelivery


def _noFields(present: set) -> list[bytes]:
    return []


def _reader(maxSize: int = 10**9, dotStuffed: bool = True) -> tuple[_MessageReader, FakeDelivery]:
    delivery = FakeDelivery(lambda data: None)
    return _MessageReader(delivery, maxSize, None, _noFields, dotStuffed=dotStuffed), delivery


def readData(segments: list[bytes], maxSize: int = 10**9) -> tuple[Optional[Reply], bytes, bytes, int]:
    """
    Feed C{segments} as TCP reads after DATA's 354.

    @return: the refusal, the stored bytes, what followed the end of the
        data and the counted size.
    """
    reader, delivery = _reader(maxSize)
    buf = bytearray()
    ended = False
    for segment in segments:
        buf += segment
        if not ended and reader.consume(buf):
            ended = True
    assert ended, "the end of the data was not found"
    refusal = reader.finish()
    return refusal, (b"" if refusal is not None else delivery.data), bytes(buf), reader.size


def readChunks(chunks: list[bytes], maxSize: int = 10**9) -> tuple[Optional[Reply], bytes, int]:
    """
    Feed C{chunks} as the octets of BDAT chunks, then end the message.
    """
    reader, delivery = _reader(maxSize, dotStuffed=False)
    for chunk in chunks:
        reader.feed(chunk)
    reader.endChunks()
    refusal = reader.finish()
    return refusal, (b"" if refusal is not None else delivery.data), reader.size


def referenceRead(data: bytes, maxSize: int = 10**9) -> tuple[Optional[Reply], bytes, bytes]:
    """
    A model of the data rules (the module docstring of L{pop3gw.smtpdata}),
    written line by line and independent of the reader: the refusal, the
    stored bytes and what follows the end, for C{data} in one piece.
    Headers are not special here (the model is used with data whose first
    line is a field, so the header section's rules add nothing).
    """
    out = []
    refusal: Optional[Reply] = None
    size = 0
    previousCRLF = True
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        assert nl != -1, "no end"
        raw = data[pos:nl]
        pos = nl + 1
        crlf = raw.endswith(b"\r")
        line = raw[:-1] if crlf else raw
        if line == b"." and crlf and previousCRLF:
            break
        previousCRLF = crlf
        stuffing = 1 if line[:1] == b"." else 0
        if len(line) > MAX_DATA_LINE + stuffing:
            refusal = refusal or DATA_LINE_TOO_LONG
        elif b"\r" in line:
            refusal = refusal or BARE_CR
        elif b"\0" in line:
            refusal = refusal or NUL_IN_DATA
        if refusal is not None:
            continue
        if stuffing and len(line) > 1:
            line = line[1:]
        size += len(line) + 2
        if size > maxSize:
            refusal = TOO_BIG
            continue
        out.append(line + b"\r\n")
    return refusal, (b"" if refusal is not None else b"".join(out)), data[pos:]


#: A small message with every transparency case: stuffed lines, a lone "."
#: after a bare LF (content), a ".." line, a line that looks like a
#: command, the end, then a pipelined command.
SMALL = (
    b"Subject: x\r\n\r\n"
    b"..stuffed\r\n"
    b"a\n.\r\n"
    b"...\r\n"
    b"MAIL FROM:<x@y.example>\r\n"
    b".\n"
    b"end\r\n"
    b".\r\n"
    b"QUIT\r\n"
)
SMALL_STORED = (
    b"Subject: x\r\n\r\n"
    b".stuffed\r\n"
    b"a\r\n.\r\n"
    b"..\r\n"
    b"MAIL FROM:<x@y.example>\r\n"
    b".\r\n"
    b"end\r\n"
)


class SplitTests(SynchronousTestCase):
    """
    Every cut of the input into TCP reads gives the same result.
    """

    def test_oneSegment(self) -> None:
        """
        In one read: dot-stuffed lines are unstuffed, a lone "." after a
        bare LF is content, bare LFs become CRLF, the data ends at
        CRLF.CRLF and what follows is left for the commands.
        """
        self.assertEqual(readData([SMALL]), (None, SMALL_STORED, b"QUIT\r\n", len(SMALL_STORED)))

    def test_everySplitPosition(self) -> None:
        """
        The message cut into two reads at every position, including inside
        the end marker and inside a dot-stuffed line, gives the same.
        """
        for i in range(len(SMALL) + 1):
            self.assertEqual(
                readData([SMALL[:i], SMALL[i:]]), (None, SMALL_STORED, b"QUIT\r\n", len(SMALL_STORED)), i
            )

    def test_everyPairOfSplitPositions(self) -> None:
        """
        The message cut into three reads at every pair of positions gives
        the same.
        """
        n = len(SMALL)
        for i in range(n + 1):
            for j in range(i, n + 1):
                self.assertEqual(
                    readData([SMALL[:i], SMALL[i:j], SMALL[j:]]),
                    (None, SMALL_STORED, b"QUIT\r\n", len(SMALL_STORED)),
                    (i, j),
                )

    def test_byteByByte(self) -> None:
        """
        One octet per read gives the same.
        """
        self.assertEqual(
            readData([SMALL[i : i + 1] for i in range(len(SMALL))]),
            (None, SMALL_STORED, b"QUIT\r\n", len(SMALL_STORED)),
        )

    def test_endMarkerAtStart(self) -> None:
        """
        Data that is only the end marker is an empty message, whether the
        marker comes whole or in pieces.
        """
        for cut in range(4):
            self.assertEqual(readData([b".\r\n"[:cut], b".\r\n"[cut:] + b"NOOP\r\n"]), (None, b"", b"NOOP\r\n", 0))

    def test_endMarkerAfterBareLFIsContent(self) -> None:
        """
        ".\\r\\n" after a line ended by a bare LF is content, at a read
        boundary too; only the later CRLF.CRLF ends the data.
        """
        data = b"Subject: x\r\n\r\nbody\n.\r\nmore\r\n.\r\n"
        for i in range(len(data) + 1):
            self.assertEqual(
                readData([data[:i], data[i:]]),
                (None, b"Subject: x\r\n\r\nbody\r\n.\r\nmore\r\n", b"", 29),
                i,
            )

    def test_largeBodyInReads(self) -> None:
        """
        A body of many lines in reads of 1000 octets is stored exactly,
        with its stuffed lines unstuffed.
        """
        body = b"".join(b"..line %d\r\n" % i if i % 7 == 0 else b"line %d\r\n" % i for i in range(5000))
        expected = b"Subject: x\r\n\r\n" + body.replace(b"\r\n..", b"\r\n.").replace(b"..line 0", b".line 0", 1)
        data = b"Subject: x\r\n\r\n" + body + b".\r\n"
        segments = [data[i : i + 1000] for i in range(0, len(data), 1000)]
        self.assertEqual(readData(segments), (None, expected, b"", len(expected)))


class RuleTests(SynchronousTestCase):
    """
    The refusals come out of the chunked reading as out of the rules, the
    first rule broken winning.
    """

    HEAD = b"Subject: x\r\n\r\n"

    def test_bareCR(self) -> None:
        """
        A bare CR in the body is refused with 550 5.6.11.
        """
        self.assertEqual(readData([self.HEAD + b"a\rb\r\n.\r\n"])[0], BARE_CR)

    def test_bareCRAtReadBoundary(self) -> None:
        """
        A CR ending one read followed by an LF is a CRLF; followed by
        anything else it is a bare CR.
        """
        self.assertEqual(readData([self.HEAD + b"a\r", b"\nb\r\n.\r\n"])[:2], (None, self.HEAD + b"a\r\nb\r\n"))
        self.assertEqual(readData([self.HEAD + b"a\r", b"b\r\n.\r\n"])[0], BARE_CR)

    def test_nul(self) -> None:
        """
        A NUL is refused with 550 5.6.0.
        """
        self.assertEqual(readData([self.HEAD + b"a\0b\r\n.\r\n"])[0], NUL_IN_DATA)

    def test_firstRuleWins(self) -> None:
        """
        A NUL before a bare CR is refused as a NUL, and the other way
        round.
        """
        self.assertEqual(readData([self.HEAD + b"a\0\r\nb\rc\r\n.\r\n"])[0], NUL_IN_DATA)
        self.assertEqual(readData([self.HEAD + b"b\rc\r\na\0\r\n.\r\n"])[0], BARE_CR)

    def test_lineLengths(self) -> None:
        """
        998 octets pass, 999 are refused, except a stuffed line (999 with
        its leading "."), wherever the line is in the read.
        """
        for prefix in (b"", b"x\r\n"):
            ok = self.HEAD + prefix + b"y" * 998 + b"\r\n." + b"z" * 998 + b"\r\n.\r\n"
            self.assertEqual(readData([ok])[0], None)
            self.assertEqual(readData([self.HEAD + prefix + b"y" * 999 + b"\r\n.\r\n"])[0], DATA_LINE_TOO_LONG)
            self.assertEqual(readData([self.HEAD + prefix + b"y" * 999 + b"\nz\r\n.\r\n"])[0], DATA_LINE_TOO_LONG)

    def test_sizeLimit(self) -> None:
        """
        The size limit counts the stored octets: a message of exactly the
        limit passes, one more octet is refused with 552 5.3.4.
        """
        data = self.HEAD + b"a" * 10 + b"\r\n.\r\n"
        size = len(self.HEAD) + 12
        self.assertEqual(readData([data], maxSize=size)[0], None)
        self.assertEqual(readData([data], maxSize=size - 1)[0], TOO_BIG)

    def test_refusedThenEndFound(self) -> None:
        """
        After a refusal the rest is dropped up to the real end, and what
        follows is left for the commands.
        """
        data = self.HEAD + b"a\0\r\n" + b"b" * 5000 + b"\r\nc\n.\nd\r\n.\r\nNOOP\r\n"
        for i in range(0, len(data) + 1, 97):
            self.assertEqual(readData([data[:i], data[i:]])[::2], (NUL_IN_DATA, b"NOOP\r\n"), i)

    def test_headerTooBig(self) -> None:
        """
        A header section over its limit is refused with 552 5.3.4.
        """
        field = b"X-A: " + b"a" * 900 + b"\r\n"
        data = field * (MAX_HEADER_SECTION // len(field) + 1) + b"\r\nbody\r\n.\r\n"
        self.assertEqual(readData([data])[0], HEADER_TOO_BIG)

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(
        pieces=st.lists(
            st.sampled_from([b"a", b"bc", b".", b"..", b"\r", b"\n", b"\r\n", b"\0", b"x" * 500, b"MAIL FROM:<a@b>"]),
            max_size=40,
        ),
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
        maxSize=st.sampled_from([10**9, 600, 50]),
    )
    def test_sameAsLineModel(self, pieces: list, cuts: list, maxSize: int) -> None:
        """
        For any data and any cut into reads, the chunked reader gives the
        refusal, stored bytes and leftover of the line-by-line model.
        """
        data = b"Subject: x\r\n\r\n" + b"".join(pieces) + b"\r\n.\r\nNOOP\r\n"
        refusal, stored, rest = referenceRead(data, maxSize)
        previous = 0
        segments = []
        for cut in sorted(c for c in set(cuts) if c < len(data)) + [len(data)]:
            segments.append(data[previous:cut])
            previous = cut
        got = readData(segments, maxSize)
        self.assertEqual(got[:3], (refusal, stored, rest))


class ChunkTests(SynchronousTestCase):
    """
    BDAT chunks: the same rules, counted octets, no transparency.
    """

    def test_noTransparency(self) -> None:
        """
        Leading dots are kept and CRLF.CRLF is content: BDAT has no end
        marker.
        """
        data = b"Subject: x\r\n\r\n..a\r\n.\r\nMAIL FROM:<a@b.example>\r\n"
        self.assertEqual(readChunks([data]), (None, data, len(data)))

    def test_everySplitPosition(self) -> None:
        """
        Lines spanning chunks, CRLFs cut between chunks included, give the
        same as one chunk.
        """
        data = b"Subject: x\r\n\r\na\nb\r\n..c\r\n" + b"d" * 998 + b"\r\n"
        expected = b"Subject: x\r\n\r\na\r\nb\r\n..c\r\n" + b"d" * 998 + b"\r\n"
        for i in range(len(data) + 1):
            self.assertEqual(readChunks([data[:i], data[i:]]), (None, expected, len(expected)), i)

    def test_lastLineWithoutLineEnd(self) -> None:
        """
        A last line without a line end is stored with CRLF; a CR at the
        very end is a bare CR.
        """
        self.assertEqual(readChunks([b"Subject: x\r\n\r\nend"])[:2], (None, b"Subject: x\r\n\r\nend\r\n"))
        self.assertEqual(readChunks([b"Subject: x\r\n\r\nend\r"])[0], BARE_CR)

    def test_rules(self) -> None:
        """
        Bare CR, NUL, line length (999 octets with a leading "." too) and
        size are refused as in DATA.
        """
        head = b"Subject: x\r\n\r\n"
        self.assertEqual(readChunks([head + b"a\r", b"b\r\n"])[0], BARE_CR)
        self.assertEqual(readChunks([head + b"a\0\r\n"])[0], NUL_IN_DATA)
        self.assertEqual(readChunks([head + b"." + b"a" * 998 + b"\r\n"])[0], DATA_LINE_TOO_LONG)
        self.assertEqual(readChunks([head + b"a" * 998 + b"\r\n"])[0], None)
        self.assertEqual(readChunks([head, b"a" * 10 + b"\r\n"], maxSize=len(head) + 11)[0], TOO_BIG)
