# -*- test-case-name: tests.test_wire -*-
"""
Tests for L{pop3gw.wire}: the line-end conversions shared by the queue,
the bounces and the maildrops.
"""

from twisted.trial.unittest import SynchronousTestCase

from pop3gw.wire import CRLFStream, CRLFToLF, toCRLF


class ToCRLFTests(SynchronousTestCase):
    def test_bareLF(self) -> None:
        """
        Every bare LF becomes CRLF; CRLF and bare CR are unchanged.
        """
        self.assertEqual(toCRLF(b"a\nb\r\nc\rd\n\n"), b"a\r\nb\r\nc\rd\r\n\r\n")

    def test_streamSplitCRLF(self) -> None:
        """
        L{CRLFStream} gives the result of L{toCRLF} on the whole, whatever
        the cut, a CRLF split between two chunks included.
        """
        data = b"a\r\nb\nc\r\rd\n\r\n"
        for cut in range(len(data) + 1):
            stream = CRLFStream()
            self.assertEqual(stream.feed(data[:cut]) + stream.feed(data[cut:]), toCRLF(data), cut)


class CRLFToLFTests(SynchronousTestCase):
    def test_wholeOrCut(self) -> None:
        """
        L{CRLFToLF} gives C{data.replace(b"\\r\\n", b"\\n")} whatever the
        cuts (a CRLF split between two chunks included); bare CRs, a final
        one included, are kept.
        """
        for data in (b"a\r\nb\nc\r\rd\n\r\n", b"x\r\r\n\r", b"\r"):
            expected = data.replace(b"\r\n", b"\n")
            for first in range(len(data) + 1):
                for second in range(first, len(data) + 1):
                    lines = CRLFToLF()
                    out = lines.feed(data[:first]) + lines.feed(data[first:second]) + lines.feed(data[second:])
                    self.assertEqual(out + lines.finish(), expected, (data, first, second))
