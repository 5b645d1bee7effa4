# -*- test-case-name: tests.test_maildir -*-
"""
Maildir storage: the users' maildrops.

A user's maildrop is C{<root>/<domain>/<localpart>/} with the standard
C{cur}, C{new} and C{tmp} directories, plus C{pop3gw.lock}, the file a POP3
session holds an exclusive C{flock} on.

Stored messages have LF line ends, so other Maildir readers (mutt, Dovecot)
can use them.  POP3 sees messages in wire form: every line end (CRLF, LF,
or a bare CR in a file another tool wrote) as CRLF, and a final CRLF if the
file lacks one.  Both sizes are kept in the file name
(L{pop3gw.maildirfiles}), so a login costs one C{stat} per message, not a
read.

This module is the store and the POP3 side (lock, snapshot, commit);
deliveries are L{pop3gw.maildelivery}.  C{DELE} only marks;
L{MaildirMaildrop.commit} (the POP3 UPDATE state) unlinks.  Like Dovecot,
the commit also records which messages were retrieved: each gets the
standard Maildir C{S} (seen) flag in its C{:2,} info (a file in C{new} moves
to C{cur}), which never changes its UIDL, and POP3's C{LAST} starts from the
seen flags in the next session.

Blocking work runs through the store's L{IBlockingRunner} (the I/O thread
pool in the server).  Only a small existing maildrop (at most
L{QUICK_SNAPSHOT_ENTRIES} entries, every size in its file names, C{tmp} not
due for clean-up) is locked and snapshotted on the calling thread, and only
a commit with nothing to delete and a few flags to set is done there.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import functools
import mmap
import os
import re
import secrets
import socket
import stat
import sys
import time
import zlib
from array import array
from itertools import repeat
from typing import (
    BinaryIO,
    Callable,
    Iterable,
    Iterator,
    NamedTuple,
    Optional,
    Sequence,
    Union,
    overload,
)

import attr
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pop3gw import fsutil
from pop3gw.address import Address
from pop3gw.groupsync import DirectorySyncer
from pop3gw.interfaces import (
    IBlockingRunner,
    IMaildrop,
    IMaildropStore,
    IMessageColumns,
    IMessageInfo,
    MaildropLocked,
    PermanentFailure,
    TemporaryFailure,
)
from pop3gw.maildelivery import WRITE_BUFFER, MaildirDelivery, closeQuietly
from pop3gw.maildirfiles import (
    O_CLOEXEC,
    O_NOFOLLOW,
    READ_CHUNK,
    WireReader,
    _ParsedName,
    escapeHostname,
    isSeenName,
    parseName,
    seenName,
    uidForKey,
)
from pop3gw.maildirfiles import measureFile as _measureFile
from pop3gw.pop3import import readUidMap
from pop3gw.runner import ImmediateRunner
from pop3gw.tokens import tokenHex
from pop3gw.wire import WireConverter as _WireConverter

__all__ = [
    "LOCK_NAME",
    "READ_CHUNK",
    "WRITE_BUFFER",
    "MaildirDelivery",
    "MaildirMaildrop",
    "MaildirMessageInfo",
    "MaildirStore",
    "escapeHostname",
    "isSeenName",
    "parseName",
    "seenName",
    "uidForKey",
    "_WireConverter",
]

#: The file in a maildrop a POP3 session holds an exclusive C{flock} on.
LOCK_NAME = "pop3gw.lock"

#: Mode of the directories this module creates.
DIRECTORY_MODE = fsutil.DIRECTORY_MODE

#: Mode of the files this module creates.
FILE_MODE = fsutil.FILE_MODE

#: Hex digits of randomness in a unique name.
UNIQUE_RANDOM_HEX = 16

#: Most seen-flag renames a commit with nothing to delete does at once on
#: the reactor thread (for a maildrop that was small enough to be
#: snapshotted there); more go to the thread pool.
QUICK_FLAG_RENAMES = 64

#: Errors reading one message file that leave just that file out of a
#: snapshot (anything else, such as running out of descriptors, fails it).
_SKIPPABLE_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.EIO, errno.ELOOP})

_SUBDIRS = ("cur", "new", "tmp")
#: The subdirectory of a listed message, by its L{_Listing.inCur} value.
_LISTED_IN = ("new", "cur")
_LEADING_INTEGER = re.compile(r"[0-9]+")

_log = Logger()

_fsyncDirectory = fsutil.fsyncDirectory


#: A name as pop3gw and Dovecot write it, C{<unique>,S=<n>,W=<n>[:info]},
#: whose unique part is usable as it stands as the UIDL (1 to
#: L{pop3gw.maildirfiles.MAX_UID_LENGTH} characters in 0x21..0x7E, none a
#: comma or colon): the one kind a snapshot takes apart without
#: L{parseName}.
#: The groups: the leading digits of the unique part (perhaps empty), the
#: comma ending the unique part, the file size and the wire size.
_PLAIN_NAME = re.compile(
    r"(?=[\x21-\x2b\x2d-\x39\x3b-\x7e]{1,70},S=)([0-9]*)[^,]*(,)S=([0-9]+),W=([0-9]+)(?::.*)?", re.DOTALL
)


def _leadingInteger(text: str) -> int:
    match = _LEADING_INTEGER.match(text)
    return int(match.group()) if match else 0


# --- Maildrops --------------------------------------------------------------


@implementer(IMessageInfo)
class MaildirMessageInfo(NamedTuple):
    """
    One message of a snapshot (a named tuple: a large maildrop makes many,
    one at a time, and a tuple is the cheapest to make).

    @ivar size: octets in wire form.
    @ivar uid: the UIDL value.
    @ivar seen: whether the file name carried the C{S} flag.
    """

    size: int
    uid: str
    seen: bool = False


_newTuple = tuple.__new__

#: Matches a name carrying the C{S} flag (L{isSeenName}, as one C call).
_SEEN_NAME = re.compile(r"[^:]*:2,.*S", re.DOTALL)


@attr.s(auto_attribs=True, slots=True)
class _Entry:
    """
    Where one snapshotted message is, and its sizes: a view of one message
    of a L{_Listing}, made when the message is opened or committed.
    C{subdir} and C{name} follow the file if another tool renames it
    (flags) during the session.
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


