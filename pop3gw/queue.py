# -*- test-case-name: tests.test_queue -*-
"""
The durable outbound queue: entries, their files, and the delivery object
that writes them.  Delivery itself is L{pop3gw.relay}'s job; this module
knows nothing of SMTP, DNS or time beyond the clock it is given.

Storage
=======

L{OutboundQueue} keeps each queued message as two files in its root
directory (the operator's C{DATA/queue}):

  - C{<id>.msg}: the message bytes with CRLF line ends (any bare LF written
    to it is made CRLF), the trace header first;
  - C{<id>.json}: the envelope and delivery state (see L{Entry.toJSON}).

Every write goes to a unique C{*.tmp} file, is fsynced, renamed into place,
and the directory is fsynced (by the batched L{DirectorySyncer}, shared
with the other writes made meanwhile).  The C{.msg} is durable before the
C{.json} is renamed into place, and an entry exists only when its C{.json}
does; at start-up, C{.msg} files and attempt markers without a C{.json},
and C{*.tmp} files, older than L{ORPHAN_AGE} are removed.  The server holds
an exclusive C{flock} on C{.lock} while it renames a C{.json} into place or
unlinks one (never across an C{fsync}); the C{pop3gw queue flush} command
holds it over its whole read-modify-write, which is so never interleaved
with a write by the server.

The relay records an attempt (L{OutboundQueue.recordAttempt}) without
rewriting the C{.json}: the attempt count and next attempt time are the
name of an empty marker file, C{<id>.try-<attempts>-<nextAttempt>}
(L{markerName}), created at the first attempt and renamed at each next
one, durable with the directory's batched C{fsync}.  Readers apply a
marker that counts more attempts than the C{.json}.  Removing an entry
unlinks its files and syncs the directory the same way.  Attempt records
and removals asked for while a batch of them runs form the next batch:
one job of the runner (with one hold of the queue lock for its unlinks)
and one directory C{fsync} for all of them, and the job reads each
recorded entry's message when it is small (L{PREFETCH_SIZE}), for
L{OutboundQueue.openMessage} to give from memory.  Every file the queue creates (entries, temp files,
C{.lock}, C{.flush}) is mode 0600 and its directory 0700, whatever the
umask; a command run as root gives them the data directory's owner
(L{pop3gw.fsutil}).  C{pop3gw queue flush} (L{requestFlush}) touches
C{.flush}; the relay learns of it only through L{OutboundQueue.flushStamp}.

The index
=========

C{.index} (L{INDEX_FILE}) caches the parsed C{.json} files, so that the
server's start-up and C{pop3gw queue list} with tens of thousands of
entries need not open and parse each one.  It is only a cache: the
entries are always the C{.json} files the directory lists; each index line
holds one file's inode, size, modification and change times with its
contents, and is used only while the file still has them (every write
replaces a C{.json} by a new file).  A row is never written for a file
modified less than L{INDEX_RACY} seconds before (a rewrite in the same
clock tick could keep its time stamps).  The first line names the format
version and the SHA-256 of the rest; an index of another version, or
that does not match, is ignored.  The server rewrites it when it loads
the queue (L{OutboundQueue.loadEntries}) and it differs; C{queue list}
only reads it.

State changes
=============

An entry's delivery state changes only through its pure methods, testable
without a reactor: L{Entry.beginAttempt} (count the attempt and set the next
one, recorded durably before the attempt is made), L{Entry.apply} (the
L{Outcome} of each recipient tried), L{Entry.expire} (pending recipients
fail once the queue lifetime has passed).  A recipient is done when it was
delivered or failed permanently; an entry's files are removed only once no
recipient is pending and every failure was notified (L{Entry.isFinished}).
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import enum
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union, cast

import attr
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3gw import fsutil
from pop3gw.address import Address, AddressError
from pop3gw.dsn import oneLine, originalHeaders
from pop3gw.groupsync import DirectorySyncer
from pop3gw.interfaces import (
    IBlockingRunner,
    IOutboundQueue,
    IQueuedDelivery,
    IQueueStore,
    ITwoPhaseDelivery,
    TemporaryFailure,
)
from pop3gw.runner import ImmediateRunner
from pop3gw.wire import CRLFStream

#: The largest message (in octets) read into memory with its attempt
#: record, so that the relay sends it without opening its file on the
#: reactor thread; a larger one is opened and read as it is sent.
PREFETCH_SIZE = 64 * 1024

#: Orphaned C{.msg} and C{.tmp} files older than this (seconds) are removed
#: at start-up.
ORPHAN_AGE = 60 * 60

FLUSH_FILE = ".flush"
LOCK_FILE = ".lock"

#: The queue's index: a cache of the parsed C{.json} files (see
#: L{_scanEntries}), rewritten by the server when it loads the queue.
INDEX_FILE = ".index"

#: The index format's version, in its first line.
INDEX_VERSION = 1

_INDEX_MAGIC = b"pop3gw-queue-index"

#: A C{.json} file modified less than this many seconds before a scan is
#: not put in the index (see L{_scanEntries}).
INDEX_RACY = 2.0

#: Index lines decoded by one C{json.loads}.
_INDEX_BATCH = 512

_ID = re.compile(r"^[0-9a-f]{13}-[0-9a-f]{8}$")
_ID_BYTES = re.compile(rb"^[0-9a-f]{13}-[0-9a-f]{8}$")

#: An attempt marker: C{<id>.try-<attempts>-<nextAttempt>} (L{markerName}).
_MARKER = re.compile(r"^([0-9a-f]{13}-[0-9a-f]{8})\.try-([0-9]{1,9})-([0-9][0-9.e+-]*)$")


class RecipientState(str, enum.Enum):
    """
    Where one recipient of a queued message stands (the C{state} of the
    C{.json} file).
    """

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


PENDING = RecipientState.PENDING
DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED


class OutcomeKind(enum.Enum):
    """
    What one attempt did for one recipient.
    """

    DELIVERED = "ok"
    DEFERRED = "temp"
    FAILED = "perm"


@attr.s(auto_attribs=True, frozen=True)
class Outcome:
    """
    What happened to one recipient in one attempt.

    @ivar kind: an L{OutcomeKind}.
    @ivar status: the RFC 3463 status.
    @ivar diagnostic: one line for logs and bounces.
    """

    kind: OutcomeKind
    status: str
    diagnostic: str


# --- Entries ---------------------------------------------------------------


@attr.s(auto_attribs=True, slots=True)
class Recipient:
    """
    One recipient of a queued message.

    @ivar state: a L{RecipientState}.
    @ivar status: for a failed recipient, its RFC 3463 status.
    @ivar diagnostic: for a failed recipient, why (the remote reply).
    @ivar notified: for a failed recipient, whether its bounce is stored
        (or was dropped because the sender is null).
    """

    address: Address
    state: RecipientState = PENDING
    status: Optional[str] = None
    diagnostic: Optional[str] = None
    notified: bool = False

    def fail(self, status: str, diagnostic: str) -> None:
        """
        Mark this recipient as failed permanently.
        """
        self.state = FAILED
        self.status = status
        self.diagnostic = diagnostic


@attr.s(auto_attribs=True, slots=True)
class Entry:
    """
    One queued message's envelope and delivery state.

    @ivar queueId: the file-name-safe id (C{<id>.msg}, C{<id>.json}).
    @ivar sender: the envelope sender, or C{None} for the null path.
    @ivar created: when it was queued (POSIX seconds).
    @ivar attempts: how many delivery attempts were started.
    @ivar nextAttempt: when the next attempt is due (POSIX seconds).
    @ivar lastError: the last temporary failure, for operators.
    @ivar smtputf8: whether the message was received with the SMTPUTF8
        parameter (RFC 6531): the relay asks the next hop for SMTPUTF8 when
        it offers it.
    """

    queueId: str
    sender: Optional[Address]
    recipients: list
    created: float
    attempts: int = 0
    nextAttempt: float = 0.0
    lastError: Optional[str] = None
    smtputf8: bool = False

    def pending(self) -> list:
        """
        @return: the L{Recipient}s still to be tried.
        """
        return [r for r in self.recipients if r.state == PENDING]

    def unnotified(self) -> list:
        """
        @return: the failed L{Recipient}s whose bounce is not stored yet.
        """
        return [r for r in self.recipients if r.state == FAILED and not r.notified]

    def isFinished(self) -> bool:
        """
        @return: whether the entry may leave the queue: nothing pending and
            every failure notified.
        """
        return not self.pending() and not self.unnotified()

    def isExpired(self, now: float, lifetime: float) -> bool:
        """
        @return: whether recipients are still pending although C{lifetime}
            seconds have passed since the message was queued.
        """
        return bool(self.pending()) and now >= self.created + lifetime

    def expire(self) -> int:
        """
        Fail every pending recipient permanently (status 4.4.7), naming the
        last temporary error.

        @return: how many recipients failed.
        """
        why = self.lastError or "no attempt succeeded"
        pending = self.pending()
        for r in pending:
            r.fail("4.4.7", f"delivery time expired; last error: {why}")
        return len(pending)

    def beginAttempt(self, now: float, schedule: Sequence[float], lifetime: float) -> list:
        """
        Count one more attempt and set when the next one is due: the
        C{schedule} delay for this attempt (its last delay repeats), but no
        later than the end of the C{lifetime}.  The caller saves the entry
        before it makes the attempt.

        @return: the L{Address}es of the pending recipients, to try now.
        """
        self.attempts += 1
        delay = schedule[min(self.attempts, len(schedule)) - 1]
        self.nextAttempt = min(now + delay, self.created + lifetime)
        return [r.address for r in self.pending()]

    def apply(self, outcomes: Mapping[Address, Outcome]) -> None:
        """
        Record an attempt's L{Outcome} per recipient address: delivered and
        failed recipients are done; the deferred ones stay pending and their
        reasons become L{lastError}.  Pending recipients without an outcome
        are left alone.
        """
        errors = []
        for r in self.pending():
            outcome = outcomes.get(r.address)
            if outcome is None:
                continue
            if outcome.kind is OutcomeKind.DELIVERED:
                r.state = DELIVERED
            elif outcome.kind is OutcomeKind.FAILED:
                r.fail(outcome.status, outcome.diagnostic)
            else:
                errors.append(f"{r.address}: {outcome.diagnostic}")
        if errors:
            self.lastError = oneLine("; ".join(errors))

    def toJSON(self) -> bytes:
        """
        The C{<id>.json} contents::

            {"version": 1, "id": ..., "sender": "a@b" or null,
             "created": secs, "attempts": n, "nextAttempt": secs,
             "lastError": text or null, "smtputf8": bool,
             "recipients": [{"address": ..., "state": "pending"|"delivered"|
                             "failed", "status": ..., "diagnostic": ...,
                             "notified": bool}, ...]}
        """
        return json.dumps(
            {
                "version": 1,
                "id": self.queueId,
                "sender": None if self.sender is None else str(self.sender),
                "created": self.created,
                "attempts": self.attempts,
                "nextAttempt": self.nextAttempt,
                "lastError": self.lastError,
                "smtputf8": self.smtputf8,
                "recipients": [
                    {
                        "address": str(r.address),
                        "state": r.state.value,
                        "status": r.status,
                        "diagnostic": r.diagnostic,
                        "notified": r.notified,
                    }
                    for r in self.recipients
                ],
            },
            indent=1,
            ensure_ascii=False,
        ).encode("utf-8")

    @classmethod
    def fromJSON(cls, data: bytes) -> "Entry":
        """
        Parse C{<id>.json} contents.

        @raise ValueError: the data is not a valid entry.
        """
        try:
            obj = json.loads(data.decode("utf-8"))
            if obj.get("version") != 1 or not _ID.match(obj["id"]):
                raise ValueError("unknown entry version or id")
            recipients = [
                [r["address"], r["state"], r.get("status"), r.get("diagnostic"), bool(r.get("notified", False))]
                for r in obj["recipients"]
            ]
            return cls.fromRecord(
                [
                    obj["id"],
                    obj["sender"],
                    float(obj["created"]),
                    int(obj["attempts"]),
                    float(obj["nextAttempt"]),
                    obj.get("lastError"),
                    bool(obj.get("smtputf8", False)),
                    recipients,
                ]
            )
        except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"malformed queue entry: {e}") from None

    def toRecord(self) -> list:
        """
        The entry as one compact JSON-ready list (a line of the queue's
        index, L{INDEX_FILE}): C{[id, sender or None, created, attempts,
        nextAttempt, lastError, smtputf8, [[address, state, status,
        diagnostic, notified], ...]]}.
        """
        return [
            self.queueId,
            None if self.sender is None else str(self.sender),
            self.created,
            self.attempts,
            self.nextAttempt,
            self.lastError,
            self.smtputf8,
            [[str(r.address), r.state.value, r.status, r.diagnostic, r.notified] for r in self.recipients],
        ]

    @classmethod
    def fromRecord(cls, record: list) -> "Entry":
        """
        The entry L{toRecord} gave C{record}.

        @raise ValueError: C{record} is not a valid entry.
        """
        try:
            queueId, sender, created, attempts, nextAttempt, lastError, smtputf8, recipients = record
            if not isinstance(queueId, str) or not _ID.match(queueId):
                raise ValueError("bad entry id")
            states = _STATES
            out = []
            for address, state, status, diagnostic, notified in recipients:
                found = states.get(state)
                if found is None:
                    raise ValueError("bad recipient state")
                out.append(Recipient(_storedAddress(address), found, status, diagnostic, notified))
            return cls(
                queueId,
                None if sender is None else _storedAddress(sender),
                out,
                created,
                attempts,
                nextAttempt,
                lastError,
                smtputf8,
            )
        except (TypeError, AttributeError, AddressError) as e:
            raise ValueError(f"malformed queue entry: {e}") from None


#: The recipient states by their stored names.
_STATES = {state.value: state for state in RecipientState}

_PENDING_STATE = RecipientState.PENDING.value


def _wellFormed(record: object) -> bool:
    """
    @return: whether C{record}, read from the index, has the shape
        L{Entry.toRecord} gives (else its C{.json} is read instead).
    """
    try:
        queueId, sender, created, attempts, nextAttempt, lastError, smtputf8, recipients = cast(list, record)
        return (
            type(queueId) is str
            and (sender is None or type(sender) is str)
            and type(created) in (int, float)
            and type(attempts) is int
            and type(nextAttempt) in (int, float)
            and (lastError is None or type(lastError) is str)
            and type(smtputf8) is bool
            and type(recipients) is list
            and all(
                type(r) is list
                and len(r) == 5
                and type(r[0]) is str
                and r[1] in _STATES
                and (r[2] is None or type(r[2]) is str)
                and (r[3] is None or type(r[3]) is str)
                and type(r[4]) is bool
                for r in recipients
            )
        )
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=4096)
def _storedAddress(text: str) -> Address:
    """
    L{Address.parse} for the addresses read back from C{.json} files,
    remembered: a long queue names few distinct senders and recipients,
    which are parsed once and shared (an L{Address} is immutable).

    @raise AddressError: as L{Address.parse}.
    """
    return Address.parse(text)


# --- File helpers (blocking; run in a thread pool when one is given) ---


@contextlib.contextmanager
def _queueLock(root: str, owner: Optional[fsutil.Owner]) -> Iterator[None]:
    """
    Hold the queue's exclusive C{flock} (the C{.lock} file) while renaming
    a C{.json} file into place (never across an C{fsync}).
    """
    fd = fsutil.openLockFile(os.path.join(root, LOCK_FILE), owner)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _saveEntry(
    root: str, queueId: str, data: bytes, owner: Optional[fsutil.Owner], syncDirectory: bool = True
) -> None:
    """
    Write the envelope C{data} of entry C{queueId} atomically: the
    temporary file is written and fsynced without the queue lock, which is
    held only for the rename.  The rename is durable once C{root} is
    fsynced, here unless C{syncDirectory} is false.
    """

    def lockedReplace(source: str, destination: str) -> None:
        with _queueLock(root, owner):
            os.replace(source, destination)

    fsutil.replaceFile(
        os.path.join(root, queueId + ".json"), data, owner, replace=lockedReplace, syncDirectory=syncDirectory
    )


def _removeEntry(
    root: str, queueId: str, owner: Optional[fsutil.Owner], marker: Optional[str] = None, locked: bool = False
) -> None:
    """
    Unlink entry C{queueId}'s files: durable once C{root} is fsynced.

    @param marker: the name of its attempt marker, if it has one.
    @param locked: the caller holds the queue lock already.
    """
    # The .json goes first: without it the entry no longer exists, and a
    # .msg or marker left behind by a crash is an orphan removed at
    # start-up.
    if locked:
        fsutil.unlinkIfThere(os.path.join(root, queueId + ".json"))
    else:
        with _queueLock(root, owner):
            fsutil.unlinkIfThere(os.path.join(root, queueId + ".json"))
    if marker is not None:
        fsutil.unlinkIfThere(os.path.join(root, marker))
    fsutil.unlinkIfThere(os.path.join(root, queueId + ".msg"))


def markerName(entry: Entry) -> str:
    """
    The name of the empty file that records C{entry}'s latest attempt:
    C{<id>.try-<attempts>-<nextAttempt>}.
    """
    return f"{entry.queueId}.try-{entry.attempts}-{entry.nextAttempt!r}"


def _parseMarker(name: str) -> Optional[tuple]:
    """
    @return: C{(queueId, attempts, nextAttempt)} from an attempt marker's
        name, or C{None} if C{name} is none.
    """
    match = _MARKER.match(name)
    if match is None:
        return None
    try:
        nextAttempt = float(match.group(3))
    except ValueError:
        return None
    return match.group(1), int(match.group(2)), nextAttempt


def _moveMarker(root: str, old: Optional[str], new: str, owner: Optional[fsutil.Owner]) -> None:
    """
    Record an attempt: rename the entry's marker C{old} to C{new}, or
    create C{new} if there was none.  Durable once C{root} is fsynced.
    """
    if old == new:
        return
    if old is not None:
        try:
            os.rename(os.path.join(root, old), os.path.join(root, new))
            return
        except FileNotFoundError:
            pass
    try:
        os.close(fsutil.createFile(os.path.join(root, new), owner))
    except FileExistsError:
        pass


def _readSmall(path: str, limit: int) -> Optional[bytes]:
    """
    @return: the contents of the file C{path} if it has at most C{limit}
        octets, else (or if it cannot be read) C{None}.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        parts: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
            size += len(chunk)
        return None
    except OSError:
        return None
    finally:
        os.close(fd)


