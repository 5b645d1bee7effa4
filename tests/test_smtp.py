"""
Tests for L{pop3gw.smtp}: the SMTP submission server, over
L{StringTransport} with a L{task.Clock} and the fakes of L{pop3gw.testing}.
"""

from __future__ import annotations

import base64
import os
import re

import hypothesis
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pop3gw import smtp
from pop3gw.address import Address
from pop3gw.credentials import ClientCredentials
from pop3gw.interfaces import (
    AuthenticationBusy,
    IDelivery,
    InsufficientStorage,
    ISubmissionAvatar,
    TemporaryFailure,
)
from pop3gw.testing import (
    FakeDelivery,
    FakeRouter,
    FakeSubmissionAvatar,
    FakeUserDatabase,
)

HOST = "mail.example.org"
ALICE = Address.parse("alice@example.org")
ALIAS = Address.parse("postmaster@example.org")
BOB = Address.parse("bob@example.org")
REMOTE = Address.parse("carol@remote.example")
NOW = 1700000000.0  # Tue, 14 Nov 2023 22:13:20 +0000
NOW_TEXT = b"Tue, 14 Nov 2023 22:13:20 +0000"

GREETING = b"220 mail.example.org ESMTP ready\r\n"
EHLO_PLAIN = (
    b"250-mail.example.org\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 41943040\r\n"
    b"250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-CHUNKING\r\n"
    b"250-SMTPUTF8\r\n"
    b"250 AUTH PLAIN LOGIN\r\n"
)
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
HEADERS = b"From: alice@example.org\r\nTo: bob@example.org\r\nMessage-ID: <1@x>\r\nDate: " + NOW_TEXT + b"\r\n"


def plain(authzid: bytes, authcid: bytes, password: bytes) -> bytes:
    """
    A base64 SASL PLAIN response.
    """
    return base64.b64encode(authzid + b"\x00" + authcid + b"\x00" + password)


ALICE_PLAIN = plain(b"", b"alice@example.org", b"secret")


def serverPEM() -> bytes:
    """
    The test certificate and key shipped with Twisted.
    """
    import twisted.test

    with open(os.path.join(os.path.dirname(twisted.test.__file__), "server.pem"), "rb") as f:
        return f.read()


class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that records C{startTLS} calls.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tlsStarted: list = []

    def startTLS(self, contextFactory) -> None:
        self.tlsStarted.append(contextFactory)


@implementer(ISSLTransport)
class SecureStringTransport(StringTransport):
    """
    A L{StringTransport} that looks like an implicit-TLS connection.
    """

    def getPeerCertificate(self):
        return None


class RecordingRealm:
    """
    Hands out L{FakeSubmissionAvatar}s and records logouts.
    """

    def __init__(self, router: FakeRouter) -> None:
        self.router = router
        self.logouts: list = []
        self.avatars: list = []

    def requestAvatar(self, avatarId, mind, *interfaces):
        assert ISubmissionAvatar in interfaces
        avatar = FakeSubmissionAvatar(Address.parse(avatarId), self.router)
        self.avatars.append(avatar)
        return ISubmissionAvatar, avatar, lambda: self.logouts.append(avatar.address)


class CountingChecker(InMemoryUsernamePasswordDatabaseDontUse):
    """
    An in-memory checker that counts requests.
    """

    def __init__(self, **users) -> None:
        super().__init__(**users)
        self.requests = 0

    def requestAvatarId(self, credentials):
        self.requests += 1
        return super().requestAvatarId(credentials)


class Collector(Protocol):
    """
    A client protocol that collects what it receives.
    """

    received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class SessionMixin:
    """
    Builds a submission server over a L{StringTransport}.
    """

    transportFactory = StringTransport

    def setUp(self) -> None:
        self.users = FakeUserDatabase(
            {ALICE: "x", BOB: "x"},
            aliases={ALIAS: ALICE},
        )
        self.router = FakeRouter(domains=("example.org",), users=self.users)
        self.store = self.router.store
        self.queue = self.router.queue
        self.realm = RecordingRealm(self.router)
        self.checker = CountingChecker()
        self.checker.addUser(b"alice@example.org", b"secret")
        self.checker.addUser(b"bob@example.org", b"hunter2")
        self.portal = Portal(self.realm, [self.checker])
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.policyCalls: list = []
        self.plaintext = True

    def policy(self, secure: bool, peer: str) -> bool:
        self.policyCalls.append((secure, peer))
        return self.plaintext

    def connect(self, transport=None, **kwargs):
        """
        Build a factory with C{kwargs} and connect a protocol to a new
        transport; the greeting is cleared from the transport.
        """
        self.factory = smtp.SubmissionFactory(self.portal, self.policy, self.clock, HOST, **kwargs)
        self.proto = self.factory.buildProtocol(None)
        self.transport = transport if transport is not None else self.transportFactory()
        self.proto.makeConnection(self.transport)
        self.assertEqual(self.transport.value(), GREETING)
        self.transport.clear()
        return self.proto

    def feed(self, data: bytes) -> bytes:
        """
        Send C{data} in one segment and return (and clear) the output.
        """
        self.proto.dataReceived(data)
        out = self.transport.value()
        self.transport.clear()
        return out

    def login(self) -> None:
        """
        EHLO and AUTH PLAIN as alice.
        """
        if getattr(self, "proto", None) is None:
            self.connect()
        self.assertEqual(
            self.feed(b"EHLO client.example\r\nAUTH PLAIN " + ALICE_PLAIN + b"\r\n"),
            EHLO_PLAIN + AUTH_OK,
        )

    def envelope(self, rcpts=(b"bob@example.org",)) -> None:
        """
        MAIL FROM alice and RCPT TO C{rcpts}, then DATA.
        """
        expected = b"250 2.1.0 OK\r\n" + b"250 2.1.5 OK\r\n" * len(rcpts) + b"354 End data with <CR><LF>.<CR><LF>\r\n"
        cmds = b"MAIL FROM:<alice@example.org>\r\n"
        for r in rcpts:
            cmds += b"RCPT TO:<" + r + b">\r\n"
        self.assertEqual(self.feed(cmds + b"DATA\r\n"), expected)

    def stored(self, address=BOB) -> list:
        """
        The messages stored for C{address}, without their first line (the
        C{Received:} trace field, checked separately).
        """
        out = []
        for _uid, data in self.store.boxes.get(address, []):
            first, rest = data.split(b"\r\n", 1)
            self.assertTrue(first.startswith(b"Received: "), first)
            out.append(rest)
        return out


def withoutReceived(data: bytes) -> bytes:
    """
    What a delivery was given after the C{Received:} field, which the
    server writes first (one line).
    """
    first, rest = data.split(b"\r\n", 1)
    assert first.startswith(b"Received: "), first
    return rest


def queuedReply(out: bytes) -> bytes:
    """
    C{out} with the queue identifier in C{250 2.0.0 OK queued as} replaced
    by C{ID}.
    """
    return re.sub(rb"queued as [0-9A-F]{16}\r\n", b"queued as ID\r\n", out)


class GreetingAndEHLOTests(SessionMixin, SynchronousTestCase):
    """
    Greeting, EHLO and HELO.
    """

    def test_ehloPlaintextAllowed(self) -> None:
        """
        EHLO lists the extensions in a fixed order, with AUTH when the
        policy allows plaintext mechanisms and no STARTTLS without a
        context factory.
        """
        self.connect()
        self.assertEqual(self.feed(b"EHLO client.example\r\n"), EHLO_PLAIN)
        self.assertEqual(self.policyCalls, [(False, "192.168.1.1")])

    def test_ehloTLSOfferedPlaintextRefused(self) -> None:
        """
        With a context factory and a policy refusing plaintext, EHLO offers
        STARTTLS and no AUTH; the SIZE value is the configured limit.
        """
        self.plaintext = False
        self.connect(tlsContextFactory=object(), maxMessageSize=1000)
        self.assertEqual(
            self.feed(b"EHLO client.example\r\n"),
            b"250-mail.example.org\r\n"
            b"250-PIPELINING\r\n"
            b"250-SIZE 1000\r\n"
            b"250-8BITMIME\r\n"
            b"250-ENHANCEDSTATUSCODES\r\n"
            b"250-CHUNKING\r\n"
            b"250-SMTPUTF8\r\n"
            b"250 STARTTLS\r\n",
        )

    def test_ehloPerConnection(self) -> None:
        """
        Connections of one factory each get the EHLO reply of their own
        state: AUTH is offered to the one the policy allows plaintext
        mechanisms on, and not to the one it refuses them on, in whichever
        order they send EHLO; a host name or SIZE changed on the factory
        shows in the next connection's greeting and EHLO.
        """
        self.connect()
        allowed = self.proto
        refused = self.factory.buildProtocol(None)
        refusedTransport = StringTransport()
        refused.makeConnection(refusedTransport)
        self.assertEqual(self.feed(b"EHLO client.example\r\n"), EHLO_PLAIN)
        self.plaintext = False
        refused.dataReceived(b"EHLO client.example\r\n")
        self.assertEqual(refusedTransport.value(), GREETING + EHLO_PLAIN.replace(b"250-SMTPUTF8\r\n250 AUTH PLAIN LOGIN\r\n", b"250 SMTPUTF8\r\n"))
        self.plaintext = True
        allowed.dataReceived(b"EHLO client.example\r\n")
        self.assertEqual(self.transport.value(), EHLO_PLAIN)
        self.factory.hostname = "other.example.org"
        self.factory.maxMessageSize = 1000
        later = self.factory.buildProtocol(None)
        laterTransport = StringTransport()
        later.makeConnection(laterTransport)
        later.dataReceived(b"EHLO client.example\r\n")
        self.assertEqual(
            laterTransport.value(),
            GREETING.replace(b"mail.example.org", b"other.example.org")
            + EHLO_PLAIN.replace(b"mail.example.org", b"other.example.org").replace(b"SIZE 41943040", b"SIZE 1000"),
        )

    def test_implicitTLS(self) -> None:
        """
        On a transport providing L{ISSLTransport} the session is secure from
        the start: the policy is asked with C{secure=True}, STARTTLS is not
        offered and refused with 454.
        """
        self.connect(transport=SecureStringTransport(), tlsContextFactory=object())
        self.assertEqual(self.feed(b"EHLO client.example\r\n"), EHLO_PLAIN)
        self.assertEqual(self.policyCalls, [(True, "192.168.1.1")])
        self.assertEqual(self.feed(b"STARTTLS\r\n"), b"454 4.7.0 TLS already active\r\n")

    def test_ehloHeloNeedArgument(self) -> None:
        """
        EHLO and HELO without an argument get 501 5.5.4.
        """
        self.connect()
        self.assertEqual(
            self.feed(b"EHLO\r\nHELO \r\n"),
            b"501 5.5.4 Syntax: EHLO hostname\r\n501 5.5.4 Syntax: HELO hostname\r\n",
        )

    def test_helo(self) -> None:
        """
        HELO answers with the host name only, and AUTH then needs EHLO.
        """
        self.connect()
        self.assertEqual(
            self.feed(b"HELO client.example\r\nAUTH PLAIN " + ALICE_PLAIN + b"\r\n"),
            b"250 mail.example.org\r\n503 5.5.1 Error: send EHLO first\r\n",
        )

    def test_lowerCaseCommands(self) -> None:
        """
        Command verbs are case-insensitive.
        """
        self.connect()
        self.assertEqual(self.feed(b"ehlo client.example\r\nnoop\r\n"), EHLO_PLAIN + b"250 2.0.0 OK\r\n")

    def test_miscCommands(self) -> None:
        """
        NOOP, VRFY (252 2.5.2, never revealing users), HELP and QUIT.
        """
        self.connect()
        self.assertEqual(
            self.feed(b"NOOP\r\nVRFY bob\r\nHELP\r\nQUIT\r\nNOOP\r\n"),
            b"250 2.0.0 OK\r\n"
            b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"
            b"214 2.0.0 Submission server, see RFC 6409\r\n"
            b"221 2.0.0 Bye\r\n",
        )
        self.assertTrue(self.transport.disconnecting)

    def test_mailBeforeEhlo(self) -> None:
        """
        MAIL before HELO/EHLO is a bad sequence.
        """
        self.connect()
        self.assertEqual(
            self.feed(b"MAIL FROM:<alice@example.org>\r\n"),
            b"503 5.5.1 Error: send HELO/EHLO first\r\n",
        )


