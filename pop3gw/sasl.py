# -*- test-case-name: tests.test_sasl -*-
"""
What POP3 and submission logins share: SASL PLAIN (RFC 4616) and LOGIN
response decoding (POP3 AUTH, RFC 5034; SMTP AUTH, RFC 4954), and how a
login that did not succeed is classified (L{classifyLoginFailure}).

Each protocol keeps its own replies (one per L{LoginOutcome}), its own
failure counting and its own rules on what an empty response or an
authorization identity means for it.
"""

from __future__ import annotations

import base64
import binascii
import enum
from typing import Optional

import attr
from twisted.cred.error import LoginFailed
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3gw import events
from pop3gw.interfaces import AuthenticationBusy, TemporaryFailure


class SASLError(Exception):
    """
    A client's SASL response cannot be used (client mistake).
    """


class BadBase64(SASLError):
    """
    A response is not strict base64.
    """


class MalformedPlain(SASLError):
    """
    A decoded PLAIN response is not C{authzid NUL authcid NUL password}.
    """


@attr.s(frozen=True, slots=True, auto_attribs=True, repr=False)
class PlainResponse:
    """
    A decoded PLAIN response.  The C{repr} leaves out the password.

    @ivar authzid: the authorization identity (often empty).
    @ivar authcid: the authentication identity: the login name.
    @ivar password: the password.
    """

    authzid: bytes
    authcid: bytes
    password: bytes

    def __repr__(self) -> str:
        return f"PlainResponse(authzid={self.authzid!r}, authcid={self.authcid!r})"


def decodeResponse(encoded: bytes, emptyMarker: bool = True) -> bytes:
    """
    Decode one base64 SASL response.

    @param emptyMarker: whether C{"="} stands for the empty response (an
        initial response on the command line, RFC 4954 section 4 and RFC
        5034 section 4).
    @raise BadBase64: C{encoded} is not strict base64.
    """
    if emptyMarker and encoded == b"=":
        return b""
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadBase64() from None


def parsePlain(decoded: bytes) -> PlainResponse:
    """
    Split a decoded PLAIN response into its three parts.

    @raise MalformedPlain: not exactly three NUL-separated parts.
    """
    parts = decoded.split(b"\x00")
    if len(parts) != 3:
        raise MalformedPlain()
    return PlainResponse(*parts)


def loggedUser(mechanism: str, encoded: Optional[bytes]) -> Optional[bytes]:
    """
    The login name in a PLAIN or LOGIN initial response, for a log line:
    PLAIN's authentication identity or LOGIN's user name; C{None} if there
    is none or it does not decode.  Never the password.
    """
    if encoded is None:
        return None
    try:
        response = decodeResponse(encoded)
    except BadBase64:
        return None
    if mechanism == "LOGIN":
        return response or None
    try:
        return parsePlain(response).authcid or None
    except MalformedPlain:
        return None


class LoginOutcome(enum.Enum):
    """
    How a login that did not succeed is answered and logged, the same way
    by every protocol.
    """

    #: A failed login: the line fail2ban matches, counted towards the
    #: protocol's per-connection limit.
    FAILED = "failed"
    #: A check refused before it started (the client's share of password
    #: checks is used up): the temporary reply and no line per attempt, the
    #: checker logs such refusals sparingly.
    BUSY = "busy"
    #: A check that could not be made: the temporary reply and one warn
    #: line with the server's reason.
    UNAVAILABLE = "unavailable"
    #: A bug: the temporary reply and the traceback.
    FAULT = "fault"


#: The exceptions the checker or the portal can raise, first match wins;
#: anything else is L{LoginOutcome.FAULT}.
LOGIN_ERRORS = (
    ((LoginFailed,), LoginOutcome.FAILED),
    ((AuthenticationBusy,), LoginOutcome.BUSY),
    ((TemporaryFailure,), LoginOutcome.UNAVAILABLE),
)


def classifyLoginFailure(reason: Failure) -> LoginOutcome:
    """
    @return: what the failure of a portal login means, as L{LOGIN_ERRORS}
        says.
    """
    for errors, outcome in LOGIN_ERRORS:
        if reason.check(*errors):
            return outcome
    return LoginOutcome.FAULT


def logLoginFailure(
    log: Logger, service: str, user: "str | bytes | None", peer: str, reason: Failure
) -> LoginOutcome:
    """
    Classify a login that did not succeed and log what every protocol logs
    alike: one C{authentication unavailable} line for
    L{LoginOutcome.UNAVAILABLE}, the traceback for L{LoginOutcome.FAULT}.
    The caller logs and counts a L{LoginOutcome.FAILED} login itself;
    L{LoginOutcome.BUSY} gets no line.

    @param user: the login name the client gave (C{str} or C{bytes}).
    @return: the outcome.
    """
    outcome = classifyLoginFailure(reason)
    if outcome is LoginOutcome.UNAVAILABLE:
        events.loginUnavailable(log, service, user, peer, str(reason.value))
    elif outcome is LoginOutcome.FAULT:
        log.failure("{service} login failed unexpectedly", reason, service=service)
    return outcome
