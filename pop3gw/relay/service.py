# -*- test-case-name: tests.test_relay -*-
"""
The relay service: empties the outbound queue (L{pop3gw.queue}) by SMTP.

Relaying
========

L{RelayService} loads every entry at start-up and schedules each at its
next attempt time, so a restart resumes where it stopped.  A newly queued
message is tried at once.  Each attempt is recorded (C{attempts + 1} and the
next attempt time) durably I{before} it is made.  A recipient is done when
the remote side accepted it (2xx after C{DATA}) or refused it permanently
(5xx); 4xx replies, connection failures, time-outs and temporary DNS
failures leave it pending, retried on the L{DEFAULT_SCHEDULE}.  Once the
queue lifetime has passed since the message was queued, pending recipients
fail permanently ("expired").  Each batch of permanent failures produces
exactly one RFC 3464 bounce to the envelope sender, stored through the
C{bounceDelivery} callable before the failures are marked as notified; a
message with the null sender is never bounced (the failure is only logged).
An entry's files are removed only once no recipient is pending and every
failure was notified.

Results are per recipient: when a server (a smarthost included) accepts
some recipients at C{RCPT} and refuses others, the accepted ones are done
once the end of data is accepted, the 5xx ones are bounced, the 4xx ones
stay pending and only they are named in the next attempt.

Duplicates: the outcome of an attempt is written to the C{.json} after the
remote server's reply to the end of data.  If the process dies between that
reply and the write (or the write fails), the next attempt, after a
restart, sends the message again to the recipients that had accepted it: a
duplicate, never a loss (the RFC 1047 window, on the client side).  The same
holds for the bounce: one stored just before a crash that kept its
recipients from being marked notified is stored again.

Without a relay host, recipients are grouped by domain and each domain's
mail exchangers are looked up (MX, sorted by preference; the domain itself
when it has no MX, RFC 5321 section 5.1; a null MX, RFC 7505, is a permanent
failure); hosts are tried in order, skipping those whose addresses are all
non-public (a domain with only such hosts fails permanently with 5.4.4, and
the connection to a host is made only to its public addresses: see
L{pop3gw.relay.mx}), with one connection per domain carrying all of its
recipients, and STARTTLS is used opportunistically (never
required, verification attempted but not enforced) when offered and a
C{clientTLS} factory was given; each host's log line says C{tls=yes|no}
and C{verified=yes|no}.  With a relay host, every
recipient goes there; STARTTLS is verified against the relay host name when
C{relayVerifyTLS} is true, and then required, and credentials are sent only
over TLS.  A relay host whose connected address is loopback (127.0.0.0/8,
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
error C{pop3gw queue list} shows uses the same words, unquoted.  The id is the queue id, which the
submission server also gives the client in its C{250} reply (see
L{_QueueDelivery.queueId}).

Limitations: non-ASCII (SMTPUTF8) addresses are refused permanently with
status 5.6.7; implicit TLS (port 465) to a relay is not supported.
"""


from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

import re

from pop3gw import events
from pop3gw.dsn import makeBounce, oneLine
from pop3gw.interfaces import IQueueStore, UnknownUser
from pop3gw.queue import DELIVERED, FAILED, Entry, Outcome, OutcomeKind
from pop3gw.relay.client import SessionResult, TLSPolicy, deliverOnce
from pop3gw.relay.mx import MXResolver, PermanentLookupFailure, PublicOnlyReactor, describeDNSFailure

# --- Limits and defaults ------------------------------------------------

#: Retry delays in seconds after the first, second, ... failed attempt; the
#: last one repeats.
DEFAULT_SCHEDULE = (5 * 60, 15 * 60, 60 * 60, 2 * 60 * 60)

#: How long a message may stay queued before its pending recipients fail.
DEFAULT_LIFETIME = 5 * 86400

#: Seconds allowed for a TCP connection to a mail exchanger.
DEFAULT_CONNECT_TIMEOUT = 60

