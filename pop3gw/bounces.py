# -*- test-case-name: tests.test_bounces -*-
"""
Bounces of the outbound queue: for the recipients of a queued message that
failed permanently, one RFC 3464 report (built by L{pop3gw.dsn}) is stored
for the sender before the failures are marked notified, so a crash in
between stores it again rather than never.

A report that cannot be returned (the message has the null sender, the
sender is no longer a local user, the sender's maildrop refuses it, or
storing it kept failing until the retry period ran out) goes to the
postmaster instead, as a notice (Postfix's "double bounce"), with a log
line.  A notice is tried once: one that cannot be stored is logged and
dropped, never retried nor noticed in turn, so notices cannot loop.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from pop3gw.address import Address
from pop3gw.dsn import Failure, makeBounce
from pop3gw.interfaces import IQueueStore, PermanentFailure, TemporaryFailure, UnknownUser
from pop3gw.queue import Entry

#: The local part of the postmaster address (RFC 5321 section 4.5.1).
POSTMASTER = "postmaster"


def noticeRecipient(
    sender: Optional[Address],
    postmaster: Optional[Address],
    hostname: str,
    isLocalDomain: Callable[[str], bool],
) -> Optional[Address]:
    """
    Who receives pop3gw's notices about a message from C{sender}.

    @param sender: the message's envelope sender (a local user), or
        C{None} for the null sender.
    @param postmaster: the C{[pop3gw] postmaster} user, or C{None}.
    @param hostname: this server's host name.
    @param isLocalDomain: whether a domain is local.
    @return: C{postmaster} when set; else C{postmaster@} the sender's
        domain; else C{postmaster@} the local domain the host name is in
        (itself or the nearest parent, C{example.org} for
        C{mail.example.org}); else C{None}.  The address is then resolved
        like any local recipient (an alias, the domain's first user).
    """
    if postmaster is not None:
        return postmaster
    if sender is not None:
        return Address(POSTMASTER, sender.domain)
    labels = hostname.lower().rstrip(".").split(".")
    for i in range(len(labels) - 1):
        domain = ".".join(labels[i:])
        if isLocalDomain(domain):
            return Address(POSTMASTER, domain)
    return None


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
    @param postmasterOf: C{postmasterOf(sender) -> Address or None}: who
        receives the notice about a message from C{sender} whose report
        cannot be returned (see L{noticeRecipient}); C{None}: nobody, the
        notice is only logged.
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
        postmasterOf: Optional[Callable[[Optional[Address]], Optional[Address]]] = None,
    ) -> None:
        self.queue = queue
        self.reactor = clock
        self.hostname = hostname
        self.bounceDelivery = bounceDelivery
        self.log = log
        self.retryDelay = retryDelay
        self.keepTrying = keepTrying
        self.postmasterOf = postmasterOf

    @defer.inlineCallbacks
    def notify(self, entry: Entry):
        """
        Store one bounce for C{entry}'s failed recipients not yet notified
        and mark them notified (L{Entry.unnotified}).  A bounce that cannot
        be stored is tried again at the entry's next attempt, until
        C{keepTrying} seconds after the message was queued.  With the null
        sender, or when the bounce cannot be returned, a notice goes to the
        postmaster instead (L{_notifyPostmaster}).

        @return: a Deferred firing once the entry is saved.
        """
        failed = entry.unnotified()
        if not failed:
            return
        headers = yield self.queue.readHeaders(entry)
        failures = [(r.address, r.status or "5.0.0", r.diagnostic or "") for r in failed]
        sender = entry.sender
        if sender is None:
            yield self._notifyPostmaster(
                entry, failures, headers, "the message has the null sender",
                ["It has the null sender <>, so there is nobody to return it to."],
            )
        else:
            data = makeBounce(
                self.hostname,
                sender,
                failures,
                headers,
                entry.queueId,
                self.reactor.seconds(),
                arrivalDate=entry.created,
            )
            returned = f"The report could not be returned to its sender <{sender}>:"
            try:
                yield self.bounceDelivery(sender, data)
            except UnknownUser:
                yield self._notifyPostmaster(
                    entry, failures, headers, f"sender {sender} is not a local user any more",
                    [returned, "the sender is not a local user any more."],
                )
            except PermanentFailure as e:
                yield self._notifyPostmaster(
                    entry, failures, headers, f"sender {sender} refused it ({e})",
                    [returned, f"the sender's maildrop refused it ({e})."],
                )
            except Exception as e:
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
                    sender=str(sender),
                )
                yield self._notifyPostmaster(
                    entry, failures, headers, f"sender {sender}: storing it kept failing",
                    [returned, f"storing it kept failing until the retry period ran out ({e})."],
                )
            else:
                self.log.info(
                    "relay: bounce for {queueId} sent to {sender} for {count} recipients",
                    queueId=entry.queueId,
                    sender=str(sender),
                    count=len(failed),
                )
        for r in failed:
            r.notified = True
        yield self.queue.saveEntry(entry)

    @defer.inlineCallbacks
    def _notifyPostmaster(
        self, entry: Entry, failures: Sequence[Failure], headers: bytes, why: str, explanation: Sequence[str]
    ):
        """
        Store a notice about C{entry}'s C{failures} for the postmaster:
        the report that could not be returned, saying why.  Tried once; a
        notice that cannot be stored is logged and dropped.

        @param why: why the report cannot be returned, for the log line.
        @param explanation: the same for the postmaster, lines of the
            notice's text.
        @return: a Deferred that fires (never fails) once the notice was
            stored or dropped.
        """
        postmaster = None if self.postmasterOf is None else self.postmasterOf(entry.sender)
        if postmaster is None:
            self.log.warn(
                "relay: bounce for {queueId} cannot be returned: {why}; no postmaster to notify, dropped",
                queueId=entry.queueId,
                why=why,
            )
            return
        data = makeBounce(
            self.hostname,
            postmaster,
            failures,
            headers,
            entry.queueId,
            self.reactor.seconds(),
            arrivalDate=entry.created,
            notice=explanation,
        )
        try:
            yield self.bounceDelivery(postmaster, data)
        except (UnknownUser, PermanentFailure, TemporaryFailure) as e:
            self.log.warn(
                "relay: bounce for {queueId} cannot be returned: {why}; the notice to postmaster {postmaster} "
                "cannot be stored either ({error}), dropped",
                queueId=entry.queueId,
                why=why,
                postmaster=str(postmaster),
                error=str(e) or type(e).__name__,
            )
        except Exception:
            self.log.failure(
                "relay: bounce for {queueId} cannot be returned: {why}; storing the notice to postmaster "
                "{postmaster} failed, dropped",
                queueId=entry.queueId,
                why=why,
                postmaster=str(postmaster),
            )
        else:
            self.log.warn(
                "relay: bounce for {queueId} cannot be returned: {why}; notice sent to postmaster {postmaster}",
                queueId=entry.queueId,
                why=why,
                postmaster=str(postmaster),
            )
