# -*- test-case-name: tests.test_maildir -*-
"""
Maildir storage: the users' maildrops.

A user's maildrop is C{<root>/<domain>/<localpart>/} with the standard
C{cur}, C{new} and C{tmp} directories, plus C{pop3gw.lock}, the file a POP3
session holds an exclusive C{flock} on.

Stored messages have LF line ends, so other Maildir readers (mutt, Dovecot)
can use them.  A delivery takes CRLF or LF line ends and refuses a bare CR
or a NUL (L{BadMessageData}) rather than change the message.  POP3 sees
messages in wire form: every line end (CRLF, LF, or a bare CR in a file
another tool wrote) as CRLF, and a final CRLF if the file lacks one.  Both sizes are kept in
the file name the Dovecot way, C{<unique>,S=<file size>,W=<wire size>}, so a
login costs one C{stat} per message, not a read.

Deliveries go C{tmp} -> write -> C{fsync} -> link into each recipient's
C{new} -> C{fsync} the directories; a message is acknowledged only once it
survives a power cut.  C{DELE} only marks; L{MaildirMaildrop.commit} (the POP3
UPDATE state) unlinks.  Like Dovecot, the commit also records which messages
were retrieved: each gets the standard Maildir C{S} (seen) flag in its
C{:2,} info (a file in C{new} moves to C{cur}), which never changes its UIDL,
and POP3's C{LAST} starts from the seen flags in the next session.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import re
import secrets
import socket
import stat
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import attr
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3gw import fsutil
from pop3gw.address import Address
from pop3gw.runner import ImmediateRunner
from pop3gw.interfaces import (
    BadMessageData,
    IBlockingRunner,
    IDelivery,
    IMaildrop,
    IMaildropStore,
    IMessageInfo,
    MaildropLocked,
    PermanentFailure,
    TemporaryFailure,
)

#: The file in a maildrop a POP3 session holds an exclusive C{flock} on.
LOCK_NAME = "pop3gw.lock"

#: Mode of the directories this module creates.
DIRECTORY_MODE = fsutil.DIRECTORY_MODE

#: Mode of the files this module creates.
FILE_MODE = fsutil.FILE_MODE

#: Octets read from a message file at a time.
READ_CHUNK = 64 * 1024

#: Octets a delivery buffers before writing them to its file.
WRITE_BUFFER = 64 * 1024

#: Longest UIDL value allowed by RFC 1939.
MAX_UID_LENGTH = 70

#: Hex digits of the SHA-256 digest used as UIDL for unusable unique names.
UID_DIGEST_LENGTH = 40

#: Hex digits of randomness in a unique name.
UNIQUE_RANDOM_HEX = 16

#: Most seen-flag renames a commit with nothing to delete does at once on
#: the reactor thread (for a maildrop that was small enough to be
#: snapshotted there); more go to the thread pool.
QUICK_FLAG_RENAMES = 64

#: What follows the C{:} of a Maildir name whose info is flags (info with
#: "experimental semantics", C{:1,}, is left alone).
_FLAGS_PREFIX = "2,"

#: The Maildir flag of a message that has been read.
_SEEN_FLAG = "S"

#: Errors reading one message file that leave just that file out of a
#: snapshot (anything else, such as running out of descriptors, fails it).
_SKIPPABLE_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.EIO, errno.ELOOP})

_SUBDIRS = ("cur", "new", "tmp")
_SIZE_FIELD = re.compile(r"([SW])=([0-9]+)")
# The name pop3gw itself writes: "<unique>,S=<n>,W=<n>" (parsed fast).
_OWN_BASE = re.compile(r"([^,]+),S=([0-9]+),W=([0-9]+)")
_UID_CHARS = re.compile(r"[\x21-\x7e]{1,%d}" % (MAX_UID_LENGTH,))
_LEADING_INTEGER = re.compile(r"[0-9]+")
# What a delivery refuses: a CR not followed by LF, or a NUL.
_BAD_DATA = re.compile(rb"\r(?!\n)|\x00")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

_log = Logger()


# --- Line ends --------------------------------------------------------------


class _LFNormalizer:
    """
    Streaming conversion of CRLF, bare CR and LF line ends to LF.

    A CR at the end of one chunk is turned into LF at once; an LF at the start
    of the next chunk is then dropped, so CRLF split across two chunks is one
    line end.
    """

    def __init__(self) -> None:
        self._skipLF = False
        self._last = b""

    def feed(self, chunk: bytes) -> bytes:
        """
        @return: C{chunk} converted; may be empty.
        """
        if not chunk:
            return b""
        if self._skipLF and chunk[:1] == b"\n":
            chunk = chunk[1:]
            if not chunk:
                self._skipLF = False
                return b""
        self._skipLF = chunk[-1:] == b"\r"
        out = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        self._last = out[-1:]
        return out

    def finish(self) -> bytes:
        """
        @return: the LF needed to end the data with a line end: C{b"\\n"} if
            something was fed and it did not end with a line end, else C{b""}.
        """
        if self._last and self._last != b"\n":
            self._last = b"\n"
            return b"\n"
        return b""


class _WireConverter:
    """
    Streaming conversion to wire form (every line end CRLF, final CRLF added
    if missing), the same result as L{pop3gw.testing.wireForm} on the whole.
    """

    def __init__(self) -> None:
        self._normalizer = _LFNormalizer()

    def feed(self, chunk: bytes) -> bytes:
        return self._normalizer.feed(chunk).replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        return self._normalizer.finish().replace(b"\n", b"\r\n")


class _WireReader(io.RawIOBase):
    """
    A raw, read-only stream of a message file in wire form.  Memory stays
    bounded by a few L{READ_CHUNK}s whatever the message size.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._converter = _WireConverter()
        self._pending = b""
        self._offset = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while self._offset >= len(self._pending):
            if self._eof:
                return 0
            chunk = os.read(self._fd, READ_CHUNK)
            if chunk:
                self._pending = self._converter.feed(chunk)
            else:
                self._pending = self._converter.finish()
                self._eof = True
            self._offset = 0
        n = min(len(view), len(self._pending) - self._offset)
        view[:n] = self._pending[self._offset : self._offset + n]
        self._offset += n
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