@attr.s(auto_attribs=True, slots=True)
class _FileJob:
    """
    One entry's part of a batch of the relay's file work (see
    L{_runFileBatch}).

    @ivar queueId: the entry.
    @ivar marker: a removal: the name of its attempt marker, if any; an
        attempt record: the marker to rename, if any.
    @ivar newMarker: an attempt record: the marker's new name; C{None}
        for a removal.
    @ivar result: fires once the batch is durable.
    """

    queueId: str
    marker: Optional[str]
    newMarker: Optional[str]
    result: defer.Deferred = attr.ib(factory=defer.Deferred)


def _runFileBatch(
    root: str, owner: Optional[fsutil.Owner], jobs: Sequence[_FileJob], syncNow: Callable[[Sequence[str]], None]
) -> tuple:
    """
    Do a batch of attempt records and removals (blocking; one job of the
    runner): rename or create each attempt marker and read its message
    when it is small (L{PREFETCH_SIZE}), unlink each removed entry's files
    (the C{.json} files under one hold of the queue lock), then make all
    of it durable with one C{fsync} of the directory, shared through
    C{syncNow} with other writers.

    @return: C{(outcomes, syncError)}: per job in order, the message read
        (or C{None}) for an attempt record and C{None} for a removal, or
        the L{Failure} of its own file work; and the C{OSError} of the
        directory C{fsync}, or C{None} when it succeeded.
    """
    outcomes: list = []
    removals = [job for job in jobs if job.newMarker is None]
    removed: dict = {}
    if removals:
        try:
            with _queueLock(root, owner):
                for job in removals:
                    try:
                        _removeEntry(root, job.queueId, owner, job.marker, True)
                        removed[job.queueId] = None
                    except Exception:
                        removed[job.queueId] = Failure()
        except Exception:
            failed = Failure()
            for job in removals:
                removed.setdefault(job.queueId, failed)
    for job in jobs:
        if job.newMarker is None:
            outcomes.append(removed[job.queueId])
            continue
        try:
            _moveMarker(root, job.marker, job.newMarker, owner)
        except Exception:
            outcomes.append(Failure())
            continue
        outcomes.append(_readSmall(os.path.join(root, job.queueId + ".msg"), PREFETCH_SIZE))
    try:
        syncNow([root])
    except OSError as e:
        return outcomes, e
    return outcomes, None


