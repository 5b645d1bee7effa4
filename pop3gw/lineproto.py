# -*- test-case-name: tests.test_lineproto -*-
"""
The line-protocol core every listener stands on.

L{LineProtocol} owns the transport mechanics that POP3 and SMTP share, so a
server keeps only its command tables, handlers and replies:

  - Input is split into lines here (not by C{LineReceiver}): a line ends
    with LF, and a CR before it is removed.  The longest line accepted is
    chosen per state by L{LineProtocol.lineLimit}; a longer line is
    discarded up to its end and reported once to
    L{LineProtocol.lineTooLong}, and the session goes on.
  - One command at a time: a handler that cannot answer at once hands its
    C{Deferred} to L{LineProtocol.hold}; further input stays buffered until
    it fires, then is handled in order (pipelining).  While the client does
    not read its replies (the L{OutputFlow} the connection registers is
    paused) nothing more is handled either.
  - Reading pauses once L{LineProtocol.maxPendingInput} octets wait, and resumes once they have been handled.
  - The idle timer is reset only by data holding a line end: a client
    trickling a line that never ends (slowloris) still times out.  While
    a block of counted octets is read (L{LineProtocol.readingCountedOctets}:
    a C{BDAT} chunk, whose size was declared and is bounded by the message
    size limit), any of its octets counts.
  - L{LineProtocol.closeConnection} sends a last reply and closes; a client
    that is not reading is aborted at once, and a graceful close whose reply
    has not gone out after L{LineProtocol.closeTimeout} seconds is aborted.
  - L{LineProtocol.startTLS} drops whatever was buffered before it
    (plaintext pipelined after STLS/STARTTLS is never acted on,
    CVE-2011-0411) and closes the connection if TLS cannot start.
  - L{LineProtocol.sendReply} writes a reply on a plain TCP connection
    whose output buffer is empty straight to the socket, in the same
    reactor turn: no registration of the socket for writing, no turn of
    the reactor to send it and none to unregister it.  Anything else (a
    buffer not empty, a socket that takes only part of it, TLS, a
    transport other than TCP) goes through C{transport.write} as before,
    so the order of the output never changes.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import TYPE_CHECKING, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol
from twisted.internet.tcp import Connection
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3gw.address import describePeer
from pop3gw.flow import OutputFlow, closeAtOnce, idleSocket, plainConnection

if TYPE_CHECKING:

    class _IConnection(ITLSTransport, IPushProducer):
        """
        What the servers need of their transport: a TCP connection (or TLS
        over one) that can start TLS and be paused.
        """


class LineProtocol(Protocol, metaclass=ABCMeta):
    """
    A line-based server session.  Subclasses provide L{clock},
    L{idleTimeout}, L{lineLimit}, L{lineReceived}, L{lineTooLong},
    L{idleTimedOut} and L{commandFailed}, and may override L{step} to read
    input other than command lines (message data).

    @cvar maxPendingInput: octets of unhandled input at which reading
        pauses.
    @cvar closeTimeout: seconds a graceful close may take before the
        connection is aborted; C{None} for no limit.
    @cvar bareLFCountsAsCRLF: whether a line ended by a bare LF counts as
        if it ended with CRLF against the line limit (SMTP's limits count
        CRLF; POP3's count the octets as sent).
    @cvar tooLongAtOnce: whether a line is reported too long as soon as
        the limit is passed (C{True}) or when its end arrives.

    @ivar secure: whether TLS is active (implicit TLS or after
        L{startTLS}).
    @ivar peer: the client's host, for logs and policies.
    """

    log = Logger()
    if TYPE_CHECKING:
        transport: _IConnection

    maxPendingInput = 65536
    closeTimeout: Optional[float] = 10.0
    bareLFCountsAsCRLF = False
    tooLongAtOnce = True

    # Per-connection state.  The defaults live on the class, and an instance
    # gets its own attribute only when a value changes: an idle connection
    # then costs little memory.
    secure = False
    peer = "unknown"
    _inFlight: Optional[Deferred] = None
    _discarding = False
    _processing = False
    _readingPaused = False
    _closing = False
    _disconnected = False
    _timeoutCall: Optional[IDelayedCall] = None
    _abortCall: Optional[IDelayedCall] = None
    _loginCall: Optional[IDelayedCall] = None
    _outputRegistered = False
    # The TCP connection under the transport, for sendReply; None: always
    # through the transport.
    _socketConnection: Optional[Connection] = None

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._output = OutputFlow(self)

    # --- What a server provides ------------------------------------------

    @property
    @abstractmethod
    def clock(self) -> IReactorTime:
        """
        The clock for the idle and close timers.
        """

    @property
    @abstractmethod
    def idleTimeout(self) -> Optional[float]:
        """
        Seconds of client silence before L{idleTimedOut}; C{None} or 0 for
        no limit.
        """

    @abstractmethod
    def lineLimit(self, head: bytes) -> int:
        """
        @param head: the first octets of the line being read.
        @return: the longest line accepted now, its line end included.
        """

    @abstractmethod
    def lineReceived(self, line: bytes) -> None:
        """
        Handle one line, without its line end.
        """

    @abstractmethod
    def lineTooLong(self) -> None:
        """
        A line over L{lineLimit} was discarded: answer it.
        """

    @abstractmethod
    def idleTimedOut(self) -> None:
        """
        The client was silent for L{idleTimeout} seconds.
        """

    @abstractmethod
    def commandFailed(self, reason: Failure) -> None:
        """
        A held command's C{Deferred} failed: a bug in its callbacks.
        """

    def stopWork(self) -> None:
        """
        The connection is closing or lost: stop whatever streams (a message
        transfer, a message being read).  Nothing by default.
        """

    def step(self) -> bool:
        """
        Handle the next piece of buffered input: by default one line.

        @return: whether anything was handled (C{False}: wait for more).
        """
        return self._nextLine()

    # --- Connection -------------------------------------------------------

    def startSession(self) -> None:
        """
        Call from C{connectionMade}: note whether the connection is already
        TLS and who the peer is, register the output flow and start the idle
        timer.
        """
        self.secure = ISSLTransport.providedBy(self.transport)
        try:
            self.peer = describePeer(self.transport.getPeer())
        except Exception:
            self.peer = "unknown"
        self._output.register(self.transport)
        if not self.secure:
            self._socketConnection = plainConnection(self.transport)
        timeout = self.idleTimeout
        if timeout:
            self._timeoutCall = self.clock.callLater(timeout, self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._disconnected:
            return
        if b"\n" in data or self.readingCountedOctets():
            # Only a finished line counts as activity, or octets of a
            # counted block (their count bounds them).
            self.resetTimeout()
        self._buffer += data
        self.processBuffer()

    def readingCountedOctets(self) -> bool:
        """
        Whether the input being read now is a block of octets whose count
        the client gave (an SMTP C{BDAT} chunk) rather than lines: any of
        its octets counts as activity for the idle timer.  None here.
        """
        return False

    def endSession(self) -> None:
        """
        Call from C{connectionLost}: stop the timers and whatever streams,
        drop the buffer, unregister the output flow.
        """
        self._disconnected = True
        self._cancelTimers()
        self._buffer.clear()
        self.stopWork()
        self._output.unregister(self.transport, self.log)

    def ended(self) -> bool:
        """
        @return: whether the session is closed or closing, so that a result
            arriving now must only release what it got.
        """
        return self._closing or self._disconnected

    def closeConnection(self, reply: Optional[bytes] = None) -> None:
        """
        Send C{reply} (if any) and close once it is written.  If the client
        is not reading, abort at once without the reply; otherwise abort if
        the close has not finished after L{closeTimeout} seconds.
        """
        if self._closing:
            return
        stalled = self._output.paused
        self._closing = True
        self._cancelTimers()
        self._buffer.clear()
        self.stopWork()
        if self._disconnected:
            return
        if reply is not None and not stalled:
            self.sendReply(reply)
        # A registered producer would keep a TLS transport from shutting
        # down.
        self._output.unregister(self.transport, self.log)
        if stalled:
            self.transport.abortConnection()
            return
        if not self.secure and closeAtOnce(self._socketConnection):
            return
        self.transport.loseConnection()
        if self.closeTimeout is not None:
            self._abortCall = self.clock.callLater(self.closeTimeout, self._abortUnread)

    def sendReply(self, data: bytes) -> None:
        """
        Write C{data} (a reply) to the client: at once to the socket if
        the connection is plain TCP and nothing written before is still
        waiting in the transport's buffer, else (and whatever the socket
        did not take) through C{transport.write}.
        """
        sock = None if self.secure else idleSocket(self._socketConnection)
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:
                # Would block, or the connection broke: the transport
                # finds out and reports it as it would have.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.transport.write(data)

    def _abortUnread(self) -> None:
        """
        The last reply did not go out in time: the client is not reading.
        """
        self._abortCall = None
        if not self._disconnected:
            self.transport.abortConnection()

    def startTLS(self, contextFactory) -> bool:
        """
        Start TLS on the transport (after the server's go-ahead reply).
        Whatever the client pipelined after the command arrived in
        plaintext and is dropped, never acted on.  If TLS cannot start the
        failure is logged and the connection closed.

        @return: whether TLS started; L{secure} is then set.
        """
        self._buffer.clear()
        self._discarding = False
        try:
            self.transport.startTLS(contextFactory)
        except Exception:
            self.log.failure("starting TLS failed")
            self.closeConnection()
            return False
        self.secure = True
        self._socketConnection = None
        return True

    # --- Idle timer -------------------------------------------------------

    def resetTimeout(self) -> None:
        """
        Restart the idle timer, if it runs.
        """
        call = self._timeoutCall
        timeout = self.idleTimeout
        if call is not None and timeout is not None and call.active():
            call.reset(timeout)

    def restartTimeout(self) -> None:
        """
        Start the idle timer anew (after it fired while the server, not the
        client, was slow).
        """
        timeout = self.idleTimeout
        if timeout is not None:
            self._timeoutCall = self.clock.callLater(timeout, self._timedOut)

    def cancelTimeout(self) -> None:
        """
        Stop the idle timer for the rest of the session.
        """
        call, self._timeoutCall = self._timeoutCall, None
        if call is not None and call.active():
            call.cancel()

    def _cancelTimers(self) -> None:
        self.cancelTimeout()
        self.loggedIn()
        call, self._abortCall = self._abortCall, None
        if call is not None and call.active():
            call.cancel()

    # --- Login deadline -----------------------------------------------------

    def startLoginDeadline(self, seconds: Optional[float]) -> None:
        """
        Unless L{loggedIn} is called within C{seconds} of now (C{None} or 0:
        no deadline), call L{loginTimedOut}.  Unlike the idle timer, no
        command moves the deadline: a client that keeps talking without
        logging in does not hold its connection for ever.
        """
        if seconds:
            self._loginCall = self.clock.callLater(seconds, self._loginDeadlinePassed)

    def loggedIn(self) -> None:
        """
        The client logged in: the login deadline no longer applies.
        """
        call, self._loginCall = self._loginCall, None
        if call is not None and call.active():
            call.cancel()

    def loginTimedOut(self) -> None:
        """
        The login deadline passed; a server overrides this to say so.  The
        default closes the connection without a reply.
        """
        self.closeConnection()

    def _loginDeadlinePassed(self) -> None:
        self._loginCall = None
        if not self.ended():
            self.loginTimedOut()

    def _timedOut(self) -> None:
        self._timeoutCall = None
        if self.ended():
            return
        self.idleTimedOut()

    # --- Output flow ------------------------------------------------------

    def _outputPaused(self) -> None:
        """
        The client is not reading: L{processBuffer} answers nothing more
        until L{_outputResumed}.
        """

    def _outputResumed(self) -> None:
        """
        The client reads again: answer what waits.
        """
        if not self.ended():
            self.processBuffer()

    # --- Commands in flight -----------------------------------------------

    @property
    def commandInFlight(self) -> bool:
        """
        Whether a command waits for its C{Deferred} (see L{hold}).
        """
        return self._inFlight is not None

    def hold(self, d: Deferred) -> None:
        """
        Handle no further input until C{d}, whose callbacks answer the
        command, fires; a failure in them goes to L{commandFailed}.
        """
        self._inFlight = d
        d.addErrback(self._ebInFlight)
        d.addBoth(self._release, d)

    def _ebInFlight(self, reason: Failure) -> None:
        self.commandFailed(reason)

    def _release(self, ignored: object, d: Deferred) -> None:
        if self._inFlight is d:
            self._inFlight = None
        if not self._disconnected:
            self.processBuffer()

    def dropInFlight(self) -> None:
        """
        Forget the command in flight (its handler failed): input is handled
        again.
        """
        self._inFlight = None

    # --- Input ------------------------------------------------------------

    def processBuffer(self) -> None:
        """
        Handle buffered input until it runs out, a command is in flight, the
        client stops reading or the session closes.  Re-entrant calls (a
        command that finishes while this loop runs) leave the work to the
        outer loop.
        """
        if self._processing:
            return
        self._processing = True
        try:
            while not (self._inFlight is not None or self._output.paused or self.ended()):
                if not self.step():
                    break
        finally:
            self._processing = False
        self._flowControl()

    def _nextLine(self) -> bool:
        """
        Frame one line from the buffer and hand it on.
        """
        buf = self._buffer
        end = buf.find(b"\n")
        if self._discarding:
            if end == -1:
                buf.clear()
                return False
            del buf[: end + 1]
            self._discarding = False
            if not self.tooLongAtOnce:
                self.lineTooLong()
            return True
        limit = self.lineLimit(bytes(buf[:16]))
        if end == -1:
            if len(buf) >= limit:
                # Too long whatever follows: drop it up to its end.
                buf.clear()
                self._discarding = True
                if self.tooLongAtOnce:
                    self.lineTooLong()
            return False
        length = end + 1
        if self.bareLFCountsAsCRLF and buf[end - 1 : end] != b"\r":
            length += 1
        line = bytes(buf[:end])
        del buf[: end + 1]
        if length > limit:
            self.lineTooLong()
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        self.lineReceived(line)
        return True

    def _flowControl(self) -> None:
        """
        Stop reading while L{maxPendingInput} octets or more wait; read
        again once they have been handled.
        """
        if self.ended():
            return
        want = len(self._buffer) < self.maxPendingInput
        try:
            if not want and not self._readingPaused:
                self._readingPaused = True
                self.transport.pauseProducing()
            elif want and self._readingPaused:
                self._readingPaused = False
                self.transport.resumeProducing()
        except Exception:
            self.log.failure("flow control on transport failed")
