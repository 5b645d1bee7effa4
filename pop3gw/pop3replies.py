# -*- test-case-name: tests.test_pop3 -*-
"""
What a POP3 session says and accepts: its limits, its fixed replies (none
ever holds text from an exception), its states and the parsing of command
arguments, whose errors the server maps to fixed replies.
"""

from __future__ import annotations

import re

from pop3gw.sasl import LoginOutcome

#: Longest command line accepted, terminator included (RFC 2449 section 4).
MAX_LINE_LENGTH = 255

#: Longest SASL client response line accepted (RFC 5034 lifts the command
#: limit for continuation lines; PLAIN with a long address and password
#: needs more than 255 octets once base64-encoded).
MAX_SASL_LINE_LENGTH = 2048

#: Octets of input kept while a command is in progress before the server
#: stops reading from the client (pipelining back-pressure).
MAX_PENDING_INPUT = 65536

#: Seconds a closed connection may take to send its last reply before it is
#: aborted (a client that does not read would otherwise keep it for ever).
CLOSE_TIMEOUT = 10.0

#: Consecutive erroneous commands before the connection is closed.
MAX_BAD_COMMANDS = 20

#: Failed authentication attempts per connection before it is closed.
MAX_AUTH_FAILURES = 3

#: Default seconds of client silence before the connection is closed
#: (RFC 1939 asks for at least 10 minutes).
IDLE_TIMEOUT = 600

#: A message number or line count argument: 1 to 10 decimal digits.
_NUMBER = re.compile(r"^[0-9]{1,10}$")

# Fixed replies.  Nothing here ever contains text from an exception.
GREETING = "+OK {implementation} ready."
GOODBYE = "+OK {hostname} signing off."
ERR_UNKNOWN = "-ERR Unknown command."
ERR_WRONG_STATE = "-ERR Command not valid in this state."
ERR_SYNTAX = "-ERR Invalid arguments."
ERR_EMPTY = "-ERR Empty command."
ERR_NUL = "-ERR Invalid characters in command."
ERR_UTF8 = "-ERR Command is not valid UTF-8."
ERR_LINE_TOO_LONG = "-ERR Line too long."
ERR_TOO_MANY_ERRORS = "-ERR Too many errors, closing connection."
ERR_IDLE = "-ERR Idle timeout, closing connection."
ERR_LOGIN_TIMEOUT = "-ERR Login time exceeded, closing connection."
ERR_INTERNAL = "-ERR [SYS/TEMP] Internal error."
ERR_NO_SUCH_MESSAGE = "-ERR No such message."
ERR_DELETED = "-ERR Message already deleted."
ERR_MESSAGE_UNAVAILABLE = "-ERR [SYS/TEMP] Message temporarily unavailable."
ERR_AUTH_FAILED = "-ERR [AUTH] Authentication failed."
ERR_PLAINTEXT = "-ERR [AUTH] Plaintext authentication disallowed on non-encrypted connections."
ERR_TOO_MANY_AUTH = "-ERR [AUTH] Too many authentication failures, closing connection."
ERR_AUTH_TEMP = "-ERR [SYS/TEMP] Authentication temporarily unavailable."
ERR_IN_USE = "-ERR [IN-USE] Mailbox is locked by another session."
ERR_MAILDROP_TEMP = "-ERR [SYS/TEMP] Mailbox temporarily unavailable."
ERR_MAILDROP_PERM = "-ERR [SYS/PERM] Mailbox unavailable."
ERR_USER_FIRST = "-ERR Send USER first."
ERR_SASL_CANCELLED = "-ERR Authentication cancelled."
ERR_SASL_BASE64 = "-ERR Invalid base64 data."
ERR_SASL_MECHANISM = "-ERR Unsupported authentication mechanism."
ERR_TLS_UNAVAILABLE = "-ERR TLS not available."
ERR_TLS_ACTIVE = "-ERR Already using TLS."
ERR_TLS_AFTER_USER = "-ERR STLS not allowed after USER."
ERR_COMMIT = "-ERR [SYS/TEMP] Some deleted messages not removed."

#: The reply to a login that did not succeed, per L{LoginOutcome}.
LOGIN_REPLIES = {
    LoginOutcome.FAILED: ERR_AUTH_FAILED,
    LoginOutcome.BUSY: ERR_AUTH_TEMP,
    LoginOutcome.UNAVAILABLE: ERR_AUTH_TEMP,
    LoginOutcome.FAULT: ERR_AUTH_TEMP,
}

_AUTHORIZATION = "AUTHORIZATION"
_TRANSACTION = "TRANSACTION"
_UPDATE = "UPDATE"


class _BadArguments(Exception):
    """
    A command's arguments are missing, extra or malformed (client mistake).
    """


class _NoSuchMessage(Exception):
    """
    A message number is out of range.
    """


class _MessageDeleted(Exception):
    """
    A message number names a message marked as deleted.
    """


def _noArguments(rest: str) -> None:
    """
    @raise _BadArguments: if C{rest} holds any argument.
    """
    if rest.split():
        raise _BadArguments()


def _numbers(rest: str, minimum: int, maximum: int) -> list[int]:
    """
    Parse between C{minimum} and C{maximum} decimal arguments.

    @raise _BadArguments: wrong count or not plain decimal numbers.
    """
    words = rest.split()
    if not minimum <= len(words) <= maximum:
        raise _BadArguments()
    if not all(_NUMBER.match(w) for w in words):
        raise _BadArguments()
    return [int(w) for w in words]
