# -*- test-case-name: tests.test_pop3 -*-
"""
Tests for L{pop3gw.pop3}: the POP3 server protocol and factory.
"""

from __future__ import annotations

import base64
import io
import weakref

import twisted.test
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pop3gw.address import Address
from pop3gw.credentials import ClientCredentials
from pop3gw.interfaces import (
    AuthenticationBusy,
    InsufficientStorage,
    IPOP3Avatar,
    PermanentFailure,
    TemporaryFailure,
)
from pop3gw.maildir import MaildirStore
from pop3gw.pop3 import (
    CLOSE_TIMEOUT,
    MAX_PENDING_INPUT,
    READ_CHUNK_SIZE,
    POP3Factory,
    _DotStuffer,
    _TopFilter,
)
from pop3gw.pop3transaction import READ_AHEAD_MAX_SIZE
from pop3gw.testing import FakeMaildropStore, FakePOP3Avatar

ALICE = Address("alice", "example.org")
PEER = IPv4Address("TCP", "192.0.2.7", 40000)

MSG1 = b"From: bob@example.net\r\nSubject: one\r\n\r\nHello\r\n"
MSG2 = b"Subject: two\r\n\r\n.dot line\r\n..two dots\r\n.\r\nend\r\n"
MSG3 = b"Subject: three\r\n\r\nbody\r\n"

CAPA_PLAINTEXT = (
    b"+OK Capability list follows.\r\n"
    b"TOP\r\nUSER\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
    b"EXPIRE NEVER\r\nLOGIN-DELAY 0\r\nSASL PLAIN\r\nIMPLEMENTATION pop3gw\r\n.\r\n"
)
CAPA_NO_PLAINTEXT = (
    b"+OK Capability list follows.\r\n"
    b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
    b"EXPIRE NEVER\r\nLOGIN-DELAY 0\r\nIMPLEMENTATION pop3gw\r\n.\r\n"
)
LOGGED_IN = b"+OK Send PASS.\r\n+OK Logged in.\r\n"


def always(secure: bool, peerHost: str) -> bool:
    return True


def never(secure: bool, peerHost: str) -> bool:
    return False


def tlsOnly(secure: bool, peerHost: str) -> bool:
    return secure


def plain(authzid: bytes, authcid: bytes, password: bytes) -> bytes:
    """
    A base64 SASL PLAIN response.
    """
    return base64.b64encode(authzid + b"\x00" + authcid + b"\x00" + password)


class _RecordingStore(FakeMaildropStore):
    """
    A L{FakeMaildropStore} that remembers the maildrops it opened.
    """

    def __init__(self) -> None:
        super().__init__()
        self.opened: list = []

    def openMaildrop(self, address):
        d = super().openMaildrop(address)
        d.addCallback(self._opened)
        return d

    def _opened(self, maildrop):
        # A list that can be watched with a weak reference.
        maildrop.messages = _Messages(maildrop.messages)
        self.opened.append(maildrop)
        return maildrop


class _Messages(list):
    """
    A maildrop's C{messages}, which a weak reference can watch.
    """


@implementer(IRealm)
class _Realm:
    """
    Hands out L{FakePOP3Avatar}s and counts logouts.
    """

    def __init__(self, store) -> None:
        self.store = store
        self.logins = 0
        self.logouts = 0
        self.openFailure = None

    def requestAvatar(self, avatarId, mind, *interfaces):
        assert IPOP3Avatar in interfaces
        self.logins += 1
        avatar = FakePOP3Avatar(Address.parse(avatarId), self.store)
        if self.openFailure is not None:
            failure = self.openFailure
            avatar.openMaildrop = lambda: defer.fail(failure)
        return IPOP3Avatar, avatar, self._logout

    def _logout(self) -> None:
        self.logouts += 1


class _DeferredChecker:
    """
    A checker whose answers the test gives by firing C{self.pending}.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.pending: list = []

    def requestAvatarId(self, credentials):
        d = defer.Deferred()
        self.pending.append((credentials, d))
        return d


@implementer(ITLSTransport)
class _StartTLSTransport(StringTransport):
    """
    A L{StringTransport} that records C{startTLS} calls.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tlsStarted: list = []

    def startTLS(self, contextFactory, normal=True) -> None:
        self.tlsStarted.append(contextFactory)


@implementer(ISSLTransport)
class _SecureTransport(StringTransport):
    """
    A L{StringTransport} that says it is TLS (implicit TLS).
    """


class _PausingTransport(StringTransport):
    """
    A L{StringTransport} that, once C{pausing} is set, pauses its streaming
    producer after each write, like a TCP transport whose buffer is full.
    """

    pausing = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list = []

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes.append(data)
        if self.pausing and self.producer is not None and self.streaming:
            self.producer.pauseProducing()


class _TrackedFile(io.BytesIO):
    """
    A message file that can fail on read.
    """

    failAfter = None

    def read(self, n: int = -1) -> bytes:
        if self.failAfter is not None and self.tell() >= self.failAfter:
            raise OSError("disk on fire: secret detail")
        return super().read(n)


class _Harness(SynchronousTestCase):
    """
    Builds a L{POP3Server} over a L{StringTransport} with a real portal, a
    realm of L{FakePOP3Avatar}s and an in-memory checker.
    """

    def setUp(self) -> None:
        self.store = _RecordingStore()
        self.store.add(ALICE, MSG1, uid="u1")
        self.store.add(ALICE, MSG2, uid="u2")
        self.store.add(ALICE, MSG3, uid="u3")
        self.realm = _Realm(self.store)
        self.checker = InMemoryUsernamePasswordDatabaseDontUse()
        self.checker.addUser(b"alice@example.org", b"secret")
        self.portal = Portal(self.realm, [self.checker])
        self.clock = task.Clock()
        self.events: list = []

    def connect(self, policy=always, tls=None, transport=None, portal=None, idleTimeout=600, loginTimeout=None):
        factory = POP3Factory(
            portal or self.portal,
            policy,
            self.clock,
            tlsContextFactory=tls,
            idleTimeout=idleTimeout,
            loginTimeout=loginTimeout,
        )
        self.proto = factory.buildProtocol(PEER)
        self.proto.log = Logger(observer=self.events.append)
        self.transport = transport if transport is not None else StringTransport(peerAddress=PEER)
        self.proto.makeConnection(self.transport)
        return self.proto

    def send(self, data: bytes) -> bytes:
        """
        Deliver C{data} and return what the server wrote in response.
        """
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.transport.value()

    def login(self, **kwargs):
        self.connect(**kwargs)
        self.assertEqual(self.send(b"USER alice@example.org\r\nPASS secret\r\n"), LOGGED_IN)
        if isinstance(self.transport, _PausingTransport):
            self.transport.pausing = True
        return self.store.opened[-1]

    def logLines(self) -> list:
        return [formatEvent(e) for e in self.events]

    def failures(self) -> list:
        return [e["log_failure"] for e in self.events if "log_failure" in e]

    def drain(self) -> int:
        """
        Resume the registered producer until the transport is no longer
        paused (all output written).

        @return: how many times it was resumed.
        """
        count = 0
        while self.transport.producer is not None and self.proto._output.paused:
            self.transport.producer.resumeProducing()
            count += 1
            self.assertLess(count, 10000)
        return count


class GreetingAndCapabilityTests(_Harness):
    def test_greeting(self) -> None:
        """
        The greeting is C{+OK <implementation> ready.} without an APOP
        timestamp.
        """
        self.connect()
        self.assertEqual(self.transport.value(), b"+OK pop3gw ready.\r\n")

    def test_greetingImplementation(self) -> None:
        """
        The factory's C{implementation} is used in the greeting and CAPA.
        """
        factory = POP3Factory(self.portal, always, self.clock, implementation="pop3gw 1.2")
        proto = factory.buildProtocol(PEER)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertEqual(transport.value(), b"+OK pop3gw 1.2 ready.\r\n")
        transport.clear()
        proto.dataReceived(b"CAPA\r\n")
        self.assertIn(b"\r\nIMPLEMENTATION pop3gw 1.2\r\n.\r\n", transport.value())

    def test_capaPlaintextAllowed(self) -> None:
        """
        When the policy allows plaintext, CAPA lists USER and SASL PLAIN.
        """
        self.connect(policy=always)
        self.assertEqual(self.send(b"CAPA\r\n"), CAPA_PLAINTEXT)

    def test_capaPlaintextRefused(self) -> None:
        """
        When the policy refuses plaintext, CAPA lists neither USER nor SASL.
        """
        self.connect(policy=never)
        self.assertEqual(self.send(b"CAPA\r\n"), CAPA_NO_PLAINTEXT)

    def test_policyArguments(self) -> None:
        """
        The policy is asked with the TLS state and the peer's host.
        """
        calls = []

        def policy(secure, host):
            calls.append((secure, host))
            return False

        self.connect(policy=policy)
        self.send(b"CAPA\r\n")
        self.assertEqual(set(calls), {(False, "192.0.2.7")})

    def test_capaSTLS(self) -> None:
        """
        With a TLS context factory and a transport that can start TLS, CAPA
        offers STLS; with the C{tlsOnly} policy, not USER nor SASL yet.
        """
        self.connect(policy=tlsOnly, tls=object(), transport=_StartTLSTransport(peerAddress=PEER))
        self.assertEqual(
            self.send(b"CAPA\r\n"),
            CAPA_NO_PLAINTEXT.replace(b"IMPLEMENTATION", b"STLS\r\nIMPLEMENTATION"),
        )

    def test_capaNoSTLSWithoutContext(self) -> None:
        """
        Without a TLS context factory STLS is neither offered nor accepted.
        """
        self.connect(transport=_StartTLSTransport(peerAddress=PEER))
        self.assertEqual(self.send(b"CAPA\r\n"), CAPA_PLAINTEXT)
        self.assertEqual(self.send(b"STLS\r\n"), b"-ERR TLS not available.\r\n")
        self.assertEqual(self.transport.tlsStarted, [])

    def test_capaAfterLogin(self) -> None:
        """
        In the TRANSACTION state CAPA lists neither USER, SASL nor STLS.
        """
        self.login(tls=object(), transport=_StartTLSTransport(peerAddress=PEER))
        self.assertEqual(self.send(b"CAPA\r\n"), CAPA_NO_PLAINTEXT)

    def test_capaArguments(self) -> None:
        """
        CAPA takes no argument.
        """
        self.connect()
        self.assertEqual(self.send(b"CAPA x\r\n"), b"-ERR Invalid arguments.\r\n")


