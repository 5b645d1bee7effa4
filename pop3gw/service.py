# -*- test-case-name: tests.test_service -*-
"""
C{twistd pop3gw}: builds every piece from a L{Config} into one
C{MultiService}.  This is the only module that builds endpoints.

One server runs per data directory: the whole service holds an exclusive
lock on C{DATA/server.lock} (L{ServerLockService}).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import resource
import signal
import socket
import sys
import time
import uuid
from types import FrameType
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import attr
from OpenSSL import SSL
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet import defer, task, tcp, unix
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.main import CONNECTION_LOST
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent

from pop3gw import __version__, fsutil
from pop3gw.acmeclient import CertificateObtainer, ChallengeTokens, Renewer, challengeSite
from pop3gw.acmeclient import paths as acmePaths
from pop3gw.address import Address
from pop3gw.anvil import AuthAccounting
from pop3gw.apppasswords import APP_PASSWORDS, AppPasswords
from pop3gw.auth import PasswordChecker, PlaintextAuthPolicy, Realm
from pop3gw.bounces import noticeRecipient
from pop3gw.config import Config, ConfigError
from pop3gw.config import Options as _ConfigOptions
from pop3gw.dkimkeys import Keyring, KeyStore
from pop3gw.dkimsign import SigningQueue
from pop3gw.inbound import InboundChecker, RspamdClient
from pop3gw.interfaces import IAppPasswords, ISendingRecords, TemporaryFailure, UnknownUser
from pop3gw.limits import ConnectionLimitFactory, PeerCounts
from pop3gw.loginwatch import HISTORY_FILE, LoginWatch
from pop3gw.maildir import MaildirStore
from pop3gw.metrics import Metrics, healthProblems, metricsSite
from pop3gw.pgaccounts import PostgresAppPasswords, PostgresSendingLimits
from pop3gw.pgdatabase import Database, redact
from pop3gw.pgdkim import PostgresKeyStore
from pop3gw.pglogins import PostgresLoginHistory
from pop3gw.pgmail import LOCK_RENEW_INTERVAL, PostgresMaildropStore
from pop3gw.pgqueue import QUEUE_POLL_INTERVAL, PostgresQueue, workerNode
from pop3gw.pgusers import PostgresUsers
from pop3gw.pop3 import POP3Factory
from pop3gw.queue import Entry, OutboundQueue
from pop3gw.relay import RelayService
from pop3gw.relay.mtasts import CacheFile, PolicySource, makeFetcher
from pop3gw.relay.mx import MXResolver
from pop3gw.router import Router
from pop3gw.runner import IOThreadPool, ProcessPoolRunner, ThreadPoolRunner, drainTogether
from pop3gw.sendlimits import SendingLimits, SendingPolicy, Suspension, noticeMessage
from pop3gw.smtp import SubmissionFactory
from pop3gw.smtpdata import formatDate
from pop3gw.smtplmtp import LMTPFactory
from pop3gw.smtpmx import MXFactory
from pop3gw.socketmap import SocketmapFactory
from pop3gw.supervisor import WorkerPool, WorkerProcess, textLogWriter
from pop3gw.textlog import TextLogService
from pop3gw.tls import CertificateManager, TLSConfigError
from pop3gw.tlsclient import clientContextFactory, opportunisticClientContextFactory
from pop3gw.users import UsersFile
from pop3gw.workerlink import (
    CONTROL_FD,
    FIRST_LISTENER_FD,
    METRICS_INTERVAL,
    InheritedListener,
    MetricsReporter,
    SharedPeerCounts,
    WorkerLink,
    WorkerSetup,
    encodeSetup,
)
from twisted import copyright

__all__ = ["Options", "makeService", "makeWorkerService"]


class Options(_ConfigOptions):
    """
    The C{twistd pop3gw} options.  A bad value ends start-up with one line
    on stderr (twistd would otherwise print its whole help text first).
    """

    def opt_version(self) -> None:
        """
        Print pop3gw's version (and Twisted's) and exit.
        """
        print(f"pop3gw {__version__} (Twisted {copyright.version})")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            super().postOptions()
        except usage.UsageError as e:
            raise SystemExit(f"pop3gw: {e}") from None

log = Logger(namespace="pop3gw")

# How often the TLS files are checked for a renewal (a stat() each).
TLS_CHECK_INTERVAL = 30.0
#: How often the users and aliases files are checked for changes (a stat()
#: each, in the I/O pool), so that the directory the reactor thread reads
#: (recipient checks, local domains) follows C{pop3gw user} changes.
USERS_CHECK_INTERVAL = 2.0
# Threads for fsync/link work of deliveries (blocking disk I/O).
IO_THREADS = 8

#: The file, in the data directory, a running server holds an exclusive
#: C{flock} on; it contains the server's pid.
SERVER_LOCK = "server.lock"

#: The MTA-STS policy cache, in the data directory.
MTA_STS_CACHE = "mta-sts.json"

#: Threads for the DNS work of the inbound checks (SPF, DKIM, DMARC): at
#: most this many messages are checked at once; more wait their turn.
DNS_THREADS = 8

#: Seconds between looks at the ACME certificate (cheap: a file's expiry
#: date; the order itself only when due, see L{pop3gw.acmeclient}).
ACME_CHECK_INTERVAL = 600.0

#: The login history under the data directory, and how often it is saved.
LOGIN_HISTORY = HISTORY_FILE
LOGIN_HISTORY_SAVE_INTERVAL = 60.0

POP3_REFUSAL = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
SMTP_REFUSAL = b"421 4.7.0 Too many connections, try again later\r\n"


#: When each kind of part stops (see L{ServerLockService.stopService}):
#: listeners first, then the services (the relay, reloads), then the
#: thread pools.
STOP_LISTENERS, STOP_SERVICES, STOP_POOLS = 0, 1, 2


class ThreadPoolService(Service):
    """
    Starts and stops a C{ThreadPool} with the application.

    @param runner: the L{ThreadPoolRunner} over C{pool}, if any: stopping
        first waits for its work in flight (see L{ThreadPoolRunner.drain}),
        so every result is reported, then stops the pool.
    """

    stopStage = STOP_POOLS

    def __init__(
        self,
        pool: Union[ThreadPool, IOThreadPool],
        runner: Optional[ThreadPoolRunner] = None,
        afterStop: Optional[Callable[[], None]] = None,
    ) -> None:
        """
        @param afterStop: called once the pool has stopped (closing the
            database pool its threads used).
        """
        self.pool = pool
        self.runner = runner
        self.afterStop = afterStop

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        d = self.runner.drain() if self.runner is not None else defer.succeed(None)
        d.addCallback(lambda _: self.pool.stop())
        if self.afterStop is not None:
            afterStop = self.afterStop
            d.addCallback(lambda _: afterStop())
        return d


def _openConnections(limiter: ConnectionLimitFactory) -> Callable[[], int]:
    """
    How many connections C{limiter}'s listener has open, when asked.
    """
    return lambda: limiter.total


class MetricsService(Service):
    """
    While running, feeds the log events and the fsync timings to a
    L{Metrics} (see L{pop3gw.metrics}).
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def startService(self) -> None:
        super().startService()
        globalLogPublisher.addObserver(self.metrics)
        fsutil.fsyncObserver = self.metrics.fsyncTimed

    def stopService(self):
        super().stopService()
        globalLogPublisher.removeObserver(self.metrics)
        if fsutil.fsyncObserver == self.metrics.fsyncTimed:
            fsutil.fsyncObserver = None


