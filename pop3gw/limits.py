# -*- test-case-name: tests.test_limits -*-
"""
Connection limits for every listener: a total cap and a per-peer cap, so a
stranger cannot exhaust file descriptors or memory by opening connections.

Clients are counted per IPv4 address and per IPv6 /64 (L{clientNetwork}).
Loopback peers (127.0.0.0/8, ::1) and Unix-socket peers are exempt from the
per-peer cap (they are the operator's own tools and local MTAs) but count
towards the total.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from pop3gw.address import clientNetwork, describePeer, isLoopback

#: Seconds between two "connection refused" log lines of one listener.
REFUSAL_LOG_INTERVAL = 60.0


class _RefuseProtocol(Protocol):
    """
    Writes one fixed refusal line, if any, and closes.
    """

    def __init__(self, message: "bytes | None") -> None:
        self._message = message

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None, "connected"
        if self._message:
            transport.write(self._message)
        transport.loseConnection()


class _NoDelayWrapper(ProtocolWrapper):
    """
    Turns off Nagle's algorithm: POP3 and SMTP are request/reply protocols,
    and Nagle plus delayed ACKs would stall small replies (notably the first
    one after a TLS handshake) by about 40 ms.

    @ivar _limitHost: the client network this connection counts against in
        L{ConnectionLimitFactory.perPeer} (set by the factory).
    """

    _limitHost: Optional[str] = None

    def makeConnection(self, transport) -> None:
        setNoDelay = getattr(transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:
                pass
        super().makeConnection(transport)


class PeerCounts:
    """
    Open connections per client (keyed by L{clientNetwork}), shared by every
    listener, so the per-address cap holds across POP3, submission and their
    TLS ports together.
    """

    def __init__(self) -> None:
        self.counts: dict = {}

    def get(self, host: str) -> int:
        return self.counts.get(host, 0)

    def add(self, host: str) -> None:
        self.counts[host] = self.counts.get(host, 0) + 1

    def remove(self, host: str) -> None:
        left = self.counts.get(host, 1) - 1
        if left > 0:
            self.counts[host] = left
        else:
            self.counts.pop(host, None)


class ConnectionLimitFactory(WrappingFactory):
    """
    Wraps a listener's factory; refuses connections over C{maxTotal} in all
    on this listener, or over C{maxPerPeer} from one non-loopback client on
    all listeners sharing C{peerCounts}, with C{refusal} (one
    protocol-appropriate line, e.g. C{b"-ERR [SYS/TEMP] Too many
    connections\\r\\n"}), or, with C{refusal=None}, by closing the
    connection without a byte: on an implicit-TLS listener the limiter sits
    outside the TLS layer, and a plaintext line would land in the client's
    TLS handshake.
    """

    log = Logger()
    protocol = _NoDelayWrapper
    noisy = False

    def __init__(
        self,
        wrappedFactory,
        maxTotal: int,
        maxPerPeer: int,
        refusal: "bytes | None",
        peerCounts: "PeerCounts | None" = None,
        clock=None,
    ) -> None:
        """
        @param clock: an C{IReactorTime}; with it, refusals are logged at
            most once per L{REFUSAL_LOG_INTERVAL} seconds (with a count), so
            a connection flood does not flood the log.
        """
        super().__init__(wrappedFactory)
        self.clock = clock
        self._lastRefusalLog: "float | None" = None
        self._unloggedRefusals = 0
        self.maxTotal = maxTotal
        self.maxPerPeer = maxPerPeer
        self.refusal = refusal
        self.perPeer = peerCounts if peerCounts is not None else PeerCounts()
        self.total = 0

    def buildProtocol(self, addr):
        host = describePeer(addr)
        key = clientNetwork(host)
        count = self.perPeer.get(key)
        if (self.maxTotal and self.total >= self.maxTotal) or (
            self.maxPerPeer and count >= self.maxPerPeer and not isLoopback(host)
        ):
            self._logRefusal(host, count)
            return _RefuseProtocol(self.refusal)
        p = super().buildProtocol(addr)
        if isinstance(p, _NoDelayWrapper):
            p._limitHost = key
            self.perPeer.add(key)
            self.total += 1
        return p

    def _logRefusal(self, host: str, count: int) -> None:
        now = self.clock.seconds() if self.clock is not None else None
        if now is not None and self._lastRefusalLog is not None and now - self._lastRefusalLog < REFUSAL_LOG_INTERVAL:
            self._unloggedRefusals += 1
            return
        self._lastRefusalLog = now
        self.log.warn(
            "connection refused: too many connections rhost={peer} total={total} from_peer={count}"
            " (and {more} more refused since the last such line)",
            peer=host,
            total=self.total,
            count=count,
            more=self._unloggedRefusals,
        )
        self._unloggedRefusals = 0

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        host = getattr(p, "_limitHost", None)
        if host is None:
            return
        self.total -= 1
        self.perPeer.remove(host)
