"""
Tests for L{pop3gw.socketmap}: the Postfix socketmap lookup server, over
L{StringTransport} with a L{task.Clock}.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.internet.address import UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pop3gw import socketmap
from pop3gw.address import Address
from pop3gw.interfaces import TemporaryFailure
from pop3gw.testing import FakeRouter, FakeUserDatabase

ALICE = Address.parse("alice@example.org")
BOB = Address.parse("bob@example.org")
CAROL = Address.parse("carol@other.example")


class UnavailableRouter(FakeRouter):
    """
    A router whose users directory cannot be read.
    """

    def checkLocalRecipient(self, address):
        raise TemporaryFailure("users file unreadable")


class SocketmapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.users = FakeUserDatabase(
            {ALICE: "x", BOB: "x", CAROL: "x"},
            aliases={Address.parse("team@example.org"): (ALICE, BOB), Address.parse("info@example.org"): ALICE},
        )
        self.router = FakeRouter(domains=("example.org", "other.example"), users=self.users)
        self.clock = task.Clock()

    def connect(self, router=None):
        factory = socketmap.SocketmapFactory(router or self.router, idleTimeout=60)
        proto = factory.buildProtocol(UNIXAddress(None))
        proto.callLater = self.clock.callLater  # type: ignore[method-assign]
        transport = StringTransport(peerAddress=UNIXAddress(None))
        proto.makeConnection(transport)
        return proto, transport

    def ask(self, request: bytes, router=None) -> bytes:
        proto, transport = self.connect(router)
        proto.dataReceived(socketmap.netstring(request))
        self.assertFalse(transport.disconnecting)
        return transport.value()

    def test_user(self) -> None:
        """
        A user of a local domain is C{OK} with the user's address.
        """
        self.assertEqual(self.ask(b"recipients alice@example.org"), b"20:OK alice@example.org,")

    def test_caseInsensitive(self) -> None:
        """
        The local part and the domain are found in any case.
        """
        self.assertEqual(self.ask(b"recipients ALICE@Example.ORG"), b"20:OK alice@example.org,")

    def test_alias(self) -> None:
        """
        An alias is C{OK} with its users, a list with all of them.
        """
        self.assertEqual(self.ask(b"recipients info@example.org"), b"20:OK alice@example.org,")
        self.assertEqual(self.ask(b"recipients Team@example.org"), b"36:OK alice@example.org,bob@example.org,")

    def test_subAddress(self) -> None:
        """
        A sub-address resolves to its user.
        """
        self.assertEqual(self.ask(b"recipients alice+lists@example.org"), b"20:OK alice@example.org,")

    def test_catchAll(self) -> None:
        """
        With a catch-all, any local part of its domain is C{OK}; the other
        domains are not affected.
        """
        self.users.catchAll["example.org"] = BOB
        self.assertEqual(self.ask(b"recipients whoever@example.org"), b"18:OK bob@example.org,")
        self.assertEqual(self.ask(b"recipients whoever@other.example"), b"9:NOTFOUND ,")

    def test_unknownUser(self) -> None:
        """
        An unknown user of a local domain is C{NOTFOUND }.
        """
        self.assertEqual(self.ask(b"recipients nobody@example.org"), b"9:NOTFOUND ,")

    def test_notLocal(self) -> None:
        """
        An address outside the local domains is C{NOTFOUND }.
        """
        self.assertEqual(self.ask(b"recipients alice@elsewhere.example"), b"9:NOTFOUND ,")

    def test_notAnAddress(self) -> None:
        """
        A key that is not a plain address (Postfix's C{@domain} probe, a
        percent hack with two C{@}, a bare local part) is C{NOTFOUND }.
        """
        for key in (b"@example.org", b"alice@remote@example.org", b"alice", b"\xff@example.org"):
            self.assertEqual(self.ask(b"recipients " + key), b"9:NOTFOUND ,", key)

    def test_disguisedRelay(self) -> None:
        """
        What the MX listener refuses as a disguised relay is not found,
        even where a catch-all would take any local part: the percent hack,
        a bang path, a domain with a trailing dot.  Postfix must not accept
        what pop3gw will refuse.
        """
        self.users.catchAll["example.org"] = BOB
        for key in (b"alice%remote.example@example.org", b"remote.example!alice@example.org", b"alice@example.org."):
            self.assertEqual(self.ask(b"recipients " + key), b"9:NOTFOUND ,", key)

    def test_temporary(self) -> None:
        """
        An unavailable users directory is C{TEMP}, so Postfix defers
        rather than refuses.
        """
        self.assertEqual(
            self.ask(b"recipients alice@example.org", UnavailableRouter(users=self.users)),
            b"26:TEMP directory unavailable,",
        )

    def test_unknownMap(self) -> None:
        """
        Any map other than C{recipients} is C{PERM unknown map}.
        """
        self.assertEqual(self.ask(b"aliases alice@example.org"), b"16:PERM unknown map,")

    def test_noKey(self) -> None:
        """
        A request without a space is C{PERM invalid request}.
        """
        self.assertEqual(self.ask(b"recipients"), b"20:PERM invalid request,")

    def test_severalRequests(self) -> None:
        """
        Several requests in one read are answered in order on the one
        connection.
        """
        proto, transport = self.connect()
        proto.dataReceived(
            socketmap.netstring(b"recipients alice@example.org") + socketmap.netstring(b"recipients x@example.org")
        )
        self.assertEqual(transport.value(), b"20:OK alice@example.org,9:NOTFOUND ,")
        proto.dataReceived(socketmap.netstring(b"recipients bob@example.org"))
        self.assertEqual(transport.value(), b"20:OK alice@example.org,9:NOTFOUND ,18:OK bob@example.org,")
        self.assertFalse(transport.disconnecting)

    def test_splitRequest(self) -> None:
        """
        A request arriving byte by byte is answered once it is complete.
        """
        proto, transport = self.connect()
        for i, byte in enumerate(b"28:recipients alice@example.org,"):
            self.assertEqual(transport.value(), b"", i)
            proto.dataReceived(bytes([byte]))
        self.assertEqual(transport.value(), b"20:OK alice@example.org,")

    def assertClosed(self, data: bytes, reason: str) -> None:
        proto, transport = self.connect()
        with capturedLogs() as events:
            proto.dataReceived(data)
            proto.dataReceived(socketmap.netstring(b"recipients alice@example.org"))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(
            [formatEvent(e) for e in events], [f"postfix-map: closing connection rhost=unix: {reason}"]
        )

    def test_malformed(self) -> None:
        """
        A malformed netstring closes the connection without a reply, with
        one log line.
        """
        self.assertClosed(b"x:recipients,", "malformed netstring")
        self.assertClosed(b"4:abcd;", "malformed netstring")
        self.assertClosed(b"-1:", "malformed netstring")
        self.assertClosed(b":", "malformed netstring")
        self.assertClosed(b"1234567", "malformed netstring")

    def test_tooLong(self) -> None:
        """
        A netstring announcing more than L{socketmap.MAX_NETSTRING} octets
        closes the connection before its data arrives.
        """
        self.assertClosed(b"%d:" % (socketmap.MAX_NETSTRING + 1), "netstring too long")

    def test_longestAccepted(self) -> None:
        """
        A netstring of exactly L{socketmap.MAX_NETSTRING} octets is read
        and answered.
        """
        key = b"a" * (socketmap.MAX_NETSTRING - len(b"recipients "))
        self.assertEqual(self.ask(b"recipients " + key), b"9:NOTFOUND ,")

    def test_idleTimeout(self) -> None:
        """
        A connection idle for the factory's C{idleTimeout} is closed; any
        request resets the clock.
        """
        proto, transport = self.connect()
        self.clock.advance(59)
        proto.dataReceived(socketmap.netstring(b"recipients alice@example.org"))
        self.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
