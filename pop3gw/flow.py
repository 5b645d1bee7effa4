# -*- test-case-name: tests.test_pop3,tests.test_smtp -*-
"""
Output flow control shared by the POP3 and submission protocols, and the
way past the transport's buffer: L{idleSocket} says when octets may go
straight to the socket, without a turn of the reactor.
"""

from __future__ import annotations

import socket
from typing import Optional
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IPushProducer
from twisted.internet.tcp import Connection
from twisted.protocols.policies import ProtocolWrapper
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
