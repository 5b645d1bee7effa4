"""
Tests for L{pop3gw.metrics}: counters fed by the server's log events,
gauges read when scraped, and the C{/metrics} and C{/healthz} pages.
"""

import glob
import os

import attr
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from pop3gw import events, fsutil
from pop3gw.metrics import Metrics, healthProblems, metricsSite
from tests.util import makeTempDirectory


def samples(metrics: Metrics) -> dict:
    """
    C{{(name, labels as sorted tuple): value}} of every sample.
    """
    from prometheus_client import generate_latest

    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@attr.s(auto_attribs=True)
class Entry:
    created: float


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(clock=self.clock)
        self.log = Logger(observer=self.metrics)

    def test_logins(self) -> None:
        """
        Successful and failed logins are counted per service, from the
        events the protocols log.
        """
        events.loginSucceeded(self.log, "pop3", "alice@example.org", "192.0.2.7", True)
        events.loginSucceeded(self.log, "pop3", "alice@example.org", "192.0.2.7", True)
        events.loginFailed(self.log, "submission", "alice@example.org", "192.0.2.7")
        events.loginRefused(self.log, "pop3", "alice@example.org", "192.0.2.7", "plaintext")
        got = samples(self.metrics)
        self.assertEqual(got[("pop3gw_logins_total", (("service", "pop3"),))], 2)
        self.assertEqual(got[("pop3gw_logins_total", (("service", "submission"),))], 0)
        self.assertEqual(got[("pop3gw_login_failures_total", (("service", "submission"),))], 1)
        self.assertEqual(got[("pop3gw_login_failures_total", (("service", "pop3"),))], 0)

    def test_unknownServiceNotCounted(self) -> None:
        """
        A login event without a known C{service} field is not counted:
        no C{service="None"} series appears.
        """
        self.metrics({"log_format": "login: service=pop3 user=x"})
        self.metrics({"log_format": "authentication failed: service=x", "service": "imap"})
        got = samples(self.metrics)
        self.assertEqual(sorted(k for k in got if k[0] == "pop3gw_logins_total"),
                         [("pop3gw_logins_total", (("service", "pop3"),)),
                          ("pop3gw_logins_total", (("service", "submission"),))])
        self.assertEqual(got[("pop3gw_logins_total", (("service", "pop3"),))], 0)
        self.assertEqual(sum(v for k, v in got.items() if k[0] == "pop3gw_login_failures_total"), 0)

    def test_messagesAndRelay(self) -> None:
        """
        Accepted messages per listener; relay outcomes per recipient when
        a message leaves the queue, deferrals per attempt, bounces, and
        the time from queueing to done.
        """
        log = self.log
        log.info("submission: accepted id={queueID} user={user} from={sender} local={local} remote={remote}",
                 queueID="q1", user="a", sender="a", local=0, remote=2)
        log.info("mx: accepted id={queueID} rhost={peer} from={sender} recipients={recipients} size={size} tls={tls}",
                 queueID="q2", peer="p", sender="s", recipients=1, size=10, tls="no")
        log.info("queue: queued {queueId} from={sender} recipients={count}", queueId="q1", sender="a", count=2)
        log.warn("relay: {queueId} domain={domain} host={host}:{port} delivered={delivered} deferred={deferred}"
                 " failed={failed} tls={tls} verified={verified} error={error}", queueId="q1", domain="d",
                 host="h", port=25, delivered=1, deferred=1, failed=0, tls="yes", verified="no", error="-")
        log.warn("relay: {queueId} domain={domain} result={result}: {why}", queueId="q1", domain="e",
                 result="deferred", why="dns")
        log.warn("relay: {queueId} domain={domain} result={result}: {why}", queueId="q1", domain="f",
                 result="failed", why="no such domain")
        self.clock.now += 42
        log.info("relay: {queueId} done: delivered={delivered} failed={failed}", queueId="q1", delivered=1, failed=1)
        log.info("relay: bounce for {queueId} sent to {sender} for {count} recipients", queueId="q1", sender="a",
                 count=1)
        got = samples(self.metrics)
        self.assertEqual(got[("pop3gw_messages_accepted_total", (("listener", "submission"),))], 1)
        self.assertEqual(got[("pop3gw_messages_accepted_total", (("listener", "mx"),))], 1)
        self.assertEqual(got[("pop3gw_messages_accepted_total", (("listener", "lmtp"),))], 0)
        self.assertEqual(got[("pop3gw_relay_recipients_total", (("result", "delivered"),))], 1)
        self.assertEqual(got[("pop3gw_relay_recipients_total", (("result", "failed"),))], 1)
        self.assertEqual(got[("pop3gw_relay_deferrals_total", ())], 2)
        self.assertEqual(got[("pop3gw_messages_bounced_total", ())], 1)
        self.assertEqual(got[("pop3gw_relay_latency_seconds_count", ())], 1)
        self.assertEqual(got[("pop3gw_relay_latency_seconds_sum", ())], 42)

    def test_formatsExist(self) -> None:
        """
        Every log format the observer counts is still logged by the
        server's code: a changed log line cannot silently stop a counter.
        """
        source = ""
        for path in glob.glob(os.path.join(os.path.dirname(fsutil.__file__), "**", "*.py"), recursive=True):
            if not path.endswith("metrics.py"):
                with open(path, encoding="utf-8") as f:
                    source += f.read()
        for prefix in ('"login: service=', '"authentication failed: service=', '"connection refused: too many',
                       '"submission: accepted id=', '"mx: accepted id=', '"lmtp: accepted id=',
                       '"queue: queued {queueId}', '"relay: {queueId} done: delivered={delivered} failed={failed}',
                       'delivered={delivered} deferred={deferred}', '"relay: {queueId} domain={domain} result={result}',
                       '"relay: bounce for {queueId} sent to '):
            self.assertIn(prefix, source)

    def test_workerEventsNotCountedTwice(self) -> None:
        """
        A worker's event published by the supervisor (marked with the
        worker's number) is not counted: the worker reports its counts.
        """
        self.metrics({"log_format": "login: service=pop3 user=x", "service": "pop3", "pop3gw_worker": 1})
        self.assertEqual(samples(self.metrics)[("pop3gw_logins_total", (("service", "pop3"),))], 0)

    def test_brokenEventIgnored(self) -> None:
        """
        An event the observer cannot read is ignored, never raised into
        the logging system.
        """
        self.metrics({"log_format": "relay: {queueId} done: delivered={delivered} failed={failed}",
                      "delivered": object()})
        self.metrics({"log_format": 42})
        self.assertEqual(samples(self.metrics)[("pop3gw_relay_recipients_total", (("result", "delivered"),))], 0)


