# -*- test-case-name: tests.test_pop3,tests.test_smtp -*-
"""
Output flow control shared by the POP3 and submission protocols, and the
way past the transport's buffer: L{idleSocket} says when octets may go
straight to the socket, without a turn of the reactor.
"""

from __future__ import annotations

import socket
from typing import Optional, cast
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.tcp import Connection
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import implementer


def plainConnection(transport: object) -> Optional[Connection]:
    """
    The TCP connection C{transport} writes to unchanged: the transport
    itself, or the one under any number of C{ProtocolWrapper}s that do not
    change what is written (C{write} not overridden: never TLS).

    @return: that connection, or C{None} if there is none.
    """
    while isinstance(transport, ProtocolWrapper) and type(transport).write is ProtocolWrapper.write:
        transport = transport.transport
    if isinstance(transport, Connection) and type(transport).write is Connection.write and not transport.TLS:
        return transport
    return None


def idleSocket(connection: Optional[Connection]) -> Optional[socket.socket]:
    """
    The socket of C{connection} if octets sent on it now go out exactly as
    C{connection.write} would send them: connected, not running TLS, not
    closing, nothing waiting in its write buffer.

    This reads attributes of C{twisted.internet.abstract.FileDescriptor}
    that are not part of its interface (C{dataBuffer}, C{offset},
    C{_tempDataLen}, C{_writeDisconnected}); if one is missing the answer is
    C{None}, and the transport's own C{write} is used.

    @param connection: from L{plainConnection}.
    @return: the socket, or C{None}.
    """
    if (
        connection is None
        or connection.TLS
        or not connection.connected
        or connection.disconnecting
        or getattr(connection, "_writeDisconnected", True)
        or getattr(connection, "_tempDataLen", 1)
        or len(getattr(connection, "dataBuffer", b"?")) != getattr(connection, "offset", -1)
    ):
        return None
    return connection.socket


def closeAtOnce(connection: Optional[Connection]) -> bool:
    """
    Close C{connection} (from L{plainConnection}), whose output has all
    gone to the socket (L{idleSocket}), as its C{loseConnection} would,
    without registering it for writing only to find nothing to write:
    stop reading now, and at the reactor's next turn shut the socket down
    and close it (orderly, as C{loseConnection} ends) and tell the
    protocol, as C{abortConnection} does for an abortive close.  If
    anything is written to the connection before that turn, it is sent
    first and the connection closes after it, as with C{loseConnection}.

    @return: whether the connection is closing this way; if not, call
        C{loseConnection}.
    """
    if idleSocket(connection) is None or getattr(connection, "producer", True) is not None:
        return False
    assert connection is not None
    connection.stopReading()
    connection.disconnecting = True
    cast(IReactorTime, connection.reactor).callLater(0, _closeIdle, connection)
    return True


def _closeIdle(connection: Connection) -> None:
    """
    The turn after L{closeAtOnce}: close C{connection} unless it is gone
    already or output written meanwhile waits in its buffer (the transport,
    registered for writing by C{write}, then closes it once that is sent:
    its C{disconnecting} is set).
    """
    if connection.disconnected or not hasattr(connection, "socket"):
        return
    if connection._tempDataLen or len(connection.dataBuffer) != connection.offset:
        return
    connection.connectionLost(Failure(CONNECTION_DONE))


class FlowControlled(TypingProtocol):
    """
    What an L{OutputFlow} needs of its protocol.
    """

    _outputRegistered: bool

    def _outputPaused(self) -> None: ...

    def _outputResumed(self) -> None: ...


@implementer(IPushProducer)
class OutputFlow:
    """
    The producer a protocol registers with its transport for the whole
    connection.  The transport pauses it while its write buffer is full (the
    client is not reading its replies); the protocol then answers nothing
    more, so a client that sends without reading cannot make the server
    buffer unbounded output.

    @ivar paused: whether the transport asked for a pause.
    """

    __slots__ = ("_server", "paused")

    def __init__(self, server: FlowControlled) -> None:
        self._server = server
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self._server._outputPaused()

    def resumeProducing(self) -> None:
        self.paused = False
        self._server._outputResumed()

    def register(self, transport) -> None:
        """
        Register with C{transport} for the whole connection.
        """
        transport.registerProducer(self, True)
        self._server._outputRegistered = True

    def unregister(self, transport, log) -> None:
        """
        Unregister from C{transport}, unless the transport already dropped
        this producer (see L{stopProducing}).
        """
        if not self._server._outputRegistered:
            return
        self._server._outputRegistered = False
        try:
            transport.unregisterProducer()
        except Exception:
            log.failure("unregistering the output producer failed")

    def stopProducing(self) -> None:
        """
        The connection is going away and the transport has dropped this
        producer, so the protocol must not unregister it: after STLS or
        STARTTLS a TCP transport has already discarded its TLS layer by the
        time the protocol's C{connectionLost} runs, and unregistering would
        fail.  The protocol's C{connectionLost} cleans up the rest.
        """
        self._server._outputRegistered = False
