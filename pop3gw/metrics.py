# -*- test-case-name: tests.test_metrics -*-
"""
Numbers an operator can watch: C{--metrics ENDPOINT} serves C{/metrics}
(Prometheus text format, C{pop3gw_} series, through C{prometheus_client})
and C{/healthz} over HTTP.

The event counters are fed by the server's own log events (L{Metrics} is
a Twisted log observer that reads their fields, never their text), so a
number on the dashboard and a line in the log can never disagree, and the
protocol code carries no metrics calls.  The gauges (sessions open, queue
depth and age, certificate expiry) are read when scraped, from callables
the service hands over.  With C{--workers N}, the supervisor serves
C{/metrics}: each worker counts its own events and reports the increments
of L{WORKER_COUNTERS} and its open sessions every
L{pop3gw.workerlink.METRICS_INTERVAL} (L{Metrics.addWorkerReport}), so
the series are the sums over every worker.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.logger import ILogObserver
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from pop3gw.httpsite import getOnlySite

#: Seconds of outbound-queue age after which C{/healthz} says unhealthy.
QUEUE_AGE_UNHEALTHY = 4 * 3600.0

#: Relay latencies kept for messages still queued, at most.
MAX_TRACKED = 100_000

FSYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RELAY_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0)

#: The counters a worker process reports to the supervisor (by family
#: name): the ones its sessions drive.
WORKER_COUNTERS = ("pop3gw_logins", "pop3gw_login_failures", "pop3gw_connections_refused", "pop3gw_messages_accepted")

#: Longest label value taken from a worker's report.
MAX_LABEL = 64

_ACCEPTED = {"submission: accepted": "submission", "mx: accepted": "mx", "lmtp: accepted": "lmtp"}

#: The services whose logins are counted.
_LOGIN_SERVICES = ("pop3", "submission")


def _loginService(event: dict) -> Optional[str]:
    """
    The service of a login event, if it is one whose logins are counted
    (L{_LOGIN_SERVICES}); C{None} for anything else.
    """
    service = event.get("service")
    return service if service in _LOGIN_SERVICES else None


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


@implementer(ILogObserver)
class Metrics:
    """
    The registry of one server process, and the log observer that feeds
    its counters.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._clock = clock
        self.logins = Counter("pop3gw_logins", "Successful logins.", ["service"], registry=r)
        self.loginFailures = Counter("pop3gw_login_failures", "Failed logins (wrong credentials).", ["service"],
                                     registry=r)
        self.connectionsRefused = Counter("pop3gw_connections_refused", "Connections refused over the limits.",
                                          registry=r)
        self.accepted = Counter("pop3gw_messages_accepted", "Messages accepted (250), per listener.",
                                ["listener"], registry=r)
        self.relayed = Counter("pop3gw_relay_recipients",
                               "Recipients of relayed messages, delivered or failed, counted when the message "
                               "leaves the queue.", ["result"], registry=r)
        self.deferrals = Counter("pop3gw_relay_deferrals",
                                 "Relay attempts that left a domain's recipients deferred.", registry=r)
        self.bounced = Counter("pop3gw_messages_bounced", "Bounces sent to senders.", registry=r)
        self.relayLatency = Histogram("pop3gw_relay_latency_seconds",
                                      "From queueing to the end of relaying, per message.",
                                      buckets=RELAY_BUCKETS, registry=r)
        self.fsyncLatency = Histogram("pop3gw_fsync_seconds", "Duration of each fsync (files and directories).",
                                      buckets=FSYNC_BUCKETS, registry=r)
        self.sessions = Gauge("pop3gw_sessions_open", "Connections open, per listener.", ["listener"], registry=r)
        self.queueDepth = Gauge("pop3gw_queue_messages", "Messages waiting in the outbound queue.", registry=r)
        self.queueOldest = Gauge("pop3gw_queue_oldest_age_seconds", "Age of the oldest queued message.",
                                 registry=r)
        self.certExpiry = Gauge("pop3gw_tls_certificate_expiry_timestamp_seconds",
                                "When the served TLS certificate expires (POSIX seconds).", registry=r)
        for service in ("pop3", "submission"):
            self.logins.labels(service)
            self.loginFailures.labels(service)
        for listener in _ACCEPTED.values():
            self.accepted.labels(listener)
        for result in ("delivered", "failed"):
            self.relayed.labels(result)
        self._queued: Dict[str, float] = {}
        self._byName = {
            "pop3gw_logins": self.logins,
            "pop3gw_login_failures": self.loginFailures,
            "pop3gw_connections_refused": self.connectionsRefused,
            "pop3gw_messages_accepted": self.accepted,
        }
        self._workerSessions: Dict[int, Dict[str, int]] = {}

    # -- the workers' numbers (--workers N) -----------------------------------

    def counterTotals(self) -> dict:
        """
        The totals of this process's L{WORKER_COUNTERS}: family name ->
        label value (C{""} for a counter without labels) -> total.
        """
        totals: dict = {}
        for family in self.registry.collect():
            if family.name in WORKER_COUNTERS:
                byLabel = totals.setdefault(family.name, {})
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        byLabel[next(iter(sample.labels.values()), "")] = sample.value
        return totals

    def addWorkerReport(self, worker: int, report: dict) -> None:
        """
        Take one report of worker C{worker}: C{counts}, the increments of
        its L{WORKER_COUNTERS} since its last report (as
        L{counterTotals}), added to this process's counters; C{sessions},
        its open connections per listener now.  Anything else in it
        (unknown names, values that are not positive numbers) is ignored.
        """
        counts = report.get("counts")
        for name, byLabel in (counts.items() if isinstance(counts, dict) else ()):
            counter = self._byName.get(name)
            if counter is None or not isinstance(byLabel, dict):
                continue
            for label, n in byLabel.items():
                if not isinstance(n, (int, float)) or isinstance(n, bool) or not n > 0:
                    continue
                if name == "pop3gw_connections_refused":
                    if label == "":
                        counter.inc(n)
                elif isinstance(label, str) and 0 < len(label) <= MAX_LABEL:
                    counter.labels(label).inc(n)
        sessions = report.get("sessions")
        if isinstance(sessions, dict):
            self._workerSessions[worker] = {
                str(k): int(v) for k, v in sessions.items() if isinstance(v, int) and not isinstance(v, bool)
            }

    def forgetWorker(self, worker: int) -> None:
        """
        Worker C{worker} ended: its sessions are closed.
        """
        self._workerSessions.pop(worker, None)

    def workerSessions(self, listener: str) -> int:
        """
        The connections open on C{listener} over every worker, as last
        reported.
        """
        return sum(counts.get(listener, 0) for counts in self._workerSessions.values())

    # -- the log observer --------------------------------------------------

    def __call__(self, event: dict) -> None:
        """
        Count one log event (see the module docstring).
        """
        text = event.get("log_format")
        if not isinstance(text, str) or "pop3gw_worker" in event:
            # A worker's event the supervisor logs for it (--syslog): the
            # worker counted it, and reports its counts.
            return
        try:
            self._count(text, event)
        except Exception:
            # A metrics mistake must never break logging.
            pass

    def _count(self, text: str, event: dict) -> None:
        if text.startswith(("login: ", "authentication failed: ")):
            service = _loginService(event)
            if service is not None:
                counter = self.logins if text.startswith("login: ") else self.loginFailures
                counter.labels(service).inc()
        elif text.startswith("connection refused: too many"):
            self.connectionsRefused.inc()
        elif text.startswith(("submission: accepted", "mx: accepted", "lmtp: accepted")):
            self.accepted.labels(_ACCEPTED[text.split(" id=", 1)[0]]).inc()
        elif text.startswith("queue: queued "):
            if len(self._queued) < MAX_TRACKED:
                self._queued[str(event.get("queueId"))] = self._clock()
        elif text.startswith("relay: "):
            self._relay(text, event)

    def _relay(self, text: str, event: dict) -> None:
        if text.startswith("relay: {queueId} done"):
            self.relayed.labels("delivered").inc(_int(event.get("delivered")))
            self.relayed.labels("failed").inc(_int(event.get("failed")))
            started = self._queued.pop(str(event.get("queueId")), None)
            if started is not None:
                self.relayLatency.observe(max(0.0, self._clock() - started))
        elif " deferred={deferred} " in text:
            if _int(event.get("deferred")):
                self.deferrals.inc()
        elif text.startswith("relay: {queueId} domain={domain} result={result}"):
            if event.get("result") == "deferred":
                self.deferrals.inc()
        elif text.startswith("relay: bounce for ") and " sent to " in text:
            self.bounced.inc()

    # -- gauges read when scraped --------------------------------------------

    def watchSessions(self, listener: str, count: Callable[[], int]) -> None:
        """
        Report C{count()} as the open connections of C{listener} (summed
        over its endpoints).
        """
        counters = getattr(self, "_sessionCounters", {})
        self._sessionCounters = counters
        counters.setdefault(listener, []).append(count)
        self.sessions.labels(listener).set_function(lambda: sum(c() for c in counters[listener]))

    def watchQueue(self, entries: Callable[[], list], now: Callable[[], float] = time.time) -> None:
        """
        Report the outbound queue: C{entries()} gives the queued entries
        (each with C{created}, POSIX seconds).
        """
        self._queueEntries = entries
        self._wallclock = now
        self.queueDepth.set_function(lambda: len(entries()))
        self.queueOldest.set_function(self.oldestQueued)

    def oldestQueued(self) -> float:
        """
        The age in seconds of the oldest queued message (0: none).
        """
        entries = getattr(self, "_queueEntries", None)
        if entries is None:
            return 0.0
        created = [e.created for e in entries()]
        return max(0.0, self._wallclock() - min(created)) if created else 0.0

    def watchCertificate(self, expiry: Callable[[], Optional[float]]) -> None:
        """
        Report C{expiry()} (POSIX seconds, or C{None}: no certificate).
        """
        self.certExpiry.set_function(lambda: expiry() or 0.0)

    def fsyncTimed(self, seconds: float) -> None:
        """
        Record one fsync's duration (called from any thread).
        """
        self.fsyncLatency.observe(seconds)


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.metrics.registry)


