# -*- test-case-name: tests.test_maildir -*-
"""
Maildir message files: their names (unique name, sizes, flags, UIDL) and
reading them in wire form.

Both sizes of a message are kept in its file name the Dovecot way,
C{<unique>,S=<file size>,W=<wire size>}, so a login costs one C{stat} per
message, not a read.  The C{S} (seen) flag is the standard Maildir one, in
the C{:2,} info, which never changes the UIDL.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from typing import Any, NamedTuple, Optional

from pop3gw.wire import WireConverter

#: Octets read from a message file at a time.
READ_CHUNK = 256 * 1024

#: Longest UIDL value allowed by RFC 1939.
MAX_UID_LENGTH = 70

#: Hex digits of the SHA-256 digest used as UIDL for unusable unique names.
UID_DIGEST_LENGTH = 40

#: What follows the C{:} of a Maildir name whose info is flags (info with
#: "experimental semantics", C{:1,}, is left alone).
_FLAGS_PREFIX = "2,"

#: The Maildir flag of a message that has been read.
_SEEN_FLAG = "S"

_SIZE_FIELD = re.compile(r"([SW])=([0-9]+)")
# The name pop3gw itself writes: "<unique>,S=<n>,W=<n>" (parsed fast).
_OWN_BASE = re.compile(r"([^,]+),S=([0-9]+),W=([0-9]+)")
_UID_CHARS = re.compile(r"[\x21-\x7e]{1,%d}" % (MAX_UID_LENGTH,))

#: Flags of C{open} for reading a message file.
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# --- Reading ----------------------------------------------------------------


class WireReader(io.RawIOBase):
    """
    A raw, read-only stream of a message file in wire form.  Memory stays
    bounded by a few L{READ_CHUNK}s whatever the message size.

    @param size: the file's size when it was opened, if known: no more is
        read, so the end is known without one more C{read} call.
    """

    def __init__(self, fd: int, size: Optional[int] = None) -> None:
        super().__init__()
        self._fd = fd
        self._left = size
        self._converter = WireConverter()
        self._pending = b""
        self._offset = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    @property
    def exhausted(self) -> bool:
        """
        Whether the whole message has been read, so that the next C{read}
        returns C{b""} (known as soon as the last octets are handed out
        when the size was given).
        """
        return self._eof and self._offset >= len(self._pending)

    def _fill(self) -> bool:
        """
        Make sure converted octets are pending.

        @return: C{False} at the end of the message.
        """
        while self._offset >= len(self._pending):
            if self._eof:
                return False
            if self._left is None:
                chunk = os.read(self._fd, READ_CHUNK)
            elif self._left > 0:
                chunk = os.read(self._fd, min(READ_CHUNK, self._left))
                self._left -= len(chunk)
            else:
                chunk = b""
            if chunk:
                self._pending = self._converter.feed(chunk)
                if self._left == 0:
                    # The whole file is read: the end is known now, without
                    # another call (see L{exhausted}).
                    self._pending += self._converter.finish()
                    self._eof = True
            else:
                self._pending = self._converter.finish()
                self._eof = True
            self._offset = 0
        return True

    def read(self, size: Optional[int] = -1) -> bytes:
        """
        Read up to C{size} octets (all that is left if C{size} is negative
        or C{None}).  A whole converted chunk is handed out as it is, without
        the copies a buffered reader would make.

        @return: the octets; C{b""} at the end of the message.
        """
        if size is None or size < 0:
            return self.readall()
        if size == 0 or not self._fill():
            return b""
        start = self._offset
        if start == 0 and len(self._pending) <= size:
            self._offset = len(self._pending)
            return self._pending
        self._offset = min(len(self._pending), start + size)
        return self._pending[start : self._offset]

    def readall(self) -> bytes:
        """
        @return: the rest of the message.
        """
        pieces: list[bytes] = []
        while True:
            piece = self.read(READ_CHUNK)
            if not piece:
                return b"".join(pieces)
            pieces.append(piece)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not self._fill():
            return 0
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


def measureFile(path: str) -> tuple[int, int]:
    """
    Read a message file once.

    @return: its size on disk and its size in wire form.
    """
    converter = WireConverter()
    fileSize = wireSize = 0
    fd = os.open(path, os.O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
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


class _ParsedName(NamedTuple):
    """
    A Maildir file name taken apart (a named tuple: one is made per
    message at every login, and a tuple is the cheapest value to make).

    @ivar key: the unique name without C{,S=} and C{,W=} fields or info: the
        source of the UIDL.
    @ivar fileSize: the C{S=} value, or C{None}.
    @ivar wireSize: the C{W=} value, or C{None}.
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

    @return: the new name, or C{None} if there is nothing to do (already
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