class _Listing:
    """
    A snapshot's messages, oldest first, kept compact: a large maildrop
    costs a file name and a few octets per message, not an object.

    @ivar names: each message's file name.
    @ivar inCur: 1 where the file is in C{cur/}, 0 in C{new/}.
    @ivar seen: 1 where the file name carries the C{S} flag, else 0.
    @ivar fileSizes: octets on disk.
    @ivar wireSizes: octets in wire form.
    @ivar keyEnds: the length of the name's unique part, which is also its
        UIDL, or 0 where the unique part is in C{oddKeys}.
    @ivar oddKeys: index -> unique part, for the names whose unique part
        is not a prefix usable as the UIDL.
    """

    __slots__ = ("names", "inCur", "seen", "fileSizes", "wireSizes", "keyEnds", "oddKeys", "imported")

    def __init__(self) -> None:
        self.names: list[str] = []
        self.inCur = bytearray()
        self.seen = bytearray()
        self.fileSizes = array("q")
        self.wireSizes = array("q")
        self.keyEnds = array("B")
        self.oddKeys: dict[int, str] = {}
        #: UIDLs imported from another server, by unique part (see
        #: L{pop3gw.pop3import}).
        self.imported: dict[str, str] = {}

    def copy(self) -> "_Listing":
        """
        An independent copy (a cached listing is never changed by a
        session).
        """
        other = _Listing()
        other.names = list(self.names)
        other.inCur = bytearray(self.inCur)
        other.seen = bytearray(self.seen)
        other.fileSizes = array("q", self.fileSizes)
        other.wireSizes = array("q", self.wireSizes)
        other.keyEnds = array("B", self.keyEnds)
        other.oddKeys = dict(self.oddKeys)
        other.imported = dict(self.imported)
        return other

    def __len__(self) -> int:
        return len(self.names)

    def key(self, index: int) -> str:
        end = self.keyEnds[index]
        return self.names[index][:end] if end else self.oddKeys[index]

    def uid(self, index: int) -> str:
        if self.imported:
            imported = self.imported.get(self.key(index))
            if imported is not None:
                return imported
        end = self.keyEnds[index]
        return self.names[index][:end] if end else uidForKey(self.oddKeys[index])

    def entry(self, index: int) -> _Entry:
        return _Entry(
            _LISTED_IN[self.inCur[index]],
            self.names[index],
            self.key(index),
            self.fileSizes[index],
            self.wireSizes[index],
        )

    def update(self, index: int, entry: _Entry) -> None:
        """
        Record where C{entry} (message C{index}) was found again.
        """
        self.inCur[index] = entry.subdir == "cur"
        self.seen[index] = _SEEN_NAME.match(entry.name) is not None
        self.names[index] = entry.name


