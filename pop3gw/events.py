# -*- test-case-name: tests.test_events -*-
"""
The log lines operators and fail2ban read.

Every listener logs logins, failed logins, logins refused by policy and
logouts through these functions, so there is one format to match.  The
fail2ban filter in C{etc/fail2ban/filter.d/pop3gw.conf} matches
L{loginFailed}'s line (and not L{loginRefused}'s)::

    authentication failed: service=pop3 rhost=192.0.2.7 user="alice@example.org"

Text that came from the network (user names) is quoted and escaped, so it can
never forge a second log line or a C{rhost=} field.  Passwords are never
passed here.
"""

from __future__ import annotations

from twisted.logger import Logger

MAX_LOGGED_USER = 100
#: Longest remote text (an SMTP reply) logged by the relay.
MAX_LOGGED_REPLY = 300


def sanitize(text: str | bytes | None, limit: int = MAX_LOGGED_USER) -> str:
    """
    C{text} as a double-quoted, printable string of at most C{limit}
    characters (before escaping) for a log line: non-printable characters,
    quotes and backslashes are escaped.
    """
    if text is None:
        return '""'
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text[:limit]
    if text.isprintable() and '"' not in text and "\\" not in text:
        # The common case (a plain user name): nothing to escape.
        return '"' + text + '"'
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            out.append("\\x%02x" % ord(c) if ord(c) < 256 else "\\u%04x" % ord(c))
    return '"' + "".join(out) + '"'


def literal(text: str) -> str:
    """
    C{text} as a log format that formats as itself (its braces doubled).

    The lines logged for every session and message are built here with
    f-strings and emitted as such a format, their values kept as the
    event's fields too (for the metrics and any other observer): Twisted
    then formats the line without parsing a field from it, which costs
    about a third of an event's time.
    """
    if "{" in text or "}" in text:
        return text.replace("{", "{{").replace("}", "}}")
    return text


def loginSucceeded(log: Logger, service: str, user: str, peer: str, tls: bool) -> None:
    """
    Log a successful login.
    """
    quoted, secure = sanitize(user), "yes" if tls else "no"
    log.info(
        literal(f"login: service={service} rhost={peer} user={quoted} tls={secure}"),
        service=service,
        peer=peer,
        user=quoted,
        tls=secure,
    )


def loginFailed(log: Logger, service: str, user: str | bytes | None, peer: str, reason: str = "bad credentials") -> None:
    """
    Log a failed login in the fixed format fail2ban matches.

    @param reason: a fixed phrase chosen by the server (never client text).
    """
    log.warn(
        "authentication failed: service={service} rhost={peer} user={user} reason={reason}",
        service=service,
        peer=peer,
        user=sanitize(user),
        reason=sanitize(reason),
    )


#: The reason L{loginRefused} gives when the plaintext-auth policy refuses a
#: login on a connection without TLS.
PLAINTEXT_DISALLOWED = "plaintext authentication disallowed"


def loginRefused(log: Logger, service: str, user: str | bytes | None, peer: str, reason: str) -> None:
    """
    Log a login the server refused to attempt (the plaintext-auth policy),
    as one warn line that the fail2ban filter does not match: a client not
    configured for TLS is not guessing passwords, but the operator should
    know that it may have sent a password in clear::

        login refused: service=pop3 rhost=192.0.2.7 user="alice@example.org" reason="plaintext authentication disallowed"

    @param user: the login name the client gave, if any; never a password.
    @param reason: a fixed phrase chosen by the server (never client text),
        e.g. L{PLAINTEXT_DISALLOWED}.
    """
    log.warn(
        "login refused: service={service} rhost={peer} user={user} reason={reason}",
        service=service,
        peer=peer,
        user=sanitize(user),
        reason=sanitize(reason),
    )


def loginUnavailable(log: Logger, service: str, user: str | bytes | None, peer: str, error: str) -> None:
    """
    Log a login that could not be checked for a server-side reason (users
    database unreadable): one warn line, not matched by the fail2ban
    filter, since the client did nothing wrong::

        authentication unavailable: service=pop3 rhost=192.0.2.7 user="alice@example.org" error="users file unreadable"

    @param error: the server's own text for the operator (never shown to
        the client).
    """
    log.warn(
        "authentication unavailable: service={service} rhost={peer} user={user} error={error}",
        service=service,
        peer=peer,
        user=sanitize(user),
        error=sanitize(error, MAX_LOGGED_REPLY),
    )


def loggedOut(log: Logger, service: str, user: str, peer: str, **stats: int) -> None:
    """
    Log the end of an authenticated session with its counters, e.g.
    C{retrieved=3 top=0 deleted=2 bytes=10240}, in name order.
    """
    fields = " ".join(f"{k}={int(v)}" for k, v in sorted(stats.items()))
    quoted = sanitize(user)
    log.info(
        literal(f"logout: service={service} rhost={peer} user={quoted} {fields}"),
        service=service,
        peer=peer,
        user=quoted,
        fields=fields,
    )


def recipientRefused(log: Logger, service: str, peer: str, sender: str, recipient: str, reply: str, reason: str) -> None:
    """
    Log a recipient refused by a listener that takes mail from the world
    (the MX listener): one info line, not matched by the fail2ban filter,
    since naming a wrong address is not guessing a password::

        mx: refused recipient rhost=192.0.2.7 from="a@b.example" to="x@remote.example" reply="550 5.7.1 Relay access denied" reason="relay denied"

    @param sender: the envelope sender (C{""} for the null reverse path).
    @param recipient: the forward path as the client gave it.
    @param reply: the reply sent.
    @param reason: a fixed phrase chosen by the server (never client text).
    """
    log.info(
        "{service}: refused recipient rhost={peer} from={sender} to={recipient} reply={reply} reason={reason}",
        service=service,
        peer=peer,
        sender=sanitize(sender),
        recipient=sanitize(recipient),
        reply=sanitize(reply),
        reason=sanitize(reason),
    )
