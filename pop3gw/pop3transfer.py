# -*- test-case-name: tests.test_pop3transfer,tests.test_pop3 -*-
"""
POP3 message streaming: RETR and TOP (RFC 1939).

L{_MessageSender} streams one message from L{IMaildrop.openMessage
<pop3gw.interfaces.IMaildrop.openMessage>} in chunks while the transport
accepts them, dot-stuffed across chunk boundaries (L{_DotStuffer}) and, for
TOP, cut after the header and the asked number of body lines
(L{_TopFilter}).  On a plain TCP connection whose write buffer is empty the
octets go straight to the socket (L{_directSocket}), without a reactor turn.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional, Sequence

from twisted.python.failure import Failure

from pop3gw.flow import idleSocket, plainConnection

#: Octets read from a message file at a time when streaming it.
READ_CHUNK_SIZE = 262144

#: Largest last piece of a message sent in the same write as the end of the
#: response (a copy of a small piece costs less than one more write).
MERGED_END_SIZE = 65536

#: Most message octets sent straight to the socket in one turn of the
#: reactor: past it the rest is left to the transport's buffer, which pauses
#: the transfer until the socket drains, so one fast client cannot keep the
#: reactor from the other connections.
DIRECT_SEND_BUDGET = 1 << 20


def _directSocket(transport):
    """
    The socket under C{transport} if octets sent on it now go out exactly as
    a C{transport.write} would send them (L{plainConnection}, L{idleSocket}).

    @return: the socket, or C{None}.
    """
    return idleSocket(plainConnection(transport))


def _writePieces(transport, pieces: Sequence[bytes], budget: int) -> int:
    """
    Write C{pieces}, in order, as one stream: straight to the socket with
    one C{sendmsg} when L{_directSocket} allows it and C{budget} is left,
    the part the socket did not take (or all of it) through
    C{transport.write}.

    @return: the number of octets that went straight to the socket.
    """
    sock = _directSocket(transport) if budget > 0 else None
    sent = 0
    if sock is not None:
        try:
            sent = sock.sendmsg(pieces)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # The connection is broken: let the transport find out and
            # close it as it always does.
            sent = 0
    rest = pieces
    skipped = sent
    while rest and skipped >= len(rest[0]):
        skipped -= len(rest[0])
        rest = rest[1:]
    if rest:
        if skipped:
            rest = [rest[0][skipped:], *rest[1:]]
        transport.write(rest[0] if len(rest) == 1 else b"".join(rest))
    return sent


#: Dots in a chunk past which L{_stuffLines} leaves the chunk to one
#: C{bytes.replace}.
STUFF_FIND_LIMIT = 8


def _stuffLines(chunk: bytes) -> bytes:
    """
    C{chunk} with a second C{.} after every C{"\\n."}.  The dots of a
    chunk with few of them are found with one-octet searches
    (C{memchr}) and the lines beginning with one doubled by joining the
    pieces: the two-octet search of C{bytes.replace} (or C{bytes.find})
    runs at about 1 GB/s on text with a line end every few dozen octets,
    C{memchr} many times faster.  A chunk with more than
    L{STUFF_FIND_LIMIT} dots goes through C{bytes.replace}.
    """
    pieces = []
    start = 0
    dots = 0
    i = chunk.find(b".")
    while i != -1:
        dots += 1
        if dots > STUFF_FIND_LIMIT:
            return chunk.replace(b"\n.", b"\n..")
        if i and chunk[i - 1] == 10:
            pieces.append(chunk[start:i])
            start = i
        i = chunk.find(b".", i + 1)
    if not pieces:
        return chunk
    pieces.append(chunk[start:])
    # Each piece after the first begins with the "." of a line: joining
    # them with "." doubles it.
    return b".".join(pieces)


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
        if b"." not in chunk:
            # A one-octet search (memchr): most chunks of an attachment hold
            # no dot at all, and searching for the two octets "\n." is about
            # a hundred times slower where line ends are frequent.
            self.atLineStart = chunk.endswith(b"\n")
            return chunk
        out = _stuffLines(chunk)
        if self.atLineStart and out[:1] == b".":
            out = b"." + out
        self.atLineStart = chunk.endswith(b"\n")
        return out


def _sendWhole(transport, head: bytes, message: bytes) -> None:
    """
    Send a whole message at once: the status line C{head}, the message
    (C{message}, in wire form) dot-stuffed, and the C{.} line, in one
    write (one C{sendmsg} on an idle plain connection, see
    L{_writePieces}); the same octets a L{_MessageSender} sends for it.
    """
    stuffer = _DotStuffer()
    data = stuffer.stuff(message)
    end = b".\r\n" if stuffer.atLineStart else b"\r\n.\r\n"
    _writePieces(transport, [head + data + end], DIRECT_SEND_BUDGET)


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


class _Sender(ABC):
    """
    What L{_MessageSender} and the listing sender of L{pop3gw.pop3transaction}
    share: a streaming producer that the server's
    L{pop3gw.flow.OutputFlow} pauses and resumes, writing to C{transport}
    while not paused (L{_run}, in subclasses) and calling C{onProgress}
    (the idle timer) each time the client reads on.
    """

    def __init__(self, transport, onProgress: Callable[[], None]) -> None:
        self._transport = transport
        self._onProgress = onProgress
        self._paused = False
        self._running = False
        self._finished = False

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

    @abstractmethod
    def _run(self) -> None:
        """
        Write while not paused and not finished.
        """


class _MessageSender(_Sender):
    """
    Streams one message (or its top) to a transport: reads C{chunkSize}
    octets at a time while not paused, dot-stuffs them and ends with the
    C{.} line.  The server's L{pop3gw.flow.OutputFlow} pauses and resumes it.

    The status line C{head} goes out with the first piece of the message,
    and a small last piece with the C{.} line, so a small message is one
    write (one C{send}) in all.

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
        head: bytes = b"",
    ) -> None:
        super().__init__(transport, onProgress)
        self._source = source
        self._top = _TopFilter(topLines) if topLines is not None else None
        self._onDone = onDone
        self._onSent = onSent
        self._chunkSize = chunkSize
        self._head = head
        self._stuffer = _DotStuffer()
        # The last piece, held back to go out with the end (see _pump).
        self._tail = b""
        self._tailSize = 0
        self._budget = 0

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
        self._budget = DIRECT_SEND_BUDGET
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

    def _write(self, pieces: list[bytes]) -> None:
        if self._head:
            pieces.insert(0, self._head)
            self._head = b""
        self._budget -= _writePieces(self._transport, pieces, self._budget)

    def _pump(self) -> bool:
        """
        Send chunks until paused or at the end.  The last piece (of a source
        that tells it is C{exhausted}, or of a top) is kept for L{_end} if
        it is small, so that a small message goes out with its status line
        and its end in one write.

        @return: whether the end of what is to be sent was reached.
        """
        source = self._source
        top = self._top
        while not self._paused and not self._finished:
            chunk = source.read(self._chunkSize)
            if not chunk:
                return True
            last = getattr(source, "exhausted", False)
            if top is not None:
                chunk = top.feed(chunk)
                last = last or top.done
            data = self._stuffer.stuff(chunk)
            if last and len(data) <= MERGED_END_SIZE:
                self._tail = data
                self._tailSize = len(chunk)
                return True
            if data:
                self._write([data])
                self._onSent(len(chunk))
            if last:
                return True
        return False

    def _end(self) -> None:
        self._finished = True
        self._close()
        end = b".\r\n" if self._stuffer.atLineStart else b"\r\n.\r\n"
        # One piece, the status line, the last piece and the end joined: a
        # copy of at most MERGED_END_SIZE octets costs less than a write.
        last = self._head + self._tail + end
        self._head = b""
        self._write([last])
        if self._tailSize:
            self._onSent(self._tailSize)
        self._onDone(self, None)
