"""
Tests for L{pop3gw.lineproto}: the line-protocol core, over a
L{StringTransport} with a L{task.Clock}.
"""

from __future__ import annotations

import socket
from typing import Optional

from twisted.internet import defer, task, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pop3gw.flow import plainConnection
from pop3gw.lineproto import LineProtocol

PEER = IPv4Address("TCP", "192.0.2.7", 40000)


@implementer(ITLSTransport)
class _TLSTransport(StringTransport):
    """
    A L{StringTransport} that records C{startTLS}, or fails it.
    """

    fail = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tlsStarted: list = []

    def startTLS(self, contextFactory) -> None:
        if self.fail:
            raise ValueError("no TLS today")
        self.tlsStarted.append(contextFactory)


class _Echo(LineProtocol):
    """
    A line protocol that answers each line with C{"> line"}, holds the
    command C{WAIT} until the test fires it, and starts TLS on C{TLS}.
    """

    closeTimeout = 10.0
    limit = 20

    def __init__(self, clock: task.Clock, idleTimeout: Optional[float] = 60) -> None:
        super().__init__()
        self._clock = clock
        self._idle = idleTimeout
        self.held: list[defer.Deferred] = []
        self.failed: list[Failure] = []
        self.log = Logger(observer=lambda event: None)

    @property
    def clock(self):
        return self._clock

    @property
    def idleTimeout(self):
        return self._idle

    def connectionMade(self) -> None:
        self.startSession()

    def connectionLost(self, reason=None) -> None:
        self.endSession()

    def lineLimit(self, head: bytes) -> int:
        return self.limit

    def lineReceived(self, line: bytes) -> None:
        if line == b"WAIT":
            d: defer.Deferred = defer.Deferred()
            d.addCallback(lambda reply: self.transport.write(reply))
            self.held.append(d)
            self.hold(d)
        elif line == b"TLS":
            self.transport.write(b"go\r\n")
            self.startTLS(object())
        else:
            self.transport.write(b"> " + line + b"\r\n")

    def lineTooLong(self) -> None:
        self.transport.write(b"too long\r\n")

    def idleTimedOut(self) -> None:
        self.closeConnection(b"idle\r\n")

    def commandFailed(self, reason: Failure) -> None:
        self.failed.append(reason)
        self.closeConnection(b"bug\r\n")


class _Harness(SynchronousTestCase):
    def connect(self, cls=_Echo, **kwargs) -> _Echo:
        self.clock = task.Clock()
        self.proto = cls(self.clock, **kwargs)
        self.transport = _TLSTransport(peerAddress=PEER)
        self.proto.makeConnection(self.transport)
        return self.proto

    def send(self, data: bytes) -> bytes:
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.transport.value()


class FramingTests(_Harness):
    def test_lines(self) -> None:
        """
        Lines end with LF; a CR before it is removed; several lines in one
        segment and one line over several segments are both framed.
        """
        self.connect()
        self.assertEqual(self.send(b"a\r\nb\nc"), b"> a\r\n> b\r\n")
        self.assertEqual(self.send(b"d\r\n"), b"> cd\r\n")

    def test_lineAtLimit(self) -> None:
        """
        A line of exactly the limit, line end included, is read; one octet
        more is too long and the session goes on.
        """
        self.connect()
        self.assertEqual(self.send(b"x" * 18 + b"\r\n"), b"> " + b"x" * 18 + b"\r\n")
        self.assertEqual(self.send(b"x" * 19 + b"\r\nok\r\n"), b"too long\r\n> ok\r\n")

    def test_tooLongAtOnce(self) -> None:
        """
        With C{tooLongAtOnce}, an unterminated line that reaches the limit
        is answered at once and the rest of it, up to its end, is dropped.
        """
        self.connect()
        self.assertEqual(self.send(b"x" * 25), b"too long\r\n")
        self.assertEqual(self.send(b"y" * 100), b"")
        self.assertEqual(self.send(b"yy\r\nok\r\n"), b"> ok\r\n")
        self.assertEqual(len(self.proto._buffer), 0)

    def test_tooLongAtEnd(self) -> None:
        """
        Without C{tooLongAtOnce}, the discarded line is answered when its
        end arrives, and nothing of it is kept meanwhile.
        """

        class AtEnd(_Echo):
            tooLongAtOnce = False

        self.connect(AtEnd)
        self.assertEqual(self.send(b"x" * 25), b"")
        self.assertEqual(len(self.proto._buffer), 0)
        self.assertEqual(self.send(b"y" * 100 + b"\r\nok\r\n"), b"too long\r\n> ok\r\n")

    def test_bareLFCountsAsCRLF(self) -> None:
        """
        With C{bareLFCountsAsCRLF}, a line ended by a bare LF is measured as
        if it ended with CRLF; otherwise by the octets sent.
        """
        self.connect()
        self.assertEqual(self.send(b"x" * 19 + b"\n"), b"> " + b"x" * 19 + b"\r\n")

        class CountCRLF(_Echo):
            bareLFCountsAsCRLF = True

        self.connect(CountCRLF)
        self.assertEqual(self.send(b"x" * 19 + b"\n"), b"too long\r\n")
        self.assertEqual(self.send(b"x" * 18 + b"\n"), b"> " + b"x" * 18 + b"\r\n")


