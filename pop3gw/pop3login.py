# -*- test-case-name: tests.test_pop3 -*-
"""
The POP3 AUTHORIZATION state: USER/PASS, AUTH PLAIN (RFC 5034), STLS
(RFC 2595), the portal login and the opening of the maildrop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

from twisted.internet import defer
from twisted.python.failure import Failure

from pop3gw import events
from pop3gw.credentials import ClientCredentials
from pop3gw.interfaces import IPOP3Avatar, MaildropLocked, PermanentFailure, TemporaryFailure
from pop3gw.pop3replies import (
    _AUTHORIZATION,
    ERR_AUTH_FAILED,
    ERR_IN_USE,
    ERR_MAILDROP_PERM,
    ERR_MAILDROP_TEMP,
    ERR_PLAINTEXT,
    ERR_SASL_BASE64,
    ERR_SASL_CANCELLED,
    ERR_SASL_MECHANISM,
    ERR_TLS_ACTIVE,
    ERR_TLS_AFTER_USER,
    ERR_TLS_UNAVAILABLE,
    ERR_TOO_MANY_AUTH,
    ERR_USER_FIRST,
    LOGIN_REPLIES,
    MAX_AUTH_FAILURES,
    _BadArguments,
    _noArguments,
)
from pop3gw.sasl import (
    BadBase64,
    LoginOutcome,
    MalformedPlain,
    decodeResponse,
    loggedUser,
    logLoginFailure,
    parsePlain,
)


def _plainAuthcid(encoded: bytes) -> Optional[str]:
    """
    The authentication identity of a SASL PLAIN response, for a log line;
    the password in it is not looked at.

    @return: C{None} if C{encoded} is not a well-formed response.
    """
    authcid = loggedUser("PLAIN", encoded)
    try:
        return None if authcid is None else authcid.decode("utf-8")
    except UnicodeDecodeError:
        return None

if TYPE_CHECKING:
    from pop3gw.lineproto import LineProtocol as _Host
    from pop3gw.pop3 import POP3Factory
else:
    _Host = object


class AuthorizationCommands(_Host):
    """
    The handlers of the AUTHORIZATION state and the login they start, mixed
    into L{pop3gw.pop3.POP3Server}, whose state they use.
    """

    if TYPE_CHECKING:
        # What POP3Server and TransactionCommands provide.
        factory: POP3Factory
        state: str
        _authFailures: int
        _user: Optional[str]
        _refusedUser: Optional[str]
        _saslPending: bool
        _avatar: object
        _logout: Optional[Callable[[], None]]
        _maildrop: object
        _messages: Sequence

        def _reply(self, text: str) -> None: ...
        def _replyMultiline(self, first: str, lines: list[str]) -> None: ...
        def _clientError(self, text: str) -> None: ...
        def _close(self, text: Optional[str] = None) -> None: ...
        def _callLogout(self) -> None: ...
        def _plaintextAllowed(self) -> bool: ...
        def _stlsOffered(self) -> bool: ...
        def _avatarName(self) -> str: ...
        def _beginTransaction(self, maildrop) -> None: ...

    def do_USER(self, rest: str) -> None:
        words = rest.split()
        if len(words) != 1:
            raise _BadArguments()
        self._user = None
        if not self._plaintextAllowed():
            self._refusedUser = words[0]
            self._refusePlaintext(words[0])
            return
        self._user = words[0]
        self._reply("+OK Send PASS.")

    def do_PASS(self, rest: str) -> None:
        user, self._user = self._user, None
        if not self._plaintextAllowed():
            refused, self._refusedUser = self._refusedUser, None
            if refused is None:
                self._refusePlaintext(None)
            else:
                # The refused USER before it logged this attempt.
                self._clientError(ERR_PLAINTEXT)
            return
        if user is None:
            self._clientError(ERR_USER_FIRST)
            return
        if not rest:
            raise _BadArguments()
        self._login(user, rest.encode("utf-8"))

    def do_AUTH(self, rest: str) -> None:
        self._user = None
        words = rest.split()
        if not words:
            mechanisms = ["PLAIN"] if self._plaintextAllowed() else []
            self._replyMultiline("+OK Supported mechanisms follow.", mechanisms)
            return
        if len(words) > 2:
            raise _BadArguments()
        if words[0].upper() != "PLAIN":
            self._clientError(ERR_SASL_MECHANISM)
            return
        if not self._plaintextAllowed():
            self._refusePlaintext(_plainAuthcid(words[1].encode("ascii", "replace")) if len(words) == 2 else None)
            return
        if len(words) == 1:
            self._saslPending = True
            if not self._disconnected:
                self.sendReply(b"+ \r\n")
            return
        self._saslPlain(words[1].encode("ascii", "replace"))

    def _refusePlaintext(self, user: Optional[str]) -> None:
        """
        Refuse a plaintext login the policy disallows here, and log it as
        refused (not as a failed login, which fail2ban would count).

        @param user: the login name the client gave, if known.
        """
        events.loginRefused(self.log, "pop3", user, self.peer, events.PLAINTEXT_DISALLOWED)
        self._clientError(ERR_PLAINTEXT)

    def _saslResponse(self, raw: bytes) -> None:
        """
        The client's line after our C{+ } continuation.
        """
        if raw.strip() == b"*":
            self._clientError(ERR_SASL_CANCELLED)
            return
        self._saslPlain(raw.strip(), continuation=True)

    def _saslPlain(self, encoded: bytes, continuation: bool = False) -> None:
        """
        Decode and check a PLAIN response (RFC 4616) and log in with it.
        """
        try:
            response = parsePlain(decodeResponse(encoded, emptyMarker=not continuation))
        except BadBase64:
            self._clientError(ERR_SASL_BASE64)
            return
        except MalformedPlain:
            self._authFailed(None, "malformed SASL PLAIN response")
            return
        password = response.password
        try:
            user = response.authcid.decode("utf-8")
            authz = response.authzid.decode("utf-8")
        except UnicodeDecodeError:
            self._authFailed(None, "malformed SASL PLAIN response")
            return
        if not user or not password:
            self._authFailed(user or None, "malformed SASL PLAIN response")
            return
        if authz and authz != user:
            self._authFailed(user, "authorization identity differs")
            return
        self._login(user, password)

    def do_STLS(self, rest: str) -> None:
        _noArguments(rest)
        if self.secure:
            self._clientError(ERR_TLS_ACTIVE)
            return
        if not self._stlsOffered():
            self._clientError(ERR_TLS_UNAVAILABLE)
            return
        if self._user is not None:
            self._clientError(ERR_TLS_AFTER_USER)
            return
        self._reply("+OK Begin TLS negotiation")
        if not self.startTLS(self.factory.tlsContextFactory):
            return
        self._user = None
        self._saslPending = False
        self.state = _AUTHORIZATION

    def _login(self, user: str, password: bytes) -> None:
        """
        Check the credentials with the portal, then open the maildrop.
        Further input waits until this is over.
        """
        creds = ClientCredentials(user.encode("utf-8"), password, self.peer, "pop3")
        d = defer.maybeDeferred(self.factory.portal.login, creds, None, IPOP3Avatar)
        d.addCallbacks(self._cbLoggedIn, self._ebLogin, callbackArgs=(user,), errbackArgs=(user,))
        self.hold(d)

    def _ebLogin(self, reason: Failure, user: str) -> None:
        """
        Answer and log a login that did not succeed, as L{pop3gw.sasl.LOGIN_ERRORS}
        says; a client that hung up gets no answer but the same log line.
        """
        kind = logLoginFailure(self.log, "pop3", user, self.peer, reason)
        if kind is LoginOutcome.FAILED:
            if self.ended():
                events.loginFailed(self.log, "pop3", user, self.peer)
            else:
                self._authFailed(user)
        elif not self.ended():
            self._reply(LOGIN_REPLIES[kind])

    def _warnUnavailable(self, what: str, reason: Failure) -> None:
        """
        Log an expected server-side refusal (C{what}, a fixed phrase) with
        its operator-facing text; the client gets only a fixed reply.
        """
        self.log.warn("{what}: rhost={peer} error={error}", what=what, peer=self.peer, error=str(reason.value))

    def _authFailed(self, user: Optional[str], reason: str = "bad credentials") -> None:
        """
        Count and log a failed attempt; close after L{MAX_AUTH_FAILURES}.
        """
        self._authFailures += 1
        events.loginFailed(self.log, "pop3", user, self.peer, reason)
        if self._authFailures >= MAX_AUTH_FAILURES:
            self._close(ERR_TOO_MANY_AUTH)
        else:
            self._reply(ERR_AUTH_FAILED)

    def _cbLoggedIn(self, result, user: str):
        interface, avatar, logout = result
        self._logout = logout
        if self.ended():
            self._callLogout()
            return None
        self._avatar = avatar
        d = defer.maybeDeferred(avatar.openMaildrop)
        d.addCallbacks(self._cbMaildrop, self._ebMaildrop)
        d.addErrback(self.commandFailed)
        return d

    def _ebMaildrop(self, reason: Failure) -> None:
        user = self._avatarName()
        self._avatar = None
        self._callLogout()
        if self.ended():
            return
        if reason.check(MaildropLocked):
            self.log.info(
                "maildrop in use: service=pop3 rhost={peer} user={user}",
                peer=self.peer,
                user=events.sanitize(user),
            )
            self._reply(ERR_IN_USE)
        elif reason.check(TemporaryFailure):
            self._warnUnavailable("maildrop unavailable", reason)
            self._reply(ERR_MAILDROP_TEMP)
        elif reason.check(PermanentFailure):
            self._warnUnavailable("maildrop refused", reason)
            self._reply(ERR_MAILDROP_PERM)
        else:
            self.log.failure("opening maildrop failed", reason)
            self._reply(ERR_MAILDROP_TEMP)

    def _cbMaildrop(self, maildrop) -> None:
        if self.ended():
            try:
                maildrop.release()
            except Exception:
                self.log.failure("releasing maildrop failed")
            self._avatar = None
            self._callLogout()
            return
        self._beginTransaction(maildrop)
        self._reply("+OK Logged in.")
        events.loginSucceeded(self.log, "pop3", self._avatarName(), self.peer, self.secure)