class _HealthPage(Resource):
    isLeaf = True

    def __init__(self, check: Callable[[], list]) -> None:
        super().__init__()
        self.check = check

    def render_GET(self, request) -> bytes:
        problems = self.check()
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        if problems:
            request.setResponseCode(503)
            return ("unhealthy: " + "; ".join(problems) + "\n").encode("utf-8")
        return b"ok\n"


def healthProblems(dataDir: str, metrics: Metrics, maxQueueAge: float = QUEUE_AGE_UNHEALTHY) -> list:
    """
    What makes the server unhealthy now (empty: healthy): a data
    directory it cannot write, an outbound queue whose oldest message has
    waited longer than C{maxQueueAge} seconds.
    """
    problems = []
    if not os.access(dataDir, os.W_OK | os.X_OK):
        problems.append(f"data directory {dataDir} is not writable")
    age = metrics.oldestQueued()
    if age > maxQueueAge:
        problems.append(f"oldest queued message waiting {int(age)} s (over {int(maxQueueAge)} s)")
    return problems


def metricsSite(metrics: Metrics, health: Callable[[], list]) -> Site:
    """
    The HTTP site of C{--metrics}: C{/metrics} and C{/healthz}; anything
    else is 404.  No access log, no request body (see
    L{pop3gw.httpsite}).
    """
    root = Resource()
    root.putChild(b"metrics", _MetricsPage(metrics))
    root.putChild(b"healthz", _HealthPage(health))
    return getOnlySite(root)
