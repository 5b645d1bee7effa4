# -*- test-case-name: tests.test_pop3transfer,tests.test_pop3 -*-
"""
POP3 message streaming: RETR and TOP (RFC 1939).

L{_MessageSender} streams one message from L{IMaildrop.openMessage
<pop3gw.interfaces.IMaildrop.openMessage>} in chunks while the transport
accepts them, dot-stuffed across chunk boundaries (L{_DotStuffer}) and, for
TOP, cut after the header and the asked number of body lines
(L{_TopFilter}).
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.python.failure import Failure

#: Octets read from a message file at a time when streaming it.
READ_CHUNK_SIZE = 262144

#: Largest last piece of a message sent in the same write as the end of the
#: response (a copy of a small piece costs less than one more write).
MERGED_END_SIZE = 65536


class _DotStuffer:
    """
    Dot-stuffs a byte stream delivered in arbitrary chunks: every line that
    begins with C{"."} gets a second one, wherever the chunk boundaries
    fall.

    @ivar atLineStart: whether the next octet begins a line.
    """

    def __init__(self) -> None:
        self.atLineStart = True

    def stuff(self, chunk: bytes) -> bytes:
        """
        @return: C{chunk}, stuffed.
        """
        if not chunk:
            return chunk
        out = chunk.replace(b"\n.", b"\n..")
        if self.atLineStart and out[:1] == b".":
            out = b"." + out
        self.atLineStart = chunk.endswith(b"\n")
        return out


class _TopFilter:
    """
    Cuts a message stream after its header, the blank line and C{lines}
    body lines (the POP3 C{TOP} command), whatever the chunk boundaries.
    """

    def __init__(self, lines: int) -> None:
        self._inHeader = True
        self._bodyLeft = lines
        self._lineHasContent = False
        self.done = False

    def _finished(self) -> bool:
        return not self._inHeader and self._bodyLeft <= 0

    def feed(self, chunk: bytes) -> bytes:
        """
        @return: the part of C{chunk} to send; L{done} is set once the rest
            of the message is not needed.
        """
        if self.done:
            return b""
        if self._finished():
            self.done = True
            return b""
        out = []
        i = 0
        n = len(chunk)
        while i < n:
            j = chunk.find(b"\n", i)
            if j == -1:
                if chunk[i:].strip(b"\r"):
                    self._lineHasContent = True
                out.append(chunk[i:])
                break
            if chunk[i:j].strip(b"\r"):
                self._lineHasContent = True
            out.append(chunk[i : j + 1])
            i = j + 1
            if self._inHeader:
                if not self._lineHasContent:
                    self._inHeader = False
            else:
                self._bodyLeft -= 1
            self._lineHasContent = False
            if self._finished():
                self.done = True
                break
        return b"".join(out)


class _MessageSender:
    """
    Streams one message (or its top) to a transport: reads C{chunkSize}
    octets at a time while not paused, dot-stuffs them and ends with the
    C{.} line.  The server's L{pop3gw.flow.OutputFlow} pauses and resumes it.

    C{onSent(n)} is called for every piece written with its length in
    message octets (wire form, before dot-stuffing), so a transfer cut
    short still counts what went out.
    """

    def __init__(
        self,
        transport,
        source,
        topLines: Optional[int],
        onDone: Callable[["_MessageSender", Optional[Failure]], None],
        onProgress: Callable[[], None],
        onSent: Callable[[int], None],
        chunkSize: int = READ_CHUNK_SIZE,
    ) -> None:
        self._transport = transport
        self._source = source
        self._top = _TopFilter(topLines) if topLines is not None else None
        self._onDone = onDone
        self._onProgress = onProgress
        self._onSent = onSent
        self._chunkSize = chunkSize
        self._stuffer = _DotStuffer()
        self._paused = False
        self._running = False
        self._finished = False
        # The last piece, held back to go out with the end (see _pump).
        self._tail = b""
        self._tailSize = 0

    def start(self, paused: bool) -> None:
        """
        Send as much as the transport accepts, or nothing yet if it is
        C{paused}.
        """
        self._paused = paused
        self._run()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._finished:
            self._onProgress()
        self._run()

    def stopProducing(self) -> None:
        """
        The connection is going away: close the file, send nothing more.
        """
        if self._finished:
            return
        self._finished = True
        self._close()

    def _close(self) -> None:
        try:
            self._source.close()
        except Exception:
            pass

    def _run(self) -> None:
        if self._running or self._finished:
            return
        self._running = True
        try:
            ended = self._pump()
        except Exception:
            self._finished = True
            self._close()
            self._onDone(self, Failure())
            return
        finally:
            self._running = False
        if ended:
            self._end()

    def _pump(self) -> bool:
        """
        Send chunks until paused or at the end.  The last chunk of a source
        that tells it is C{exhausted} is kept for L{_end} if it is small, so
        that a small message goes out with its end in one write.

        @return: whether the end of what is to be sent was reached.
        """
        source = self._source
        while not self._paused and not self._finished:
            chunk = source.read(self._chunkSize)
            if not chunk:
                return True
            if self._top is not None:
                chunk = self._top.feed(chunk)
            data = self._stuffer.stuff(chunk)
            if self._top is None and len(data) <= MERGED_END_SIZE and getattr(source, "exhausted", False):
                self._tail = data
                self._tailSize = len(chunk)
                return True
            if data:
                self._transport.write(data)
                self._onSent(len(chunk))
            if self._top is not None and self._top.done:
                return True
        return False

    def _end(self) -> None:
        self._finished = True
        self._close()
        end = b".\r\n" if self._stuffer.atLineStart else b"\r\n.\r\n"
        if self._tailSize:
            self._transport.write(self._tail + end)
            self._onSent(self._tailSize)
        else:
            self._transport.write(end)
        self._onDone(self, None)