class InFlightTests(_Harness):
    def test_holdKeepsOrder(self) -> None:
        """
        Input after a held command waits until its Deferred fires, then is
        answered in order.
        """
        self.connect()
        self.assertEqual(self.send(b"WAIT\r\na\r\nb\r\n"), b"")
        self.assertTrue(self.proto.commandInFlight)
        self.transport.clear()
        self.proto.held[0].callback(b"done\r\n")
        self.assertEqual(self.transport.value(), b"done\r\n> a\r\n> b\r\n")
        self.assertFalse(self.proto.commandInFlight)

    def test_heldFailure(self) -> None:
        """
        A failure in a held command's callbacks goes to C{commandFailed}.
        """
        self.connect()
        self.send(b"WAIT\r\nlater\r\n")
        self.transport.clear()
        self.proto.held[0].errback(ValueError("boom"))
        self.assertEqual(len(self.proto.failed), 1)
        self.assertEqual(self.transport.value(), b"bug\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_readingPausesAtPendingLimit(self) -> None:
        """
        Reading pauses once C{maxPendingInput} octets wait behind a held
        command, and resumes once they are handled.
        """

        class Small(_Echo):
            maxPendingInput = 30

        self.connect(Small)
        self.send(b"WAIT\r\n" + b"a\r\n" * 9)
        self.assertEqual(self.transport.producerState, "producing")
        self.send(b"a\r\n")
        self.assertEqual(self.transport.producerState, "paused")
        self.proto.held[0].callback(b"")
        self.assertEqual(self.transport.producerState, "producing")

    def test_unreadOutputStopsAnswers(self) -> None:
        """
        While the transport pauses the registered output producer, nothing
        more is answered; once it resumes, the waiting lines are.
        """
        self.connect()
        self.transport.producer.pauseProducing()
        self.assertEqual(self.send(b"a\r\n"), b"")
        self.transport.producer.resumeProducing()
        self.assertEqual(self.transport.value(), b"> a\r\n")


class TimerTests(_Harness):
    def test_idleCountsOnlyCompleteLines(self) -> None:
        """
        Only data holding a line end resets the idle timer: a line trickled
        an octet at a time times out.
        """
        self.connect()
        self.clock.advance(59)
        self.send(b"a\r\n")
        self.clock.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.transport.clear()
        for _ in range(10):
            self.clock.advance(0.5)
            self.proto.dataReceived(b"x")
        self.assertEqual(self.transport.value(), b"idle\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_noIdleTimeout(self) -> None:
        """
        An idle timeout of L{None} never closes the connection.
        """
        self.connect(idleTimeout=None)
        self.clock.advance(10**6)
        self.assertFalse(self.transport.disconnecting)

    def test_closeAbortedWhenUnread(self) -> None:
        """
        A graceful close is aborted if it has not finished after
        C{closeTimeout} seconds; a finished one cancels the timer.
        """
        self.connect()
        self.proto.closeConnection(b"bye\r\n")
        self.assertEqual(self.transport.value(), b"bye\r\n")
        self.clock.advance(9)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnected)
        self.connect()
        self.proto.closeConnection(b"bye\r\n")
        self.proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closeStalledAborts(self) -> None:
        """
        A close while the client does not read aborts at once, without the
        reply.
        """
        self.connect()
        self.transport.producer.pauseProducing()
        self.proto.closeConnection(b"bye\r\n")
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnected)


