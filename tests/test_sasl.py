"""
Tests for L{pop3gw.sasl}: PLAIN and LOGIN response decoding.
"""

from __future__ import annotations

import base64

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.interfaces import AuthenticationBusy, InsufficientStorage, TemporaryFailure
from pop3gw.sasl import (
    BadBase64,
    LoginOutcome,
    MalformedPlain,
    PlainResponse,
    classifyLoginFailure,
    decodeResponse,
    loggedUser,
    logLoginFailure,
    parsePlain,
)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class DecodeResponseTests(SynchronousTestCase):
    def test_strictBase64(self) -> None:
        """
        A response is strict base64; anything else is L{BadBase64}.
        """
        self.assertEqual(decodeResponse(_b64(b"abc")), b"abc")
        self.assertRaises(BadBase64, decodeResponse, b"YW*j")
        self.assertRaises(BadBase64, decodeResponse, b"YWJ")

    def test_emptyMarker(self) -> None:
        """
        C{"="} is the empty response where it may stand for one, and bad
        base64 elsewhere.
        """
        self.assertEqual(decodeResponse(b"="), b"")
        self.assertRaises(BadBase64, decodeResponse, b"=", emptyMarker=False)


class ParsePlainTests(SynchronousTestCase):
    def test_threeParts(self) -> None:
        """
        A PLAIN response is C{authzid NUL authcid NUL password}.
        """
        self.assertEqual(parsePlain(b"\x00alice\x00secret"), PlainResponse(b"", b"alice", b"secret"))
        self.assertEqual(parsePlain(b"bob\x00alice\x00s"), PlainResponse(b"bob", b"alice", b"s"))

    def test_malformed(self) -> None:
        """
        Fewer or more than three parts is L{MalformedPlain}.
        """
        self.assertRaises(MalformedPlain, parsePlain, b"alice\x00secret")
        self.assertRaises(MalformedPlain, parsePlain, b"a\x00b\x00c\x00d")

    def test_reprHidesPassword(self) -> None:
        """
        The C{repr} of a response never shows the password.
        """
        self.assertNotIn("secret", repr(parsePlain(b"\x00alice\x00secret")))


class LoggedUserTests(SynchronousTestCase):
    def test_plain(self) -> None:
        """
        For PLAIN, the authentication identity; L{None} when empty,
        malformed or not base64.
        """
        self.assertEqual(loggedUser("PLAIN", _b64(b"\x00alice\x00secret")), b"alice")
        self.assertIsNone(loggedUser("PLAIN", _b64(b"\x00\x00secret")))
        self.assertIsNone(loggedUser("PLAIN", _b64(b"alice")))
        self.assertIsNone(loggedUser("PLAIN", b"!!"))
        self.assertIsNone(loggedUser("PLAIN", None))

    def test_login(self) -> None:
        """
        For LOGIN, the decoded user name; L{None} when empty.
        """
        self.assertEqual(loggedUser("LOGIN", _b64(b"alice")), b"alice")
        self.assertIsNone(loggedUser("LOGIN", b"="))


class ClassifyLoginFailureTests(SynchronousTestCase):
    def test_table(self) -> None:
        """
        A rejected password is a failed login, a refused check busy, any
        other temporary failure unavailable (a full disk too), anything
        else a fault.
        """
        cases = [
            (UnauthorizedLogin(), LoginOutcome.FAILED),
            (UnhandledCredentials(), LoginOutcome.FAILED),
            (AuthenticationBusy("busy"), LoginOutcome.BUSY),
            (TemporaryFailure("down"), LoginOutcome.UNAVAILABLE),
            (InsufficientStorage("full"), LoginOutcome.UNAVAILABLE),
            (ValueError("bug"), LoginOutcome.FAULT),
        ]
        for error, outcome in cases:
            self.assertIs(classifyLoginFailure(Failure(error)), outcome, error)


class LogLoginFailureTests(SynchronousTestCase):
    def test_logged(self) -> None:
        """
        An unavailable check gets one warn line naming the service and the
        server's reason; a fault its traceback; a failed or refused login
        nothing here (the protocol logs and counts those).
        """
        events: list = []
        log = Logger(observer=events.append)
        self.assertIs(logLoginFailure(log, "pop3", "alice", "192.0.2.7", Failure(UnauthorizedLogin())), LoginOutcome.FAILED)
        self.assertIs(logLoginFailure(log, "pop3", "alice", "192.0.2.7", Failure(AuthenticationBusy("x"))), LoginOutcome.BUSY)
        self.assertEqual(events, [])
        self.assertIs(
            logLoginFailure(log, "submission", b"alice", "192.0.2.7", Failure(TemporaryFailure("db down"))),
            LoginOutcome.UNAVAILABLE,
        )
        self.assertEqual(len(events), 1)
        self.assertIn("service=submission", formatEvent(events[0]))
        self.assertIn("db down", formatEvent(events[0]))
        self.assertIs(logLoginFailure(log, "pop3", "alice", "192.0.2.7", Failure(ValueError("bug"))), LoginOutcome.FAULT)
        self.assertEqual(formatEvent(events[1]), "pop3 login failed unexpectedly")
        self.assertIsInstance(events[1]["log_failure"].value, ValueError)
