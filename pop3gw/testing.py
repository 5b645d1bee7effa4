# -*- test-case-name: tests.test_testing -*-
"""
In-memory fakes of pop3gw's interfaces, for tests.

Each fake is checked against its interface with C{verifyObject} in
C{tests.test_testing}, and the contract-test mixins run over both a fake and
the real implementation.
"""

from __future__ import annotations

import collections
import io
from typing import Any, Iterable, Optional, Sequence

import attr
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3gw import runner as _runner
from pop3gw.address import Address, lookupKey
from pop3gw.directory import Directory
from pop3gw.interfaces import (
    BadMessageData,
    IBlockingRunner,
    IDelivery,
    IMaildrop,
    IMaildropStore,
    IMailRouter,
    IMessageInfo,
    IOutboundQueue,
    IPOP3Avatar,
    IQueuedDelivery,
    IRoutedDelivery,
    ISubmissionAvatar,
    IUserDirectory,
    IUserStore,
    LookupWouldBlock,
    MaildropLocked,
    PermanentFailure,
    RelayDenied,
    TemporaryFailure,
    UnknownUser,
    UserExists,
)
from pop3gw.router import isRoutableDomain
from pop3gw.wire import toCRLF


@implementer(IUserDirectory, IUserStore)
class FakeUserDatabase:
    """
    Users in a dict: address -> stored hash; aliases: alias -> a user or
    a tuple of users; catchAll: domain -> a user or a tuple of users.  All
    may be changed directly; L{snapshot} always reflects them, resolved
    by the same L{Directory} as the real users file.

    @ivar postmaster: who receives C{postmaster@} (see L{Directory}).
    @ivar delimiter: the sub-address separators.

    @ivar blocking: behave like a database backend whose lookups always
        block (L{peekUser} raises L{LookupWouldBlock}).
    @ivar reloads: how many times L{refresh} was called.
    """

    def __init__(
        self,
        users: Optional[dict] = None,
        aliases: Optional[dict] = None,
        catchAll: Optional[dict] = None,
        postmaster: Optional[Address] = None,
        delimiter: str = "+",
    ):
        self.users: dict[Address, str] = dict(users or {})
        self.aliases: dict[Address, Any] = dict(aliases or {})
        self.catchAll: dict[str, Any] = dict(catchAll or {})
        self.postmaster = postmaster
        self.delimiter = delimiter
        self.reloads = 0
        self.blocking = False

    def _find(self, address: Address) -> Optional[Address]:
        if address in self.users:
            return address
        key = lookupKey(address)
        return next((a for a in self.users if lookupKey(a) == key), None)

    def _lookup(self, address: Address) -> Optional[tuple]:
        found = self._find(address)
        return None if found is None else (found, self.users[found])

    def snapshot(self) -> Directory:
        return Directory.fromEntries(self.users, self.aliases.items(), self.catchAll, self.postmaster, self.delimiter)

    def refresh(self) -> Directory:
        self.reloads += 1
        return self.snapshot()

    def lookupUser(self, address: Address) -> Optional[tuple]:
        return self._lookup(address)

    def peekUser(self, address: Address) -> Optional[tuple]:
        if self.blocking:
            raise LookupWouldBlock(str(address))
        return self._lookup(address)

    def passwordHash(self, address: Address) -> Optional[str]:
        found = self._lookup(address)
        return None if found is None else found[1]

    def setPassword(self, address: Address, hashed: str, create: bool) -> None:
        found = self._find(address)
        if create and found is not None:
            raise UserExists(str(address))
        if not create and found is None:
            raise UnknownUser(str(address))
        self.users[found or address] = hashed

    def upgradePasswordHash(self, address: Address, oldHash: str, newHash: str) -> bool:
        found = self._find(address)
        if found is None or self.users[found] != oldHash:
            return False
        self.users[found] = newHash
        return True

    def remove(self, address: Address) -> None:
        found = self._find(address)
        if found is None:
            raise UnknownUser(str(address))
        del self.users[found]


@implementer(IMessageInfo)
@attr.s(auto_attribs=True, frozen=True)
class FakeMessageInfo:
    size: int
    uid: str
    seen: bool = False


def wireForm(data: bytes) -> bytes:
    """
    C{data} with every line end (CRLF, LF or CR) made CRLF, and a final CRLF
    added if missing: the form in which a maildrop serves a message.
    """
    out = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