class StartTLSTests(_Harness):
    def test_pipelinedPlaintextDropped(self) -> None:
        """
        Whatever was pipelined after the TLS command is dropped, never
        answered (CVE-2011-0411); L{secure} is set.
        """
        self.connect()
        self.assertEqual(self.send(b"TLS\r\nevil\r\nmore"), b"go\r\n")
        self.assertEqual(len(self.transport.tlsStarted), 1)
        self.assertTrue(self.proto.secure)
        self.assertEqual(self.send(b"ok\r\n"), b"> ok\r\n")

    def test_startTLSFails(self) -> None:
        """
        If the transport cannot start TLS, the failure is logged and the
        connection closed; nothing more is answered.
        """
        self.connect()
        logged: list = []
        self.proto.log = Logger(observer=logged.append)
        self.transport.fail = True
        self.assertEqual(self.send(b"TLS\r\nok\r\n"), b"go\r\n")
        self.assertFalse(self.proto.secure)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual([e["log_format"] for e in logged], ["starting TLS failed"])


class _Replying(_Echo):
    """
    An L{_Echo} that answers with L{LineProtocol.sendReply}.
    """

    def lineReceived(self, line: bytes) -> None:
        if line == b"BYE":
            self.closeConnection(b"bye\r\n")
        else:
            self.sendReply(b"> " + line + b"\r\n")


class _Port:
    """
    What L{tcp.Server} asks of its listening port.
    """

    _realPortNumber = 110


class _ShortSocket:
    """
    A socket whose C{send} takes at most C{limit} octets.
    """

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self._sock = sock
        self.limit = limit

    def send(self, data) -> int:
        return self._sock.send(data[: self.limit])

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class _WritingWrapper(ProtocolWrapper):
    """
    A wrapper that changes what is written.
    """

    def write(self, data: bytes) -> None:
        super().write(data.upper())