class UserPassTests(_Harness):
    def test_success(self) -> None:
        """
        USER then PASS with the right password logs in, opens the maildrop
        and logs the login line.
        """
        self.connect()
        self.assertEqual(self.send(b"USER alice@example.org\r\n"), b"+OK Send PASS.\r\n")
        self.assertEqual(self.send(b"PASS secret\r\n"), b"+OK Logged in.\r\n")
        self.assertEqual(len(self.store.opened), 1)
        self.assertEqual(self.proto.state, "TRANSACTION")
        self.assertIn(
            'login: service=pop3 rhost=192.0.2.7 user="alice@example.org" tls=no',
            self.logLines(),
        )

    def test_commandsCaseInsensitive(self) -> None:
        """
        Command names are case-insensitive.
        """
        self.connect()
        self.assertEqual(self.send(b"user alice@example.org\r\npAsS secret\r\nstat\r\n"), LOGGED_IN + b"+OK 3 %d\r\n" % (
            len(MSG1) + len(MSG2) + len(MSG3),
        ))

    def test_failure(self) -> None:
        """
        A wrong password gives one fixed C{[AUTH]} reply, logs the failure
        in the fail2ban format and forgets the USER.
        """
        self.connect()
        self.send(b"USER alice@example.org\r\n")
        self.assertEqual(self.send(b"PASS wrong\r\n"), b"-ERR [AUTH] Authentication failed.\r\n")
        self.assertEqual(self.proto.state, "AUTHORIZATION")
        self.assertIn(
            'authentication failed: service=pop3 rhost=192.0.2.7 user="alice@example.org" reason="bad credentials"',
            self.logLines(),
        )
        self.assertEqual(self.send(b"PASS secret\r\n"), b"-ERR Send USER first.\r\n")

    def test_unknownUser(self) -> None:
        """
        An unknown user gets the same reply as a wrong password.
        """
        self.connect()
        self.assertEqual(
            self.send(b"USER nobody@example.org\r\nPASS secret\r\n"),
            b"+OK Send PASS.\r\n-ERR [AUTH] Authentication failed.\r\n",
        )

    def test_passwordWithSpaces(self) -> None:
        """
        PASS takes the rest of the line verbatim, spaces included.
        """
        self.checker.addUser(b"bob@example.org", b" correct horse  battery ")
        self.connect()
        self.assertEqual(
            self.send(b"USER bob@example.org\r\nPASS  correct horse  battery \r\n"),
            LOGGED_IN,
        )

    def test_passWithoutUser(self) -> None:
        """
        PASS before USER is refused without asking the portal.
        """
        self.connect()
        self.assertEqual(self.send(b"PASS secret\r\n"), b"-ERR Send USER first.\r\n")
        self.assertEqual(self.realm.logins, 0)

    def test_userArguments(self) -> None:
        """
        USER takes exactly one argument.
        """
        self.connect()
        self.assertEqual(
            self.send(b"USER\r\nUSER a b\r\n"),
            b"-ERR Invalid arguments.\r\n-ERR Invalid arguments.\r\n",
        )

    def test_plaintextRefused(self) -> None:
        """
        When the policy refuses plaintext, USER and PASS get the C{[AUTH]}
        refusal and the portal is never asked.
        """
        self.connect(policy=never)
        err = b"-ERR [AUTH] Plaintext authentication disallowed on non-encrypted connections.\r\n"
        self.assertEqual(self.send(b"USER alice@example.org\r\nPASS secret\r\n"), err + err)
        self.assertEqual(self.realm.logins, 0)
        self.assertEqual(self.proto.state, "AUTHORIZATION")

    def test_plaintextRefusedLogged(self) -> None:
        """
        Each plaintext login the policy refuses (a USER and the PASS after
        it) is logged as one warn line naming the user of the refused USER,
        not as a failed login (which fail2ban would count), and the
        password never appears in the log; the next USER and PASS are the
        next attempt, with its own line.
        """
        self.connect(policy=never)
        err = b"-ERR [AUTH] Plaintext authentication disallowed on non-encrypted connections.\r\n"
        self.assertEqual(self.send(b"USER alice@example.org\r\nPASS s3cret-pw\r\n"), err * 2)
        self.assertEqual(self.send(b"USER bob@example.org\r\nPASS s3cret-pw\r\n"), err * 2)
        self.assertEqual(
            [(e["log_level"], formatEvent(e)) for e in self.events],
            [
                (LogLevel.warn, f'login refused: service=pop3 rhost=192.0.2.7 user="{user}"'
                                ' reason="plaintext authentication disallowed"')
                for user in ("alice@example.org", "bob@example.org")
            ],
        )
        self.assertNotIn("s3cret-pw", repr(self.events))

    def test_plaintextRefusedPassAlone(self) -> None:
        """
        A PASS refused by the policy without a USER before it is logged
        with an empty user.
        """
        self.connect(policy=never)
        self.send(b"PASS s3cret-pw\r\n")
        self.assertEqual(
            self.logLines(),
            ['login refused: service=pop3 rhost=192.0.2.7 user="" reason="plaintext authentication disallowed"'],
        )
        self.assertNotIn("s3cret-pw", repr(self.events))

    def test_tooManyFailures(self) -> None:
        """
        The third failed login closes the connection.
        """
        self.connect()
        out = self.send(b"USER alice@example.org\r\nPASS a\r\n" * 3 + b"CAPA\r\n")
        self.assertEqual(
            out,
            (b"+OK Send PASS.\r\n-ERR [AUTH] Authentication failed.\r\n" * 2)
            + b"+OK Send PASS.\r\n-ERR [AUTH] Too many authentication failures, closing connection.\r\n",
        )
        self.assertTrue(self.transport.disconnecting)

    def test_inUse(self) -> None:
        """
        A locked maildrop gives C{[IN-USE]}, logs the avatar out and keeps
        the session in AUTHORIZATION.
        """
        self.store.locked.add(ALICE)
        self.connect()
        self.assertEqual(
            self.send(b"USER alice@example.org\r\nPASS secret\r\n"),
            b"+OK Send PASS.\r\n-ERR [IN-USE] Mailbox is locked by another session.\r\n",
        )
        self.assertEqual(self.realm.logouts, 1)
        self.assertEqual(self.proto.state, "AUTHORIZATION")
        self.store.locked.clear()
        self.assertEqual(self.send(b"USER alice@example.org\r\nPASS secret\r\n"), LOGGED_IN)

    def test_inUseLogged(self) -> None:
        """
        A locked maildrop is logged once, at info level, with the peer and
        the user whose maildrop is in use.
        """
        self.store.locked.add(ALICE)
        self.connect()
        self.send(b"USER alice@example.org\r\nPASS secret\r\n")
        self.assertEqual(
            [(e["log_level"], formatEvent(e)) for e in self.events],
            [(LogLevel.info, 'maildrop in use: service=pop3 rhost=192.0.2.7 user="alice@example.org"')],
        )

    def test_maildropTemporaryFailure(self) -> None:
        """
        A L{TemporaryFailure} opening the maildrop gives C{[SYS/TEMP]}
        without its text and logs out.
        """
        self.realm.openFailure = TemporaryFailure("secret detail")
        self.connect()
        out = self.send(b"USER alice@example.org\r\nPASS secret\r\n")
        self.assertEqual(out, b"+OK Send PASS.\r\n-ERR [SYS/TEMP] Mailbox temporarily unavailable.\r\n")
        self.assertEqual(self.realm.logouts, 1)

    def test_maildropPermanentFailure(self) -> None:
        """
        A L{PermanentFailure} opening the maildrop gives RFC 3206's
        C{[SYS/PERM]} without its text, is logged as a warning (not as a
        server fault) and logs out.
        """
        self.realm.openFailure = PermanentFailure("secret detail")
        self.connect()
        out = self.send(b"USER alice@example.org\r\nPASS secret\r\n")
        self.assertEqual(out, b"+OK Send PASS.\r\n-ERR [SYS/PERM] Mailbox unavailable.\r\n")
        self.assertEqual(self.realm.logouts, 1)
        self.assertEqual(self.failures(), [])
        self.assertIn("maildrop refused: rhost=192.0.2.7 error=secret detail", self.logLines())

    def test_maildropUnexpectedError(self) -> None:
        """
        An unexpected error opening the maildrop is logged as a failure and
        answered with C{[SYS/TEMP]}, never with its text.
        """
        self.realm.openFailure = RuntimeError("secret detail")
        self.connect()
        out = self.send(b"USER alice@example.org\r\nPASS secret\r\n")
        self.assertEqual(out, b"+OK Send PASS.\r\n-ERR [SYS/TEMP] Mailbox temporarily unavailable.\r\n")
        self.assertEqual([f.type for f in self.failures()], [RuntimeError])

    def test_checkerTemporaryFailure(self) -> None:
        """
        A checker failing with L{TemporaryFailure} gives C{[SYS/TEMP]} and
        does not count as a failed login.
        """
        checker = _DeferredChecker()
        self.connect(portal=Portal(self.realm, [checker]))
        self.send(b"USER alice@example.org\r\nPASS secret\r\n")
        self.transport.clear()
        checker.pending[0][1].errback(TemporaryFailure("users file unreadable"))
        self.assertEqual(self.transport.value(), b"-ERR [SYS/TEMP] Authentication temporarily unavailable.\r\n")
        self.assertFalse(any("authentication failed" in line for line in self.logLines()))

    def test_loginInFlight(self) -> None:
        """
        Commands pipelined behind PASS wait until the login is decided and
        are then answered in order.
        """
        checker = _DeferredChecker()
        self.connect(portal=Portal(self.realm, [checker]))
        out = self.send(b"USER alice@example.org\r\nPASS secret\r\nSTAT\r\nNOOP\r\n")
        self.assertEqual(out, b"+OK Send PASS.\r\n")
        (creds, d), = checker.pending
        self.assertEqual((creds.username, creds.password), (b"alice@example.org", b"secret"))
        self.transport.clear()
        d.callback(b"alice@example.org")
        self.assertEqual(
            self.transport.value(),
            b"+OK Logged in.\r\n+OK 3 %d\r\n+OK\r\n" % (len(MSG1) + len(MSG2) + len(MSG3),),
        )

    def test_connectionLostDuringLogin(self) -> None:
        """
        If the client goes away while the login is in flight, the maildrop
        opened afterwards is released and the avatar logged out.
        """
        checker = _DeferredChecker()
        self.connect(portal=Portal(self.realm, [checker]))
        self.send(b"USER alice@example.org\r\nPASS secret\r\n")
        self.proto.connectionLost(Failure(ConnectionError()))
        checker.pending[0][1].callback(b"alice@example.org")
        self.assertEqual(self.realm.logouts, 1)
        self.assertEqual(self.store.locked, set())


    def test_bugAfterMaildropOpenedReleasesIt(self) -> None:
        """
        An unexpected error while taking over a freshly opened maildrop is
        answered with C{[SYS/TEMP]} and closes the session, and the maildrop
        is released when the connection goes, so its lock is not held for
        ever.
        """

        class Broken:
            def __iter__(self):
                raise RuntimeError("bug")

        def breakIt(maildrop):
            maildrop.messages = Broken()
            return maildrop

        openMaildrop = self.store.openMaildrop
        self.store.openMaildrop = lambda address: openMaildrop(address).addCallback(breakIt)
        self.connect()
        out = self.send(b"USER alice@example.org\r\nPASS secret\r\n")
        self.assertEqual(out, b"+OK Send PASS.\r\n-ERR [SYS/TEMP] Internal error.\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.proto.connectionLost(Failure(ConnectionError()))
        self.assertEqual(self.store.locked, set())
        self.assertEqual(self.realm.logouts, 1)
        self.assertEqual([f.type for f in self.failures()], [RuntimeError])

    def test_failedLoginLoggedAfterHangUp(self) -> None:
        """
        A client that hangs up right after PASS, before the (delayed)
        failure comes back, still gets its failed attempt logged for
        fail2ban.
        """
        checker = _DeferredChecker()
        self.connect(portal=Portal(self.realm, [checker]))
        self.send(b"USER alice@example.org\r\nPASS guess\r\n")
        self.proto.connectionLost(Failure(ConnectionError()))
        checker.pending[0][1].errback(UnauthorizedLogin())
        self.assertIn(
            'authentication failed: service=pop3 rhost=192.0.2.7 user="alice@example.org" reason="bad credentials"',
            self.logLines(),
        )

    def test_closedDuringLogin(self) -> None:
        """
        If the session is closed (idle timeout) while the login is in
        flight, a login that succeeds afterwards sends nothing more, logs
        no login, releases the maildrop and logs the avatar out.
        """
        checker = _DeferredChecker()
        self.connect(portal=Portal(self.realm, [checker]))
        self.send(b"USER alice@example.org\r\nPASS secret\r\n")
        self.transport.clear()
        self.clock.advance(600)
        self.assertEqual(self.transport.value(), b"-ERR Idle timeout, closing connection.\r\n")
        checker.pending[0][1].callback(b"alice@example.org")
        self.assertEqual(self.transport.value(), b"-ERR Idle timeout, closing connection.\r\n")
        self.assertEqual(self.store.locked, set())
        self.assertEqual(self.realm.logouts, 1)
        self.assertFalse(any(line.startswith("login:") for line in self.logLines()))
        self.proto.connectionLost(Failure(ConnectionError()))
        self.assertEqual(self.realm.logouts, 1)


class _RaisingChecker:
    """
    A checker whose every answer is the failure it was given.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, exception: Exception) -> None:
        self.exception = exception

    def requestAvatarId(self, credentials):
        return defer.fail(self.exception)


class LoginErrorTests(_Harness):
    """
    Every way the checker (or the portal) can fail a login has one fixed
    reply and one kind of log line, and a client that hung up is logged the
    same way.
    """

    def attempt(self, portal) -> tuple:
        """
        USER/PASS as alice against C{portal}.

        @return: the reply to PASS and the C{(level, text)} of each log
            event.
        """
        self.connect(portal=portal)
        self.send(b"USER alice@example.org\r\n")
        del self.events[:]
        out = self.send(b"PASS secret\r\n")
        return out, [(e["log_level"].name, formatEvent(e)) for e in self.events]

    def test_unauthorizedLogin(self) -> None:
        """
        L{UnauthorizedLogin} is a failed login: C{[AUTH]} and the line
        fail2ban matches.
        """
        out, lines = self.attempt(Portal(self.realm, [_RaisingChecker(UnauthorizedLogin())]))
        self.assertEqual(out, b"-ERR [AUTH] Authentication failed.\r\n")
        self.assertEqual(
            lines,
            [("warn", 'authentication failed: service=pop3 rhost=192.0.2.7 user="alice@example.org"'
              ' reason="bad credentials"')],
        )

    def test_unhandledCredentials(self) -> None:
        """
        A portal without a checker for the credentials fails the login like
        wrong credentials.
        """
        out, lines = self.attempt(Portal(self.realm, []))
        self.assertEqual(out, b"-ERR [AUTH] Authentication failed.\r\n")
        self.assertEqual([level for level, _ in lines], ["warn"])
        self.assertTrue(lines[0][1].startswith("authentication failed: "), lines)

    def test_temporaryFailure(self) -> None:
        """
        L{TemporaryFailure} gets C{[SYS/TEMP]} and one warn line with its
        server-side reason, in the same format as submission's.
        """
        out, lines = self.attempt(Portal(self.realm, [_RaisingChecker(TemporaryFailure("users file unreadable"))]))
        self.assertEqual(out, b"-ERR [SYS/TEMP] Authentication temporarily unavailable.\r\n")
        self.assertEqual(
            lines,
            [("warn", 'authentication unavailable: service=pop3 rhost=192.0.2.7 user="alice@example.org"'
              ' error="users file unreadable"')],
        )

    def test_authenticationBusy(self) -> None:
        """
        L{AuthenticationBusy} (the client's share of password checks is used
        up) gets C{[SYS/TEMP]} and no log line: the checker logs such
        refusals sparingly, a flood must not flood the log.
        """
        out, lines = self.attempt(Portal(self.realm, [_RaisingChecker(AuthenticationBusy("share used up"))]))
        self.assertEqual(out, b"-ERR [SYS/TEMP] Authentication temporarily unavailable.\r\n")
        self.assertEqual(lines, [])

    def test_credentialsNameClient(self) -> None:
        """
        The credentials handed to the portal name the client, so the
        checker can account for its checks.
        """
        checker = _DeferredChecker()
        self.connect(portal=Portal(self.realm, [checker]))
        self.send(b"USER alice@example.org\r\nPASS secret\r\n")
        [(creds, _)] = checker.pending
        self.assertIsInstance(creds, ClientCredentials)
        self.assertEqual((creds.username, creds.password, creds.peer), (b"alice@example.org", b"secret", "192.0.2.7"))

    def test_serverFault(self) -> None:
        """
        Any other exception is a server fault: logged with its traceback,
        answered C{[SYS/TEMP]} without its text.
        """
        out, lines = self.attempt(Portal(self.realm, [_RaisingChecker(RuntimeError("secret detail"))]))
        self.assertEqual(out, b"-ERR [SYS/TEMP] Authentication temporarily unavailable.\r\n")
        self.assertEqual([level for level, _ in lines], ["critical"])
        self.assertEqual([f.type for f in self.failures()], [RuntimeError])

    def test_afterHangUp(self) -> None:
        """
        A client that hung up before the answer gets nothing, and its
        attempt is logged as for a client that waited.
        """
        for exception, level, start in [
            (UnauthorizedLogin(), "warn", "authentication failed: "),
            (TemporaryFailure("users file unreadable"), "warn", "authentication unavailable: "),
        ]:
            checker = _DeferredChecker()
            self.connect(portal=Portal(self.realm, [checker]))
            self.send(b"USER alice@example.org\r\nPASS secret\r\n")
            self.proto.connectionLost(Failure(ConnectionError()))
            self.transport.clear()
            del self.events[:]
            checker.pending[0][1].errback(exception)
            self.assertEqual(self.transport.value(), b"")
            lines = [(e["log_level"].name, formatEvent(e)) for e in self.events]
            self.assertEqual([level for level, _ in lines], [level])
            self.assertTrue(lines[0][1].startswith(start), lines)


class SASLTests(_Harness):
    def test_listMechanisms(self) -> None:
        """
        C{AUTH} alone lists PLAIN when plaintext is allowed.
        """
        self.connect()
        self.assertEqual(self.send(b"AUTH\r\n"), b"+OK Supported mechanisms follow.\r\nPLAIN\r\n.\r\n")

    def test_listMechanismsRefused(self) -> None:
        """
        C{AUTH} alone lists nothing when plaintext is refused, and AUTH
        PLAIN is refused with C{[AUTH]}.
        """
        self.connect(policy=never)
        self.assertEqual(self.send(b"AUTH\r\n"), b"+OK Supported mechanisms follow.\r\n.\r\n")
        self.assertEqual(
            self.send(b"AUTH PLAIN " + plain(b"", b"alice@example.org", b"secret") + b"\r\n"),
            b"-ERR [AUTH] Plaintext authentication disallowed on non-encrypted connections.\r\n",
        )
        self.assertEqual(self.realm.logins, 0)

    def test_plaintextRefusedLogged(self) -> None:
        """
        An AUTH PLAIN the policy refuses is logged as one warn line with
        the authentication identity of its initial response, if it has a
        well-formed one, and never the password; the refusal is not a
        failed login.
        """
        self.connect(policy=never)
        self.send(b"AUTH PLAIN " + plain(b"", b"alice@example.org", b"s3cret-pw") + b"\r\n")
        self.send(b"AUTH PLAIN\r\n")
        self.send(b"AUTH PLAIN " + base64.b64encode(b"alice\x00s3cret-pw") + b"\r\n")
        self.send(b"AUTH PLAIN !!!\r\n")
        self.assertEqual(
            [(e["log_level"], formatEvent(e)) for e in self.events],
            [
                (
                    LogLevel.warn,
                    'login refused: service=pop3 rhost=192.0.2.7 user="alice@example.org"'
                    ' reason="plaintext authentication disallowed"',
                )
            ]
            + [
                (
                    LogLevel.warn,
                    'login refused: service=pop3 rhost=192.0.2.7 user="" reason="plaintext authentication disallowed"',
                )
            ]
            * 3,
        )
        self.assertNotIn("s3cret-pw", repr(self.events))

    def test_initialResponse(self) -> None:
        """
        C{AUTH PLAIN <initial-response>} logs in.
        """
        self.connect()
        out = self.send(b"AUTH PLAIN " + plain(b"", b"alice@example.org", b"secret") + b"\r\n")
        self.assertEqual(out, b"+OK Logged in.\r\n")
        self.assertEqual(self.proto.state, "TRANSACTION")

    def test_authzidEqual(self) -> None:
        """
        An authorization identity equal to the authentication identity is
        accepted; the mechanism name is case-insensitive.
        """
        self.connect()
        out = self.send(b"auth plain " + plain(b"alice@example.org", b"alice@example.org", b"secret") + b"\r\n")
        self.assertEqual(out, b"+OK Logged in.\r\n")

    def test_authzidDifferent(self) -> None:
        """
        An authorization identity naming someone else is refused without
        asking the portal.
        """
        self.connect()
        out = self.send(b"AUTH PLAIN " + plain(b"bob@example.org", b"alice@example.org", b"secret") + b"\r\n")
        self.assertEqual(out, b"-ERR [AUTH] Authentication failed.\r\n")
        self.assertEqual(self.realm.logins, 0)

    def test_wrongPassword(self) -> None:
        """
        A wrong password over SASL gives the fixed C{[AUTH]} reply and the
        failure log line.
        """
        self.connect()
        out = self.send(b"AUTH PLAIN " + plain(b"", b"alice@example.org", b"bad") + b"\r\n")
        self.assertEqual(out, b"-ERR [AUTH] Authentication failed.\r\n")
        self.assertIn(
            'authentication failed: service=pop3 rhost=192.0.2.7 user="alice@example.org" reason="bad credentials"',
            self.logLines(),
        )

    def test_continuation(self) -> None:
        """
        C{AUTH PLAIN} without initial response gets a C{+ } continuation;
        the next line is the response.
        """
        self.connect()
        self.assertEqual(self.send(b"AUTH PLAIN\r\n"), b"+ \r\n")
        out = self.send(plain(b"", b"alice@example.org", b"secret") + b"\r\n")
        self.assertEqual(out, b"+OK Logged in.\r\n")

    def test_continuationLongResponse(self) -> None:
        """
        A continuation line may be longer than 255 octets (long address and
        password).
        """
        password = b"p" * 250
        self.checker.addUser(b"alice@example.org", password)
        self.connect()
        response = plain(b"", b"alice@example.org", password)
        self.assertGreater(len(response), 255)
        self.assertEqual(self.send(b"AUTH PLAIN\r\n" + response + b"\r\n"), b"+ \r\n+OK Logged in.\r\n")

    def test_cancel(self) -> None:
        """
        A C{*} line cancels the exchange with C{-ERR}; the session goes on.
        """
        self.connect()
        self.assertEqual(
            self.send(b"AUTH PLAIN\r\n*\r\nCAPA\r\n"),
            b"+ \r\n-ERR Authentication cancelled.\r\n" + CAPA_PLAINTEXT,
        )
        self.assertEqual(self.realm.logins, 0)

    def test_badBase64(self) -> None:
        """
        Invalid base64, initial or continued, gives C{-ERR}.
        """
        self.connect()
        self.assertEqual(self.send(b"AUTH PLAIN !!!!\r\n"), b"-ERR Invalid base64 data.\r\n")
        self.assertEqual(self.send(b"AUTH PLAIN\r\nnot base64!\r\n"), b"+ \r\n-ERR Invalid base64 data.\r\n")
        self.assertEqual(self.realm.logins, 0)

    def test_emptyInitialResponse(self) -> None:
        """
        An initial response of C{=} is an empty response, which is not a
        valid PLAIN message.
        """
        self.connect()
        self.assertEqual(self.send(b"AUTH PLAIN =\r\n"), b"-ERR [AUTH] Authentication failed.\r\n")
        self.assertEqual(self.realm.logins, 0)

    def test_unknownMechanism(self) -> None:
        """
        An unsupported mechanism gives C{-ERR}.
        """
        self.connect()
        self.assertEqual(self.send(b"AUTH CRAM-MD5\r\n"), b"-ERR Unsupported authentication mechanism.\r\n")

    def test_tooManyArguments(self) -> None:
        """
        AUTH with more than a mechanism and a response is a syntax error.
        """
        self.connect()
        self.assertEqual(self.send(b"AUTH PLAIN a b\r\n"), b"-ERR Invalid arguments.\r\n")

    def test_inUse(self) -> None:
        """
        SASL logins get C{[IN-USE]} for a locked maildrop, too.
        """
        self.store.locked.add(ALICE)
        self.connect()
        out = self.send(b"AUTH PLAIN " + plain(b"", b"alice@example.org", b"secret") + b"\r\n")
        self.assertEqual(out, b"-ERR [IN-USE] Mailbox is locked by another session.\r\n")
        self.assertEqual(self.realm.logouts, 1)


class TransactionTests(_Harness):
    def test_stat(self) -> None:
        """
        STAT gives the count and total size of the live messages.
        """
        self.login()
        total = len(MSG1) + len(MSG2) + len(MSG3)
        self.assertEqual(self.send(b"STAT\r\n"), b"+OK 3 %d\r\n" % (total,))
        self.send(b"DELE 2\r\n")
        self.assertEqual(self.send(b"STAT\r\n"), b"+OK 2 %d\r\n" % (len(MSG1) + len(MSG3),))

    def test_list(self) -> None:
        """
        LIST lists the live messages with their sizes; LIST n gives one;
        deleted messages are invisible.
        """
        self.login()
        self.assertEqual(
            self.send(b"LIST\r\n"),
            b"+OK 3 messages (%d octets)\r\n1 %d\r\n2 %d\r\n3 %d\r\n.\r\n"
            % (len(MSG1) + len(MSG2) + len(MSG3), len(MSG1), len(MSG2), len(MSG3)),
        )
        self.assertEqual(self.send(b"LIST 2\r\n"), b"+OK 2 %d\r\n" % (len(MSG2),))
        self.send(b"DELE 2\r\n")
        self.assertEqual(
            self.send(b"LIST\r\n"),
            b"+OK 2 messages (%d octets)\r\n1 %d\r\n3 %d\r\n.\r\n"
            % (len(MSG1) + len(MSG3), len(MSG1), len(MSG3)),
        )
        self.assertEqual(self.send(b"LIST 2\r\n"), b"-ERR Message already deleted.\r\n")
        self.assertEqual(self.send(b"LIST 4\r\n"), b"-ERR No such message.\r\n")

    def test_uidl(self) -> None:
        """
        UIDL lists the unique IDs of live messages; UIDL n gives one.
        """
        self.login()
        self.assertEqual(self.send(b"UIDL\r\n"), b"+OK Unique-ID listing follows.\r\n1 u1\r\n2 u2\r\n3 u3\r\n.\r\n")
        self.assertEqual(self.send(b"UIDL 3\r\n"), b"+OK 3 u3\r\n")
        self.send(b"DELE 1\r\n")
        self.assertEqual(self.send(b"UIDL\r\n"), b"+OK Unique-ID listing follows.\r\n2 u2\r\n3 u3\r\n.\r\n")
        self.assertEqual(self.send(b"UIDL 1\r\n"), b"-ERR Message already deleted.\r\n")

    def _listingKept(self, end) -> bool:
        """
        Log in with a maildrop whose C{messages} can be watched, run STAT,
        end the session with C{end()}, and tell whether the server still
        holds the listing.
        """

        maildrop = self.login()
        self.send(b"STAT\r\n")
        ref = weakref.ref(maildrop.messages)
        end()
        maildrop.messages = []
        return ref() is not None

    def test_listingDroppedAtQuit(self) -> None:
        """
        Once QUIT has committed, the server no longer holds the maildrop's
        listing (a large one is freed at once, not when the garbage
        collector gets to the connection's reference cycles).
        """
        self.assertFalse(self._listingKept(lambda: self.send(b"QUIT\r\n")))

    def test_listingDroppedAtHangUp(self) -> None:
        """
        A client that hangs up in the TRANSACTION state leaves no listing
        held either.
        """
        self.assertFalse(self._listingKept(lambda: self.proto.connectionLost(Failure(ConnectionDone()))))

    def test_emptyMaildrop(self) -> None:
        """
        An empty maildrop lists nothing.
        """
        self.store.boxes.clear()
        self.login()
        self.assertEqual(
            self.send(b"STAT\r\nLIST\r\nUIDL\r\n"),
            b"+OK 0 0\r\n+OK 0 messages (0 octets)\r\n.\r\n+OK Unique-ID listing follows.\r\n.\r\n",
        )

    def test_retr(self) -> None:
        """
        RETR sends C{+OK <size> octets}, the message and the C{.} line.
        """
        self.login()
        self.assertEqual(self.send(b"RETR 1\r\n"), b"+OK %d octets\r\n" % (len(MSG1),) + MSG1 + b".\r\n")

    def test_retrStuffing(self) -> None:
        """
        Lines beginning with C{.} (including C{..} and a lone C{.}) get one
        more C{.}.
        """
        self.login()
        self.assertEqual(
            self.send(b"RETR 2\r\n"),
            b"+OK %d octets\r\n" % (len(MSG2),)
            + b"Subject: two\r\n\r\n..dot line\r\n...two dots\r\n..\r\nend\r\n.\r\n",
        )

    def test_retrMessageStartingWithDot(self) -> None:
        """
        A message whose first line begins with C{.} is stuffed too.
        """
        self.store.boxes.clear()
        self.store.add(ALICE, b".x\r\n", uid="d")
        self.login()
        self.assertEqual(self.send(b"RETR 1\r\n"), b"+OK 4 octets\r\n..x\r\n.\r\n")

    def test_retrStuffingAtChunkBoundary(self) -> None:
        """
        A line beginning with C{.} exactly at the start of the second read
        chunk is stuffed.
        """
        head = b"Subject: big\r\n\r\n"
        first = head + b"x" * (READ_CHUNK_SIZE - len(head) - 2) + b"\r\n"
        self.assertEqual(len(first), READ_CHUNK_SIZE)
        self.store.boxes.clear()
        self.store.add(ALICE, first + b".hidden\r\n..two\r\n", uid="big")
        self.login()
        out = self.send(b"RETR 1\r\n")
        self.assertEqual(
            out,
            b"+OK %d octets\r\n" % (len(first) + 16,) + first + b"..hidden\r\n...two\r\n.\r\n",
        )

    def test_retrStuffingCRLFSplit(self) -> None:
        """
        A chunk boundary between the CR and the LF before a C{.} line does
        not stop stuffing.
        """
        head = b"Subject: big\r\n\r\n"
        first = head + b"x" * (READ_CHUNK_SIZE - len(head) - 1) + b"\r"
        self.assertEqual(len(first), READ_CHUNK_SIZE)
        self.store.boxes.clear()
        self.store.add(ALICE, first + b"\n.dot\r\n", uid="big")
        self.login()
        out = self.send(b"RETR 1\r\n")
        self.assertTrue(out.endswith(b"x\r\n..dot\r\n.\r\n"), out[-30:])

    def test_retrNoStuffingMidLine(self) -> None:
        """
        A C{.} that starts a chunk in the middle of a line is not stuffed.
        """
        head = b"Subject: big\r\n\r\n"
        first = head + b"x" * (READ_CHUNK_SIZE - len(head))
        self.store.boxes.clear()
        self.store.add(ALICE, first + b".y\r\n", uid="big")
        self.login()
        out = self.send(b"RETR 1\r\n")
        self.assertTrue(out.endswith(b"xxx.y\r\n.\r\n"), out[-30:])

    def test_retrVanished(self) -> None:
        """
        A message whose file vanished gives C{[SYS/TEMP]}; the session
        goes on.
        """
        self.store.vanished.add("u2")
        self.login()
        self.assertEqual(
            self.send(b"RETR 2\r\nNOOP\r\n"),
            b"-ERR [SYS/TEMP] Message temporarily unavailable.\r\n+OK\r\n",
        )

    def test_top(self) -> None:
        """
        TOP n m sends the header, the blank line and m body lines,
        dot-stuffed.
        """
        self.store.boxes.clear()
        self.store.add(ALICE, b"From: a\r\nSubject: s\r\n\r\nline1\r\n.line2\r\nline3\r\n", uid="t")
        self.login()
        head = b"+OK Top of message follows.\r\nFrom: a\r\nSubject: s\r\n\r\n"
        self.assertEqual(self.send(b"TOP 1 0\r\n"), head + b".\r\n")
        self.assertEqual(self.send(b"TOP 1 2\r\n"), head + b"line1\r\n..line2\r\n.\r\n")
        self.assertEqual(self.send(b"TOP 1 10\r\n"), head + b"line1\r\n..line2\r\nline3\r\n.\r\n")

    def test_topDoesNotCountForLast(self) -> None:
        """
        TOP does not change LAST; RETR does.
        """
        self.login()
        self.send(b"TOP 2 0\r\n")
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 0\r\n")
        self.send(b"RETR 2\r\n")
        self.send(b"RETR 1\r\n")
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 2\r\n")
        self.assertEqual(self.send(b"RSET\r\nLAST\r\n").split(b"\r\n")[1], b"+OK 0")

    def test_deleteMarksOnly(self) -> None:
        """
        DELE marks; RETR/TOP/DELE of the marked message are refused; nothing
        is committed before QUIT.
        """
        maildrop = self.login()
        self.assertEqual(self.send(b"DELE 1\r\n"), b"+OK Message 1 deleted.\r\n")
        self.assertEqual(
            self.send(b"DELE 1\r\nRETR 1\r\nTOP 1 0\r\n"),
            b"-ERR Message already deleted.\r\n" * 3,
        )
        self.assertIsNone(maildrop.committed)
        self.assertEqual(len(self.store.boxes[ALICE]), 3)

    def test_rset(self) -> None:
        """
        RSET unmarks every deletion.
        """
        maildrop = self.login()
        self.send(b"DELE 1\r\nDELE 3\r\n")
        total = len(MSG1) + len(MSG2) + len(MSG3)
        self.assertEqual(self.send(b"RSET\r\n"), b"+OK Maildrop has 3 messages (%d octets).\r\n" % (total,))
        self.send(b"QUIT\r\n")
        self.assertEqual(maildrop.committed, set())

    def test_quitCommits(self) -> None:
        """
        QUIT commits the marked deletions, says goodbye, logs the logout
        with counters and closes.
        """
        maildrop = self.login()
        self.send(b"RETR 1\r\nDELE 1\r\nDELE 2\r\n")
        self.assertEqual(self.send(b"QUIT\r\n"), b"+OK pop3gw signing off.\r\n")
        self.assertEqual(maildrop.committed, {0, 1})
        self.assertEqual([uid for uid, _ in self.store.boxes[ALICE]], ["u3"])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.realm.logouts, 1)
        self.assertIn(
            'logout: service=pop3 rhost=192.0.2.7 user="alice@example.org" bytes=%d deleted=2 retrieved=1 top=0' % (len(MSG1),),
            self.logLines(),
        )
        self.proto.connectionLost(Failure(ConnectionError()))
        self.assertEqual(self.realm.logouts, 1)

    def test_logoutCountsTop(self) -> None:
        """
        The logout line counts the message octets sent for TOP as well as
        RETR (CRLF line ends, before dot-stuffing, without the "." line: a
        whole message counts its LIST size), RETRs as C{retrieved} and TOPs
        as C{top}.
        """
        self.login()
        self.send(b"TOP 1 99999999\r\nRETR 2\r\nTOP 3 0\r\n")
        self.send(b"QUIT\r\n")
        sent = len(MSG1) + len(MSG2) + len(b"Subject: three\r\n\r\n")
        self.assertIn(
            'logout: service=pop3 rhost=192.0.2.7 user="alice@example.org" bytes=%d deleted=0 retrieved=1 top=2'
            % (sent,),
            self.logLines(),
        )

    def test_quitCommitDeferred(self) -> None:
        """
        A commit returning a L{Deferred} delays the QUIT reply; commands
        after QUIT are never answered.
        """
        maildrop = self.login()
        d = defer.Deferred()
        maildrop.commit = lambda deleted, seen=(): d
        self.assertEqual(self.send(b"QUIT\r\nNOOP\r\n"), b"")
        self.transport.clear()
        d.callback(None)
        self.assertEqual(self.transport.value(), b"+OK pop3gw signing off.\r\n")

    def test_noIdleTimeoutDuringCommit(self) -> None:
        """
        A slow commit after QUIT is not an idle client: no timeout line is
        sent before the QUIT reply.
        """
        maildrop = self.login()
        d = defer.Deferred()
        maildrop.commit = lambda deleted, seen=(): d
        self.send(b"QUIT\r\n")
        self.clock.advance(300)
        self.send(b"NOOP\r\n")
        self.clock.advance(600)
        self.assertEqual(self.transport.value(), b"")
        d.callback(None)
        self.assertEqual(self.transport.value(), b"+OK pop3gw signing off.\r\n")

    def test_quitCommitFails(self) -> None:
        """
        A commit failing with L{TemporaryFailure} gives RFC 1939's C{-ERR}
        reply (without the exception text) and still closes.
        """
        maildrop = self.login()
        maildrop.commit = lambda deleted, seen=(): defer.fail(TemporaryFailure("secret detail"))
        self.send(b"DELE 1\r\n")
        self.assertEqual(self.send(b"QUIT\r\n"), b"-ERR [SYS/TEMP] Some deleted messages not removed.\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.realm.logouts, 1)

    def test_insufficientStorage(self) -> None:
        """
        L{InsufficientStorage} (a full disk) opening the maildrop or at
        QUIT's commit is answered C{[SYS/TEMP]}, never with its text; the
        log line names the error in words.
        """
        self.realm.openFailure = InsufficientStorage("cannot open maildrop: No space left on device")
        self.connect()
        out = self.send(b"USER alice@example.org\r\nPASS secret\r\n")
        self.assertEqual(out, b"+OK Send PASS.\r\n-ERR [SYS/TEMP] Mailbox temporarily unavailable.\r\n")
        self.assertIn(
            "maildrop unavailable: rhost=192.0.2.7 error=cannot open maildrop: No space left on device",
            self.logLines(),
        )
        self.realm.openFailure = None
        maildrop = self.login()
        maildrop.commit = lambda deleted, seen=(): defer.fail(
            InsufficientStorage("could not remove 1 message(s): Disk quota exceeded")
        )
        self.send(b"DELE 1\r\n")
        self.assertEqual(self.send(b"QUIT\r\n"), b"-ERR [SYS/TEMP] Some deleted messages not removed.\r\n")
        self.assertIn(
            'commit failed: user="alice@example.org" error=could not remove 1 message(s): Disk quota exceeded',
            self.logLines(),
        )
        self.assertEqual(self.failures(), [])

    def test_quitAuthorization(self) -> None:
        """
        QUIT before login says goodbye and closes.
        """
        self.connect()
        self.assertEqual(self.send(b"QUIT\r\n"), b"+OK pop3gw signing off.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_connectionDropCommitsNothing(self) -> None:
        """
        A dropped connection releases the maildrop without deleting
        anything, logs the logout and logs the avatar out.
        """
        maildrop = self.login()
        self.send(b"DELE 1\r\n")
        self.proto.connectionLost(Failure(ConnectionError()))
        self.assertIsNone(maildrop.committed)
        self.assertTrue(maildrop.released)
        self.assertEqual(len(self.store.boxes[ALICE]), 3)
        self.assertEqual(self.realm.logouts, 1)
        self.assertIn(
            'logout: service=pop3 rhost=192.0.2.7 user="alice@example.org" bytes=0 deleted=0 retrieved=0 top=0',
            self.logLines(),
        )

    def test_noop(self) -> None:
        """
        NOOP answers C{+OK}; it is not valid before login.
        """
        self.connect()
        self.assertEqual(self.send(b"NOOP\r\n"), b"-ERR Command not valid in this state.\r\n")
        self.send(b"USER alice@example.org\r\nPASS secret\r\n")
        self.assertEqual(self.send(b"NOOP\r\n"), b"+OK\r\n")

    def test_badArguments(self) -> None:
        """
        Missing, extra, non-numeric or out-of-range arguments give exactly
        one C{-ERR} line each and the session goes on.
        """
        self.login()
        syntax = b"-ERR Invalid arguments.\r\n"
        nosuch = b"-ERR No such message.\r\n"
        cases = [
            (b"LIST x", syntax),
            (b"LIST 1 2", syntax),
            (b"LIST -1", syntax),
            (b"LIST +1", syntax),
            (b"LIST 0", nosuch),
            (b"LIST 99999999999", syntax),
            (b"RETR", syntax),
            (b"RETR 4", nosuch),
            (b"RETR 0", nosuch),
            (b"DELE", syntax),
            (b"DELE 1 1", syntax),
            (b"TOP 1", syntax),
            (b"TOP 1 x", syntax),
            (b"TOP 9 1", nosuch),
            (b"UIDL a", syntax),
            (b"STAT 1", syntax),
            (b"NOOP x", syntax),
            (b"RSET 1", syntax),
            (b"LAST 1", syntax),
            (b"QUIT now", syntax),
            (b"RETR \xd9\xa1", syntax),
        ]
        for command, reply in cases:
            self.assertEqual(self.send(command + b"\r\n"), reply, command)
            self.send(b"NOOP\r\n")
        self.assertEqual(self.proto.state, "TRANSACTION")


class LastTests(_Harness):
    """
    LAST (RFC 1225) counts messages accessed in earlier sessions through the
    maildrop's seen flags, which QUIT records for the retrieved messages.
    """

    def quit(self, maildrop) -> None:
        self.assertEqual(self.send(b"QUIT\r\n"), b"+OK pop3gw signing off.\r\n")
        self.assertTrue(maildrop.released)

    def test_lastAtLoginFromSeen(self) -> None:
        """
        At login LAST is the highest number of a seen message, whatever the
        messages before it.
        """
        self.store.seen.add((ALICE, "u2"))
        self.login()
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 2\r\n")

    def test_lastAtLoginNoneSeen(self) -> None:
        """
        With no seen message LAST starts at 0.
        """
        self.login()
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 0\r\n")

    def test_retrQuitThenNextSession(self) -> None:
        """
        A message retrieved in one session is handed to the commit as seen
        at QUIT, and the next session's LAST starts at its number.
        """
        maildrop = self.login()
        self.send(b"RETR 2\r\n")
        self.quit(maildrop)
        self.assertEqual(maildrop.committed, set())
        self.assertEqual(maildrop.committedSeen, {1})
        self.login()
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 2\r\n")
        self.send(b"RETR 1\r\n")
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 2\r\n")

    def test_rsetRestoresInitialValue(self) -> None:
        """
        RFC 1225's example: LAST rises with RETR, DELE does not lower it,
        and RSET puts it back to its value at the beginning of the session
        (not 0); the retrieved messages are then not marked seen at QUIT.
        """
        self.store.seen.add((ALICE, "u1"))
        maildrop = self.login()
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 1\r\n")
        self.send(b"RETR 3\r\n")
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 3\r\n")
        self.assertEqual(self.send(b"DELE 2\r\n"), b"+OK Message 2 deleted.\r\n")
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 3\r\n")
        self.send(b"RSET\r\n")
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 1\r\n")
        self.quit(maildrop)
        self.assertEqual(maildrop.committed, set())
        self.assertEqual(maildrop.committedSeen, set())
        self.assertEqual(self.store.seen, {(ALICE, "u1")})

    def test_retrAfterRset(self) -> None:
        """
        Messages retrieved after RSET are marked seen at QUIT; those
        retrieved before it are not.
        """
        maildrop = self.login()
        self.send(b"RETR 3\r\nRSET\r\nRETR 1\r\n")
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 1\r\n")
        self.quit(maildrop)
        self.assertEqual(maildrop.committedSeen, {0})

    def test_deletedNotMarkedSeen(self) -> None:
        """
        A message retrieved and deleted is only deleted; the retrieved
        messages kept are marked seen, and LAST in the next session counts
        in the renumbered maildrop.
        """
        maildrop = self.login()
        self.send(b"RETR 1\r\nRETR 2\r\nDELE 1\r\n")
        self.quit(maildrop)
        self.assertEqual(maildrop.committed, {0})
        self.assertEqual(maildrop.committedSeen, {1})
        self.assertEqual(self.store.seen, {(ALICE, "u2")})
        self.login()
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 1\r\n")

    def test_topNotMarkedSeen(self) -> None:
        """
        TOP does not count as an access: nothing is marked seen.
        """
        maildrop = self.login()
        self.send(b"TOP 1 0\r\nTOP 3 1\r\n")
        self.quit(maildrop)
        self.assertEqual(maildrop.committedSeen, set())

    def test_dropRecordsNothing(self) -> None:
        """
        A dropped connection releases the maildrop without marking the
        retrieved messages seen.
        """
        maildrop = self.login()
        self.send(b"RETR 1\r\n")
        self.proto.connectionLost(Failure(ConnectionError()))
        self.assertTrue(maildrop.released)
        self.assertIsNone(maildrop.committedSeen)
        self.assertEqual(self.store.seen, set())
        self.login()
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 0\r\n")

    def test_timeoutRecordsNothing(self) -> None:
        """
        An idle timeout releases the maildrop without marking the retrieved
        messages seen.
        """
        maildrop = self.login()
        self.send(b"RETR 1\r\n")
        self.clock.advance(600)
        self.assertTrue(self.transport.disconnecting)
        self.proto.connectionLost(Failure(ConnectionError()))
        self.assertTrue(maildrop.released)
        self.assertIsNone(maildrop.committedSeen)
        self.assertEqual(self.store.seen, set())

    def test_maildirAcrossSessions(self) -> None:
        """
        Over the real Maildir store: RETR then QUIT flags the message seen
        (UIDL unchanged), and the next session's LAST reflects it.
        """
        store = MaildirStore(self.mktemp(), hostname="testhost")
        for data in (MSG1, MSG2, MSG3):
            delivery = store.beginDelivery([ALICE])
            delivery.write(data)
            self.successResultOf(delivery.commit())
        self.realm.store = store
        self.connect()
        self.assertEqual(self.send(b"USER alice@example.org\r\nPASS secret\r\n"), LOGGED_IN)
        uidl = self.send(b"UIDL\r\n")
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 0\r\n")
        self.send(b"RETR 2\r\n")
        self.assertEqual(self.send(b"QUIT\r\n"), b"+OK pop3gw signing off.\r\n")
        self.connect()
        self.assertEqual(self.send(b"USER alice@example.org\r\nPASS secret\r\n"), LOGGED_IN)
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 2\r\n")
        self.assertEqual(self.send(b"UIDL\r\n"), uidl)
        self.assertEqual(
            self.send(b"RETR 2\r\n"),
            b"+OK %d octets\r\nSubject: two\r\n\r\n..dot line\r\n...two dots\r\n..\r\nend\r\n.\r\n" % (len(MSG2),),
        )


class StreamingTests(_Harness):
    def test_backPressure(self) -> None:
        """
        RETR streams the message in L{READ_CHUNK_SIZE} pieces, one per
        resume of a paused transport, the status line in the same write as
        the first; a pipelined command waits until the C{.} line is out.
        """
        # Three whole chunks and a part of one.
        body = (b"y" * 99 + b"\r\n") * ((3 * READ_CHUNK_SIZE + READ_CHUNK_SIZE // 2) // 101)
        ok = b"+OK %d octets\r\n" % (len(body),)
        self.store.boxes.clear()
        self.store.add(ALICE, body, uid="large")
        self.login(transport=_PausingTransport(peerAddress=PEER))
        self.transport.clear()
        del self.transport.writes[:]
        self.proto.dataReceived(b"RETR 1\r\nNOOP\r\n")
        self.assertEqual(self.transport.writes, [ok + body[:READ_CHUNK_SIZE]])
        self.transport.producer.resumeProducing()
        self.assertEqual(self.transport.writes, [ok + body[:READ_CHUNK_SIZE], body[READ_CHUNK_SIZE : 2 * READ_CHUNK_SIZE]])
        resumes = self.drain()
        self.assertEqual(resumes, 5)
        self.assertEqual(
            [len(w) for w in self.transport.writes],
            [len(ok) + READ_CHUNK_SIZE, READ_CHUNK_SIZE, READ_CHUNK_SIZE, len(body) - 3 * READ_CHUNK_SIZE, 3, 5],
        )
        self.assertEqual(self.transport.value(), ok + body + b".\r\n+OK\r\n")

    def test_pipelinedRetrs(self) -> None:
        """
        Several RETRs pipelined behind a paused transfer are answered in
        order.
        """
        self.login(transport=_PausingTransport(peerAddress=PEER))
        self.transport.clear()
        self.proto.dataReceived(b"RETR 1\r\nRETR 3\r\nRETR 1\r\nQUIT\r\n")
        self.drain()
        one = b"+OK %d octets\r\n" % (len(MSG1),) + MSG1 + b".\r\n"
        three = b"+OK %d octets\r\n" % (len(MSG3),) + MSG3 + b".\r\n"
        self.assertEqual(self.transport.value(), one + three + one + b"+OK pop3gw signing off.\r\n")

    def test_connectionLostMidTransfer(self) -> None:
        """
        Losing the connection mid-transfer stops the producer, closes the
        file and releases the maildrop.
        """
        maildrop = self.login(transport=_PausingTransport(peerAddress=PEER))
        f = _TrackedFile(b"z" * (3 * READ_CHUNK_SIZE))
        maildrop.openMessage = lambda index: f
        self.send(b"RETR 1\r\n")
        self.assertIsNotNone(self.transport.producer)
        self.proto.connectionLost(Failure(ConnectionError()))
        self.assertTrue(f.closed)
        self.assertIsNone(self.transport.producer)
        self.assertTrue(maildrop.released)
        self.assertIsNone(maildrop.committed)

    def test_partialTransferCounted(self) -> None:
        """
        Octets of a transfer cut short by the connection's loss count in
        the logout line's C{bytes} (the transfer does not count as
        retrieved).
        """
        maildrop = self.login(transport=_PausingTransport(peerAddress=PEER))
        f = _TrackedFile(b"z" * (3 * READ_CHUNK_SIZE))
        maildrop.openMessage = lambda index: f
        self.send(b"RETR 1\r\n")
        self.transport.producer.resumeProducing()
        self.proto.connectionLost(Failure(ConnectionError()))
        self.assertIn(
            'logout: service=pop3 rhost=192.0.2.7 user="alice@example.org" bytes=%d deleted=0 retrieved=0 top=0'
            % (2 * READ_CHUNK_SIZE,),
            self.logLines(),
        )

    def test_retrWaitsForSlowOpen(self) -> None:
        """
        A maildrop whose C{openMessage} answers later (a database store
        fetching the message) delays the C{+OK} line until the message is
        at hand; a pipelined command waits behind it.
        """
        maildrop = self.login()
        opening: defer.Deferred = defer.Deferred()
        maildrop.openMessage = lambda index: opening
        self.assertEqual(self.send(b"RETR 1\r\nNOOP\r\n"), b"")
        opening.callback(_TrackedFile(MSG1))
        self.assertEqual(self.transport.value(), b"+OK %d octets\r\n" % (len(MSG1),) + MSG1 + b".\r\n+OK\r\n")

    def test_slowOpenFailsTemporarily(self) -> None:
        """
        An C{openMessage} that fails later with L{TemporaryFailure} gets
        the message-unavailable reply, and the session goes on.
        """
        maildrop = self.login()
        opening: defer.Deferred = defer.Deferred()
        maildrop.openMessage = lambda index: opening
        self.assertEqual(self.send(b"TOP 1 0\r\nNOOP\r\n"), b"")
        opening.errback(TemporaryFailure("database unreachable"))
        self.assertEqual(self.transport.value(), b"-ERR [SYS/TEMP] Message temporarily unavailable.\r\n+OK\r\n")

    def test_slowOpenAfterConnectionLost(self) -> None:
        """
        A message that arrives after the connection was lost is closed,
        not sent.
        """
        maildrop = self.login()
        opening: defer.Deferred = defer.Deferred()
        maildrop.openMessage = lambda index: opening
        self.send(b"RETR 1\r\n")
        self.proto.connectionLost(Failure(ConnectionError()))
        f = _TrackedFile(MSG1)
        opening.callback(f)
        self.assertTrue(f.closed)
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(maildrop.released)

    def test_fileClosedAfterTransfer(self) -> None:
        """
        The message file is closed once sent.
        """
        maildrop = self.login()
        f = _TrackedFile(MSG1)
        maildrop.openMessage = lambda index: f
        self.send(b"RETR 1\r\n")
        self.assertTrue(f.closed)

    def test_readErrorMidTransfer(self) -> None:
        """
        A read error after the C{+OK} line closes the connection without the
        terminating C{.} line, so the client never takes a truncated message
        for a whole one; the error is logged, its text is not sent.
        """
        maildrop = self.login()
        f = _TrackedFile(b"a" * (2 * READ_CHUNK_SIZE))
        f.failAfter = READ_CHUNK_SIZE
        maildrop.openMessage = lambda index: f
        out = self.send(b"RETR 1\r\nNOOP\r\n")
        self.assertEqual(out, b"+OK %d octets\r\n" % (len(MSG1),) + b"a" * READ_CHUNK_SIZE)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(f.closed)
        self.assertEqual([f.type for f in self.failures()], [OSError])

    def test_dotStufferByteByByte(self) -> None:
        """
        The stuffer gives the same result whatever the chunking.
        """
        data = b".a\r\n..b\r\nc.d\r\n.\r\n\r\n.e\r\n"
        expected = b"..a\r\n...b\r\nc.d\r\n..\r\n\r\n..e\r\n"
        stuffer = _DotStuffer()
        self.assertEqual(b"".join(stuffer.stuff(data[i : i + 1]) for i in range(len(data))), expected)
        self.assertEqual(_DotStuffer().stuff(data), expected)

    def test_topFilterByteByByte(self) -> None:
        """
        The TOP filter cuts at the same place whatever the chunking.
        """
        data = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n"
        for lines, expected in [(0, b"A: 1\r\nB: 2\r\n\r\n"), (2, b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n")]:
            top = _TopFilter(lines)
            out = b""
            for i in range(len(data)):
                out += top.feed(data[i : i + 1])
                if top.done:
                    break
            self.assertEqual(out, expected)
            self.assertTrue(top.done)


class OutputFlowTests(_Harness):
    def test_unreadRepliesStopAnswering(self) -> None:
        """
        While the transport's write buffer is full (the client is not
        reading), pipelined commands are not answered; each resume lets the
        next one through.
        """
        self.connect(transport=_PausingTransport(peerAddress=PEER))
        self.transport.pausing = True
        self.transport.clear()
        self.proto.dataReceived(b"CAPA\r\n" * 3)
        self.assertEqual(self.transport.value(), CAPA_PLAINTEXT)
        self.transport.producer.resumeProducing()
        self.assertEqual(self.transport.value(), CAPA_PLAINTEXT * 2)
        self.drain()
        self.assertEqual(self.transport.value(), CAPA_PLAINTEXT * 3)

    def test_unreadRepliesStopReading(self) -> None:
        """
        A client that keeps sending commands without reading the replies
        makes the server stop reading once L{MAX_PENDING_INPUT} octets
        wait, instead of buffering ever more replies; reading resumes once
        the replies are out.
        """
        self.login(transport=_PausingTransport(peerAddress=PEER))
        self.transport.clear()
        count = MAX_PENDING_INPUT // len(b"LIST 1\r\n") + 1
        self.proto.dataReceived(b"LIST 1\r\n" * count)
        reply = b"+OK 1 %d\r\n" % (len(MSG1),)
        self.assertEqual(self.transport.value(), reply)
        self.assertEqual(self.transport.producerState, "paused")
        self.drain()
        self.assertEqual(self.transport.value(), reply * count)
        self.assertEqual(self.transport.producerState, "producing")

    def test_closeAbortedWhenReplyUnread(self) -> None:
        """
        A connection closed after QUIT whose last reply has not gone out
        L{CLOSE_TIMEOUT} seconds later (the client does not read) is
        aborted.
        """
        self.connect()
        self.assertEqual(self.send(b"QUIT\r\n"), b"+OK pop3gw signing off.\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.clock.advance(CLOSE_TIMEOUT - 1)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnected)

    def test_idleTimeoutStalledClient(self) -> None:
        """
        A client that stopped reading is cut off at the idle timeout
        without another reply line: the connection is aborted, since a
        graceful close would wait for ever for the unread output.
        """
        self.connect(transport=_PausingTransport(peerAddress=PEER))
        self.transport.pausing = True
        self.transport.clear()
        self.proto.dataReceived(b"CAPA\r\nCAPA\r\n")
        self.clock.advance(600)
        self.assertEqual(self.transport.value(), CAPA_PLAINTEXT)
        self.assertTrue(self.transport.disconnected)
        self.assertIsNone(self.transport.producer)

    def test_quitClosesTLS(self) -> None:
        """
        Under TLS, QUIT shuts the connection down: the output producer is
        unregistered first, since a TLS layer with a producer registered
        waits for it before closing.
        """
        clock = MemoryReactorClock()
        factory = POP3Factory(self.portal, tlsOnly, self.clock)
        serverFactory = TLSMemoryBIOFactory(_serverOptions(), False, factory, clock=clock)
        clientFactory = TLSMemoryBIOFactory(CertificateOptions(), True, None, clock=clock)
        received = _Client(secure=True)
        client, server, pump = iosim.connectedServerAndClient(
            lambda: serverFactory.buildProtocol(PEER),
            lambda: TLSMemoryBIOProtocol(clientFactory, received),
            clock=clock,
        )
        client.write(b"QUIT\r\n")
        pump.flush()
        self.assertEqual(received.tlsLines, [b"+OK pop3gw ready.", b"+OK pop3gw signing off."])
        self.assertTrue(server.transport.disconnecting)


class RobustnessTests(_Harness):
    def test_lineTooLong(self) -> None:
        """
        A 300-octet line gets C{-ERR Line too long.}; the session goes on.
        """
        self.connect()
        self.assertEqual(
            self.send(b"USER " + b"a" * 295 + b"\r\nCAPA\r\n"),
            b"-ERR Line too long.\r\n" + CAPA_PLAINTEXT,
        )

    def test_lineTooLongAcrossSegments(self) -> None:
        """
        A long line arriving in pieces is refused once, as soon as it is too
        long, and its rest is discarded up to the next LF.
        """
        self.connect()
        self.assertEqual(self.send(b"NOOP " + b"a" * 300), b"-ERR Line too long.\r\n")
        self.assertEqual(self.send(b"b" * 300), b"")
        self.assertEqual(self.send(b"bbb\r\nCAPA\r\n"), CAPA_PLAINTEXT)

    def test_lineLimitBoundary(self) -> None:
        """
        255 octets including CRLF is accepted; 256 is not.
        """
        self.connect()
        ok = b"USER " + b"a" * 248 + b"\r\n"
        self.assertEqual(len(ok), 255)
        self.assertEqual(self.send(ok), b"+OK Send PASS.\r\n")
        self.assertEqual(self.send(b"USER " + b"a" * 249 + b"\r\n"), b"-ERR Line too long.\r\n")

    def test_nul(self) -> None:
        """
        A NUL in a command gives C{-ERR}.
        """
        self.connect()
        self.assertEqual(self.send(b"CA\x00PA\r\n"), b"-ERR Invalid characters in command.\r\n")

    def test_badUTF8(self) -> None:
        """
        A command that is not UTF-8 gives C{-ERR}.
        """
        self.connect()
        self.assertEqual(self.send(b"USER \xff\xfe\r\n"), b"-ERR Command is not valid UTF-8.\r\n")

    def test_unknownCommand(self) -> None:
        """
        Unknown commands, APOP included, and empty lines give C{-ERR}.
        """
        self.connect()
        self.assertEqual(
            self.send(b"FOO\r\nAPOP alice@example.org 0123456789abcdef0123456789abcdef\r\n\r\n\xc3\xa9\r\n"),
            b"-ERR Unknown command.\r\n-ERR Unknown command.\r\n-ERR Empty command.\r\n-ERR Unknown command.\r\n",
        )

    def test_wrongState(self) -> None:
        """
        Transaction commands before login, and login commands after it, are
        refused.
        """
        self.connect()
        wrong = b"-ERR Command not valid in this state.\r\n"
        self.assertEqual(self.send(b"STAT\r\nRETR 1\r\nLAST\r\n"), wrong * 3)
        self.send(b"USER alice@example.org\r\nPASS secret\r\n")
        self.assertEqual(self.send(b"USER alice@example.org\r\nPASS x\r\nAUTH\r\nSTLS\r\n"), wrong * 4)

    def test_lfOnly(self) -> None:
        """
        LF-only line ends are accepted.
        """
        self.connect()
        self.assertEqual(self.send(b"USER alice@example.org\nPASS secret\nSTAT\n")[: len(LOGGED_IN)], LOGGED_IN)

    def test_pipelined(self) -> None:
        """
        Commands pipelined in one segment are answered in order.
        """
        self.connect()
        out = self.send(
            b"CAPA\r\nUSER alice@example.org\r\nPASS secret\r\nSTAT\r\nLIST 1\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n"
        )
        total = len(MSG1) + len(MSG2) + len(MSG3)
        self.assertEqual(
            out,
            CAPA_PLAINTEXT
            + LOGGED_IN
            + b"+OK 3 %d\r\n" % (total,)
            + b"+OK 1 %d\r\n" % (len(MSG1),)
            + b"+OK %d octets\r\n" % (len(MSG1),)
            + MSG1
            + b".\r\n+OK Message 1 deleted.\r\n+OK pop3gw signing off.\r\n",
        )

    def test_splitSegments(self) -> None:
        """
        A command split across segments is handled once complete.
        """
        self.connect()
        self.assertEqual(self.send(b"CA"), b"")
        self.assertEqual(self.send(b"PA\r"), b"")
        self.assertEqual(self.send(b"\n"), CAPA_PLAINTEXT)

    def test_tooManyErrors(self) -> None:
        """
        After 20 bad commands in a row the connection is closed.
        """
        self.connect()
        out = self.send(b"FOO\r\n" * 19)
        self.assertEqual(out, b"-ERR Unknown command.\r\n" * 19)
        self.assertEqual(self.send(b"FOO\r\nCAPA\r\n"), b"-ERR Too many errors, closing connection.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_errorsResetBySuccess(self) -> None:
        """
        A successful command resets the count of bad commands.
        """
        self.connect()
        for _i in range(3):
            self.send(b"FOO\r\n" * 15 + b"CAPA\r\n")
        self.assertFalse(self.transport.disconnecting)

    def test_internalError(self) -> None:
        """
        An unexpected exception in a command is logged and answered with
        C{-ERR [SYS/TEMP] Internal error.}, without its text; the session
        goes on.
        """
        maildrop = self.login()

        def boom(index):
            raise RuntimeError("secret detail")

        maildrop.openMessage = boom
        self.assertEqual(
            self.send(b"RETR 1\r\nNOOP\r\n"),
            b"-ERR [SYS/TEMP] Internal error.\r\n+OK\r\n",
        )
        self.assertEqual([f.type for f in self.failures()], [RuntimeError])

    def test_noPeerHost(self) -> None:
        """
        A transport whose peer has no host (a UNIX socket) is handled.
        """

        class _Peerless(StringTransport):
            def getPeer(self):
                raise NotImplementedError()

        self.login(transport=_Peerless())
        self.assertIn('login: service=pop3 rhost=unknown user="alice@example.org" tls=no', self.logLines())

    def test_pauseReadingWhileBusy(self) -> None:
        """
        Input piling up behind a command in progress stops reading from the
        transport until the command is done.
        """
        checker = _DeferredChecker()
        self.connect(portal=Portal(self.realm, [checker]))
        self.send(b"USER alice@example.org\r\nPASS secret\r\n")
        self.send(b"NOOP\r\n" * 20000)
        self.assertEqual(self.transport.producerState, "paused")
        checker.pending[0][1].callback(b"alice@example.org")
        self.assertEqual(self.transport.producerState, "producing")


class TimeoutTests(_Harness):
    def test_idleTimeout(self) -> None:
        """
        After C{idleTimeout} seconds of silence the server says so and
        closes; any input restarts the timer.
        """
        self.connect()
        self.clock.advance(599)
        self.send(b"CAPA\r\n")
        self.transport.clear()
        self.clock.advance(599)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(self.transport.value(), b"-ERR Idle timeout, closing connection.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_loginTimeout(self) -> None:
        """
        A client that has not logged in C{loginTimeout} seconds after
        connecting is told so and closed, however busy it keeps the
        session meanwhile.
        """
        self.connect(loginTimeout=180)
        for _ in range(17):
            self.clock.advance(10)
            self.assertEqual(self.send(b"CAPA\r\n")[:4], b"+OK ")
        self.transport.clear()
        self.clock.advance(9)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(self.transport.value(), b"-ERR Login time exceeded, closing connection.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_loginTimeoutEndsAtLogin(self) -> None:
        """
        Once logged in, the login deadline no longer applies: only the idle
        timer does.
        """
        self.login(loginTimeout=180)
        for _ in range(30):
            self.clock.advance(10)
            self.assertEqual(self.send(b"NOOP\r\n"), b"+OK\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.proto.connectionLost(Failure(ConnectionError()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_slowlorisTimesOut(self) -> None:
        """
        Bytes that never complete a line do not count as activity: a client
        trickling one byte at a time is still closed after C{idleTimeout}
        seconds from its last complete line.
        """
        self.connect()
        self.transport.clear()
        for _ in range(599):
            self.send(b"C")
            self.clock.advance(1)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(self.transport.value(), b"-ERR Idle timeout, closing connection.\r\n")

    def test_idleTimeoutInTransaction(self) -> None:
        """
        A timeout in TRANSACTION releases the maildrop without deleting.
        """
        maildrop = self.login()
        self.send(b"DELE 1\r\n")
        self.transport.clear()
        self.clock.advance(600)
        self.assertEqual(self.transport.value(), b"-ERR Idle timeout, closing connection.\r\n")
        self.proto.connectionLost(Failure(ConnectionError()))
        self.assertIsNone(maildrop.committed)
        self.assertTrue(maildrop.released)
        self.assertEqual(self.realm.logouts, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idleTimeoutMidTransfer(self) -> None:
        """
        A client that stops reading mid-message is disconnected after the
        idle timeout, without a reply line inside the message text and
        without the terminating C{.} line; the file is closed.
        """
        maildrop = self.login(transport=_PausingTransport(peerAddress=PEER))
        f = _TrackedFile(b"z" * (3 * READ_CHUNK_SIZE))
        maildrop.openMessage = lambda index: f
        self.send(b"RETR 1\r\n")
        self.transport.clear()
        self.clock.advance(600)
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(f.closed)
        self.assertIsNone(self.transport.producer)

    def test_transferProgressResetsTimeout(self) -> None:
        """
        A slow transfer that keeps going is not an idle connection.
        """
        maildrop = self.login(transport=_PausingTransport(peerAddress=PEER))
        maildrop.openMessage = lambda index: _TrackedFile(b"z" * (3 * READ_CHUNK_SIZE))
        self.send(b"RETR 1\r\n")
        for _i in range(3):
            self.clock.advance(599)
            self.transport.producer.resumeProducing()
        self.assertFalse(self.transport.disconnecting)

    def test_timeoutCancelledOnClose(self) -> None:
        """
        No timer is left once the connection is gone.
        """
        self.connect()
        self.proto.connectionLost(Failure(ConnectionError()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeoutDisabled(self) -> None:
        """
        An C{idleTimeout} of L{None} never times out.
        """
        self.connect(idleTimeout=None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class STLSTests(_Harness):
    def test_discardsPipelinedPlaintext(self) -> None:
        """
        Commands pipelined after STLS in the same segment are discarded,
        never executed (CVE-2011-0411).
        """
        ctx = object()
        self.connect(policy=always, tls=ctx, transport=_StartTLSTransport(peerAddress=PEER))
        out = self.send(b"STLS\r\nUSER alice@example.org\r\nPASS secret\r\n")
        self.assertEqual(out, b"+OK Begin TLS negotiation\r\n")
        self.assertEqual(self.transport.tlsStarted, [ctx])
        self.assertEqual(self.realm.logins, 0)
        self.assertTrue(self.proto.secure)
        self.assertEqual(self.send(b"PASS secret\r\n"), b"-ERR Send USER first.\r\n")

    def test_afterSTLS(self) -> None:
        """
        After STLS, CAPA no longer offers STLS, the policy sees a secure
        connection and a second STLS is refused.
        """
        self.connect(policy=tlsOnly, tls=object(), transport=_StartTLSTransport(peerAddress=PEER))
        self.send(b"STLS\r\n")
        self.assertEqual(self.send(b"CAPA\r\n"), CAPA_PLAINTEXT)
        self.assertEqual(self.send(b"STLS\r\n"), b"-ERR Already using TLS.\r\n")
        self.assertEqual(self.send(b"USER alice@example.org\r\nPASS secret\r\n"), LOGGED_IN)
        self.assertIn('login: service=pop3 rhost=192.0.2.7 user="alice@example.org" tls=yes', self.logLines())

    def test_afterUser(self) -> None:
        """
        STLS after USER is refused.
        """
        self.connect(tls=object(), transport=_StartTLSTransport(peerAddress=PEER))
        self.send(b"USER alice@example.org\r\n")
        self.assertEqual(self.send(b"STLS\r\n"), b"-ERR STLS not allowed after USER.\r\n")
        self.assertEqual(self.transport.tlsStarted, [])

    def test_implicitTLS(self) -> None:
        """
        On a transport that is already TLS the connection counts as secure:
        no STLS, and the policy allows plaintext logins.
        """
        self.connect(policy=tlsOnly, tls=object(), transport=_SecureTransport())
        self.assertEqual(self.send(b"CAPA\r\n"), CAPA_PLAINTEXT)
        self.assertEqual(self.send(b"STLS\r\n"), b"-ERR Already using TLS.\r\n")


def _serverOptions():
    pem = FilePath(twisted.test.__file__).sibling("server.pem").getContent()
    return PrivateCertificate.loadPEM(pem).options()


class _Bypass:
    """
    What a TLS layer writes, and its producer and close calls, go straight
    to the fake transport, like L{twisted.internet._newtls._BypassTLS}.
    """

    def __init__(self, transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        iosim.FakeTransport.write(self._transport, data)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        iosim.FakeTransport.loseConnection(self._transport)

    def registerProducer(self, producer, streaming) -> None:
        iosim.FakeTransport.registerProducer(self._transport, producer, streaming)

    def unregisterProducer(self) -> None:
        iosim.FakeTransport.unregisterProducer(self._transport)

    def __getattr__(self, name):
        return getattr(self._transport, name)


class _StartTLSFakeTransport(iosim.FakeTransport):
    """
    An iosim transport that behaves like a TCP transport
    (L{twisted.internet._newtls.ConnectionMixin}) once C{startTLS} is
    called: a real L{TLSMemoryBIOProtocol} goes under the protocol, and
    writes, producers and closing go through it.  When the connection is
    lost, it stops and drops its producer and deletes its C{protocol}
    attribute before telling the protocol, as
    L{twisted.internet.tcp.Connection.connectionLost} does.
    """

    _tls = None

    def startTLS(self, contextFactory, beNormal=True) -> None:
        producer, streaming = self.producer, self.streamingProducer
        if producer is not None:
            iosim.FakeTransport.unregisterProducer(self)
        factory = TLSMemoryBIOFactory(contextFactory, not self.isServer, None)
        tls = TLSMemoryBIOProtocol(factory, self.protocol, _connectWrapped=False)
        self._tls = tls
        self.protocol = tls
        tls.makeConnection(_Bypass(self))
        if producer is not None:
            self.registerProducer(producer, streaming)

    def write(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.write(data)
        else:
            super().write(data)

    def loseConnection(self) -> None:
        if self._tls is not None:
            self._tls.loseConnection()
        else:
            super().loseConnection()

    def registerProducer(self, producer, streaming) -> None:
        if self._tls is not None:
            self.protocol.registerProducer(producer, streaming)
        else:
            super().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self._tls is not None:
            self.protocol.unregisterProducer()
        else:
            super().unregisterProducer()

    def reportDisconnect(self) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        protocol = self.protocol
        del self.protocol
        protocol.connectionLost(Failure(self.disconnectReason))


class _Client(Protocol):
    """
    Records the lines it receives; starts TLS on C{+OK Begin TLS}.
    """

    def __init__(self, tlsOptions=None, secure: bool = False) -> None:
        self.tlsOptions = tlsOptions
        self.secure = secure
        self.buffer = b""
        self.lines: list = []
        self.tlsLines: list = []

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            (self.tlsLines if self.secure else self.lines).append(line)
            if line == b"+OK Begin TLS negotiation" and self.tlsOptions is not None:
                self.transport.startTLS(self.tlsOptions)
                self.secure = True


class RealTLSTests(_Harness):
    def test_stlsHandshake(self) -> None:
        """
        A real TLS handshake after STLS: the command pipelined in plaintext
        is not executed, and commands sent over TLS are answered over TLS.
        """
        clock = MemoryReactorClock()
        factory = POP3Factory(self.portal, tlsOnly, self.clock, tlsContextFactory=_serverOptions())
        client, server, pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(PEER),
            lambda: _Client(CertificateOptions()),
            clientTransportFactory=lambda p: _StartTLSFakeTransport(p, isServer=False),
            serverTransportFactory=lambda p: _StartTLSFakeTransport(p, isServer=True),
            clock=clock,
        )
        self.assertEqual(client.lines, [b"+OK pop3gw ready."])
        client.transport.write(b"STLS\r\nCAPA\r\n")
        pump.flush()
        self.assertEqual(client.lines, [b"+OK pop3gw ready.", b"+OK Begin TLS negotiation"])
        client.transport.write(b"USER alice@example.org\r\nPASS secret\r\nSTAT\r\nQUIT\r\n")
        pump.flush()
        self.assertEqual(
            client.tlsLines,
            [
                b"+OK Send PASS.",
                b"+OK Logged in.",
                b"+OK 3 %d" % (len(MSG1) + len(MSG2) + len(MSG3),),
                b"+OK pop3gw signing off.",
            ],
        )
        self.assertTrue(server.secure)

    def test_implicitTLS(self) -> None:
        """
        Wrapped in L{TLSMemoryBIOFactory}, the server knows the connection
        is secure from the start and allows plaintext logins under the
        C{tlsOnly} policy.
        """
        clock = MemoryReactorClock()
        factory = POP3Factory(self.portal, tlsOnly, self.clock, tlsContextFactory=_serverOptions())
        serverFactory = TLSMemoryBIOFactory(_serverOptions(), False, factory, clock=clock)
        clientFactory = TLSMemoryBIOFactory(CertificateOptions(), True, None, clock=clock)
        received = _Client(secure=True)
        client, server, pump = iosim.connectedServerAndClient(
            lambda: serverFactory.buildProtocol(PEER),
            lambda: TLSMemoryBIOProtocol(clientFactory, received),
            clock=clock,
        )
        client.write(b"CAPA\r\n")
        pump.flush()
        self.assertEqual(
            b"\r\n".join(received.tlsLines) + b"\r\n",
            b"+OK pop3gw ready.\r\n" + CAPA_PLAINTEXT,
        )

    def _stlsSession(self):
        """
        Connect a client that sends STLS and completes the handshake over
        L{_StartTLSFakeTransport}s; the server logs to C{self.events}.

        @return: the client, the server and the pump.
        """
        clock = MemoryReactorClock()
        factory = POP3Factory(self.portal, tlsOnly, self.clock, tlsContextFactory=_serverOptions())
        client, server, pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(PEER),
            lambda: _Client(CertificateOptions()),
            clientTransportFactory=lambda p: _StartTLSFakeTransport(p, isServer=False),
            serverTransportFactory=lambda p: _StartTLSFakeTransport(p, isServer=True),
            clock=clock,
        )
        server.log = Logger(observer=self.events.append)
        client.transport.write(b"STLS\r\nCAPA\r\n")
        pump.flush()
        client.transport.write(b"NOOP\r\n")
        pump.flush()
        self.assertEqual(client.tlsLines, [b"-ERR Command not valid in this state."])
        return client, server, pump

    def assertNothingAlarming(self) -> None:
        """
        The server logged no failure and nothing at warn level or above.
        """
        self.assertEqual(self.failures(), [])
        self.assertEqual(
            [formatEvent(e) for e in self.events if e["log_level"] >= LogLevel.warn],
            [],
        )

    def test_clientClosesAfterSTLS(self) -> None:
        """
        A client that closes TLS and the connection right after the STLS
        handshake (C{openssl s_client -starttls pop3 </dev/null}) ends the
        session quietly: nothing is logged as an error, although the TCP
        transport has already dropped its TLS layer when the server hears
        of the loss.
        """
        client, server, pump = self._stlsSession()
        client.transport.loseConnection()
        pump.flush()
        self.assertTrue(server._disconnected)
        self.assertNothingAlarming()

    def test_clientDropsTCPAfterSTLS(self) -> None:
        """
        A client that drops the TCP connection after the STLS handshake
        without a TLS close (a Python C{ssl} socket closed without
        C{unwrap}) ends the session quietly.
        """
        client, server, pump = self._stlsSession()
        iosim.FakeTransport.loseConnection(client.transport)
        pump.flush()
        self.assertTrue(server._disconnected)
        self.assertNothingAlarming()


class _OpenRecorder:
    """
    Wraps a maildrop's C{openMessage} to record the indexes opened and the
    files handed out.
    """

    def __init__(self, maildrop) -> None:
        self.indexes: list = []
        self.files: list = []
        self._open = maildrop.openMessage
        maildrop.openMessage = self.openMessage

    def openMessage(self, index: int) -> defer.Deferred:
        self.indexes.append(index)
        d = self._open(index)
        d.addCallback(self._opened)
        return d

    def _opened(self, source):
        self.files.append(source)
        return source


class ReadAheadTests(_Harness):
    """
    After a RETR the next message is opened, and its first chunk read,
    before the client asks for it; a RETR or TOP of it then uses what was
    read, with the same bytes on the wire.  What is not used is closed.
    """

    def test_nextOpenedAhead(self) -> None:
        """
        Once RETR 1 is answered, message 2 is open already; RETR 2 sends
        it without opening it again, then message 3 is opened.
        """
        opened = _OpenRecorder(self.login())
        self.assertEqual(self.send(b"RETR 1\r\n"), b"+OK %d octets\r\n" % (len(MSG1),) + MSG1 + b".\r\n")
        self.assertEqual(opened.indexes, [0, 1])
        self.assertEqual(
            self.send(b"RETR 2\r\n"),
            b"+OK %d octets\r\n" % (len(MSG2),)
            + b"Subject: two\r\n\r\n..dot line\r\n...two dots\r\n..\r\nend\r\n.\r\n",
        )
        self.assertEqual(opened.indexes, [0, 1, 2])
        self.assertTrue(opened.files[1].closed)

    def test_topOfTheNext(self) -> None:
        """
        A TOP of the message read ahead uses it too.
        """
        opened = _OpenRecorder(self.login())
        self.send(b"RETR 1\r\n")
        self.assertEqual(
            self.send(b"TOP 2 1\r\n"),
            b"+OK Top of message follows.\r\nSubject: two\r\n\r\n..dot line\r\n.\r\n",
        )
        self.assertEqual(opened.indexes, [0, 1])
        self.assertTrue(opened.files[1].closed)

    def test_otherMessage(self) -> None:
        """
        A RETR of another message closes the one read ahead and opens its
        own; nothing is read ahead past the last message.
        """
        opened = _OpenRecorder(self.login())
        self.send(b"RETR 1\r\n")
        self.assertEqual(self.send(b"RETR 3\r\n"), b"+OK %d octets\r\n" % (len(MSG3),) + MSG3 + b".\r\n")
        self.assertEqual(opened.indexes, [0, 1, 2])
        self.assertTrue(opened.files[1].closed)

    def test_deletedNotReadAhead(self) -> None:
        """
        A message marked deleted is not read ahead, and one deleted after
        it was read ahead is still refused.
        """
        opened = _OpenRecorder(self.login())
        self.send(b"DELE 2\r\n")
        self.send(b"RETR 1\r\n")
        self.assertEqual(opened.indexes, [0])
        self.send(b"RSET\r\nRETR 1\r\nDELE 2\r\n")
        self.assertEqual(opened.indexes, [0, 0, 1])
        self.assertEqual(self.send(b"RETR 2\r\n"), b"-ERR Message already deleted.\r\n")

    def test_closedAtQuit(self) -> None:
        """
        A message read ahead and not asked for is closed before the commit.
        """
        maildrop = self.login()
        opened = _OpenRecorder(maildrop)
        self.send(b"RETR 1\r\n")
        self.assertFalse(opened.files[1].closed)
        self.send(b"QUIT\r\n")
        self.assertTrue(opened.files[1].closed)
        self.assertEqual(maildrop.committedSeen, {0})

    def test_closedWhenLost(self) -> None:
        """
        A message read ahead is closed when the connection is lost.
        """
        opened = _OpenRecorder(self.login())
        self.send(b"RETR 1\r\n")
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(opened.files[1].closed)

    def test_largeNotReadAhead(self) -> None:
        """
        A message over L{READ_AHEAD_MAX_SIZE} is not read ahead.
        """
        self.store.boxes.clear()
        self.store.add(ALICE, MSG1, uid="small")
        self.store.add(ALICE, b"x" * READ_AHEAD_MAX_SIZE + b"\r\n", uid="large")
        opened = _OpenRecorder(self.login())
        self.send(b"RETR 1\r\n")
        self.assertEqual(opened.indexes, [0])

    def test_failureAnsweredAtRetr(self) -> None:
        """
        A message that cannot be opened ahead is answered as before when
        it is asked for.
        """
        self.store.vanished.add("u2")
        opened = _OpenRecorder(self.login())
        self.send(b"RETR 1\r\n")
        self.assertEqual(self.failures(), [])
        self.assertEqual(
            self.send(b"RETR 2\r\nNOOP\r\n"),
            b"-ERR [SYS/TEMP] Message temporarily unavailable.\r\n+OK\r\n",
        )
        self.assertEqual(opened.indexes, [0, 1])

    def test_readFailureAtRetr(self) -> None:
        """
        A message whose first read fails while it is read ahead fails as it
        would have when asked for: nothing is sent for it, the failure is
        logged at the RETR and the connection closed.
        """
        opened = _OpenRecorder(self.login())
        broken = _TrackedFile(MSG2)
        broken.failAfter = 0
        original = opened._open
        opened._open = lambda index: defer.succeed(broken) if index == 1 else original(index)
        self.send(b"RETR 1\r\n")
        self.assertEqual(self.failures(), [])
        self.assertEqual(self.send(b"RETR 2\r\n"), b"")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual([f.type for f in self.failures()], [OSError])
        self.assertTrue(broken.closed)


class _WireFile(io.BytesIO):
    """
    A message file that tells when it is C{exhausted}, as the Maildir
    reader does.
    """

    @property
    def exhausted(self) -> bool:
        return self.tell() >= len(self.getbuffer())


class WholeReadAheadTests(_Harness):
    """
    A RETR of a message read ahead whole (its file tells it is exhausted)
    is answered at once, in the call that reads the command: the same
    bytes as a streamed transfer, with no command in flight.
    """

    def setUp(self) -> None:
        super().setUp()
        self.holds: list = []

    def loginWire(self, **kwargs) -> _OpenRecorder:
        """
        Log in (C{kwargs} as for L{login}) with message files that tell
        when they are exhausted, and record the commands held in flight.
        """
        opened = _OpenRecorder(self.login(**kwargs))
        original = opened._open

        def wire(index: int) -> defer.Deferred:
            return original(index).addCallback(lambda f: _WireFile(f.read()))

        opened._open = wire
        hold = self.proto.hold

        def recordHold(d: defer.Deferred) -> None:
            self.holds.append(d)
            hold(d)

        self.proto.hold = recordHold  # type: ignore[method-assign]
        return opened

    def test_answeredWithoutHold(self) -> None:
        """
        RETR 1 is streamed (nothing was read ahead); RETR 2, read ahead
        whole, is answered dot-stuffed without holding a command, its file
        closed, and message 3 is read ahead in turn.
        """
        opened = self.loginWire()
        self.assertEqual(self.send(b"RETR 1\r\n"), b"+OK %d octets\r\n" % (len(MSG1),) + MSG1 + b".\r\n")
        self.assertEqual(len(self.holds), 1)
        self.assertEqual(
            self.send(b"RETR 2\r\n"),
            b"+OK %d octets\r\n" % (len(MSG2),)
            + b"Subject: two\r\n\r\n..dot line\r\n...two dots\r\n..\r\nend\r\n.\r\n",
        )
        self.assertEqual(len(self.holds), 1)
        self.assertFalse(self.proto.commandInFlight)
        self.assertTrue(opened.files[1].closed)
        self.assertEqual(opened.indexes, [0, 1, 2])

    def test_pipelinedCounted(self) -> None:
        """
        Pipelined RETRs of messages read ahead are answered in order, and
        each counts in the logout line (retrieved, bytes) and marks its
        message seen at QUIT.
        """
        opened = self.loginWire()
        self.assertEqual(
            self.send(b"RETR 1\r\nRETR 2\r\nRETR 3\r\nNOOP\r\n"),
            b"+OK %d octets\r\n" % (len(MSG1),)
            + MSG1
            + b".\r\n+OK %d octets\r\n" % (len(MSG2),)
            + b"Subject: two\r\n\r\n..dot line\r\n...two dots\r\n..\r\nend\r\n.\r\n"
            + b"+OK %d octets\r\n" % (len(MSG3),)
            + MSG3
            + b".\r\n+OK\r\n",
        )
        self.assertEqual(len(self.holds), 1)
        self.assertEqual(self.send(b"LAST\r\n"), b"+OK 3\r\n")
        self.send(b"QUIT\r\n")
        self.assertEqual(self.store.opened[-1].committedSeen, {0, 1, 2})
        self.assertIn(
            'logout: service=pop3 rhost=192.0.2.7 user="alice@example.org" bytes=%d deleted=0 retrieved=3 top=0'
            % (len(MSG1) + len(MSG2) + len(MSG3),),
            self.logLines(),
        )
        self.assertTrue(all(f.closed for f in opened.files))

    def test_withoutFinalLineEnd(self) -> None:
        """
        A message read ahead whole that does not end with a line end gets
        one before the C{.} line; an empty one is the C{.} line alone.
        """
        self.store.boxes.clear()
        self.store.add(ALICE, MSG1, uid="a")
        self.store.add(ALICE, b"Subject: x\r\n\r\nno end", uid="b")
        self.store.add(ALICE, b"", uid="c")
        opened = self.loginWire()
        wire = opened._open
        # The maildrops all serve a final line end: a file without one.
        opened._open = lambda index: defer.succeed(_WireFile(b"Subject: x\r\n\r\nno end")) if index == 1 else wire(index)
        self.send(b"RETR 1\r\n")
        self.assertEqual(self.send(b"RETR 2\r\n"), b"+OK 22 octets\r\nSubject: x\r\n\r\nno end\r\n.\r\n")
        self.assertEqual(self.send(b"RETR 3\r\n"), b"+OK 0 octets\r\n.\r\n")
        self.assertEqual(len(self.holds), 1)

    def test_otherCommandsAfter(self) -> None:
        """
        After a RETR answered at once the session reads on: a bad command
        is refused, a deleted message refused, and the idle timer runs from
        the RETR.
        """
        self.loginWire()
        self.send(b"RETR 1\r\n")
        self.clock.advance(500)
        self.send(b"RETR 2\r\n")
        self.clock.advance(500)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(
            self.send(b"DELE 3\r\nRETR 3\r\n"), b"+OK Message 3 deleted.\r\n-ERR Message already deleted.\r\n"
        )

    def test_waitsWhileClientDoesNotRead(self) -> None:
        """
        While the client does not read (the transport paused the server
        after a write), a pipelined RETR of the message read ahead waits;
        once the client reads on, it is answered in one write, whole, after
        what was sent before it.
        """
        self.loginWire(transport=_PausingTransport(peerAddress=PEER))
        out = self.send(b"RETR 1\r\nRETR 2\r\n")
        self.assertEqual(out, b"+OK %d octets\r\n" % (len(MSG1),) + MSG1 + b".\r\n")
        self.transport.writes.clear()
        self.drain()
        self.assertEqual(
            self.transport.writes,
            [
                b"+OK %d octets\r\n" % (len(MSG2),)
                + b"Subject: two\r\n\r\n..dot line\r\n...two dots\r\n..\r\nend\r\n.\r\n"
            ],
        )
        self.assertEqual(len(self.holds), 1)