@implementer(IMaildrop)
class FakeMaildrop:
    """
    A snapshot of a L{FakeMaildropStore} mailbox.

    @ivar committed: the C{deleted} indexes given to L{commit}, or C{None}
        before a commit.
    @ivar committedSeen: the C{seen} indexes given to L{commit}, or C{None}
        before a commit.
    """

    def __init__(self, store: "FakeMaildropStore", address: Address):
        self._store = store
        self._address = address
        self._entries = list(store.boxes.get(address, []))
        self.messages = [
            FakeMessageInfo(len(wireForm(d)), u, (address, u) in store.seen) for u, d in self._entries
        ]
        self.released = False
        self.committed: Optional[set] = None
        self.committedSeen: Optional[set] = None

    def openMessage(self, index: int) -> defer.Deferred:
        try:
            uid, data = self._entries[index]
        except IndexError:
            return defer.fail()
        if uid in self._store.vanished:
            return defer.fail(TemporaryFailure("message vanished"))
        return defer.succeed(io.BytesIO(wireForm(data)))

    def commit(self, deleted: Iterable[int], seen: Iterable[int] = ()):
        """
        Remove the C{deleted} messages and mark the other C{seen} ones as
        seen; record both sets in L{committed} and L{committedSeen}.
        """
        deleted, seen = set(deleted), set(seen)
        if not all(0 <= i < len(self._entries) for i in deleted | seen):
            self.release()
            return defer.fail(IndexError(sorted(deleted | seen)))
        self.committed = deleted
        self.committedSeen = seen
        gone = {self._entries[i][0] for i in deleted}
        box = self._store.boxes.get(self._address, [])
        self._store.boxes[self._address] = [e for e in box if e[0] not in gone]
        self._store.seen -= {(self._address, uid) for uid in gone}
        present = {uid for uid, _ in self._store.boxes[self._address]}
        for i in seen - deleted:
            uid = self._entries[i][0]
            if uid in present:
                self._store.seen.add((self._address, uid))
        self.release()
        return defer.succeed(None)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._store.locked.discard(self._address)


@implementer(IDelivery)
class FakeDelivery:
    """
    Collects written bytes; on commit calls C{onCommit(data)}.

    @param checkData: refuse a bare CR or a NUL with L{BadMessageData}, as
        L{pop3gw.maildir.MaildirDelivery} does.
    """

    def __init__(self, onCommit, failCommit: bool = False, checkData: bool = False):
        self._onCommit = onCommit
        self._failCommit = failCommit
        self._checkData = checkData
        self.data = b""
        self.state = "open"

    def _badData(self, final: bool) -> bool:
        data = self.data if final else self.data[:-1] if self.data.endswith(b"\r") else self.data
        return self._checkData and (b"\x00" in data or b"\r" in data.replace(b"\r\n", b""))

    def write(self, data: bytes) -> None:
        if self.state == "failed":
            raise TemporaryFailure("delivery is not open")
        assert self.state == "open", self.state
        self.data += data
        if self._badData(final=False):
            self.state = "failed"
            raise BadMessageData("it contains a bare CR or a NUL")

    def commit(self):
        if self.state == "failed" or self._badData(final=True):
            self.state = "failed"
            return defer.fail(BadMessageData("it contains a bare CR or a NUL"))
        assert self.state == "open", self.state
        if self._failCommit:
            self.state = "aborted"
            return defer.fail(TemporaryFailure("disk full"))
        self.state = "committed"
        self._onCommit(self.data)
        return defer.succeed(None)

    def abort(self) -> None:
        if self.state == "open":
            self.state = "aborted"


@implementer(IMaildropStore)
class FakeMaildropStore:
    """
    Maildrops in a dict: address -> list of (uid, bytes).

    @ivar seen: the C{(address, uid)} pairs of messages marked seen.
    """

    def __init__(self):
        self.boxes: dict[Address, list] = {}
        self.seen: set = set()
        self.locked: set = set()
        self.vanished: set = set()
        self.failCommit = False
        self._counter = 0
        self.deliveries: list = []

    def add(self, address: Address, data: bytes, uid: Optional[str] = None, seen: bool = False) -> str:
        self._counter += 1
        uid = uid or f"uid{self._counter}"
        self.boxes.setdefault(address, []).append((uid, data))
        if seen:
            self.seen.add((address, uid))
        return uid

    def openMaildrop(self, address: Address):
        if address in self.locked:
            return defer.fail(MaildropLocked(str(address)))
        self.locked.add(address)
        return defer.succeed(FakeMaildrop(self, address))

    def beginDelivery(self, recipients: Sequence[Address], trace: bytes = b""):
        def onCommit(data: bytes) -> None:
            for r in dict.fromkeys(recipients):
                self.add(r, trace + data)

        if b"\x00" in trace or b"\r" in trace.replace(b"\r\n", b""):
            raise BadMessageData("it contains a bare CR or a NUL")
        d = FakeDelivery(onCommit, self.failCommit, checkData=True)
        self.deliveries.append(d)
        return d


