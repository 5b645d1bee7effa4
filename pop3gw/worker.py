# -*- test-case-name: tests.test_e2e_workers -*-
"""
One worker process of C{twistd pop3gw --workers N}: C{python -m
pop3gw.worker}, started by the supervisor (L{pop3gw.supervisor}) with the
descriptors described in L{pop3gw.workerlink}.  It serves the listening
sockets it inherited until SIGTERM, or until the supervisor is gone.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
from typing import Callable

from twisted.internet import stdio, task
from twisted.logger import globalLogBeginner

from pop3gw.workerlink import (
    ALIVE_INTERVAL,
    CONTROL_FD,
    LogLineWriter,
    WorkerLink,
    decodeSetup,
    encodeLogEvent,
    log,
    logTextEncoder,
)

#: The longest setup line read from stdin.
MAX_SETUP = 16 * 1024 * 1024
#: Seconds a log line waits for others before they are written together:
#: each write wakes the supervisor, which writes them to the log.
LOG_FLUSH_DELAY = 0.05


def readSetupLine(fd: int = 0) -> tuple[bytes, bytes]:
    """
    Read the first line of stdin, the setup.

    @return: the line, and what was read after it (the supervisor may
        already have written more: C{stop}).
    """
    data = b""
    while b"\n" not in data:
        chunk = os.read(fd, 65536)
        if not chunk or len(data) > MAX_SETUP:
            raise SystemExit("pop3gw worker: no setup from the supervisor")
        data += chunk
    line, rest = data.split(b"\n", 1)
    return line + b"\n", rest


def ignoreReloadUntilReady() -> None:
    """
    Ignore SIGHUP until the worker's reload service handles it: the
    supervisor passes every SIGHUP on, and one arriving while a worker
    starts would otherwise end it (the default action).
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def main() -> None:
    ignoreReloadUntilReady()
    setupLine, afterSetup = readSetupLine()
    setup = decodeSetup(setupLine)
    out = io.FileIO(1, "w", closefd=False)

    def writeAll(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[out.write(view) or 0 :]

    if setup.logText:
        writer = LogLineWriter(writeAll, encode=logTextEncoder(f" (worker {setup.number})"))
    else:
        writer = LogLineWriter(writeAll, encode=encodeLogEvent)
    globalLogBeginner.beginLoggingTo([writer], redirectStandardIO=False)

    from twisted.internet import reactor

    reactorThread = threading.get_ident()

    def soon(f: Callable[[], None]) -> None:
        if threading.get_ident() == reactorThread:
            reactor.callLater(LOG_FLUSH_DELAY, f)
        else:
            reactor.callFromThread(reactor.callLater, LOG_FLUSH_DELAY, f)  # type: ignore[attr-defined]

    from pop3gw.service import makeWorkerService

    def supervisorGone() -> None:
        stopOnce()

    def toldToStop() -> None:
        reactor.callWhenRunning(stopOnce)

    link = WorkerLink(onLost=supervisorGone, onStop=toldToStop)
    stdio.StandardIO(link, stdin=0, stdout=CONTROL_FD, reactor=reactor)  # type: ignore[call-arg]
    if afterSetup:
        link.dataReceived(afterSetup)
    top = makeWorkerService(setup, reactor, link)
    top.privilegedStartService()
    top.startService()
    log.info("ready: serving {count} listeners (pid {pid})", count=len(setup.listeners), pid=os.getpid())
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    stopping: list[bool] = []

    def stopOnce() -> None:
        if not stopping and reactor.running:
            stopping.append(True)
            reactor.stop()

    def onTerm(signum, frame) -> None:
        reactor.callFromThread(stopOnce)  # type: ignore[attr-defined]

    def handleSignals() -> None:
        # Ctrl-C in a terminal reaches every process of the group: the
        # supervisor stops the workers itself (a stop line on stdin).
        # SIGTERM stops this worker (the supervisor replaces it unless it
        # is stopping too).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, onTerm)

    heartbeat = task.LoopingCall(link.alive)

    def running() -> None:
        handleSignals()
        writer.schedule = soon
        heartbeat.start(ALIVE_INTERVAL)

    def stopped() -> None:
        writer.schedule = None
        if heartbeat.running:
            heartbeat.stop()

    reactor.callWhenRunning(running)
    reactor.addSystemEventTrigger("after", "shutdown", stopped)
    reactor.run()
    writer.schedule = None
    writer.flush()
    sys.exit(0)


if __name__ == "__main__":
    main()
