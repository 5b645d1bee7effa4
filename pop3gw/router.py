# -*- test-case-name: tests.test_router -*-
"""
Sends each recipient of a message to a local maildrop or the outbound queue.

A L{Router} knows the local domains and the users database.  A recipient in
a local domain must resolve to one or more users (directly, or by alias,
distribution list, postmaster, sub-address or catch-all); any
other recipient is remote and goes to the outbound queue.  One message
becomes at most two parts: one maildrop delivery for all local recipients,
and one queue entry for all remote ones.
"""

from __future__ import annotations

from typing import Container, Iterable, Optional, Sequence, cast

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3gw.address import Address
from pop3gw.interfaces import (
    IDelivery,
    IMaildropStore,
    IMailRouter,
    IOutboundQueue,
    IQueuedDelivery,
    IRoutedDelivery,
    ITwoPhaseDelivery,
    IUserDirectory,
    PermanentFailure,
    RelayDenied,
    TemporaryFailure,
    UnknownUser,
)


def _asDeliveryFailure(log: Logger, f: Failure, what: str) -> Failure:
    """
    Keep L{TemporaryFailure} and L{PermanentFailure}; turn anything else
    into a logged L{TemporaryFailure}.
    """
    if f.check(TemporaryFailure, PermanentFailure):
        return f
    log.failure("router: {what} failed", f, what=what)
    return Failure(TemporaryFailure(f"{what} failed"))


@implementer(IRoutedDelivery)
class _RoutedDelivery:
    """
    One message fanned out to a maildrop part and a queue part.

    L{commit} order:

      1. the queue part is made durable first (L{ITwoPhaseDelivery.prepare},
         or plain C{commit} for a queue without two phases); if that fails,
         the local part is aborted and the commit fails: nothing was kept,
         and the client's retry duplicates nothing;
      2. then the local part is committed; if that fails, the prepared
         queue entry is withdrawn (L{ITwoPhaseDelivery.discard}) before the
         commit fails, so the client's retry does not send the remote copy
         twice;
      3. only when both are durable is the queue entry released to the
         relay, and the commit succeeds.

    A committed maildrop copy cannot be withdrawn, which is why it comes
    last: the only failure left after it is none.

    Besides L{IDelivery}, it says where the message goes, so that a
    protocol can name one id for it and log its routing:

    @ivar queueId: the queue id of the remote part (the C{queueId} of the
        queue's L{IQueuedDelivery}: the id C{pop3gw queue list}, the relay's log
        lines and bounces use), or C{None} if there is no remote part or
        the queue does not name one.
    @ivar localRecipients: the local recipients, a tuple of L{Address}.
    @ivar remoteRecipients: the remote recipients, a tuple of L{Address}.
    """

    log = Logger()

    def __init__(
        self,
        local: Optional[IDelivery],
        remote: Optional[IDelivery],
        localRecipients: Sequence[Address] = (),
        remoteRecipients: Sequence[Address] = (),
    ):
        self._local = local
        self._remote = remote
        self._state = "open"
        queued = IQueuedDelivery(remote, None)
        self.queueId: Optional[str] = None if queued is None else queued.queueId
        self.localRecipients = tuple(localRecipients)
        self.remoteRecipients = tuple(remoteRecipients)

    def _parts(self) -> list:
        return [p for p in (self._remote, self._local) if p is not None]

    def write(self, data: bytes) -> None:
        if self._state != "open":
            raise TemporaryFailure("delivery is not open")
        for part in self._parts():
            part.write(data)

    def commit(self) -> defer.Deferred:
        if self._state != "open":
            return defer.fail(TemporaryFailure("delivery is not open"))
        self._state = "committing"
        if self._remote is None and self._local is not None:
            return self._commitLocal(self._local)
        return self._commit()

    def _commitLocal(self, local: IDelivery) -> defer.Deferred:
        """
        Commit a message with local recipients only: the same outcome as
        L{_commit}, without its generator (the common case of submission
        to a local user).
        """

        def committed(result: object) -> None:
            self._state = "committed"

        def failed(f: Failure) -> Failure:
            self._state = "aborted"
            return _asDeliveryFailure(self.log, f, "local delivery")

        return defer.maybeDeferred(local.commit).addCallbacks(committed, failed)

    @defer.inlineCallbacks
    def _commit(self):
        remote, local = self._remote, self._local
        staged: Optional[ITwoPhaseDelivery] = None
        if remote is not None and ITwoPhaseDelivery.providedBy(remote):
            staged = remote
        if remote is not None:
            try:
                if staged is not None:
                    yield defer.maybeDeferred(staged.prepare)
                else:
                    yield defer.maybeDeferred(remote.commit)
            except Exception:
                f = Failure()
                self._state = "aborted"
                if local is not None:
                    local.abort()
                _asDeliveryFailure(self.log, f, "queueing").raiseException()
        if local is not None:
            try:
                yield defer.maybeDeferred(local.commit)
            except Exception:
                f = Failure()
                self._state = "aborted"
                if staged is not None:
                    try:
                        yield defer.maybeDeferred(staged.discard)
                    except Exception:
                        self.log.failure("router: cannot withdraw the queued copy after a local failure")
                elif remote is not None:
                    self.log.warn("router: local delivery failed after the remote copy was queued")
                _asDeliveryFailure(self.log, f, "local delivery").raiseException()
        if staged is not None:
            staged.release()
        self._state = "committed"

    def abort(self) -> None:
        if self._state == "open":
            self._state = "aborted"
            for part in self._parts():
                part.abort()