def _measureFile(path: str) -> tuple[int, int]:
    """
    Read a message file once.

    @return: its size on disk and its size in wire form.
    """
    converter = _WireConverter()
    fileSize = wireSize = 0
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW)
    try:
        while True:
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                break
            fileSize += len(chunk)
            wireSize += len(converter.feed(chunk))
    finally:
        os.close(fd)
    return fileSize, wireSize + len(converter.finish())


# --- Names ------------------------------------------------------------------


@attr.s(auto_attribs=True, frozen=True)
class _ParsedName:
    """
    A Maildir file name taken apart.

    @ivar key: the unique name without C{,S=} and C{,W=} fields or info: the
        source of the UIDL.
    @ivar fileSize: the C{S=} value, or L{None}.
    @ivar wireSize: the C{W=} value, or L{None}.
    @ivar info: C{":2,<flags>"} (or whatever followed the first C{:}), or
        C{""}.
    @ivar renameable: whether the name can be rewritten without changing
        C{key}.
    """

    key: str
    fileSize: Optional[int]
    wireSize: Optional[int]
    info: str
    renameable: bool


def parseName(name: str) -> _ParsedName:
    """
    Take a Maildir file name apart.
    """
    base, colon, info = name.partition(":")
    own = _OWN_BASE.fullmatch(base)
    if own is not None:
        return _ParsedName(own.group(1), int(own.group(2)), int(own.group(3)), colon + info, True)
    parts = base.split(",")
    kept = [parts[0]]
    sizes: dict[str, int] = {}
    for part in parts[1:]:
        match = _SIZE_FIELD.fullmatch(part)
        if match is None:
            kept.append(part)
        else:
            sizes[match.group(1)] = int(match.group(2))
    key = ",".join(kept)
    renameable = bool(parts[0])
    if not renameable:
        key = base
    return _ParsedName(key, sizes.get("S"), sizes.get("W"), colon + info, renameable)


def isSeenName(name: str) -> bool:
    """
    @return: whether the Maildir file name C{name} carries the C{S} flag.
    """
    _, _, info = name.partition(":")
    return info.startswith(_FLAGS_PREFIX) and _SEEN_FLAG in info[len(_FLAGS_PREFIX) :]