def _readIndex(root: str) -> dict:
    """
    Read the queue's index (L{INDEX_FILE}, written by L{_writeIndex}).

    @return: queue id -> its line, C{<id> <inode> <size> <mtime_ns>
        <ctime_ns> <record>}: the C{.json} file's L{_statKey} when it was
        read and its contents as L{Entry.toRecord} gives them, in JSON; an
        empty dict if the index is missing, of another version, or does
        not match its checksum.
    """
    try:
        with open(os.path.join(root, INDEX_FILE), "rb") as f:
            header = f.readline()
            body = f.read()
    except OSError:
        return {}
    fields = header.split()
    if len(fields) != 3 or fields[0] != _INDEX_MAGIC or fields[1] != b"%d" % INDEX_VERSION:
        return {}
    if hashlib.sha256(body).hexdigest().encode("ascii") != fields[2]:
        return {}
    index = {}
    for line in body.split(b"\n"):
        queueId = line[: line.find(b" ")]
        if line and _ID_BYTES.match(queueId):
            index[queueId.decode("ascii")] = line
    return index


def _indexLine(key: list, record: list) -> bytes:
    """
    The index line of an entry (see L{_readIndex}).
    """
    return b"%s %d %d %d %d %s" % (
        record[0].encode("ascii"),
        *key,
        json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
    )


