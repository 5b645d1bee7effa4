# -*- test-case-name: tests.test_relay_service -*-
"""
One delivery attempt of a queued message: where each recipient goes (the
smarthost, or its domain's mail exchangers from L{MXResolver}), one
L{deliverOnce} session per host with the TLS policy for it, the connection
limit, and the log lines of each session.

Without a relay host, recipients are grouped by domain and each domain's
mail exchangers are looked up (MX, sorted by preference; the domain itself
when it has no MX, RFC 5321 section 5.1; a null MX, RFC 7505, is a permanent
failure); hosts are tried in order, skipping those whose addresses are all
non-public (a domain with only such hosts fails permanently with 5.4.4, and
the connection to a host is made only to its public addresses: see
L{pop3gw.relay.mx}), with one connection per domain carrying all of its
recipients, and STARTTLS is used opportunistically (never required,
verification attempted but not enforced) when offered and a C{clientTLS}
factory was given; each host's log line says C{tls=yes|no} and
C{verified=yes|no}.  When the dispatcher is given MTA-STS policies
(L{Dispatcher.mtaSTS}), a domain whose policy is C{enforce} gets only the
MX hosts the policy names, over STARTTLS with the certificate verified
and no plaintext retry (else its recipients are deferred), and a
C{testing} policy only adds log lines (L{pop3gw.relay.mtasts}).  With a
relay host, every recipient goes there;
STARTTLS is verified against the relay host name when C{relayVerifyTLS} is
true, and then required, and credentials are sent only over TLS.  A relay host whose connected address is loopback (127.0.0.0/8,
C{::1}, a Unix socket: L{pop3gw.address.isLoopback}, as for plaintext
logins) and that is given no credentials is treated like an MX host:
STARTTLS opportunistic, plaintext allowed.

Logging: each session with a host gives one line, C{relay: <id>
domain=... host=h:p delivered=n deferred=n failed=n tls=... verified=...
error="..."}, at info level when every recipient was delivered and at warn
level otherwise.  Recipients the session broke before answering for count
as deferred, and C{error=} says why in plain words ("connection refused",
"smarthost offers no STARTTLS and certificate verification is on", the
server's reply when it sent one), never the reply codes Twisted's client
makes up for its own errors.  Each recipient deferred or failed by a remote
reply gets one more warn line, C{relay: <id> to=<address> host=h:p
result=deferred|failed reply="<the reply>"}.  Text that may come from the
remote server (C{error=}, C{reply=}) is quoted and escaped with
L{pop3gw.events.sanitize} so that it cannot forge log content.  The last
error C{pop3gw queue list} shows uses the same words, unquoted.  The id is
the queue id, which the submission server also gives the client in its
C{250} reply.  A caller that saves the outcomes passes a list to
L{Dispatcher.deliver} and logs these result lines only once they are
saved, so that C{pop3gw queue list} run after reading a line shows what
the line says.

SMTPUTF8 (RFC 6531): a message received with the SMTPUTF8 parameter
(L{pop3gw.queue.Entry.smtputf8}) is sent with it to a host that offers it.
A host that does not offer it is never sent a non-ASCII address: such a
recipient (every recipient, when the sender is not ASCII) fails
permanently with status 5.6.7 and is bounced (RFC 6531 3.7.5), while the
ASCII recipients of the same message are sent as usual; trying another MX
host of the domain is not attempted for it.  A message whose envelope is
ASCII goes to any host, UTF-8 header fields included (no downgrade).

Limitations: the client can speak implicit TLS (L{TLSPolicy.IMMEDIATE}),
but no setting selects it for a smarthost on port 465 yet.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

from pop3gw import events
from pop3gw.dsn import oneLine
from pop3gw.interfaces import IQueueStore
from pop3gw.queue import Entry, Outcome, OutcomeKind
from pop3gw.relay.client import ConnectionCache, SessionResult, TLSPolicy, deliverOnce
from pop3gw.relay.mx import (
    MXResolver,
    PermanentLookupFailure,
    PublicOnlyReactor,
    describeDNSFailure,
)

#: The SMTP port of mail exchangers.
SMTP_PORT = 25


class Dispatcher:
    """
    Makes delivery attempts for the relay service.

    @param queue: the queue the messages are read from.
    @param clock: the reactor (time, and TCP for the default endpoints).
    @param hostname: this server's name (C{EHLO}).
    @param log: the relay's logger.
    @param relayHost: send everything to this smarthost instead of MX hosts.
    @param relayPort: the smarthost's port.
    @param relayUsername: AUTH user name (sent only over TLS).
    @param relayPassword: AUTH password (never logged).
    @param relayVerifyTLS: verify the smarthost's certificate (and then
        require STARTTLS, except from a smarthost on loopback).
    @param resolver: an C{IResolver} for L{MXResolver}, or C{None}.
    @param clientTLS: C{clientTLS(hostname, verify) -> contextFactory}, with
        C{verify=None} meaning opportunistic (unverified); C{None} means
        plaintext only.
    @param connectTimeout: TCP connect timeout in seconds.
    @param maxConnections: the most messages sent at once, each over its
        own SMTP connection.  A smarthost connection is kept a moment after
        its message (L{pop3gw.relay.client.ConnectionCache}) and taken
        before a new one is opened, so no more connections than this are
        open to the smarthost either.
    @param endpointFactory: C{endpointFactory(host, port) ->
        IStreamClientEndpoint}, or C{None} for a C{HostnameEndpoint} that
        for MX hosts connects only to public addresses.
    @param deliverOnce: the SMTP client, L{pop3gw.relay.client.deliverOnce}
        unless a test gives a fake.
    """

    def __init__(
        self,
        queue: IQueueStore,
        clock,
        hostname: str,
        log: Logger,
        relayHost: Optional[str],
        relayPort: int,
        relayUsername: Optional[str],
        relayPassword: Optional[str],
        relayVerifyTLS: bool,
        resolver,
        clientTLS: Optional[Callable],
        connectTimeout: float,
        maxConnections: int,
        endpointFactory: Optional[Callable],
        deliverOnce: Callable = deliverOnce,
    ):
        self.queue = queue
        self.reactor = clock
        self.hostname = hostname
        self.log = log
        self.relayHost = relayHost
        self.relayPort = relayPort
        self.relayUsername = relayUsername
        self.relayPassword = relayPassword
        self.relayVerifyTLS = relayVerifyTLS
        self.clientTLS = clientTLS
        self.connectTimeout = connectTimeout
        self.mx = MXResolver(clock, resolver)
        self._endpointFactory = endpointFactory or self._defaultEndpoint
        self._mxEndpointFactory = endpointFactory or self._defaultMXEndpoint
        self._deliverOnce = deliverOnce
        self._semaphore = defer.DeferredSemaphore(maxConnections)
        # Smarthost connections waiting for their next message.
        self._cache = ConnectionCache(clock)
        self._connections: set = set()
        self._stopping = False
        #: The recipient domains' MTA-STS policies
        #: (L{pop3gw.relay.mtasts.PolicySource}) for direct MX delivery, or
        #: C{None} to apply none.
        self.mtaSTS: Optional[Any] = None

    def start(self) -> None:
        """
        Allow sessions (again).
        """
        self._stopping = False

    def stop(self) -> None:
        """
        Refuse new sessions, abort the connections in progress (their
        sessions then end with an error) and stop the DNS resolver.
        """
        self._stopping = True
        self._cache.closeAll()
        for connection in list(self._connections):
            connection.abort()
        self.mx.stop()

    def deliver(self, entry: Entry, recipients: list, held: Optional[list] = None) -> defer.Deferred:
        """
        Make one attempt for C{recipients} of C{entry}: everything to the
        smarthost in one session, or each domain's recipients to its mail
        exchangers in turn, one session per host until every recipient has
        an answer.  A non-ASCII address goes only to a host that offers
        SMTPUTF8 (L{deliverOnce}: 5.6.7 at another).

        @param held: if given, the attempt's result lines (each session's,
            and a domain's failed or deferred lookup) are appended to it as
            callables that log them, instead of being logged now: the
            caller calls them once it has saved the outcomes.
        @return: a Deferred firing with a dict of L{Outcome} per recipient
            address (recipients no host answered for are deferred).
        """
        outcomes: dict = {}
        if self.relayHost is not None:
            domains = ",".join(sorted({r.domain for r in recipients}))
            ds = [self._sendVia(entry, domains, [self.relayHost], self.relayPort, recipients, True, held)]
        else:
            byDomain: dict = {}
            for r in recipients:
                byDomain.setdefault(r.domain, []).append(r)
            ds = [self._deliverDomain(entry, domain, rs, held) for domain, rs in byDomain.items()]

        def merge(results: list) -> dict:
            for result in results:
                outcomes.update(result)
            return outcomes

        return defer.gatherResults(ds, consumeErrors=True).addCallback(merge)

    def _result(self, held: Optional[list], level: Callable, format: str, **kw: object) -> None:
        """
        Log a result line now, or append it to C{held} (see L{deliver}).
        """
        if held is None:
            level(format, **kw)
        else:
            held.append(lambda: level(format, **kw))

    def _domainOutcome(
        self, held: Optional[list], entry: Entry, domain: str, recipients: list, kind: OutcomeKind, status: str,
        why: str,
    ) -> dict:
        """
        Log that C{domain}'s recipients wait or failed (decided before any
        session), and their outcomes.
        """
        self._result(
            held,
            self.log.warn,
            "relay: {queueId} domain={domain} result={result}: {why}",
            queueId=entry.queueId,
            domain=domain,
            result="deferred" if kind is OutcomeKind.DEFERRED else "failed",
            why=why,
        )
        return {r: Outcome(kind, status, why) for r in recipients}

    @defer.inlineCallbacks
    def _deliverDomain(self, entry: Entry, domain: str, recipients: list, held: Optional[list] = None):
        try:
            hosts = yield self.mx.mailHosts(domain)
        except PermanentLookupFailure as e:
            return self._domainOutcome(held, entry, domain, recipients, OutcomeKind.FAILED, e.status, e.text)
        except Exception as e:
            why = describeDNSFailure(domain, e)
            return self._domainOutcome(held, entry, domain, recipients, OutcomeKind.DEFERRED, "4.4.3", why)
        policy = None
        if self.mtaSTS is not None:
            policy = yield self.mtaSTS.policyFor(domain)
        if policy is not None and policy.mode in ("enforce", "testing"):
            outside = [h for h in hosts if not policy.allows(h)]
            for host in outside:
                self._result(
                    held,
                    self.log.warn,
                    "mta-sts: {queueId} domain={domain} host={host} is not in the {mode} policy{what}",
                    queueId=entry.queueId,
                    domain=domain,
                    host=host,
                    mode=policy.mode,
                    what=" (skipped)" if policy.mode == "enforce" else "",
                )
            if policy.mode == "enforce":
                hosts = [h for h in hosts if h not in outside]
                refusal: Optional[str] = None
                if not hosts:
                    refusal = f"MTA-STS policy of {domain} names none of its MX hosts"
                elif self.clientTLS is None:
                    refusal = f"MTA-STS policy of {domain} requires TLS, which is not available"
                if refusal is not None:
                    return self._domainOutcome(held, entry, domain, recipients, OutcomeKind.DEFERRED, "4.7.5", refusal)
                return (yield self._sendVia(entry, domain, hosts, SMTP_PORT, recipients, False, held, verifyTLS=True))
            return (yield self._sendVia(entry, domain, hosts, SMTP_PORT, recipients, False, held, stsTesting=True))
        return (yield self._sendVia(entry, domain, hosts, SMTP_PORT, recipients, False, held))

    @defer.inlineCallbacks
    def _sendVia(
        self,
        entry: Entry,
        domain: str,
        hosts: list,
        port: int,
        recipients: list,
        relay: bool,
        held: Optional[list] = None,
        verifyTLS: bool = False,
        stsTesting: bool = False,
    ):
        """
        Try C{hosts} in turn until every recipient has an outcome.

        @param verifyTLS: an MTA-STS C{enforce} policy applies: STARTTLS
            required, the certificate verified against the host name, no
            plaintext retry.
        @param stsTesting: an MTA-STS C{testing} policy applies: a session
            without verified TLS is logged (the mail goes anyway).
        """
        remaining = list(recipients)
        outcomes: dict = {}
        lastError = "no mail exchanger reached"
        for host in hosts:
            session = yield self._semaphore.run(self._session, entry, host, port, remaining, relay, True, verifyTLS)
            if stsTesting and not session.verified:
                self._result(
                    held,
                    self.log.warn,
                    "mta-sts: {queueId} domain={domain} host={host} no verified TLS (testing policy: not enforced)",
                    queueId=entry.queueId,
                    domain=domain,
                    host=host,
                )
            if session.tlsHandshakeFailed and not relay and not verifyTLS:
                # RFC 7435: opportunistic TLS that fails to negotiate falls
                # back to a plaintext session with the same host.
                self.log.info(
                    "relay: {queueId} TLS handshake with {host}:{port} failed (error={error}); retrying without TLS",
                    queueId=entry.queueId,
                    host=host,
                    port=port,
                    error=events.sanitize(_why(session), events.MAX_LOGGED_REPLY),
                )
                session = yield self._semaphore.run(self._session, entry, host, port, remaining, relay, False)
            outcomes.update(session.outcomes)
            self._logSession(entry, domain, host, port, session, remaining, held)
            remaining = [r for r in remaining if r not in session.outcomes]
            if not remaining:
                break
            lastError = f"{host}: {_why(session)}"
        for r in remaining:
            outcomes[r] = Outcome(OutcomeKind.DEFERRED, "4.4.1", oneLine(lastError))
        return outcomes

    def _logSession(
        self,
        entry: Entry,
        domain: str,
        host: str,
        port: int,
        session: SessionResult,
        recipients: list,
        held: Optional[list] = None,
    ) -> None:
        """
        Log the result of one session with C{host} for C{recipients}: one
        summary line (at info if every recipient was delivered, else at
        warn), then one warn line per recipient deferred or failed by a
        remote reply, naming the reply.  Recipients the session never got a
        reply for (it broke first: C{error=} says why) count as deferred.
        """
        counts = dict.fromkeys(OutcomeKind, 0)
        refused = []
        for r in recipients:
            outcome = session.outcomes.get(r)
            if outcome is None:
                counts[OutcomeKind.DEFERRED] += 1
                continue
            counts[outcome.kind] += 1
            if outcome.kind is not OutcomeKind.DELIVERED:
                refused.append((r, outcome))
        level = self.log.info if counts[OutcomeKind.DEFERRED] == counts[OutcomeKind.FAILED] == 0 else self.log.warn
        self._result(
            held,
            level,
            "relay: {queueId} domain={domain} host={host}:{port} delivered={delivered} deferred={deferred}"
            " failed={failed} tls={tls} verified={verified} error={error}",
            queueId=entry.queueId,
            domain=domain,
            host=host,
            port=port,
            delivered=counts[OutcomeKind.DELIVERED],
            deferred=counts[OutcomeKind.DEFERRED],
            failed=counts[OutcomeKind.FAILED],
            tls="yes" if session.tls else "no",
            verified="yes" if session.verified else "no",
            # Remote text is quoted and escaped: it must not forge log content.
            error="-" if session.error is None else events.sanitize(session.error.text, events.MAX_LOGGED_REPLY),
        )
        for r, outcome in refused:
            self._result(
                held,
                self.log.warn,
                "relay: {queueId} to={recipient} host={host}:{port} result={result} reply={reply}",
                queueId=entry.queueId,
                recipient=str(r),
                host=host,
                port=port,
                result="deferred" if outcome.kind is OutcomeKind.DEFERRED else "failed",
                reply=events.sanitize(outcome.diagnostic, events.MAX_LOGGED_REPLY),
            )

    def _defaultEndpoint(self, host: str, port: int):
        """
        The endpoint to the smarthost: the operator's choice, not filtered.
        """
        return HostnameEndpoint(self.reactor, host, port, timeout=self.connectTimeout)

    def _defaultMXEndpoint(self, host: str, port: int):
        """
        The endpoint to an MX host: only its public addresses are tried.
        """
        return HostnameEndpoint(PublicOnlyReactor(self.reactor), host, port, timeout=self.connectTimeout)

    def _session(
        self, entry: Entry, host: str, port: int, recipients: list, relay: bool, useTLS: bool = True,
        verifyTLS: bool = False,
    ) -> defer.Deferred:
        """
        One SMTP session with C{host} for C{recipients} (L{deliverOnce}).

        @param useTLS: use STARTTLS when the peer offers it (false only for
            the plaintext retry after a failed opportunistic handshake).
        @param verifyTLS: require STARTTLS to an MX host and verify its
            certificate (an MTA-STS C{enforce} policy).

        @return: a Deferred firing with the L{SessionResult}.
        """
        if self._stopping:
            return defer.succeed(SessionResult.broken("relay service stopping"))
        try:
            message = self.queue.openMessage(entry)
        except OSError as e:
            return defer.succeed(SessionResult.broken(oneLine(f"cannot read queued message: {e}")))
        credentials = None
        if relay and self.relayUsername is not None and self.relayPassword is not None:
            credentials = (self.relayUsername, self.relayPassword)
        policy, loopbackPolicy = self._tlsPolicy(relay, credentials is not None, useTLS)
        if verifyTLS and not relay and policy is not TLSPolicy.NONE:
            policy = TLSPolicy.REQUIRED_STARTTLS

        def contextFor(policy: TLSPolicy) -> tuple:
            clientTLS = self.clientTLS
            assert clientTLS is not None, "asked for only under a TLS policy (see _tlsPolicy)"
            if not relay and verifyTLS:
                return clientTLS(host, True), True
            if not relay:
                # verify=None asks for an opportunistic (unverified) context.
                return clientTLS(host, None), False
            if policy is TLSPolicy.REQUIRED_STARTTLS:
                return clientTLS(host, self.relayVerifyTLS), self.relayVerifyTLS
            # Opportunistic to a smarthost: verification off, or a smarthost
            # on this machine.
            return clientTLS(host, None if self.relayVerifyTLS else False), False

        # The endpoint is made only if no kept connection carries the
        # message (a HostnameEndpoint is not cheap to make).
        endpointFactory = self._endpointFactory if relay else self._mxEndpointFactory
        endpoint = _AbortableEndpoint(functools.partial(endpointFactory, host, port))
        self._connections.add(endpoint)
        reuse: dict = {}
        if relay:
            # One smarthost session carries message after message.
            reuse = dict(
                cache=self._cache,
                cacheKey=(host, port, policy, loopbackPolicy, credentials and credentials[0]),
            )
        d = self._deliverOnce(
            endpoint,
            entry.sender,
            recipients,
            message,
            policy,
            credentials,
            identity=self.hostname,
            clock=self.reactor,
            contextFor=contextFor if self.clientTLS is not None else None,
            loopbackPolicy=loopbackPolicy,
            smtputf8=entry.smtputf8,
            **reuse,
        )

        def finished(result: SessionResult) -> SessionResult:
            self._connections.discard(endpoint)
            return result

        return d.addCallback(finished)

    def _tlsPolicy(self, relay: bool, credentials: bool, useTLS: bool) -> tuple:
        """
        @return: the L{TLSPolicy} of a session, and the one that replaces it
            when the peer turns out to be on this machine (or C{None}).
        """
        if self.clientTLS is None or not useTLS:
            return TLSPolicy.NONE, None
        if not relay:
            return TLSPolicy.OPPORTUNISTIC, None
        if credentials:
            # Credentials go only over TLS, to loopback too.
            return TLSPolicy.REQUIRED_STARTTLS, None
        if self.relayVerifyTLS:
            # A smarthost whose certificate is to be verified must speak
            # TLS (a stripped STARTTLS must not skip the check), unless it
            # is on this machine, where there is no network to protect.
            return TLSPolicy.REQUIRED_STARTTLS, TLSPolicy.OPPORTUNISTIC
        return TLSPolicy.OPPORTUNISTIC, None


def _why(session: SessionResult) -> str:
    """
    Why C{session} left recipients without an answer, in plain words.
    """
    return session.error.text if session.error is not None else "the session ended without an answer"


class _AbortableEndpoint:
    """
    An endpoint that remembers its one connection attempt, so that the
    relay can abort it when it stops.  The endpoint it connects with is
    made when it is first needed.
    """

    def __init__(self, makeEndpoint: Callable[[], Any]) -> None:
        self._makeEndpoint = makeEndpoint
        self._endpoint: Any = None
        self._connecting: Optional[defer.Deferred] = None
        self._protocol = None

    @property
    def endpoint(self) -> Any:
        """
        The endpoint it connects with, made at the first use.

        @raise Exception: whatever making it raises.
        """
        if self._endpoint is None:
            self._endpoint = self._makeEndpoint()
        return self._endpoint

    def connect(self, factory) -> defer.Deferred:
        """
        Connect with L{endpoint}.

        @return: a Deferred firing with the protocol, or failing with the
            error of an endpoint that cannot be made.
        """
        try:
            endpoint = self.endpoint
        except Exception:
            return defer.fail()
        self._connecting = endpoint.connect(factory)

        def connected(p):
            self._protocol = p
            return p

        return self._connecting.addCallback(connected)

    def abort(self) -> None:
        """
        Abort the connection, or cancel the attempt to make it.
        """
        transport = getattr(self._protocol, "transport", None)
        if transport is not None:
            transport.abortConnection()
        elif self._connecting is not None and not self._connecting.called:
            self._connecting.cancel()