#: Seconds to wait for each reply of the remote server (RFC 5321 4.5.3.2
#: asks for at least 5 minutes for most commands).
RESPONSE_TIMEOUT = 5 * 60

#: How often, in seconds, the relay looks at the queue's flush stamp.
FLUSH_POLL_INTERVAL = 5.0

#: The most SMTP client connections open at the same time.
MAX_CONNECTIONS = 10

#: How long C{stopService} waits for attempts in progress before it
#: abandons them (they stay queued).
STOP_GRACE = 10.0

#: The SMTP port of mail exchangers, and the default relay port: 25 without
#: credentials (a smarthost relaying by IP), 587 (submission, RFC 6409) when
#: a relay user name is configured.
SMTP_PORT = 25
SUBMISSION_PORT = 587

#: Longest line read at once from a queued message while sending it.
_READ_LINE = 64 * 1024

#: The namespace of the relay's log lines, as operators' log filters know it.
LOG_NAMESPACE = "pop3gw.queue.RelayService"

_ENHANCED = re.compile(rb"^([245])\.\d{1,3}\.\d{1,3}(?=\s|$)")


# --- The relay service -------------------------------------------------------


class RelayService(Service):
    """
    Delivers the entries of a queue (see the module docstring).

    @param queue: the queue, an L{IQueueStore}.
    @param reactor: a reactor (C{callLater}, C{seconds}, TCP).
    @param hostname: this server's name (C{EHLO}, bounces).
    @param bounceDelivery: C{bounceDelivery(sender, data) -> Deferred}
        stores a bounce for the local user C{sender}.
    @param relayHost: send everything to this smarthost instead of MX hosts.
    @param relayPort: the smarthost's port; L{None} means L{SUBMISSION_PORT}
        with credentials, L{SMTP_PORT} without.
    @param relayUsername: AUTH user name (sent only over TLS).
    @param relayPassword: AUTH password (never logged).
    @param relayVerifyTLS: verify the smarthost's certificate.
    @param resolver: an C{IResolver} for MX lookups; a
        C{twisted.names.client.Resolver} on C{/etc/resolv.conf} if L{None}.
    @param clientTLS: C{clientTLS(hostname, verify) -> contextFactory};
        called with C{verify=relayVerifyTLS} for the relay host and with
        C{verify=None} for MX hosts, meaning opportunistic (unverified) TLS
        (C{pop3gw.tls.opportunisticClientContextFactory}).  L{None} means
        plaintext only.
    @param schedule: retry delays, see L{DEFAULT_SCHEDULE}.
    @param lifetime: seconds before pending recipients expire.
    @param connectTimeout: TCP connect timeout in seconds.
    @param scanInterval: seconds between looks at the C{.flush} file.
    @param maxConnections: the most simultaneous SMTP connections.
    @param endpointFactory: C{endpointFactory(host, port) ->
        IStreamClientEndpoint}; a C{HostnameEndpoint} if L{None} (tests
        replace it), which for MX hosts connects only to public addresses
        (L{pop3gw.relay.mx.isPublicAddress}).
    """


    def __init__(
        self,
        queue: IQueueStore,
        reactor,
        hostname: str,
        bounceDelivery: Callable,
        relayHost: Optional[str] = None,
        relayPort: Optional[int] = None,
        relayUsername: Optional[str] = None,
        relayPassword: Optional[str] = None,
        relayVerifyTLS: bool = True,
        resolver=None,
        clientTLS: Optional[Callable] = None,
        schedule: Sequence[float] = DEFAULT_SCHEDULE,
        lifetime: float = DEFAULT_LIFETIME,
        connectTimeout: float = DEFAULT_CONNECT_TIMEOUT,
        scanInterval: float = FLUSH_POLL_INTERVAL,
        maxConnections: int = MAX_CONNECTIONS,
        endpointFactory: Optional[Callable] = None,
    ):
        if not schedule:
            raise ValueError("the retry schedule is empty")
        # The namespace operators' log filters know (this class lived in
        # pop3gw.queue).
        self.log = Logger(namespace=LOG_NAMESPACE, source=self)
        self.queue = queue
        self.reactor = reactor
        self.hostname = hostname
        self.bounceDelivery = bounceDelivery
        self.relayHost = relayHost
        if relayPort is None:
            relayPort = SUBMISSION_PORT if relayUsername else SMTP_PORT
        self.relayPort = relayPort
        self.relayUsername = relayUsername
        self.relayPassword = relayPassword
        self.relayVerifyTLS = relayVerifyTLS
        self.clientTLS = clientTLS
        self.schedule = tuple(schedule)
        self.lifetime = lifetime
        self.connectTimeout = connectTimeout
        self.scanInterval = scanInterval
        self._endpointFactory = endpointFactory or self._defaultEndpoint
        self._mxEndpointFactory = endpointFactory or self._defaultMXEndpoint
        self._semaphore = defer.DeferredSemaphore(maxConnections)
        self.entries: dict = {}
        self._timers: dict = {}
        self._waiters: dict = {}
        self._connections: set = set()
        self._flushLoop: Optional[LoopingCall] = None
        self._flushMtime: Optional[int] = None
        self.mx = MXResolver(reactor, resolver)

    # -- service life --------------------------------------------------

    def startService(self) -> None:
        """
        Load every entry (removing orphaned files), schedule each at its
        next attempt time, listen for new entries and start watching the
        C{.flush} file.
        """
        Service.startService(self)
        if self.relayUsername and self.clientTLS is None:
            self.log.error("relay: credentials are configured but TLS is not; relaying will fail")
        self.entries = {e.queueId: e for e in self.queue.loadEntries()}
        for entry in self.entries.values():
            self._schedule(entry)
        self.log.info("relay: {count} queued messages loaded", count=len(self.entries))
        self.queue.addListener(self._newEntry)
        self._flushMtime = self.queue.flushStamp()
        self._flushLoop = LoopingCall(self._checkFlush)
        self._flushLoop.clock = self.reactor
        self._flushLoop.start(self.scanInterval, now=False)

    def stopService(self) -> defer.Deferred:
        """
        Cancel every timer, abort connections in progress, and wait up to
        L{STOP_GRACE} seconds for the attempts to record their results;
        attempts still running then are abandoned (they stay queued, already
        counted).

        @return: a Deferred firing when stopped.
        """
        Service.stopService(self)
        self.queue.removeListener(self._newEntry)
        if self._flushLoop is not None and self._flushLoop.running:
            self._flushLoop.stop()
        self._flushLoop = None
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self.mx.stop()
        for connection in list(self._connections):
            connection.abort()
        if not self._waiters:
            return defer.succeed(None)
        waits = []
        for queueId in list(self._waiters):
            w: defer.Deferred = defer.Deferred()
            self._waiters[queueId].append(w)
            waits.append(w)
        stopped: defer.Deferred = defer.Deferred()

        def allDone(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not stopped.called:
                stopped.callback(None)

        def abandon() -> None:
            self.log.warn("relay: abandoned attempts in progress; they stay queued")
            stopped.callback(None)

        timer = self.reactor.callLater(STOP_GRACE, abandon)
        defer.DeferredList(waits).addCallback(allDone)
        return stopped

    # -- scheduling ------------------------------------------------------

    def _newEntry(self, entry: Entry) -> None:
        self.entries[entry.queueId] = entry
        self.log.info(
            "queue: queued {queueId} from={sender} recipients={count}",
            queueId=entry.queueId,
            sender="<>" if entry.sender is None else str(entry.sender),
            count=len(entry.recipients),
        )
        if self.running:
            entry.nextAttempt = self.reactor.seconds()
            self._schedule(entry)

    def _schedule(self, entry: Entry) -> None:
        timer = self._timers.pop(entry.queueId, None)
        if timer is not None and timer.active():
            timer.cancel()
        delay = max(0.0, entry.nextAttempt - self.reactor.seconds())
        self._timers[entry.queueId] = self.reactor.callLater(delay, self._fire, entry.queueId)

    def _fire(self, queueId: str) -> None:
        self._timers.pop(queueId, None)
        self.runEntry(queueId)

    def flushAll(self) -> int:
        """
        Make every entry due now and start attempts for them (entries with
        an attempt in progress are left alone).

        @return: how many entries were made due.
        """
        now = self.reactor.seconds()
        count = 0
        for entry in list(self.entries.values()):
            if entry.queueId in self._waiters:
                continue
            entry.nextAttempt = now
            self._schedule(entry)
            count += 1
        self.log.info("relay: flush requested for {count} messages", count=count)
        return count

    def _checkFlush(self) -> None:
        """
        Flush when the C{.flush} file changed.  Called by a L{LoopingCall},
        which would stop at the first exception: an unexpected error is
        logged as a failure and the next poll looks again.
        """
        try:
            mtime = self.queue.flushStamp()
            if mtime is not None and mtime != self._flushMtime:
                self._flushMtime = mtime
                self.flushAll()
        except Exception:
            self.log.failure("relay: checking the flush request failed")

    def runEntry(self, queueId: str) -> defer.Deferred:
        """
        Process entry C{queueId} now (or join the attempt in progress).

        @return: a Deferred firing with L{None} when the attempt is over.
        """
        result: defer.Deferred = defer.Deferred()
        if queueId in self._waiters:
            self._waiters[queueId].append(result)
            return result
        entry = self.entries.get(queueId)
        if entry is None:
            result.callback(None)
            return result
        timer = self._timers.pop(queueId, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._waiters[queueId] = [result]
        d = self._process(entry)

        def failed(f: Failure) -> None:
            self.log.failure("relay: processing {queueId} failed", f, queueId=queueId)

        def done(_: object) -> None:
            waiters = self._waiters.pop(queueId, [])
            if self.running and self.entries.get(queueId) is entry:
                self._schedule(entry)
            for w in waiters:
                w.callback(None)

        d.addErrback(failed)
        d.addCallback(done)
        return result

    # -- one attempt -------------------------------------------------------

    @defer.inlineCallbacks
    def _process(self, entry: Entry):
        now = self.reactor.seconds()
        if entry.isExpired(now, self.lifetime):
            count = entry.expire()
            self.log.warn("relay: {queueId} expired for {count} recipients", queueId=entry.queueId, count=count)
            yield self.queue.saveEntry(entry)
        elif entry.pending():
            recipients = entry.beginAttempt(now, self.schedule, self.lifetime)
            # Recorded durably before the attempt is made.
            yield self.queue.saveEntry(entry)
            outcomes = yield self._deliver(entry, recipients)
            entry.apply(outcomes)
            yield self.queue.saveEntry(entry)
        yield self._notify(entry)
        if entry.isFinished():
            yield self.queue.removeEntry(entry)
            if self.entries.get(entry.queueId) is entry:
                del self.entries[entry.queueId]
            self.log.info(
                "relay: {queueId} done: delivered={delivered} failed={failed}",
                queueId=entry.queueId,
                delivered=sum(r.state == DELIVERED for r in entry.recipients),
                failed=sum(r.state == FAILED for r in entry.recipients),
            )

    @defer.inlineCallbacks
    def _notify(self, entry: Entry):
        """
        Store one bounce for the failed recipients not yet notified.
        """
        failed = entry.unnotified()
        if not failed:
            return
        if entry.sender is None:
            self.log.warn(
                "relay: dropping undeliverable message {queueId} with null sender: {recipients}",
                queueId=entry.queueId,
                recipients=",".join(str(r.address) for r in failed),
            )
        else:
            headers = yield self.queue.readHeaders(entry)
            data = makeBounce(
                self.hostname,
                entry.sender,
                [(r.address, r.status or "5.0.0", r.diagnostic or "") for r in failed],
                headers,
                entry.queueId,
                self.reactor.seconds(),
                arrivalDate=entry.created,
            )
            try:
                yield self.bounceDelivery(entry.sender, data)
            except UnknownUser:
                self.log.warn(
                    "relay: bounce for {queueId} dropped: sender {sender} no longer exists",
                    queueId=entry.queueId,
                    sender=str(entry.sender),
                )
            except Exception:
                now = self.reactor.seconds()
                if now < entry.created + self.lifetime + self.schedule[-1]:
                    self.log.failure("relay: cannot store the bounce for {queueId}", queueId=entry.queueId)
                    entry.lastError = "bounce could not be stored"
                    entry.nextAttempt = now + self.schedule[0]
                    yield self.queue.saveEntry(entry)
                    return
                self.log.failure(
                    "relay: giving up storing the bounce for {queueId} to {sender}",
                    queueId=entry.queueId,
                    sender=str(entry.sender),
                )
            else:
                self.log.info(
                    "relay: bounce for {queueId} sent to {sender} for {count} recipients",
                    queueId=entry.queueId,
                    sender=str(entry.sender),
                    count=len(failed),
                )
        for r in failed:
            r.notified = True
        yield self.queue.saveEntry(entry)

    def _deliver(self, entry: Entry, recipients: list) -> defer.Deferred:
        """
        @return: a Deferred firing with a dict of L{Outcome} per recipient.
        """
        outcomes: dict = {}
        smtputf8 = Outcome(OutcomeKind.FAILED, "5.6.7", "non-ASCII address: SMTPUTF8 is not supported for relaying")
        if entry.sender is not None and not str(entry.sender).isascii():
            return defer.succeed({r: smtputf8 for r in recipients})
        ascii = []
        for r in recipients:
            if str(r).isascii():
                ascii.append(r)
            else:
                outcomes[r] = smtputf8
        if not ascii:
            return defer.succeed(outcomes)
        if self.relayHost is not None:
            domains = ",".join(sorted({r.domain for r in ascii}))
            ds = [self._sendVia(entry, domains, [self.relayHost], self.relayPort, ascii, True)]
        else:
            byDomain: dict = {}
            for r in ascii:
                byDomain.setdefault(r.domain, []).append(r)
            ds = [self._deliverDomain(entry, domain, rs) for domain, rs in byDomain.items()]

        def merge(results: list) -> dict:
            for result in results:
                outcomes.update(result)
            return outcomes

        return defer.gatherResults(ds, consumeErrors=True).addCallback(merge)

    @defer.inlineCallbacks
    def _deliverDomain(self, entry: Entry, domain: str, recipients: list):
        try:
            hosts = yield self.mx.mailHosts(domain)
        except PermanentLookupFailure as e:
            self.log.warn(
                "relay: {queueId} domain={domain} result=failed: {why}",
                queueId=entry.queueId,
                domain=domain,
                why=e.text,
            )
            return {r: Outcome(OutcomeKind.FAILED, e.status, e.text) for r in recipients}
        except Exception as e:
            why = describeDNSFailure(domain, e)
            self.log.warn(
                "relay: {queueId} domain={domain} result=deferred: {why}",
                queueId=entry.queueId,
                domain=domain,
                why=why,
            )
            return {r: Outcome(OutcomeKind.DEFERRED, "4.4.3", why) for r in recipients}
        return (yield self._sendVia(entry, domain, hosts, SMTP_PORT, recipients, False))

    @defer.inlineCallbacks
    def _sendVia(self, entry: Entry, domain: str, hosts: list, port: int, recipients: list, relay: bool):
        remaining = list(recipients)
        outcomes: dict = {}
        lastError = "no mail exchanger reached"
        for host in hosts:
            session = yield self._semaphore.run(self._session, entry, host, port, remaining, relay)
            if session.tlsHandshakeFailed and not relay:
                # RFC 7435: opportunistic TLS that fails to negotiate falls
                # back to a plaintext session with the same host.
                self.log.info(
                    "relay: {queueId} TLS handshake with {host}:{port} failed (error={error}); retrying without TLS",
                    queueId=entry.queueId,
                    host=host,
                    port=port,
                    error=events.sanitize(session.error.text if session.error else "-", events.MAX_LOGGED_REPLY),
                )
                session = yield self._semaphore.run(self._session, entry, host, port, remaining, relay, False)
            outcomes.update(session.outcomes)
            self._logSession(entry, domain, host, port, session, remaining, relay)
            remaining = [r for r in remaining if r not in session.outcomes]
            if not remaining:
                break
            lastError = f"{host}: {session.error.text}"
        for r in remaining:
            outcomes[r] = Outcome(OutcomeKind.DEFERRED, "4.4.1", oneLine(lastError))
        return outcomes

    def _logSession(
        self, entry: Entry, domain: str, host: str, port: int, session: SessionResult, recipients: list, relay: bool
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
        level(
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
            self.log.warn(
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
        self, entry: Entry, host: str, port: int, recipients: list, relay: bool, useTLS: bool = True
    ) -> defer.Deferred:
        """
        One SMTP session with C{host} for C{recipients} (L{deliverOnce}).

        @param useTLS: use STARTTLS when the peer offers it (false only for
            the plaintext retry after a failed opportunistic handshake).

        @return: a Deferred firing with the L{SessionResult}.
        """
        if not self.running:
            return defer.succeed(SessionResult.broken("relay service stopping"))
        try:
            message = self.queue.openMessage(entry)
        except OSError as e:
            return defer.succeed(SessionResult.broken(oneLine(f"cannot read queued message: {e}")))
        credentials = None
        if relay and self.relayUsername is not None and self.relayPassword is not None:
            credentials = (self.relayUsername, self.relayPassword)
        policy, loopbackPolicy = self._tlsPolicy(relay, credentials is not None, useTLS)

        def contextFor(policy: TLSPolicy) -> tuple:
            if not relay:
                # verify=None asks for an opportunistic (unverified) context.
                return self.clientTLS(host, None), False
            if policy is TLSPolicy.REQUIRED_STARTTLS:
                return self.clientTLS(host, self.relayVerifyTLS), self.relayVerifyTLS
            # Opportunistic to a smarthost: verification off, or a smarthost
            # on this machine.
            return self.clientTLS(host, None if self.relayVerifyTLS else False), False

        try:
            endpointFactory = self._endpointFactory if relay else self._mxEndpointFactory
            endpoint = _AbortableEndpoint(endpointFactory(host, port))
        except Exception:
            with contextlib.suppress(OSError):
                message.close()
            return defer.succeed(SessionResult.broken(oneLine(f"cannot connect: {Failure().getErrorMessage()}")))
        self._connections.add(endpoint)
        d = deliverOnce(
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
        )

        def finished(result: SessionResult) -> SessionResult:
            self._connections.discard(endpoint)
            return result

        return d.addCallback(finished)

    def _tlsPolicy(self, relay: bool, credentials: bool, useTLS: bool) -> tuple:
        """
        @return: the L{TLSPolicy} of a session, and the one that replaces it
            when the peer turns out to be on this machine (or L{None}).
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


class _AbortableEndpoint:
    """
    An endpoint that remembers its one connection attempt, so that the
    relay can abort it when it stops.
    """

    def __init__(self, endpoint) -> None:
        self._endpoint = endpoint
        self._connecting: Optional[defer.Deferred] = None
        self._protocol = None

    def connect(self, factory) -> defer.Deferred:
        self._connecting = self._endpoint.connect(factory)

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