def isRoutableDomain(domain: str) -> bool:
    """
    Whether C{domain} could be a public mail domain: at least two labels,
    the last one not all digits (so not C{localhost}, not C{127.0.0.1}).
    """
    labels = domain.split(".")
    return len(labels) >= 2 and not labels[-1].isdigit()


@implementer(IMailRouter)
class Router:
    """
    Routes recipients between C{store} (local domains) and C{queue}.

    @param domains: the local domains: a collection of names (any case; a
        trailing dot is ignored), or any object supporting C{in} with
        lower-case names, asked on every lookup.
    @param users: the users directory (its snapshot's C{resolve} maps
        aliases to users).
    @param store: the maildrops.
    @param queue: the outbound queue.
    """

    def __init__(
        self,
        domains: Iterable[str],
        users: IUserDirectory,
        store: IMaildropStore,
        queue: IOutboundQueue,
    ):
        self._domains: Container[str]
        if isinstance(domains, (str, list, tuple, set, frozenset)) or not hasattr(domains, "__contains__"):
            self._domains = frozenset(d.lower().rstrip(".") for d in domains)
        else:
            # A live container (e.g. one that also counts the domains of
            # users added later): asked each time, not copied.
            self._domains = cast(Container[str], domains)
        self._users = users
        self._store = store
        self._queue = queue

    def isLocalDomain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self._domains

    def checkRecipient(self, address: Address) -> tuple[Address, ...]:
        """
        See L{IMailRouter.checkRecipient}.  A non-local domain that cannot
        be a public mail domain (a single label such as C{localhost}, or an
        IPv4 address written as a domain) is refused with
        L{PermanentFailure} at once, rather than queued to fail later.
        """
        if not self.isLocalDomain(address.domain):
            if not isRoutableDomain(address.domain):
                raise PermanentFailure(f"{address.domain} is not a public mail domain")
            return (address,)
        return self._localUsers(address)

    def _localUsers(self, address: Address) -> tuple[Address, ...]:
        """
        The users mail for C{address}, in a local domain, goes to.

        @raise UnknownUser: it resolves to nobody.
        """
        users = self._users.snapshot().resolve(address)
        if not users:
            raise UnknownUser(str(address))
        return users

    def checkLocalRecipient(self, address: Address) -> tuple[Address, ...]:
        """
        See L{IMailRouter.checkLocalRecipient}: the same resolution as
        L{checkRecipient}, but a recipient outside the local domains is
        L{RelayDenied}.
        """
        if not self.isLocalDomain(address.domain):
            raise RelayDenied(f"{address.domain} is not a local domain")
        return self._localUsers(address)

    def beginLocalDelivery(self, sender: Optional[Address], recipients: Sequence[Address], trace: bytes = b"") -> IDelivery:
        """
        See L{IMailRouter.beginLocalDelivery}: the queue is never asked.
        """
        for r in recipients:
            if not self.isLocalDomain(r.domain):
                raise RelayDenied(f"{r.domain} is not a local domain")
        local = list(dict.fromkeys(recipients))
        return _RoutedDelivery(self._store.beginDelivery(local, trace), None, local, ())

    def beginDelivery(
        self, sender: Optional[Address], recipients: Sequence[Address], trace: bytes = b"", smtputf8: bool = False
    ) -> IDelivery:
        local: list = []
        remote: list = []
        for r in recipients:
            bucket = local if self.isLocalDomain(r.domain) else remote
            if r not in bucket:
                bucket.append(r)
        remotePart = self._queue.beginDelivery(sender, remote, trace, smtputf8=smtputf8) if remote else None
        try:
            localPart = self._store.beginDelivery(local, trace) if local else None
        except BaseException:
            if remotePart is not None:
                remotePart.abort()
            raise
        return _RoutedDelivery(localPart, remotePart, local, remote)