class SendReplyTests(SynchronousTestCase):
    """
    L{LineProtocol.sendReply} writes a reply straight to the socket of a
    plain TCP connection whose output buffer is empty, and through the
    transport otherwise, never changing the order of the output.
    """

    def setUp(self) -> None:
        ours, self.peer = socket.socketpair()
        ours.setblocking(False)
        self.peer.setblocking(False)
        self.addCleanup(ours.close)
        self.addCleanup(self.peer.close)
        self.reactor = MemoryReactorClock()
        self.proto = _Replying(task.Clock())
        self.connection = tcp.Server(ours, self.proto, ("192.0.2.7", 40000), _Port(), 1, self.reactor)
        self.proto.makeConnection(self.connection)

    def received(self) -> bytes:
        """
        What the peer can read now (nothing if nothing was sent).
        """
        try:
            return self.peer.recv(65536)
        except BlockingIOError:
            return b""

    def test_sentAtOnce(self) -> None:
        """
        On a plain TCP connection with nothing buffered, the reply is on
        the socket when C{sendReply} returns, and the connection is not
        registered for writing.
        """
        self.proto.dataReceived(b"hello\r\n")
        self.assertEqual(self.received(), b"> hello\r\n")
        self.assertNotIn(self.connection, self.reactor.writers)
        self.assertEqual(self.connection._tempDataLen, 0)

    def test_afterBufferedOutput(self) -> None:
        """
        While output written before waits in the transport's buffer, a
        reply goes behind it, through the buffer.
        """
        self.connection.write(b"first\r\n")
        self.proto.dataReceived(b"hello\r\n")
        self.assertEqual(self.received(), b"")
        self.connection.doWrite()
        self.assertEqual(self.received(), b"first\r\n> hello\r\n")

    def test_partlySent(self) -> None:
        """
        What the socket does not take goes through the transport's
        buffer, and the reply after it goes behind it.
        """
        self.connection.socket = _ShortSocket(self.connection.socket, 3)
        self.proto.dataReceived(b"hello\r\nagain\r\n")
        self.assertEqual(self.received(), b"> h")
        self.assertIn(self.connection, self.reactor.writers)
        while self.connection in self.reactor.writers:
            self.connection.doWrite()
        self.assertEqual(self.received(), b"ello\r\n> again\r\n")

    def test_closing(self) -> None:
        """
        The last reply of L{LineProtocol.closeConnection} goes out at once
        too, and the connection then closes.
        """
        self.proto.dataReceived(b"BYE\r\n")
        self.assertEqual(self.received(), b"bye\r\n")
        self.assertTrue(self.connection.disconnecting)
        self.proto.sendReply(b"late\r\n")
        self.assertEqual(self.received(), b"")

    def test_closedWithoutWriteTurn(self) -> None:
        """
        When the last reply of L{LineProtocol.closeConnection} went out at
        once, the connection is never registered for writing and no abort
        timer is set: it stops reading, and at the reactor's next turn the
        socket is shut down and closed and the protocol told.
        """
        self.proto.dataReceived(b"BYE\r\n")
        self.assertEqual(self.received(), b"bye\r\n")
        self.assertNotIn(self.connection, self.reactor.writers)
        self.assertNotIn(self.connection, self.reactor.readers)
        self.assertEqual(self.proto.clock.getDelayedCalls(), [])
        self.assertFalse(self.proto._disconnected)
        self.reactor.advance(0)
        self.assertTrue(self.proto._disconnected)
        self.assertTrue(self.connection.disconnected)
        self.peer.setblocking(True)
        self.assertEqual(self.peer.recv(100), b"")

    def test_writtenBeforeTheClose(self) -> None:
        """
        Output written to the transport after that last reply and before
        the next turn is not lost: the connection closes once it is sent,
        as C{loseConnection} would.
        """
        self.proto.dataReceived(b"BYE\r\n")
        self.connection.write(b"after\r\n")
        self.reactor.advance(0)
        self.assertFalse(self.connection.disconnected)
        self.assertIn(self.connection, self.reactor.writers)
        while self.connection in self.reactor.writers and not self.connection.disconnected:
            why = self.connection.doWrite()
            if why:
                self.connection.connectionLost(Failure(why))
        self.assertTrue(self.connection.disconnected)
        self.assertEqual(self.received(), b"bye\r\nafter\r\n")

    def test_closeBehindBufferedOutput(self) -> None:
        """
        A close whose reply waits behind buffered output goes through
        C{loseConnection}, with the abort timer.
        """
        self.connection.write(b"first\r\n")
        self.proto.dataReceived(b"BYE\r\n")
        self.assertTrue(self.connection.disconnecting)
        self.assertEqual(len(self.proto.clock.getDelayedCalls()), 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_wrappers(self) -> None:
        """
        The connection under a L{ProtocolWrapper} that writes what it is
        given is written to directly; not under a wrapper that changes it,
        nor under TLS.
        """
        factory = WrappingFactory(None)
        plain = ProtocolWrapper(factory, self.proto)
        plain.transport = self.connection
        self.assertIs(plainConnection(plain), self.connection)
        self.assertIs(plainConnection(self.connection), self.connection)
        changing = _WritingWrapper(factory, self.proto)
        changing.transport = self.connection
        self.assertIsNone(plainConnection(changing))
        tls = TLSMemoryBIOProtocol.__new__(TLSMemoryBIOProtocol)
        tls.transport = self.connection
        self.assertIsNone(plainConnection(tls))
        self.assertIsNone(plainConnection(StringTransport()))
        self.connection.TLS = True
        self.assertIsNone(plainConnection(self.connection))

    def test_notAfterStartTLS(self) -> None:
        """
        Once TLS started, replies go through the transport.
        """
        self.proto.secure = True
        self.proto.sendReply(b"secret\r\n")
        self.assertEqual(self.received(), b"")
        self.assertEqual(self.connection._tempDataLen, 8)
