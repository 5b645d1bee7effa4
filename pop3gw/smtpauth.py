# -*- test-case-name: tests.test_smtp -*-
"""
Submission AUTH (RFC 4954): PLAIN and LOGIN over the shared decoder in
L{pop3gw.sasl}, and the portal login.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from pop3gw import events
from pop3gw.credentials import ClientCredentials
from pop3gw.interfaces import ISubmissionAvatar
from pop3gw.sasl import (
    BadBase64,
    LoginOutcome,
    MalformedPlain,
    decodeResponse,
    loggedUser,
    logLoginFailure,
    parsePlain,
)
from pop3gw.smtpreplies import (
    AUTH_BAD_BASE64,
    AUTH_CANCELLED,
    AUTH_CONTINUE,
    AUTH_ENCRYPTION_REQUIRED,
    AUTH_FAILED,
    AUTH_MALFORMED,
    AUTH_MECHANISM,
    AUTH_OK,
    AUTH_PASSWORD,
    AUTH_SYNTAX,
    AUTH_USERNAME,
    LOGIN_REPLIES,
    MAX_AUTH_FAILURES,
    SEND_EHLO_FIRST,
    SERVICE,
    Reply,
    SMTPRefusal,
    _Mode,
    _State,
)


def decodeBase64(text: str) -> bytes:
    """
    Decode one SASL response (RFC 4954): strict base64, C{"="} meaning the
    empty string.

    @raise SMTPRefusal: with L{AUTH_BAD_BASE64}.
    """
    try:
        return decodeResponse(text.encode("ascii"))
    except (BadBase64, UnicodeEncodeError):
        raise SMTPRefusal(AUTH_BAD_BASE64) from None

if TYPE_CHECKING:
    from pop3gw.smtp import SubmissionFactory
    from pop3gw.smtpreplies import SMTPHost as _Host
else:
    _Host = object


class AuthCommands(_Host):
    """
    The AUTH command and the SASL exchange it starts, mixed into
    L{pop3gw.smtp.SubmissionServer}, whose state they use.
    """

    if TYPE_CHECKING:
        # What SubmissionServer provides beyond any SMTP server.
        factory: SubmissionFactory

    def do_AUTH(self, argument: str) -> Optional[Deferred]:
        if not self._esmtp:
            raise SMTPRefusal(SEND_EHLO_FIRST)
        parts = argument.split(" ")
        if not argument or len(parts) > 2:
            raise SMTPRefusal(AUTH_SYNTAX)
        mechanism = parts[0].upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            raise SMTPRefusal(AUTH_MECHANISM)
        initial = parts[1] if len(parts) == 2 else None
        if not self._plaintextAllowed():
            events.loginRefused(
                self.log, SERVICE, loggedUser(mechanism, None if initial is None else initial.encode("ascii", "replace")), self.peer, events.PLAINTEXT_DISALLOWED
            )
            raise SMTPRefusal(AUTH_ENCRYPTION_REQUIRED)
        if mechanism == "PLAIN":
            if initial is None:
                self._auth = ("PLAIN",)
                self._mode = _Mode.AUTH
                self._send(AUTH_CONTINUE)
                return None
            return self._authPlain(decodeBase64(initial))
        if initial is None:
            self._auth = ("LOGIN-USER",)
            self._mode = _Mode.AUTH
            self._send(AUTH_USERNAME)
            return None
        self._auth = ("LOGIN-PASSWORD", decodeBase64(initial))
        self._mode = _Mode.AUTH
        self._send(AUTH_PASSWORD)
        return None

    def _authResponse(self, line: bytes) -> None:
        """
        One SASL response line in the middle of an AUTH exchange.
        """
        step, self._auth = self._auth, None
        assert step is not None, "the AUTH mode has a step"
        self._mode = _Mode.COMMAND
        if line == b"*":
            self._send(AUTH_CANCELLED)
            return
        try:
            response = decodeBase64(line.decode("ascii"))
            if step[0] == "PLAIN":
                result = self._authPlain(response)
            elif step[0] == "LOGIN-USER":
                self._auth = ("LOGIN-PASSWORD", response)
                self._mode = _Mode.AUTH
                self._send(AUTH_PASSWORD)
                return
            else:
                result = self._login(step[1], response)
        except UnicodeDecodeError:
            self._send(AUTH_BAD_BASE64)
            return
        except SMTPRefusal as e:
            self._send(e.reply)
            return
        if isinstance(result, Deferred):
            self.hold(result)

    def _authPlain(self, decoded: bytes) -> Optional[Deferred]:
        try:
            response = parsePlain(decoded)
        except MalformedPlain:
            raise SMTPRefusal(AUTH_MALFORMED) from None
        if response.authzid and response.authzid != response.authcid:
            events.loginFailed(self.log, SERVICE, response.authcid, self.peer, "authorization identity differs")
            self._authFailed()
            return None
        return self._login(response.authcid, response.password)

    def _login(self, user: bytes, password: bytes) -> Deferred:
        d = self.factory.portal.login(
            ClientCredentials(user, password, self.peer, "submission"), self.peer, ISubmissionAvatar
        )
        d.addCallbacks(self._cbLogin, self._ebLogin, callbackArgs=(user,), errbackArgs=(user,))
        return d

    def _cbLogin(self, result: tuple, user: bytes) -> None:
        interface, avatar, logout = result
        if self.ended():
            logout()
            return
        self._avatar = avatar
        self._logout = logout
        # The user as stored, whatever case the client typed.
        self._user = str(avatar.address)
        self._state = _State.AUTHENTICATED
        self.loggedIn()
        events.loginSucceeded(self.log, SERVICE, self._user, self.peer, self.secure)
        self._send(AUTH_OK)

    def _ebLogin(self, failure: Failure, user: bytes) -> None:
        """
        Answer and log a login that did not succeed, as L{pop3gw.sasl.LOGIN_ERRORS}
        says; a client that hung up gets no answer but the same log line.
        """
        kind = logLoginFailure(self.log, SERVICE, user, self.peer, failure)
        if kind is LoginOutcome.FAILED:
            events.loginFailed(self.log, SERVICE, user, self.peer)
            self._authFailed(LOGIN_REPLIES[kind])
        else:
            self._send(LOGIN_REPLIES[kind])

    def _authFailed(self, reply: Reply = AUTH_FAILED) -> None:
        self._authFailures += 1
        self._send(reply)
        if self._authFailures >= MAX_AUTH_FAILURES:
            self._close(Reply(421, f"4.7.0 {self.factory.hostname} Error: too many authentication failures"))