class WorkerReportTests(SynchronousTestCase):
    """
    C{--workers N}: a worker's counter totals, and its reports added up by
    the supervisor's L{Metrics}.
    """

    def test_counterTotals(self) -> None:
        """
        A worker's totals cover its session counters, per label value
        (C{""} for the counter without labels).
        """
        metrics = Metrics()
        log = Logger(observer=metrics)
        events.loginSucceeded(log, "pop3", "alice@example.org", "192.0.2.7", True)
        events.loginFailed(log, "submission", "alice@example.org", "192.0.2.7")
        totals = metrics.counterTotals()
        self.assertEqual(totals["pop3gw_logins"], {"pop3": 1.0, "submission": 0.0})
        self.assertEqual(totals["pop3gw_login_failures"], {"pop3": 0.0, "submission": 1.0})
        self.assertEqual(totals["pop3gw_connections_refused"], {"": 0.0})
        self.assertEqual(totals["pop3gw_messages_accepted"], {"submission": 0.0, "mx": 0.0, "lmtp": 0.0})
        self.assertEqual(sorted(totals), ["pop3gw_connections_refused", "pop3gw_login_failures", "pop3gw_logins", "pop3gw_messages_accepted"])

    def test_reportsSummed(self) -> None:
        """
        The increments two workers report add up in the supervisor's
        counters; their open sessions are summed per listener, and a
        worker that ended counts no more sessions.  Nonsense in a report
        is ignored.
        """
        metrics = Metrics()
        metrics.watchSessions("pop3", lambda: metrics.workerSessions("pop3"))
        metrics.addWorkerReport(1, {"counts": {"pop3gw_logins": {"pop3": 2}}, "sessions": {"pop3": 3}})
        metrics.addWorkerReport(2, {"counts": {"pop3gw_logins": {"pop3": 1}, "pop3gw_connections_refused": {"": 4}},
                                    "sessions": {"pop3": 1}})
        metrics.addWorkerReport(2, {"counts": {"pop3gw_logins": {"pop3": -5, "submission": True}, "nope": {"x": 1},
                                               "pop3gw_messages_accepted": {"submission": 2.0}}})
        metrics.addWorkerReport(1, {"counts": "x", "sessions": {"pop3": "many"}})
        got = samples(metrics)
        self.assertEqual(got[("pop3gw_logins_total", (("service", "pop3"),))], 3)
        self.assertEqual(got[("pop3gw_logins_total", (("service", "submission"),))], 0)
        self.assertEqual(got[("pop3gw_connections_refused_total", ())], 4)
        self.assertEqual(got[("pop3gw_messages_accepted_total", (("listener", "submission"),))], 2)
        self.assertEqual(got[("pop3gw_sessions_open", (("listener", "pop3"),))], 1)
        metrics.addWorkerReport(1, {"counts": {}, "sessions": {"pop3": 3}})
        self.assertEqual(samples(metrics)[("pop3gw_sessions_open", (("listener", "pop3"),))], 4)
        metrics.forgetWorker(2)
        self.assertEqual(samples(metrics)[("pop3gw_sessions_open", (("listener", "pop3"),))], 3)


