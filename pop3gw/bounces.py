# -*- test-case-name: tests.test_bounces -*-
"""
Bounces of the outbound queue: for the recipients of a queued message that
failed permanently, one RFC 3464 report (built by L{pop3gw.dsn}) is stored
for the sender before the failures are marked notified, so a crash in
between stores it again rather than never.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from pop3gw.dsn import makeBounce
from pop3gw.interfaces import IQueueStore, UnknownUser
from pop3gw.queue import Entry


class Bouncer:
    """
    Stores the bounces of queued messages.

    @param queue: the queue (headers of the message, saving the entry).
    @param clock: gives the time (C{seconds}).
    @param hostname: this server's name, the bounce's reporting MTA.
    @param bounceDelivery: C{bounceDelivery(sender, data) -> Deferred}
        stores a bounce for the local user C{sender} (L{UnknownUser} if
        there is none any more).
    @param log: the relay's logger.
    @param retryDelay: seconds before a bounce that could not be stored is
        tried again.
    @param keepTrying: seconds after queueing during which a bounce that
        cannot be stored is tried again; then it is given up (logged).
    """

    def __init__(
        self,
        queue: IQueueStore,
        clock,
        hostname: str,
        bounceDelivery: Callable,
        log: Logger,
        retryDelay: float,
        keepTrying: float,
    ) -> None:
        self.queue = queue
        self.reactor = clock
        self.hostname = hostname
        self.bounceDelivery = bounceDelivery
        self.log = log
        self.retryDelay = retryDelay
        self.keepTrying = keepTrying

    @defer.inlineCallbacks
    def notify(self, entry: Entry):
        """
        Store one bounce for C{entry}'s failed recipients not yet notified
        and mark them notified (L{Entry.unnotified}); with the null sender,
        only log them.  A bounce that cannot be stored is tried again at the
        entry's next attempt, until C{keepTrying} seconds after the message
        was queued.

        @return: a Deferred firing once the entry is saved.
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
                if now < entry.created + self.keepTrying:
                    self.log.failure("relay: cannot store the bounce for {queueId}", queueId=entry.queueId)
                    entry.lastError = "bounce could not be stored"
                    entry.nextAttempt = now + self.retryDelay
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
