# -*- test-case-name: tests.test_wire -*-
"""
The message format shared by the listeners and the stores: line-end
conversions and the default message size limit.

Three forms of a message meet in pop3gw: what a client sends (CRLF line
ends, a bare LF tolerated), what the queue stores and the relay sends (CRLF,
L{toCRLF}/L{CRLFStream}), and what a maildrop stores (LF, L{LFNormalizer}),
read back by POP3 in wire form (L{WireConverter}).
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "CRLFStream", "LFNormalizer", "MessageDataCheck", "WireConverter", "toCRLF"]

#: The largest message accepted by default, in octets (C{max-message-size}).
DEFAULT_MAX_MESSAGE_SIZE = 40 * 1024 * 1024

_BARE_LF = re.compile(rb"(?<!\r)\n")


def toCRLF(data: bytes) -> bytes:
    """
    @return: C{data} with every bare LF (an LF without a CR before it) made
        CRLF; CRLF and bare CRs are left alone.
    """
    return _BARE_LF.sub(b"\r\n", data)


class CRLFStream:
    """
    L{toCRLF} over data that arrives in chunks: a CR at the end of one chunk
    and an LF at the start of the next are one CRLF.
    """

    def __init__(self) -> None:
        self._lastCR = False

    def feed(self, chunk: bytes) -> bytes:
        """
        @return: C{chunk} converted.
        """
        if not chunk:
            return b""
        if self._lastCR and chunk[:1] == b"\n":
            out = b"\n" + toCRLF(chunk[1:])
        else:
            out = toCRLF(chunk)
        self._lastCR = out.endswith(b"\r")
        return out


class CRLFToLF:
    """
    C{data.replace(b"\\r\\n", b"\\n")} over data that arrives in chunks: a
    CR at the end of one chunk is held until the next shows whether an LF
    follows it.  Bare CRs are kept.
    """

    def __init__(self) -> None:
        self._heldCR = False

    def feed(self, chunk: bytes) -> bytes:
        """
        @return: C{chunk} converted (without a CR it ends with, held); may
            be empty.
        """
        if self._heldCR:
            chunk = b"\r" + chunk
        self._heldCR = chunk.endswith(b"\r")
        if self._heldCR:
            chunk = chunk[:-1]
        return chunk.replace(b"\r\n", b"\n")

    def finish(self) -> bytes:
        """
        @return: the CR held at the end of the data, if any.
        """
        held, self._heldCR = self._heldCR, False
        return b"\r" if held else b""


class LFNormalizer:
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
        if b"\r" in chunk:
            self._skipLF = chunk[-1:] == b"\r"
            out = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            # The common case (a stored message has LF line ends): one scan.
            self._skipLF = False
            out = chunk
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


class WireConverter:
    """
    Streaming conversion to wire form (every line end CRLF, final CRLF added
    if missing), the same result as L{pop3gw.testing.wireForm} on the whole.
    """

    def __init__(self) -> None:
        self._normalizer = LFNormalizer()

    def feed(self, chunk: bytes) -> bytes:
        return self._normalizer.feed(chunk).replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        return self._normalizer.finish().replace(b"\n", b"\r\n")


# What a stored message may not hold: a CR not followed by LF, or a NUL.
_BAD_DATA = re.compile(rb"\r(?!\n)|\x00")


class MessageDataCheck:
    """
    Finds a bare CR (a CR not followed by LF) or a NUL in a message given
    in chunks, wherever the chunk boundaries fall: a CR that ends one chunk
    is judged by the next one, or by L{finish}.
    """

    def __init__(self) -> None:
        self._pendingCR = False

    def feed(self, data: bytes) -> Optional[str]:
        """
        @return: what is wrong with the message so far (C{"NUL octet"} or
            C{"bare CR (a CR not followed by LF)"}), or C{None}.
        """
        if not data:
            return None
        if self._pendingCR and data[:1] != b"\n":
            return _BARE_CR
        self._pendingCR = data[-1:] == b"\r"
        bad = _BAD_DATA.search(data, 0, len(data) - 1 if self._pendingCR else len(data))
        if bad is None:
            return None
        return "NUL octet" if bad.group() == b"\x00" else _BARE_CR

    def finish(self) -> Optional[str]:
        """
        @return: what is wrong with the end of the message, or C{None}.
        """
        return _BARE_CR if self._pendingCR else None


_BARE_CR = "bare CR (a CR not followed by LF)"