class MetricsReportService(TimerService):
    """
    A worker's reports of its metrics to the supervisor (C{--workers N}
    with C{--metrics}): every L{METRICS_INTERVAL} seconds, and a last one
    when the worker stops.
    """

    def __init__(self, reporter: MetricsReporter) -> None:
        super().__init__(METRICS_INTERVAL, reporter.report)
        self.reporter = reporter

    def stopService(self):
        d = defer.maybeDeferred(super().stopService)
        return d.addCallback(lambda _: self.reporter.report())


class SendingRecordsService(Service):
    """
    Writes the sending records still waiting (see L{SendingPolicy.flush})
    when the server stops, before the thread pools do.
    """

    def __init__(self, sending: SendingPolicy) -> None:
        self.sending = sending

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.sending.flush()


class LoginWatchService(TimerService):
    """
    Writes the login history (see L{pop3gw.loginwatch}) once a minute when
    it changed, and a last time when the server stops, before the thread
    pools do.
    """

    def __init__(self, watch: LoginWatch, loadAtStart: bool = False) -> None:
        """
        @param loadAtStart: read the stored history when the service
            starts (L{LoginWatch.loadLater}), not before.
        """
        super().__init__(LOGIN_HISTORY_SAVE_INTERVAL, watch.save)
        self.watch = watch
        self.loadAtStart = loadAtStart

    def startService(self) -> None:
        if self.loadAtStart:
            self.watch.loadLater()
        super().startService()

    def stopService(self) -> defer.Deferred:
        d = defer.maybeDeferred(super().stopService)
        return d.addCallback(lambda _: self.watch.save())


class ProcessPoolService(Service):
    """
    Stops a L{ProcessPoolRunner} with the application, after the work in
    flight on it has reported.
    """

    stopStage = STOP_POOLS

    def __init__(self, runner: ProcessPoolRunner) -> None:
        self.runner = runner

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.runner.drain().addCallback(lambda _: self.runner.stop())


class StagedService(MultiService):
    """
    Parts that stop in stages (see L{stopService}).

    @ivar reactor: if set, the reactor whose accepted connections are
        closed once every part has stopped (L{closeConnections}).
    """

    reactor: Any = None

    def stopService(self) -> defer.Deferred:
        """
        Stop the parts in order, each stage once the one before has
        stopped: the listeners (no new connection), then the services (the
        relay records the attempts in progress), then the pools: once none
        of their runners has work in flight (L{drainTogether}: a commit in
        progress is answered, a relay result written, a login check
        answered), the runners refuse more work and the pools stop; then
        close the connections the listeners accepted once those answers
        are sent.
        """
        Service.stopService(self)
        parts = list(self)
        parts.reverse()
        factories = _trackingFactories(parts)
        d: defer.Deferred = defer.succeed(None)
        for stage in (STOP_LISTENERS, STOP_SERVICES, STOP_POOLS):
            group = [p for p in parts if getattr(p, "stopStage", STOP_SERVICES) == stage]
            if stage == STOP_POOLS:
                runners = [p.runner for p in group if getattr(p, "runner", None) is not None]
                d.addCallback(lambda _, runners: drainTogether(runners), runners)
            d.addCallback(lambda _, group: _stopAll(group), group)
        if self.reactor is not None:
            d.addCallback(lambda _: closeConnections(self.reactor, factories=factories))
        return d


def _trackingFactories(parts: list) -> list[WrappingFactory]:
    """
    The factories of the listeners among C{parts} that know the
    connections they accepted (the connection limiters, see
    L{ConnectionLimitFactory}, are C{WrappingFactory}s: their
    C{protocols}).
    """
    factories = []
    for part in parts:
        factory = getattr(part, "factory", None)
        if getattr(part, "stopStage", None) == STOP_LISTENERS and isinstance(factory, WrappingFactory):
            factories.append(factory)
    return factories


#: Seconds a stopping server waits for its connections' last replies to be
#: sent (L{closeConnections}).
CLOSE_TIMEOUT = 5.0

#: Most octets of unread input thrown away from one connection before it
#: is closed (L{discardInput}).
DISCARD_LIMIT = 1 << 20

_Accepted = (tcp.Server, unix.Server)


def acceptedConnections(reactor, factories: Iterable[WrappingFactory] = ()) -> set:
    """
    The connections (C{tcp.Server}, C{unix.Server}) accepted by the
    listeners whose factories are C{factories}, and any other accepted
    connection the reactor reads or writes.  A connection whose reading is
    paused (flow control) and that has nothing to write is in neither of
    the reactor's lists: only its listener's factory knows it.
    """
    found = {c for c in [*reactor.getReaders(), *reactor.getWriters()] if isinstance(c, _Accepted)}
    for factory in factories:
        for protocol in list(factory.protocols):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                found.add(transport)
    return found


def tlsLayer(connection) -> Optional[TLSMemoryBIOProtocol]:
    """
    The TLS layer of an accepted connection, if it has one: its protocol
    after STLS or STARTTLS (C{startTLS} puts it in front), or the one
    inside the connection limiter's wrapper on an implicit-TLS listener.
    """
    protocol = getattr(connection, "protocol", None)
    while isinstance(protocol, ProtocolWrapper):
        if isinstance(protocol, TLSMemoryBIOProtocol):
            return protocol
        protocol = protocol.wrappedProtocol
    return None


def discardInput(connection, limit: int = DISCARD_LIMIT) -> None:
    """
    Read and throw away what C{connection}'s socket holds unread (at most
    C{limit} octets), without waiting: a socket closed with unread input
    is reset, and its peer may lose the last reply.
    """
    sock = getattr(connection, "socket", None)
    if sock is None:
        return
    try:
        while limit > 0:
            data = sock.recv(min(65536, limit))
            if not data:
                return
            limit -= len(data)
    except OSError:
        # Nothing more to read now (or the connection is broken).
        return


def closeGracefully(connection) -> None:
    """
    Close C{connection} after what was written to it.

    A TLS session is ended through its TLS layer (L{tlsLayer}): the close
    alert (close_notify) goes out after the output, then the connection
    closes, without waiting for the peer's own alert (TLS does not require
    it of the side that closes).  While a producer is registered (the
    protocols register one for the whole connection) the TLS layer does
    not shut down: it is unregistered first, and told that the connection
    is going away (C{stopProducing}), as a transport tells it when the
    connection is lost.  A session whose handshake has not finished is
    left to the TLS layer (it aborts one that has nothing to send).

    Before the connection is closed the input it did not read is thrown
    away (L{discardInput}).
    """
    if not connection.connected:
        return
    tls = tlsLayer(connection)
    if tls is not None:
        producer = getattr(connection, "producer", None)
        tls.unregisterProducer()
        if producer is not None:
            producer.stopProducing()
        tls.loseConnection()
        under, handle = tls.transport, tls.getHandle()
        if under is None or handle is None or not handle.get_shutdown() & SSL.SENT_SHUTDOWN:
            return
        discardInput(connection)
        # Under the TLS layer: after STLS or STARTTLS the connection's own
        # loseConnection would go through the TLS layer again.
        under.loseConnection()
        return
    discardInput(connection)
    connection.loseConnection()


def closeNow(connection) -> None:
    """
    Close C{connection} at once, orderly (a TCP FIN after what its socket
    still holds to send, not a reset), as the reactor's shutdown would;
    first throw away its unread input (L{discardInput}).
    """
    if not connection.connected:
        return
    discardInput(connection)
    connection.connectionLost(Failure(CONNECTION_LOST))


