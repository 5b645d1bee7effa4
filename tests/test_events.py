"""
Log lines: network text is quoted and escaped so it cannot forge a line.
"""

import os
import re

from twisted.logger import Logger, LogLevel, formatEvent, formatEventAsClassicLogText
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.events import (
    PLAINTEXT_DISALLOWED,
    loggedOut,
    loginFailed,
    loginRefused,
    loginSucceeded,
    loginUnavailable,
    sanitize,
)

FAIL2BAN_FILTER = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "fail2ban", "filter.d", "pop3gw.conf"
)


def fail2banRegex() -> "re.Pattern[str]":
    """
    The shipped filter's C{failregex} (one line), with C{<HOST>} as
    fail2ban expands it (close enough for addresses in these tests).
    """
    with open(FAIL2BAN_FILTER) as f:
        (line,) = [line for line in f if line.startswith("failregex")]
    pattern = line.split("=", 1)[1].strip()
    return re.compile(pattern.replace("<HOST>", r"(?P<host>[0-9A-Fa-f.:]+)"))


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
        self.assertEqual(len(sanitize("a" * 1000, limit=300)), 302)


class LoginRefusedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list = []
        self.log = Logger(observer=self.events.append)

    def test_format(self) -> None:
        """
        A login refused by policy is one warn line with the service, the
        peer, the quoted user and the quoted reason.
        """
        loginRefused(self.log, "pop3", "alice@example.org", "192.0.2.7", PLAINTEXT_DISALLOWED)
        self.assertEqual(
            [(e["log_level"], formatEvent(e)) for e in self.events],
            [
                (
                    LogLevel.warn,
                    'login refused: service=pop3 rhost=192.0.2.7 user="alice@example.org"'
                    ' reason="plaintext authentication disallowed"',
                )
            ],
        )

    def test_userEscaped(self) -> None:
        """
        The user name (network text, possibly unknown) is escaped like
        everywhere else, so it cannot forge a second line.
        """
        loginRefused(self.log, "submission", "x\nauthentication failed: rhost=1.2.3.4", "192.0.2.7", "r")
        loginRefused(self.log, "submission", None, "192.0.2.7", "r")
        self.assertEqual(
            [formatEvent(e) for e in self.events],
            [
                'login refused: service=submission rhost=192.0.2.7'
                ' user="x\\x0aauthentication failed: rhost=1.2.3.4" reason="r"',
                'login refused: service=submission rhost=192.0.2.7 user="" reason="r"',
            ],
        )

    def test_notCountedByFail2ban(self) -> None:
        """
        The shipped fail2ban filter does not match a refused login (a
        client not configured for TLS is not guessing passwords), while it
        does match a failed one.
        """
        log = Logger(namespace="pop3gw.pop3.POP3Server", observer=self.events.append)
        loginRefused(log, "pop3", "alice@example.org", "192.0.2.7", PLAINTEXT_DISALLOWED)
        loginFailed(log, "pop3", "alice@example.org", "192.0.2.7")
        # As twistd writes them to its log file.
        refused, failed = [formatEventAsClassicLogText(e) for e in self.events]
        regex = fail2banRegex()
        self.assertIsNone(regex.search(refused))
        self.assertEqual(regex.search(failed).group("host"), "192.0.2.7")


class SessionLinesTests(SynchronousTestCase):
    """
    The login and logout lines, logged for every session: built as text
    (see L{pop3gw.events.literal}), with their values kept as fields.
    """

    def setUp(self) -> None:
        self.events: list = []
        self.log = Logger(observer=self.events.append)

    def test_login(self) -> None:
        """
        A login is one info line naming the service, the peer, the quoted
        user and whether TLS is on; the event carries each as a field.
        """
        loginSucceeded(self.log, "pop3", "alice@example.org", "192.0.2.7", True)
        [event] = self.events
        self.assertEqual(
            (event["log_level"], formatEvent(event)),
            (LogLevel.info, 'login: service=pop3 rhost=192.0.2.7 user="alice@example.org" tls=yes'),
        )
        self.assertEqual(
            (event["service"], event["peer"], event["user"], event["tls"]),
            ("pop3", "192.0.2.7", '"alice@example.org"', "yes"),
        )

    def test_bracesInUser(self) -> None:
        """
        Braces in a user name are logged as they are: they are text, not
        fields of the line's format.
        """
        loginSucceeded(self.log, "submission", "{user}@{x", "192.0.2.7", False)
        loggedOut(self.log, "submission", "}a{b}@c", "192.0.2.7", messages=2, bytes=10)
        self.assertEqual(
            [formatEvent(e) for e in self.events],
            [
                'login: service=submission rhost=192.0.2.7 user="{user}@{x" tls=no',
                'logout: service=submission rhost=192.0.2.7 user="}a{b}@c" bytes=10 messages=2',
            ],
        )

    def test_logoutFields(self) -> None:
        """
        A logout line lists its counters in name order and keeps the user
        and peer as fields.
        """
        loggedOut(self.log, "pop3", "bob@example.org", "2001:db8::1", retrieved=3, deleted=1)
        [event] = self.events
        self.assertEqual(
            formatEvent(event), 'logout: service=pop3 rhost=2001:db8::1 user="bob@example.org" deleted=1 retrieved=3'
        )
        self.assertEqual((event["service"], event["peer"], event["user"]), ("pop3", "2001:db8::1", '"bob@example.org"'))


class LoginUnavailableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list = []

    def test_format(self) -> None:
        """
        A login that could not be checked is one warn line with the
        service, the peer, the quoted user and the quoted server-side
        reason, and the fail2ban filter does not match it.
        """
        log = Logger(namespace="pop3gw.smtp.SubmissionServer", observer=self.events.append)
        loginUnavailable(log, "submission", b"alice@example.org", "192.0.2.7", 'users "file"\nunreadable')
        self.assertEqual(
            [(e["log_level"], formatEvent(e)) for e in self.events],
            [
                (
                    LogLevel.warn,
                    'authentication unavailable: service=submission rhost=192.0.2.7 user="alice@example.org"'
                    ' error="users \\"file\\"\\x0aunreadable"',
                )
            ],
        )
        self.assertIsNone(fail2banRegex().search(formatEventAsClassicLogText(self.events[0])))