@implementer(IMessageColumns)
class _MessageList(Sequence[MaildirMessageInfo]):
    """
    L{MaildirMaildrop.messages}: a read-only sequence of
    L{MaildirMessageInfo}s, each made when asked for from the L{_Listing},
    whose columns also answer L{IMessageColumns} without an object per
    message.
    """

    __slots__ = ("_listing",)

    def __init__(self, listing: _Listing) -> None:
        self._listing = listing

    def __len__(self) -> int:
        return len(self._listing)

    def _info(self, index: int) -> MaildirMessageInfo:
        listing = self._listing
        return _newTuple(MaildirMessageInfo, (listing.wireSizes[index], listing.uid(index), bool(listing.seen[index])))

    @overload
    def __getitem__(self, index: int) -> MaildirMessageInfo: ...

    @overload
    def __getitem__(self, index: slice) -> list[MaildirMessageInfo]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._info(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._info(index)

    def __iter__(self) -> Iterator[MaildirMessageInfo]:
        # Made by C loops (map, zip), not a Python call per message: a
        # session goes through a large maildrop's listing a few times.
        listing = self._listing
        names = listing.names
        if listing.oddKeys or listing.imported:
            uids: Iterator[str] = map(listing.uid, range(len(names)))
        else:
            uids = map(str.__getitem__, names, map(slice, listing.keyEnds))
        seen = map(bool, listing.seen)
        return map(_newTuple, repeat(MaildirMessageInfo), zip(listing.wireSizes, uids, seen))

    def totalSize(self) -> int:
        """
        The sum of the wire sizes (a C loop over the column).
        """
        return sum(self._listing.wireSizes)

    def lastSeen(self) -> int:
        """
        The number of the last message flagged seen (a search of the
        column from its end).
        """
        return self._listing.seen.rfind(1) + 1

    def sizes(self, start: int, stop: int) -> Iterable[int]:
        return self._listing.wireSizes[start:stop]

    def uids(self, start: int, stop: int) -> Iterable[str]:
        listing = self._listing
        if listing.oddKeys or listing.imported:
            return map(listing.uid, range(start, stop))
        return map(str.__getitem__, listing.names[start:stop], map(slice, listing.keyEnds[start:stop]))


def _plainListing(names: list[str], numeric: bool, part: set[str], partIsNew: bool) -> _Listing:
    """
    The listing of a maildrop whose names are all plain (L{_PLAIN_NAME}),
    made with no object per message besides its name, so that a large
    one leaves no freed memory scattered between the names it keeps.

    @param names: the names (sorted in place).
    @param numeric: whether the leading numbers differ in length, so the
        names must be sorted by their value rather than as text.
    @param part: the names in C{new/} if C{partIsNew}, else those in
        C{cur/}.
    """
    plainMatch = _PLAIN_NAME.fullmatch
    if numeric:
        names.sort(key=lambda n: (_leadingInteger(n), n))
    else:
        names.sort()
    listing = _Listing()
    kept = listing.names
    addName, addInCur, addFileSize, addWireSize, addKeyEnd = (
        kept.append,
        listing.inCur.append,
        listing.fileSizes.append,
        listing.wireSizes.append,
        listing.keyEnds.append,
    )
    lastKey = None
    for name in names:
        match = plainMatch(name)
        keyEnd = match.start(2)  # type: ignore[union-attr]
        key = name[:keyEnd]
        if key == lastKey:
            # The same message in new/ and cur/ (they sort together).
            continue
        lastKey = key
        addName(name)
        addKeyEnd(keyEnd)
        addInCur((name in part) != partIsNew)
        addFileSize(int(match.group(3)))  # type: ignore[union-attr]
        addWireSize(int(match.group(4)))  # type: ignore[union-attr]
    _flagSeen(listing)
    return listing


def _flagSeen(listing: _Listing) -> None:
    """
    Fill C{listing.seen} from its names (once per listing, so that going
    through the messages needs no pattern match per message).
    """
    listing.seen = bytearray(map(bool, map(_SEEN_NAME.match, listing.names)))


def _snapshot(maildir: str, quick: bool = False) -> _Listing:
    """
    The messages of a locked maildrop, oldest first (by the leading number
    of their unique names, then the names), read from C{new} then C{cur}
    (so a message moved from one to the other meanwhile is seen at least
    once; the first name of a unique part is kept).

    Sizes come from the file names: a name carrying both (C{,S=} and
    C{,W=}) is trusted without a C{stat}, and regular files are told apart
    by the directory entry's type.  A file whose name lacks them is read
    once and renamed to carry them (moving it from C{new} to C{cur} with
    C{:2,} info).

    @param quick: raise L{_NotQuick} instead of reading any file, or on
        meeting more than L{QUICK_SNAPSHOT_ENTRIES} entries.
    """
    limit = QUICK_SNAPSHOT_ENTRIES if quick else None
    plainMatch = _PLAIN_NAME.fullmatch
    plainNames: list[str] = []
    others: list[tuple[int, str]] = []
    leadLengths: set[int] = set()
    count = 0
    inNew = 0
    for subdir in ("new", "cur"):
        with os.scandir(os.path.join(maildir, subdir)) as it:
            for dirEntry in it:
                count += 1
                if limit is not None and count > limit:
                    raise _NotQuick()
                name = dirEntry.name
                if name.startswith("."):
                    continue
                try:
                    if not dirEntry.is_file(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                plain = plainMatch(name)
                if plain is None:
                    others.append((int(subdir == "cur"), name))
                    continue
                leadLengths.add(plain.end(1))
                plainNames.append(name)
        if subdir == "new":
            inNew = len(plainNames)
    # Which plain names are in new/ (the smaller part is remembered).
    newFew = inNew <= len(plainNames) - inNew
    part = set(plainNames[:inNew] if newFew else plainNames[inNew:])
    if not others:
        return _plainListing(plainNames, len(leadLengths) > 1, part, newFew)
    # (leading number, name or unique part, 0/1 for new/cur, file size,
    # wire size, and the length of a plain name's unique part or an odd
    # name)
    found: list[tuple] = []
    for name in plainNames:
        lead, _, fileSize, wireSize = plainMatch(name).groups()  # type: ignore[union-attr]
        inCur = int((name in part) != newFew)
        found.append((int(lead or 0), name, inCur, int(fileSize), int(wireSize), name.index(",")))
    del plainNames, part
    for inCur, name in others:
        parsed = parseName(name)
        subdir = _LISTED_IN[inCur]
        if parsed.fileSize is not None and parsed.wireSize is not None:
            found.append((_leadingInteger(parsed.key), parsed.key, inCur, parsed.fileSize, parsed.wireSize, name))
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
        if parsed.renameable:
            newName = f"{parsed.key},S={fileSize},W={wireSize}{parsed.info or ':2,'}"
            try:
                os.rename(os.path.join(maildir, subdir, name), os.path.join(maildir, "cur", newName))
            except OSError:
                # Someone else renamed it meanwhile; _relocate finds it.
                pass
            else:
                inCur, name = 1, newName
        found.append((_leadingInteger(parsed.key), parsed.key, inCur, fileSize, wireSize, name))
    # Odd names sort by their unique part (the second field) and carry
    # their name in the last; a plain name is its own sort text.  No two
    # tuples agree on the first three fields (a name is unique in its
    # directory), so the rest is never compared.
    found.sort()
    listing = _Listing()
    names = listing.names
    addName, addInCur, addFileSize, addWireSize, addKeyEnd = (
        names.append,
        listing.inCur.append,
        listing.fileSizes.append,
        listing.wireSizes.append,
        listing.keyEnds.append,
    )
    # Plain names of one unique part sort next to each other (their unique
    # parts hold no comma), so comparing with the previous one finds every
    # duplicate; with odd names about, a set of the unique parts does.
    keys: Optional[set] = set() if others else None
    lastKey = None
    for _, text, inCur, fileSize, wireSize, odd in found:
        if type(odd) is int:
            # A plain name; odd is the length of its unique part.
            name, key, keyEnd = text, text[:odd], odd
        else:
            name, key, keyEnd = odd, text, 0
        if key == lastKey:
            continue
        if keys is not None:
            if key in keys:
                continue
            keys.add(key)
        lastKey = key
        if not keyEnd:
            listing.oddKeys[len(names)] = key
        addKeyEnd(keyEnd)
        addName(name)
        addInCur(inCur)
        addFileSize(fileSize)
        addWireSize(wireSize)
    _flagSeen(listing)
    return listing


#: Most message entries, over all maildrops, L{_ListingCache} keeps.
LISTING_CACHE_ENTRIES = 20000

#: How old (nanoseconds) the last change of C{new/} and C{cur/} must be
#: when they are listed for the listing to be kept: a change made within
#: the same tick of the file system's clock as an earlier one leaves the
#: directory's mtime as it was, so only a listing taken well after the last
#: change can be known complete by an unchanged mtime.
LISTING_SETTLED_NS = 2_000_000_000

#: How many large maildrops (more than L{QUICK_SNAPSHOT_ENTRIES} messages)
#: L{_ListingCache} remembers as such, to send their next login straight
#: to the thread pool.
LARGE_MAILDROPS_REMEMBERED = 4096

#: The file in a large maildrop holding its last settled listing (see
#: L{_ListingCache}).
INDEX_NAME = "pop3gw.index"

#: Fewest messages a listing must have to be written to L{INDEX_NAME}
#: (smaller ones are kept in memory, or listed again).
INDEX_MIN_ENTRIES = QUICK_SNAPSHOT_ENTRIES

#: The first line of an index, ending with its format version.
_INDEX_MAGIC = b"pop3gw-listing-index 1\n"

#: Fields of an index's second line: the stamp of L{_directoryStamp} (8 numbers),
#: the message count, the lengths of the names and odd keys sections, and
#: the CRC-32 of everything after that line.
_INDEX_FIELDS = 12

def _directoryStamp(maildir: str) -> Optional[tuple[int, ...]]:
    """
    The directory times and identities a listing of C{maildir} is valid
    for (its stamp): C{st_dev}, C{st_ino}, C{st_mtime_ns} and
    C{st_ctime_ns} of C{new/}, then of C{cur/}.  Every creation, removal or
    rename of an entry moves its directory's mtime and ctime, and nothing
    can set a ctime back.

    @return: the stamp, or C{None} if the system does not tell the times in
        nanoseconds.
    """
    new = os.stat(os.path.join(maildir, "new"))
    cur = os.stat(os.path.join(maildir, "cur"))
    if None in (new.st_mtime_ns, new.st_ctime_ns, cur.st_mtime_ns, cur.st_ctime_ns):
        return None
    return (
        new.st_dev,
        new.st_ino,
        new.st_mtime_ns,
        new.st_ctime_ns,
        cur.st_dev,
        cur.st_ino,
        cur.st_mtime_ns,
        cur.st_ctime_ns,
    )


def _settled(stamp: tuple[int, ...], now: int) -> bool:
    """
    @return: whether both directories of C{stamp} were last changed at
        least L{LISTING_SETTLED_NS} before C{now} (nanoseconds).
    """
    return max(stamp[2], stamp[3], stamp[6], stamp[7]) < now - LISTING_SETTLED_NS


def _littleEndian(values: array) -> bytes:
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = array(values.typecode, values)
    swapped.byteswap()
    return swapped.tobytes()


#: Width of an index's second line (the numbers, padded with spaces), which
#: is written last, once the checksum is known.
_INDEX_HEADER_WIDTH = 256

#: Names encoded (and decoded) at a time when an index is written (read):
#: no buffer the size of the whole index is ever made, which the allocator
#: would keep after it is freed.
_INDEX_NAMES_AT_ONCE = 1024

#: Octets of names decoded at a time when an index is read.
_INDEX_DECODE_CHUNK = 65536


def _writeIndexFile(f: BinaryIO, stamp: tuple[int, ...], listing: _Listing) -> None:
    """
    Write the index file of C{listing}, taken when the directories had
    C{stamp}, to C{f} (empty, seekable).

    After L{_INDEX_MAGIC} comes a line of L{_INDEX_FIELDS} decimal numbers
    (padded to L{_INDEX_HEADER_WIDTH}), then the names joined by NUL, the
    odd keys (index and key, each ending with NUL), then per message one
    octet of C{inCur}, of C{seen} and of C{keyEnds}, eight (little-endian)
    of the file size and eight of the wire size.
    """
    f.write(_INDEX_MAGIC + b" " * _INDEX_HEADER_WIDTH + b"\n")
    crc = 0
    namesLength = 0
    names = listing.names
    for start in range(0, len(names), _INDEX_NAMES_AT_ONCE):
        piece = "\0".join(names[start : start + _INDEX_NAMES_AT_ONCE]).encode("utf-8", "surrogateescape")
        if start:
            piece = b"\0" + piece
        crc = zlib.crc32(piece, crc)
        namesLength += len(piece)
        f.write(piece)
    odd = "".join(f"{i}\0{k}\0" for i, k in sorted(listing.oddKeys.items())).encode("utf-8", "surrogateescape")
    columns = [
        odd,
        bytes(listing.inCur),
        bytes(listing.seen),
        listing.keyEnds.tobytes(),
        _littleEndian(listing.fileSizes),
        _littleEndian(listing.wireSizes),
    ]
    for column in columns:
        crc = zlib.crc32(column, crc)
        f.write(column)
    del columns
    fields = (*stamp, len(listing), namesLength, len(odd), crc)
    header = b" ".join(b"%d" % (value,) for value in fields)
    f.seek(len(_INDEX_MAGIC))
    f.write(header.ljust(_INDEX_HEADER_WIDTH))


def _decodeIndex(data: Union[bytes, mmap.mmap], stamp: tuple[int, ...]) -> Optional[_Listing]:
    """
    @param data: the contents of an index file (see L{_writeIndexFile}).
    @return: the listing in C{data}, or C{None} if it is of another format,
        damaged, or for other directory times than C{stamp}.
    """
    start = len(_INDEX_MAGIC)
    end = start + _INDEX_HEADER_WIDTH
    if len(data) <= end or data[:start] != _INDEX_MAGIC or data[end : end + 1] != b"\n":
        return None
    try:
        fields = [int(f) for f in data[start:end].split()]
    except ValueError:
        return None
    if len(fields) != _INDEX_FIELDS or tuple(fields[:8]) != stamp:
        return None
    count, namesLength, oddLength, crc = fields[8:]
    bodyStart = end + 1
    if count < 1 or len(data) - bodyStart != namesLength + oddLength + 19 * count:
        return None
    with memoryview(data) as view:
        if zlib.crc32(view[bodyStart:]) != crc:
            return None
        listing = _Listing()
        names = listing.names
        at = bodyStart
        namesEnd = bodyStart + namesLength
        while at < namesEnd:
            cut = namesEnd
            if at + _INDEX_DECODE_CHUNK < namesEnd:
                cut = data.rfind(b"\0", at, at + _INDEX_DECODE_CHUNK)
                if cut < 0:
                    cut = data.find(b"\0", at, namesEnd)
                    if cut < 0:
                        cut = namesEnd
            names.extend(str(view[at:cut], "utf-8", "surrogateescape").split("\0"))
            at = cut + 1
        if len(names) != count:
            return None
        at = namesEnd
        if oddLength:
            odd = str(view[at : at + oddLength], "utf-8", "surrogateescape").split("\0")
            try:
                listing.oddKeys = {int(odd[i]): odd[i + 1] for i in range(0, len(odd) - 1, 2)}
            except ValueError:
                return None
        at += oddLength
        listing.inCur = bytearray(view[at : at + count])
        at += count
        listing.seen = bytearray(view[at : at + count])
        at += count
        listing.keyEnds.frombytes(view[at : at + count])
        at += count
        for sizes in (listing.fileSizes, listing.wireSizes):
            sizes.frombytes(view[at : at + 8 * count])
            if sys.byteorder != "little":
                sizes.byteswap()
            at += 8 * count
    return listing


def _readIndex(maildir: str, stamp: tuple[int, ...]) -> tuple[Optional[_Listing], bool]:
    """
    The listing in C{maildir}'s L{INDEX_NAME}, if it is sound and was taken
    with the directories at C{stamp}.  The file is mapped, not read, so no
    buffer of its size is allocated.

    @return: that listing or C{None}, and whether an index file exists.
    """
    try:
        fd = os.open(os.path.join(maildir, INDEX_NAME), os.O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
    except OSError:
        return None, False
    try:
        size = os.fstat(fd).st_size
        if size <= len(_INDEX_MAGIC) + _INDEX_HEADER_WIDTH:
            return None, True
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as data:
            return _decodeIndex(data, stamp), True
    except (OSError, ValueError):
        return None, True
    finally:
        os.close(fd)


def _writeIndex(maildir: str, stamp: tuple[int, ...], listing: _Listing, owner: Optional[fsutil.Owner]) -> None:
    """
    Replace C{maildir}'s L{INDEX_NAME} with C{listing} (taken with the
    directories at C{stamp}): written in C{tmp/} and renamed into place, not
    fsynced (a crash leaves an old index, which the directories' times no
    longer match, or a damaged one, which its checksum refuses).  Best
    effort: a failure is logged and changes nothing else.
    """
    tmp = os.path.join(maildir, "tmp", f"{INDEX_NAME}.{os.getpid()}.{secrets.token_hex(6)}")
    try:
        fd = fsutil.createFile(tmp, owner)
        try:
            with os.fdopen(fd, "wb") as f:
                _writeIndexFile(f, stamp, listing)
            os.rename(tmp, os.path.join(maildir, INDEX_NAME))
        except BaseException:
            fsutil.unlinkIfThere(tmp)
            raise
    except OSError as e:
        _log.warn("Could not write the listing index of {path}: {error}", path=maildir, error=e.strerror)


def _removeIndex(maildir: str) -> None:
    try:
        fsutil.unlinkIfThere(os.path.join(maildir, INDEX_NAME))
    except OSError as e:
        _log.warn("Could not remove the listing index of {path}: {error}", path=maildir, error=e.strerror)


class _ListingCache:
    """
    The last settled listings of maildrops, each kept with the
    stamp (L{_directoryStamp}) of C{new/} and C{cur/} it was taken at, so that a
    login to a maildrop nothing was delivered to, removed from or renamed in
    since costs two C{stat} calls instead of listing its directories: small
    maildrops in memory, large ones in the maildrop's L{INDEX_NAME} file
    (like Dovecot's index, which other processes and restarts can use).

    Every creation, removal or rename of a message changes its directory's
    mtime and ctime; a message file is never rewritten in place (Maildir),
    and if another tool does so anyway, L{MaildirMaildrop.openMessage} sees
    the size differ and refuses it.  A listing is kept only if both
    directories were last changed L{LISTING_SETTLED_NS} before it was taken
    (a change within the same tick of the file system's clock could
    otherwise go unseen) and had not changed when it was done.  In memory:
    maildrops of at most L{QUICK_SNAPSHOT_ENTRIES} messages, at most
    L{LISTING_CACHE_ENTRIES} messages in all (the maildrops used least
    recently are forgotten first).  In an index: listings of more than
    L{INDEX_MIN_ENTRIES} messages, taken in the thread pool; an index of
    other times, of another format or damaged is never used, and is
    replaced by the next settled listing.

    @param owner: given the index files written (see L{pop3gw.fsutil}).
    """

    def __init__(self, owner: Optional[fsutil.Owner] = None) -> None:
        self._listings: collections.OrderedDict[str, tuple[tuple[int, ...], _Listing]] = collections.OrderedDict()
        self._size = 0
        self._owner = owner
        # Maildrop -> the stamp at which it was too large for a quick
        # snapshot.
        self._large: collections.OrderedDict[str, tuple[int, ...]] = collections.OrderedDict()
        #: The current time in nanoseconds since the epoch (as the file
        #: system's times).
        self.now: Callable[[], int] = time.time_ns

    def snapshot(self, maildir: str, quick: bool) -> _Listing:
        """
        L{_snapshot} of C{maildir} (locked by the caller), from the memory
        or the index when the directories are unchanged.
        """
        stamp = _directoryStamp(maildir)
        if stamp is None:
            return _snapshot(maildir, quick)
        cached = self._listings.get(maildir)
        if cached is not None:
            if cached[0] == stamp:
                self._listings.move_to_end(maildir)
                return cached[1].copy()
            self._forget(maildir)
        if quick and self._large.get(maildir) == stamp:
            raise _NotQuick()
        indexed = False
        if not quick:
            listing, indexed = _readIndex(maildir, stamp)
            if listing is not None:
                self._markLarge(maildir, stamp, listing)
                return listing
        listing = _snapshot(maildir, quick)
        self._markLarge(maildir, stamp, listing)
        if not _settled(stamp, self.now()) or _directoryStamp(maildir) != stamp:
            return listing
        if len(listing) <= QUICK_SNAPSHOT_ENTRIES:
            self._remember(maildir, stamp, listing)
        if not quick:
            if len(listing) > INDEX_MIN_ENTRIES:
                _writeIndex(maildir, stamp, listing, self._owner)
            elif indexed:
                _removeIndex(maildir)
        return listing

    def _markLarge(self, maildir: str, stamp: tuple[int, ...], listing: _Listing) -> None:
        """
        Remember whether C{listing}, taken at C{stamp}, is too large for a
        snapshot on the reactor thread, so that the next login goes to the
        thread pool at once instead of listing part of it first.
        """
        if len(listing) > QUICK_SNAPSHOT_ENTRIES:
            self._large[maildir] = stamp
            self._large.move_to_end(maildir)
            if len(self._large) > LARGE_MAILDROPS_REMEMBERED:
                self._large.popitem(last=False)
        else:
            self._large.pop(maildir, None)

    def _remember(self, maildir: str, stamp: tuple[int, ...], listing: _Listing) -> None:
        self._listings[maildir] = (stamp, listing.copy())
        self._size += len(listing)
        while self._size > LISTING_CACHE_ENTRIES:
            oldest = next(iter(self._listings))
            self._forget(oldest)

    def _forget(self, maildir: str) -> None:
        _, listing = self._listings.pop(maildir)
        self._size -= len(listing)


@implementer(IMaildrop)
class MaildirMaildrop:
    """
    One POP3 session's locked snapshot of a maildrop.

    @ivar path: the maildrop directory.
    @ivar messages: L{MaildirMessageInfo}s, oldest first (a sequence that
        makes each when asked for).
    """

    def __init__(
        self,
        path: str,
        lockFD: int,
        listing: _Listing,
        runner: IBlockingRunner,
        quick: bool = False,
        uids: Optional[dict] = None,
    ) -> None:
        """
        @param runner: runs blocking work.
        @param uids: UIDLs imported from another server, by unique name
            (see L{pop3gw.pop3import}); the others are the unique names.
        @param quick: whether the snapshot was taken on the reactor thread
            (the maildrop is small), so a few flag renames may be too.
        """
        self.path = path
        self._lockFD: Optional[int] = lockFD
        self._listing = listing
        self._runner = runner
        self._quick = quick
        self._state = "open"
        if uids:
            listing.imported = uids
        self.messages = _MessageList(listing)

    def keys(self) -> list[str]:
        """
        The Maildir unique names of the messages, in POP3 order.
        """
        listing = self._listing
        return [listing.key(i) for i in range(len(listing))]

    def keysAndRelease(self) -> list[str]:
        """
        L{keys}, then L{release}.
        """
        try:
            return self.keys()
        finally:
            self.release()

    def _entry(self, index: int) -> _Entry:
        if not 0 <= index < len(self._listing):
            raise IndexError(index)
        return self._listing.entry(index)

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

    def _forgetSizes(self, entry: _Entry) -> None:
        """
        Take the sizes out of the name of C{entry}'s file, which disagree
        with the file (they are trusted without a C{stat} at login): the
        next login measures it.  The unique part, hence the UIDL, stays.
        Best effort: the file may have been renamed meanwhile.
        """
        parsed = parseName(entry.name)
        if not parsed.renameable or parsed.fileSize is None:
            return
        try:
            os.rename(self._entryPath(entry), os.path.join(self.path, entry.subdir, parsed.key + parsed.info))
        except OSError as e:
            _log.warn("Could not rename {name}, whose size changed: {error}", name=entry.name, error=e.strerror)

    def _entryPath(self, entry: _Entry) -> str:
        return os.path.join(self.path, entry.subdir, entry.name)

    def openMessage(self, index: int) -> defer.Deferred:
        """
        Open message C{index} at once: a local file opens without blocking
        for long.

        @return: a C{Deferred} already fired with a binary file-like object
            streaming message C{index} in wire form, or failed with
            L{TemporaryFailure} (the file vanished, changed size, or cannot
            be read, or the maildrop is no longer locked) or C{IndexError}.
        """
        try:
            return defer.succeed(self._openFile(index))
        except Exception:
            return defer.fail()

    def _openFile(self, index: int) -> WireReader:
        listing = self._listing
        if not 0 <= index < len(listing):
            raise IndexError(index)
        if self._state != "open":
            raise TemporaryFailure("maildrop is not locked")
        flags = os.O_RDONLY | O_CLOEXEC | O_NOFOLLOW
        # The entry is made only if the file must be found again.
        entry: Optional[_Entry] = None
        try:
            try:
                fd = os.open(f"{self.path}/{_LISTED_IN[listing.inCur[index]]}/{listing.names[index]}", flags)
            except FileNotFoundError:
                entry = listing.entry(index)
                if not self._relocate(entry):
                    raise
                fd = os.open(self._entryPath(entry), flags)
                listing.update(index, entry)
        except FileNotFoundError:
            raise TemporaryFailure("message vanished") from None
        except OSError as e:
            raise TemporaryFailure(f"cannot open message: {e.strerror}") from e
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            os.close(fd)
            raise TemporaryFailure(f"cannot stat message: {e.strerror}") from e
        if size != listing.fileSizes[index]:
            os.close(fd)
            self._forgetSizes(entry if entry is not None else listing.entry(index))
            raise TemporaryFailure("message changed during the session")
        return WireReader(fd, size)

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

        @return: a C{Deferred} firing with C{None} once done, or failing
            with L{TemporaryFailure} (some could not be removed, or the
            maildrop was already released; the lock is released anyway) or
            C{IndexError} (an index is out of range; nothing is changed and
            the lock is released).
        """
        if self._state != "open":
            return defer.fail(TemporaryFailure("maildrop is not locked"))
        deleted = set(deleted)
        try:
            entries = [self._entry(i) for i in sorted(deleted)]
            # Messages already flagged need no rename.
            flagged = [e for e in (self._entry(i) for i in sorted(set(seen) - deleted)) if not isSeenName(e.name)]
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

    def _doCommit(self, entries: list, flagged: Sequence = ()) -> None:
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
        closeQuietly(fd)

    def release(self) -> None:
        """
        Release the lock without deleting anything.  Idempotent; does
        nothing while a commit is running (the commit releases).
        """
        if self._state == "open":
            self._unlock()


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
        L{pop3gw.runner.ImmediateRunner} (the CLI) if C{None}.
    @param hostname: for unique names; defaults to C{socket.gethostname()}.
    @param owner: the data directory's owner, given every directory and
        file the store creates (see L{pop3gw.fsutil}); C{None} leaves them
        to this process.
    @ivar syncer: the L{DirectorySyncer} every delivery's commit goes
        through (group commit of the C{new} directories' C{fsync}s).
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
        self.syncer = DirectorySyncer(self._runner)
        self._hostname = escapeHostname(hostname if hostname is not None else socket.gethostname())
        self._counter = 0
        self._now: Callable[[], float] = time.time
        # Maildrop path -> when its tmp/ was last cleaned by this process.
        self._tmpCleaned: dict = {}
        self._listings = _ListingCache(owner)

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
            f"R{tokenHex(UNIQUE_RANDOM_HEX // 2)}.{self._hostname}"
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
        # The quick path looks for tmp/ only: the listing's stamp, taken
        # once the lock is held, stats new/ and cur/ anyway, and a missing
        # one sends the login to the pool path, which creates it.
        if quick and (self._tmpCleanDue(path) or not os.path.isdir(os.path.join(path, "tmp"))):
            raise _NotQuick()
        try:
            if not quick:
                self._ensureMaildir(path)
            fd = fsutil.openLockFile(os.path.join(path, LOCK_NAME), self.owner)
        except OSError as e:
            if quick:
                # Removed meanwhile, say: the pool path creates it again.
                raise _NotQuick() from None
            raise TemporaryFailure(f"cannot open maildrop: {e.strerror}") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MaildropLocked(str(address)) from None
            listing = self._listings.snapshot(path, quick)
            uids = readUidMap(path)
        except OSError as e:
            os.close(fd)
            if quick:
                # new/ or cur/ missing, say: the pool path completes the
                # maildrop, or says what is wrong.
                raise _NotQuick() from None
            raise TemporaryFailure(f"cannot read maildrop: {e.strerror}") from e
        except BaseException:
            os.close(fd)
            raise
        if self._tmpCleanDue(path):
            now = self._now()
            self._tmpCleaned[path] = now
            _cleanTmp(path, now)
        return MaildirMaildrop(path, fd, listing, self._runner, quick, uids)

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

        @return: a C{Deferred} firing with a L{MaildirMaildrop}, or failing
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

    def _createDeliveryFile(self, maildir: str, tmpPath: str) -> int:
        """
        Create the tmp file C{tmpPath} in C{maildir}, creating the maildrop
        first if its C{tmp} is missing.  Blocking: runs through the runner.

        The file is created at once, without looking for the maildrop's
        directories first (three C{stat} calls per delivery, nearly always
        for nothing); a missing C{new} is completed when the message is
        moved there (see L{MaildirDelivery}'s C{complete}).

        @return: the tmp file's descriptor.
        @raise TemporaryFailure: the maildrop or the file cannot be created.
        """
        try:
            try:
                return fsutil.createFile(tmpPath, self.owner)
            except FileNotFoundError:
                self._ensureMaildir(maildir)
                return fsutil.createFile(tmpPath, self.owner)
        except OSError as e:
            raise TemporaryFailure.fromOSError("cannot start delivery", e) from e

    def beginDelivery(self, recipients: Sequence[Address], trace: bytes = b"") -> MaildirDelivery:
        """
        Start delivering one message to C{recipients} (duplicates count
        once).

        Nothing is created yet: the tmp file (and the first recipient's
        maildrop, if missing) is created through the runner, by the commit's
        one job for a message smaller than L{WRITE_BUFFER}, else once the
        message outgrows it (see L{MaildirDelivery}); the other recipients'
        maildrops, if missing, when the message is linked into them.

        @raise TemporaryFailure: a maildrop cannot be created or written
            (with a runner that works at once, the first write that creates
            the file or L{IDelivery.commit} reports it; through a thread
            pool, L{IDelivery.commit}).
        @raise PermanentFailure: an address maps outside C{root}.
        @raise ValueError: no recipients.
        """
        unique = list(dict.fromkeys(recipients))
        if not unique:
            raise ValueError("no recipients")
        maildirs = [self.maildirPath(r) for r in unique]
        name = self._uniqueName()
        tmpPath = os.path.join(maildirs[0], "tmp", name)
        delivery = MaildirDelivery(
            maildirs,
            name,
            self._runner,
            self.owner,
            self.syncer,
            functools.partial(self._createDeliveryFile, maildirs[0], tmpPath),
            self._ensureMaildir,
        )
        if trace:
            delivery.write(trace)
        return delivery