def closeConnections(reactor, timeout: float = CLOSE_TIMEOUT, factories: Iterable[WrappingFactory] = ()) -> defer.Deferred:
    """
    Close every connection the listeners of C{factories} (and C{reactor})
    accepted after what was written to it is sent (L{closeGracefully}),
    and wait until they are closed, at most C{timeout} seconds; then close
    those still open (their clients read nothing, L{closeNow}).  The
    reactor's own shutdown drops the connections at once, and with them
    the replies still in their buffers: a C{250} written when the commit
    it acknowledges finished, just before, would be lost.

    @return: a Deferred firing with C{None} once they are closed or the
        time is up.
    """
    connections = acceptedConnections(reactor, factories)
    for connection in connections:
        closeGracefully(connection)
    deadline = reactor.seconds() + timeout

    def check() -> None:
        if not any(c.connected for c in connections):
            loop.stop()
        elif reactor.seconds() >= deadline:
            left = [c for c in connections if c.connected]
            log.info(
                "stopping: {count} connection(s) did not take their last output within {timeout} s; closing them",
                count=len(left),
                timeout=timeout,
            )
            for c in left:
                closeNow(c)
            loop.stop()

    loop = task.LoopingCall(check)
    loop.clock = reactor
    return loop.start(0.01).addCallback(lambda _: None)


class StartupReport:
    """
    Tells the operator why C{twistd pop3gw} did not start (the data
    directory locked by another server, a port in use...), on the terminal
    it was started from.

    By the time the listeners bind (C{privilegedStartService}), C{twistd}
    has sent C{sys.stderr} into its log and, when daemonizing, pointed the
    process's descriptors 0 to 2 at C{/dev/null}, so the one line a start-up
    failure raises (a C{SystemExit}) reaches the log only; a daemonizing
    C{twistd} even waits for its daemon's word on a pipe forever.  This is
    made by L{makeService}, before either happens, and keeps a duplicate of
    descriptor 2 (not inherited by child processes) until the server has
    started.  On a failure L{failed} writes the line there, gives the
    waiting C{twistd} its answer (so it exits 1 rather than hang), and
    removes the pid file C{twistd} wrote for this process (which it only
    removes itself on other errors).  The C{SystemExit} still ends the
    process with status 1 and its line in the log.

    @ivar terminal: the duplicate of descriptor 2, until L{started} or
        L{failed}; C{None} if there was none.
    @ivar twistdOptions: C{twistd}'s own options (C{pidfile}, and
        C{statusPipe} once it has daemonized).
    """

    #: What the daemonizing C{twistd} prints after "An error has
    #: occurred:", below the line itself.
    STATUS = b"1 pop3gw did not start (the line above says why)"

    def __init__(self, terminal: Optional[int], twistdOptions: Any) -> None:
        self.terminal = terminal
        self.twistdOptions = twistdOptions

    @classmethod
    def fromOptions(cls, options: Any) -> Optional["StartupReport"]:
        """
        @param options: the parsed L{Options}, whose C{parent} is
            C{twistd}'s own when C{twistd} parsed them.
        @return: a report, or C{None} when not run by C{twistd}.
        """
        parent = getattr(options, "parent", None)
        if parent is None:
            return None
        try:
            terminal: Optional[int] = os.dup(2)
        except OSError:
            terminal = None
        return cls(terminal, parent)

    def _closeTerminal(self) -> None:
        fd, self.terminal = self.terminal, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def started(self) -> None:
        """
        The server has started: let the terminal go.  Idempotent.
        """
        self._closeTerminal()

    def failed(self, reason: str) -> None:
        """
        Tell the operator C{reason} (one line) and answer a daemonizing
        C{twistd}; remove the pid file written for this process.
        """
        # The pid file first: the waiting twistd exits once answered.
        pidfile = self.twistdOptions.get("pidfile")
        if pidfile:
            try:
                with open(pidfile, "rb") as f:
                    ours = f.read().strip() == str(os.getpid()).encode()
                if ours:
                    os.unlink(pidfile)
            except OSError:
                pass
        if self.terminal is not None:
            try:
                fsutil.writeAll(self.terminal, reason.encode("utf-8", "replace") + b"\n")
            except OSError:
                pass
            self._closeTerminal()
        pipe = self.twistdOptions.get("statusPipe")
        if pipe is not None:
            # twistd writes this pipe itself only for an Exception, never
            # for a SystemExit: the parent would wait for ever.
            self.twistdOptions["statusPipe"] = None
            try:
                fsutil.writeAll(pipe, self.STATUS)
                os.close(pipe)
            except OSError:
                pass


class ServerLockService(StagedService):
    """
    The whole server, holding an exclusive lock on L{SERVER_LOCK} in the
    data directory from before its first listener binds (or the queue
    starts) until every part of it has stopped.  A second server on the
    same data directory stops at start-up with one line naming the first
    one's pid, so two servers never run the same outbound queue.

    The lock is taken in L{privilegedStartService} (after C{twistd} has
    daemonized, so the pid written is the server's) and released when the
    last part has stopped; the kernel drops it if the process dies.
    """

    def __init__(self, dataDir: str, owner: Optional[fsutil.Owner] = None) -> None:
        super().__init__()
        self.dataDir = dataDir
        self.lockPath = os.path.join(dataDir, SERVER_LOCK)
        self.owner = owner
        self._lockFD: Optional[int] = None

    def _takeLock(self) -> None:
        if self._lockFD is not None:
            return
        try:
            self._lockFD = fsutil.takePidLock(self.lockPath, self.owner)
        except fsutil.LockHeld as e:
            holder = "another pop3gw server" + ("" if e.pid is None else f" (pid {e.pid})")
            raise SystemExit(f"pop3gw: {holder} is running on the data directory {self.dataDir}") from None
        except OSError as e:
            raise SystemExit(f"pop3gw: cannot lock {self.lockPath}: {e.strerror}") from None

    def releaseLock(self) -> None:
        """
        Release the lock, if held.  Idempotent.
        """
        fd, self._lockFD = self._lockFD, None
        if fd is not None:
            fsutil.releasePidLock(fd)

    #: Where a start-up failure is told under C{twistd} (set by
    #: L{makeService}).
    startupReport: Optional[StartupReport] = None

    @contextlib.contextmanager
    def _reportingFailure(self) -> Iterator[None]:
        """
        Tell a start-up failure's line (a C{SystemExit} with a text)
        through L{startupReport} too, then let it go on.
        """
        try:
            yield
        except SystemExit as e:
            if self.startupReport is not None and isinstance(e.code, str):
                self.startupReport.failed(e.code)
            raise

    def privilegedStartService(self) -> None:
        """
        Take the lock, then start the parts (listeners bind here).

        @raise SystemExit: another server holds the lock, or a listener
            cannot listen (one line, also told through L{startupReport}).
        """
        with self._reportingFailure():
            self._takeLock()
            super().privilegedStartService()

    def startService(self) -> None:
        """
        Take the lock unless held already, then start the parts.

        @raise SystemExit: another server holds the lock (one line, also
            told through L{startupReport}).
        """
        try:
            with self._reportingFailure():
                self._takeLock()
                super().startService()
        finally:
            if self.startupReport is not None:
                self.startupReport.started()

    def stopService(self) -> defer.Deferred:
        """
        Stop the parts (see L{StagedService.stopService}), then release the
        lock.
        """

        def release(result):
            self.releaseLock()
            return result

        return super().stopService().addBoth(release)