class CommandSyntaxTests(SessionMixin, SynchronousTestCase):
    """
    Command line parsing and error limits.
    """

    def test_unknownCommand(self) -> None:
        """
        An unknown verb gets 500 5.5.2; BDAT is known, and before EHLO it
        is out of sequence (its chunk read and discarded).
        """
        self.connect()
        self.assertEqual(
            self.feed(b"FROB\r\nBDAT 6 LAST\r\nNOOP\r\nNOOP\r\n"),
            b"500 5.5.2 Error: command not recognized\r\n"
            b"503 5.5.1 Error: send HELO/EHLO first\r\n"
            b"250 2.0.0 OK\r\n",
        )

    def test_badCharacters(self) -> None:
        """
        NUL, other controls and invalid UTF-8 in a command get 500 5.5.2.
        """
        self.connect()
        self.assertEqual(
            self.feed(b"NOOP\x00\r\nNO\xffOP\r\nNOOP \x01\r\n"),
            b"500 5.5.2 Error: bad character in command\r\n" * 3,
        )

    def test_lineTooLong(self) -> None:
        """
        A 600-octet command line gets 500 5.5.6 and the session goes on.
        """
        self.connect()
        self.assertEqual(
            self.feed(b"NOOP " + b"x" * 593 + b"\r\nNOOP\r\n"),
            b"500 5.5.6 Line too long\r\n250 2.0.0 OK\r\n",
        )

    def test_lineAtLimit(self) -> None:
        """
        A command line of exactly 512 octets with CRLF is accepted.
        """
        self.connect()
        self.assertEqual(self.feed(b"NOOP " + b"x" * 505 + b"\r\n"), b"250 2.0.0 OK\r\n")
        self.assertEqual(self.feed(b"NOOP " + b"x" * 506 + b"\r\n"), b"500 5.5.6 Line too long\r\n")

    def test_endlessLine(self) -> None:
        """
        A line with no end is not held without bound: once it passes the
        AUTH line limit it is dropped, and its end gets 500 5.5.6.
        """
        self.connect()
        for _i in range(20):
            self.assertEqual(self.feed(b"x" * 4096), b"")
        self.assertLessEqual(len(self.proto._buffer), smtp.MAX_AUTH_LINE + 4096)
        self.assertEqual(self.feed(b"\r\nNOOP\r\n"), b"500 5.5.6 Line too long\r\n250 2.0.0 OK\r\n")

    def test_bareLFCommands(self) -> None:
        """
        Command lines may end with a bare LF.
        """
        self.connect()
        self.assertEqual(self.feed(b"NOOP\nNOOP\r\n"), b"250 2.0.0 OK\r\n" * 2)

    def test_commandSplitAcrossSegments(self) -> None:
        """
        A command whose CR and LF arrive in different segments is one line.
        """
        self.connect()
        self.assertEqual(self.feed(b"NO"), b"")
        self.assertEqual(self.feed(b"OP\r"), b"")
        self.assertEqual(self.feed(b"\n"), b"250 2.0.0 OK\r\n")

    def test_tooManyErrors(self) -> None:
        """
        After 20 5xx replies the server says 421 4.7.0 and closes; later
        input is ignored.
        """
        self.connect()
        out = self.feed(b"FROB\r\n" * 25)
        self.assertEqual(
            out,
            b"500 5.5.2 Error: command not recognized\r\n" * 20
            + b"421 4.7.0 mail.example.org Error: too many errors\r\n",
        )
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.feed(b"NOOP\r\n"), b"")

    def test_idleTimeout(self) -> None:
        """
        After the idle timeout without input the server says 421 4.4.2 and
        closes; input resets the timer.
        """
        self.connect(idleTimeout=300)
        self.clock.advance(299)
        self.assertEqual(self.feed(b"NOOP\r\n"), b"250 2.0.0 OK\r\n")
        self.clock.advance(299)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(
            self.transport.value(),
            b"421 4.4.2 mail.example.org Error: timeout exceeded\r\n",
        )
        self.assertTrue(self.transport.disconnecting)

    def test_loginTimeout(self) -> None:
        """
        A client that has not logged in C{loginTimeout} seconds after
        connecting gets C{421 4.4.2} and is closed, however busy it keeps
        the session meanwhile.
        """
        self.connect(loginTimeout=180)
        for _ in range(17):
            self.clock.advance(10)
            self.assertEqual(self.feed(b"NOOP\r\n"), b"250 2.0.0 OK\r\n")
        self.clock.advance(9)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(self.transport.value(), b"421 4.4.2 mail.example.org Error: login time exceeded\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_loginTimeoutEndsAtLogin(self) -> None:
        """
        Once logged in, the login deadline no longer applies.
        """
        self.connect(loginTimeout=180)
        self.login()
        for _ in range(30):
            self.clock.advance(10)
            self.assertEqual(self.feed(b"NOOP\r\n"), b"250 2.0.0 OK\r\n")
        self.assertFalse(self.transport.disconnecting)

    def test_timeoutCancelledOnLoss(self) -> None:
        """
        Losing the connection cancels the idle timer.
        """
        self.connect()
        self.proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class AuthTests(SessionMixin, SynchronousTestCase):
    """
    AUTH PLAIN and LOGIN.
    """

    def test_plainInitialResponse(self) -> None:
        """
        AUTH PLAIN with an initial response logs in (235 2.7.0) and logs
        the success.
        """
        self.connect()
        with capturedLogs() as events:
            self.login()
        self.assertEqual([a.address for a in self.realm.avatars], [ALICE])
        texts = [formatEvent(e) for e in events]
        self.assertIn('login: service=submission rhost=192.168.1.1 user="alice@example.org" tls=no', texts)

    def test_loginLoggedAsStored(self) -> None:
        """
        The login line names the user as the checker found it (the stored
        spelling), not as the client typed it.
        """

        class StoredSpelling:
            credentialInterfaces = CountingChecker.credentialInterfaces

            def requestAvatarId(self, credentials):
                return defer.succeed(credentials.username.decode().lower())

        self.portal = Portal(self.realm, [StoredSpelling()])
        self.connect()
        with capturedLogs() as events:
            self.assertEqual(
                self.feed(b"EHLO c\r\nAUTH PLAIN " + plain(b"", b"ALICE@Example.ORG", b"pw") + b"\r\n"),
                EHLO_PLAIN + AUTH_OK,
            )
        logins = [formatEvent(e) for e in events if e.get("log_format", "").startswith("login:")]
        self.assertEqual(logins, ['login: service=submission rhost=192.168.1.1 user="alice@example.org" tls=no'])

    def test_plainContinuation(self) -> None:
        """
        AUTH PLAIN without initial response gets "334 " and reads the
        response on the next line.
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        self.assertEqual(self.feed(b"AUTH PLAIN\r\n"), b"334 \r\n")
        self.assertEqual(self.feed(ALICE_PLAIN + b"\r\n"), AUTH_OK)

    def test_plainAuthzidEqual(self) -> None:
        """
        An authorization identity equal to the authentication identity is
        accepted.
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        response = plain(b"alice@example.org", b"alice@example.org", b"secret")
        self.assertEqual(self.feed(b"AUTH PLAIN " + response + b"\r\n"), AUTH_OK)

    def test_plainAuthzidDiffers(self) -> None:
        """
        Another authorization identity is refused with 535, without login.
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        response = plain(b"bob@example.org", b"alice@example.org", b"secret")
        self.assertEqual(
            self.feed(b"AUTH PLAIN " + response + b"\r\n"),
            b"535 5.7.8 Authentication credentials invalid\r\n",
        )
        self.assertEqual(self.checker.requests, 0)

    def test_plainEmptyInitialResponse(self) -> None:
        """
        "=" is the empty initial response: a malformed PLAIN message.
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        self.assertEqual(self.feed(b"AUTH PLAIN =\r\n"), b"501 5.5.2 Invalid authentication response\r\n")

    def test_login(self) -> None:
        """
        AUTH LOGIN prompts for user name and password.
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        self.assertEqual(self.feed(b"AUTH LOGIN\r\n"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(self.feed(base64.b64encode(b"bob@example.org") + b"\r\n"), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(self.feed(base64.b64encode(b"hunter2") + b"\r\n"), AUTH_OK)
        self.assertEqual([a.address for a in self.realm.avatars], [BOB])

    def test_loginInitialResponse(self) -> None:
        """
        AUTH LOGIN with the user name as initial response prompts for the
        password only.
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        self.assertEqual(
            self.feed(b"AUTH login " + base64.b64encode(b"bob@example.org") + b"\r\n"),
            b"334 UGFzc3dvcmQ6\r\n",
        )
        self.assertEqual(self.feed(base64.b64encode(b"hunter2") + b"\r\n"), AUTH_OK)

    def test_failure(self) -> None:
        """
        Wrong credentials get 535 5.7.8 and a failed-login log line.
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        with capturedLogs() as events:
            out = self.feed(b"AUTH PLAIN " + plain(b"", b"alice@example.org", b"wrong") + b"\r\n")
        self.assertEqual(out, b"535 5.7.8 Authentication credentials invalid\r\n")
        texts = [e.get("log_format", "") for e in events]
        self.assertTrue(any(t.startswith("authentication failed:") for t in texts), texts)
        self.assertEqual(self.feed(b"MAIL FROM:<alice@example.org>\r\n"), b"530 5.7.0 Authentication required\r\n")

    def test_cancel(self) -> None:
        """
        "*" cancels an exchange with 501 5.0.0.
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        self.assertEqual(self.feed(b"AUTH LOGIN\r\n*\r\n"), b"334 VXNlcm5hbWU6\r\n501 5.0.0 Authentication cancelled\r\n")
        self.assertEqual(self.feed(b"AUTH PLAIN\r\n*\r\nNOOP\r\n"), b"334 \r\n501 5.0.0 Authentication cancelled\r\n250 2.0.0 OK\r\n")

    def test_badBase64(self) -> None:
        """
        Invalid base64 gets 501 5.5.2, as initial response or response.
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        self.assertEqual(self.feed(b"AUTH PLAIN !!!\r\n"), b"501 5.5.2 Invalid base64 data\r\n")
        self.assertEqual(self.feed(b"AUTH PLAIN\r\nab\xffc\r\n"), b"334 \r\n501 5.5.2 Invalid base64 data\r\n")
        self.assertEqual(self.checker.requests, 0)

    def test_unknownMechanism(self) -> None:
        """
        An unknown mechanism gets 504 5.5.4.
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        self.assertEqual(self.feed(b"AUTH CRAM-MD5\r\n"), b"504 5.5.4 Unrecognized authentication type\r\n")

    def test_encryptionRequired(self) -> None:
        """
        Where the policy refuses plaintext, AUTH gets 538 5.7.11 without
        the portal being asked.
        """
        self.plaintext = False
        self.connect()
        self.feed(b"EHLO c\r\n")
        self.assertEqual(
            self.feed(b"AUTH PLAIN " + ALICE_PLAIN + b"\r\nAUTH LOGIN\r\n"),
            b"538 5.7.11 Encryption required for requested authentication mechanism\r\n" * 2,
        )
        self.assertEqual(self.checker.requests, 0)

    def test_alreadyAuthenticated(self) -> None:
        """
        A second AUTH gets 503 5.5.1, also after EHLO again.
        """
        self.login()
        self.assertEqual(
            self.feed(b"AUTH PLAIN " + ALICE_PLAIN + b"\r\nEHLO c\r\nAUTH LOGIN\r\n"),
            b"503 5.5.1 Error: already authenticated\r\n" + EHLO_PLAIN + b"503 5.5.1 Error: already authenticated\r\n",
        )

    def test_tooManyFailures(self) -> None:
        """
        The third failed AUTH closes the session with 421 4.7.0.
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        bad = b"AUTH PLAIN " + plain(b"", b"alice@example.org", b"wrong") + b"\r\n"
        self.assertEqual(
            self.feed(bad * 4),
            b"535 5.7.8 Authentication credentials invalid\r\n" * 3
            + b"421 4.7.0 mail.example.org Error: too many authentication failures\r\n",
        )
        self.assertTrue(self.transport.disconnecting)

    def test_pendingLoginHoldsPipeline(self) -> None:
        """
        While the portal has not answered, pipelined commands wait; they are
        answered in order once it does.
        """
        pending = defer.Deferred()

        class SlowPortal:
            def login(self, credentials, mind, *interfaces):
                return pending

        self.portal = SlowPortal()
        self.connect()
        self.feed(b"EHLO c\r\n")
        self.assertEqual(self.feed(b"AUTH PLAIN " + ALICE_PLAIN + b"\r\nMAIL FROM:<alice@example.org>\r\n"), b"")
        logouts = []
        pending.callback((ISubmissionAvatar, FakeSubmissionAvatar(ALICE, self.router), lambda: logouts.append(1)))
        self.assertEqual(self.transport.value(), AUTH_OK + b"250 2.1.0 OK\r\n")
        self.proto.connectionLost(None)
        self.assertEqual(logouts, [1])

    def test_loginAfterConnectionLost(self) -> None:
        """
        An avatar arriving after the connection was lost is logged out at
        once.
        """
        pending = defer.Deferred()

        class SlowPortal:
            def login(self, credentials, mind, *interfaces):
                return pending

        self.portal = SlowPortal()
        self.connect()
        self.feed(b"EHLO c\r\nAUTH PLAIN " + ALICE_PLAIN + b"\r\n")
        self.proto.connectionLost(None)
        logouts = []
        pending.callback((ISubmissionAvatar, FakeSubmissionAvatar(ALICE, self.router), lambda: logouts.append(1)))
        self.assertEqual(logouts, [1])

    def test_logoutOnConnectionLost(self) -> None:
        """
        Losing the connection calls the portal's logout and logs the
        session's counters.
        """
        self.login()
        with capturedLogs() as events:
            self.proto.connectionLost(None)
        self.assertEqual(self.realm.logouts, [ALICE])
        logouts = [e for e in events if e.get("log_format", "").startswith("logout:")]
        self.assertEqual(len(logouts), 1)
        self.assertEqual(logouts[0]["fields"], "bytes=0 messages=0")


class RaisingChecker:
    """
    A checker whose every answer is the failure it was given; it records
    the credentials it was asked about.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, exception: Exception) -> None:
        self.exception = exception
        self.credentials: list = []

    def requestAvatarId(self, credentials):
        self.credentials.append(credentials)
        return defer.fail(self.exception)


