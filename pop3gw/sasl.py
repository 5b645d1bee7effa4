# -*- test-case-name: tests.test_sasl -*-
"""
SASL PLAIN (RFC 4616) and LOGIN response decoding, shared by POP3 AUTH
(RFC 5034) and SMTP AUTH (RFC 4954).

Only the decoding lives here; each protocol keeps its own replies, its own
failure counting and its own rules on what an empty response or an
authorization identity means for it.
"""

from __future__ import annotations

import base64
import binascii
from typing import Optional

import attr


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
    PLAIN's authentication identity or LOGIN's user name; L{None} if there
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
