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

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

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

    When the per-address count is kept by another process (L{PeerCounts.claim}
    answered with a C{Deferred}), the connection waits paused, its protocol
    not started, until the claim is answered.

    @ivar _limitHost: the client network this connection counts against in
        L{ConnectionLimitFactory.perPeer} (set by the factory).
    @ivar _limitClaimed: whether this connection holds a claim on
        C{_limitHost} that must be released (L{PeerCounts.release}).
    @ivar _limitCounted: whether this connection, exempt from the
        per-address cap, is only counted (L{PeerCounts.add}).
    @ivar _verdict: the claim's answer still awaited, if any.
    """

    _limitHost: Optional[str] = None
    _limitClaimed = False
    _limitCounted = False
    _verdict: "Deferred | None" = None
    _started = True
    _lost = False

    def makeConnection(self, transport) -> None:
        setNoDelay = getattr(transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:
                pass
        verdict = self._verdict
        if verdict is None:
            super().makeConnection(transport)
            return
        self._started = False
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        transport.pauseProducing()
        verdict.addErrback(lambda _: False).addCallback(self._decided)

    def _decided(self, granted: bool) -> None:
        """
        The claim on C{_limitHost} was answered: start the protocol, or
        refuse.
        """
        self._verdict = None
        transport = self.transport
        assert transport is not None, "connected"
        if self._lost:
            if granted:
                self.factory.perPeer.release(self._limitHost)
            return
        if not granted:
            self.factory._refused(describePeer(transport.getPeer()), self.factory.maxPerPeer, transport)
            return
        self._limitClaimed = True
        self._started = True
        transport.resumeProducing()  # type: ignore[attr-defined]
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._started:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


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

    def claim(self, host: str, limit: int) -> "bool | Deferred":
        """
        Count one more connection of C{host} unless it has C{limit} already.

        @return: whether it was counted; a subclass whose counts are kept
            elsewhere returns a C{Deferred} firing with that.
        """
        if self.get(host) >= limit:
            return False
        self.add(host)
        return True

    def release(self, host: str) -> None:
        """
        Give back a connection counted by a granted L{claim}.
        """
        self.remove(host)


class PeerTokens:
    """
    The per-address connection counts of several processes (the workers),
    kept in one place (the supervisor), so the per-address cap holds for
    the connections of one client whichever worker accepted them.  Each
    count is kept per owner (worker), so the connections of a worker that
    dies go with it (L{dropOwner}).

    @ivar counts: client network -> open connections over all owners.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._owned: dict[object, dict[str, int]] = {}

    def get(self, key: str) -> int:
        return self.counts.get(key, 0)

    def acquire(self, owner: object, key: str, limit: int) -> bool:
        """
        Count one more connection of C{key} for C{owner}, unless C{key} has
        C{limit} connections already.

        @return: whether it was counted.
        """
        if self.counts.get(key, 0) >= limit:
            return False
        self.counts[key] = self.counts.get(key, 0) + 1
        owned = self._owned.setdefault(owner, {})
        owned[key] = owned.get(key, 0) + 1
        return True

    def release(self, owner: object, key: str) -> None:
        """
        Give back one connection of C{key} counted for C{owner} (none if
        it holds none).
        """
        owned = self._owned.get(owner)
        if not owned or key not in owned:
            return
        self._take(owned, key, 1)

    def dropOwner(self, owner: object) -> None:
        """
        Forget every connection counted for C{owner}.
        """
        owned = self._owned.pop(owner, {})
        for key, n in list(owned.items()):
            self._take(owned, key, n)

    def _take(self, owned: dict, key: str, n: int) -> None:
        left = owned[key] - n
        if left > 0:
            owned[key] = left
        else:
            del owned[key]
        total = self.counts[key] - n
        if total > 0:
            self.counts[key] = total
        else:
            del self.counts[key]


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
        if self.maxTotal and self.total >= self.maxTotal:
            self._logRefusal(host, self.perPeer.get(key))
            return _RefuseProtocol(self.refusal)
        verdict: "bool | Deferred" = True
        exempt = False
        if self.maxPerPeer and not isLoopback(host):
            verdict = self.perPeer.claim(key, self.maxPerPeer)
            if verdict is False:
                self._logRefusal(host, self.perPeer.get(key))
                return _RefuseProtocol(self.refusal)
        else:
            self.perPeer.add(key)
            exempt = True
        p = super().buildProtocol(addr)
        if isinstance(p, _NoDelayWrapper):
            p._limitHost = key
            if exempt:
                p._limitCounted = True
            elif isinstance(verdict, Deferred):
                p._verdict = verdict
            else:
                p._limitClaimed = True
            self.total += 1
        return p

    def _refused(self, host: str, count: int, transport) -> None:
        """
        Refuse a connection already made (its claim was refused).
        """
        self._logRefusal(host, count)
        if self.refusal:
            transport.write(self.refusal)
        transport.loseConnection()

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
        if p._limitClaimed:
            self.perPeer.release(host)
        elif p._limitCounted:
            self.perPeer.remove(host)