class LoginErrorTests(SessionMixin, SynchronousTestCase):
    """
    Every way the checker (or the portal) can fail a login has one fixed
    reply and one kind of log line, and a client that hung up is logged the
    same way.
    """

    def attempt(self, portal) -> tuple:
        """
        AUTH PLAIN as alice against C{portal}.

        @return: the reply and the C{(level, text)} of each log event.
        """
        self.portal = portal
        self.connect()
        self.feed(b"EHLO c\r\n")
        with capturedLogs() as events:
            out = self.feed(b"AUTH PLAIN " + ALICE_PLAIN + b"\r\n")
        return out, [(e["log_level"].name, formatEvent(e)) for e in events]

    def test_unauthorizedLogin(self) -> None:
        """
        L{UnauthorizedLogin} is a failed login: 535 5.7.8 and the line
        fail2ban matches.
        """
        out, lines = self.attempt(Portal(self.realm, [RaisingChecker(UnauthorizedLogin())]))
        self.assertEqual(out, b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(
            lines,
            [("warn", 'authentication failed: service=submission rhost=192.168.1.1 user="alice@example.org"'
              ' reason="bad credentials"')],
        )

    def test_unhandledCredentials(self) -> None:
        """
        A portal without a checker for the credentials
        (L{UnhandledCredentials}) fails the login like wrong credentials.
        """
        out, lines = self.attempt(Portal(self.realm, []))
        self.assertEqual(out, b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual([level for level, _ in lines], ["warn"])
        self.assertTrue(lines[0][1].startswith("authentication failed: "), lines)

    def test_temporaryFailure(self) -> None:
        """
        L{TemporaryFailure} (users database unavailable) gets 454 4.7.0 and
        one warn line with its server-side reason: no traceback, no failed
        login.
        """
        out, lines = self.attempt(Portal(self.realm, [RaisingChecker(TemporaryFailure("users file unreadable"))]))
        self.assertEqual(out, b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(
            lines,
            [("warn", "authentication unavailable: service=submission rhost=192.168.1.1"
              ' user="alice@example.org" error="users file unreadable"')],
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_authenticationBusy(self) -> None:
        """
        L{AuthenticationBusy} (the client's share of password checks is used
        up) gets 454 4.7.0 and no log line: the checker logs such refusals
        sparingly, a flood must not flood the log.
        """
        out, lines = self.attempt(Portal(self.realm, [RaisingChecker(AuthenticationBusy("share used up"))]))
        self.assertEqual(out, b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(lines, [])

    def test_credentialsNameClient(self) -> None:
        """
        The credentials handed to the portal name the client, so the
        checker can account for its checks.
        """
        checker = RaisingChecker(UnauthorizedLogin())
        self.attempt(Portal(self.realm, [checker]))
        [creds] = checker.credentials
        self.assertIsInstance(creds, ClientCredentials)
        self.assertEqual((creds.username, creds.password, creds.peer), (b"alice@example.org", b"secret", "192.168.1.1"))

    def test_serverFault(self) -> None:
        """
        Any other exception is a server fault: logged with its traceback,
        answered 454 4.7.0 without its text.
        """
        out, lines = self.attempt(Portal(self.realm, [RaisingChecker(RuntimeError("secret detail"))]))
        self.assertEqual(out, b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual([level for level, _ in lines], ["critical"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_afterHangUp(self) -> None:
        """
        A client that hung up before the answer gets nothing, and its
        attempt is logged as for a client that waited.
        """
        for exception, level, start in [
            (UnauthorizedLogin(), "warn", "authentication failed: "),
            (TemporaryFailure("users file unreadable"), "warn", "authentication unavailable: "),
        ]:
            pending = defer.Deferred()
            checker = RaisingChecker(exception)
            checker.requestAvatarId = lambda credentials, pending=pending: pending
            self.portal = Portal(self.realm, [checker])
            self.connect()
            self.feed(b"EHLO c\r\nAUTH PLAIN " + ALICE_PLAIN + b"\r\n")
            self.proto.connectionLost(None)
            with capturedLogs() as events:
                pending.errback(exception)
            self.assertEqual(self.transport.value(), b"")
            lines = [(e["log_level"].name, formatEvent(e)) for e in events]
            self.assertEqual([level for level, _ in lines], [level])
            self.assertTrue(lines[0][1].startswith(start), lines)


class EnvelopeTests(SessionMixin, SynchronousTestCase):
    """
    MAIL and RCPT.
    """

    def test_authRequired(self) -> None:
        """
        MAIL, RCPT and DATA need AUTH: 530 5.7.0.
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        self.assertEqual(
            self.feed(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"),
            b"530 5.7.0 Authentication required\r\n" * 3,
        )

    def test_unownedSender(self) -> None:
        """
        A MAIL FROM address the user does not own gets 553 5.7.1; an alias
        the user owns is accepted.
        """
        self.login()
        self.assertEqual(
            self.feed(b"MAIL FROM:<bob@example.org>\r\nMAIL FROM:<postmaster@example.org>\r\n"),
            b"553 5.7.1 Sender address not owned by user\r\n250 2.1.0 OK\r\n",
        )

    def test_addressLiteralSenderNotOwned(self) -> None:
        """
        A sender whose domain is an address literal is well-formed (RFC
        5321 4.1.3) but is never a user's address: 553 5.7.1.
        """
        self.login()
        self.assertEqual(
            self.feed(b"MAIL FROM:<alice@[192.0.2.1]>\r\nMAIL FROM:<alice@[IPv6:2001:db8::1]>\r\n"),
            b"553 5.7.1 Sender address not owned by user\r\n" * 2,
        )

    def test_nullSender(self) -> None:
        """
        The null reverse path is refused on submission.
        """
        self.login()
        self.assertEqual(self.feed(b"MAIL FROM:<>\r\n"), b"550 5.7.1 Null sender not allowed on submission\r\n")

    def test_badSenderSyntax(self) -> None:
        """
        A path without brackets is a syntax error; a bad address in brackets
        gets 553 5.1.7.
        """
        self.login()
        self.assertEqual(
            self.feed(b"MAIL FROM:alice@example.org\r\nMAIL FROM:<a b@example.org>\r\nMAIL TO:<alice@example.org>\r\n"),
            b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
            b"553 5.1.7 Bad sender address syntax\r\n"
            b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n",
        )

    def test_nestedMail(self) -> None:
        """
        MAIL inside a transaction gets 503 5.5.1.
        """
        self.login()
        self.assertEqual(
            self.feed(b"MAIL FROM:<alice@example.org>\r\nMAIL FROM:<alice@example.org>\r\n"),
            b"250 2.1.0 OK\r\n503 5.5.1 Error: nested MAIL command\r\n",
        )

    def test_rcptBeforeMail(self) -> None:
        """
        RCPT and DATA before MAIL get 503 5.5.1.
        """
        self.login()
        self.assertEqual(
            self.feed(b"RCPT TO:<bob@example.org>\r\nDATA\r\n"),
            b"503 5.5.1 Error: need MAIL command\r\n" * 2,
        )

    def test_mailParameters(self) -> None:
        """
        SIZE within the limit and BODY=8BITMIME are accepted; SIZE over the
        limit gets 552 5.3.4, unknown parameters 555 5.5.4, a bad SIZE or
        BODY 501 5.5.4.
        """
        self.login()
        self.assertEqual(
            self.feed(
                b"MAIL FROM:<alice@example.org> SIZE=41943041\r\n"
                b"MAIL FROM:<alice@example.org> XFOO\r\n"
                b"MAIL FROM:<alice@example.org> SIZE=x\r\n"
                b"MAIL FROM:<alice@example.org> BODY=BINARYMIME\r\n"
                b"MAIL FROM:<alice@example.org> size=41943040 body=8bitmime\r\n"
            ),
            b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
            b"555 5.5.4 Unsupported parameter\r\n"
            b"501 5.5.4 Bad SIZE parameter\r\n"
            b"501 5.5.4 Unsupported BODY type\r\n"
            b"250 2.1.0 OK\r\n",
        )

    def test_recipients(self) -> None:
        """
        An unknown local recipient gets 550 5.1.1, a bad address 501 5.1.3,
        a parameter 555; local and remote recipients are accepted.
        """
        self.login()
        self.assertEqual(
            self.feed(
                b"MAIL FROM:<alice@example.org>\r\n"
                b"RCPT TO:<nobody@example.org>\r\n"
                b"RCPT TO:<bad@@example.org>\r\n"
                b"RCPT TO:<bob@example.org> NOTIFY=NEVER\r\n"
                b"RCPT TO:<bob@example.org>\r\n"
                b"RCPT TO:<carol@remote.example>\r\n"
            ),
            b"250 2.1.0 OK\r\n"
            b"550 5.1.1 Recipient address rejected: user unknown\r\n"
            b"501 5.1.3 Bad recipient address syntax\r\n"
            b"555 5.5.4 Unsupported parameter\r\n"
            b"250 2.1.5 OK\r\n"
            b"250 2.1.5 OK\r\n",
        )
        self.assertEqual(self.proto._envelope.recipients, [BOB, REMOTE])

    def test_postmaster(self) -> None:
        """
        The unqualified C{<Postmaster>} (any case) is accepted (RFC 5321
        4.5.1) as the postmaster of the user's own domain, delivered to the
        user or alias that has that address.
        """
        self.login()
        self.assertEqual(
            self.feed(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<Postmaster>\r\nRCPT TO:<POSTMASTER>\r\n"),
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n",
        )
        self.assertEqual(self.proto._envelope.recipients, [ALICE])

    def test_postmasterImplicit(self) -> None:
        """
        Without a postmaster user or alias in the user's domain,
        C{<Postmaster>} is not refused (RFC 5321 4.5.1): it goes to the
        first user of that domain.
        """
        self.users = FakeUserDatabase({BOB: "x", ALICE: "x"})
        self.router.users = self.users
        self.login()
        self.assertEqual(
            self.feed(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<postmaster>\r\n"),
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n",
        )
        self.assertEqual(self.proto._envelope.recipients, [BOB])

    def test_recipientTemporaryFailure(self) -> None:
        """
        A recipient check failing temporarily gets 451 4.3.0.
        """

        def fail(address, accepted=0):
            raise TemporaryFailure("database down")

        self.login()
        self.realm.avatars[0].checkRecipient = fail
        self.assertEqual(
            self.feed(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"),
            b"250 2.1.0 OK\r\n451 4.3.0 Temporary failure, try again later\r\n",
        )

    def test_tooManyRecipients(self) -> None:
        """
        Recipient maxRecipients+1 gets 452 4.5.3.
        """
        self.connect(maxRecipients=2)
        self.login()
        self.assertEqual(
            self.feed(
                b"MAIL FROM:<alice@example.org>\r\n"
                b"RCPT TO:<bob@example.org>\r\n"
                b"RCPT TO:<alice@example.org>\r\n"
                b"RCPT TO:<carol@remote.example>\r\n"
            ),
            b"250 2.1.0 OK\r\n" + b"250 2.1.5 OK\r\n" * 2 + b"452 4.5.3 Too many recipients\r\n",
        )

    def test_recipientsDeduplicated(self) -> None:
        """
        An alias and its user are one recipient: one copy is stored.
        """
        self.login()
        self.envelope(rcpts=(b"alice@example.org", b"postmaster@example.org"))
        self.assertEqual(self.proto._reader is not None, True)
        self.assertEqual(queuedReply(self.feed(HEADERS + b"\r\nhi\r\n.\r\n")), b"250 2.0.0 OK queued as ID\r\n")
        self.assertEqual(self.stored(ALICE), [HEADERS + b"\r\nhi\r\n"])

    def test_noRecipients(self) -> None:
        """
        DATA without an accepted recipient gets 554 5.5.1.
        """
        self.login()
        self.assertEqual(
            self.feed(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\nDATA\r\n"),
            b"250 2.1.0 OK\r\n550 5.1.1 Recipient address rejected: user unknown\r\n554 5.5.1 No valid recipients\r\n",
        )

    def test_rset(self) -> None:
        """
        RSET ends the transaction but keeps the login.
        """
        self.login()
        self.assertEqual(
            self.feed(
                b"MAIL FROM:<alice@example.org>\r\nRSET\r\nRCPT TO:<bob@example.org>\r\nMAIL FROM:<alice@example.org>\r\n"
            ),
            b"250 2.1.0 OK\r\n250 2.0.0 OK\r\n503 5.5.1 Error: need MAIL command\r\n250 2.1.0 OK\r\n",
        )


class DataTests(SessionMixin, SynchronousTestCase):
    """
    Message data: termination, transparency, normalisation, limits.
    """

    def setUp(self) -> None:
        super().setUp()
        self.connect()
        self.login()

    def send(self, data: bytes, rcpts=(b"bob@example.org",)) -> bytes:
        """
        Send an envelope, then C{data} in one segment; return the output
        with the queue identifier replaced.
        """
        self.envelope(rcpts)
        return queuedReply(self.feed(data))

    def test_simple(self) -> None:
        """
        A message is stored exactly, after a Received: field, and 250 names
        its queue identifier.
        """
        self.assertEqual(self.send(HEADERS + b"\r\nHello\r\n.\r\n"), b"250 2.0.0 OK queued as ID\r\n")
        self.assertEqual(self.stored(), [HEADERS + b"\r\nHello\r\n"])
        self.assertEqual(self.store.deliveries[0].state, "committed")

    def test_receivedHeader(self) -> None:
        """
        The trace field names the EHLO name, the server, ESMTPA and the
        queue identifier given in the 250 reply, but not the client's IP
        address nor the user.
        """
        self.envelope()
        out = self.feed(HEADERS + b"\r\nHello\r\n.\r\n")
        queueID = re.match(rb"250 2.0.0 OK queued as ([0-9A-F]{16})\r\n$", out).group(1)
        [(uid, data)] = self.store.boxes[BOB]
        self.assertEqual(
            data.split(b"\r\n", 1)[0],
            b"Received: from client.example (authenticated user) by mail.example.org (pop3gw) with ESMTPA id "
            + queueID
            + b"; "
            + NOW_TEXT,
        )
        self.assertNotIn(b"192.168.1.1", data)
        self.assertNotIn(b"alice", data.split(b"\r\n", 1)[0])

    def test_receivedHeaderAddressLiteral(self) -> None:
        """
        An EHLO argument that is the client's address (an IPv4 or IPv6
        address literal, or a bare IP address) is not copied into the trace
        field: it says C{from unknown}.
        """
        for helo in (b"[192.0.2.7]", b"[IPv6:2001:db8::7]", b"192.0.2.7", b"[garbage]"):
            self.assertEqual(self.feed(b"EHLO " + helo + b"\r\n"), EHLO_PLAIN)
            self.envelope()
            self.feed(HEADERS + b"\r\nHello\r\n.\r\n")
            data = self.store.boxes[BOB][-1][1]
            trace = data.split(b"\r\n", 1)[0]
            self.assertTrue(trace.startswith(b"Received: from unknown (authenticated user) by mail.example.org "), trace)
            self.assertNotIn(b"192.0.2.7", data)
            self.assertNotIn(b"2001:db8", data)

    def test_receivedHeaderTLS(self) -> None:
        """
        Under TLS the trace field says ESMTPSA.
        """
        self.connect(transport=SecureStringTransport())
        self.login()
        self.send(HEADERS + b"\r\nHello\r\n.\r\n")
        [(uid, data)] = self.store.boxes[BOB]
        self.assertIn(b" with ESMTPSA id ", data.split(b"\r\n", 1)[0])

    def test_addMessageIDAndDate(self) -> None:
        """
        Message-ID and Date are added when missing, in RFC 5322 form.
        """
        self.send(b"From: alice@example.org\r\nSubject: x\r\n\r\nHello\r\n.\r\n")
        [message] = self.stored()
        self.assertRegex(
            message,
            rb"^Message-ID: <[0-9a-f]{32}@mail\.example\.org>\r\n"
            rb"Date: Tue, 14 Nov 2023 22:13:20 \+0000\r\n"
            rb"From: alice@example.org\r\nSubject: x\r\n\r\nHello\r\n$",
        )

    def test_keepMessageIDAndDate(self) -> None:
        """
        Existing Message-ID and Date fields (any case) are kept, nothing is
        added.
        """
        headers = b"From: alice@example.org\r\nmessage-id: <a@b>\r\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        self.send(headers + b"\r\nHello\r\n.\r\n")
        self.assertEqual(self.stored(), [headers + b"\r\nHello\r\n"])

    def test_addFrom(self) -> None:
        """
        A message without From: gets one holding the authenticated user's
        address (RFC 6409 section 8), after the Message-ID and Date
        fix-ups, even when the envelope sender is one of the user's
        aliases.
        """
        self.assertEqual(
            self.feed(b"MAIL FROM:<postmaster@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"),
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
        )
        self.feed(b"To: bob@example.org\r\nMessage-ID: <1@x>\r\nDate: x\r\n\r\nHello\r\n.\r\n")
        self.assertEqual(
            self.stored(),
            [b"From: alice@example.org\r\nTo: bob@example.org\r\nMessage-ID: <1@x>\r\nDate: x\r\n\r\nHello\r\n"],
        )

    def test_addFromWithOwnedSender(self) -> None:
        """
        A message with a Sender: the user owns but no From: gets From: too;
        one whose Sender: the user does not own is refused as before, and
        nothing is added or stored.
        """
        self.send(b"Sender: postmaster@example.org\r\nMessage-ID: <1@x>\r\nDate: x\r\n\r\nHi\r\n.\r\n")
        self.assertEqual(
            self.stored(),
            [b"From: alice@example.org\r\nSender: postmaster@example.org\r\nMessage-ID: <1@x>\r\nDate: x\r\n\r\nHi\r\n"],
        )
        self.assertEqual(
            self.send(b"Sender: bob@example.org\r\n\r\nHi\r\n.\r\n"),
            b"553 5.7.1 Sender address in the message header not owned by user\r\n",
        )
        self.assertEqual(len(self.stored()), 1)

    def test_fromNotAddedWhenPresent(self) -> None:
        """
        A From: field in any case, even with an empty display name part,
        means no From: is added.
        """
        headers = b"FROM : Alice <alice@example.org>\r\nMessage-ID: <1@x>\r\nDate: x\r\n"
        self.send(headers + b"\r\nHi\r\n.\r\n")
        self.assertEqual(self.stored(), [headers + b"\r\nHi\r\n"])

    def test_noHeaderSection(self) -> None:
        """
        Data whose first line is not a header field (a body line, a line
        starting with white space, a C{From } mbox line, or the blank line
        itself) has no header section: the added fields are followed by a
        blank line, so the text stays the body.
        """
        added = b"Message-ID: <ID@mail.example.org>\r\nDate: " + NOW_TEXT + b"\r\nFrom: alice@example.org\r\n"
        for data, body in [
            (b"just text without headers\r\n", b"just text without headers\r\n"),
            (b"just text: with a colon\r\nSubject: x\r\n", b"just text: with a colon\r\nSubject: x\r\n"),
            (b" indented\r\n", b" indented\r\n"),
            # Not a folded From: field either: body text, after the blank
            # line, where no reader takes it for the sender.
            (b" From: bob@example.org\r\nFrom: bob@example.org\r\n\r\nHello\r\n",
             b" From: bob@example.org\r\nFrom: bob@example.org\r\n\r\nHello\r\n"),
            (b"From alice@example.org Tue Nov 14 22:13:20 2023\r\nhi\r\n",
             b"From alice@example.org Tue Nov 14 22:13:20 2023\r\nhi\r\n"),
            (b"\r\nbody after the blank line\r\n", b"body after the blank line\r\n"),
            (b"..dot\r\n", b".dot\r\n"),
        ]:
            self.assertEqual(self.send(data + b".\r\n"), b"250 2.0.0 OK queued as ID\r\n")
            message = re.sub(rb"^Message-ID: <[0-9a-f]{32}@", b"Message-ID: <ID@", self.stored()[-1])
            self.assertEqual(message, added + b"\r\n" + body, data)

    def test_headerSectionKept(self) -> None:
        """
        Data that starts with a header field (also with white space before
        the colon, RFC 5322 4.5) keeps its header section as it is: the
        added fields go before it and no blank line is inserted; folded
        lines stay in their field.
        """
        added = b"Message-ID: <ID@mail.example.org>\r\nDate: " + NOW_TEXT + b"\r\nFrom: alice@example.org\r\n"
        for data in (b"Subject: x\r\n\r\nHello\r\n", b"Subject : x\r\n\tfolded\r\n  more\r\n\r\nHello\r\n",
                     b"X-Empty:\r\n"):
            self.send(data + b".\r\n")
            message = re.sub(rb"^Message-ID: <[0-9a-f]{32}@", b"Message-ID: <ID@", self.stored()[-1])
            self.assertEqual(message, added + data, data)

    def test_headerSectionEndsAtNonField(self) -> None:
        """
        A line in the header section that is neither a field nor the
        continuation of one ends the section there, as Postfix's cleanup
        ends it: a blank line is inserted before it and it is the first
        line of the body, with what follows it (a C{From:} there is body
        text, not checked, and a C{From:} is added); the fields added
        go before the section, whose fields are kept.
        """
        added = b"Message-ID: <ID@mail.example.org>\r\nDate: " + NOW_TEXT + b"\r\nFrom: alice@example.org\r\n"
        for data, stored in [
            (b"Subject : x\r\nnot a field\r\n\r\nHello\r\n",
             b"Subject : x\r\n\r\nnot a field\r\n\r\nHello\r\n"),
            (b"Subject: x\r\n folded\r\nno colon here\r\nFrom: bob@example.org\r\n\r\nHi\r\n",
             b"Subject: x\r\n folded\r\n\r\nno colon here\r\nFrom: bob@example.org\r\n\r\nHi\r\n"),
            (b"Subject: x\r\n: no name\r\n", b"Subject: x\r\n\r\n: no name\r\n"),
            (b"Subject: x\r\nSubject x\r\n", b"Subject: x\r\n\r\nSubject x\r\n"),
        ]:
            self.assertEqual(self.send(data + b".\r\n"), b"250 2.0.0 OK queued as ID\r\n", data)
            message = re.sub(rb"^Message-ID: <[0-9a-f]{32}@", b"Message-ID: <ID@", self.stored()[-1])
            self.assertEqual(message, added + stored, data)

    def test_headersOnly(self) -> None:
        """
        A message without a body (no blank line) is stored with its fields.
        """
        self.assertEqual(self.send(HEADERS + b".\r\n"), b"250 2.0.0 OK queued as ID\r\n")
        self.assertEqual(self.stored(), [HEADERS])

    def test_emptyMessage(self) -> None:
        """
        A "." right after 354 ends an empty message; Message-ID, Date and
        From are added.
        """
        self.assertEqual(self.send(b".\r\n"), b"250 2.0.0 OK queued as ID\r\n")
        [message] = self.stored()
        self.assertRegex(
            message,
            rb"^Message-ID: <[0-9a-f]{32}@mail\.example\.org>\r\nDate: [^\r]+\r\nFrom: alice@example\.org\r\n$",
        )

    def test_dotUnstuffing(self) -> None:
        """
        A leading "." is removed from lines with other characters.
        """
        self.send(HEADERS + b"\r\n..\r\n...x\r\n.y\r\nz.\r\n.\r\n")
        self.assertEqual(self.stored(), [HEADERS + b"\r\n.\r\n..x\r\ny\r\nz.\r\n"])

    def test_bareLFNormalised(self) -> None:
        """
        Bare LF line ends are stored as CRLF.
        """
        self.assertEqual(
            self.send(b"From: alice@example.org\nMessage-ID: <1@x>\nDate: x\n\nline1\nline2\r\n.\r\n"),
            b"250 2.0.0 OK queued as ID\r\n",
        )
        self.assertEqual(
            self.stored(),
            [b"From: alice@example.org\r\nMessage-ID: <1@x>\r\nDate: x\r\n\r\nline1\r\nline2\r\n"],
        )

    def test_bareCR(self) -> None:
        """
        A bare CR anywhere gets 550 5.6.11 at the end of the data; nothing
        is stored and the delivery is aborted.
        """
        self.assertEqual(self.send(HEADERS + b"\r\nab\rc\r\nmore\r\n.\r\n"), b"550 5.6.11 Bare CR not allowed\r\n")
        self.assertEqual(self.store.boxes, {})
        self.assertEqual(self.store.deliveries[0].state, "aborted")

    def test_bareCRBeforeCRLF(self) -> None:
        """
        CR CR LF is a bare CR followed by a line end.
        """
        self.assertEqual(self.send(HEADERS + b"\r\nab\r\r\n.\r\n"), b"550 5.6.11 Bare CR not allowed\r\n")
        self.assertEqual(self.store.boxes, {})

    def test_crlfSplitAcrossSegments(self) -> None:
        """
        A CR ending one segment and the LF starting the next are one CRLF,
        also for the final ".".
        """
        self.envelope()
        for chunk in (HEADERS + b"\r\nab\r", b"\n.\r", b"\n"):
            out = self.feed(chunk)
        self.assertEqual(queuedReply(out), b"250 2.0.0 OK queued as ID\r\n")
        self.assertEqual(self.stored(), [HEADERS + b"\r\nab\r\n"])

    def test_byteByByte(self) -> None:
        """
        Data fed one byte at a time is stored exactly as when sent at once.
        """
        data = HEADERS + b"\r\n..dots\nbare\r\n.\nx\r\n\r\nend\r\n.\r\n"
        self.send(data)
        self.envelope()
        out = b""
        for i in range(len(data)):
            out += self.feed(data[i : i + 1])
        self.assertEqual(queuedReply(out), b"250 2.0.0 OK queued as ID\r\n")
        first, second = self.stored()
        self.assertEqual(first, second)
        self.assertEqual(first, HEADERS + b"\r\n.dots\r\nbare\r\n.\r\nx\r\n\r\nend\r\n")

    def test_sizeLimitStreamed(self) -> None:
        """
        Past maxMessageSize the delivery is aborted at once, the rest is
        read, and 552 5.3.4 comes at the end; nothing is stored.
        """
        self.connect(maxMessageSize=100)
        self.feed(b"EHLO c\r\nAUTH PLAIN " + ALICE_PLAIN + b"\r\n")
        self.envelope()
        self.feed(HEADERS + b"\r\n" + b"x" * 60 + b"\r\n")
        self.assertEqual(self.store.deliveries[0].state, "aborted")
        self.assertEqual(withoutReceived(self.store.deliveries[0].data), b"")
        self.assertEqual(
            self.feed(b"y" * 60 + b"\r\n.\r\nNOOP\r\n"),
            b"552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 OK\r\n",
        )
        self.assertEqual(self.store.boxes, {})

    def test_sizeExactLimit(self) -> None:
        """
        A message of exactly maxMessageSize octets is accepted.
        """
        body = HEADERS + b"\r\n"
        self.connect(maxMessageSize=len(body) + 5)
        self.feed(b"EHLO c\r\nAUTH PLAIN " + ALICE_PLAIN + b"\r\n")
        self.assertEqual(self.send(body + b"abc\r\n.\r\n"), b"250 2.0.0 OK queued as ID\r\n")

    def test_streaming(self) -> None:
        """
        The body is written to the delivery while it arrives, not held.
        """
        self.envelope()
        self.feed(HEADERS + b"\r\n" + b"x" * 998 + b"\r\n")
        written = self.store.deliveries[0].data
        self.feed((b"y" * 998 + b"\r\n") * 80)
        self.assertGreater(len(self.store.deliveries[0].data), len(written) + 60000)

    def test_longLine(self) -> None:
        """
        A 999-octet line is never cut: 550 5.6.0 at the end; a 998-octet
        line is fine.
        """
        self.assertEqual(self.send(HEADERS + b"\r\n" + b"x" * 998 + b"\r\n.\r\n"), b"250 2.0.0 OK queued as ID\r\n")
        self.assertEqual(
            self.send(HEADERS + b"\r\n" + b"x" * 999 + b"\r\n.\r\n"),
            b"550 5.6.0 Message line longer than 998 octets\r\n",
        )
        self.assertEqual(len(self.stored()), 1)

    def test_maximalStuffedLine(self) -> None:
        """
        A 998-octet line that starts with "." is sent as 999 octets with its
        transparency dot, which the line limit does not count (RFC 5321
        4.5.3.1.6): it is accepted and stored unstuffed, in one segment or
        split before the CRLF.  One octet more is refused.
        """
        line = b"." + b"x" * 997
        self.assertEqual(self.send(HEADERS + b"\r\n." + line + b"\r\n.\r\n"), b"250 2.0.0 OK queued as ID\r\n")
        self.envelope()
        self.assertEqual(self.feed(HEADERS + b"\r\n." + line), b"")
        self.assertEqual(queuedReply(self.feed(b"\r\n.\r\n")), b"250 2.0.0 OK queued as ID\r\n")
        self.assertEqual(self.stored(), [HEADERS + b"\r\n" + line + b"\r\n"] * 2)
        self.assertEqual(
            self.send(HEADERS + b"\r\n." + line + b"x\r\n.\r\n"),
            b"550 5.6.0 Message line longer than 998 octets\r\n",
        )
        self.assertEqual(len(self.stored()), 2)

    def test_maximalLineSplitBeforeLF(self) -> None:
        """
        A 998-octet line whose CR ends one segment and whose LF starts the
        next is not too long.
        """
        self.envelope()
        self.assertEqual(self.feed(HEADERS + b"\r\n" + b"x" * 998 + b"\r"), b"")
        self.assertEqual(queuedReply(self.feed(b"\n.\r\n")), b"250 2.0.0 OK queued as ID\r\n")
        self.assertEqual(self.stored(), [HEADERS + b"\r\n" + b"x" * 998 + b"\r\n"])

    def test_longLineAcrossSegments(self) -> None:
        """
        An over-long line arriving in pieces is dropped as it comes, and a
        "." at its end is not the end of the data.
        """
        self.envelope()
        for _i in range(10):
            self.assertEqual(self.feed(b"x" * 1000), b"")
        self.assertLess(len(self.proto._buffer), 1001)
        self.assertEqual(self.feed(b".\r\n"), b"")
        self.assertEqual(self.feed(b".\r\n"), b"550 5.6.0 Message line longer than 998 octets\r\n")

    def test_headerFromUnowned(self) -> None:
        """
        A header From: the user does not own gets 553 5.7.1 at the end of
        the data; the delivery is aborted and nothing stored.
        """
        self.assertEqual(
            self.send(b"From: Bob <bob@example.org>\r\n\r\nHello\r\n.\r\n"),
            b"553 5.7.1 Sender address in the message header not owned by user\r\n",
        )
        self.assertEqual(self.store.boxes, {})
        self.assertEqual(self.store.deliveries[0].state, "aborted")

    def test_headerFromVariants(self) -> None:
        """
        Every From:/Sender: address must be owned: several addresses, space
        before the colon, folded fields, empty fields and garbage count.
        """
        for headers in [
            b"From: alice@example.org, bob@example.org\r\n",
            b"From : bob@example.org\r\n",
            b"From: Alice\r\n <bob@example.org>\r\n",
            b"FROM:\r\n",
            b"From: alice@example.org <bob@example.org>\r\n",
            b"From: alice@example.org\r\nSender: bob@example.org\r\n",
            b"From: alice@example.org\r\nFrom: bob@example.org\r\n",
            b"From: undisclosed\r\n",
        ]:
            self.assertEqual(
                self.send(headers + b"\r\nHello\r\n.\r\n"),
                b"553 5.7.1 Sender address in the message header not owned by user\r\n",
                headers,
            )
        self.assertEqual(self.store.boxes, {})

    def test_headerFromOwned(self) -> None:
        """
        Display names, aliases and a Sender: the user owns are accepted.
        """
        headers = b'From: "Alice A." <alice@example.org>, postmaster@example.org\r\nSender: alice@example.org\r\n'
        self.assertEqual(self.send(headers + b"\r\nHello\r\n.\r\n"), b"250 2.0.0 OK queued as ID\r\n")

    def test_addressesInAnyCase(self) -> None:
        """
        The user's own address and aliases in another case are owned, in
        C{MAIL FROM} and in the header, and a recipient in another case is
        delivered to the user as stored.
        """
        self.proto.dataReceived(
            b"MAIL FROM:<ALICE@Example.ORG>\r\nRCPT TO:<Bob@EXAMPLE.org>\r\nRCPT TO:<BOB@example.org>\r\nDATA\r\n"
        )
        self.transport.clear()
        self.assertEqual(
            queuedReply(self.feed(b"From: Alice <ALICE@Example.ORG>\r\nSender: PostMaster@example.org\r\n\r\nHi\r\n.\r\n")),
            b"250 2.0.0 OK queued as ID\r\n",
        )
        self.assertEqual(len(self.stored(BOB)), 1)

    def test_headerFromUnchecked(self) -> None:
        """
        With checkHeaderFrom off, any header From: is accepted.
        """
        self.connect(checkHeaderFrom=False)
        self.feed(b"EHLO c\r\nAUTH PLAIN " + ALICE_PLAIN + b"\r\n")
        self.assertEqual(self.send(b"From: bob@example.org\r\n\r\nHello\r\n.\r\n"), b"250 2.0.0 OK queued as ID\r\n")

    def test_headerSectionTooLarge(self) -> None:
        """
        A header section over 256 KiB gets 552 5.3.4 at the end.
        """
        self.envelope()
        self.feed((b"X-Filler: " + b"x" * 900 + b"\r\n") * 300)
        self.assertEqual(self.store.deliveries[0].state, "aborted")
        self.assertEqual(self.feed(b"\r\nbody\r\n.\r\n"), b"552 5.3.4 Message header section too large\r\n")

    def test_remoteRecipientQueued(self) -> None:
        """
        A remote recipient's copy goes to the outbound queue with the
        envelope sender.
        """
        self.send(HEADERS + b"\r\nHello\r\n.\r\n", rcpts=(b"carol@remote.example",))
        [(sender, rcpts, data)] = self.queue.entries
        self.assertEqual((sender, rcpts), (ALICE, [REMOTE]))
        self.assertTrue(data.endswith(HEADERS + b"\r\nHello\r\n"))

    def test_countersLogged(self) -> None:
        """
        The logout line counts messages and their octets.
        """
        self.send(HEADERS + b"\r\nHello\r\n.\r\n")
        with capturedLogs() as events:
            self.proto.connectionLost(None)
        [logout] = [e for e in events if e.get("log_format", "").startswith("logout:")]
        self.assertEqual(logout["fields"], "bytes=%d messages=1" % (len(HEADERS) + 9,))

    def test_connectionLostAbortsDelivery(self) -> None:
        """
        Losing the connection in the middle of DATA aborts the delivery.
        """
        self.envelope()
        self.feed(HEADERS + b"\r\nHello\r\n")
        self.proto.connectionLost(None)
        self.assertEqual(self.store.deliveries[0].state, "aborted")
        self.assertEqual(self.store.boxes, {})
        self.assertEqual(self.realm.logouts, [ALICE])

    def test_timeoutInData(self) -> None:
        """
        The idle timeout also applies during DATA, and aborts the delivery.
        """
        self.envelope()
        self.feed(HEADERS)
        self.clock.advance(300)
        self.assertEqual(self.transport.value(), b"421 4.4.2 mail.example.org Error: timeout exceeded\r\n")
        self.assertEqual(self.store.deliveries[0].state, "aborted")

    def test_commitFailure(self) -> None:
        """
        A failing commit gets 451 4.3.0 and no 250.
        """
        self.store.failCommit = True
        self.assertEqual(self.send(HEADERS + b"\r\nHello\r\n.\r\nNOOP\r\n"), b"451 4.3.0 Temporary failure, try again later\r\n250 2.0.0 OK\r\n")
        self.assertEqual(self.store.boxes, {})

    def test_beginDeliveryFailure(self) -> None:
        """
        A delivery that cannot start gets 451 4.3.0 instead of 354.
        """

        def fail(sender, recipients, trace=b"", **kw):
            raise TemporaryFailure("disk full")

        self.realm.avatars[0].beginDelivery = fail
        self.assertEqual(
            self.feed(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"),
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n451 4.3.0 Temporary failure, try again later\r\n",
        )

    def test_commitInsufficientStorage(self) -> None:
        """
        A commit failing for lack of storage gets C{452 4.3.1 Insufficient
        system storage}, and the refusal's log line names the error in
        words (never sent to the client).
        """
        self.patch(
            FakeDelivery, "commit",
            lambda delivery: defer.fail(InsufficientStorage("cannot deliver message: No space left on device")),
        )
        with capturedLogs() as logged:
            self.assertEqual(
                self.send(HEADERS + b"\r\nHello\r\n.\r\nNOOP\r\n"),
                b"452 4.3.1 Insufficient system storage\r\n250 2.0.0 OK\r\n",
            )
        self.assertEqual(self.store.boxes, {})
        self.assertEqual(
            [formatEvent(e) for e in logged if "refused message" in e.get("log_format", "")],
            ['submission: refused message user="alice@example.org" from="alice@example.org" '
             'reply="452 4.3.1 Insufficient system storage" error="cannot deliver message: No space left on device"'],
        )

    def test_writeInsufficientStorage(self) -> None:
        """
        A write failing for lack of storage while the data streams in gets
        452 4.3.1 at the end of the data, with the error in the log line.
        """

        @implementer(IDelivery)
        class Full(FakeDelivery):
            def write(self, data):
                if not data.startswith(b"Received: "):
                    raise InsufficientStorage("cannot write message: Disk quota exceeded")
                FakeDelivery.write(self, data)

        delivery = Full(lambda data: None)
        self.realm.avatars[0].beginDelivery = lambda sender, recipients, trace=b"", **kw: delivery
        self.envelope()
        with capturedLogs() as logged:
            self.assertEqual(
                self.feed(HEADERS + b"\r\n" + b"x" * 990 + b"\r\n" * 100 + b".\r\n"),
                b"452 4.3.1 Insufficient system storage\r\n",
            )
        self.assertEqual(delivery.state, "aborted")
        self.assertEqual(
            [formatEvent(e) for e in logged if "refused message" in e.get("log_format", "")],
            ['submission: refused message user="alice@example.org" from="alice@example.org" '
             'reply="452 4.3.1 Insufficient system storage" error="cannot write message: Disk quota exceeded"'],
        )

    def test_beginDeliveryInsufficientStorage(self) -> None:
        """
        A delivery that cannot start for lack of storage gets 452 4.3.1
        instead of 354, and a log line naming the error.
        """

        def full(sender, recipients, trace=b"", **kw):
            raise InsufficientStorage("cannot start delivery: No space left on device")

        self.realm.avatars[0].beginDelivery = full
        with capturedLogs() as logged:
            self.assertEqual(
                self.feed(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"),
                b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n452 4.3.1 Insufficient system storage\r\n",
            )
        self.assertEqual(
            [formatEvent(e) for e in logged if "refused message" in e.get("log_format", "")],
            ['submission: refused message user="alice@example.org" from="alice@example.org" '
             'reply="452 4.3.1 Insufficient system storage" error="cannot start delivery: No space left on device"'],
        )

    def test_writeFailure(self) -> None:
        """
        A delivery whose write fails unexpectedly gives 451 4.3.0 at the end
        of the data; the error is logged, no traceback is sent.
        """

        @implementer(IDelivery)
        class Broken(FakeDelivery):
            def write(self, data):
                if not data.startswith(b"Received: "):
                    raise RuntimeError("boom")
                FakeDelivery.write(self, data)

        delivery = Broken(lambda data: None)
        self.realm.avatars[0].beginDelivery = lambda sender, recipients, trace=b"", **kw: delivery
        self.envelope()
        self.assertEqual(self.feed(HEADERS + b"\r\nHello\r\n.\r\n"), b"451 4.3.0 Internal error\r\n")
        self.assertEqual(delivery.state, "aborted")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unexpectedErrorInCommand(self) -> None:
        """
        An unexpected exception in a command handler is logged and answered
        451 4.3.0, never with a traceback; the session goes on.
        """

        def broken(address):
            raise RuntimeError("secret internals")

        self.realm.avatars[0].mayUseSender = broken
        self.assertEqual(
            self.feed(b"MAIL FROM:<alice@example.org>\r\nNOOP\r\n"),
            b"451 4.3.0 Internal error\r\n250 2.0.0 OK\r\n",
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_twoMessages(self) -> None:
        """
        A session can send several messages.
        """
        self.send(HEADERS + b"\r\none\r\n.\r\n")
        self.send(HEADERS + b"\r\ntwo\r\n.\r\n")
        self.assertEqual(self.stored(), [HEADERS + b"\r\none\r\n", HEADERS + b"\r\ntwo\r\n"])


class SmugglingTests(SessionMixin, SynchronousTestCase):
    """
    SMTP smuggling (CVE-2023-51764 family): only CRLF.CRLF ends the data.
    """

    SMUGGLED = (
        b"MAIL FROM:<alice@example.org>\r\n"
        b"RCPT TO:<carol@remote.example>\r\n"
        b"DATA\r\n"
        b"From: alice@example.org\r\n\r\nsmuggled\r\n"
    )

    def setUp(self) -> None:
        super().setUp()
        self.connect()
        self.login()

    def smuggle(self, separator: bytes) -> bytes:
        """
        Send one message with C{separator} then a second envelope inside
        its data, then the real end and QUIT.
        """
        self.envelope()
        return queuedReply(self.feed(HEADERS + b"\r\nfirst" + separator + self.SMUGGLED + b".\r\nQUIT\r\n"))

    def assertOneMessage(self, separatorStored: bytes) -> None:
        """
        Exactly one message, for bob only, holding the smuggled text as
        content; nothing queued for the smuggled recipient.
        """
        self.assertEqual(self.stored(), [HEADERS + b"\r\nfirst" + separatorStored + self.SMUGGLED])
        self.assertEqual(self.queue.entries, [])
        self.assertEqual(len(self.store.deliveries), 1)

    def test_lfDotLF(self) -> None:
        """
        "\\n.\\n" is content: one message, stored with CRLF and the "." line.
        """
        self.assertEqual(self.smuggle(b"\n.\n"), b"250 2.0.0 OK queued as ID\r\n221 2.0.0 Bye\r\n")
        self.assertOneMessage(b"\r\n.\r\n")

    def test_crlfDotLF(self) -> None:
        """
        "\\r\\n.\\n" is content.
        """
        self.assertEqual(self.smuggle(b"\r\n.\n"), b"250 2.0.0 OK queued as ID\r\n221 2.0.0 Bye\r\n")
        self.assertOneMessage(b"\r\n.\r\n")

    def test_lfDotCRLF(self) -> None:
        """
        "\\n.\\r\\n" is content.
        """
        self.assertEqual(self.smuggle(b"\n.\r\n"), b"250 2.0.0 OK queued as ID\r\n221 2.0.0 Bye\r\n")
        self.assertOneMessage(b"\r\n.\r\n")

    def test_crDotCR(self) -> None:
        """
        "\\r.\\r" is bare CRs: the message is refused, nothing stored, no
        second envelope.
        """
        self.assertEqual(self.smuggle(b"\r.\r"), b"550 5.6.11 Bare CR not allowed\r\n221 2.0.0 Bye\r\n")
        self.assertEqual(self.store.boxes, {})
        self.assertEqual(self.queue.entries, [])
        self.assertEqual(len(self.store.deliveries), 1)

    def test_byteByByte(self) -> None:
        """
        The smuggling vectors fed one byte at a time give the same result.
        """
        for separator in (b"\n.\n", b"\r\n.\n", b"\n.\r\n"):
            self.envelope()
            data = HEADERS + b"\r\nfirst" + separator + self.SMUGGLED + b".\r\n"
            out = b"".join(self.feed(data[i : i + 1]) for i in range(len(data)))
            self.assertEqual(queuedReply(out), b"250 2.0.0 OK queued as ID\r\n")
        self.assertEqual(self.stored(), [HEADERS + b"\r\nfirst\r\n.\r\n" + self.SMUGGLED] * 3)
        self.assertEqual(self.queue.entries, [])

    def test_realEndThenCommands(self) -> None:
        """
        After a real CRLF.CRLF, the rest of the segment is commands, run
        under the normal rules.
        """
        self.envelope()
        out = self.feed(HEADERS + b"\r\nfirst\r\n.\r\n" + self.SMUGGLED + b".\r\n")
        self.assertEqual(
            queuedReply(out),
            b"250 2.0.0 OK queued as ID\r\n"
            b"250 2.1.0 OK\r\n"
            b"250 2.1.5 OK\r\n"
            b"354 End data with <CR><LF>.<CR><LF>\r\n"
            b"250 2.0.0 OK queued as ID\r\n",
        )
        self.assertEqual(len(self.queue.entries), 1)


class ChunkingPropertyTests(SessionMixin, SynchronousTestCase):
    """
    Segment boundaries never change what is answered or stored.
    """

    DATA = (
        HEADERS + b"\r\n..a\nb\r\n.\nc\r\r\n" + b"x" * 999 + b"\n.\r\nd\r\n.\r\nNOOP\r\n",
        HEADERS + b"\r\nfirst\n.\nMAIL FROM:<alice@example.org>\r\nDATA\r\n\r\n.\r\nNOOP\r\n",
        b"From: bob@example.org\r\n\r\nx\r\n.\r\nNOOP\r\n",
        HEADERS + b"\r\n\r\n.\r\n\r\n.\r\n",
        HEADERS + b"\r\n" + b"y" * 998 + b"\r\n.\r\n",
    )

    def session(self, data: bytes, cuts: list) -> tuple:
        """
        Run a fresh session sending C{data} cut at C{cuts}; return the
        replies after 354 and what was stored.
        """
        SessionMixin.setUp(self)
        self.connect()
        self.login()
        self.envelope()
        out = b""
        previous = 0
        for cut in sorted(set(cuts)) + [len(data)]:
            out += self.feed(data[previous:cut])
            previous = cut
        return queuedReply(out), self.store.boxes.get(BOB, [])

    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(
        index=hypothesis.strategies.integers(min_value=0, max_value=4),
        cuts=hypothesis.strategies.lists(hypothesis.strategies.integers(min_value=0, max_value=1200), max_size=12),
    )
    def test_anySegmentation(self, index: int, cuts: list) -> None:
        """
        Any segmentation of the data gives the same replies and the same
        stored message (the Received: line aside) as one segment.
        """
        data = self.DATA[index]
        cuts = [c for c in cuts if c < len(data)]
        expectedOut, expectedStored = self.session(data, [])
        out, stored = self.session(data, cuts)
        self.assertEqual(out, expectedOut)
        self.assertEqual(
            [d.split(b"\r\n", 1)[1] for _, d in stored],
            [d.split(b"\r\n", 1)[1] for _, d in expectedStored],
        )


class PipeliningTests(SessionMixin, SynchronousTestCase):
    """
    Pipelined input and replies held until a commit fires.
    """

    def test_wholeSessionOneSegment(self) -> None:
        """
        A whole session in one segment is answered in order.
        """
        self.connect()
        out = self.feed(
            b"EHLO client.example\r\n"
            b"AUTH PLAIN " + ALICE_PLAIN + b"\r\n"
            b"MAIL FROM:<alice@example.org>\r\n"
            b"RCPT TO:<bob@example.org>\r\n"
            b"RCPT TO:<nobody@example.org>\r\n"
            b"DATA\r\n" + HEADERS + b"\r\nHello\r\n.\r\n"
            b"QUIT\r\n"
        )
        self.assertEqual(
            queuedReply(out),
            EHLO_PLAIN
            + AUTH_OK
            + b"250 2.1.0 OK\r\n"
            b"250 2.1.5 OK\r\n"
            b"550 5.1.1 Recipient address rejected: user unknown\r\n"
            b"354 End data with <CR><LF>.<CR><LF>\r\n"
            b"250 2.0.0 OK queued as ID\r\n"
            b"221 2.0.0 Bye\r\n",
        )
        self.assertEqual(self.stored(), [HEADERS + b"\r\nHello\r\n"])

    def test_replyOnlyAfterCommit(self) -> None:
        """
        250 is sent only when the commit fires, and commands pipelined after
        the data wait for it.
        """
        committed = defer.Deferred()

        @implementer(IDelivery)
        class Slow(FakeDelivery):
            def commit(self):
                self.state = "committing"
                return committed

        delivery = Slow(lambda data: None)
        self.connect()
        self.login()
        self.realm.avatars[0].beginDelivery = lambda sender, recipients, trace=b"", **kw: delivery
        self.envelope()
        self.assertEqual(self.feed(HEADERS + b"\r\nHello\r\n.\r\nNOOP\r\n"), b"")
        self.assertEqual(self.feed(b"RSET\r\n"), b"")
        self.assertEqual(withoutReceived(delivery.data), HEADERS + b"\r\nHello\r\n")
        committed.callback(None)
        self.assertEqual(
            queuedReply(self.transport.value()),
            b"250 2.0.0 OK queued as ID\r\n250 2.0.0 OK\r\n250 2.0.0 OK\r\n",
        )

    def test_connectionLostDuringCommit(self) -> None:
        """
        A client that disconnects while the commit is in flight does not
        abort it: the message is kept (the RFC 1047 risk of a duplicate if
        the client sends it again is accepted), and nothing is written to
        the closed transport.
        """
        committed = defer.Deferred()

        @implementer(IDelivery)
        class Slow(FakeDelivery):
            def commit(self):
                self.state = "committing"
                return committed.addCallback(lambda _: setattr(self, "state", "committed"))

        delivery = Slow(lambda data: None)
        self.connect()
        self.login()
        self.realm.avatars[0].beginDelivery = lambda sender, recipients, trace=b"", **kw: delivery
        self.envelope()
        self.assertEqual(self.feed(HEADERS + b"\r\nHello\r\n.\r\n"), b"")
        self.proto.connectionLost(None)
        self.assertEqual(delivery.state, "committing")
        committed.callback(None)
        self.assertEqual(delivery.state, "committed")
        self.assertEqual(withoutReceived(delivery.data), HEADERS + b"\r\nHello\r\n")
        self.assertEqual(self.transport.value(), b"")

    def test_commitFailureAfterWait(self) -> None:
        """
        A commit failing later gets 451 4.3.0, never 250; an unexpected
        error is logged.
        """
        committed = defer.Deferred()

        @implementer(IDelivery)
        class Slow(FakeDelivery):
            def commit(self):
                return committed

        self.connect()
        self.login()
        self.realm.avatars[0].beginDelivery = lambda sender, recipients, trace=b"", **kw: Slow(lambda data: None)
        self.envelope()
        self.assertEqual(self.feed(HEADERS + b"\r\nHello\r\n.\r\nNOOP\r\n"), b"")
        committed.errback(OSError("disk"))
        self.assertEqual(self.transport.value(), b"451 4.3.0 Temporary failure, try again later\r\n250 2.0.0 OK\r\n")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_pendingInputBounded(self) -> None:
        """
        While a reply is pending, reading pauses once much input is held,
        and resumes after.
        """
        committed = defer.Deferred()

        @implementer(IDelivery)
        class Slow(FakeDelivery):
            def commit(self):
                return committed

        self.connect()
        self.login()
        self.realm.avatars[0].beginDelivery = lambda sender, recipients, trace=b"", **kw: Slow(lambda data: None)
        self.envelope()
        self.feed(HEADERS + b"\r\nHello\r\n.\r\n")
        # HELO: a command that is neither an error nor one of the junk
        # commands that are limited per message.
        self.feed(b"HELO x\r\n" * (smtp.MAX_PENDING_INPUT // 8 + 1))
        self.assertEqual(self.transport.producerState, "paused")
        committed.callback(None)
        self.assertEqual(self.transport.producerState, "producing")


class StartTLSTests(SessionMixin, SynchronousTestCase):
    """
    STARTTLS.
    """

    transportFactory = TLSStringTransport

    def test_discardsPipelinedPlaintext(self) -> None:
        """
        Commands pipelined after STARTTLS in the same segment are discarded
        (CVE-2011-0411); TLS is started with the factory's context factory.
        """
        context = object()
        self.connect(tlsContextFactory=context)
        out = self.feed(b"EHLO c\r\nSTARTTLS\r\nNOOP\r\nAUTH PLAIN " + ALICE_PLAIN + b"\r\n")
        self.assertEqual(
            out,
            b"250-mail.example.org\r\n"
            b"250-PIPELINING\r\n"
            b"250-SIZE 41943040\r\n"
            b"250-8BITMIME\r\n"
            b"250-ENHANCEDSTATUSCODES\r\n"
            b"250-CHUNKING\r\n"
            b"250-SMTPUTF8\r\n"
            b"250-STARTTLS\r\n"
            b"250 AUTH PLAIN LOGIN\r\n"
            b"220 2.0.0 Ready to start TLS\r\n",
        )
        self.assertEqual(self.transport.tlsStarted, [context])
        self.assertEqual(self.checker.requests, 0)

    def test_startTLSFailureCloses(self) -> None:
        """
        If the transport cannot start TLS after the 220 reply, the failure
        is logged and the connection closed without another reply (a
        plaintext 451 after 220 would be read as TLS data); the pipelined
        plaintext is still never acted on.
        """

        class FailingTLS(TLSStringTransport):
            def startTLS(self, contextFactory) -> None:
                raise ValueError("no TLS here")

        self.connect(transport=FailingTLS(), tlsContextFactory=object())
        self.feed(b"EHLO c\r\n")
        self.assertEqual(self.feed(b"STARTTLS\r\nNOOP\r\n"), b"220 2.0.0 Ready to start TLS\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_resetAfterTLS(self) -> None:
        """
        After STARTTLS the session starts over: EHLO is needed again, it no
        longer offers STARTTLS, and the policy is asked with secure=True.
        """
        self.connect(tlsContextFactory=object())
        self.feed(b"EHLO c\r\nSTARTTLS\r\n")
        self.assertEqual(
            self.feed(b"AUTH PLAIN " + ALICE_PLAIN + b"\r\nEHLO c\r\nSTARTTLS\r\n"),
            b"503 5.5.1 Error: send EHLO first\r\n" + EHLO_PLAIN + b"454 4.7.0 TLS already active\r\n",
        )
        self.assertEqual(self.policyCalls[-1], (True, "192.168.1.1"))

    def test_notOffered(self) -> None:
        """
        Without a context factory STARTTLS gets 503 5.5.1.
        """
        self.connect()
        self.assertEqual(self.feed(b"EHLO c\r\nSTARTTLS\r\n"), EHLO_PLAIN + b"503 5.5.1 Error: STARTTLS not offered\r\n")
        self.assertEqual(self.transport.tlsStarted, [])

    def test_notAfterAuth(self) -> None:
        """
        STARTTLS after AUTH is a bad sequence.
        """
        self.connect(tlsContextFactory=object())
        self.feed(b"EHLO c\r\nAUTH PLAIN " + ALICE_PLAIN + b"\r\n")
        self.assertEqual(self.feed(b"STARTTLS\r\n"), b"503 5.5.1 Error: bad sequence of commands\r\n")

    def test_startTLSOverIOSim(self) -> None:
        """
        Over an iosim pair (with iosim's stand-in TLS), STARTTLS hands the
        factory's context to the transport and the new session is secure:
        the policy is asked with C{secure=True} and AUTH is offered.
        """
        from twisted.test.iosim import connect, makeFakeClient, makeFakeServer

        class Context:
            def iosimVerify(self, other):
                return True

        calls = []

        def policy(secure, peer):
            calls.append(secure)
            return secure

        self.factory = smtp.SubmissionFactory(self.portal, policy, self.clock, HOST, tlsContextFactory=Context())
        server = self.factory.buildProtocol(None)
        client = Collector()
        cio, sio = makeFakeClient(client), makeFakeServer(server)
        pump = connect(server, sio, client, cio)
        client.transport.write(b"EHLO c\r\nSTARTTLS\r\n")
        pump.flush()
        self.assertTrue(client.received.endswith(b"250 STARTTLS\r\n220 2.0.0 Ready to start TLS\r\n"))
        client.received = b""
        client.transport.startTLS(Context())
        client.transport.write(b"EHLO c\r\nAUTH PLAIN " + ALICE_PLAIN + b"\r\n")
        pump.flush()
        self.assertEqual(calls, [False, True, True])
        self.assertTrue(ISSLTransport.providedBy(server.transport))
        self.assertEqual(client.received, EHLO_PLAIN + AUTH_OK)

    def test_implicitTLSInMemory(self) -> None:
        """
        Wrapped in L{TLSMemoryBIOFactory} with Twisted's test certificate,
        the session is secure from the greeting on: STARTTLS is not offered
        and the trace field says ESMTPSA.
        """
        from twisted.internet import ssl
        from twisted.internet.protocol import Factory
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from twisted.test.iosim import connectedServerAndClient

        serverOptions = ssl.PrivateCertificate.loadPEM(serverPEM()).options()
        calls = []

        def policy(secure, peer):
            calls.append(secure)
            return secure

        inner = smtp.SubmissionFactory(self.portal, policy, self.clock, HOST, tlsContextFactory=serverOptions)
        client = Collector()
        serverFactory = TLSMemoryBIOFactory(serverOptions, False, inner, clock=self.clock)
        clientFactory = TLSMemoryBIOFactory(
            ssl.CertificateOptions(), True, Factory.forProtocol(lambda: client), clock=self.clock
        )
        server, clientWrapper, pump = connectedServerAndClient(
            lambda: serverFactory.buildProtocol(None), lambda: clientFactory.buildProtocol(None), clock=self.clock
        )
        pump.flush()
        self.assertEqual(client.received, GREETING)
        client.received = b""
        client.transport.write(
            b"EHLO c\r\nAUTH PLAIN " + ALICE_PLAIN + b"\r\n"
            b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n" + HEADERS + b"\r\nhi\r\n.\r\n"
        )
        pump.flush()
        self.assertEqual(calls, [True, True])
        self.assertEqual(
            queuedReply(client.received),
            EHLO_PLAIN + AUTH_OK + b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
            b"250 2.0.0 OK queued as ID\r\n",
        )
        [(uid, data)] = self.store.boxes[BOB]
        self.assertIn(b" with ESMTPSA id ", data.split(b"\r\n", 1)[0])


class FormatTests(SynchronousTestCase):
    """
    Helpers.
    """

    def test_formatDate(self) -> None:
        """
        Dates are RFC 5322, in UTC, with English names.
        """
        self.assertEqual(smtp.formatDate(NOW), NOW_TEXT.decode())
        self.assertEqual(smtp.formatDate(0), "Thu, 1 Jan 1970 00:00:00 +0000")

    def test_factoryHashable(self) -> None:
        """
        The factory can be used as a dict key (Twisted wrappers do).
        """
        factory = smtp.SubmissionFactory(None, lambda s, p: True, task.Clock(), HOST)
        self.assertEqual({factory: 1}[factory], 1)


QUEUE_ID = b"0000000000abc-0123abcd"


class MessageIdentityTests(SessionMixin, SynchronousTestCase):
    """
    One id per message from acceptance to delivery: when the delivery
    names the queue entry its remote part becomes (C{queueId}), that id is
    the one given in the 250 reply, in the C{Received:} field and in the
    log; otherwise the server makes its own.  One log line per accepted
    message names the id, the user, the envelope sender, the number of
    local and remote recipients, the size and the queue id.
    """

    def setUp(self) -> None:
        super().setUp()
        self.connect()
        self.login()
        original = self.router.beginDelivery

        def beginDelivery(sender, recipients, trace=b"", **kw):
            delivery = original(sender, recipients, trace)
            delivery.localRecipients = tuple(r for r in recipients if self.router.isLocalDomain(r.domain))
            delivery.remoteRecipients = tuple(r for r in recipients if not self.router.isLocalDomain(r.domain))
            delivery.queueId = QUEUE_ID.decode("ascii") if delivery.remoteRecipients else None
            return delivery

        self.router.beginDelivery = beginDelivery

    def accepted(self, events) -> list:
        """
        The "submission: accepted" lines among C{events}, as (level name,
        text).
        """
        from twisted.logger import formatEvent

        return [
            (e["log_level"].name, formatEvent(e))
            for e in events
            if e.get("log_format", "").startswith("submission: accepted")
        ]

    def test_queueIdIsTheMessageId(self) -> None:
        """
        A message with a remote recipient is known by its queue id: in the
        250 reply, the C{Received:} field of every copy, and the log line.
        """
        self.envelope((b"bob@example.org", b"carol@remote.example"))
        body = HEADERS + b"\r\nHello\r\n"
        with capturedLogs() as events:
            out = self.feed(body + b".\r\n")
        self.assertEqual(out, b"250 2.0.0 OK queued as " + QUEUE_ID + b"\r\n")
        received = (
            b"Received: from client.example (authenticated user) by mail.example.org (pop3gw) with ESMTPA id "
            + QUEUE_ID
            + b"; "
            + NOW_TEXT
            + b"\r\n"
        )
        [(uid, local)] = self.store.boxes[BOB]
        [(sender, rcpts, queued)] = self.queue.entries
        self.assertEqual(local, received + body)
        self.assertEqual(queued, received + body)
        self.assertEqual(
            self.accepted(events),
            [
                (
                    "info",
                    f'submission: accepted id={QUEUE_ID.decode()} user="alice@example.org" from="alice@example.org"'
                    f" local=1 remote=1 size={len(body)} queue={QUEUE_ID.decode()}",
                )
            ],
        )

    def test_localOnly(self) -> None:
        """
        A purely local message gets the server's own id, and its log line
        counts its local recipients and names no queue id.
        """
        self.envelope((b"bob@example.org", b"postmaster@example.org"))
        body = HEADERS + b"\r\nHello\r\n"
        with capturedLogs() as events:
            out = self.feed(body + b".\r\n")
        messageId = re.match(rb"250 2.0.0 OK queued as ([0-9A-F]{16})\r\n$", out).group(1).decode()
        self.assertEqual(
            self.accepted(events),
            [
                (
                    "info",
                    f'submission: accepted id={messageId} user="alice@example.org" from="alice@example.org"'
                    f" local=2 remote=0 size={len(body)} queue=-",
                )
            ],
        )
        [(uid, data)] = self.store.boxes[BOB]
        self.assertIn(b" id " + messageId.encode() + b"; ", data.split(b"\r\n", 1)[0])

    def test_unsafeQueueIdIgnored(self) -> None:
        """
        A C{queueId} that is not a plain token never reaches the wire: the
        server's own id is used.
        """
        original = self.router.beginDelivery

        def beginDelivery(sender, recipients, trace=b"", **kw):
            delivery = original(sender, recipients, trace)
            delivery.queueId = "x\r\n250 injected"
            return delivery

        self.router.beginDelivery = beginDelivery
        self.envelope((b"carol@remote.example",))
        self.assertEqual(queuedReply(self.feed(HEADERS + b"\r\nHello\r\n.\r\n")), b"250 2.0.0 OK queued as ID\r\n")

    def test_routingOnlyThroughIRoutedDelivery(self) -> None:
        """
        The server reads a delivery's routing through L{IRoutedDelivery}
        (adaptation), not by looking for attributes: a delivery that does
        not provide it gets the server's own id, and its log line names no
        recipient counts and no queue id, even if it has attributes of
        those names.
        """
        original = self.router.beginDelivery

        @implementer(IDelivery)
        class PlainDelivery:
            def __init__(self, inner):
                self.write, self.commit, self.abort = inner.write, inner.commit, inner.abort
                self.queueId = QUEUE_ID.decode("ascii")
                self.localRecipients = self.remoteRecipients = ()

        self.router.beginDelivery = lambda *args, **kw: PlainDelivery(original(*args, **kw))
        self.envelope((b"carol@remote.example",))
        body = HEADERS + b"\r\nHello\r\n"
        with capturedLogs() as events:
            out = self.feed(body + b".\r\n")
        messageId = re.match(rb"250 2.0.0 OK queued as ([0-9A-F]{16})\r\n$", out).group(1).decode()
        self.assertNotEqual(messageId, QUEUE_ID.decode())
        self.assertEqual(
            self.accepted(events),
            [
                (
                    "info",
                    f'submission: accepted id={messageId} user="alice@example.org" from="alice@example.org"'
                    f" local=- remote=- size={len(body)} queue=-",
                )
            ],
        )

    def test_receivedWriteFails(self) -> None:
        """
        If the C{Received:} field cannot be written, DATA gets 451 and the
        delivery is aborted.
        """
        original = self.router.beginDelivery
        deliveries = []

        def beginDelivery(sender, recipients, trace=b"", **kw):
            delivery = original(sender, recipients, trace)
            deliveries.append(delivery)

            def write(data):
                raise TemporaryFailure("disk full")

            delivery.write = write
            return delivery

        self.router.beginDelivery = beginDelivery
        out = self.feed(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        self.assertEqual(
            out, b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n451 4.3.0 Temporary failure, try again later\r\n"
        )
        self.assertEqual(self.store.deliveries[0].state, "aborted")

    def test_receivedWriteInsufficientStorage(self) -> None:
        """
        If the C{Received:} field cannot be written for lack of storage,
        DATA gets 452 4.3.1 and the delivery is aborted.
        """
        original = self.router.beginDelivery

        def beginDelivery(sender, recipients, trace=b"", **kw):
            delivery = original(sender, recipients, trace)

            def write(data):
                raise InsufficientStorage("cannot write message: No space left on device")

            delivery.write = write
            return delivery

        self.router.beginDelivery = beginDelivery
        out = self.feed(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        self.assertEqual(out, b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n452 4.3.1 Insufficient system storage\r\n")
        self.assertEqual(self.store.deliveries[0].state, "aborted")


class LoginRefusedTests(SessionMixin, SynchronousTestCase):
    """
    Each AUTH refused by the plaintext-auth policy (538 5.7.11) is logged
    as "login refused" (a warn line fail2ban does not match), naming the
    user when the initial response gave it, and never the password.
    """

    def refusedLines(self, data: bytes) -> list:
        from twisted.logger import formatEvent

        self.plaintext = False
        self.connect()
        self.feed(b"EHLO c\r\n")
        with capturedLogs() as events:
            out = self.feed(data)
        self.assertEqual(
            out.count(b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"),
            data.count(b"\r\n"),
        )
        return [(e["log_level"].name, formatEvent(e)) for e in events]

    def test_plainInitialResponse(self) -> None:
        """
        AUTH PLAIN with an initial response: the line names its
        authentication identity, not the password.
        """
        lines = self.refusedLines(b"AUTH PLAIN " + ALICE_PLAIN + b"\r\n")
        self.assertEqual(
            lines,
            [
                (
                    "warn",
                    'login refused: service=submission rhost=192.168.1.1 user="alice@example.org"'
                    ' reason="plaintext authentication disallowed"',
                )
            ],
        )
        self.assertNotIn("secret", repr(lines))

    def test_loginInitialResponse(self) -> None:
        """
        AUTH LOGIN with the user name as initial response names it.
        """
        lines = self.refusedLines(b"AUTH LOGIN " + base64.b64encode(b"bob@example.org") + b"\r\n")
        self.assertEqual(
            lines,
            [
                (
                    "warn",
                    'login refused: service=submission rhost=192.168.1.1 user="bob@example.org"'
                    ' reason="plaintext authentication disallowed"',
                )
            ],
        )

    def test_withoutInitialResponse(self) -> None:
        """
        Without an initial response (or with one that does not decode) the
        user is unknown: the line says C{user=""}; one line per refusal.
        """
        lines = self.refusedLines(b"AUTH PLAIN\r\nAUTH LOGIN\r\nAUTH PLAIN !!!\r\n")
        expected = (
            "warn",
            'login refused: service=submission rhost=192.168.1.1 user="" reason="plaintext authentication disallowed"',
        )
        self.assertEqual(lines, [expected] * 3)


class PausingTransport(StringTransport):
    """
    A L{StringTransport} that, once C{pausing} is set, pauses its streaming
    producer after each write, like a TCP transport whose write buffer is
    full because the client does not read.
    """

    pausing = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.pausing and self.producer is not None and self.streaming:
            self.producer.pauseProducing()


class OutputFlowTests(SessionMixin, SynchronousTestCase):
    """
    A client that sends without reading cannot make the server buffer
    replies without bound, nor keep a closed connection open for ever.
    """

    transportFactory = PausingTransport

    def test_producerRegistered(self) -> None:
        """
        A streaming producer is registered for the whole connection.
        """
        self.connect()
        self.assertIsNotNone(self.transport.producer)
        self.assertTrue(self.transport.streaming)

    def test_noRepliesWhilePaused(self) -> None:
        """
        While the transport has paused the producer, buffered commands are
        not answered; they are answered, in order, once it resumes.
        """
        self.connect()
        self.transport.pausing = True
        self.assertEqual(self.feed(b"NOOP\r\nNOOP\r\nNOOP\r\n"), b"250 2.0.0 OK\r\n")
        self.assertEqual(self.feed(b"EHLO x\r\n" * 1000), b"")
        self.transport.pausing = False
        self.transport.producer.resumeProducing()
        self.assertEqual(self.transport.value(), b"250 2.0.0 OK\r\n" * 2 + EHLO_PLAIN * 1000)

    def test_readingStopsWhilePaused(self) -> None:
        """
        While output is paused, reading from the client stops once more than
        L{smtp.MAX_PENDING_INPUT} octets wait, and restarts once they have
        been answered.
        """
        self.connect()
        self.transport.pausing = True
        self.feed(b"NOOP\r\n")
        self.assertEqual(self.transport.producerState, "producing")
        self.feed(b"EHLO x\r\n" * (smtp.MAX_PENDING_INPUT // 8 + 1))
        self.assertEqual(self.transport.producerState, "paused")
        self.assertEqual(self.transport.value(), b"")
        self.transport.pausing = False
        self.transport.producer.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(len(self.proto._buffer), 0)

    def test_pausedDuringData(self) -> None:
        """
        Message data is not consumed while output is paused either, so the
        reply to the end of data is not written while paused.
        """
        self.connect()
        self.login()
        self.envelope()
        self.transport.pausing = True
        self.transport.producer.pauseProducing()
        self.assertEqual(self.feed(HEADERS + b"\r\nHello\r\n.\r\n"), b"")
        self.assertEqual(self.store.boxes, {})
        self.transport.pausing = False
        self.transport.producer.resumeProducing()
        self.assertEqual(queuedReply(self.transport.value()), b"250 2.0.0 OK queued as ID\r\n")

    def test_closeWhileStalledAborts(self) -> None:
        """
        The idle timeout on a connection whose client does not read aborts
        it at once instead of waiting for the unsent output for ever.
        """
        self.connect(idleTimeout=300)
        self.transport.pausing = True
        self.feed(b"NOOP\r\n")
        self.clock.advance(300)
        self.assertTrue(self.transport.disconnected)
        self.assertIsNone(self.transport.producer)

    def test_quitThenStallAborts(self) -> None:
        """
        After QUIT the connection is closed gracefully; if the client still
        has not read the reply L{smtp.CLOSE_TIMEOUT} seconds later, it is
        aborted.  Nothing is left scheduled once the connection is gone.
        """
        self.connect()
        self.assertEqual(self.feed(b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.transport.producer)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(smtp.CLOSE_TIMEOUT)
        self.assertTrue(self.transport.disconnected)
        self.proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closeCancelsAbortOnLoss(self) -> None:
        """
        A connection that closes normally after QUIT leaves no timer.
        """
        self.connect()
        self.feed(b"QUIT\r\n")
        self.proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.transport.disconnected)

    def test_tooManyErrorsWhileStalledAborts(self) -> None:
        """
        Too many errors from a client that does not read abort the
        connection.
        """
        self.connect()
        self.assertEqual(self.feed(b"FROB\r\n" * 19), b"500 5.5.2 Error: command not recognized\r\n" * 19)
        self.transport.pausing = True
        self.assertEqual(self.feed(b"FROB\r\n"), b"500 5.5.2 Error: command not recognized\r\n")
        self.assertTrue(self.transport.disconnected)
        self.assertIsNone(self.transport.producer)

    def test_stopProducingThenLost(self) -> None:
        """
        When the transport stops the producer (a TCP transport after
        STARTTLS does so and drops its TLS layer before telling the
        protocol), connectionLost does not unregister it again.
        """

        class Strict(PausingTransport):
            def unregisterProducer(self):
                raise AssertionError("unregistered after stopProducing")

        self.connect(transport=Strict())
        self.transport.producer.stopProducing()
        self.proto.connectionLost(None)
        self.assertEqual(self.flushLoggedErrors(), [])


class SlowlorisTests(SessionMixin, SynchronousTestCase):
    """
    Only data with a line end counts as activity for the idle timer.
    """

    def test_trickleTimesOut(self) -> None:
        """
        A client trickling one byte every 2 seconds without a line end is
        closed after the idle timeout.
        """
        self.connect(idleTimeout=300)
        for _i in range(150):
            self.assertEqual(self.feed(b"N"), b"")
            self.clock.advance(2)
        self.assertEqual(self.transport.value(), b"421 4.4.2 mail.example.org Error: timeout exceeded\r\n")

    def test_trickleInDataTimesOut(self) -> None:
        """
        During DATA too, only data with a line end resets the timer.
        """
        self.connect(idleTimeout=300)
        self.login()
        self.envelope()
        self.feed(b"Subject: x")
        for _i in range(150):
            self.feed(b"x")
            self.clock.advance(2)
        self.assertEqual(self.transport.value(), b"421 4.4.2 mail.example.org Error: timeout exceeded\r\n")

    def test_chunkOctetsReset(self) -> None:
        """
        Octets of a BDAT chunk count as activity, line end or not: a binary
        chunk sent slowly but steadily (one octet every 2 seconds, 300
        seconds in all) is read whole and answered, and silence after it
        still times out.
        """
        self.connect(idleTimeout=300)
        self.login()
        self.assertEqual(self.feed(CHUNK_MAIL), CHUNK_ENVELOPE)
        self.assertEqual(self.feed(b"BDAT 200\r\n"), b"")
        for _i in range(199):
            self.clock.advance(2)
            self.assertEqual(self.feed(b"\xff"), b"")
        self.assertEqual(self.feed(b"\x01"), b"250 2.0.0 200 octets received\r\n")
        self.clock.advance(299)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(self.transport.value(), b"421 4.4.2 mail.example.org Error: timeout exceeded\r\n")

    def test_lineEndResets(self) -> None:
        """
        Data ending a line resets the timer.
        """
        self.connect(idleTimeout=300)
        self.feed(b"NO")
        self.clock.advance(299)
        self.assertEqual(self.feed(b"OP\r\n"), b"250 2.0.0 OK\r\n")
        self.clock.advance(299)
        self.assertEqual(self.transport.value(), b"")


class AuthLineLimitTests(SessionMixin, SynchronousTestCase):
    """
    L{smtp.MAX_AUTH_LINE} holds whatever the segmentation.
    """

    def test_longAuthCommandOneSegment(self) -> None:
        """
        An AUTH line longer than the limit arriving whole gets 500 5.5.6;
        the portal is not asked.
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        token = b"A" * (smtp.MAX_AUTH_LINE * 2)
        self.assertEqual(self.feed(b"AUTH PLAIN " + token + b"\r\nNOOP\r\n"), b"500 5.5.6 Line too long\r\n250 2.0.0 OK\r\n")
        self.assertEqual(self.checker.requests, 0)

    def test_longSASLResponseOneSegment(self) -> None:
        """
        A SASL response line longer than the limit arriving whole gets
        500 5.5.6 and ends the exchange.
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        self.assertEqual(self.feed(b"AUTH PLAIN\r\n"), b"334 \r\n")
        self.assertEqual(
            self.feed(b"A" * (smtp.MAX_AUTH_LINE * 2) + b"\r\nNOOP\r\n"),
            b"500 5.5.6 Line too long\r\n250 2.0.0 OK\r\n",
        )
        self.assertEqual(self.checker.requests, 0)

    def test_authLineAtLimit(self) -> None:
        """
        An AUTH line of exactly L{smtp.MAX_AUTH_LINE} octets with CRLF is
        still read (here: refused as bad base64, not as too long).
        """
        self.connect()
        self.feed(b"EHLO c\r\n")
        line = b"AUTH PLAIN " + b"A" * (smtp.MAX_AUTH_LINE - 13)
        self.assertEqual(len(line) + 2, smtp.MAX_AUTH_LINE)
        self.assertEqual(self.feed(line + b"\r\n"), b"501 5.5.2 Invalid base64 data\r\n")
        self.assertEqual(self.feed(line + b"A\r\n"), b"500 5.5.6 Line too long\r\n")


class DataContentTests(SessionMixin, SynchronousTestCase):
    """
    NUL octets in message data and the Resent- sender fields.
    """

    def setUp(self) -> None:
        super().setUp()
        self.connect()
        self.login()

    def send(self, data: bytes) -> bytes:
        self.envelope()
        return queuedReply(self.feed(data))

    def test_nulRefused(self) -> None:
        """
        A NUL octet anywhere in the data gets 550 5.6.0 at the real end of
        the data; nothing is stored and the session goes on.
        """
        for data in [
            HEADERS + b"\r\nab\x00c\r\n.\r\nNOOP\r\n",
            b"Subject: \x00\r\n" + HEADERS + b"\r\nHello\r\n.\r\nNOOP\r\n",
            HEADERS + b"\r\n.\x00\r\n.\r\nNOOP\r\n",
        ]:
            self.assertEqual(
                self.send(data),
                b"550 5.6.0 NUL character not allowed\r\n250 2.0.0 OK\r\n",
                data,
            )
        self.assertEqual(self.store.boxes, {})
        self.assertEqual({d.state for d in self.store.deliveries}, {"aborted"})

    def test_refusedMessageLogged(self) -> None:
        """
        A message refused at the end of its data leaves one log line naming
        the user, the sender and the reply.
        """
        with capturedLogs() as logged:
            self.assertEqual(
                self.send(HEADERS + b"\r\nab\x00c\r\n.\r\n"), b"550 5.6.0 NUL character not allowed\r\n"
            )
        lines = [formatEvent(e) for e in logged if "refused message" in e.get("log_format", "")]
        self.assertEqual(
            lines,
            ['submission: refused message user="alice@example.org" from="alice@example.org" '
             'reply="550 5.6.0 NUL character not allowed"'],
        )

    def test_resentFromUnowned(self) -> None:
        """
        Resent-From: and Resent-Sender: addresses must be owned by the user
        like From: and Sender:.
        """
        for headers in [
            b"From: alice@example.org\r\nResent-From: bob@example.org\r\n",
            b"From: alice@example.org\r\nResent-Sender: bob@example.org\r\n",
            b"From: alice@example.org\r\nRESENT-FROM : Bob <bob@example.org>\r\n",
        ]:
            self.assertEqual(
                self.send(headers + b"\r\nHello\r\n.\r\n"),
                b"553 5.7.1 Sender address in the message header not owned by user\r\n",
                headers,
            )
        self.assertEqual(self.store.boxes, {})

    def test_resentFromOwned(self) -> None:
        """
        Resent-From: and Resent-Sender: addresses the user owns are
        accepted.
        """
        headers = b"From: bob@x.example\r\nResent-From: alice@example.org\r\nResent-Sender: postmaster@example.org\r\n"
        self.connect(checkHeaderFrom=True)
        self.login()
        self.assertEqual(self.send(headers + b"\r\nHello\r\n.\r\n"), b"553 5.7.1 Sender address in the message header not owned by user\r\n")
        headers = b"From: alice@example.org\r\nResent-From: alice@example.org\r\nResent-Sender: postmaster@example.org\r\n"
        self.assertEqual(self.send(headers + b"\r\nHello\r\n.\r\n"), b"250 2.0.0 OK queued as ID\r\n")


class _STARTTLSClient(Protocol):
    """
    Collects lines; starts TLS after the 220 reply to STARTTLS.
    """

    def __init__(self, options) -> None:
        self.options = options
        self.buffer = b""
        self.lines: list = []
        self.tlsLines: list = []
        self.secure = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            (self.tlsLines if self.secure else self.lines).append(line)
            if line == b"220 2.0.0 Ready to start TLS":
                self.transport.startTLS(self.options)
                self.secure = True


class RealSTARTTLSTests(SessionMixin, SynchronousTestCase):
    """
    STARTTLS with a real TLS layer under a transport that, like a TCP
    transport, stops and drops the producer and deletes its C{protocol}
    before telling the protocol of the loss.
    """

    def session(self):
        from twisted.internet import ssl
        from twisted.internet.testing import MemoryReactorClock
        from twisted.test import iosim

        from tests.test_pop3 import _StartTLSFakeTransport

        options = ssl.PrivateCertificate.loadPEM(serverPEM()).options()
        self.factory = smtp.SubmissionFactory(self.portal, self.policy, self.clock, HOST, tlsContextFactory=options)
        client, server, pump = iosim.connectedServerAndClient(
            lambda: self.factory.buildProtocol(None),
            lambda: _STARTTLSClient(ssl.CertificateOptions()),
            clientTransportFactory=lambda p: _StartTLSFakeTransport(p, isServer=False),
            serverTransportFactory=lambda p: _StartTLSFakeTransport(p, isServer=True),
            clock=MemoryReactorClock(),
        )
        client.transport.write(b"EHLO c\r\nSTARTTLS\r\n")
        pump.flush()
        client.transport.write(b"NOOP\r\n")
        pump.flush()
        self.assertEqual(client.tlsLines, [b"250 2.0.0 OK"])
        return client, server, pump

    def test_clientDropsAfterSTARTTLS(self) -> None:
        """
        A client that drops the TCP connection after the handshake ends the
        session quietly (nothing logged as an error).
        """
        from twisted.test import iosim

        client, server, pump = self.session()
        iosim.FakeTransport.loseConnection(client.transport)
        pump.flush()
        self.assertTrue(server._disconnected)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_quitOverTLS(self) -> None:
        """
        QUIT over TLS is answered and closes the connection.
        """
        client, server, pump = self.session()
        client.transport.write(b"QUIT\r\n")
        pump.flush()
        self.assertEqual(client.tlsLines[-1], b"221 2.0.0 Bye")
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(self.flushLoggedErrors(), [])


class AliasRecipientTests(SessionMixin, SynchronousTestCase):
    """
    Submission to distribution lists, catch-alls and sub-addresses, and
    sending as a sub-address.
    """

    def setUp(self) -> None:
        super().setUp()
        self.users.aliases[Address("team", "example.org")] = (ALICE, BOB)
        self.users.catchAll["example.org"] = BOB
        self.connect()
        self.login()

    def send(self, sender: bytes, rcpts, headers: bytes) -> bytes:
        """
        One transaction; C{headers} precede a Message-ID and a Date field
        (so nothing is added) and the body C{x}.  Returns the output with
        the queue id replaced.
        """
        cmds = b"MAIL FROM:<" + sender + b">\r\n" + b"".join(b"RCPT TO:<" + r + b">\r\n" for r in rcpts)
        return queuedReply(self.feed(cmds + b"DATA\r\n" + self.message(headers) + b".\r\n"))

    def message(self, headers: bytes) -> bytes:
        return headers + b"Message-ID: <1@x>\r\nDate: " + NOW_TEXT + b"\r\n\r\nx\r\n"

    def accepted(self, rcpts: int) -> bytes:
        return (
            b"250 2.1.0 OK\r\n" + b"250 2.1.5 OK\r\n" * rcpts + b"354 End data with <CR><LF>.<CR><LF>\r\n"
            b"250 2.0.0 OK queued as ID\r\n"
        )

    def test_listOnceEach(self) -> None:
        """
        RCPT to a list gets one 250 and each target one copy, also when a
        target is named again directly, by sub-address or by the catch-all.
        """
        rcpts = [b"Team@example.org", b"bob@example.org", b"bob+x@example.org", b"nobody@example.org"]
        self.assertEqual(self.send(b"alice@example.org", rcpts, b"From: alice@example.org\r\n"), self.accepted(4))
        self.assertEqual(self.stored(ALICE), [self.message(b"From: alice@example.org\r\n")])
        self.assertEqual(self.stored(BOB), [self.message(b"From: alice@example.org\r\n")])
        self.assertEqual(sorted(self.store.boxes), [ALICE, BOB])

    def test_subaddressUnchanged(self) -> None:
        """
        A sub-address is delivered to its user's maildrop with the message
        unchanged (no header names the tag).
        """
        headers = b"From: alice@example.org\r\nTo: alice+news@example.org\r\n"
        self.assertEqual(self.send(b"alice@example.org", [b"alice+news@example.org"], headers), self.accepted(1))
        self.assertEqual(self.stored(ALICE), [self.message(headers)])
        self.assertEqual(list(self.store.boxes), [ALICE])

    def test_catchAllOnlyForUnknown(self) -> None:
        """
        Without a catch-all, an unknown local address is refused with 550
        5.1.1; with one, it is accepted and goes to the catch-all user.
        """
        self.assertEqual(
            self.feed(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<whoever@example.org>\r\n"),
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n",
        )
        self.assertEqual(self.proto._envelope.recipients, [BOB])
        del self.users.catchAll["example.org"]
        self.assertEqual(
            self.feed(b"RCPT TO:<whoever@example.org>\r\n"),
            b"550 5.1.1 Recipient address rejected: user unknown\r\n",
        )

    def test_subaddressSender(self) -> None:
        """
        A user may send with MAIL FROM its sub-address and a matching
        From:, not with someone else's sub-address (in the envelope or the
        header), nor as a catch-all address.
        """
        headers = b"From: Alice <Alice+Lists@example.org>\r\n"
        self.assertEqual(self.send(b"alice+lists@example.org", [b"bob@example.org"], headers), self.accepted(1))
        self.assertEqual(self.stored(BOB), [self.message(headers)])
        self.assertEqual(
            self.feed(b"MAIL FROM:<bob+x@example.org>\r\nMAIL FROM:<whoever@example.org>\r\n"),
            b"553 5.7.1 Sender address not owned by user\r\n" * 2,
        )
        self.assertEqual(
            self.send(b"alice+x@example.org", [b"bob@example.org"], b"From: bob+x@example.org\r\n"),
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
            b"553 5.7.1 Sender address in the message header not owned by user\r\n",
        )


CHUNK_MAIL = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
CHUNK_ENVELOPE = b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n"


def bdat(data: bytes, last: bool = True) -> bytes:
    """
    A BDAT command carrying C{data}.
    """
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


class BDATTests(SessionMixin, SynchronousTestCase):
    """
    CHUNKING (RFC 3030): BDAT chunks go through the rules of DATA without
    transparency, octets counted exactly.
    """

    def setUp(self) -> None:
        super().setUp()
        self.connect()
        self.login()

    def test_oneChunk(self) -> None:
        """
        One BDAT LAST chunk is a message: stored after the Received: field
        as sent (leading dots kept, CRLF.CRLF is content), 250 once it is
        durable.
        """
        body = HEADERS + b"\r\n..dots kept\r\n.\r\nend\r\n"
        out = queuedReply(self.feed(CHUNK_MAIL + bdat(body)))
        self.assertEqual(out, CHUNK_ENVELOPE + b"250 2.0.0 OK queued as ID\r\n")
        self.assertEqual(self.stored(), [body])

    def test_chunksAtEveryReadBoundary(self) -> None:
        """
        Several chunks, with a CRLF and a line cut between chunks and the
        whole input cut into two reads at every position, give one reply
        per chunk and the same message.
        """
        body = HEADERS + b"\r\nline one\r\nline two\n..x\r\nlast"
        # The first chunk ends between the CR and the LF of "line one", the
        # second in the middle of "line two".
        c1 = body.index(b"line one") + 9
        c2 = body.index(b"two") + 1
        session = CHUNK_MAIL + bdat(body[:c1], last=False) + bdat(body[c1:c2], last=False) + bdat(body[c2:])
        expected = (
            CHUNK_ENVELOPE
            + b"250 2.0.0 %d octets received\r\n" % c1
            + b"250 2.0.0 %d octets received\r\n" % (c2 - c1)
            + b"250 2.0.0 OK queued as ID\r\n"
        )
        stored = HEADERS + b"\r\nline one\r\nline two\r\n..x\r\nlast\r\n"
        for i in range(len(session) + 1):
            SessionMixin.setUp(self)
            self.connect()
            self.login()
            out = self.feed(session[:i]) + self.feed(session[i:])
            self.assertEqual(queuedReply(out), expected, i)
            self.assertEqual(self.stored(), [stored], i)

    def test_commandsInsideChunkAreBody(self) -> None:
        """
        What looks like SMTP commands inside a chunk is message content:
        nothing is run, nothing is queued for the address it names.
        """
        body = HEADERS + b"\r\nx\r\n.\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<carol@remote.example>\r\nDATA\r\nQUIT\r\n"
        out = queuedReply(self.feed(CHUNK_MAIL + bdat(body) + b"NOOP\r\n"))
        self.assertEqual(out, CHUNK_ENVELOPE + b"250 2.0.0 OK queued as ID\r\n250 2.0.0 OK\r\n")
        self.assertEqual(self.stored(), [body])
        self.assertEqual(self.queue.entries, [])

    def test_fixUpsAsData(self) -> None:
        """
        Missing Message-ID:, Date: and From: are added as with DATA.
        """
        out = queuedReply(self.feed(CHUNK_MAIL + bdat(b"Subject: s\r\n\r\nbody\r\n")))
        self.assertEqual(out, CHUNK_ENVELOPE + b"250 2.0.0 OK queued as ID\r\n")
        [stored] = self.stored()
        self.assertRegex(stored, rb"^Message-ID: <[0-9a-f]{32}@mail.example.org>\r\nDate: ")
        self.assertTrue(stored.endswith(b"\r\nFrom: alice@example.org\r\nSubject: s\r\n\r\nbody\r\n"), stored)

    def test_bareLFNormalised(self) -> None:
        """
        Bare LFs become CRLF.
        """
        self.feed(CHUNK_MAIL + bdat(HEADERS + b"\na\nb\n"))
        self.assertEqual(self.stored(), [HEADERS + b"\r\na\r\nb\r\n"])

    def test_bareCRRefused(self) -> None:
        """
        A bare CR is refused with DATA's reply, at the chunk holding it;
        the chunks pipelined after it are read and discarded (503), and the
        session stays in sync.
        """
        out = self.feed(
            CHUNK_MAIL + bdat(HEADERS + b"\r\na\rb\r\n", last=False) + bdat(b"NOOP\r\n") + b"NOOP\r\n"
        )
        self.assertEqual(
            out,
            CHUNK_ENVELOPE
            + b"550 5.6.11 Bare CR not allowed\r\n"
            + b"503 5.5.1 Error: need MAIL command\r\n"
            + b"250 2.0.0 OK\r\n",
        )
        self.assertEqual(self.store.boxes, {})
        self.assertEqual(self.store.deliveries[0].state, "aborted")

    def test_nulRefused(self) -> None:
        """
        A NUL is refused with DATA's reply.
        """
        out = self.feed(CHUNK_MAIL + bdat(HEADERS + b"\r\na\0b\r\n"))
        self.assertEqual(out, CHUNK_ENVELOPE + b"550 5.6.0 NUL character not allowed\r\n")
        self.assertEqual(self.store.boxes, {})

    def test_sizeLimit(self) -> None:
        """
        Chunks are counted against the size limit as they stream: over it,
        552 5.3.4 and nothing stored.
        """
        SessionMixin.setUp(self)
        self.connect(maxMessageSize=200)
        self.feed(b"EHLO c\r\nAUTH PLAIN " + ALICE_PLAIN + b"\r\n")
        out = self.feed(CHUNK_MAIL + bdat(HEADERS + b"\r\n", last=False) + bdat(b"x" * 150 + b"\r\n") + b"NOOP\r\n")
        self.assertEqual(
            out,
            CHUNK_ENVELOPE
            + b"250 2.0.0 %d octets received\r\n" % (len(HEADERS) + 2)
            + b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
            + b"250 2.0.0 OK\r\n",
        )
        self.assertEqual(self.store.boxes, {})

    def test_dataAfterBDAT(self) -> None:
        """
        DATA in a transaction that has BDAT chunks is refused (503 5.5.1);
        the transaction goes on.
        """
        out = self.feed(CHUNK_MAIL + bdat(HEADERS, last=False) + b"DATA\r\n" + bdat(b"\r\nbody\r\n"))
        self.assertEqual(
            queuedReply(out),
            CHUNK_ENVELOPE
            + b"250 2.0.0 %d octets received\r\n" % len(HEADERS)
            + b"503 5.5.1 Error: DATA not allowed after BDAT\r\n"
            + b"250 2.0.0 OK queued as ID\r\n",
        )
        self.assertEqual(self.stored(), [HEADERS + b"\r\nbody\r\n"])

    def test_rcptAfterBDAT(self) -> None:
        """
        RCPT after a BDAT chunk is out of sequence.
        """
        out = self.feed(CHUNK_MAIL + bdat(HEADERS, last=False) + b"RCPT TO:<alice@example.org>\r\n")
        self.assertEqual(out, CHUNK_ENVELOPE + b"250 2.0.0 %d octets received\r\n" % len(HEADERS) + b"503 5.5.1 Error: bad sequence of commands\r\n")

    def test_withoutMail(self) -> None:
        """
        BDAT without MAIL is refused (503) once its chunk, which may look
        like commands, has been read and discarded.
        """
        self.assertEqual(self.feed(bdat(b"NOOP\r\n") + b"NOOP\r\n"), b"503 5.5.1 Error: need MAIL command\r\n250 2.0.0 OK\r\n")

    def test_withoutRecipients(self) -> None:
        """
        BDAT without an accepted RCPT is refused (503), its chunk
        discarded.
        """
        out = self.feed(b"MAIL FROM:<alice@example.org>\r\n" + bdat(b"NOOP\r\n") + b"NOOP\r\n")
        self.assertEqual(out, b"250 2.1.0 OK\r\n503 5.5.1 Error: need RCPT command\r\n250 2.0.0 OK\r\n")

    def test_beforeAuthentication(self) -> None:
        """
        Before AUTH, BDAT gets 530 and its chunk is discarded.
        """
        SessionMixin.setUp(self)
        self.connect()
        out = self.feed(b"EHLO client.example\r\n")
        out = self.feed(bdat(b"NOOP\r\n") + b"NOOP\r\n")
        self.assertEqual(out, b"530 5.7.0 Authentication required\r\n250 2.0.0 OK\r\n")

    def test_badArgumentsKeepSync(self) -> None:
        """
        A BDAT line with a valid size but a bad argument gets 501 and its
        chunk is discarded by count.
        """
        out = self.feed(CHUNK_MAIL + b"BDAT 6 FIRST\r\nNOOP\r\nNOOP\r\n")
        self.assertEqual(out, CHUNK_ENVELOPE + b"501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n250 2.0.0 OK\r\n")

    def test_unparsableSizeCloses(self) -> None:
        """
        A BDAT line whose size cannot be read gets 501 and the connection
        is closed: the framing is lost.
        """
        for line in (b"BDAT abc\r\n", b"BDAT\r\n", b"BDAT -1 LAST\r\n", b"BDAT " + b"9" * 30 + b"\r\n"):
            SessionMixin.setUp(self)
            self.connect()
            self.login()
            out = self.feed(CHUNK_MAIL + line + b"NOOP\r\n")
            self.assertEqual(out, CHUNK_ENVELOPE + b"501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n", line)
            self.assertTrue(self.transport.disconnecting, line)

    def test_emptyLastChunk(self) -> None:
        """
        C{BDAT 0 LAST} ends a message sent in earlier chunks.
        """
        out = self.feed(CHUNK_MAIL + bdat(HEADERS + b"\r\nbody\r\n", last=False) + bdat(b""))
        self.assertEqual(
            queuedReply(out),
            CHUNK_ENVELOPE + b"250 2.0.0 %d octets received\r\n" % (len(HEADERS) + 8) + b"250 2.0.0 OK queued as ID\r\n",
        )
        self.assertEqual(self.stored(), [HEADERS + b"\r\nbody\r\n"])

    def test_rsetAbortsChunks(self) -> None:
        """
        RSET after some chunks aborts the delivery; nothing is stored.
        """
        out = self.feed(CHUNK_MAIL + bdat(HEADERS, last=False) + b"RSET\r\n")
        self.assertEqual(out, CHUNK_ENVELOPE + b"250 2.0.0 %d octets received\r\n" % len(HEADERS) + b"250 2.0.0 OK\r\n")
        self.assertEqual(self.store.deliveries[0].state, "aborted")
        self.assertEqual(self.store.boxes, {})

    def test_replyOnlyAfterCommit(self) -> None:
        """
        The reply to BDAT LAST waits for the commit; commands pipelined
        after it wait too.
        """
        committed = defer.Deferred()

        @implementer(IDelivery)
        class Slow(FakeDelivery):
            def commit(self):
                self.state = "committing"
                return committed

        delivery = Slow(lambda data: None)
        self.realm.avatars[0].beginDelivery = lambda sender, recipients, trace=b"", **kw: delivery
        self.assertEqual(self.feed(CHUNK_MAIL + bdat(HEADERS + b"\r\nHello\r\n") + b"NOOP\r\n"), CHUNK_ENVELOPE)
        committed.callback(None)
        self.assertEqual(queuedReply(self.transport.value()), b"250 2.0.0 OK queued as ID\r\n250 2.0.0 OK\r\n")


class SMTPUTF8Tests(SessionMixin, SynchronousTestCase):
    """
    SMTPUTF8 (RFC 6531/6532) on submission.
    """

    def setUp(self) -> None:
        super().setUp()
        self.connect()
        self.login()

    def test_utf8RecipientQueuedWithFlag(self) -> None:
        """
        With C{SMTPUTF8} on MAIL a UTF-8 recipient is accepted; the message,
        UTF-8 headers included, is queued unchanged and its entry says it
        needs SMTPUTF8.
        """
        message = "From: alice@example.org\r\nTo: J\u00f6rg <j\u00f6rg@m\u00fcnchen.example>\r\nSubject: gr\u00fc\u00df\r\n".encode(
            "utf-8"
        ) + b"Message-ID: <1@x>\r\nDate: " + NOW_TEXT + "\r\n\r\n\u00e4\r\n".encode("utf-8")
        out = self.feed(
            "MAIL FROM:<alice@example.org> SMTPUTF8\r\nRCPT TO:<j\u00f6rg@m\u00fcnchen.example>\r\nDATA\r\n".encode("utf-8")
            + message
            + b".\r\n"
        )
        self.assertEqual(
            queuedReply(out),
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 OK queued as ID\r\n",
        )
        [(sender, recipients, data)] = self.queue.entries
        self.assertEqual(recipients, [Address.parse("j\u00f6rg@xn--mnchen-3ya.example")])
        self.assertEqual(withoutReceived(data), message)
        self.assertEqual(self.queue.smtputf8, [True])
        self.assertRegex(data, rb"^Received: from client.example \(authenticated user\) by mail.example.org \(pop3gw\) with UTF8SMTPA id ")

    def test_asciiTransactionNotFlagged(self) -> None:
        """
        Without the parameter the queue entry does not ask for SMTPUTF8.
        """
        self.feed(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<carol@remote.example>\r\nDATA\r\n" + HEADERS + b"\r\nx\r\n.\r\n")
        self.assertEqual(self.queue.smtputf8, [False])

    def test_nonASCIIWithoutParameter(self) -> None:
        """
        Without C{SMTPUTF8}, a non-ASCII sender or recipient is refused with
        553 5.6.7.
        """
        self.assertEqual(
            self.feed("MAIL FROM:<\u00e4lice@example.org>\r\n".encode("utf-8")),
            b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n",
        )
        self.assertEqual(
            self.feed("MAIL FROM:<alice@example.org>\r\nRCPT TO:<j\u00f6rg@remote.example>\r\n".encode("utf-8")),
            b"250 2.1.0 OK\r\n553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n",
        )

    def test_utf8SenderStillOwned(self) -> None:
        """
        With SMTPUTF8, a UTF-8 sender the user does not own is refused as
        any other.
        """
        self.assertEqual(
            self.feed("MAIL FROM:<\u00e4lice@example.org> SMTPUTF8\r\n".encode("utf-8")),
            b"553 5.7.1 Sender address not owned by user\r\n",
        )