def _stopAll(services: list) -> defer.Deferred:
    """
    Stop C{services} together.

    @return: a C{Deferred} firing once all have stopped.
    """
    return defer.DeferredList([defer.maybeDeferred(s.stopService) for s in services]).addCallback(lambda _: None)


#: The permissions of a listener's Unix socket whose description names none.
UNIX_SOCKET_MODE = "660"


def _withUnixMode(description: str) -> str:
    """
    C{description} with C{mode=660} added when it is a Unix socket without
    a C{mode} (Twisted's default, 0666, lets every local user connect).
    """
    kind, _, rest = description.partition(":")
    if kind.strip().lower() != "unix" or re.search(r"(^|:)mode=", rest):
        return description
    return f"{description}:mode={UNIX_SOCKET_MODE}"


#: Listeners that answer anyone who reaches them, without a login: a
#: warning is logged when one listens on every interface.
UNAUTHENTICATED_LISTENERS = frozenset({"metrics"})


class ListenerService(StreamServerEndpointService):
    """
    A listener that fails start-up when it cannot bind and logs where it
    listens.
    """

    _raiseSynchronously = True
    stopStage = STOP_LISTENERS

    def __init__(self, reactor, name: str, description: str, factory) -> None:
        try:
            endpoint = serverFromString(reactor, _withUnixMode(description))
        except (ValueError, TypeError, KeyError, OverflowError) as e:
            raise ConfigError(f"--{name} {description}: not a valid endpoint description ({e})") from None
        super().__init__(endpoint, factory)
        self.name = f"{name}:{description}"
        self.listenerName = name
        self.description = description

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except (CannotListenError, OSError, ValueError, OverflowError) as e:
            # The most common operator mistake (a port in use, an address
            # not on this host): one line, not a traceback.
            raise SystemExit(f"pop3gw: {self.listenerName}: cannot listen on {self.description}: {_reason(e)}") from None
        waiting = self._waitingForPort
        assert waiting is not None, "set by privilegedStartService"
        waiting.addCallback(self._logListening)

    def _logListening(self, port):
        host = port.getHost()
        if hasattr(host, "port"):
            where = f"{host.host}:{host.port}"
        else:
            name = getattr(host, "name", None)
            where = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name or host)
        log.info("{listener} listening on {where} ({description})", listener=self.listenerName, where=where, description=self.description)
        if self.listenerName in UNAUTHENTICATED_LISTENERS and getattr(host, "host", None) in ("0.0.0.0", "::"):
            log.warn(
                "{listener} listening on every interface ({where}): it has no authentication;"
                " bind it to 127.0.0.1 or a management address (interface=...)",
                listener=self.listenerName,
                where=where,
            )
        return port


def _reason(e: Exception) -> str:
    """
    The operator-facing reason of a listening failure.
    """
    if isinstance(e, CannotListenError):
        inner = e.socketError
        return getattr(inner, "strerror", None) or str(inner)
    return getattr(e, "strerror", None) or str(e)