def _indexedRecords(lines: list) -> list:
    """
    Decode the records of index lines whose files are unchanged, a batch
    at a time (one C{json.loads} for many lines).

    @param lines: the lines (see L{_readIndex}).
    @return: for each line, its record, or C{None} if it is not well
        formed.
    """
    records: list = []
    for start in range(0, len(lines), _INDEX_BATCH):
        batch = lines[start : start + _INDEX_BATCH]
        texts = [line.split(b" ", 5)[5] for line in batch]
        try:
            decoded = json.loads(b"[" + b",".join(texts) + b"]")
            if len(decoded) != len(batch):
                raise ValueError("lines run together")
        except ValueError:
            decoded = []
            for text in texts:
                try:
                    decoded.append(json.loads(text))
                except ValueError:
                    decoded.append(None)
        for line, record in zip(batch, decoded):
            ok = _wellFormed(record) and record[0] == line[: line.find(b" ")].decode("ascii")
            records.append(record if ok else None)
    return records


def _lineKey(line: bytes) -> Optional[list]:
    """
    @return: the L{_statKey} an index line names, or C{None} if it names
        none.
    """
    fields = line.split(b" ", 5)
    if len(fields) != 6:
        return None
    try:
        return [int(f) for f in fields[1:5]]
    except ValueError:
        return None


def _writeIndex(root: str, lines: list, owner: Optional[fsutil.Owner]) -> None:
    """
    Replace the queue's index with C{lines} (see L{_readIndex}).  The
    index is a cache: a failure to write it is ignored, and it is not
    fsynced (a torn one fails its checksum).
    """
    body = b"\n".join(lines)
    header = b"%s %d %s\n" % (_INDEX_MAGIC, INDEX_VERSION, hashlib.sha256(body).hexdigest().encode("ascii"))
    tmp = os.path.join(root, f"{INDEX_FILE}.{os.getpid()}.tmp")
    try:
        fsutil.unlinkIfThere(tmp)
        fd = fsutil.createFile(tmp, owner)
        try:
            fsutil.writeAll(fd, header + body)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(root, INDEX_FILE))
    except OSError:
        with contextlib.suppress(OSError):
            fsutil.unlinkIfThere(tmp)


