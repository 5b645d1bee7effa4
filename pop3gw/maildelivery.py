# -*- test-case-name: tests.test_maildir -*-
"""
Maildir deliveries: one message written into C{tmp} of the first
recipient's maildrop, then made durable in every recipient's C{new}.

A delivery takes CRLF or LF line ends and stores LF; it refuses a bare CR or
a NUL (L{BadMessageData}) rather than change the message.  It goes C{tmp}
-> write -> C{fsync} -> link into each recipient's C{new} -> C{fsync} the
directories; a message is acknowledged only once it survives a power cut.
The blocking part of the commit is one job of the store's
L{IBlockingRunner} (write the rest, C{fsync} the file, link it, C{fsync}
the directories, remove the tmp file); the directory C{fsync}s of
deliveries committing at the same time are shared through the store's
L{DirectorySyncer} (group commit, see L{DirectorySyncer.syncNow}).
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3gw import fsutil
from pop3gw.groupsync import DirectorySyncer
from pop3gw.interfaces import BadMessageData, IBlockingRunner, IDelivery, TemporaryFailure
from pop3gw.maildirfiles import O_CLOEXEC, READ_CHUNK
from pop3gw.wire import LFNormalizer

#: Octets a delivery buffers before writing them to its file.
WRITE_BUFFER = 64 * 1024

# What a delivery refuses: a CR not followed by LF, or a NUL.
_BAD_DATA = re.compile(rb"\r(?!\n)|\x00")

_log = Logger()

_writeAll = fsutil.writeAll


def unlinkQuietly(path: str) -> None:
    """
    Remove C{path}, best effort: a failure other than its absence is
    logged.
    """
    try:
        fsutil.unlinkIfThere(path)
    except OSError as e:
        _log.warn("Could not remove {path}: {error}", path=path, error=e.strerror)


def closeQuietly(fd: Optional[int]) -> None:
    """
    Close C{fd} (if not C{None}), ignoring errors.
    """
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _unlinkAll(paths: Sequence[str]) -> None:
    """
    Remove C{paths}, best effort (see L{unlinkQuietly}).
    """
    for path in paths:
        unlinkQuietly(path)


@implementer(IDelivery)
class MaildirDelivery:
    """
    One message being written into C{tmp} of the first recipient's maildrop,
    then linked into C{new} of every other recipient's and moved into the
    first's.

    Nothing is done to the file system on the reactor thread until a
    message outgrows L{WRITE_BUFFER}: a message smaller than that stays in
    the buffer, and the commit's one job creates the missing maildrops and
    the tmp file, writes, C{fsync}s and links.  A larger one has its tmp
    file created through the runner as it passes L{WRITE_BUFFER} (written
    data stays in the buffer meanwhile) and is written as it comes.
    """

    def __init__(
        self,
        maildirs: Sequence[str],
        unique: str,
        runner: IBlockingRunner,
        owner: Optional[fsutil.Owner] = None,
        syncer: Optional[DirectorySyncer] = None,
        create: Optional[Callable[[], int]] = None,
        complete: Optional[Callable[[str], object]] = None,
    ) -> None:
        """
        @param syncer: batches the C{fsync}s of the C{new} directories with
            those of other deliveries; one of its own (no batching across
            deliveries) if C{None}.
        @param create: creates the tmp file (and the maildrops missing)
            and returns its descriptor, raising L{TemporaryFailure} if it
            cannot; blocking, called through the runner.  By default the
            file is created in the first maildrop's C{tmp}, which must
            exist.
        @param complete: creates what is missing of the maildrop at the
            path it is given (blocking, through the runner); called when
            the message cannot be put into that maildrop's C{new} because
            the directory is missing, and the move is then tried once
            more.  Without it, a missing C{new} fails the delivery.
        """
        self._maildirs = list(maildirs)
        self._complete = complete
        self._syncer = syncer if syncer is not None else DirectorySyncer(runner)
        self._owner = owner
        self._unique = unique
        self._tmpPath = os.path.join(self._maildirs[0], "tmp", unique)
        self._fd: Optional[int] = None
        self._create = create if create is not None else self._createFile
        self._runner = runner
        # While the tmp file is being opened through the runner: Deferreds
        # to fire once it is (or failed).
        self._opening: Optional[list] = None
        self._openFailure: Optional[Failure] = None
        self._normalizer = LFNormalizer()
        self._buffer = bytearray()
        self._size = 0
        self._lines = 0
        self._state = "open"
        # The data written so far ends with a CR whose LF may come next.
        self._pendingCR = False

    @property
    def uniqueName(self) -> str:
        """
        The Maildir unique name the message gets (its UIDL).
        """
        return self._unique

    @property
    def state(self) -> str:
        """
        C{"open"}, C{"committing"}, C{"committed"}, C{"aborted"} or
        C{"failed"}.
        """
        return self._state

    def _append(self, data: bytes) -> None:
        self._buffer += data
        self._size += len(data)
        self._lines += data.count(b"\n")

    def _createFile(self) -> int:
        """
        Create the tmp file in the first maildrop's C{tmp}.  Blocking.

        @raise TemporaryFailure: it cannot be created.
        """
        try:
            return fsutil.createFile(self._tmpPath, self._owner)
        except OSError as e:
            raise TemporaryFailure.fromOSError("cannot start delivery", e) from e

    def _opened(self, fd: int) -> None:
        """
        The tmp file is open (or, if the delivery was aborted meanwhile,
        removed again).
        """
        self._fd = fd
        if self._state == "aborted":
            self._discard()

    def _openThrough(self, opening: defer.Deferred) -> None:
        """
        The tmp file is being opened by C{opening} (a runner's C{Deferred}
        firing with its descriptor).
        """
        self._opening = []

        def opened(fd: int) -> None:
            self._opened(fd)

        def failed(reason: Failure) -> None:
            self._openFailure = reason
            if self._state == "open":
                self._state = "failed"
                self._buffer.clear()

        def done(_: object) -> None:
            waiters, self._opening = self._opening or [], None
            for w in waiters:
                w.callback(None)

        opening.addCallbacks(opened, failed).addBoth(done)

    def _flush(self) -> None:
        if self._buffer and self._fd is not None:
            data = bytes(self._buffer)
            self._buffer.clear()
            _writeAll(self._fd, data)

    def _checkData(self, data: bytes) -> None:
        """
        Refuse a bare CR or a NUL in C{data}, given the CR that may end the
        data before it (a CRLF may be split between two writes).

        @raise BadMessageData: found one (the delivery is then discarded).
        """
        if not data:
            return
        if self._pendingCR and data[:1] != b"\n":
            self._refuse("bare CR (a CR not followed by LF)")
        self._pendingCR = data[-1:] == b"\r"
        # A CR at the very end is judged by the next write or the commit.
        bad = _BAD_DATA.search(data, 0, len(data) - 1 if self._pendingCR else len(data))
        if bad is not None:
            self._refuse("NUL octet" if bad.group() == b"\x00" else "bare CR (a CR not followed by LF)")

    def _refuse(self, what: str) -> None:
        self._discard()
        self._state = "failed"
        raise BadMessageData(f"it contains a {what}")

    def write(self, data: bytes) -> None:
        """
        Append C{data}, line ends made LF.

        @raise TemporaryFailure: the disk refused it (the delivery is then
            discarded; L{InsufficientStorage} for C{ENOSPC} and C{EDQUOT}),
            or the delivery is not open.
        @raise BadMessageData: C{data} holds a bare CR or a NUL (the
            delivery is then discarded).
        """
        if self._openFailure is not None:
            self._openFailure.raiseException()
        if self._state != "open":
            raise TemporaryFailure("delivery is not open")
        self._checkData(data)
        self._append(self._normalizer.feed(data))
        if len(self._buffer) >= WRITE_BUFFER:
            if self._fd is None:
                if self._opening is None:
                    self._openThrough(self._runner.run(self._create))
                    if self._openFailure is not None:
                        self._openFailure.raiseException()
                if self._fd is None:
                    return
            try:
                self._flush()
            except OSError as e:
                self._discard()
                self._state = "failed"
                raise TemporaryFailure.fromOSError("cannot write message", e) from e

    def commit(self) -> defer.Deferred:
        """
        Make the message durable in every recipient's C{new}.

        @return: a C{Deferred} firing with C{None} once durable, or failing
            with L{TemporaryFailure} (L{InsufficientStorage} for C{ENOSPC}
            and C{EDQUOT}) or, for a message ending with a bare CR,
            L{BadMessageData}; nothing of the message is then left.
        """
        if self._openFailure is not None:
            return defer.fail(self._openFailure)
        if self._state != "open":
            return defer.fail(TemporaryFailure("delivery is not open"))
        if self._pendingCR:
            try:
                self._refuse("bare CR (a CR not followed by LF)")
            except BadMessageData:
                return defer.fail()
        self._append(self._normalizer.finish())
        self._state = "committing"
        if self._opening is not None:
            waiter: defer.Deferred = defer.Deferred()
            self._opening.append(waiter)
            d = waiter.addCallback(self._cbReady)
        else:
            d = self._runner.run(self._doCommit)
        d.addCallbacks(self._cbCommitted, self._ebCommitted)
        return d

    def _cbReady(self, ignored: None) -> defer.Deferred:
        if self._openFailure is not None:
            return defer.fail(self._openFailure)
        return self._runner.run(self._doCommit)

    def _cbCommitted(self, result: None) -> None:
        self._state = "committed"

    def _ebCommitted(self, failure: Any) -> Any:
        self._state = "failed"
        return failure

    def _doCommit(self) -> None:
        """
        Write the rest, C{fsync} the file, link it into the C{new} of every
        recipient but the first, move it into the first's (one C{rename},
        which also takes it out of C{tmp}) and make those entries durable
        (sharing the directories' C{fsync}s with the deliveries committing
        at the same time).  Blocking: runs through the runner, as one job.

        @raise TemporaryFailure: a step failed; the entries made are removed
            again (L{InsufficientStorage} for C{ENOSPC} and C{EDQUOT}).
        """
        entries: list[str] = []
        copies: list[str] = []
        name = f"{self._unique},S={self._size},W={self._size + self._lines}"
        if self._fd is None:
            self._fd = self._create()
        try:
            self._flush()
            fd = self._fd
            assert fd is not None, "committed only while the file is open"
            fsutil.fsync(fd)
            self._fd = None
            os.close(fd)
            first, *others = self._maildirs
            for maildir in others:
                dest = os.path.join(maildir, "new", name)
                self._intoNew(maildir, self._linkInto, dest, copies)
                entries.append(dest)
            dest = os.path.join(first, "new", name)
            self._intoNew(first, self._moveInto, dest, copies)
            entries.append(dest)
            self._syncer.syncNow([os.path.join(maildir, "new") for maildir in self._maildirs])
        except OSError as e:
            _unlinkAll(entries)
            self._discard(copies)
            raise TemporaryFailure.fromOSError("cannot deliver message", e) from e
        # The tmp file was moved into the first maildrop: only the copies'
        # tmp names are left to remove.
        _unlinkAll(copies)

    def _intoNew(self, maildir: str, put: Callable[[str, str, list], None], dest: str, copies: list) -> None:
        """
        C{put(maildir, dest, copies)}; if C{maildir}'s C{new} is missing,
        complete the maildrop (see C{complete}) and try once more.
        """
        try:
            put(maildir, dest, copies)
        except FileNotFoundError:
            if self._complete is None or not os.path.exists(self._tmpPath):
                raise
            self._complete(maildir)
            put(maildir, dest, copies)

    def _linkInto(self, maildir: str, dest: str, copies: list) -> None:
        """
        Link the tmp file to C{dest} in C{maildir}'s C{new}, through a copy
        when C{maildir} is on another file system.
        """
        try:
            os.link(self._tmpPath, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            self._copyInto(maildir, dest, copies)

    def _moveInto(self, maildir: str, dest: str, copies: list) -> None:
        """
        Move the tmp file to C{dest} in C{maildir}'s C{new} (the tmp file's
        own maildrop, so the same file system).
        """
        os.rename(self._tmpPath, dest)

    def _copyInto(self, maildir: str, dest: str, copies: list) -> None:
        """
        Copy the message into C{maildir} (another file system) through its
        C{tmp}, then link it to C{dest}.
        """
        copyPath = os.path.join(maildir, "tmp", self._unique)
        out = fsutil.createFile(copyPath, self._owner)
        copies.append(copyPath)
        try:
            source = os.open(self._tmpPath, os.O_RDONLY | O_CLOEXEC)
            try:
                while True:
                    chunk = os.read(source, READ_CHUNK)
                    if not chunk:
                        break
                    _writeAll(out, chunk)
            finally:
                os.close(source)
            fsutil.fsync(out)
        finally:
            os.close(out)
        os.link(copyPath, dest)

    def _discard(self, copies: Sequence[str] = ()) -> None:
        """
        Close and remove the tmp file (and copies of it), best effort.

        The removal is not fsynced: a tmp file that survives a crash is
        harmless (Maildir readers never look in C{tmp/}), and one fsync less
        per delivery matters.
        """
        fd, self._fd = self._fd, None
        closeQuietly(fd)
        self._buffer.clear()
        for path in [self._tmpPath, *copies]:
            unlinkQuietly(path)

    def abort(self) -> None:
        """
        Discard the message.  Idempotent; does nothing once committing.
        A tmp file still being opened is removed once it is.
        """
        if self._state == "open":
            self._state = "aborted"
            if self._opening is None:
                if self._fd is None:
                    # Nothing was created yet.
                    self._buffer.clear()
                else:
                    self._discard()
            else:
                self._buffer.clear()