def seenName(name: str) -> Optional[str]:
    """
    The name of a Maildir file once flagged seen: C{S} added to the flags
    of its C{:2,} info (kept in ASCII order, as Maildir requires), or
    C{:2,S} appended if it has no info.  The part before the C{:} (hence the
    UIDL) is unchanged.

    @return: the new name, or L{None} if there is nothing to do (already
        seen, or info of another kind).
    """
    base, colon, info = name.partition(":")
    if not colon:
        flags = ""
    elif info.startswith(_FLAGS_PREFIX):
        flags = info[len(_FLAGS_PREFIX) :]
    else:
        return None
    if _SEEN_FLAG in flags:
        return None
    return base + ":" + _FLAGS_PREFIX + "".join(sorted(flags + _SEEN_FLAG))


def uidForKey(key: str) -> str:
    """
    The UIDL value for a unique name: the name itself if it is 1 to 70
    characters in 0x21..0x7E, else C{"H"} and a SHA-256 digest prefix.
    """
    if _UID_CHARS.fullmatch(key):
        return key
    digest = hashlib.sha256(os.fsencode(key)).hexdigest()
    return "H" + digest[:UID_DIGEST_LENGTH]


def escapeHostname(hostname: str) -> str:
    """
    C{hostname} made safe for a unique name: C{/}, C{:}, C{,}, C{\\} and
    anything outside 0x21..0x7E become octal escapes (C{/} is C{\\057}, C{:}
    is C{\\072}, as in Dovecot).
    """
    out = []
    for octet in hostname.encode("utf-8", "surrogateescape"):
        if octet < 0x21 or octet > 0x7E or octet in b"/:,\\":
            out.append("\\%03o" % (octet,))
        else:
            out.append(chr(octet))
    return "".join(out) or "localhost"


def _sortKey(entry: "_Entry") -> tuple:
    match = _LEADING_INTEGER.match(entry.key)
    return (int(match.group()) if match else 0, entry.key, entry.subdir, entry.name)


# --- Filesystem helpers -----------------------------------------------------


_fsyncDirectory = fsutil.fsyncDirectory


def _unlinkQuietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        _log.warn("Could not remove {path}: {error}", path=path, error=e.strerror)