def _statKey(st: os.stat_result) -> list:
    """
    What the index remembers of a C{.json} file to know that it has not
    changed since it was read: inode, size, modification and change times
    (every write replaces the file with a new one).
    """
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _readRecord(path: str) -> tuple:
    """
    Read and parse one C{.json} file.

    @return: C{(key, record)}: the L{_statKey} of the file read and its
        entry as L{Entry.toRecord} gives it.
    @raise OSError: it cannot be read.
    @raise ValueError: it is not a valid entry.
    """
    with open(path, "rb") as f:
        key = _statKey(os.fstat(f.fileno()))
        return key, Entry.fromJSON(f.read()).toRecord()


def _scanEntries(
    root: str,
    convert: Callable[[list], Any],
    log: Optional[Logger] = None,
    now: Optional[float] = None,
    owner: Optional[fsutil.Owner] = None,
    updateIndex: bool = False,
) -> tuple:
    """
    Every entry under C{root} whose C{.json} parses and whose C{.msg}
    exists, sorted by creation time, with its latest attempt marker
    applied (an attempt recorded after its C{.json} was written), each
    given as a record (L{Entry.toRecord}) to C{convert}.

    The entries are the C{.json} files the directory lists, each read
    unless the index (L{INDEX_FILE}) holds it with the same L{_statKey}:
    an entry added, rewritten or removed since the index was written is
    seen as it is now, and an index that is missing, corrupt or of
    another version is ignored.

    @param convert: makes what is returned of each record (which it may
        keep: each is made for it).
    @param now: the current time; C{time.time()} if C{None}.
    @param owner: who gets the index file (see L{pop3gw.fsutil}).
    @param updateIndex: whether to rewrite the index when it differs from
        what was read.  A file modified less than L{INDEX_RACY} seconds
        before C{now} is left out of it (read again next time), so that a
        later rewrite of it never has the same modification time.
    @return: C{(converted, markers)}: the list of what C{convert} made,
        and queue id -> the name of its latest marker, for the entries
        that have one.
    """
    if now is None:
        now = time.time()
    try:
        # Names only: a DirEntry per file would cost several times the
        # memory of the names, for a moment, at 50,000 entries.
        names = os.listdir(root)
    except FileNotFoundError:
        return [], {}
    present = set(names)
    latest: dict = {}
    jsons = []
    for name in names:
        if name.endswith(".json"):
            jsons.append(name)
        elif ".try-" in name:
            parsed = _parseMarker(name)
            if parsed is not None and (parsed[0] not in latest or parsed[1] > latest[parsed[0]][1]):
                latest[parsed[0]] = (name, parsed[1], parsed[2])
    index = _readIndex(root)
    prefix = os.path.join(root, "")
    lines: list = []
    recent = int((now - INDEX_RACY) * 1e9)
    results: list = []
    markers: dict = {}
    # Whether the index to write differs from the one read.
    dirty = False

    def add(name: str, key: list, line: Optional[bytes], record: list) -> None:
        # One entry read: kept in the index (unless modified too
        # recently), its marker applied, converted.
        queueId = record[0]
        if queueId + ".msg" not in present:
            if log is not None:
                log.error("queue: skipping unreadable entry {name}: {why}", name=name, why="message file missing")
            return
        nonlocal dirty
        if key[2] < recent:
            if line is None:
                line = _indexLine(key, record)
                dirty = True
            lines.append(line)
        marker = latest.get(queueId)
        if marker is not None:
            markers[queueId] = marker[0]
            if marker[1] > record[3]:
                record[3], record[4] = marker[1], marker[2]
        try:
            results.append((record[2], queueId, convert(record)))
        except ValueError as e:
            if log is not None:
                log.error("queue: skipping unreadable entry {name}: {why}", name=name, why=str(e))

    # The entries whose index line is current are decoded a batch at a
    # time; the others are read from their files.
    cached: list = []
    unread: list = []
    for name in jsons:
        queueId = name[: -len(".json")]
        line = index.pop(queueId, None)
        if line is not None:
            try:
                key = _statKey(os.stat(prefix + name, follow_symlinks=False))
            except OSError:
                dirty = True
                continue
            if _lineKey(line) == key:
                cached.append((name, key, line))
                continue
            dirty = True
        unread.append(name)
    # Entries removed since the index was written leave it.
    dirty = dirty or bool(index)
    for start in range(0, len(cached), _INDEX_BATCH):
        batch = cached[start : start + _INDEX_BATCH]
        for (name, key, line), record in zip(batch, _indexedRecords([c[2] for c in batch])):
            if record is None:
                unread.append(name)
                dirty = True
            else:
                add(name, key, line, record)
    del cached
    for name in unread:
        try:
            key, record = _readRecord(prefix + name)
            if record[0] != name[: -len(".json")]:
                raise ValueError("id does not match the file name")
        except (OSError, ValueError) as e:
            if log is not None:
                log.error(
                    "queue: skipping unreadable entry {name}: {why}",
                    name=name,
                    why=str(e),
                )
            continue
        add(name, key, None, record)
    del index
    if updateIndex and dirty:
        _writeIndex(root, lines, owner)
    results.sort(key=lambda r: (r[0], r[1]))
    return [r[2] for r in results], markers


def _readEntries(root: str, log: Optional[Logger] = None) -> list:
    """
    Every entry under C{root} (see L{_scanEntries}).
    """
    return _scanEntries(root, Entry.fromRecord, log)[0]


def _removeOrphans(root: str, now: float, log: Logger) -> None:
    """
    Remove C{*.tmp} files, and C{.msg} files and attempt markers without a
    C{.json}, whose modification time is more than L{ORPHAN_AGE} before C{now}.
    """
    names = os.listdir(root)
    present = set(names)
    candidates = []
    for name in names:
        if name.endswith(".tmp"):
            candidates.append(name)
        elif name.endswith(".msg"):
            if name[: -len(".msg")] + ".json" not in present:
                candidates.append(name)
        elif ".try-" in name:
            marker = _parseMarker(name)
            if marker is not None and marker[0] + ".json" not in present:
                candidates.append(name)
    for name in sorted(candidates):
        path = os.path.join(root, name)
        try:
            if now - os.stat(path).st_mtime > ORPHAN_AGE:
                os.unlink(path)
                log.info("queue: removed orphaned file {name}", name=name)
        except FileNotFoundError:
            pass


