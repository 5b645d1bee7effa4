# -*- test-case-name: tests.test_groupsync -*-
"""
Group commit: the directory C{fsync}s of concurrent deliveries batched.

A delivery is acknowledged only once the directory entry naming its file
survives a power cut, which costs an C{fsync} of that directory.  When
several deliveries finish at about the same time (many clients submitting
to one maildrop, an LMTP transaction with many recipients), one C{fsync}
of a directory makes every entry made in it before that C{fsync} durable,
so L{DirectorySyncer} gives them one.  It does so two ways:

  - L{DirectorySyncer.syncNow}, from within a job of the runner (a
    Maildir delivery's one job: write, C{fsync} the file, link it, sync
    C{new}): the first caller for a directory syncs it; callers arriving
    while that C{fsync} runs wait in their threads and form the next
    batch, whose first member syncs it for all of them as soon as the
    C{fsync} before ends.  No hand-off to the reactor thread and back, no
    timer: a delivery is answered by the end of its own job.
  - L{DirectorySyncer.sync}, from the reactor thread (the outbound
    queue's entries): the first request made while no batch is being
    synced hands the runner an empty job and waits for it; the requests
    of the work whose jobs were queued before it or made in the meantime
    join.  Then one batch syncs each of their directories once, in one
    job of the runner; the requests made while it runs form the next
    batch, started as soon as it ends.  Every step is handed to the
    runner from the callbacks of the work before it, so the runner is
    never idle while a request waits: its C{drain} at shutdown cannot
    stop the pool under a request not yet answered.

Correctness comes first, both ways: a request is only ever answered by an
C{fsync} that started after it was made, and a directory whose C{fsync}
fails fails every request of the batch that named it (their deliveries
then answer C{451} and remove their files); none of them is told it
succeeded.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from pop3gw import fsutil
from pop3gw.interfaces import IBlockingRunner, ServerStopping

__all__ = ["DirectorySyncer"]

_log = Logger()


class _Request:
    """
    One caller's directories and the C{Deferred} it waits on.
    """

    __slots__ = ("paths", "afterwards", "result")

    def __init__(self, paths: Sequence[str], afterwards: Optional[Callable[[], None]]) -> None:
        self.paths = paths
        self.afterwards = afterwards
        self.result: defer.Deferred = defer.Deferred()


def _syncAll(fsync: Callable[[str], None], paths: Sequence[str], batch: Sequence[_Request]) -> dict:
    """
    C{fsync} each of C{paths} once, then run the C{afterwards} of each
    request whose directories all synced.  Blocking: runs through the
    runner.

    @return: path -> the C{OSError} its C{fsync} raised, for those that
        failed.
    """
    failed = {}
    for path in paths:
        try:
            fsync(path)
        except OSError as e:
            failed[path] = e
    for request in batch:
        if request.afterwards is not None and not any(path in failed for path in request.paths):
            try:
                request.afterwards()
            except Exception:
                _log.failure("clean-up after a directory sync failed")
    return failed


class _Batch:
    """
    The callers of L{DirectorySyncer.syncNow} answered by one C{fsync} of
    one directory.

    @ivar done: whether its C{fsync} ended.
    @ivar error: the C{OSError} it raised, if it did.
    @ivar ended: a condition (on the syncer's lock) its members wait on:
        notified, all of them, when its C{fsync} ended, and one of them
        when the C{fsync} before ended (that one then leads it).
    """

    __slots__ = ("done", "error", "ended")

    def __init__(self, lock: threading.Lock) -> None:
        self.done = False
        self.error: Optional[OSError] = None
        self.ended = threading.Condition(lock)


class _Directory:
    """
    The state of one directory synced by L{DirectorySyncer.syncNow}.

    @ivar running: whether an C{fsync} of it is running.
    @ivar next: the batch the callers arriving now join.
    @ivar members: callers waiting in C{next}.
    """

    __slots__ = ("running", "next", "members")

    def __init__(self, lock: threading.Lock) -> None:
        self.running = False
        self.next = _Batch(lock)
        self.members = 0


def _gather() -> None:
    """
    Nothing: the job whose turn in the runner's queue gives the requests of
    concurrent work time to join a batch.
    """


class DirectorySyncer:
    """
    Batches the directory C{fsync}s of concurrent deliveries.

    @param runner: where the C{fsync}s run (the I/O thread pool in the
        server).
    @param fsync: syncs one directory (L{fsutil.fsyncDirectory}; tests give
        a fake one).
    """

    def __init__(
        self,
        runner: IBlockingRunner,
        fsync: Callable[[str], None] = fsutil.fsyncDirectory,
    ) -> None:
        self._runner = runner
        self._fsync = fsync
        self._waiting: list[_Request] = []
        self._gathering = False
        self._inFlight = False
        self._lock = threading.Lock()
        self._directories: dict[str, _Directory] = {}
        #: Batches synced so far and the directory C{fsync}s they made.
        self.batches = 0
        self.fsyncs = 0
        #: Callers of L{syncNow} waiting for a batch to be synced.
        self.waiting = 0

    def syncNow(self, paths: Sequence[str]) -> None:
        """
        Make the entries made so far in the directories C{paths} durable,
        sharing each C{fsync} with the other callers (in other threads)
        waiting for one of the same directory.  Blocking: called in a job
        of the runner.

        A caller arriving while an C{fsync} of a directory runs waits for
        it to end (it may have started before the caller's entry was
        made), then the first of the callers that waited meanwhile syncs
        the directory once for all of them.

        @raise OSError: the C{fsync} of one of C{paths} that answered this
            call failed (every caller it answered gets the same error).
        """
        for path in dict.fromkeys(paths):
            self._syncOne(path)

    def _syncOne(self, path: str) -> None:
        with self._lock:
            directory = self._directories.get(path)
            if directory is None:
                directory = self._directories[path] = _Directory(self._lock)
            batch = directory.next
            directory.members += 1
            self.waiting += 1
            while directory.running and not batch.done:
                batch.ended.wait()
            self.waiting -= 1
            lead = not batch.done
            if lead:
                # The first of its batch to run: sync the directory for
                # every member; later callers form the next batch.
                directory.running = True
                directory.next = _Batch(self._lock)
                directory.members = 0
                self.batches += 1
                self.fsyncs += 1
        if lead:
            error: Optional[OSError] = None
            try:
                self._fsync(path)
            except OSError as e:
                error = e
            except BaseException:
                error = OSError("directory sync failed")
                raise
            finally:
                with self._lock:
                    batch.error = error
                    batch.done = True
                    directory.running = False
                    batch.ended.notify_all()
                    if directory.members:
                        # One of the next batch leads it; the others
                        # sleep on until it ended.
                        directory.next.ended.notify()
                    else:
                        del self._directories[path]
        error = batch.error
        if error is not None:
            # Each caller its own exception (they are raised in several
            # threads at once).
            if error.errno is None:
                raise OSError(*error.args)
            raise OSError(error.errno, error.strerror, error.filename)

    def sync(self, paths: Sequence[str], afterwards: Optional[Callable[[], None]] = None) -> defer.Deferred:
        """
        Make the entries made so far in the directories C{paths} durable.

        @param afterwards: blocking work (best effort: an exception is
            logged) to run in the runner once they are, before the result
            fires, such as removing a file whose other name is now durable.

        @return: a C{Deferred} firing with C{None} once an C{fsync} of each
            of C{paths} that started after this call succeeded, or failing
            with the C{OSError} of the first of them whose C{fsync} failed.
        """
        request = _Request(list(dict.fromkeys(paths)), afterwards)
        if not request.paths:
            return self._runner.run(afterwards or (lambda: None))
        self._waiting.append(request)
        self._schedule()
        return request.result

    def _schedule(self) -> None:
        if self._inFlight or self._gathering:
            # The batch in flight may have started before these requests'
            # entries were made: they wait for the next one.
            return
        self._gathering = True
        self._runner.run(_gather).addBoth(self._start)

    def _start(self, ignored: object = None) -> None:
        self._gathering = False
        batch, self._waiting = self._waiting, []
        if not batch:
            return
        paths = list(dict.fromkeys(path for request in batch for path in request.paths))
        self._inFlight = True
        self.batches += 1
        self.fsyncs += len(paths)
        d = self._runner.run(_syncAll, self._fsync, paths, batch)
        d.addCallbacks(self._answer, self._failAll, callbackArgs=(batch,), errbackArgs=(batch,))

    def _answer(self, failed: dict, batch: list[_Request]) -> None:
        self._inFlight = False
        for request in batch:
            errors = [failed[path] for path in request.paths if path in failed]
            if errors:
                request.result.errback(errors[0])
            else:
                request.result.callback(None)
        if self._waiting:
            self._schedule()

    def _failAll(self, reason: Any, batch: list[_Request]) -> None:
        """
        The runner itself failed (not one C{fsync}): nothing of the batch
        is known to be durable.  A runner closed by the server's stop
        (L{ServerStopping}) is no fault: nothing is logged then.
        """
        self._inFlight = False
        if not reason.check(ServerStopping):
            _log.failure("syncing directories failed", reason)
        for request in batch:
            request.result.errback(OSError("directory sync failed"))
        if self._waiting:
            self._schedule()