@implementer(IOutboundQueue)
class FakeOutboundQueue:
    """
    Entries in a list of (sender, recipients, bytes); the bytes have CRLF
    line ends, as L{pop3gw.queue.OutboundQueue} stores them.  Whether
    each entry needs SMTPUTF8 is in C{smtputf8}, in the same order.
    """

    def __init__(self):
        self.entries: list = []
        self.smtputf8: list[bool] = []
        self.failCommit = False

    def beginDelivery(self, sender, recipients, trace: bytes = b"", smtputf8: bool = False):
        def onCommit(data: bytes) -> None:
            self.entries.append((sender, list(recipients), toCRLF(trace + data)))
            self.smtputf8.append(smtputf8)

        return FakeDelivery(onCommit, self.failCommit)


@implementer(IMailRouter)
class FakeRouter:
    """
    Local domains and users from a L{FakeUserDatabase}; local mail to a
    L{FakeMaildropStore}, the rest to a L{FakeOutboundQueue}.  Answers as
    L{pop3gw.router.Router} does (the contract tests in
    C{tests.test_router} run over both): domains in any case and with a
    trailing dot, non-public domains refused, duplicate recipients once,
    the queue part committed before the local part.
    """

    def __init__(self, domains=("example.org",), users=None, store=None, queue=None):
        self.domains = {d.lower().rstrip(".") for d in domains}
        self.users = users if users is not None else FakeUserDatabase()
        self.store = store if store is not None else FakeMaildropStore()
        self.queue = queue if queue is not None else FakeOutboundQueue()

    def isLocalDomain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.domains

    def checkRecipient(self, address: Address) -> tuple:
        if not self.isLocalDomain(address.domain):
            if not isRoutableDomain(address.domain):
                raise PermanentFailure(f"{address.domain} is not a public mail domain")
            return (address,)
        return self._localUsers(address)

    def checkLocalRecipient(self, address: Address) -> tuple:
        if not self.isLocalDomain(address.domain):
            raise RelayDenied(f"{address.domain} is not a local domain")
        return self._localUsers(address)

    def _localUsers(self, address: Address) -> tuple:
        users = self.users.snapshot().resolve(address)
        if not users:
            raise UnknownUser(str(address))
        return users

    def beginLocalDelivery(self, sender, recipients, trace: bytes = b""):
        for r in recipients:
            if not self.isLocalDomain(r.domain):
                raise RelayDenied(f"{r.domain} is not a local domain")
        local = list(dict.fromkeys(recipients))
        return _FanOut(self.store.beginDelivery(local, trace), None, local, [])

    def beginDelivery(self, sender, recipients, trace: bytes = b"", smtputf8: bool = False):
        recipients = list(dict.fromkeys(recipients))
        local = [r for r in recipients if self.isLocalDomain(r.domain)]
        remote = [r for r in recipients if not self.isLocalDomain(r.domain)]
        remotePart = self.queue.beginDelivery(sender, remote, trace, smtputf8=smtputf8) if remote else None
        localPart = self.store.beginDelivery(local, trace) if local else None
        return _FanOut(localPart, remotePart, local, remote)


@implementer(IRoutedDelivery)
class _FanOut:
    """
    The fake router's delivery: the queue part commits first; if it fails
    the local part is aborted.
    """

    def __init__(self, local, remote, localRecipients=(), remoteRecipients=()):
        self.parts = [p for p in (remote, local) if p is not None]
        self._local = local
        self._remote = remote
        self.open = True
        self.localRecipients = tuple(localRecipients)
        self.remoteRecipients = tuple(remoteRecipients)
        # The fake queue names no entries.
        queued = IQueuedDelivery(remote, None)
        self.queueId = None if queued is None else queued.queueId

    def write(self, data: bytes) -> None:
        if not self.open:
            raise TemporaryFailure("delivery is not open")
        for p in self.parts:
            p.write(data)

    @defer.inlineCallbacks
    def _commit(self):
        if self._remote is not None:
            try:
                yield self._remote.commit()
            except Exception:
                if self._local is not None:
                    self._local.abort()
                raise
        if self._local is not None:
            yield self._local.commit()

    def commit(self):
        if not self.open:
            return defer.fail(TemporaryFailure("delivery is not open"))
        self.open = False
        return self._commit()

    def abort(self) -> None:
        if self.open:
            self.open = False
            for p in self.parts:
                p.abort()


