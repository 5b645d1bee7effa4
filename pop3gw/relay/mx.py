# -*- test-case-name: tests.test_relay_mx -*-
"""
Where mail for a domain goes: MX resolution (L{MXResolver}) and the policy
that direct delivery connects only to public addresses
(L{isPublicAddress}, L{PublicOnlyReactor}).

A domain's MX records are sorted by preference; the domain itself is its
implicit MX when it has none (RFC 5321 section 5.1); a null MX (RFC 7505) or
a domain that does not exist fails permanently; hosts whose addresses are
all non-public are skipped, and a domain left with none fails permanently
with 5.4.4.  The address check is made twice: here, on what the lookup saw,
and when connecting (L{PublicOnlyReactor}), on what the name resolves to
then.
"""

from __future__ import annotations

import ipaddress
from typing import Optional

from twisted.internet import defer, udp
from twisted.internet.base import BasePort
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.names import dns
from twisted.names import error as dnserror
from zope.interface import implementer

from pop3gw.dsn import oneLine


class PermanentLookupFailure(Exception):
    """
    DNS says the domain cannot receive mail.

    @ivar status: the RFC 3463 status for its recipients.
    @ivar text: why, in plain words.
    """

    def __init__(self, status: str, text: str):
        Exception.__init__(self, text)
        self.status = status
        self.text = text


def isPublicAddress(text: str) -> bool:
    """
    Whether a mail exchanger at the IP address C{text} may be connected to:
    a globally reachable unicast address (C{ipaddress}'s C{is_global}: not
    loopback, private (RFC 1918, fc00::/7, ...), shared (100.64.0.0/10),
    link-local, unspecified, reserved or for documentation), and not
    multicast; an IPv4-mapped IPv6 address is judged by its IPv4 address.  Direct MX delivery never connects elsewhere, so that a
    recipient domain cannot point the relay at internal services.
    """
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