def _closeQuietly(fd: Optional[int]) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _writeAll(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# --- Maildrops --------------------------------------------------------------


@implementer(IMessageInfo)
@attr.s(auto_attribs=True, frozen=True)
class MaildirMessageInfo:
    """
    One message of a snapshot.

    @ivar size: octets in wire form.
    @ivar uid: the UIDL value.
    @ivar seen: whether the file name carried the C{S} flag.
    """

    size: int
    uid: str
    seen: bool = False


@attr.s(auto_attribs=True)
class _Entry:
    """
    Where one snapshotted message is, and its sizes.  C{subdir} and C{name}
    follow the file if another tool renames it (flags) during the session.
    """

    subdir: str
    name: str
    key: str
    fileSize: int
    wireSize: int


def _scan(maildir: str, limit: Optional[int] = None) -> dict[str, tuple[str, str, os.stat_result, _ParsedName]]:
    """
    List the messages of C{new} then C{cur} (in that order, so a message
    moved from one to the other during the listing is seen at least once).

    @param limit: raise L{_NotQuick} on meeting more than this many
        entries (of any kind).
    @return: key -> (subdir, name, lstat result, parsed name), regular
        files only, dot files skipped, first one of a key kept.
    """
    found: dict[str, tuple[str, str, os.stat_result, _ParsedName]] = {}
    seen = 0
    for subdir in ("new", "cur"):
        with os.scandir(os.path.join(maildir, subdir)) as it:
            for dirEntry in it:
                seen += 1
                if limit is not None and seen > limit:
                    raise _NotQuick()
                name = dirEntry.name
                if name.startswith("."):
                    continue
                try:
                    st = dirEntry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                parsed = parseName(name)
                if parsed.key not in found:
                    found[parsed.key] = (subdir, name, st, parsed)
    return found


#: Most entries (counted in C{new/} and C{cur/} together, while listing
#: them) of a maildrop whose snapshot is taken on the reactor thread; a
#: larger maildrop is listed in the thread pool so a huge one never stalls
#: other sessions.  Entries are counted rather than judged by the
#: directories' C{st_size}, which file systems report differently (tmpfs
#: and XFS grow it per entry, ext4 per 4 KiB block, and never shrink it).
QUICK_SNAPSHOT_ENTRIES = 512

#: A file in C{tmp/} older than this (seconds) is debris of a crashed
#: delivery and is removed, as the Maildir convention (36 hours) says.
TMP_MAX_AGE = 36 * 3600
#: How often (seconds) one process looks for such debris in one maildrop,
#: at login.
TMP_CLEAN_INTERVAL = 6 * 3600


def _cleanTmp(maildir: str, now: float) -> None:
    """
    Remove regular files in C{maildir/tmp} older than L{TMP_MAX_AGE}.  Best
    effort: a failure is logged and changes nothing else.
    """
    tmp = os.path.join(maildir, "tmp")
    try:
        with os.scandir(tmp) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_mtime < now - TMP_MAX_AGE:
                        os.unlink(entry.path)
                        _log.info("Removed stale {path} left by an interrupted delivery", path=entry.path)
                except FileNotFoundError:
                    continue
    except OSError as e:
        _log.warn("Could not clean {tmp}: {error}", tmp=tmp, error=e.strerror)


class _NotQuick(Exception):
    """
    A snapshot cannot be taken quickly on the reactor thread (the maildrop
    is large, or some file must be read to be measured): take it in the
    thread pool instead.
    """


def _snapshot(maildir: str, quick: bool = False) -> list[_Entry]:
    """
    The messages of a locked maildrop, oldest first.  A file whose name lacks
    trustworthy sizes is read once and renamed to carry them (moving it from
    C{new} to C{cur} with C{:2,} info).

    @param quick: raise L{_NotQuick} instead of reading any file.
    """
    entries = []
    for key, (subdir, name, st, parsed) in _scan(maildir, QUICK_SNAPSHOT_ENTRIES if quick else None).items():
        if parsed.fileSize == st.st_size and parsed.wireSize is not None:
            entries.append(_Entry(subdir, name, key, st.st_size, parsed.wireSize))
            continue
        if quick:
            raise _NotQuick()
        try:
            fileSize, wireSize = _measureFile(os.path.join(maildir, subdir, name))
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno not in _SKIPPABLE_ERRORS:
                raise
            # One bad file must not lock its owner out of the whole maildrop.
            _log.warn("Skipping unreadable message {name}: {error}", name=name, error=e.strerror)
            continue
        entry = _Entry(subdir, name, key, fileSize, wireSize)
        entries.append(entry)
        if parsed.renameable:
            newName = f"{key},S={fileSize},W={wireSize}{parsed.info or ':2,'}"
            try:
                os.rename(
                    os.path.join(maildir, subdir, name),
                    os.path.join(maildir, "cur", newName),
                )
            except OSError:
                # Someone else renamed it meanwhile; _relocate finds it.
                pass
            else:
                entry.subdir, entry.name = "cur", newName
    entries.sort(key=_sortKey)
    return entries


@implementer(IMaildrop)
class MaildirMaildrop:
    """
    One POP3 session's locked snapshot of a maildrop.

    @ivar path: the maildrop directory.
    @ivar messages: L{MaildirMessageInfo}s, oldest first.
    """

    def __init__(self, path: str, lockFD: int, entries: list, runner: IBlockingRunner, quick: bool = False) -> None:
        """
        @param runner: runs blocking work.
        @param quick: whether the snapshot was taken on the reactor thread
            (the maildrop is small), so a few flag renames may be too.
        """
        self.path = path
        self._lockFD: Optional[int] = lockFD
        self._entries = entries
        self._runner = runner
        self._quick = quick
        self._state = "open"
        self.messages = [MaildirMessageInfo(e.wireSize, uidForKey(e.key), isSeenName(e.name)) for e in entries]

    def _entry(self, index: int) -> _Entry:
        if not 0 <= index < len(self._entries):
            raise IndexError(index)
        return self._entries[index]

    def _relocate(self, entry: _Entry) -> bool:
        """
        Find C{entry}'s file again after another tool renamed it (flags, or
        C{new} -> C{cur}).

        @return: whether it still exists.
        """
        found = _scan(self.path).get(entry.key)
        if found is None:
            return False
        entry.subdir, entry.name = found[0], found[1]
        return True

    def _entryPath(self, entry: _Entry) -> str:
        return os.path.join(self.path, entry.subdir, entry.name)

    def openMessage(self, index: int) -> io.BufferedReader:
        """
        @return: a binary file-like object streaming message C{index} in
            wire form.
        @raise TemporaryFailure: the file vanished, changed size, or cannot
            be read, or the maildrop is no longer locked.
        """
        entry = self._entry(index)
        if self._state != "open":
            raise TemporaryFailure("maildrop is not locked")
        flags = os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW
        try:
            try:
                fd = os.open(self._entryPath(entry), flags)
            except FileNotFoundError:
                if not self._relocate(entry):
                    raise
                fd = os.open(self._entryPath(entry), flags)
        except FileNotFoundError:
            raise TemporaryFailure("message vanished") from None
        except OSError as e:
            raise TemporaryFailure(f"cannot open message: {e.strerror}") from e
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            os.close(fd)
            raise TemporaryFailure(f"cannot stat message: {e.strerror}") from e
        if size != entry.fileSize:
            os.close(fd)
            raise TemporaryFailure("message changed during the session")
        return io.BufferedReader(_WireReader(fd), READ_CHUNK)

    def commit(self, deleted: Iterable[int], seen: Iterable[int] = ()) -> defer.Deferred:
        """
        Unlink the messages at indexes C{deleted} and C{fsync} their
        directories, then flag the other messages at indexes C{seen} with
        C{S} (renames, not fsynced: flags are not worth a disk flush), and
        release the lock.  A file already gone counts as deleted; a file
        another tool renamed meanwhile is found again.  A flag that cannot
        be set is logged and never fails the commit.

        Deletions run through the runner (the thread pool in the server).
        With nothing to delete, a few flag renames (at most
        L{QUICK_FLAG_RENAMES}, in a maildrop small enough to be snapshotted
        on the reactor thread) are done at once.

        @return: a L{Deferred} firing with L{None} once done, or failing
            with L{TemporaryFailure} (some could not be removed, or the
            maildrop was already released; the lock is released anyway) or
            L{IndexError} (an index is out of range; nothing is changed and
            the lock is released).
        """
        if self._state != "open":
            return defer.fail(TemporaryFailure("maildrop is not locked"))
        deleted = set(deleted)
        try:
            entries = [self._entry(i) for i in sorted(deleted)]
            flagged = [self._entry(i) for i in sorted(set(seen) - deleted)]
        except IndexError:
            self.release()
            return defer.fail()
        if not entries and (not flagged or (self._quick and len(flagged) <= QUICK_FLAG_RENAMES)):
            # Nothing to unlink or fsync: no thread hop for a few renames.
            try:
                self._markSeen(flagged)
            finally:
                self._unlock()
            return defer.succeed(None)
        self._state = "committing"
        return self._runner.run(self._doCommit, entries, flagged)

    def _doCommit(self, entries: list, flagged: list = ()) -> None:
        errors = []
        touched = set()
        try:
            for entry in entries:
                try:
                    try:
                        os.unlink(self._entryPath(entry))
                    except FileNotFoundError:
                        if not self._relocate(entry):
                            continue
                        os.unlink(self._entryPath(entry))
                except FileNotFoundError:
                    continue
                except OSError as e:
                    errors.append(e)
                    continue
                touched.add(entry.subdir)
            for subdir in sorted(touched):
                try:
                    _fsyncDirectory(os.path.join(self.path, subdir))
                except OSError as e:
                    errors.append(e)
            self._markSeen(flagged)
        finally:
            self._unlock()
        if errors:
            raise TemporaryFailure(f"could not remove {len(errors)} message(s): {errors[0].strerror}")

    def _markSeen(self, entries: Sequence[_Entry]) -> None:
        """
        Add the C{S} flag to each of C{entries}' files, moving those in
        C{new} to C{cur}.  Best effort: a file gone is skipped, one renamed
        by another tool is found again (the maildrop is listed at most once
        for all of them), and failures are logged, never raised.
        """
        failures: list = []
        listing: Optional[dict] = None
        try:
            for entry in entries:
                for attempt in range(2):
                    newName = seenName(entry.name)
                    if newName is None:
                        break
                    try:
                        os.rename(self._entryPath(entry), os.path.join(self.path, "cur", newName))
                    except FileNotFoundError:
                        if attempt:
                            break
                        if listing is None:
                            try:
                                listing = _scan(self.path)
                            except OSError as e:
                                failures.append(e)
                                listing = {}
                        found = listing.get(entry.key)
                        if found is None:
                            # Gone: removed by someone else.
                            break
                        entry.subdir, entry.name = found[0], found[1]
                    except OSError as e:
                        failures.append(e)
                        break
                    else:
                        entry.subdir, entry.name = "cur", newName
                        break
        except Exception:
            _log.failure("Marking messages seen in {path} failed", path=self.path)
            return
        if failures:
            _log.warn(
                "Could not mark {count} message(s) seen in {path}: {error}",
                count=len(failures),
                path=self.path,
                error=failures[0].strerror,
            )

    def _unlock(self) -> None:
        self._state = "released"
        fd, self._lockFD = self._lockFD, None
        _closeQuietly(fd)

    def release(self) -> None:
        """
        Release the lock without deleting anything.  Idempotent; does
        nothing while a commit is running (the commit releases).
        """
        if self._state == "open":
            self._unlock()


# --- Deliveries -------------------------------------------------------------


@implementer(IDelivery)
class MaildirDelivery:
    """
    One message being written into C{tmp} of the first recipient's maildrop,
    then linked into C{new} of every recipient's.

    The tmp file is opened by L{MaildirStore.beginDelivery}: at once when
    every maildrop exists, else through the runner (the maildrops are
    created first); until it is open, written data stays in the buffer.
    """

    def __init__(
        self,
        maildirs: Sequence[str],
        unique: str,
        runner: IBlockingRunner,
        owner: Optional[fsutil.Owner] = None,
    ) -> None:
        self._maildirs = list(maildirs)
        self._owner = owner
        self._unique = unique
        self._tmpPath = os.path.join(self._maildirs[0], "tmp", unique)
        self._fd: Optional[int] = None
        self._runner = runner
        # While the tmp file is being opened through the runner: Deferreds
        # to fire once it is (or failed).
        self._opening: Optional[list] = None
        self._openFailure: Optional[Failure] = None
        self._normalizer = _LFNormalizer()
        self._buffer = bytearray()
        self._size = 0
        self._lines = 0
        self._state = "open"
        # The data written so far ends with a CR whose LF may come next.
        self._pendingCR = False

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
        The tmp file is being opened by C{opening} (a runner's L{Deferred}
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
            raise self._openFailure.value
        if self._state != "open":
            raise TemporaryFailure("delivery is not open")
        self._checkData(data)
        self._append(self._normalizer.feed(data))
        if len(self._buffer) >= WRITE_BUFFER:
            try:
                self._flush()
            except OSError as e:
                self._discard()
                self._state = "failed"
                raise TemporaryFailure.fromOSError("cannot write message", e) from e

    def commit(self) -> defer.Deferred:
        """
        Make the message durable in every recipient's C{new}.

        @return: a L{Deferred} firing with L{None} once durable, or failing
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
        links: list[str] = []
        copies: list[str] = []
        name = f"{self._unique},S={self._size},W={self._size + self._lines}"
        try:
            self._flush()
            os.fsync(self._fd)
            fd, self._fd = self._fd, None
            os.close(fd)
            for maildir in self._maildirs:
                dest = os.path.join(maildir, "new", name)
                try:
                    os.link(self._tmpPath, dest)
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
                    self._copyInto(maildir, dest, copies)
                links.append(dest)
            for maildir in self._maildirs:
                _fsyncDirectory(os.path.join(maildir, "new"))
        except OSError as e:
            for path in links:
                _unlinkQuietly(path)
            self._discard(copies)
            raise TemporaryFailure.fromOSError("cannot deliver message", e) from e
        # Durable in every new/ from here on: tmp clean-up is best effort.
        self._discard(copies)

    def _copyInto(self, maildir: str, dest: str, copies: list) -> None:
        """
        Copy the message into C{maildir} (another file system) through its
        C{tmp}, then link it to C{dest}.
        """
        copyPath = os.path.join(maildir, "tmp", self._unique)
        out = fsutil.createFile(copyPath, self._owner)
        copies.append(copyPath)
        try:
            source = os.open(self._tmpPath, os.O_RDONLY | _O_CLOEXEC)
            try:
                while True:
                    chunk = os.read(source, READ_CHUNK)
                    if not chunk:
                        break
                    _writeAll(out, chunk)
            finally:
                os.close(source)
            os.fsync(out)
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
        _closeQuietly(fd)
        self._buffer.clear()
        for path in [self._tmpPath, *copies]:
            _unlinkQuietly(path)

    def abort(self) -> None:
        """
        Discard the message.  Idempotent; does nothing once committing.
        A tmp file still being opened is removed once it is.
        """
        if self._state == "open":
            self._state = "aborted"
            if self._opening is None:
                self._discard()
            else:
                self._buffer.clear()


# --- The store --------------------------------------------------------------


def _isMaildir(path: str) -> bool:
    """
    @return: whether C{path} has its C{cur}, C{new} and C{tmp} directories
        (three C{stat} calls).
    """
    return all(os.path.isdir(os.path.join(path, s)) for s in _SUBDIRS)


def _checkComponent(component: str) -> None:
    if (
        not component
        or component in (".", "..")
        or "/" in component
        or "\0" in component
        or (os.altsep is not None and os.altsep in component)
    ):
        raise PermanentFailure("address does not map to a safe maildrop path")


@implementer(IMaildropStore)
class MaildirStore:
    """
    Maildrops under C{root}: C{<root>/<domain>/<localpart>/}.

    @param root: the directory holding every maildrop (C{DATA/mail}); created
        if missing.
    @param runner: where blocking work runs (creating maildrops, locking
        and snapshots of large ones, tmp clean-up, commit fsyncs): the
        server's L{pop3gw.runner.ThreadPoolRunner}; an
        L{pop3gw.runner.ImmediateRunner} (the CLI) if L{None}.
    @param hostname: for unique names; defaults to C{socket.gethostname()}.
    @param owner: the data directory's owner, given every directory and
        file the store creates (see L{pop3gw.fsutil}); L{None} leaves them
        to this process.
    """

    def __init__(
        self,
        root: str,
        runner: Optional[IBlockingRunner] = None,
        hostname: Optional[str] = None,
        owner: Optional[fsutil.Owner] = None,
    ) -> None:
        self.root = os.path.abspath(root)
        self.owner = owner
        self._runner: IBlockingRunner = runner if runner is not None else ImmediateRunner()
        self._hostname = escapeHostname(hostname if hostname is not None else socket.gethostname())
        self._counter = 0
        self._now: Callable[[], float] = time.time
        # Maildrop path -> when its tmp/ was last cleaned by this process.
        self._tmpCleaned: dict = {}

    def maildirPath(self, address: Address) -> str:
        """
        @return: the absolute maildrop directory of C{address}.
        @raise PermanentFailure: the address would name a path outside
            C{root} (never for a parsed L{Address}).
        """
        _checkComponent(address.domain)
        _checkComponent(address.localpart)
        path = os.path.normpath(os.path.join(self.root, address.domain, address.localpart))
        if os.path.dirname(os.path.dirname(path)) != self.root:
            raise PermanentFailure("address does not map to a safe maildrop path")
        return path

    def _ensureMaildir(self, path: str) -> str:
        """
        Create the maildrop at C{path} if missing, durably (each new
        directory's parent is fsynced).  Blocking: runs through the runner.

        @return: C{path}.
        """
        if _isMaildir(path):
            return path
        fsutil.makeDirectories(self.root, self.owner)
        domainDir = os.path.dirname(path)
        for directory in [domainDir, path] + [os.path.join(path, s) for s in _SUBDIRS]:
            fsutil.makeDirectory(directory, self.owner)
        return path

    def _uniqueName(self) -> str:
        """
        A new Maildir unique name,
        C{<secs>.M<usecs>P<pid>Q<counter>R<random hex>.<hostname>}.
        """
        self._counter += 1
        now = self._now()
        seconds = int(now)
        micros = int((now - seconds) * 1_000_000)
        return (
            f"{seconds}.M{micros:06d}P{os.getpid()}Q{self._counter}"
            f"R{secrets.token_hex(UNIQUE_RANDOM_HEX // 2)}.{self._hostname}"
        )

    def _lockAndSnapshot(self, address: Address, quick: bool = False) -> MaildirMaildrop:
        """
        Lock and snapshot C{address}'s maildrop.

        @param quick: raise L{_NotQuick} (holding no lock) unless it can be
            done in a moment, on the reactor thread: the maildrop exists,
            its C{tmp} is not due for clean-up, it holds at most
            L{QUICK_SNAPSHOT_ENTRIES} entries, and every size is known from
            the file names.
        """
        path = self.maildirPath(address)
        if quick and (not _isMaildir(path) or self._tmpCleanDue(path)):
            raise _NotQuick()
        try:
            self._ensureMaildir(path)
            fd = fsutil.openLockFile(os.path.join(path, LOCK_NAME), self.owner)
        except OSError as e:
            raise TemporaryFailure(f"cannot open maildrop: {e.strerror}") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MaildropLocked(str(address)) from None
            entries = _snapshot(path, quick)
        except OSError as e:
            os.close(fd)
            raise TemporaryFailure(f"cannot read maildrop: {e.strerror}") from e
        except BaseException:
            os.close(fd)
            raise
        if self._tmpCleanDue(path):
            now = self._now()
            self._tmpCleaned[path] = now
            _cleanTmp(path, now)
        return MaildirMaildrop(path, fd, entries, self._runner, quick)

    def _tmpCleanDue(self, path: str) -> bool:
        """
        @return: whether this process should look for debris in C{path}'s
            C{tmp} (at most every L{TMP_CLEAN_INTERVAL} seconds).
        """
        last = self._tmpCleaned.get(path)
        return last is None or self._now() - last >= TMP_CLEAN_INTERVAL

    def openMaildrop(self, address: Address) -> defer.Deferred:
        """
        Lock C{address}'s maildrop (creating it if missing) and take its
        snapshot.

        @return: a L{Deferred} firing with a L{MaildirMaildrop}, or failing
            with L{MaildropLocked}, L{TemporaryFailure} or (unsafe address)
            L{PermanentFailure}.
        """
        # A small existing maildrop whose sizes are all in its file names is
        # snapshotted at once: a thread hop would cost more than the scan.
        try:
            return defer.succeed(self._lockAndSnapshot(address, quick=True))
        except _NotQuick:
            return self._runner.run(self._lockAndSnapshot, address)
        except BaseException:
            return defer.fail()

    def _createDeliveryFile(self, maildirs: Sequence[str], tmpPath: str) -> int:
        """
        Create the maildrops missing among C{maildirs}, then the tmp file
        C{tmpPath}.  Blocking: runs through the runner.

        @return: the tmp file's descriptor.
        @raise TemporaryFailure: a maildrop or the file cannot be created.
        """
        try:
            for maildir in maildirs:
                self._ensureMaildir(maildir)
            return fsutil.createFile(tmpPath, self.owner)
        except OSError as e:
            raise TemporaryFailure.fromOSError("cannot start delivery", e) from e

    def beginDelivery(self, recipients: Sequence[Address], trace: bytes = b"") -> MaildirDelivery:
        """
        Start delivering one message to C{recipients} (duplicates count
        once).

        When every recipient's maildrop exists, the tmp file is created at
        once; otherwise the maildrops are created and the tmp file opened
        through the runner, and what is written meanwhile is buffered.

        @raise TemporaryFailure: a maildrop cannot be created or written
            (through a thread pool, L{IDelivery.write} or
            L{IDelivery.commit} reports it instead).
        @raise PermanentFailure: an address maps outside C{root}.
        @raise ValueError: no recipients.
        """
        unique = list(dict.fromkeys(recipients))
        if not unique:
            raise ValueError("no recipients")
        maildirs = [self.maildirPath(r) for r in unique]
        name = self._uniqueName()
        delivery = MaildirDelivery(maildirs, name, self._runner, self.owner)
        tmpPath = os.path.join(maildirs[0], "tmp", name)
        if all(_isMaildir(m) for m in maildirs):
            try:
                fd = fsutil.createFile(tmpPath, self.owner)
            except OSError as e:
                raise TemporaryFailure.fromOSError("cannot start delivery", e) from e
            delivery._opened(fd)
        else:
            delivery._openThrough(self._runner.run(self._createDeliveryFile, maildirs, tmpPath))
            failure = delivery._openFailure
            if failure is not None:
                failure.raiseException()
        if trace:
            delivery.write(trace)
        return delivery
