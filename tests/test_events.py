"""
Log lines: network text is quoted and escaped so it cannot forge a line.
"""

from twisted.trial.unittest import SynchronousTestCase

from pop3gw.events import sanitize


class SanitizeTests(SynchronousTestCase):
    def test_escapes(self) -> None:
        """
        Quotes, backslashes, line breaks and other controls are escaped;
        printable text (spaces included) is kept inside double quotes.
        """
        self.assertEqual(sanitize("alice@example.org"), '"alice@example.org"')
        self.assertEqual(sanitize('a"b\\c d'), '"a\\"b\\\\c d"')
        self.assertEqual(sanitize("x\nauthentication failed: rhost=1.2.3.4"), '"x\\x0aauthentication failed: rhost=1.2.3.4"')
        self.assertEqual(sanitize(b"\xff"), '"\ufffd"')
        self.assertEqual(sanitize(None), '""')

    def test_truncated(self) -> None:
        """
        Overlong user names are cut to a fixed length.
        """
        self.assertEqual(len(sanitize("a" * 1000)), 102)