@implementer(IResolutionReceiver)
class _PublicOnlyReceiver:
    """
    Passes on to C{receiver} only the resolved addresses that
    L{isPublicAddress} accepts.
    """

    def __init__(self, receiver) -> None:
        self._receiver = receiver

    def resolutionBegan(self, resolution) -> None:
        self._receiver.resolutionBegan(resolution)

    def addressResolved(self, address) -> None:
        if isPublicAddress(getattr(address, "host", "")):
            self._receiver.addressResolved(address)

    def resolutionComplete(self) -> None:
        self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class _PublicOnlyResolver:
    """
    A host name resolver that drops every non-public address, for the
    connection to an MX host: what the name resolves to when the connection
    is made is filtered too, not only what the MX lookup saw.
    """

    def __init__(self, resolver) -> None:
        self._resolver = resolver

    def resolveHostName(self, resolutionReceiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self._resolver.resolveHostName(
            _PublicOnlyReceiver(resolutionReceiver), hostName, portNumber, addressTypes, transportSemantics
        )
        return resolutionReceiver


@implementer(IReactorPluggableNameResolver)
class PublicOnlyReactor:
    """
    The reactor as a C{HostnameEndpoint} to an MX host sees it: its name
    resolver is wrapped in L{_PublicOnlyResolver}.
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self.nameResolver = _PublicOnlyResolver(reactor.nameResolver)

    def installNameResolver(self, resolver):
        raise TypeError("the MX connection reactor keeps its public-only resolver")

    def __getattr__(self, name: str):
        return getattr(self._reactor, name)


def _ipv6Text(record) -> str:
    """
    The address of an AAAA record as text.
    """
    return str(ipaddress.IPv6Address(record.address))


class MXResolver:
    """
    Looks up the mail exchangers of a domain.

    @param reactor: the reactor for the resolver this makes for itself.
    @param resolver: an C{IResolver}; if C{None}, a
        C{twisted.names.client.Resolver} is made at the first lookup (and
        stopped by L{stop}): one asking C{server}, or the name servers of
        C{/etc/resolv.conf}.  Its queries write nothing to the log.
    @param server: C{(address, port)} of the name server to ask (the MX
        listener's C{[inbound] dns-server}), or C{None} for the system's.
    """

    def __init__(self, reactor, resolver=None, server: Optional[tuple[str, int]] = None) -> None:
        self._reactor = reactor
        self.resolver = resolver
        self._server = server
        self._ownResolver: Optional[object] = None

    def stop(self) -> None:
        """
        Stop the resolver this made for itself, which re-reads resolv.conf
        on a timer.
        """
        if self._ownResolver is not None:
            parseCall = getattr(self._ownResolver, "_parseCall", None)
            if parseCall is not None and parseCall.active():
                parseCall.cancel()
            self.resolver = self._ownResolver = None

    def _resolver(self):
        if self.resolver is None:
            from twisted.names import client

            quiet = _QuietDatagramReactor(self._reactor)
            if self._server is not None:
                own = client.Resolver(servers=[self._server], reactor=quiet)
            else:
                own = client.Resolver(resolv="/etc/resolv.conf", reactor=quiet)
            self.resolver = self._ownResolver = own
        return self.resolver

    def lookupPointer(self, name: str) -> defer.Deferred:
        """
        Look up the PTR records of C{name} (an C{in-addr.arpa} or
        C{ip6.arpa} name), as C{IResolver.lookupPointer} does, through the
        same resolver: the MX listener's reverse lookups of its clients.
        """
        return self._resolver().lookupPointer(name)

    @defer.inlineCallbacks
    def lookupTXT(self, name: str):
        """
        The TXT records at C{name}, through the same resolver (the MTA-STS
        record: L{pop3gw.relay.mtasts}).

        @return: a C{Deferred} firing with their texts (each record's
            strings joined), an empty list if the name or the records do
            not exist, or failing as the lookup did.
        """
        try:
            answers, _, _ = yield self._resolver().lookupText(name)
        except dnserror.DomainError:
            return []
        return [
            b"".join(a.payload.data).decode("utf-8", "replace") for a in answers if a.type == dns.TXT
        ]

    @defer.inlineCallbacks
    def mailHosts(self, domain: str):
        """
        @return: a Deferred firing with the host names to try for
            C{domain}, best first.
        @raise PermanentLookupFailure: the domain does not exist or has a
            null MX.
        """
        try:
            answers, _, _ = yield self._resolver().lookupMailExchange(domain)
        except dnserror.DNSNameError:
            raise PermanentLookupFailure("5.1.2", f"domain {domain} does not exist") from None
        records = []
        for rr in answers:
            if rr.type == dns.MX:
                name = str(rr.payload.name).lower().rstrip(".")
                records.append((rr.payload.preference, name))
        if records:
            if any(name == "" for _, name in records):
                raise PermanentLookupFailure("5.1.10", f"domain {domain} accepts no mail (null MX)")
            records.sort(key=lambda r: r[0])
            hosts: list = []
            for _, name in records:
                if name not in hosts:
                    hosts.append(name)
            usable = []
            for host in hosts:
                try:
                    addresses = yield self._addresses(host)
                except Exception:
                    # Unknown yet: the connection will tell (and connects
                    # only to public addresses).
                    usable.append(host)
                    continue
                if not addresses or any(isPublicAddress(a) for a in addresses):
                    usable.append(host)
            if not usable:
                raise PermanentLookupFailure("5.4.4", f"domain {domain} has no usable mail exchanger")
            return usable
        # No MX: the domain itself is the implicit MX (RFC 5321 5.1) if it
        # has an address.
        try:
            addresses = yield self._addresses(domain)
        except dnserror.DNSNameError:
            raise PermanentLookupFailure("5.1.2", f"domain {domain} does not exist") from None
        if not addresses:
            raise PermanentLookupFailure("5.1.2", f"domain {domain} has no mail exchanger")
        if not any(isPublicAddress(a) for a in addresses):
            raise PermanentLookupFailure("5.4.4", f"domain {domain} has no usable mail exchanger")
        return [domain]

    @defer.inlineCallbacks
    def _addresses(self, host: str):
        """
        @return: a Deferred firing with the IPv4 and IPv6 addresses of
            C{host}, as text.
        """
        addresses = []
        for lookup, rrtype in ((self.resolver.lookupAddress, dns.A), (self.resolver.lookupIPV6Address, dns.AAAA)):
            answers, _, _ = yield lookup(host)
            for rr in answers:
                if rr.type == rrtype:
                    addresses.append(rr.payload.dottedQuad() if rrtype == dns.A else _ipv6Text(rr.payload))
        return addresses



def describeDNSFailure(domain: str, e: Exception) -> str:
    """
    Why a temporary DNS failure kept mail for C{domain} queued, in plain
    words.
    """
    if isinstance(e, dnserror.DNSServerError):
        why = "server failure (SERVFAIL)"
    elif isinstance(e, dnserror.DNSQueryRefusedError):
        why = "query refused"
    elif isinstance(e, defer.TimeoutError):
        why = "timed out"
    else:
        why = oneLine(f"{e.__class__.__name__} {e}")
    return f"DNS lookup for {domain} failed: {why}"


class _QuietUDPPort(udp.Port):
    """
    A UDP port that writes nothing to the log when it opens and closes.

    Twisted's C{udp.Port} logs "DNSDatagramProtocol starting on N" and
    "(UDP Port N Closed)" unconditionally (C{twisted.python.log.msg}, under
    whatever log system is current), and a C{twisted.names} resolver opens
    one port per query: two lines per inbound connection's reverse lookup,
    which say nothing an operator can use.  These two methods are
    C{udp.Port}'s without those lines; nothing else differs.
    """

    def _bindSocket(self) -> None:
        try:
            skt = self.createInternetSocket()
            skt.bind((self.interface, self.port))
        except OSError as e:
            raise CannotListenError(self.interface, self.port, e) from None
        self._realPortNumber = skt.getsockname()[1]
        self.connected = 1
        self.socket = skt
        # As udp.Port does: the socket's own fileno answers for the port.
        self.fileno = skt.fileno  # type: ignore[method-assign]

    def connectionLost(self, reason=None) -> None:
        self._realPortNumber = None
        self.maxThroughput = -1
        BasePort.connectionLost(self, reason)
        self.protocol.doStop()
        self.socket.close()
        del self.socket
        del self.fileno
        if hasattr(self, "d"):
            self.d.callback(None)
            del self.d


class _QuietDatagramReactor:
    """
    The reactor as the relay's own DNS resolver sees it: every datagram
    protocol it listens with is made quiet (C{noisy = False}), so a DNS
    query does not log "Starting protocol" and "Stopping protocol", and
    listens on a L{_QuietUDPPort}, so it does not log the port's opening
    and closing either.  A reactor that is not Twisted's POSIX one (a test
    double) listens as it would.
    """

    def __init__(self, reactor):
        self._reactor = reactor

    def __getattr__(self, name: str):
        return getattr(self._reactor, name)

    def listenUDP(self, port: int, protocol, interface: str = "", maxPacketSize: int = 8192):
        protocol.noisy = False
        if not isinstance(self._reactor, PosixReactorBase):
            return self._reactor.listenUDP(port, protocol, interface, maxPacketSize)
        listening = _QuietUDPPort(port, protocol, interface, maxPacketSize, self._reactor)
        listening.startListening()
        return listening