@implementer(IPOP3Avatar)
@attr.s(auto_attribs=True)
class FakePOP3Avatar:
    address: Address
    store: FakeMaildropStore

    def openMaildrop(self):
        return self.store.openMaildrop(self.address)


@implementer(ISubmissionAvatar)
@attr.s(auto_attribs=True)
class FakeSubmissionAvatar:
    address: Address
    router: FakeRouter

    def mayUseSender(self, address: Address) -> bool:
        return self.router.users.snapshot().owns(self.address, address)

    def checkRecipient(self, address: Address, accepted: int = 0) -> tuple:
        return self.router.checkRecipient(address)

    def beginDelivery(self, sender, recipients, trace: bytes = b"", smtputf8: bool = False):
        return self.router.beginDelivery(sender, recipients, trace, smtputf8=smtputf8)


# --- Runners ----------------------------------------------------------------


#: Runs blocking work at once, in the test's thread: the runner for real
#: stores in tests (L{pop3gw.runner.ImmediateRunner}).
ImmediateRunner = _runner.ImmediateRunner




@implementer(IBlockingRunner)
class HeldRunner:
    """
    An L{IBlockingRunner} that holds each job until the test runs it, as a
    busy thread pool would.

    @ivar jobs: the jobs not run yet, as C{(f, args, deferred)}, oldest
        first.
    """

    def __init__(self) -> None:
        self.jobs: list = []

    def run(self, f, *args) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def runNext(self) -> None:
        """
        Run the oldest job and fire its C{Deferred} with the result.
        """
        f, args, d = self.jobs.pop(0)
        defer.maybeDeferred(f, *args).chainDeferred(d)

    def runAll(self) -> None:
        """
        Run jobs, those they start included, until none is left.
        """
        while self.jobs:
            self.runNext()


# --- Thread pools -------------------------------------------------------------
#
# Stand-ins for L{twisted.python.threadpool.ThreadPool}: the code under test
# only calls C{callInThreadWithCallback(onResult, f, *args, **kwargs)} (as
# L{twisted.internet.threads.deferToThreadPool} does), and C{onResult(True,
# result)} or C{onResult(False, failure)} reports the outcome.


def _runJob(onResult, f, args, kwargs) -> None:
    """
    Run C{f(*args, **kwargs)} and report its result or failure to
    C{onResult}, as a pool thread does.
    """
    try:
        result = f(*args, **kwargs)
    except BaseException:
        ok, result = False, Failure()
    else:
        ok = True
    if onResult is not None:
        onResult(ok, result)


class ImmediateThreadPool:
    """
    Runs each job at once, in the calling thread.

    @ivar calls: the functions run, in order.
    """

    def __init__(self) -> None:
        self.calls: list = []

    def callInThread(self, f, *args, **kwargs) -> None:
        self.callInThreadWithCallback(None, f, *args, **kwargs)

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs) -> None:
        self.calls.append(f)
        _runJob(onResult, f, args, kwargs)


class HeldThreadPool:
    """
    Holds each job until the test runs it, as a busy pool would.

    @ivar pending: the jobs not run yet, oldest first, as C{(onResult, f,
        args, kwargs)}.
    """

    def __init__(self) -> None:
        self.pending: list = []

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs) -> None:
        self.pending.append((onResult, f, args, kwargs))

    def runAll(self) -> None:
        """
        Run the jobs in order, those they cause to be added included, until
        none is left.
        """
        while self.pending:
            _runJob(*self.pending.pop(0))


class ClockedThreadPool:
    """
    A pool of C{threads} workers that take jobs in order, each job taking
    C{cost} seconds of C{clock} time before it runs and reports.

    @ivar busy: the workers running a job.
    @ivar done: the jobs finished.
    @ivar mostQueued: the most jobs that waited for a worker at once.
    """

    def __init__(self, clock, threads: int, cost: float) -> None:
        self.clock = clock
        self.threads = threads
        self.cost = cost
        self.queue: collections.deque = collections.deque()
        self.busy = 0
        self.done = 0
        self.mostQueued = 0

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs) -> None:
        self.queue.append((onResult, f, args, kwargs))
        self.mostQueued = max(self.mostQueued, len(self.queue))
        self._next()

    def _next(self) -> None:
        while self.busy < self.threads and self.queue:
            self.busy += 1
            self.clock.callLater(self.cost, self._finish, self.queue.popleft())

    def _finish(self, job) -> None:
        self.busy -= 1
        self.done += 1
        _runJob(*job)
        self._next()
