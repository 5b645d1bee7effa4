# -*- test-case-name: tests.test_pop3,tests.test_smtp -*-
"""
Output flow control shared by the POP3 and submission protocols.
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


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
