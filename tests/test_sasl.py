"""
Tests for L{pop3gw.sasl}: PLAIN and LOGIN response decoding.
"""

from __future__ import annotations

import base64

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
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
