# -*- test-case-name: tests.test_relay_service -*-
"""
The relay service: empties the outbound queue (L{pop3gw.queue}) by SMTP.

Relaying
========

L{RelayService} loads every entry at start-up and schedules each at its
next attempt time, so a restart resumes where it stopped.  A newly queued
message is tried at once.  Each attempt is recorded (C{attempts + 1} and the
next attempt time, L{IQueueStore.recordAttempt}) durably I{before} it is
made.  A recipient is done when
the remote side accepted it (2xx after C{DATA}) or refused it permanently
(5xx); 4xx replies, connection failures, time-outs and temporary DNS
failures leave it pending, retried on the L{DEFAULT_SCHEDULE}.  Once the
queue lifetime has passed since the message was queued, pending recipients
fail permanently ("expired").  Each batch of permanent failures produces
exactly one RFC 3464 bounce to the envelope sender, stored through the
C{bounceDelivery} callable before the failures are marked as notified; a
report that cannot be returned (the null sender, a sender who is gone or
whose maildrop refuses it) goes to the postmaster as a notice instead
(L{pop3gw.bounces}).
An entry's files are removed only once no recipient is pending and every
failure was notified.

Results are per recipient: when a server (a smarthost included) accepts
some recipients at C{RCPT} and refuses others, the accepted ones are done
once the end of data is accepted, the 5xx ones are bounced, the 4xx ones
stay pending and only they are named in the next attempt.

Duplicates: the outcome of an attempt is written to the C{.json} after the
remote server's reply to the end of data (an entry with nothing left to do
is removed instead, and the removal is its record).  If the process dies
between that reply and the write or removal (or it fails), the next
attempt, after a restart, sends the message again to the recipients that
had accepted it: a duplicate, never a loss (the RFC 1047 window, on the
client side).  The same
holds for the bounce: one stored just before a crash that kept its
recipients from being marked notified is stored again.

Each attempt is made by a L{pop3gw.relay.dispatch.Dispatcher} (where each
recipient goes, one L{pop3gw.relay.client.deliverOnce} session per host,
the log line of each session, logged here once the attempt's outcomes are
saved); bounces are stored by a
L{pop3gw.bounces.Bouncer}.  The relay logs under the namespace
C{pop3gw.queue.RelayService} (L{LOG_NAMESPACE}), as it always has.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
from typing import Callable, Iterator, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3gw.bounces import Bouncer
from pop3gw.interfaces import IQueueStore, QueueEntryLost
from pop3gw.queue import DELIVERED, FAILED, Entry
from pop3gw.relay.client import deliverOnce
from pop3gw.relay.dispatch import SMTP_PORT, Dispatcher

# --- Limits and defaults ------------------------------------------------

#: Retry delays in seconds after the first, second, ... failed attempt; the
#: last one repeats.
DEFAULT_SCHEDULE = (5 * 60, 15 * 60, 60 * 60, 2 * 60 * 60)

#: How long a message may stay queued before its pending recipients fail.
DEFAULT_LIFETIME = 5 * 86400

#: Seconds allowed for a TCP connection to a mail exchanger.
DEFAULT_CONNECT_TIMEOUT = 60

#: How often, in seconds, the relay looks at the queue's flush stamp.
FLUSH_POLL_INTERVAL = 5.0

#: The most SMTP client connections open at the same time.
MAX_CONNECTIONS = 20

#: How long C{stopService} waits for attempts in progress before it
#: abandons them (they stay queued).
STOP_GRACE = 10.0

#: Entries in progress at once, per connection allowed
#: (C{maxConnections}): an attempt is recorded on disk before it is made,
#: so a long queue all due at once is taken a few at a time rather than
#: recorded all at once before the first message goes out.
ENTRIES_PER_CONNECTION = 2

#: The default relay port: 25 without credentials (a smarthost relaying by
#: IP), 587 (submission, RFC 6409) when a relay user name is configured.
SUBMISSION_PORT = 587

#: The namespace of the relay's log lines, as operators' log filters know it.
LOG_NAMESPACE = "pop3gw.queue.RelayService"


# --- The relay service -------------------------------------------------------


@contextlib.contextmanager
def _collectorPaused() -> Iterator[None]:
    """
    Pause Python's cyclic garbage collector while a long queue is loaded:
    the objects made are long-lived, and collections triggered by their
    number alone would scan them again and again.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class RelayService(Service):
    """
    Delivers the entries of a queue (see the module docstring).

    @param queue: the queue, an L{IQueueStore}.
    @param reactor: a reactor (C{callLater}, C{seconds}, TCP).
    @param hostname: this server's name (C{EHLO}, bounces).
    @param bounceDelivery: C{bounceDelivery(sender, data) -> Deferred}
        stores a bounce for the local user C{sender}.
    @param postmasterOf: C{postmasterOf(sender) -> Address or None}: who
        receives the notice about a message from C{sender} whose bounce
        cannot be returned (L{pop3gw.bounces.noticeRecipient}); C{None}:
        nobody, the notice is only logged.
    @param relayHost: send everything to this smarthost instead of MX hosts.
    @param relayPort: the smarthost's port; C{None} means L{SUBMISSION_PORT}
        with credentials, L{SMTP_PORT} without.
    @param relayUsername: AUTH user name (sent only over TLS).
    @param relayPassword: AUTH password (never logged).
    @param relayVerifyTLS: verify the smarthost's certificate.
    @param resolver: an C{IResolver} for MX lookups; a
        C{twisted.names.client.Resolver} on C{/etc/resolv.conf} if C{None}.
    @param clientTLS: C{clientTLS(hostname, verify) -> contextFactory};
        called with C{verify=relayVerifyTLS} for the relay host and with
        C{verify=None} for MX hosts, meaning opportunistic (unverified) TLS
        (C{pop3gw.tlsclient.opportunisticClientContextFactory}).  C{None} means
        plaintext only.
    @param schedule: retry delays, see L{DEFAULT_SCHEDULE}.
    @param lifetime: seconds before pending recipients expire.
    @param connectTimeout: TCP connect timeout in seconds.
    @param scanInterval: seconds between looks at the C{.flush} file.
    @param maxConnections: the most messages sent at once (C{[limits]
        relay-connections}), each over its own SMTP connection; smarthost
        connections are reused (see L{Dispatcher}).
    @param endpointFactory: C{endpointFactory(host, port) ->
        IStreamClientEndpoint}; a C{HostnameEndpoint} if C{None} (tests
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
        deliverOnce: Callable = deliverOnce,
        postmasterOf: Optional[Callable] = None,
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
        self.clientTLS = clientTLS
        self.schedule = tuple(schedule)
        self.lifetime = lifetime
        self.scanInterval = scanInterval
        self.entries: dict = {}
        # The entries waiting for their next attempt: queue id -> the
        # number of its item (time, number, id) in the heap _due, which has
        # one timer, _wakeup, for the earliest; an item whose number is no
        # longer its entry's is stale and skipped.  Entries due at the same
        # time go in the order they were scheduled.
        self._scheduled: dict = {}
        self._due: list = []
        self._numbers = itertools.count()
        self._wakeup: Optional[IDelayedCall] = None
        self._waiters: dict = {}
        # Entries waiting for one of the slots: queue id -> the Deferred.
        self._slots = defer.DeferredSemaphore(maxConnections * ENTRIES_PER_CONNECTION)
        self._queued: dict = {}
        self._flushLoop: Optional[LoopingCall] = None
        self._flushMtime: Optional[int] = None
        self.bouncer = Bouncer(
            queue, reactor, hostname, bounceDelivery, self.log, self.schedule[0], lifetime + self.schedule[-1],
            postmasterOf,
        )
        self.dispatcher = Dispatcher(
            queue,
            reactor,
            hostname,
            self.log,
            relayHost,
            relayPort,
            relayUsername,
            relayPassword,
            relayVerifyTLS,
            resolver,
            clientTLS,
            connectTimeout,
            maxConnections,
            endpointFactory,
            deliverOnce,
        )

    # -- service life --------------------------------------------------

    def startService(self) -> None:
        """
        Load every entry (removing orphaned files), schedule each at its
        next attempt time, listen for new entries and start watching the
        C{.flush} file.
        """
        Service.startService(self)
        self.dispatcher.start()
        if self.relayUsername and self.clientTLS is None:
            self.log.error("relay: credentials are configured but TLS is not; relaying will fail")
        with _collectorPaused():
            self.entries = {e.queueId: e for e in self.queue.loadEntries()}
            self._due = [(e.nextAttempt, next(self._numbers), e.queueId) for e in self.entries.values()]
            self._scheduled = {queueId: number for _, number, queueId in self._due}
            heapq.heapify(self._due)
        self._arm()
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
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None
        self._scheduled.clear()
        self._due = []
        # Entries still waiting for a slot are not tried (their waiters are
        # told at once); one by one, not as a chain of releases.
        for waiting in list(self._queued.values()):
            waiting.cancel()
        self.dispatcher.stop()
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
        """
        Make C{entry}'s next attempt at its C{nextAttempt} (replacing the
        one scheduled, if any).
        """
        when = entry.nextAttempt
        number = self._scheduled[entry.queueId] = next(self._numbers)
        heapq.heappush(self._due, (when, number, entry.queueId))
        if len(self._due) > 2 * len(self._scheduled) + 64:
            # Stale items outnumber the live ones: drop them.
            scheduled = self._scheduled
            self._due = [item for item in self._due if scheduled.get(item[2]) == item[1]]
            heapq.heapify(self._due)
        if self._wakeup is None or not self._wakeup.active() or when < self._wakeup.getTime():
            self._arm()

    def _unschedule(self, queueId: str) -> None:
        """
        Cancel the scheduled attempt of entry C{queueId}, if any (its heap
        item becomes stale).
        """
        self._scheduled.pop(queueId, None)

    def _arm(self) -> None:
        """
        Set the one timer for the earliest scheduled attempt.
        """
        due, scheduled = self._due, self._scheduled
        while due and scheduled.get(due[0][2]) != due[0][1]:
            heapq.heappop(due)
        if self._wakeup is not None and self._wakeup.active():
            if due and self._wakeup.getTime() == due[0][0]:
                return
            self._wakeup.cancel()
        self._wakeup = None
        if due:
            delay = max(0.0, due[0][0] - self.reactor.seconds())
            self._wakeup = self.reactor.callLater(delay, self._fire)

    def _fire(self) -> None:
        """
        Start the attempts now due, oldest time first, and set the timer for
        the next.
        """
        self._wakeup = None
        now = self.reactor.seconds()
        due, scheduled = self._due, self._scheduled
        ready = []
        while due and due[0][0] <= now:
            _, number, queueId = heapq.heappop(due)
            if scheduled.get(queueId) == number:
                del scheduled[queueId]
                ready.append(queueId)
        for queueId in ready:
            self.runEntry(queueId)
        if self._wakeup is None:
            self._arm()

    def dropEntry(self, queueId: str) -> None:
        """
        Forget entry C{queueId}, which another node relays now (a shared
        queue's lease was lost): its next attempt is not made.  An attempt
        in progress is left to fail its next save.
        """
        if queueId in self._waiters:
            return
        self._unschedule(queueId)
        self.entries.pop(queueId, None)

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
        Flush when the C{.flush} file changed.  Called by a C{LoopingCall},
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

        @return: a Deferred firing with C{None} when the attempt is over.
        """
        result: defer.Deferred = defer.Deferred()
        if queueId in self._waiters:
            self._waiters[queueId].append(result)
            return result
        found = self.entries.get(queueId)
        if found is None:
            result.callback(None)
            return result
        entry: Entry = found
        self._unschedule(queueId)
        self._waiters[queueId] = [result]
        slot = self._queued[queueId] = self._slots.acquire()

        def acquired(_: object) -> defer.Deferred:
            del self._queued[queueId]
            return self._process(entry).addBoth(released)

        def released(r: object) -> object:
            self._slots.release()
            return r

        def failed(f: Failure) -> None:
            if f.check(defer.CancelledError):
                # Stopped before its turn came.
                self._queued.pop(queueId, None)
                return
            if f.check(QueueEntryLost):
                # Another node relays it now (a shared queue): forgotten
                # here, not rescheduled.
                self.log.warn("relay: {queueId} is relayed by another node now", queueId=queueId)
                if self.entries.get(queueId) is entry:
                    del self.entries[queueId]
                return
            self.log.failure("relay: processing {queueId} failed", f, queueId=queueId)
            # A fault that repeats (a removal that keeps failing) waits for
            # the first retry delay rather than running again at once.
            entry.nextAttempt = max(entry.nextAttempt, self.reactor.seconds() + self.schedule[0])

        def done(_: object) -> None:
            waiters = self._waiters.pop(queueId, [])
            if self.running and self.entries.get(queueId) is entry:
                self._schedule(entry)
            for w in waiters:
                w.callback(None)

        d = slot.addCallback(acquired)
        d.addErrback(failed)
        d.addCallback(done)
        return result

    # -- one attempt -------------------------------------------------------

    @defer.inlineCallbacks
    def _process(self, entry: Entry):
        now = self.reactor.seconds()
        removed = False
        if entry.isExpired(now, self.lifetime):
            count = entry.expire()
            self.log.warn("relay: {queueId} expired for {count} recipients", queueId=entry.queueId, count=count)
            yield self.queue.saveEntry(entry)
        elif entry.pending():
            recipients = entry.beginAttempt(now, self.schedule, self.lifetime)
            # Recorded durably before the attempt is made.
            yield self.queue.recordAttempt(entry)
            # The result lines are logged once the outcomes are on disk: an
            # operator who reads one and runs 'queue list' sees the same.
            held: list = []
            try:
                outcomes = yield self.dispatcher.deliver(entry, recipients, held)
                entry.apply(outcomes)
                if entry.isFinished():
                    # Nothing is left to record: the removal records the
                    # outcome.
                    yield self.queue.removeEntry(entry)
                    removed = True
                else:
                    yield self.queue.saveEntry(entry)
            finally:
                for logLine in held:
                    logLine()
        if not removed:
            yield self.bouncer.notify(entry)
        if entry.isFinished():
            if not removed:
                yield self.queue.removeEntry(entry)
            if self.entries.get(entry.queueId) is entry:
                del self.entries[entry.queueId]
            self.log.info(
                "relay: {queueId} done: delivered={delivered} failed={failed}",
                queueId=entry.queueId,
                delivered=sum(r.state == DELIVERED for r in entry.recipients),
                failed=sum(r.state == FAILED for r in entry.recipients),
            )