class GaugeTests(SynchronousTestCase):
    def test_gauges(self) -> None:
        """
        Sessions per listener (summed over its endpoints), queue depth and
        oldest age, certificate expiry and fsync timings are read when
        scraped.
        """
        metrics = Metrics()
        counts = {"a": 2, "b": 3}
        metrics.watchSessions("pop3", lambda: counts["a"])
        metrics.watchSessions("pop3", lambda: counts["b"])
        entries = [Entry(100.0), Entry(400.0)]
        metrics.watchQueue(lambda: entries, now=lambda: 1000.0)
        metrics.watchCertificate(lambda: 1_800_000_000.0)
        metrics.fsyncTimed(0.003)
        got = samples(metrics)
        self.assertEqual(got[("pop3gw_sessions_open", (("listener", "pop3"),))], 5)
        self.assertEqual(got[("pop3gw_queue_messages", ())], 2)
        self.assertEqual(got[("pop3gw_queue_oldest_age_seconds", ())], 900)
        self.assertEqual(got[("pop3gw_tls_certificate_expiry_timestamp_seconds", ())], 1_800_000_000)
        self.assertEqual(got[("pop3gw_fsync_seconds_count", ())], 1)
        counts["a"] = 0
        entries.clear()
        got = samples(metrics)
        self.assertEqual(got[("pop3gw_sessions_open", (("listener", "pop3"),))], 3)
        self.assertEqual(got[("pop3gw_queue_oldest_age_seconds", ())], 0)

    def test_fsyncObserved(self) -> None:
        """
        L{fsutil.fsync} reports each fsync's duration to the observer.
        """
        seen: list = []
        self.patch(fsutil, "fsyncObserver", seen.append)
        fsutil.fsyncDirectory(makeTempDirectory(self))
        self.assertEqual(len(seen), 1)
        self.assertGreaterEqual(seen[0], 0)


class PageTests(SynchronousTestCase):
    def render(self, site, path: bytes) -> tuple:
        request = DummyRequest(path.strip(b"/").split(b"/"))
        resource = site.getResourceFor(request)
        body = resource.render(request)
        return request.responseCode or 200, body, request.responseHeaders.getRawHeaders(b"content-type")

    def test_metricsPage(self) -> None:
        """
        C{/metrics} is the Prometheus text format with C{pop3gw_} series.
        """
        metrics = Metrics()
        code, body, kind = self.render(metricsSite(metrics, lambda: []), b"/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(kind[0].startswith(b"text/plain; version="), kind)
        self.assertIn(b'pop3gw_logins_total{service="pop3"} 0.0', body)

    def test_health(self) -> None:
        """
        C{/healthz} is 200 C{ok} when healthy, 503 with the reasons when
        not: the data directory not writable, the queue's oldest message
        too old.
        """
        dataDir = makeTempDirectory(self)
        metrics = Metrics()
        entries = [Entry(0.0)]
        metrics.watchQueue(lambda: entries, now=lambda: 100.0)
        site = metricsSite(metrics, lambda: healthProblems(dataDir, metrics, maxQueueAge=60))
        code, body, _ = self.render(site, b"/healthz")
        self.assertEqual((code, body), (503, b"unhealthy: oldest queued message waiting 100 s (over 60 s)\n"))
        entries.clear()
        self.assertEqual(self.render(site, b"/healthz")[:2], (200, b"ok\n"))
        missing = os.path.join(dataDir, "gone")
        self.assertEqual(healthProblems(missing, metrics), [f"data directory {missing} is not writable"])

    def test_notFound(self) -> None:
        """
        Any other path is 404.
        """
        code, _, _ = self.render(metricsSite(Metrics(), lambda: []), b"/other")
        self.assertEqual(code, 404)


class ShippedFilesTests(SynchronousTestCase):
    def test_namesExist(self) -> None:
        """
        Every C{pop3gw_} series the Grafana dashboard and the alert rules
        use is one the server exports (the dashboard is valid JSON).
        """
        import json
        import re

        from prometheus_client import generate_latest

        metrics = Metrics()
        metrics.relayLatency.observe(1)
        metrics.watchSessions("pop3", lambda: 0)
        exported = set(re.findall(r"^(pop3gw_\w+)", generate_latest(metrics.registry).decode(), re.M))
        top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(top, "etc", "grafana", "pop3gw-dashboard.json")) as f:
            dashboard = f.read()
        json.loads(dashboard)
        with open(os.path.join(top, "etc", "prometheus", "pop3gw-alerts.yml")) as f:
            rules = f.read()
        used = set(re.findall(r"pop3gw_\w+", dashboard + rules))
        self.assertGreater(len(used), 8)
        self.assertEqual(used - exported, set())
