# -*- test-case-name: tests.test_limits -*-
"""
Connection limits for every listener: a total cap and a per-peer cap, so a
stranger cannot exhaust file descriptors or memory by opening connections.

Loopback peers (127.0.0.0/8, ::1) are exempt from the per-peer cap (they are
the operator's own tools and local MTAs) but count towards the total.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from pop3gw.address import isLoopback


class _RefuseProtocol(Protocol):
    """
    Writes one fixed refusal line and closes.
    """

    def __init__(self, message: bytes) -> None:
        self._message = message

    def connectionMade(self) -> None:
        self.transport.write(self._message)
        self.transport.loseConnection()


class _NoDelayWrapper(ProtocolWrapper):
    """
    Turns off Nagle's algorithm: POP3 and SMTP are request/reply protocols,
    and Nagle plus delayed ACKs would stall small replies (notably the first
    one after a TLS handshake) by about 40 ms.
    """

    def makeConnection(self, transport) -> None:
        setNoDelay = getattr(transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:
                pass
        super().makeConnection(transport)


class ConnectionLimitFactory(WrappingFactory):
    """
    Wraps a listener's factory; refuses connections over C{maxTotal} in all
    or C{maxPerPeer} from one non-loopback address with C{refusal} (one
    protocol-appropriate line, e.g. C{b"-ERR [SYS/TEMP] Too many
    connections\\r\\n"}).
    """

    log = Logger()
    protocol = _NoDelayWrapper
    noisy = False

    def __init__(self, wrappedFactory, maxTotal: int, maxPerPeer: int, refusal: bytes) -> None:
        super().__init__(wrappedFactory)
        self.maxTotal = maxTotal
        self.maxPerPeer = maxPerPeer
        self.refusal = refusal
        self.perPeer: dict = {}
        self.total = 0

    def buildProtocol(self, addr):
        host = getattr(addr, "host", None) or ""
        count = self.perPeer.get(host, 0)
        if (self.maxTotal and self.total >= self.maxTotal) or (
            self.maxPerPeer and count >= self.maxPerPeer and not isLoopback(host)
        ):
            self.log.warn(
                "connection refused: too many connections rhost={peer} total={total} from_peer={count}",
                peer=host,
                total=self.total,
                count=count,
            )
            return _RefuseProtocol(self.refusal)
        p = super().buildProtocol(addr)
        if p is not None:
            p._limitHost = host
            self.perPeer[host] = count + 1
            self.total += 1
        return p

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        host = getattr(p, "_limitHost", None)
        if host is None:
            return
        self.total -= 1
        left = self.perPeer.get(host, 1) - 1
        if left > 0:
            self.perPeer[host] = left
        else:
            self.perPeer.pop(host, None)