def _isoTime(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


# --- CLI helpers (no reactor, no network) -------------------------------


def listEntries(root: str) -> list:
    """
    Every valid entry of the queue at C{root}, oldest first (unreadable
    entries are skipped).

    @return: a list of L{Entry}.
    """
    return _readEntries(root)


def requestFlush(root: str, now: Optional[float] = None, owner: Optional[fsutil.Owner] = None) -> int:
    """
    Make every entry due now, durably, and touch C{.flush} so that a running
    relay notices (it polls L{OutboundQueue.flushStamp}).

    @param now: the current time; C{time.time()} if C{None}.
    @param owner: who gets the files created (see L{pop3gw.fsutil}).
    @return: how many entries were updated.
    """
    if now is None:
        now = time.time()
    if not os.path.isdir(root):
        return 0
    count = 0
    with _queueLock(root, owner):
        for entry in _readEntries(root):
            entry.nextAttempt = now
            fsutil.replaceFile(os.path.join(root, entry.queueId + ".json"), entry.toJSON(), owner, syncDirectory=False)
            count += 1
        fsutil.fsyncDirectory(root)
    fsutil.replaceFile(os.path.join(root, FLUSH_FILE), b"%d\n" % (now,), owner)
    return count


def formatEntry(entry: Entry) -> str:
    """
    One line describing C{entry} for C{pop3gw queue list}::

        <id> from=<sender> to=<pending,...> attempts=<n> next=<ISO time> error=<text>
    """
    return _formatRecord(entry.toRecord())


def _formatRecord(record: list) -> str:
    """
    L{formatEntry} for an entry given as a record (L{Entry.toRecord}).
    """
    queueId, sender, _, attempts, nextAttempt, lastError, _, recipients = record
    pending = ",".join(r[0] for r in recipients if r[1] == _PENDING_STATE) or "-"
    error = oneLine(lastError, 200) if lastError else "-"
    return (
        f"{queueId} from={'<>' if sender is None else sender} to={pending} attempts={attempts} "
        f"next={_isoTime(nextAttempt)} error={error}"
    )


def listText(root: str) -> str:
    """
    The output of C{pop3gw queue list} for the queue at C{root}: one
    L{formatEntry} line per valid entry, oldest first; the entries come
    from the index where it is current (see L{_scanEntries}), without
    building an L{Entry} for each.
    """
    return "".join(_scanEntries(root, _formatLine)[0])


def _formatLine(record: list) -> str:
    """
    L{_formatRecord} with the line end.
    """
    return _formatRecord(record) + "\n"


# --- The queue ---------------------------------------------------------------


class CRLFDelivery(abc.ABC):
    """
    The data side of a queue delivery: what is written is converted to
    CRLF line ends (L{CRLFStream}) and handed to L{_append}; L{_endLines}
    completes a last line without a line end.  Shared by both queue
    stores, as is L{release<CRLFDelivery.release>}.
    """

    _state: str
    _queue: Any
    _entry: Entry

    def release(self) -> None:
        """
        Hand a prepared message to the relay.
        """
        if self._state == "prepared":
            self._state = "committed"
            self._queue._announce(self._entry)

    def _startLines(self) -> None:
        self._crlf = CRLFStream()
        self._tail = b""

    def write(self, data: bytes) -> None:
        if self._state != "open":
            raise TemporaryFailure("delivery is not open")
        if not data:
            return
        out = self._crlf.feed(data)
        self._tail = (self._tail + out[-2:])[-2:]
        self._append(out)

    def _endLines(self) -> None:
        """
        Complete the last line, if it has no CRLF yet.

        @raise TemporaryFailure: as L{_append}.
        """
        if self._tail.endswith(b"\r"):
            self._append(b"\n")
        elif self._tail and self._tail != b"\r\n":
            self._append(b"\r\n")

    @abc.abstractmethod
    def _append(self, data: bytes) -> None:
        """
        Store C{data} (CRLF form).

        @raise TemporaryFailure: it cannot be stored; the delivery is then
            discarded.
        """


@implementer(ITwoPhaseDelivery, IQueuedDelivery)
class _QueueDelivery(CRLFDelivery):
    """
    One message being queued: written to a tmp file as it arrives, made
    durable by L{prepare}, handed to the relay by L{release<CRLFDelivery.release>}.

    @ivar queueId: the id of the entry this delivery makes (C{pop3gw queue
        list}, the relay's log lines, bounces), known from the start.
    """

    def __init__(self, queue: "OutboundQueue", entry: Entry, trace: bytes):
        self._queue = queue
        self._entry = entry
        self.queueId = entry.queueId
        self._tmp = os.path.join(queue.root, f"{entry.queueId}.msg.tmp")
        self._state = "open"
        self._renamed = False
        self._startLines()
        try:
            self._file = os.fdopen(fsutil.createFile(self._tmp, self._queue.owner), "wb")
        except OSError as e:
            raise TemporaryFailure.fromOSError("cannot create queue file", e) from None
        if trace:
            self.write(trace)

    def _append(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            self._discardTmp()
            raise TemporaryFailure.fromOSError("cannot write queue file", e) from None

    def _discardTmp(self) -> None:
        self._state = "aborted"
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)

    def _writeMessage(self) -> None:
        """
        C{fsync} the message file and rename it into place (durable once
        the queue directory is fsynced).  Blocking: runs through the runner.
        """
        f = self._file
        f.flush()
        fsutil.fsync(f.fileno())
        f.close()
        os.rename(self._tmp, os.path.join(self._queue.root, self._entry.queueId + ".msg"))
        self._renamed = True

    def _writeEnvelope(self, envelope: bytes) -> None:
        """
        Write the C{.json} of the entry (durable once the queue directory is
        fsynced).  Blocking: runs through the runner.
        """
        _saveEntry(self._queue.root, self._entry.queueId, envelope, self._queue.owner, syncDirectory=False)

    def _makeDurable(self, envelope: bytes) -> defer.Deferred:
        """
        The C{.msg}, made durable before the C{.json} is written (so a
        C{.json} never names a message a crash lost), then the C{.json}:
        each through the runner, each directory C{fsync} shared with the
        other deliveries committing at the same time (the queue's
        L{DirectorySyncer}).
        """
        queue = self._queue
        d = queue._run(self._writeMessage)
        d.addCallback(lambda _: queue.syncer.sync([queue.root]))
        d.addCallback(lambda _: queue._run(self._writeEnvelope, envelope))
        d.addCallback(lambda _: queue.syncer.sync([queue.root]))
        return d

    def prepare(self) -> defer.Deferred:
        """
        Make the message and its envelope durable without handing it to the
        relay yet (see L{ITwoPhaseDelivery}).
        """
        if self._state != "open":
            return defer.fail(TemporaryFailure("delivery is not open"))
        self._state = "preparing"
        try:
            self._endLines()
        except TemporaryFailure:
            return defer.fail()
        envelope = self._entry.toJSON()
        d = self._makeDurable(envelope)

        def failed(f: Failure) -> Union[Failure, defer.Deferred]:
            self._discardTmp()
            if f.check(OSError):
                error = TemporaryFailure.fromOSError("cannot commit queue entry", cast(OSError, f.value))
                self._queue.log.error("queue: {error} id={queueId}", error=str(error), queueId=self._entry.queueId)
            else:
                self._queue.log.failure("queue: cannot commit {queueId}", f, queueId=self._entry.queueId)
                error = TemporaryFailure("cannot commit queue entry")
            if not self._renamed:
                return Failure(error)
            # Not acknowledged: nothing of it may be relayed, even after a
            # restart, so its files go before the client hears of it.
            removal = self._queue._removeFiles(self._entry.queueId)
            removal.addErrback(
                lambda reason: self._queue.log.failure("queue: cannot remove {queueId}", reason, queueId=self._entry.queueId)
            )
            return removal.addCallback(lambda _: Failure(error))

        def prepared(_: object) -> None:
            self._state = "prepared"

        d.addCallbacks(prepared, failed)
        return d

    def discard(self) -> defer.Deferred:
        """
        Withdraw a prepared (not released) message, or abort an open one.
        """
        if self._state == "prepared":
            self._state = "aborted"
            return self._queue._removeFiles(self._entry.queueId)
        self.abort()
        return defer.succeed(None)

    def commit(self) -> defer.Deferred:
        return self.prepare().addCallback(lambda _: self.release())

    def abort(self) -> None:
        if self._state == "open":
            self._discardTmp()


class QueueListeners:
    """
    The listeners of a queue store (L{IQueueStore.addListener}): told of
    each newly committed entry.  Mixed into both queue stores.
    """

    _listeners: list
    log: Logger

    def addListener(self, listener: Callable[[Entry], None]) -> None:
        """
        Call C{listener(entry)} for each newly committed entry.
        """
        self._listeners.append(listener)

    def removeListener(self, listener: Callable[[Entry], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _announce(self, entry: Entry) -> None:
        for listener in list(self._listeners):
            try:
                listener(entry)
            except Exception:
                self.log.failure("queue: listener failed for {queueId}", queueId=entry.queueId)


@implementer(IOutboundQueue, IQueueStore)
class OutboundQueue(QueueListeners):
    """
    The durable outbound queue in directory C{root} (created if missing).

    @param reactor: gives the time (C{seconds}).
    @param runner: where file work (writes, fsyncs, removals) runs: the
        server's L{pop3gw.runner.ThreadPoolRunner}; an
        L{pop3gw.runner.ImmediateRunner} if C{None}.
    """

    log = Logger()

    def __init__(
        self,
        root: str,
        reactor,
        runner: Optional[IBlockingRunner] = None,
        owner: Optional[fsutil.Owner] = None,
        syncer: Optional[DirectorySyncer] = None,
    ):
        self.root = root
        self.reactor = reactor
        self.runner: IBlockingRunner = runner if runner is not None else ImmediateRunner()
        self.syncer = syncer if syncer is not None else DirectorySyncer(self.runner)
        self.owner = owner
        self._listeners: list = []
        self._saves: dict = {}
        # Queue id -> the name of its attempt marker.
        self._markers: dict = {}
        # Queue id -> its message, read with its attempt record and not
        # yet opened (see openMessage).
        self._prefetched: dict = {}
        # The attempt records and removals waiting for the next batch, and
        # whether one is in progress (see _submit).
        self._batch: list = []
        self._batchRunning = False
        fsutil.makeDirectories(root, owner)

    def _run(self, f: Callable, *args) -> defer.Deferred:
        return self.runner.run(f, *args)

    def _newId(self) -> str:
        micros = int(self.reactor.seconds() * 1_000_000) & (16**13 - 1)
        return "%013x-%s" % (micros, os.urandom(4).hex())

    def beginDelivery(
        self, sender: Optional[Address], recipients: Sequence[Address], trace: bytes = b"", smtputf8: bool = False
    ):
        now = self.reactor.seconds()
        entry = Entry(
            self._newId(),
            sender,
            [Recipient(r) for r in recipients],
            created=now,
            nextAttempt=now,
            smtputf8=smtputf8,
        )
        return _QueueDelivery(self, entry, trace)

    def announce(self, entry: Entry) -> None:
        """
        Call the listeners (see L{addListener}) for C{entry}, committed by
        another process (a worker; see L{pop3gw.supervisor}).
        """
        self._announce(entry)

    def readEntry(self, queueId: str) -> Optional[Entry]:
        """
        Read one entry (blocking).

        @return: the entry C{queueId}, or C{None} if it does not exist (any
            more) or is unreadable.
        """
        if not _ID.match(queueId):
            return None
        try:
            with open(os.path.join(self.root, queueId + ".json"), "rb") as f:
                entry = Entry.fromJSON(f.read())
        except (OSError, ValueError):
            return None
        if entry.queueId != queueId or not os.path.exists(os.path.join(self.root, queueId + ".msg")):
            return None
        return entry

    def hasEntry(self, queueId: str) -> bool:
        """
        @return: whether entry C{queueId} exists (its C{.json} does).
        """
        return os.path.exists(os.path.join(self.root, queueId + ".json"))

    def loadEntries(self) -> list:
        """
        Remove orphaned files and read every entry (blocking; for start-up).

        @return: a list of L{Entry}, oldest first.
        """
        now = time.time()
        _removeOrphans(self.root, now, self.log)
        entries, markers = _scanEntries(self.root, Entry.fromRecord, self.log, now, self.owner, updateIndex=True)
        self._markers.update(markers)
        return entries

    def _inOrder(self, queueId: str, job: Callable[[], defer.Deferred]) -> defer.Deferred:
        """
        Run C{job} once the writes of entry C{queueId} asked for before it
        are over (whatever their result).

        @return: a Deferred firing with C{job}'s result.
        """
        previous = self._saves.get(queueId)
        result: defer.Deferred = defer.Deferred()

        def run(_: object = None) -> None:
            job().chainDeferred(result)

        if previous is None:
            run()
        else:
            previous.addBoth(run)
        tail: defer.Deferred = defer.Deferred()
        self._saves[queueId] = tail

        def done(r: object) -> object:
            if self._saves.get(queueId) is tail:
                del self._saves[queueId]
            tail.callback(None)
            return r

        result.addBoth(done)
        return result

    def _durable(self, d: defer.Deferred) -> defer.Deferred:
        """
        @return: C{d}, then the queue directory synced (the batched
            C{fsync} of L{syncer}, shared with the writes made meanwhile).
        """
        return d.addCallback(lambda _: self.syncer.sync([self.root]))

    def saveEntry(self, entry: Entry) -> defer.Deferred:
        """
        Write C{entry}'s current state durably.  Saves of one entry run one
        after the other, in call order.
        """
        data = entry.toJSON()
        queueId = entry.queueId
        # The attempt is over: a message read for it and not sent goes.
        self._prefetched.pop(queueId, None)
        return self._inOrder(
            queueId,
            lambda: self._durable(self._run(_saveEntry, self.root, queueId, data, self.owner, False)),
        )

    def recordAttempt(self, entry: Entry) -> defer.Deferred:
        """
        Record durably that an attempt of C{entry} starts: its attempt
        count and next attempt time become the name of its empty marker
        file (L{markerName}), created or renamed, made durable by a
        directory C{fsync}; nothing is rewritten.  Ordered with the
        entry's saves.  The records and removals asked for while a batch
        of them runs form the next batch: one job of the runner and one
        directory C{fsync} for all of them (L{_runFileBatch}).  A message
        of at most L{PREFETCH_SIZE} octets is read in the same job, and
        L{openMessage} then gives it from memory.
        """
        queueId = entry.queueId
        new = markerName(entry)
        return self._inOrder(queueId, lambda: self._submit(_FileJob(queueId, self._markers.get(queueId), new)))

    def _submit(self, job: _FileJob) -> defer.Deferred:
        """
        Add C{job} to the next batch, and start that batch unless one is
        in progress (it then starts as soon as that one ends).

        @return: C{job}'s Deferred, firing once the batch is durable, or
            failing with the error of the job's own file work or of the
            batch's directory C{fsync}.
        """
        self._batch.append(job)
        if not self._batchRunning:
            self._startBatch()
        return job.result

    def _startBatch(self) -> None:
        jobs, self._batch = self._batch, []
        self._batchRunning = True
        d = self._run(_runFileBatch, self.root, self.owner, jobs, self.syncer.syncNow)
        d.addBoth(self._batchDone, jobs)

    def _batchDone(self, result: object, jobs: list) -> None:
        """
        A batch ended: note the markers renamed and the entries removed
        (whether or not the batch became durable: the files are as the
        work left them), then answer each job.  The jobs asked for
        meanwhile, those these answers add included, form the next batch.
        """
        if isinstance(result, Failure):
            outcomes: list = [result] * len(jobs)
            syncError: Optional[Failure] = None
        else:
            outcomes, error = cast(tuple, result)
            syncError = None if error is None else Failure(error)
        answers = []
        for job, outcome in zip(jobs, outcomes):
            failed = isinstance(outcome, Failure)
            if not failed:
                if job.newMarker is None:
                    self._markers.pop(job.queueId, None)
                    self._prefetched.pop(job.queueId, None)
                else:
                    self._markers[job.queueId] = job.newMarker
                    if outcome is not None:
                        self._prefetched[job.queueId] = outcome
            answers.append((job.result, outcome if failed else syncError))
        for d, failure in answers:
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure)
        self._batchRunning = False
        if self._batch:
            self._startBatch()

    def _removeFiles(self, queueId: str) -> defer.Deferred:
        """
        Unlink entry C{queueId}'s files, durably (in the next batch, see
        L{recordAttempt}).
        """
        self._prefetched.pop(queueId, None)
        return self._submit(_FileJob(queueId, self._markers.get(queueId), None))

    def removeEntry(self, entry: Entry) -> defer.Deferred:
        """
        Remove C{entry}'s files (the C{.json} first), after its writes in
        progress; durable once the Deferred fires.  Batched with the other
        removals and attempt records (see L{recordAttempt}).
        """
        queueId = entry.queueId
        return self._inOrder(queueId, lambda: self._removeFiles(queueId))

    def openMessage(self, entry: Entry):
        """
        @return: C{entry}'s message, a binary file open for reading: from
            memory the first time after an attempt record that read it
            (see L{recordAttempt}), else the file.
        @raise OSError: the file cannot be opened.
        """
        data = self._prefetched.pop(entry.queueId, None)
        if data is not None:
            return io.BytesIO(data)
        return open(os.path.join(self.root, entry.queueId + ".msg"), "rb")

    def readHeaders(self, entry: Entry) -> defer.Deferred:
        """
        @return: a Deferred firing with the header of C{entry}'s message
            (see L{pop3gw.dsn.originalHeaders}), or C{b""} if unreadable.
        """

        def read() -> bytes:
            try:
                with self.openMessage(entry) as f:
                    return originalHeaders(f.read(2 * 64 * 1024))
            except OSError:
                return b""

        return self._run(read)

    def flushStamp(self) -> Optional[int]:
        """
        @return: a value that changes each time C{pop3gw queue flush}
            (L{requestFlush}) asks for a flush (the C{.flush} file's
            modification time), or C{None} if none was ever asked.
        """
        try:
            return os.stat(os.path.join(self.root, FLUSH_FILE)).st_mtime_ns
        except OSError:
            return None