class ReloadService(Service):
    """
    Reloads the users file and the TLS certificate on SIGHUP (without
    dropping sessions).

    @ivar refreshUsers: re-reads the users directory off the reactor
        thread; returns a C{defer.Deferred}.
    """

    def __init__(self, reactor, refreshUsers, certs) -> None:
        self.reactor = reactor
        self.refreshUsers = refreshUsers
        self.certs = certs
        self._previous: Union[Callable[[int, Optional[FrameType]], Any], int, None] = None

    def startService(self) -> None:
        super().startService()
        try:
            self._previous = signal.signal(signal.SIGHUP, self._onSignal)
        except ValueError:  # not the main thread (tests)
            self._previous = None

    def stopService(self):
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _onSignal(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        log.info("SIGHUP: reloading users and TLS certificate")
        self.refreshUsers()
        if self.certs is not None:
            self.certs.reload()


def _raiseFileLimit() -> None:
    """
    Raise the open-files soft limit to the hard limit: every connection
    costs a descriptor, and the default soft limit (1024) is too low.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 65536
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def _readRelayPassword(config: Config) -> Optional[str]:
    if not config.relayPasswordFile:
        return None
    try:
        st = os.stat(config.relayPasswordFile)
        if st.st_mode & 0o077:
            raise ConfigError(f"{config.relayPasswordFile}: relay password file must not be readable by others (chmod 600)")
        with open(config.relayPasswordFile, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except OSError as e:
        raise ConfigError(f"cannot read relay password file: {e.strerror}") from None


class LocalDomains:
    """
    The local domains: those configured with C{--domain}, plus the domain of
    every user in the users directory (a user's mail is never relayed
    away), read from the directory's current snapshot, where they are
    gathered once per load.

    @ivar users: an L{IUserDirectory}.
    """

    def __init__(self, configured, users) -> None:
        self.configured = frozenset(configured)
        self.users = users

    def __contains__(self, domain: str) -> bool:
        if domain in self.configured:
            return True
        return domain in self.users.snapshot().domains()

    def __iter__(self):
        return iter(self.configured | self.users.snapshot().domains())


def makeService(options, reactor=None) -> MultiService:
    """
    Build the pop3gw application from parsed L{Options} (or a L{Config}).
    """
    if reactor is None:
        from twisted.internet import reactor
    config: Config = options if isinstance(options, Config) else options.config
    try:
        top = _build(config, reactor)
    except ConfigError as e:
        # One clear line for the operator, not a traceback.
        raise SystemExit(f"pop3gw: {e}") from None
    if isinstance(top, ServerLockService):
        top.startupReport = StartupReport.fromOptions(options)
    return top


def _databaseStores(
    config: Config, reactor, top: MultiService, hashThreads: int, owner: Optional[fsutil.Owner], worker: bool = False
) -> tuple:
    """
    The users directory and maildrops of C{--store postgresql://...}, with
    their own thread pool (L{Config.limits} C{database-threads}) and lock
    renewal; the connection pool holds one connection per thread that may
    use it (those and the hash threads, which look up passwords), and is
    closed once the database threads have stopped.  Each process of
    C{--workers N} has its own (the supervisor's without hash threads).

    @param worker: this is a worker process of C{--workers N}: the
        supervisor relays what it queues (see L{PostgresQueue.adopt}).

    @return: (users, maildrop store, the runner of database work, the
        outbound queue, the database).
    @raise ConfigError: the database's schema is missing or not current.
    """
    threads = max(1, int(config.limits["database-threads"]))
    database = Database(config.store, maxConnections=threads + hashThreads)
    reachable = True
    try:
        database.probe()
    except TemporaryFailure as e:
        # Served with temporary failures until the database answers; the
        # users are read by the first refresh that reaches it.
        log.warn("cannot check the database schema: {error}", error=str(e))
        reachable = False
    except ValueError as e:
        database.close()
        raise ConfigError(str(e)) from None
    pool = ThreadPool(minthreads=1, maxthreads=threads, name="pop3gw-db")
    runner = ThreadPoolRunner(reactor, pool)
    users = PostgresUsers(database, config.postmaster, config.recipientDelimiter)
    if reachable:
        users.refresh()
    store = PostgresMaildropStore(database, runner, workerNode(os.getppid()) if worker else None)
    queue = PostgresQueue(
        database, reactor, runner, store.node, os.path.join(config.dataDir, "relay"), owner, relays=not worker
    )

    def afterStop() -> None:
        # The relay has recorded its attempts: hand this node's queue
        # entries to the other nodes, then close the connections.
        queue.releaseAll()
        database.close()

    ThreadPoolService(pool, runner, afterStop=afterStop).setServiceParent(top)
    LockLeaseService(store, runner).setServiceParent(top)
    return users, store, runner, queue, database


class QueuePollService(TimerService):
    """
    Every L{QUEUE_POLL_INTERVAL} seconds, renews the leases of the queue
    entries this node holds, claims free ones for the relay and reads
    flush requests (L{PostgresQueue.poll}, in a database thread).
    """

    def __init__(self, queue: PostgresQueue, runner: ThreadPoolRunner) -> None:
        super().__init__(QUEUE_POLL_INTERVAL, self._poll)
        self.queue = queue
        self.runner = runner

    def _poll(self) -> defer.Deferred:
        d = self.runner.run(self.queue.poll)
        d.addCallbacks(
            self.queue.announceClaimed,
            lambda f: log.warn("cannot poll the outbound queue: {error}", error=str(f.value)),
        )
        return d


class LockLeaseService(TimerService):
    """
    Renews the maildrop locks this node holds every
    L{LOCK_RENEW_INTERVAL} seconds, and frees them all when the server
    stops (before the database threads stop).
    """

    def __init__(self, store: PostgresMaildropStore, runner: ThreadPoolRunner) -> None:
        super().__init__(LOCK_RENEW_INTERVAL, self._renew)
        self.store = store
        self.runner = runner

    def _renew(self) -> defer.Deferred:
        d = self.runner.run(self.store.renewLocks)
        d.addErrback(lambda f: log.warn("cannot renew maildrop locks: {error}", error=str(f.value)))
        return d

    def stopService(self) -> defer.Deferred:
        d = defer.maybeDeferred(super().stopService)

        def release(_: object) -> defer.Deferred:
            done = self.runner.run(self.store.releaseAll)
            done.addErrback(lambda f: log.warn("cannot release maildrop locks: {error}", error=str(f.value)))
            return done

        return d.addCallback(release)


def _checkPostmaster(config: Config, users: Any) -> None:
    """
    Warn at start-up when C{postmaster@} the local domains has no named
    receiver (RFC 5321 4.5.1 requires the address): it then goes to the
    first user of each domain.
    """
    if config.postmaster is None:
        log.warn(
            "no [pop3gw] postmaster is set: mail for postmaster@ each local domain goes to "
            "that domain's first user in the users file, and is refused for a domain that has no users"
        )
        return
    try:
        known = users.snapshot().exists(config.postmaster)
    except TemporaryFailure:
        return
    if not known:
        log.warn(
            "[pop3gw] postmaster {postmaster} is not a user: mail for postmaster@ each local domain goes to "
            "that domain's first user in the users file, and is refused for a domain that has no users",
            postmaster=str(config.postmaster),
        )


def _inboundChecker(config: Config, reactor: Any, top: MultiService) -> Optional[InboundChecker]:
    """
    The checks of mail received on C{--mx}, and on C{--lmtp} with
    C{lmtp-checks} (C{[inbound]}): their DNS work
    in a bounded pool of their own, started and stopped with the server;
    C{None} when there is nothing to check.
    """
    policy = config.inbound
    if not policy.checks and policy.rspamdURL is None:
        return None
    pool = ThreadPool(minthreads=0, maxthreads=DNS_THREADS, name="pop3gw-dns")
    runner = ThreadPoolRunner(reactor, pool)
    ThreadPoolService(pool, runner).setServiceParent(top)
    rspamd = None
    if policy.rspamdURL is not None:
        agent = Agent(reactor, connectTimeout=policy.rspamdTimeout)
        rspamd = RspamdClient(agent, policy.rspamdURL, reactor, policy.rspamdTimeout, config.hostname)
    return InboundChecker(config.hostname, policy, runner, reactor, rspamd=rspamd)


def _prepareDataDirectory(config: Config) -> Optional[fsutil.Owner]:
    """
    Create the data, mail and queue directories if missing (with a
    database store, the data directory only: it keeps this node's TLS
    material and local state).

    @return: the owner of what the server creates there.
    @raise ConfigError: a directory cannot be used.
    """
    owner = None
    paths = (config.dataDir,) if config.usesDatabase else (config.dataDir, config.mailDir, config.queueDir)
    for path in paths:
        try:
            fsutil.makeDirectories(path, owner)
            if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", path)
            if owner is None:
                owner = fsutil.dataDirectoryOwner(config.dataDir)
        except fsutil.ForeignDataDirectory as e:
            raise ConfigError(str(e)) from None
        except OSError as e:
            raise ConfigError(f"data directory: cannot use {path}: {e.strerror}") from None
    return owner


@attr.s(auto_attribs=True)
class _Core:
    """
    The parts every process of a server builds alike: thread pools, users,
    storage, the cred portal, TLS material and the protocol factories.

    @ivar plans: listener name -> (factory, implicit TLS, refusal line).
    """

    config: Config
    reactor: Any
    hashPool: ThreadPool
    ioPool: IOThreadPool
    ioRunner: ThreadPoolRunner
    users: Any
    store: Any
    queue: Any
    router: Router
    certs: CertificateManager
    serverTLS: Any
    plans: dict
    storeRunner: Any = None
    keyring: Optional[Keyring] = None

    def refreshUsers(self) -> defer.Deferred:
        """
        Re-read the users directory in the I/O pool (a stat of each file, a
        read only when one changed); the reactor thread only ever reads
        the snapshot.
        """
        d = (self.storeRunner or self.ioRunner).run(self.users.refresh)
        d.addErrback(lambda f: log.failure("cannot refresh the users directory", f))
        return d

    def refreshKeys(self) -> defer.Deferred:
        """
        A stat of the DKIM key files (or one query of the database's key
        version), a read only when they changed.
        """
        keyring = self.keyring
        if keyring is None:
            return defer.succeed(None)
        d = (self.storeRunner or self.ioRunner).run(keyring.refresh)
        d.addErrback(lambda f: log.failure("cannot refresh the DKIM keys", f))
        return d

    def addTimers(self, top: MultiService) -> None:
        """
        The periodic checks every serving process runs: users, DKIM keys,
        TLS files.
        """
        TimerService(USERS_CHECK_INTERVAL, self.refreshUsers).setServiceParent(top)
        TimerService(USERS_CHECK_INTERVAL, self.refreshKeys).setServiceParent(top)
        TimerService(TLS_CHECK_INTERVAL, self.certs.reloadIfChanged).setServiceParent(top)

    def limitedFactory(self, name: str, peerCounts: PeerCounts) -> ConnectionLimitFactory:
        """
        The factory of listener C{name}: the served factory (inside TLS for
        an implicit-TLS listener) inside the connection caps.
        """
        served, implicitTLS, refusal = self.plans[name]
        wrapped: IProtocolFactory = served
        if implicitTLS:
            # Implicit-TLS listeners close a connection over the limits
            # without a byte: the limiter is outside the TLS layer (so a
            # flood costs no handshakes), and a plaintext refusal would land
            # in the client's TLS handshake.
            wrapped = TLSMemoryBIOFactory(self.serverTLS, False, served, self.reactor)
            wrapped.noisy = False
        limits = self.config.limits
        return ConnectionLimitFactory(
            wrapped, limits["max-connections"], limits["max-connections-per-ip"], refusal, peerCounts, self.reactor
        )


def _localDelivery(users: Any, store: Any):
    """
    A function delivering a message pop3gw itself writes (a bounce, a
    notice) to the local user C{sender} resolves to.
    """

    def deliver(sender: Address, data: bytes):
        recipients = users.snapshot().resolve(sender)
        if not recipients:
            return defer.fail(UnknownUser(str(sender)))
        delivery = store.beginDelivery(list(recipients))
        delivery.write(data)
        return delivery.commit()

    return deliver


def _buildCore(
    config: Config,
    reactor,
    owner: Optional[fsutil.Owner],
    top: MultiService,
    checksPasswords: bool = True,
    worker: bool = False,
) -> _Core:
    """
    Build the parts every process serving connections has, adding to
    C{top} the services they need (thread pools, database pools, the
    signing processes, the login history).

    @param checksPasswords: whether this process logs users in (the
        supervisor of workers does not: it starts no hashing threads).
    @param worker: this is a worker process of C{--workers N}.
    """
    hashPool = ThreadPool(minthreads=1, maxthreads=max(1, config.limits["hash-threads"]), name="pop3gw-auth")
    hashRunner = ThreadPoolRunner(reactor, hashPool)
    ioPool = IOThreadPool(IO_THREADS, name="pop3gw-io")
    ioRunner = ThreadPoolRunner(reactor, ioPool)
    if checksPasswords:
        ThreadPoolService(hashPool, hashRunner).setServiceParent(top)
    ThreadPoolService(ioPool, ioRunner).setServiceParent(top)

    users: Any
    store: Any
    storeRunner = ioRunner
    queue: Any
    database: Optional[Database] = None
    if config.usesDatabase:
        users, store, storeRunner, queue, database = _databaseStores(
            config, reactor, top, hashPool.max if checksPasswords else 0, owner, worker
        )
    else:
        users = UsersFile(config.usersPath, config.aliasesPath, owner, config.postmaster, config.recipientDelimiter)
        store = MaildirStore(config.mailDir, ioRunner, config.hostname, owner)
        queue = OutboundQueue(config.queueDir, reactor, ioRunner, owner, store.syncer)
    keyring = Keyring(PostgresKeyStore(database) if database is not None else KeyStore(config.dataDir))
    if database is None:
        # A database's keys are read by the first timed refresh, in its
        # runner: the reactor thread never waits for the database.
        keyring.refresh()
    # DKIM signing is CPU work that holds the GIL: other processes do it.
    signRunner = ProcessPoolRunner(reactor)
    ProcessPoolService(signRunner).setServiceParent(top)
    router = Router(LocalDomains(config.domains, users), users, store, SigningQueue(queue, keyring, signRunner))
    sendingLimits: ISendingRecords
    appPasswords: IAppPasswords
    if database is not None:
        sendingLimits = PostgresSendingLimits(
            database, config.limits["messages-per-hour"], config.limits["recipients-per-day"]
        )
        appPasswords = PostgresAppPasswords(database)
    else:
        sendingLimits = SendingLimits(
            config.dataDir, config.limits["messages-per-hour"], config.limits["recipients-per-day"], owner
        )
        appPasswords = AppPasswords(os.path.join(config.dataDir, APP_PASSWORDS), config.usersPath + ".lock", owner)
    if database is not None:
        watch = LoginWatch(reactor, runner=storeRunner, store=PostgresLoginHistory(database))
    else:
        watch = LoginWatch(reactor, os.path.join(config.dataDir, LOGIN_HISTORY), ioRunner, owner)
    if database is None:
        watch.load()
    # A database's history is read when the service starts, in its runner.
    LoginWatchService(watch, loadAtStart=database is not None).setServiceParent(top)
    checker = PasswordChecker(
        users,
        reactor,
        hashPool,
        config.limits["failure-delay"],
        runner=hashRunner,
        accounting=AuthAccounting(reactor, hashThreads=hashPool.max),
        watch=watch,
        appPasswords=appPasswords,
        recordUse=sendingLimits.recordUse,
    )
    deliverLocally = _localDelivery(users, store)

    def notifyPostmaster(suspension: Suspension) -> defer.Deferred:
        if config.postmaster is None:
            log.warn(
                "sending suspended for {user}, but no [pop3gw] postmaster is set to tell", user=suspension.user
            )
            return defer.succeed(None)
        message = noticeMessage(
            suspension,
            config.hostname,
            str(config.postmaster),
            formatDate(time.time()),
            f"<{uuid.uuid4().hex}@{config.hostname}>",
        )
        return deliverLocally(config.postmaster, message)

    # With a database store, the records are database work: its threads
    # hold the connections.
    sending = SendingPolicy(sendingLimits, storeRunner, notifyPostmaster, reactor=reactor)
    SendingRecordsService(sending).setServiceParent(top)
    portal = Portal(Realm(users, store, router, sending), [checker])
    policy = PlaintextAuthPolicy(config.plaintextAuth)

    certs = CertificateManager(
        config.dataDir,
        config.tlsCert,
        config.tlsKey,
        config.hostname,
        owner=owner,
        preferred=acmePaths(config.dataDir) if config.acme.enabled else None,
    )
    try:
        certs.load()
    except TLSConfigError as e:
        raise ConfigError(str(e)) from None
    serverTLS = certs.serverContextFactory()

    limits = config.limits
    pop3Factory = POP3Factory(
        portal,
        policy.allows,
        reactor,
        tlsContextFactory=serverTLS,
        idleTimeout=limits["pop3-idle-timeout"],
        hostname=config.hostname,
        loginTimeout=limits["login-timeout"] or None,
    )
    submissionFactory = SubmissionFactory(
        portal,
        policy.allows,
        reactor,
        config.hostname,
        maxMessageSize=config.maxMessageSize,
        tlsContextFactory=serverTLS,
        maxRecipients=limits["max-recipients"],
        checkHeaderFrom=config.checkHeaderFrom,
        idleTimeout=limits["smtp-idle-timeout"],
        loginTimeout=limits["login-timeout"] or None,
    )
    inboundChecker = None
    if config.listeners["mx"] or (config.listeners["lmtp"] and config.inbound.lmtpChecks):
        inboundChecker = _inboundChecker(config, reactor, top)
    mxFactory = MXFactory(
        router,
        reactor,
        config.hostname,
        maxMessageSize=config.maxMessageSize,
        tlsContextFactory=serverTLS,
        maxRecipients=limits["max-recipients"],
        idleTimeout=limits["smtp-idle-timeout"],
        resolver=MXResolver(reactor, server=config.inbound.dnsServer),
        postmaster=config.postmaster,
        checker=inboundChecker,
    )

    lmtpFactory = LMTPFactory(
        router,
        reactor,
        config.hostname,
        maxMessageSize=config.maxMessageSize,
        maxRecipients=limits["max-recipients"],
        idleTimeout=limits["smtp-idle-timeout"],
        postmaster=config.postmaster,
        checker=inboundChecker if config.inbound.lmtpChecks else None,
    )

    for factory in (pop3Factory, submissionFactory, mxFactory, lmtpFactory):
        factory.noisy = False  # no "Starting factory <repr>" lines in the log

    plans: dict[str, tuple[IProtocolFactory, bool, Optional[bytes]]] = {
        "pop3": (pop3Factory, False, POP3_REFUSAL),
        "pop3s": (pop3Factory, True, None),
        "submission": (submissionFactory, False, SMTP_REFUSAL),
        "submissions": (submissionFactory, True, None),
        "mx": (mxFactory, False, SMTP_REFUSAL),
        "lmtp": (lmtpFactory, False, SMTP_REFUSAL),
        # A socketmap client over the limits sees the connection closed and
        # answers Postfix with a temporary failure.
        "postfix-map": (SocketmapFactory(router), False, None),
    }
    return _Core(
        config, reactor, hashPool, ioPool, ioRunner, users, store, queue, router, certs, serverTLS, plans,
        storeRunner, keyring,
    )


def _addRelay(core: _Core, top: MultiService) -> RelayService:
    """
    Add the relay of the outbound queue to C{top}.
    """
    config, reactor = core.config, core.reactor

    def clientTLS(hostname: str, verify: bool):
        if verify is None:
            return opportunisticClientContextFactory(hostname)
        return clientContextFactory(hostname, verify)

    router = core.router
    relay = RelayService(
        core.queue,
        reactor,
        config.hostname,
        _localDelivery(core.users, core.store),
        relayHost=config.relayHost,
        relayPort=config.relayPort,
        relayUsername=config.relayUsername,
        relayPassword=_readRelayPassword(config),
        relayVerifyTLS=config.relayVerifyTLS,
        clientTLS=clientTLS,
        lifetime=config.limits["queue-lifetime"],
        postmasterOf=lambda sender: noticeRecipient(sender, config.postmaster, config.hostname, router.isLocalDomain),
        maxConnections=int(config.limits["relay-connections"]),
    )
    relay.setServiceParent(top)
    if not config.relayHost and config.mtaSTS:
        # Direct MX delivery applies the recipient domains' MTA-STS
        # policies (RFC 8461), cached across restarts.
        cacheFile = CacheFile(os.path.join(config.dataDir, MTA_STS_CACHE), core.ioRunner)
        relay.dispatcher.mtaSTS = PolicySource(reactor, relay.dispatcher.mx.lookupTXT, makeFetcher(reactor), cacheFile)
    if isinstance(core.queue, PostgresQueue):
        core.queue.addLossListener(relay.dropEntry)
        QueuePollService(core.queue, core.storeRunner).setServiceParent(top)
    return relay


def _addOperatorListeners(core: _Core, top: MultiService, relay: RelayService, owner: Optional[fsutil.Owner],
                          metrics: Optional[Metrics]) -> None:
    """
    Add what only the process that runs the relay serves: C{--metrics}
    and the ACME renewal with its HTTP-01 listener.
    """
    config, reactor = core.config, core.reactor
    limits = config.limits
    peerCounts = PeerCounts()

    def limited(factory: IProtocolFactory) -> IProtocolFactory:
        return ConnectionLimitFactory(
            factory, limits["max-connections"], limits["max-connections-per-ip"], None, peerCounts, reactor
        )

    if metrics is not None:
        metrics.watchQueue(lambda: list(relay.entries.values()))
        metrics.watchCertificate(core.certs.expiry)
        MetricsService(metrics).setServiceParent(top)
        site = metricsSite(metrics, lambda: healthProblems(config.dataDir, metrics))
        for description in config.listeners["metrics"]:
            ListenerService(reactor, "metrics", description, limited(site)).setServiceParent(top)
    if config.acme.enabled:
        tokens = ChallengeTokens()
        obtainer = CertificateObtainer(config.dataDir, config.hostname, config.acme, tokens, owner)
        renewer = Renewer(obtainer, core.ioRunner, reactor, core.certs.reloadIfChanged)
        for description in config.acme.http:
            ListenerService(reactor, "acme", description, limited(challengeSite(tokens))).setServiceParent(top)
        TimerService(ACME_CHECK_INTERVAL, renewer.check).setServiceParent(top)


def _logStart(config: Config, core: _Core, relay: RelayService) -> None:
    if not any(config.listeners[name] for name in core.plans):
        log.warn("no POP3, submission, MX or LMTP listener is configured: only the outbound queue runs")
    log.info(
        "pop3gw data directory {dataDir}; store {store}; local domains: {domains}; plaintext auth: {policy}",
        dataDir=config.dataDir,
        store=redact(config.store),
        domains=", ".join(config.domains) or "(domains of users)",
        policy=config.plaintextAuth,
    )
    _checkPostmaster(config, core.users)
    if config.relayHost:
        log.info("relaying non-local mail through {host}:{port}", host=config.relayHost, port=relay.relayPort)
    else:
        log.info("relaying non-local mail directly to the recipient domains' MX hosts")


def _build(config: Config, reactor) -> MultiService:
    _raiseFileLimit()
    owner = _prepareDataDirectory(config)
    if config.workers > 1:
        return _buildSupervisor(config, reactor, owner)

    top = ServerLockService(config.dataDir, owner)
    top.reactor = reactor
    # Started first and stopped last: twistd's text log, written once per
    # reactor turn while the server runs (see pop3gw.textlog).
    TextLogService(reactor).setServiceParent(top)
    core = _buildCore(config, reactor, owner, top)
    metrics = Metrics() if config.listeners["metrics"] else None
    peerCounts = PeerCounts()
    for name in core.plans:
        for description in config.listeners[name]:
            limiter = core.limitedFactory(name, peerCounts)
            ListenerService(reactor, name, description, limiter).setServiceParent(top)
            if metrics is not None:
                metrics.watchSessions(name, _openConnections(limiter))

    relay = _addRelay(core, top)
    _addOperatorListeners(core, top, relay, owner, metrics)
    ReloadService(reactor, core.refreshUsers, core.certs).setServiceParent(top)
    core.addTimers(top)
    _logStart(config, core, relay)
    return top


# --- Several processes (--workers N) ----------------------------------------


class BoundListenerService(ListenerService):
    """
    A listener the supervisor binds, and never accepts on: its socket goes
    to the workers (see L{pop3gw.supervisor}).

    @ivar port: the listening port, once bound.
    """

    def __init__(self, reactor, name: str, description: str) -> None:
        placeholder = Factory()
        placeholder.noisy = False
        super().__init__(reactor, name, description, placeholder)
        self.port: Any = None

    def _logListening(self, port):
        port.stopReading()
        self.port = port
        return super()._logListening(port)

    def inherited(self, fd: int) -> InheritedListener:
        """
        @return: this socket as a worker sees it, as descriptor C{fd}.
        """
        assert self.port is not None, "bound in privilegedStartService"
        family = self.port.socket.family
        mode = getattr(self.port, "mode", None) if family == socket.AF_UNIX else None
        return InheritedListener(self.listenerName, self.description, fd, family, mode)


#: What a worker process runs: L{pop3gw.worker.main} from the directory the
#: supervisor's C{pop3gw} package was imported from (C{sys.argv[1]}), which
#: takes the place of the working directory at the head of C{sys.path}; a
#: C{pop3gw} directory in the working directory (a source tree) is not
#: picked up instead.
WORKER_BOOTSTRAP = "import sys; sys.path[0] = sys.argv[1]; from pop3gw.worker import main; main()"


def workerCommand() -> list[str]:
    """
    @return: the command line of a worker process.
    """
    import pop3gw

    root = os.path.dirname(os.path.dirname(os.path.abspath(pop3gw.__file__)))
    return [sys.executable, "-c", WORKER_BOOTSTRAP, root]


def _databaseQueueAdoption(core: _Core, queue: PostgresQueue, relay: RelayService) -> tuple:
    """
    How the supervisor of workers learns of mail its workers queued in the
    database: it takes a reported entry over at once
    (L{PostgresQueue.adopt}); when a worker ended, a poll claims what it
    left, once its lease ran out.

    @return: (called with a reported queue id, called when a worker ended).
    """

    def adopted(entry: Optional[Entry]) -> None:
        if entry is not None and relay.running:
            queue.announce(entry)

    def onQueued(queueId: str) -> None:
        d = core.storeRunner.run(queue.adopt, queueId)
        d.addCallback(adopted)
        d.addErrback(
            lambda f: log.warn("cannot take queue entry {queueId} over: {error}", queueId=queueId, error=str(f.value))
        )

    def rescanQueue() -> None:
        if not relay.running:
            return
        d = core.storeRunner.run(queue.poll)
        d.addCallback(queue.announceClaimed)
        d.addErrback(lambda f: log.warn("cannot poll the outbound queue: {error}", error=str(f.value)))

    return onQueued, rescanQueue


def _buildSupervisor(config: Config, reactor, owner: Optional[fsutil.Owner]) -> MultiService:
    """
    The supervisor of C{config.workers} worker processes: it holds the
    lock, binds the listeners, runs the outbound queue, and starts the
    workers (L{pop3gw.worker}), which serve the listeners.
    """
    top = ServerLockService(config.dataDir, owner)
    top.reactor = reactor
    core = _buildCore(config, reactor, owner, top, checksPasswords=False)

    bound: list[BoundListenerService] = []
    for name in core.plans:
        for description in config.listeners[name]:
            listener = BoundListenerService(reactor, name, description)
            listener.setServiceParent(top)
            bound.append(listener)

    relay = _addRelay(core, top)
    # Served by the supervisor: the relay's, the queue's and the
    # certificate's numbers, and the workers' counts and sessions, which
    # they report (MetricsReporter).
    metrics = Metrics() if config.listeners["metrics"] else None
    _addOperatorListeners(core, top, relay, owner, metrics)
    if metrics is not None:
        for name in {b.listenerName for b in bound}:
            metrics.watchSessions(name, functools.partial(metrics.workerSessions, name))
    queue = core.queue

    def adopt(entry: Optional[Entry]) -> None:
        # Announced once: an entry the relay knows, or whose files it has
        # removed meanwhile (done), is left alone.
        if entry is not None and entry.queueId not in relay.entries and queue.hasEntry(entry.queueId):
            queue.announce(entry)

    def onQueued(queueId: str) -> None:
        d = core.ioRunner.run(queue.readEntry, queueId)
        d.addCallback(adopt)
        d.addErrback(lambda f: log.failure("cannot read queue entry {queueId}", f, queueId=queueId))

    def rescanQueue() -> None:
        # A worker that died may have queued a message it had no time to
        # report.
        if not relay.running:
            return
        d = core.ioRunner.run(queue.loadEntries)
        def adoptAll(entries: list) -> None:
            for entry in entries:
                adopt(entry)

        d.addCallback(adoptAll)
        d.addErrback(lambda f: log.failure("cannot read the queue", f))

    if isinstance(queue, PostgresQueue):
        onQueued, rescanQueue = _databaseQueueAdoption(core, queue, relay)

    def setup(number: int) -> bytes:
        listeners = tuple(b.inherited(FIRST_LISTENER_FD + i) for i, b in enumerate(bound))
        return encodeSetup(WorkerSetup(config, number, listeners, logText=pool.logWrite is not None))

    def spawn(worker: WorkerProcess) -> None:
        childFDs: dict[int, Union[int, str]] = {0: "w", 1: "r", 2: "r", CONTROL_FD: "r"}
        for i, b in enumerate(bound):
            childFDs[FIRST_LISTENER_FD + i] = b.port.fileno()
        reactor.spawnProcess(worker, sys.executable, workerCommand(), env=dict(os.environ), childFDs=childFDs)

    def onMetrics(number: int, report: Optional[dict]) -> None:
        if metrics is None:
            return
        if report is None:
            metrics.forgetWorker(number)
        else:
            metrics.addWorkerReport(number, report)

    pool = WorkerPool(
        config.workers,
        spawn,
        setup,
        reactor,
        onQueued=onQueued,
        onWorkerEnded=rescanQueue,
        onMetrics=onMetrics,
        findLogWrite=textLogWriter,
    )
    pool.setServiceParent(top)

    def reload() -> defer.Deferred:
        pool.signalAll("HUP")
        return core.refreshUsers()

    ReloadService(reactor, reload, None).setServiceParent(top)
    TimerService(USERS_CHECK_INTERVAL, core.refreshUsers).setServiceParent(top)
    TimerService(USERS_CHECK_INTERVAL, core.refreshKeys).setServiceParent(top)
    TimerService(TLS_CHECK_INTERVAL, core.certs.reloadIfChanged).setServiceParent(top)
    log.info("pop3gw: {count} worker processes serve the listeners", count=config.workers)
    _logStart(config, core, relay)
    return top


class _InheritedUnixPort(unix.Port):
    """
    A Unix socket a worker inherited: the supervisor made its file and
    removes it.  Adopting it sets the file's mode again (Twisted's
    C{startListening} does), so it is given the mode the supervisor set;
    closing it leaves the file alone.
    """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        tcp.Port.connectionLost(self, reason)


class AdoptedListenerService(Service):
    """
    A worker's listener: the socket the supervisor bound, adopted.  On stop
    it only stops accepting (the supervisor owns the socket: a Unix socket's
    file is its to remove).
    """

    stopStage = STOP_LISTENERS

    def __init__(self, reactor, listener: InheritedListener, factory: IProtocolFactory) -> None:
        self.reactor = reactor
        self.listener = listener
        self.factory = factory
        self.name = f"{listener.name}:{listener.description}"
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        listener = self.listener
        if listener.family == socket.AF_UNIX and isinstance(self.reactor, PosixReactorBase):
            port = _InheritedUnixPort._fromListeningDescriptor(self.reactor, listener.fd, self.factory)
            if listener.mode is not None:
                port.mode = listener.mode
            port.startListening()
            self.port = port
        else:
            self.port = self.reactor.adoptStreamPort(listener.fd, listener.family, self.factory)
        os.close(listener.fd)

    def stopService(self) -> None:
        super().stopService()
        if self.port is not None:
            self.port.stopReading()


def makeWorkerService(setup: WorkerSetup, reactor, link: WorkerLink) -> MultiService:
    """
    Build one worker process's service from its L{WorkerSetup}: the
    listeners it inherited, with per-address counts kept by the supervisor
    through C{link}; no lock (the supervisor holds it) and no relay (the
    supervisor runs it: a queued message is reported through C{link}).
    """
    config = setup.config
    assert isinstance(config, Config)
    _raiseFileLimit()
    owner = fsutil.dataDirectoryOwner(config.dataDir)
    top = StagedService()
    top.reactor = reactor
    core = _buildCore(config, reactor, owner, top, worker=True)
    peerCounts = SharedPeerCounts(link)
    limiters: dict[str, list] = {}
    for listener in setup.listeners:
        limiter = core.limitedFactory(listener.name, peerCounts)
        limiters.setdefault(listener.name, []).append(limiter)
        AdoptedListenerService(reactor, listener, limiter).setServiceParent(top)
    if config.listeners["metrics"]:
        # The supervisor serves --metrics; this worker reports to it.
        metrics = Metrics()
        MetricsService(metrics).setServiceParent(top)
        sessions = lambda: {name: sum(limiter.total for limiter in group) for name, group in limiters.items()}  # noqa: E731
        reporter = MetricsReporter(metrics.counterTotals, sessions, link)
        MetricsReportService(reporter).setServiceParent(top)
    core.queue.addListener(lambda entry: link.queued(entry.queueId))
    ReloadService(reactor, core.refreshUsers, core.certs).setServiceParent(top)
    core.addTimers(top)
    return top
