"""
Tests for L{pop3gw.relay.service} and L{pop3gw.relay.dispatch}: the relay
service's scheduling and lifecycle with a fake L{deliverOnce} and a fake
resolver, then the whole relay (service, dispatch and the real client)
over fake endpoints: results, MX handling, smarthost rules, log lines, and
one end-to-end relay to a real (aiosmtpd) server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import email
import errno
import gc
import os
import threading

import attr
from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import capturedLogs, formatEvent, globalLogPublisher
from twisted.names import error as dnserror
from twisted.python.failure import Failure
from twisted.trial import unittest

from pop3gw import fsutil, queue
from pop3gw.address import Address
from pop3gw.interfaces import TemporaryFailure, UnknownUser
from pop3gw.queue import (
    DELIVERED,
    FAILED,
    PENDING,
    OutboundQueue,
    Outcome,
    OutcomeKind,
    formatEntry,
    listEntries,
    requestFlush,
)
from pop3gw.relay.client import Phase, RelayError, SessionResult, TLSPolicy
from pop3gw.relay.service import STOP_GRACE, RelayService
from pop3gw.runner import ThreadPoolRunner
from pop3gw.testing import HeldThreadPool
from tests.queuehelpers import (
    ALICE,
    BOB,
    BODY,
    CAROL,
    DAVE,
    EHLO_OK,
    EHLO_UTF8,
    ERIN,
    GREETING,
    JORG,
    OK,
    SENT,
    STORED,
    TRACE,
    FakeEndpoint,
    FakeResolver,
    QueueTestMixin,
    ThreadClock,
    TLSStringTransport,
    readJSON,
    successReplies,
)


class FakeDeliverOnce:
    """
    Stands in for L{deliverOnce}: records each call (the message is read
    and closed) and returns a Deferred the test fires with a
    L{SessionResult}.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, endpoint, sender, recipients, message, tlsPolicy, credentials=None, **kw):
        with message:
            data = message.read()
        call = attr.make_class("Call", ["endpoint", "sender", "recipients", "data", "tlsPolicy", "credentials", "kw", "result"])(
            endpoint.endpoint, sender, list(recipients), data, tlsPolicy, credentials, kw, defer.Deferred()
        )
        self.calls.append(call)
        return call.result


DELIVERED_OK = Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 2.0.0 ok")


class SchedulingTests(QueueTestMixin, unittest.SynchronousTestCase):
    """
    L{RelayService} with a fake L{deliverOnce} and a fake resolver: when
    attempts are made, what they are given, and what their results do.
    """

    def setUp(self):
        self.setUpQueue()
        self.deliver = FakeDeliverOnce()
        self.bounces = []
        self.resolver = FakeResolver(
            mx={"remote.example": [(10, "a.mx.example"), (20, "b.mx.example")], "other.example": [(5, "mx.other.example")]}
        )

    def startRelay(self, **kw):
        args = dict(
            resolver=self.resolver,
            endpointFactory=lambda host, port: (host, port),
            deliverOnce=self.deliver,
            schedule=(60, 600),
        )
        args.update(kw)
        self.relay = RelayService(self.queue, self.clock, "mx.example.org", self.bounceDelivery, **args)
        self.relay.startService()
        self.addCleanup(self.stopRelay)

    def stopRelay(self):
        for call in self.deliver.calls:
            if not call.result.called:
                call.result.callback(SessionResult.broken("test over"))
        self.relay.stopService()

    def bounceDelivery(self, sender, data):
        self.bounces.append((sender, data))
        return defer.succeed(None)

    def queueWaiting(self, delays):
        """
        Queue one entry per delay, due that many seconds from now, as
        found at start-up.

        @return: the entries.
        """
        entries = []
        for delay in delays:
            entry = self.enqueue()
            entry.nextAttempt = self.clock.seconds() + delay
            self.successResultOf(self.queue.saveEntry(entry))
            entries.append(entry)
        return entries

    def relayTimers(self):
        """
        @return: the active timers of the relay, apart from its flush poll.
        """
        return [c for c in self.clock.getDelayedCalls() if c.active() and c.func != self.relay._flushLoop]

    def test_oneTimerForTheQueue(self):
        """
        Entries waiting for their next attempt share one timer, set for the
        earliest; each is tried when its time comes, in time order, and a
        flush makes them all due.
        """
        entries = self.queueWaiting([300, 100, 200, 400])
        self.startRelay()
        [timer] = self.relayTimers()
        self.assertEqual(timer.getTime(), self.clock.seconds() + 100)
        self.clock.advance(100)
        self.assertEqual([c.recipients for c in self.deliver.calls], [[BOB]])
        self.assertEqual(self.deliver.calls[0].kw.get("identity"), "mx.example.org")
        [timer] = self.relayTimers()
        self.assertEqual(timer.getTime(), self.clock.seconds() + 100)
        self.assertEqual(self.relay.flushAll(), 3)
        self.clock.advance(0)
        self.assertEqual(len(self.deliver.calls), 4)
        self.assertEqual(self.relayTimers(), [])
        self.assertEqual(sorted(self.relay.entries), sorted(e.queueId for e in entries))

    def test_rescheduledTimerMovesSooner(self):
        """
        An entry scheduled sooner than the earliest moves the one timer
        sooner; one dropped is not tried when its old time comes.
        """
        first, second = self.queueWaiting([300, 600])
        self.startRelay()
        self.relay.dropEntry(first.queueId)
        second.nextAttempt = self.clock.seconds() + 50
        self.relay._schedule(second)
        [timer] = self.relayTimers()
        self.assertEqual(timer.getTime(), self.clock.seconds() + 50)
        self.clock.advance(50)
        self.assertEqual(len(self.deliver.calls), 1)
        self.deliver.calls[0].result.callback(SessionResult.broken("later"))
        self.clock.advance(600)
        self.assertEqual(len(self.deliver.calls), 2)
        self.assertEqual(list(self.relay.entries), [second.queueId])

    def test_loadWithoutCollector(self):
        """
        The queue is loaded at start-up with the cyclic garbage collector
        paused, and it runs again afterwards.
        """
        self.queueWaiting([300])
        seen = []
        load = self.queue.loadEntries
        self.patch(self.queue, "loadEntries", lambda: seen.append(gc.isenabled()) or load())
        self.assertTrue(gc.isenabled())
        self.startRelay()
        self.assertEqual((seen, gc.isenabled(), len(self.relay.entries)), ([False], True, 1))

    def test_attemptRecordedBeforeDelivery(self):
        """
        A new entry is handed to C{deliverOnce} at once, with the queued
        message, after its attempt is on disk.
        """
        self.startRelay()
        entry = self.enqueue()
        self.clock.advance(0)
        [call] = self.deliver.calls
        self.assertEqual((call.endpoint, call.sender, call.recipients, call.data), (("a.mx.example", 25), ALICE, [BOB], STORED))
        [recorded] = listEntries(self.root)
        self.assertEqual((recorded.queueId, recorded.attempts, recorded.nextAttempt), (entry.queueId, 1, 1060.0))

    def test_outcomesApplied(self):
        """
        The session's outcomes decide each recipient: delivered ones are
        done, failed ones bounced once, and the entry leaves the queue.
        """
        self.startRelay()
        self.enqueue(recipients=[BOB, CAROL])
        self.clock.advance(0)
        [call] = self.deliver.calls
        call.result.callback(
            SessionResult({BOB: DELIVERED_OK, CAROL: Outcome(OutcomeKind.FAILED, "5.1.1", "550 5.1.1 unknown")}, None)
        )
        self.assertEqual(listEntries(self.root), [])
        [(sender, data)] = self.bounces
        self.assertEqual(sender, ALICE)
        self.assertIn(b"carol@remote.example", data)
        self.assertNotIn(b"bob@remote.example", data.split(b"\r\n\r\n", 1)[1].split(b"Content-Type: text/rfc822-headers")[0])

    def test_brokenSessionTriesNextHost(self):
        """
        Recipients a session did not answer for go to the next mail
        exchanger in the same attempt; once no host is left they stay
        pending with the last error, and are tried again on schedule.
        """
        self.startRelay()
        self.enqueue(recipients=[BOB, CAROL])
        self.clock.advance(0)
        self.deliver.calls[0].result.callback(SessionResult.broken("connection refused"))
        second = self.deliver.calls[1]
        self.assertEqual((second.endpoint, second.recipients), (("b.mx.example", 25), [BOB, CAROL]))
        lost = RelayError(False, 0, "4.4.1", Phase.DATA, "connection lost before the end: gone")
        second.result.callback(SessionResult({BOB: DELIVERED_OK}, lost))
        self.assertEqual(len(self.deliver.calls), 2)
        [stored] = listEntries(self.root)
        self.assertEqual([r.state for r in stored.recipients], [DELIVERED, PENDING])
        self.assertEqual(stored.lastError, "carol@remote.example: b.mx.example: connection lost before the end: gone")
        self.clock.advance(60)
        third = self.deliver.calls[2]
        self.assertEqual((third.endpoint, third.recipients), (("a.mx.example", 25), [CAROL]))

    def test_resultSavedBeforeLogged(self):
        """
        When a session's result line is logged, the queue file already
        holds the attempt's outcome: an operator who reads the line and
        runs C{pop3gw queue list} sees the same error (and a delivered
        entry is no longer listed as pending for that recipient).
        """
        self.startRelay()
        entry = self.enqueue(recipients=[BOB, CAROL])
        seen = []

        def observer(event):
            if event.get("log_format", "").startswith("relay: {queueId} domain="):
                seen.append((formatEvent(event), [formatEntry(e) for e in listEntries(self.root)]))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.clock.advance(0)
        refused = RelayError(False, 0, "4.4.1", Phase.GREETING, "server refused the session: 421 busy")
        self.deliver.calls[0].result.callback(SessionResult({BOB: DELIVERED_OK}, refused))
        self.deliver.calls[1].result.callback(SessionResult.broken("connection refused"))
        [(first, listing), (second, listing2)] = seen
        self.assertIn("host=a.mx.example:25 delivered=1 deferred=1 ", first)
        self.assertIn("host=b.mx.example:25 delivered=0 deferred=1 ", second)
        self.assertEqual(listing, listing2)
        [line] = listing
        self.assertTrue(line.startswith(f"{entry.queueId} from=alice@example.org to=carol@remote.example attempts=1 "), line)
        self.assertTrue(line.endswith(" error=carol@remote.example: b.mx.example: connection refused"), line)

    def test_logNamespace(self):
        """
        The relay logs under C{pop3gw.queue.RelayService}, the namespace
        operators' log filters know from before the relay had its own
        package.
        """
        self.startRelay()
        self.enqueue()
        with capturedLogs() as events:
            self.clock.advance(0)
            self.deliver.calls[0].result.callback(SessionResult({BOB: DELIVERED_OK}, None))
        self.assertTrue(events)
        self.assertEqual({e["log_namespace"] for e in events}, {"pop3gw.queue.RelayService"})

    def test_mxPolicy(self):
        """
        To MX hosts TLS is opportunistic, without credentials.
        """
        self.startRelay(clientTLS=lambda host, verify: "CTX")
        self.enqueue()
        self.clock.advance(0)
        [call] = self.deliver.calls
        self.assertEqual((call.tlsPolicy, call.credentials, call.kw["loopbackPolicy"]), (TLSPolicy.OPPORTUNISTIC, None, None))

    def test_smarthostPolicies(self):
        """
        To a smarthost: STARTTLS required when verifying (opportunistic if
        it is on loopback), required with credentials (on loopback too),
        opportunistic with verification off, none without TLS.
        """
        cases = [
            (dict(), (TLSPolicy.REQUIRED_STARTTLS, None, TLSPolicy.OPPORTUNISTIC)),
            (dict(relayUsername="gw", relayPassword="pw"), (TLSPolicy.REQUIRED_STARTTLS, ("gw", "pw"), None)),
            (dict(relayVerifyTLS=False), (TLSPolicy.OPPORTUNISTIC, None, None)),
            (dict(clientTLS=None), (TLSPolicy.NONE, None, None)),
        ]
        for kw, expected in cases:
            self.deliver.calls[:] = []
            args = dict(relayHost="smarthost.example", clientTLS=lambda host, verify: "CTX")
            args.update(kw)
            self.startRelay(**args)
            self.enqueue()
            self.clock.advance(0)
            [call] = self.deliver.calls
            self.assertEqual((call.tlsPolicy, call.credentials, call.kw["loopbackPolicy"]), expected, kw)
            self.assertEqual(call.endpoint[0], "smarthost.example")
            self.stopRelay()

    def test_parallelBound(self):
        """
        No more than C{maxConnections} messages are sent at once; the next
        starts when one is over.
        """
        self.startRelay(relayHost="smarthost.example", maxConnections=2)
        for _ in range(3):
            self.enqueue()
        self.clock.advance(0)
        self.assertEqual(len(self.deliver.calls), 2)
        self.deliver.calls[0].result.callback(SessionResult({BOB: DELIVERED_OK}, None))
        self.clock.advance(0)
        self.assertEqual(len(self.deliver.calls), 3)

    def test_entriesTakenFewAtATime(self):
        """
        Of a queue all due at once, no more entries are in progress than
        twice the connections allowed: the others are not even recorded as
        attempted until their turn, and at stop they are left as they are.
        """
        from pop3gw.queue import listEntries

        self.startRelay(relayHost="smarthost.example", maxConnections=1)
        ids = [self.enqueue().queueId for _ in range(4)]
        self.clock.advance(0)
        self.assertEqual(len(self.deliver.calls), 1)
        attempts = {e.queueId: e.attempts for e in listEntries(self.queue.root)}
        self.assertEqual([attempts[i] for i in ids], [1, 1, 0, 0])
        self.deliver.calls[0].result.callback(SessionResult({BOB: DELIVERED_OK}, None))
        self.clock.advance(0)
        self.assertEqual(len(self.deliver.calls), 2)
        attempts = {e.queueId: e.attempts for e in listEntries(self.queue.root)}
        self.assertEqual([attempts.get(i) for i in ids], [None, 1, 1, 0])
        self.relay.stopService()
        self.clock.advance(0)
        attempts = {e.queueId: e.attempts for e in listEntries(self.queue.root)}
        self.assertEqual([attempts.get(i) for i in ids], [None, 1, 1, 0])
        self.assertEqual(len(self.deliver.calls), 2)

    def test_smarthostConnectionsShared(self):
        """
        Messages to the smarthost are sent with the dispatcher's connection
        cache, under one key, so they share connections; mail to MX hosts
        is sent without it.
        """
        self.startRelay(relayHost="smarthost.example")
        self.enqueue()
        self.enqueue()
        self.clock.advance(0)
        first, second = self.deliver.calls
        self.assertIs(first.kw["cache"], self.relay.dispatcher._cache)
        self.assertIs(second.kw["cache"], first.kw["cache"])
        self.assertEqual(first.kw["cacheKey"], second.kw["cacheKey"])
        self.stopRelay()
        self.deliver.calls[:] = []
        self.startRelay()
        self.enqueue()
        self.clock.advance(0)
        [call] = self.deliver.calls
        self.assertNotIn("cache", call.kw)

    def test_contextForPolicy(self):
        """
        The context handed over for a policy: verified against the
        smarthost's name when STARTTLS is required, opportunistic
        (C{verify=None}) otherwise.
        """
        asked = []
        self.startRelay(relayHost="smarthost.example", clientTLS=lambda host, verify: asked.append((host, verify)) or "CTX")
        self.enqueue()
        self.clock.advance(0)
        contextFor = self.deliver.calls[0].kw["contextFor"]
        self.assertEqual(contextFor(TLSPolicy.REQUIRED_STARTTLS), ("CTX", True))
        self.assertEqual(contextFor(TLSPolicy.OPPORTUNISTIC), ("CTX", False))
        self.assertEqual(asked, [("smarthost.example", True), ("smarthost.example", None)])

    def test_failedHandshakeRetriedInPlaintext(self):
        """
        When opportunistic TLS fails to negotiate with an MX host, the same
        host is tried again at once without TLS.
        """
        self.startRelay(clientTLS=lambda host, verify: "CTX")
        self.enqueue()
        self.clock.advance(0)
        self.deliver.calls[0].result.callback(
            SessionResult({}, RelayError(False, 0, "4.4.1", Phase.STARTTLS, "TLS could not be started"), tlsHandshakeFailed=True)
        )
        second = self.deliver.calls[1]
        self.assertEqual((second.endpoint, second.tlsPolicy), (("a.mx.example", 25), TLSPolicy.NONE))

    def test_stopWaitsForTheAttempt(self):
        """
        Stopping waits for the attempt in progress to record its result;
        the hosts not tried yet are not tried.
        """
        self.startRelay()
        entry = self.enqueue()
        self.clock.advance(0)
        stopped = self.relay.stopService()
        self.assertNoResult(stopped)
        self.deliver.calls[0].result.callback(SessionResult.broken("connection lost before the end: aborted"))
        self.successResultOf(stopped)
        self.assertEqual(len(self.deliver.calls), 1)
        self.assertEqual(readJSON(self.root, entry.queueId)["lastError"], "bob@remote.example: b.mx.example: relay service stopping")


class RelayTestMixin(QueueTestMixin):
    """
    A L{RelayService} over a fake clock, fake endpoints and a fake resolver.
    """

    def setUpRelay(self, **kw):
        self.setUpQueue()
        self.connects = []
        self.bounces = []
        self.bounceErrors = []
        self.resolver = kw.pop(
            "resolver",
            FakeResolver(mx={"remote.example": [(10, "mx.remote.example")], "other.example": [(5, "mx.other.example")]}),
        )
        self.relay = self.makeRelay(**kw)

    def makeRelay(self, **kw):
        args = dict(
            resolver=self.resolver,
            endpointFactory=lambda host, port: FakeEndpoint(host, port, self.connects),
            lifetime=5 * 86400,
        )
        args.update(kw)
        return RelayService(self.queue, self.clock, "mx.example.org", self.bounceDelivery, **args)

    def bounceDelivery(self, sender, data):
        if self.bounceErrors:
            return defer.fail(self.bounceErrors.pop(0))
        self.bounces.append((sender, data))
        return defer.succeed(None)

    def start(self):
        self.relay.startService()
        self.addCleanup(self.stop)

    def stop(self):
        if self.relay.running:
            self.relay.stopService()
        # Close what a test left half-open.
        for endpoint in self.connects:
            if getattr(endpoint, "protocol", None) is not None and not endpoint.protocol.session.done.called:
                endpoint.close()
        self.clock.advance(STOP_GRACE)

    def json(self, entry):
        return readJSON(self.root, entry.queueId)

    def restart(self):
        """
        The process dies (nothing more of it runs: its clock stops) and a
        new one starts over the same directory, at the same time.
        """
        now = self.clock.seconds()
        self.clock = ThreadClock()
        self.clock.advance(now)
        self.queue = OutboundQueue(self.root, self.clock)

    def bounceRecipients(self, data):
        msg = email.message_from_bytes(data)
        status = msg.get_payload()[1].get_payload()
        return [(b["Final-Recipient"], b["Status"]) for b in status[1:]]


class RelayTests(RelayTestMixin, unittest.SynchronousTestCase):
    """
    Tests for L{RelayService} scheduling and per-recipient results.
    """

    def setUp(self):
        self.setUpRelay()
        self.start()

    def test_attemptRecordedFirst(self):
        """
        A new entry is tried at once; the attempt (count and next attempt
        time) is on disk before the connection completes.
        """
        entry = self.enqueue()
        self.assertEqual(self.connects, [])
        self.clock.advance(0)
        [endpoint] = self.connects
        self.assertEqual((endpoint.host, endpoint.port), ("mx.remote.example", 25))
        [recorded] = listEntries(self.root)
        self.assertEqual((recorded.queueId, recorded.attempts), (entry.queueId, 1))
        self.assertEqual(recorded.nextAttempt, 1000.0 + 300)
        self.assertEqual(recorded.recipients[0].state, PENDING)

    def test_conversation(self):
        """
        A successful session sends EHLO, MAIL, RCPT, DATA, the dot-stuffed
        message and QUIT; the entry then leaves the queue.
        """
        entry = self.enqueue()
        self.clock.advance(0)
        sent = self.connects[0].serve(successReplies())
        self.assertEqual(
            sent,
            [
                b"EHLO mx.example.org\r\n",
                b"MAIL FROM:<alice@example.org>\r\n",
                b"RCPT TO:<bob@remote.example>\r\n",
                b"DATA\r\n",
                SENT,
                b"QUIT\r\n",
                b"",
            ],
        )
        self.assertEqual(listEntries(self.root), [])
        self.assertNotIn(entry.queueId, self.relay.entries)
        self.assertEqual(self.bounces, [])

    def test_deliveredEntryRemovedWithoutRewrite(self):
        """
        An entry whose every recipient was delivered is removed at once:
        its C{.json} is not rewritten with the outcome first (the removal
        is the record).
        """
        saved = []
        save = self.queue.saveEntry
        self.queue.saveEntry = lambda entry: saved.append(entry.queueId) or save(entry)
        entry = self.enqueue()
        self.clock.advance(0)
        self.connects[0].serve(successReplies())
        self.assertEqual((saved, os.listdir(self.root)), ([], [".lock"]))
        self.assertNotIn(entry.queueId, self.relay.entries)

    def test_failedAttemptRecordMakesNoAttempt(self):
        """
        When the attempt cannot be recorded durably (the directory
        C{fsync} fails), no connection is made; the entry is tried again
        at its next attempt time.
        """

        def failingFsync(fd):
            raise OSError(errno.EIO, "I/O error")

        entry = self.enqueue()
        self.patch(fsutil, "fsync", failingFsync)
        self.clock.advance(0)
        self.assertEqual(self.connects, [])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertIn(entry.queueId, self.relay.entries)
        self.patch(fsutil, "fsync", os.fsync)
        self.clock.advance(300)
        self.assertEqual(len(self.connects), 1)

    def test_crashAfterAttemptRecord(self):
        """
        A crash after the attempt was recorded and before (or while) the
        message is sent loses nothing: after a restart the entry is loaded
        with the attempt counted and sent at its next attempt time (a
        duplicate if the first session had delivered it, as documented).
        """
        entry = self.enqueue()
        self.clock.advance(0)
        [first] = self.connects
        self.restart()
        self.relay = self.makeRelay()
        self.relay.startService()
        self.assertEqual([(e.queueId, e.attempts, e.nextAttempt) for e in self.relay.entries.values()], [(entry.queueId, 1, 1300.0)])
        self.clock.advance(299)
        self.assertEqual(self.connects, [first])
        self.clock.advance(1)
        self.assertEqual(self.connects[1].serve(successReplies())[4], SENT)
        self.assertEqual(os.listdir(self.root), [".lock"])

    def test_crashBeforeRemoval(self):
        """
        A crash after the message was sent and before its removal was
        durable (here the removal raises before it unlinks anything)
        leaves the entry queued with the attempt counted: a restart sends
        it again at its next attempt time (the documented duplicate),
        never loses it.
        """

        def crash(*args):
            raise OSError(errno.EIO, "I/O error")

        original = queue._removeEntry
        entry = self.enqueue()
        self.patch(queue, "_removeEntry", crash)
        self.clock.advance(0)
        self.connects[0].serve(successReplies())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual([(e.queueId, e.attempts, e.nextAttempt, e.recipients[0].state) for e in listEntries(self.root)], [(entry.queueId, 1, 1300.0, PENDING)])
        self.patch(queue, "_removeEntry", original)
        self.restart()
        self.relay = self.makeRelay()
        self.relay.startService()
        self.clock.advance(300)
        self.assertEqual(self.connects[1].serve(successReplies())[4], SENT)
        self.assertEqual(os.listdir(self.root), [".lock"])

    def test_failedRemovalRetriedWithoutResending(self):
        """
        A running relay whose removal of a delivered entry failed keeps
        the entry and tries only the removal again at the next attempt
        time: the message is not sent again.
        """
        original = queue._removeEntry

        def failOnce(*args):
            self.patch(queue, "_removeEntry", original)
            raise OSError(errno.EIO, "I/O error")

        entry = self.enqueue()
        self.patch(queue, "_removeEntry", failOnce)
        self.clock.advance(0)
        self.connects[0].serve(successReplies())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertIn(entry.queueId, self.relay.entries)
        self.clock.advance(300)
        self.assertEqual((len(self.connects), os.listdir(self.root)), (1, [".lock"]))
        self.assertNotIn(entry.queueId, self.relay.entries)

    def test_failedBatchRemovalKeepsEveryEntry(self):
        """
        When the removals of delivered entries fail (their batches'
        directory C{fsync}: the unlinks are not known to be durable),
        every entry stays in the relay, and at the next attempt time only
        the removals are tried again: no message is sent twice.
        """
        self.relay.stopService()
        first, second = self.enqueue(), self.enqueue()
        pool = HeldThreadPool()
        self.queue = OutboundQueue(self.root, self.clock, ThreadPoolRunner(self.clock, pool))
        self.relay = self.makeRelay()
        self.relay.startService()
        self.clock.advance(0)
        self.assertEqual(len(pool.pending), 1)
        pool.runAll()
        self.assertEqual(len(self.connects), 2)

        def failingFsync(fd):
            raise OSError(errno.EIO, "I/O error")

        self.patch(fsutil, "fsync", failingFsync)
        for endpoint in self.connects:
            self.assertEqual(endpoint.serve(successReplies())[4], SENT)
        pool.runAll()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)
        ids = sorted([first.queueId, second.queueId])
        self.assertEqual(sorted(self.relay.entries), ids)
        self.patch(fsutil, "fsync", os.fsync)
        self.clock.advance(300)
        pool.runAll()
        self.assertEqual((len(self.connects), os.listdir(self.root), self.relay.entries), (2, [".lock"], {}))

    def test_repeatedFailureWaitsForRetry(self):
        """
        A fault that repeats (a removal that keeps failing) is tried again
        no sooner than the first retry delay after each failure, however
        far in the past the entry's next attempt time is.
        """
        calls = []
        original = queue._removeEntry

        def failing(*args):
            calls.append(self.clock.seconds())
            if len(calls) > 5:
                return original(*args)
            raise OSError(errno.EIO, "I/O error")

        self.enqueue()
        self.patch(queue, "_removeEntry", failing)
        self.clock.advance(0)
        self.connects[0].serve(successReplies())
        self.clock.advance(300)
        self.clock.advance(300)
        self.assertEqual(calls, [1000.0, 1300.0, 1600.0])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 3)

    def test_nullSenderOnWire(self):
        """
        The null reverse path is sent as C{MAIL FROM:<>}.
        """
        self.enqueue(sender=None)
        self.clock.advance(0)
        sent = self.connects[0].serve(successReplies())
        self.assertEqual(sent[1], b"MAIL FROM:<>\r\n")

    def test_heloFallback(self):
        """
        A server that refuses EHLO gets HELO.
        """
        self.enqueue()
        self.clock.advance(0)
        endpoint = self.connects[0]
        endpoint.open()
        self.assertEqual(endpoint.feed(GREETING), b"EHLO mx.example.org\r\n")
        self.assertEqual(endpoint.feed(b"502 what\r\n"), b"HELO mx.example.org\r\n")
        self.assertEqual(endpoint.feed(OK), b"MAIL FROM:<alice@example.org>\r\n")

    def test_retrySchedule(self):
        """
        Temporary failures are retried after 5 min, 15 min, 1 h, then every
        2 h, and the last error is kept.
        """
        entry = self.enqueue()
        times = []
        for delay in (0, 300, 900, 3600, 7200, 7200):
            self.clock.advance(delay)
            self.assertEqual(len(self.connects), len(times) + 1)
            times.append(self.clock.seconds())
            self.connects[-1].refuse()
        self.assertEqual(times, [1000, 1300, 2200, 5800, 13000, 20200])
        state = self.json(entry)
        self.assertEqual(state["attempts"], 6)
        self.assertEqual(state["nextAttempt"], 27400)
        self.assertIn("bob@remote.example: ", state["lastError"])
        self.assertIn("refused", state["lastError"])
        self.clock.advance(7199)
        self.assertEqual(len(self.connects), 6)

    def test_tempThenSuccess(self):
        """
        A 4xx reply to RCPT leaves the recipient pending with the reply as
        last error (no bounce); the retry delivers it and ends the entry.
        """
        entry = self.enqueue()
        self.clock.advance(0)
        sent = self.connects[0].serve([GREETING, EHLO_OK, OK, b"450 4.2.0 mailbox busy\r\n", b"221 bye\r\n"])
        self.assertEqual(sent[-2:], [b"QUIT\r\n", b""])
        state = self.json(entry)
        self.assertEqual(state["recipients"][0]["state"], "pending")
        self.assertEqual(state["lastError"], "bob@remote.example: 450 4.2.0 mailbox busy")
        self.assertEqual(self.bounces, [])
        self.clock.advance(299)
        self.assertEqual(len(self.connects), 1)
        self.clock.advance(1)
        self.connects[1].serve(successReplies())
        self.assertEqual(listEntries(self.root), [])
        self.assertEqual(self.bounces, [])

    def test_permanentBounce(self):
        """
        A 5xx reply to RCPT fails the recipient: one bounce to the sender,
        and the entry leaves the queue.
        """
        self.enqueue()
        self.clock.advance(0)
        self.connects[0].serve([GREETING, EHLO_OK, OK, b"550 5.1.1 no such user\r\n", b"221 bye\r\n"])
        [(sender, data)] = self.bounces
        self.assertEqual(sender, ALICE)
        self.assertEqual(self.bounceRecipients(data), [("rfc822; bob@remote.example", "5.1.1")])
        self.assertIn(b"Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n", data)
        self.assertIn(b"Subject: hi\r\n", data)
        self.assertEqual(listEntries(self.root), [])

    def test_mixed(self):
        """
        Per-recipient results in one session: the accepted one is done, the
        4xx one retried, the 5xx one bounced once; the retry only names the
        pending one and no second bounce is made.
        """
        entry = self.enqueue(recipients=[BOB, CAROL, DAVE])
        self.clock.advance(0)
        sent = self.connects[0].serve(
            [GREETING, EHLO_OK, OK, OK, b"451 4.3.0 later\r\n", b"550 5.1.1 unknown\r\n", b"354 go\r\n", OK, b"221 bye\r\n"]
        )
        self.assertEqual(
            sent[2:5],
            [b"RCPT TO:<bob@remote.example>\r\n", b"RCPT TO:<carol@remote.example>\r\n", b"RCPT TO:<dave@remote.example>\r\n"],
        )
        self.assertEqual(sent[5], b"DATA\r\n")
        state = self.json(entry)
        self.assertEqual([r["state"] for r in state["recipients"]], ["delivered", "pending", "failed"])
        self.assertEqual(state["recipients"][2]["notified"], True)
        [(_, data)] = self.bounces
        self.assertEqual(self.bounceRecipients(data), [("rfc822; dave@remote.example", "5.1.1")])
        self.clock.advance(300)
        sent = self.connects[1].serve(successReplies())
        self.assertEqual(sent[2], b"RCPT TO:<carol@remote.example>\r\n")
        self.assertEqual(listEntries(self.root), [])
        self.assertEqual(len(self.bounces), 1)

    def test_dataRejected(self):
        """
        A 5xx reply to the end of data fails every accepted recipient.
        """
        self.enqueue(recipients=[BOB, CAROL])
        self.clock.advance(0)
        self.connects[0].serve([GREETING, EHLO_OK, OK, OK, OK, b"354 go\r\n", b"554 5.7.1 spam\r\n", b"221 bye\r\n"])
        [(_, data)] = self.bounces
        self.assertEqual(
            self.bounceRecipients(data),
            [("rfc822; bob@remote.example", "5.7.1"), ("rfc822; carol@remote.example", "5.7.1")],
        )

    def test_mailFromTemporary(self):
        """
        A 4xx reply to MAIL FROM leaves every recipient pending.
        """
        entry = self.enqueue(recipients=[BOB, CAROL])
        self.clock.advance(0)
        sent = self.connects[0].serve([GREETING, EHLO_OK, b"451 4.7.1 greylisted\r\n", b"221 bye\r\n"])
        self.assertEqual(sent[-2:], [b"QUIT\r\n", b""])
        state = self.json(entry)
        self.assertEqual([r["state"] for r in state["recipients"]], ["pending", "pending"])
        self.assertEqual(self.bounces, [])

    def test_connectionLostMidway(self):
        """
        A connection lost before the end of data leaves recipients pending
        with an error naming the host.
        """
        entry = self.enqueue()
        self.clock.advance(0)
        endpoint = self.connects[0]
        endpoint.open()
        endpoint.feed(GREETING)
        endpoint.feed(EHLO_OK)
        endpoint.close()
        state = self.json(entry)
        self.assertEqual(state["recipients"][0]["state"], "pending")
        self.assertIn("mx.remote.example: connection lost", state["lastError"])

    def test_responseTimeout(self):
        """
        A server that stops answering is given up after the response
        timeout; the recipient stays pending.
        """
        entry = self.enqueue()
        self.clock.advance(0)
        endpoint = self.connects[0]
        endpoint.open()
        endpoint.feed(GREETING)
        self.clock.advance(299)
        self.assertFalse(endpoint.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(endpoint.transport.disconnecting)
        endpoint.close()
        self.assertEqual(
            self.json(entry)["lastError"],
            "bob@remote.example: mx.remote.example: no reply from the server within 300 seconds",
        )

    def test_expiry(self):
        """
        Once the lifetime has passed, pending recipients fail with 4.4.7 and
        one bounce is made.
        """
        self.relay.stopService()
        self.relay = self.makeRelay(lifetime=1000)
        self.relay.startService()
        self.enqueue()
        self.clock.advance(0)
        self.connects[0].refuse()
        self.clock.advance(300)
        self.connects[1].refuse()
        self.clock.advance(700)
        self.assertEqual(len(self.connects), 2)
        [(_, data)] = self.bounces
        self.assertEqual(self.bounceRecipients(data), [("rfc822; bob@remote.example", "4.4.7")])
        self.assertIn(b"delivery time expired; last error: ", data)
        self.assertEqual(listEntries(self.root), [])

    def test_nullSenderNotBounced(self):
        """
        A message with the null sender that fails is dropped, never bounced.
        """
        self.enqueue(sender=None)
        self.clock.advance(0)
        self.connects[0].serve([GREETING, EHLO_OK, OK, b"550 5.1.1 unknown\r\n", b"221 bye\r\n"])
        self.assertEqual(self.bounces, [])
        self.assertEqual(listEntries(self.root), [])

    def test_bounceRetried(self):
        """
        If the bounce cannot be stored the entry stays queued and the bounce
        is tried again later, once.
        """
        self.bounceErrors.append(TemporaryFailure("disk full"))
        entry = self.enqueue()
        self.clock.advance(0)
        self.connects[0].serve([GREETING, EHLO_OK, OK, b"550 5.1.1 unknown\r\n", b"221 bye\r\n"])
        self.assertEqual(len(self.flushLoggedErrors(TemporaryFailure)), 1)
        self.assertEqual(self.bounces, [])
        self.assertEqual(self.json(entry)["recipients"][0]["notified"], False)
        self.clock.advance(300)
        self.assertEqual(len(self.connects), 1)
        self.assertEqual(len(self.bounces), 1)
        self.assertEqual(listEntries(self.root), [])

    def test_bounceSenderGone(self):
        """
        A bounce whose sender no longer exists is dropped.
        """
        self.bounceErrors.append(UnknownUser("alice"))
        self.enqueue()
        self.clock.advance(0)
        self.connects[0].serve([GREETING, EHLO_OK, OK, b"550 5.1.1 unknown\r\n", b"221 bye\r\n"])
        self.assertEqual(listEntries(self.root), [])

    def test_restartResumes(self):
        """
        A new service over the same directory loads the entry and tries it
        at its recorded next attempt time, not before.
        """
        entry = self.enqueue()
        self.clock.advance(0)
        self.connects[0].refuse()
        self.relay.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.relay = self.makeRelay()
        self.relay.startService()
        self.assertEqual(list(self.relay.entries), [entry.queueId])
        self.clock.advance(199)
        self.assertEqual(len(self.connects), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.connects), 2)
        self.assertEqual([e.attempts for e in listEntries(self.root)], [2])

    def test_flushAll(self):
        """
        L{RelayService.flushAll} makes waiting entries due now.
        """
        self.enqueue()
        self.clock.advance(0)
        self.connects[0].refuse()
        self.assertEqual(self.relay.flushAll(), 1)
        self.clock.advance(0)
        self.assertEqual(len(self.connects), 2)

    def test_flushFile(self):
        """
        L{requestFlush} (the CLI) wakes a running service through the
        C{.flush} file within the scan interval.
        """
        self.enqueue()
        self.clock.advance(0)
        self.connects[0].refuse()
        self.clock.advance(5)
        self.assertEqual(len(self.connects), 1)
        requestFlush(self.root, now=self.clock.seconds())
        self.clock.advance(5)
        self.assertEqual(len(self.connects), 2)

    def test_flushPollingSurvivesAFailure(self):
        """
        An unexpected error while handling the C{.flush} file is logged as
        a failure and the polling goes on: a later request is still seen.
        """
        flushAll = self.relay.flushAll
        calls = []

        def broken():
            calls.append("broken")
            raise RuntimeError("boom")

        self.relay.flushAll = broken
        requestFlush(self.root, now=self.clock.seconds())
        with capturedLogs() as events:
            self.clock.advance(5)
        self.assertEqual(calls, ["broken"])
        [failure] = [e for e in events if "log_failure" in e]
        self.assertIsInstance(failure["log_failure"].value, RuntimeError)
        self.flushLoggedErrors(RuntimeError)
        self.relay.flushAll = lambda: calls.append("flush") or flushAll()
        os.utime(os.path.join(self.root, ".flush"), ns=(1, 1))
        self.clock.advance(5)
        self.assertEqual(calls, ["broken", "flush"])

    def test_stopCancels(self):
        """
        Stopping cancels every timer.
        """
        self.enqueue()
        self.clock.advance(0)
        self.connects[0].refuse()
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        self.successResultOf(self.relay.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopWaitsForAttempt(self):
        """
        Stopping aborts the connection in progress and waits for the attempt
        to finish; the recipient stays queued.
        """
        entry = self.enqueue()
        self.clock.advance(0)
        endpoint = self.connects[0]
        endpoint.open()
        endpoint.feed(GREETING)
        stopped = self.relay.stopService()
        self.assertTrue(endpoint.transport.disconnected)
        self.assertNoResult(stopped)
        endpoint.close()
        self.successResultOf(stopped)
        self.assertEqual(self.json(entry)["recipients"][0]["state"], "pending")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopCancelsConnecting(self):
        """
        Stopping cancels a connection attempt still in progress; the entry
        stays queued.
        """
        entry = self.enqueue()
        self.clock.advance(0)
        self.successResultOf(self.relay.stopService())
        self.assertEqual([e.queueId for e in listEntries(self.root)], [entry.queueId])
        self.assertEqual(self.json(entry)["lastError"], "bob@remote.example: mx.remote.example: connection attempt cancelled")

    def test_stopAbandons(self):
        """
        An attempt that does not finish within the grace period is abandoned;
        the entry stays queued.
        """
        entry = self.enqueue()
        self.clock.advance(0)
        endpoint = self.connects[0]
        endpoint.open()
        endpoint.feed(GREETING)
        # A transport that ignores the abort: the session never ends.
        endpoint.transport.abortConnection = lambda: None
        stopped = self.relay.stopService()
        self.assertNoResult(stopped)
        self.clock.advance(STOP_GRACE)
        self.successResultOf(stopped)
        self.assertEqual([e.queueId for e in listEntries(self.root)], [entry.queueId])

    def test_concurrencyLimit(self):
        """
        No more than C{maxConnections} connections are open at once.
        """
        self.relay.stopService()
        self.relay = self.makeRelay(maxConnections=2)
        self.relay.startService()
        for _ in range(3):
            self.enqueue()
        self.clock.advance(0)
        self.assertEqual(len(self.connects), 2)
        self.connects[0].refuse()
        self.assertEqual(len(self.connects), 3)

    def test_smtputf8Offered(self):
        """
        A message received with SMTPUTF8 goes with C{SMTPUTF8} on MAIL to a
        server that offers it, its UTF-8 recipient as UTF-8; nothing
        bounces.
        """
        entry = self.enqueue(recipients=[JORG], smtputf8=True)
        self.clock.advance(0)
        sent = self.connects[0].serve([GREETING, EHLO_UTF8, OK, OK, b"354 go ahead\r\n", OK, b"221 bye\r\n"])
        self.assertEqual(sent[1:3], [b"MAIL FROM:<alice@example.org> SMTPUTF8\r\n", "RCPT TO:<j\u00f6rg@remote.example>\r\n".encode("utf-8")])
        self.assertEqual(self.bounces, [])
        self.assertEqual(listEntries(self.root), [])
        self.assertNotIn(entry.queueId, self.relay.entries)

    def test_smtputf8NotOffered(self):
        """
        To a server that does not offer SMTPUTF8, a UTF-8 recipient is not
        sent (QUIT after EHLO) and fails permanently with 5.6.7: one bounce
        to the sender (RFC 6531 3.7.5).
        """
        self.enqueue(recipients=[JORG], smtputf8=True)
        self.clock.advance(0)
        sent = self.connects[0].serve([GREETING, EHLO_OK, b"221 bye\r\n"])
        self.assertEqual(sent[:2], [b"EHLO mx.example.org\r\n", b"QUIT\r\n"])
        [(sender, data)] = self.bounces
        self.assertEqual(sender, ALICE)
        self.assertEqual(self.bounceRecipients(data), [("utf-8; j\\x{F6}rg@remote.example", "5.6.7")])
        self.assertEqual(listEntries(self.root), [])

    def test_smtputf8NotOfferedMixedRecipients(self):
        """
        Without SMTPUTF8 at the next hop, the ASCII recipients of the same
        message are still delivered (MAIL without the parameter) and only
        the UTF-8 one bounces.
        """
        self.enqueue(recipients=[BOB, JORG], smtputf8=True)
        self.clock.advance(0)
        sent = self.connects[0].serve([GREETING, EHLO_OK, OK, OK, b"354 go ahead\r\n", OK, b"221 bye\r\n"])
        self.assertEqual(sent[1:4], [b"MAIL FROM:<alice@example.org>\r\n", b"RCPT TO:<bob@remote.example>\r\n", b"DATA\r\n"])
        [(_, data)] = self.bounces
        self.assertEqual([status for _, status in self.bounceRecipients(data)], ["5.6.7"])
        self.assertEqual(listEntries(self.root), [])

    def test_asciiMessageWithFlagToServerWithout(self):
        """
        A message received with SMTPUTF8 whose envelope is ASCII goes to a
        server without SMTPUTF8 as it is, without the parameter.
        """
        self.enqueue(smtputf8=True)
        self.clock.advance(0)
        sent = self.connects[0].serve(successReplies())
        self.assertEqual(sent[1], b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(self.bounces, [])


class MXTests(RelayTestMixin, unittest.SynchronousTestCase):
    """
    Mail exchanger lookup and fallback.
    """

    def setUpWith(self, **kw):
        self.setUpRelay(resolver=FakeResolver(**kw))
        self.start()

    def test_preferenceOrder(self):
        """
        MX hosts are tried in preference order; a failed connection moves on
        to the next host in the same attempt.
        """
        self.setUpWith(mx={"remote.example": [(20, "b.mx.example"), (10, "a.mx.example."), (30, "C.MX.example")]})
        entry = self.enqueue()
        self.clock.advance(0)
        self.assertEqual([e.host for e in self.connects], ["a.mx.example"])
        self.connects[0].refuse()
        self.assertEqual([e.host for e in self.connects], ["a.mx.example", "b.mx.example"])
        self.connects[1].refuse()
        self.connects[2].refuse()
        self.assertEqual([(e.host, e.port) for e in self.connects][2], ("c.mx.example", 25))
        self.assertEqual(len(self.connects), 3)
        self.assertEqual(self.json(entry)["attempts"], 1)
        self.assertEqual(self.json(entry)["lastError"], "bob@remote.example: c.mx.example: connection refused")

    def test_secondHostAfterGreetingFailure(self):
        """
        A host that refuses the session (421) makes the next host be tried.
        """
        self.setUpWith(mx={"remote.example": [(10, "a.mx.example"), (20, "b.mx.example")]})
        self.enqueue()
        self.clock.advance(0)
        self.connects[0].serve([b"421 4.3.2 busy\r\n", b"221 bye\r\n"])
        self.connects[1].serve(successReplies())
        self.assertEqual(listEntries(self.root), [])

    def test_implicitMX(self):
        """
        A domain without MX records but with an address is its own mail
        exchanger.
        """
        self.setUpWith(a={"remote.example": [PUBLIC_V4]})
        self.enqueue()
        self.clock.advance(0)
        self.assertEqual([(e.host, e.port) for e in self.connects], [("remote.example", 25)])

    def test_implicitMXv6(self):
        """
        An IPv6-only domain without MX records is its own mail exchanger.
        """
        self.setUpWith(aaaa={"remote.example": [PUBLIC_V6]})
        self.enqueue()
        self.clock.advance(0)
        self.assertEqual([e.host for e in self.connects], ["remote.example"])

    def test_noHost(self):
        """
        A domain with neither MX nor address records fails permanently.
        """
        self.setUpWith()
        self.enqueue()
        self.clock.advance(0)
        self.assertEqual(self.connects, [])
        [(_, data)] = self.bounces
        self.assertEqual(self.bounceRecipients(data), [("rfc822; bob@remote.example", "5.1.2")])

    def test_nullMX(self):
        """
        A null MX (RFC 7505) fails permanently with 5.1.10.
        """
        self.setUpWith(mx={"remote.example": [(0, "")]})
        self.enqueue()
        self.clock.advance(0)
        self.assertEqual(self.connects, [])
        [(_, data)] = self.bounces
        self.assertEqual(self.bounceRecipients(data), [("rfc822; bob@remote.example", "5.1.10")])

    def test_nxdomain(self):
        """
        A domain that does not exist fails permanently.
        """
        self.setUpWith(errors={("MX", "remote.example"): dnserror.DNSNameError("nx")})
        self.enqueue()
        self.clock.advance(0)
        [(_, data)] = self.bounces
        self.assertIn(b"domain remote.example does not exist", data)

    def test_dnsTemporary(self):
        """
        A DNS server failure or time-out leaves the recipient pending.
        """
        self.setUpWith(errors={("MX", "remote.example"): dnserror.DNSServerError("servfail")})
        entry = self.enqueue()
        self.clock.advance(0)
        self.assertEqual(self.bounces, [])
        state = self.json(entry)
        self.assertEqual(state["recipients"][0]["state"], "pending")
        self.assertIn("DNS lookup for remote.example failed", state["lastError"])

    def test_onePerDomain(self):
        """
        Recipients are grouped by domain: one connection per domain carries
        all of its recipients.
        """
        self.setUpWith(mx={"remote.example": [(10, "mx.remote.example")], "other.example": [(10, "mx.other.example")]})
        self.enqueue(recipients=[BOB, ERIN, CAROL])
        self.clock.advance(0)
        self.assertEqual(sorted(e.host for e in self.connects), ["mx.other.example", "mx.remote.example"])
        remote = [e for e in self.connects if e.host == "mx.remote.example"][0]
        sent = remote.serve(successReplies(2))
        self.assertEqual(sent[2:4], [b"RCPT TO:<bob@remote.example>\r\n", b"RCPT TO:<carol@remote.example>\r\n"])
        [other] = [e for e in self.connects if e.host == "mx.other.example"]
        other.refuse()
        [entry] = listEntries(self.root)
        self.assertEqual([r.state for r in entry.recipients], [DELIVERED, PENDING, DELIVERED])

    def test_opportunisticTLS(self):
        """
        With a TLS factory, STARTTLS is used when an MX host offers it,
        without verification (C{verify=None}), then EHLO is sent again.
        """
        calls = []
        self.setUpRelay()
        self.relay = self.makeRelay(clientTLS=lambda host, verify: calls.append((host, verify)) or "CTX")
        self.start()
        self.enqueue()
        self.clock.advance(0)
        endpoint = self.connects[0]
        endpoint.open()
        endpoint.feed(GREETING)
        self.assertEqual(endpoint.feed(b"250-mx\r\n250 STARTTLS\r\n"), b"STARTTLS\r\n")
        self.assertEqual(endpoint.feed(b"220 go\r\n"), b"EHLO mx.example.org\r\n")
        self.assertEqual(endpoint.transport.tlsContext, "CTX")
        self.assertEqual(calls, [("mx.remote.example", None)])
        self.assertEqual(endpoint.feed(EHLO_OK), b"MAIL FROM:<alice@example.org>\r\n")


    def tlsSession(self, verified):
        """
        Deliver one message to an MX host over opportunistic STARTTLS whose
        context reports C{verified}; return the relay's log lines.
        """

        class Result:
            pass

        class Context:
            result = Result()

        Context.result.verified = verified
        self.setUpRelay()
        self.relay = self.makeRelay(clientTLS=lambda host, verify: Context())
        self.start()
        self.enqueue()
        with capturedLogs() as events:
            self.clock.advance(0)
            self.connects[0].serve(
                [GREETING, b"250-mx\r\n250 STARTTLS\r\n", b"220 go\r\n"] + successReplies()[1:]
            )
        self.assertEqual(listEntries(self.root), [])
        return [formatEvent(e) for e in events]

    def test_opportunisticTLSVerifiedLogged(self):
        """
        The log line of an MX delivery says it was encrypted and verified
        when the opportunistic context's result says the peer was verified.
        """
        lines = [line for line in self.tlsSession(True) if "host=mx.remote.example:25" in line]
        self.assertEqual(len(lines), 1)
        self.assertIn(" delivered=1 deferred=0 failed=0 tls=yes verified=yes error=-", lines[0])

    def test_opportunisticTLSUnverifiedLogged(self):
        """
        The log line of an MX delivery over TLS to a peer that could not be
        verified says encrypted, not verified.
        """
        lines = [line for line in self.tlsSession(False) if "host=mx.remote.example:25" in line]
        self.assertEqual(len(lines), 1)
        self.assertIn(" tls=yes verified=no error=-", lines[0])

    def test_failedHandshakeFallsBackToPlaintext(self):
        """
        When the opportunistic TLS handshake with an MX host fails, the same
        host is tried once more without STARTTLS (RFC 7435), and the message
        is delivered over that plaintext session.
        """
        from OpenSSL import SSL

        contexts = []
        self.setUpRelay()
        self.relay = self.makeRelay(clientTLS=lambda host, verify: contexts.append(host) or "CTX")
        self.start()
        self.enqueue()
        self.clock.advance(0)
        first = self.connects[0]
        first.open()
        first.feed(GREETING)
        self.assertEqual(first.feed(b"250-mx\r\n250 STARTTLS\r\n"), b"STARTTLS\r\n")
        first.feed(b"220 go\r\n")
        first.protocol.connectionLost(Failure(SSL.Error([("SSL routines", "", "unsupported protocol")])))
        self.clock.advance(0)
        self.assertEqual([(e.host, e.port) for e in self.connects], [("mx.remote.example", 25)] * 2)
        sent = self.connects[1].serve([GREETING, b"250-mx\r\n250 STARTTLS\r\n"] + successReplies()[2:])
        self.assertEqual(sent[:2], [b"EHLO mx.example.org\r\n", b"MAIL FROM:<alice@example.org>\r\n"])
        self.assertEqual(contexts, ["mx.remote.example"])
        self.assertEqual(listEntries(self.root), [])

    def test_starttlsDiscardsInjectedReplies(self):
        """
        Replies that arrive in the same plaintext segment as the 220 to
        STARTTLS are discarded, never taken as answers over TLS (a man in
        the middle could inject them): the client waits for the EHLO reply
        that comes over TLS.
        """
        self.setUpRelay()
        self.relay = self.makeRelay(clientTLS=lambda host, verify: "CTX")
        self.start()
        self.enqueue()
        self.clock.advance(0)
        endpoint = self.connects[0]
        endpoint.open()
        endpoint.feed(GREETING)
        self.assertEqual(endpoint.feed(b"250-mx\r\n250 STARTTLS\r\n"), b"STARTTLS\r\n")
        self.assertEqual(
            endpoint.feed(b"220 go\r\n250-injected\r\n250 AUTH PLAIN\r\n"), b"EHLO mx.example.org\r\n"
        )
        self.assertEqual(endpoint.feed(EHLO_OK), b"MAIL FROM:<alice@example.org>\r\n")


class SmarthostTests(RelayTestMixin, unittest.SynchronousTestCase):
    """
    Relaying everything through a configured relay host.
    """

    def test_relayHost(self):
        """
        Every recipient goes to the relay host in one session, whatever its
        domain; no DNS lookup is made.
        """
        self.setUpRelay(relayHost="smarthost.example", relayPort=2525)
        self.start()
        self.enqueue(recipients=[BOB, ERIN])
        self.clock.advance(0)
        self.assertEqual([(e.host, e.port) for e in self.connects], [("smarthost.example", 2525)])
        sent = self.connects[0].serve(successReplies(2))
        self.assertEqual(sent[2:4], [b"RCPT TO:<bob@remote.example>\r\n", b"RCPT TO:<erin@other.example>\r\n"])
        self.assertEqual(self.resolver.queries, [])
        self.assertEqual(listEntries(self.root), [])

    def test_keptConnectionMakesNoEndpoint(self):
        """
        A message sent over a kept smarthost connection makes no endpoint:
        the endpoint factory is called for each connection, not for each
        message.
        """
        made = []

        def endpointFactory(host, port):
            made.append((host, port))
            return FakeEndpoint(host, port, self.connects)

        self.setUpRelay(relayHost="smarthost.example", endpointFactory=endpointFactory)
        self.start()
        self.enqueue()
        self.clock.advance(0)
        [endpoint] = self.connects
        endpoint.open()
        sent = [endpoint.feed(r) for r in (GREETING, EHLO_OK, OK, OK, b"354 go\r\n", OK, OK)]
        self.assertEqual(sent[-2:], [b"RSET\r\n", b""])
        second = self.enqueue()
        self.clock.advance(0)
        self.assertEqual(endpoint.feed(b""), b"MAIL FROM:<alice@example.org>\r\n")
        sent = [endpoint.feed(r) for r in (OK, OK, b"354 go\r\n", OK, OK)]
        self.assertEqual(sent[-2:], [b"RSET\r\n", b""])
        self.assertEqual((made, self.connects), ([("smarthost.example", 25)], [endpoint]))
        self.assertFalse(self.queue.hasEntry(second.queueId))

    def test_defaultPorts(self):
        """
        The relay port defaults to 25, or 587 when a user name is set.
        """
        self.setUpRelay(relayHost="smarthost.example")
        self.assertEqual(self.relay.relayPort, 25)
        self.assertEqual(self.makeRelay(relayHost="s", relayUsername="u", relayPassword="p").relayPort, 587)

    def test_credentialsNeedTLS(self):
        """
        With credentials, a relay that offers no STARTTLS gets no AUTH: the
        session ends and the recipient stays pending.
        """
        self.setUpRelay(
            relayHost="smarthost.example",
            relayUsername="gw",
            relayPassword="s3cret",
            clientTLS=lambda host, verify: "CTX",
        )
        self.start()
        entry = self.enqueue()
        self.clock.advance(0)
        sent = self.connects[0].serve([GREETING, b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n", b"221 bye\r\n"])
        self.assertEqual(sent, [b"EHLO mx.example.org\r\n", b"QUIT\r\n", b""])
        self.assertEqual(self.json(entry)["recipients"][0]["state"], "pending")

    def test_verifiedSmarthostRequiresTLS(self):
        """
        Without credentials but with certificate verification on (the
        default), a relay host that offers no STARTTLS gets no mail: a
        stripped STARTTLS cannot silently skip the check.  The recipient
        stays pending with the error recorded.
        """
        self.setUpRelay(relayHost="smarthost.example", clientTLS=lambda host, verify: "CTX")
        self.start()
        entry = self.enqueue()
        self.clock.advance(0)
        sent = self.connects[0].serve([GREETING, EHLO_OK, b"221 bye\r\n"])
        self.assertEqual(sent, [b"EHLO mx.example.org\r\n", b"QUIT\r\n", b""])
        data = self.json(entry)
        self.assertEqual(data["recipients"][0]["state"], "pending")
        self.assertIn("TLS", data["lastError"])

    def test_unverifiedSmarthostMayBePlaintext(self):
        """
        With verification turned off explicitly, a relay host without
        STARTTLS gets the mail in plaintext.
        """
        self.setUpRelay(relayHost="smarthost.example", relayVerifyTLS=False, clientTLS=lambda host, verify: "CTX")
        self.start()
        self.enqueue()
        self.clock.advance(0)
        sent = self.connects[0].serve(successReplies())
        self.assertEqual(sent[1], b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(listEntries(self.root), [])

    def loopbackSession(self, peer, replies, **kw):
        """
        Queue one message for the smarthost at C{127.0.0.1} with
        certificate verification on (the default); serve C{replies} over a
        connection whose peer is C{peer}.

        @return: the entry, the client's writes, the transport and the
            C{clientTLS} calls.
        """
        calls = []
        self.setUpRelay(
            relayHost="127.0.0.1",
            relayPort=10025,
            clientTLS=lambda host, verify: calls.append((host, verify)) or "CTX",
            **kw,
        )
        self.start()
        entry = self.enqueue()
        self.clock.advance(0)
        endpoint = self.connects[0]
        transport = TLSStringTransport(peerAddress=peer)
        endpoint.open(transport)
        sent = [endpoint.feed(r) for r in replies]
        endpoint.close()
        return entry, sent, transport, calls

    def test_loopbackSmarthostMayBePlaintext(self):
        """
        A smarthost on loopback (127.0.0.0/8, C{::1}, a Unix socket) that
        offers no STARTTLS gets the mail in plaintext although certificate
        verification is on: there is no network to protect.
        """
        for peer in (
            IPv4Address("TCP", "127.0.0.1", 10025),
            IPv4Address("TCP", "127.1.2.3", 10025),
            IPv6Address("TCP", "::1", 10025),
            UNIXAddress("/run/postfix/smtp"),
        ):
            entry, sent, _, _ = self.loopbackSession(peer, successReplies())
            self.assertEqual(sent[1], b"MAIL FROM:<alice@example.org>\r\n", peer)
            self.assertEqual(listEntries(self.root), [], peer)

    def test_loopbackSmarthostStartTLSOpportunistic(self):
        """
        A smarthost on loopback that offers STARTTLS gets it, with the
        opportunistic (unverified) context: a local relay's self-signed
        certificate does not keep mail queued.
        """
        _, sent, transport, calls = self.loopbackSession(
            IPv4Address("TCP", "127.0.0.1", 10025),
            [GREETING, b"250-mx\r\n250 STARTTLS\r\n", b"220 go\r\n"],
        )
        self.assertEqual(sent, [b"EHLO mx.example.org\r\n", b"STARTTLS\r\n", b"EHLO mx.example.org\r\n"])
        self.assertEqual(calls, [("127.0.0.1", None)])
        self.assertEqual(transport.tlsContext, "CTX")

    def test_loopbackSmarthostCredentialsNeedTLS(self):
        """
        With credentials, a smarthost on loopback without STARTTLS still
        gets no AUTH and no mail: credentials only go over TLS.
        """
        entry, sent, _, _ = self.loopbackSession(
            IPv4Address("TCP", "127.0.0.1", 10025),
            [GREETING, b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n", b"221 bye\r\n"],
            relayUsername="gw",
            relayPassword="s3cret",
        )
        self.assertEqual(sent, [b"EHLO mx.example.org\r\n", b"QUIT\r\n", b""])
        data = self.json(entry)
        self.assertEqual(data["recipients"][0]["state"], "pending")
        self.assertIn("relay credentials are sent only over TLS", data["lastError"])

    def test_remoteSmarthostByLoopbackNameRequiresTLS(self):
        """
        What counts is the address connected to, not the configured name:
        a smarthost configured as C{127.0.0.1} but reached at a remote
        address (a proxying endpoint) is held to the rule.
        """
        entry, sent, _, _ = self.loopbackSession(
            IPv4Address("TCP", "192.0.2.7", 10025), [GREETING, EHLO_OK, b"221 bye\r\n"]
        )
        self.assertEqual(sent, [b"EHLO mx.example.org\r\n", b"QUIT\r\n", b""])
        self.assertEqual(self.json(entry)["recipients"][0]["state"], "pending")

    def test_starttlsThenAuth(self):
        """
        With credentials, STARTTLS verified against the relay host comes
        first, then AUTH PLAIN, then the mail.
        """
        calls = []
        self.setUpRelay(
            relayHost="smarthost.example",
            relayUsername="gw",
            relayPassword="s3cret",
            clientTLS=lambda host, verify: calls.append((host, verify)) or "CTX",
        )
        self.start()
        self.enqueue()
        self.clock.advance(0)
        endpoint = self.connects[0]
        self.assertEqual(endpoint.port, 587)
        endpoint.open()
        self.assertEqual(endpoint.feed(GREETING), b"EHLO mx.example.org\r\n")
        self.assertEqual(endpoint.feed(b"250-mx\r\n250 STARTTLS\r\n"), b"STARTTLS\r\n")
        self.assertEqual(endpoint.feed(b"220 go\r\n"), b"EHLO mx.example.org\r\n")
        self.assertEqual(calls, [("smarthost.example", True)])
        self.assertEqual(endpoint.transport.tlsContext, "CTX")
        auth = endpoint.feed(b"250-mx\r\n250 AUTH PLAIN\r\n")
        self.assertEqual(auth, b"AUTH PLAIN " + base64.b64encode(b"gw\0gw\0s3cret") + b"\r\n")
        self.assertEqual(endpoint.feed(b"235 ok\r\n"), b"MAIL FROM:<alice@example.org>\r\n")

    def test_authDeclined(self):
        """
        Refused credentials are a temporary failure (a configuration error
        must not bounce mail).
        """
        self.setUpRelay(
            relayHost="smarthost.example",
            relayUsername="gw",
            relayPassword="s3cret",
            clientTLS=lambda host, verify: "CTX",
        )
        self.start()
        entry = self.enqueue()
        self.clock.advance(0)
        endpoint = self.connects[0]
        endpoint.open()
        for reply in (GREETING, b"250-mx\r\n250 STARTTLS\r\n", b"220 go\r\n", b"250-mx\r\n250 AUTH PLAIN\r\n"):
            endpoint.feed(reply)
        self.assertEqual(endpoint.feed(b"535 5.7.8 bad credentials\r\n"), b"AUTH PLAIN " + base64.b64encode(b"\0gw\0s3cret") + b"\r\n")
        self.assertEqual(endpoint.feed(b"535 5.7.8 bad credentials\r\n"), b"QUIT\r\n")
        endpoint.close()
        self.assertEqual(self.bounces, [])
        state = self.json(entry)
        self.assertEqual(state["recipients"][0]["state"], "pending")
        self.assertNotIn("s3cret", state["lastError"])


class _Handler:
    """
    An aiosmtpd handler: C{busy@} gets 450 the first time, C{nobody@} 550,
    anyone else 250; messages are recorded.
    """

    def __init__(self):
        self.busySeen = 0
        self.messages = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("busy@"):
            self.busySeen += 1
            if self.busySeen == 1:
                return "450 4.2.0 try again later"
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 queued"


class _SMTPServerThread:
    """
    An aiosmtpd server on 127.0.0.1 (a free port) in its own thread and
    event loop.
    """

    def __init__(self, handler):
        self.handler = handler
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="aiosmtpd-test", daemon=True)
        self.port = None

    def _run(self):
        from aiosmtpd.smtp import SMTP

        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            self.loop.create_server(lambda: SMTP(self.handler, hostname="smtpd.test"), "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        try:
            self.loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(server.wait_closed())
            self.loop.close()

    def start(self):
        self.thread.start()
        if not self.ready.wait(30):
            raise RuntimeError("SMTP test server did not start")

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


class LoopbackRelayTests(unittest.TestCase):
    """
    End to end: the relay delivers to a real SMTP server (aiosmtpd) over
    TCP on 127.0.0.1 with the real reactor.
    """

    def setUp(self):
        self.handler = _Handler()
        self.server = _SMTPServerThread(self.handler)
        self.server.start()
        self.addCleanup(self.server.stop)

    @defer.inlineCallbacks
    def test_relay(self):
        """
        One accepted recipient is delivered, one 550 recipient is bounced,
        one 450 recipient is delivered on the retry, and the entry is then
        removed.
        """
        from twisted.internet import reactor

        root = self.mktemp()
        queue = OutboundQueue(root, reactor)
        bounces = []

        def bounceDelivery(sender, data):
            bounces.append((sender, data))
            return defer.succeed(None)

        relay = RelayService(
            queue,
            reactor,
            "pop3gw.test",
            bounceDelivery,
            relayHost="127.0.0.1",
            relayPort=self.server.port,
            connectTimeout=10,
            schedule=(3600,),
        )
        relay.startService()
        self.addCleanup(relay.stopService)

        ok = Address("ok", "dest.test")
        busy = Address("busy", "dest.test")
        nobody = Address("nobody", "dest.test")
        delivery = queue.beginDelivery(ALICE, [ok, busy, nobody], TRACE)
        delivery.write(BODY)
        yield delivery.commit()
        [entry] = listEntries(root)

        yield relay.runEntry(entry.queueId)
        self.assertEqual(len(self.handler.messages), 1)
        mailFrom, rcpts, content = self.handler.messages[0]
        self.assertEqual((mailFrom, rcpts), ("alice@example.org", ["ok@dest.test"]))
        self.assertEqual(content, STORED)
        [(sender, data)] = bounces
        self.assertEqual(sender, ALICE)
        self.assertIn(b"Final-Recipient: rfc822; nobody@dest.test\r\n", data)
        self.assertIn(b"Status: 5.1.1\r\n", data)
        [state] = listEntries(root)
        self.assertEqual([r.state for r in state.recipients], [DELIVERED, PENDING, FAILED])
        self.assertEqual(state.lastError, "busy@dest.test: 450 4.2.0 try again later")

        yield relay.runEntry(entry.queueId)
        self.assertEqual(len(self.handler.messages), 2)
        self.assertEqual(self.handler.messages[1][:2], ("alice@example.org", ["busy@dest.test"]))
        self.assertEqual(listEntries(root), [])
        self.assertEqual(len(bounces), 1)


def relayLog(events):
    """
    The relay's log lines among captured C{events}, as C{(level name,
    text)} pairs.
    """
    lines = []
    for event in events:
        text = formatEvent(event)
        if text.startswith("relay: "):
            lines.append((event["log_level"].name, text))
    return lines


class RelayLogTests(RelayTestMixin, unittest.SynchronousTestCase):
    """
    What the relay logs for each session: counts that add up to the
    recipients concerned, plain-word errors (never Twisted's own made-up
    reply codes), each remote refusal with its reply, failures at warn and
    successes at info; the queue's last error uses the same words.
    """

    def attempt(self, serve, recipients=(BOB,), **kw):
        """
        Queue one message, run its first attempt with C{serve(endpoint)}
        and return the entry and the relay's log lines.
        """
        self.setUpRelay(**kw)
        self.start()
        entry = self.enqueue(recipients=recipients)
        with capturedLogs() as events:
            self.clock.advance(0)
            serve(self.connects[0])
        return entry, relayLog(events)

    def test_verifiedSmarthostWithoutSTARTTLS(self):
        """
        A smarthost whose certificate is to be verified but that offers no
        STARTTLS: the recipient is counted deferred, the error says so in
        plain words (no "502", which no server sent), at warn level, and
        C{queue list} shows the same words.
        """
        entry, lines = self.attempt(
            lambda e: e.serve([GREETING, EHLO_OK, b"221 bye\r\n"]),
            relayHost="smarthost.example",
            clientTLS=lambda host, verify: "CTX",
        )
        why = "smarthost offers no STARTTLS and certificate verification is on"
        self.assertEqual(
            lines,
            [
                (
                    "warn",
                    f"relay: {entry.queueId} domain=remote.example host=smarthost.example:25"
                    f' delivered=0 deferred=1 failed=0 tls=no verified=no error="{why}"',
                )
            ],
        )
        [stored] = listEntries(self.root)
        self.assertEqual(stored.lastError, f"bob@remote.example: smarthost.example: {why}")
        self.assertTrue(formatEntry(stored).endswith(f" error=bob@remote.example: smarthost.example: {why}"))

    def test_smarthostWithCredentialsWithoutSTARTTLS(self):
        """
        With relay credentials, a smarthost without STARTTLS is reported as
        such: credentials only go over TLS.
        """
        entry, lines = self.attempt(
            lambda e: e.serve([GREETING, b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n", b"221 bye\r\n"]),
            relayHost="smarthost.example",
            relayUsername="gw",
            relayPassword="s3cret",
            clientTLS=lambda host, verify: "CTX",
        )
        [(level, line)] = lines
        self.assertEqual(level, "warn")
        self.assertIn(" delivered=0 deferred=1 failed=0 ", line)
        self.assertTrue(line.endswith(' error="smarthost offers no STARTTLS and relay credentials are sent only over TLS"'))
        self.assertNotIn("s3cret", line)

    def test_smarthostWithoutAuthMechanism(self):
        """
        With relay credentials, a smarthost that offers no AUTH mechanism
        the relay speaks is reported as such, without a made-up code.
        """

        def serve(e):
            e.serve([GREETING, b"250-mx\r\n250 STARTTLS\r\n", b"220 go\r\n", EHLO_OK, b"221 bye\r\n"])

        entry, lines = self.attempt(
            serve,
            relayHost="smarthost.example",
            relayUsername="gw",
            relayPassword="s3cret",
            clientTLS=lambda host, verify: "CTX",
        )
        [(level, line)] = lines
        self.assertEqual(level, "warn")
        self.assertTrue(line.endswith(' error="smarthost offers no AUTH mechanism pop3gw supports (PLAIN, LOGIN)"'), line)

    def test_authDeclinedNamesReply(self):
        """
        Refused relay credentials are reported with the smarthost's reply.
        """

        def serve(e):
            e.open()
            for reply in (GREETING, b"250-mx\r\n250 STARTTLS\r\n", b"220 go\r\n", b"250-mx\r\n250 AUTH PLAIN\r\n"):
                e.feed(reply)
            e.feed(b"535 5.7.8 bad credentials\r\n")
            e.feed(b"535 5.7.8 bad credentials\r\n")
            e.close()

        entry, lines = self.attempt(
            serve,
            relayHost="smarthost.example",
            relayUsername="gw",
            relayPassword="s3cret",
            clientTLS=lambda host, verify: "CTX",
        )
        [(level, line)] = lines
        self.assertEqual(level, "warn")
        self.assertTrue(line.endswith(' error="smarthost refused the relay credentials: 535 5.7.8 bad credentials"'), line)

    def test_connectionRefused(self):
        """
        A refused connection is "connection refused", counted deferred, at
        warn level; the last error says the same.
        """
        entry, lines = self.attempt(lambda e: e.refuse())
        self.assertEqual(
            lines,
            [
                (
                    "warn",
                    f"relay: {entry.queueId} domain=remote.example host=mx.remote.example:25"
                    ' delivered=0 deferred=1 failed=0 tls=no verified=no error="connection refused"',
                )
            ],
        )
        self.assertEqual(self.json(entry)["lastError"], "bob@remote.example: mx.remote.example: connection refused")

    def test_greetingRefused(self):
        """
        A server that refuses the session in its greeting is reported with
        its reply.
        """
        entry, lines = self.attempt(lambda e: e.serve([b"554 5.3.2 no service\r\n", b"221 bye\r\n"]))
        [(level, line)] = lines
        self.assertEqual(level, "warn")
        self.assertIn(" delivered=0 deferred=1 failed=0 ", line)
        self.assertTrue(line.endswith(' error="server refused the session: 554 5.3.2 no service"'), line)

    def test_responseTimeout(self):
        """
        A server that stops answering is reported in plain words, without
        Twisted's made-up code.
        """

        def serve(e):
            e.open()
            e.feed(GREETING)
            self.clock.advance(300)
            e.close()

        entry, lines = self.attempt(serve)
        [(level, line)] = lines
        self.assertEqual(level, "warn")
        self.assertTrue(line.endswith(' error="no reply from the server within 300 seconds"'), line)

    def test_perRecipientReasons(self):
        """
        In a session with per-recipient results, the summary counts each
        outcome and every deferred or failed recipient gets its own warn
        line with the remote reply.
        """
        entry, lines = self.attempt(
            lambda e: e.serve(
                [GREETING, EHLO_OK, OK, OK, b"451 4.3.0 later\r\n", b"550 5.1.1 unknown\r\n", b"354 go\r\n", OK, b"221 bye\r\n"]
            ),
            recipients=[BOB, CAROL, DAVE],
        )
        prefix = f"relay: {entry.queueId}"
        self.assertEqual(
            lines[:3],
            [
                (
                    "warn",
                    f"{prefix} domain=remote.example host=mx.remote.example:25"
                    " delivered=1 deferred=1 failed=1 tls=no verified=no error=-",
                ),
                ("warn", f"{prefix} to=carol@remote.example host=mx.remote.example:25 result=deferred reply=\"451 4.3.0 later\""),
                ("warn", f"{prefix} to=dave@remote.example host=mx.remote.example:25 result=failed reply=\"550 5.1.1 unknown\""),
            ],
        )

    def test_successAtInfo(self):
        """
        A session that delivers every recipient is logged at info level.
        """
        entry, lines = self.attempt(lambda e: e.serve(successReplies()))
        self.assertEqual(lines[0][0], "info")
        self.assertIn(" delivered=1 deferred=0 failed=0 tls=no verified=no error=-", lines[0][1])

    def test_dnsFailureAtWarn(self):
        """
        A temporary DNS failure is logged at warn level in plain words.
        """
        self.setUpRelay(resolver=FakeResolver(errors={("MX", "remote.example"): dnserror.DNSServerError("servfail")}))
        self.start()
        entry = self.enqueue()
        with capturedLogs() as events:
            self.clock.advance(0)
        self.assertEqual(
            relayLog(events),
            [
                (
                    "warn",
                    f"relay: {entry.queueId} domain=remote.example result=deferred:"
                    " DNS lookup for remote.example failed: server failure (SERVFAIL)",
                )
            ],
        )

    def test_factoryQuiet(self):
        """
        The relay's client factory does not log "Starting factory" and
        "Stopping factory" for every connection.
        """
        self.setUpRelay()
        self.start()
        self.enqueue()
        self.clock.advance(0)
        self.assertFalse(self.connects[0].factory.noisy)


class RemoteTextInLogTests(RelayTestMixin, unittest.SynchronousTestCase):
    """
    Text a remote server sends is quoted and escaped in every relay log
    line, so that it cannot forge log content; C{queue list} keeps it
    readable.
    """

    attempt = RelayLogTests.attempt

    def test_replyQuoted(self):
        """
        A per-recipient reply with quotes and backslashes is logged quoted
        and escaped.
        """
        evil = b'550 5.1.1 x" rhost=203.0.113.9 \\ [pop3gw.pop3.POP3Server#warn] authentication failed'
        entry, lines = self.attempt(
            lambda e: e.serve([GREETING, EHLO_OK, OK, evil + b"\r\n", b"221 bye\r\n"]),
        )
        prefix = f"relay: {entry.queueId}"
        self.assertEqual(
            lines[1],
            (
                "warn",
                f"{prefix} to=bob@remote.example host=mx.remote.example:25 result=failed"
                ' reply="550 5.1.1 x\\" rhost=203.0.113.9 \\\\ [pop3gw.pop3.POP3Server#warn] authentication failed"',
            ),
        )

    def test_errorQuoted(self):
        """
        A session error naming a remote reply is logged quoted; C{queue
        list} shows the plain text.
        """
        entry, lines = self.attempt(lambda e: e.serve([b'554 5.3.2 "no" \x1b[31mservice\r\n', b"221 bye\r\n"]))
        [(level, line)] = lines
        self.assertTrue(line.endswith(' error="server refused the session: 554 5.3.2 \\"no\\" ?[31mservice"'), line)
        [stored] = listEntries(self.root)
        self.assertTrue(
            formatEntry(stored).endswith(
                ' error=bob@remote.example: mx.remote.example: server refused the session: 554 5.3.2 "no" ?[31mservice'
            ),
            formatEntry(stored),
        )


PUBLIC_V4 = "93.184.215.14"
PUBLIC_V6 = "2a00:1450:4001:82b::200e"


class InternalAddressTests(RelayTestMixin, unittest.SynchronousTestCase):
    """
    Direct MX delivery never connects to loopback, private, link-local,
    multicast, unspecified or reserved addresses.
    """

    def setUpWith(self, **kw):
        self.setUpRelay(resolver=FakeResolver(**kw))
        self.start()

    def test_internalHostSkipped(self):
        """
        An MX host whose addresses are all internal is skipped; the next one
        is used.
        """
        self.setUpWith(
            mx={"remote.example": [(10, "a.mx.example"), (20, "b.mx.example")]},
            a={"a.mx.example": ["127.0.0.1", "10.1.2.3"], "b.mx.example": [PUBLIC_V4]},
            aaaa={"a.mx.example": ["fe80::1"]},
        )
        self.enqueue()
        self.clock.advance(0)
        self.assertEqual([e.host for e in self.connects], ["b.mx.example"])

    def test_onlyInternal(self):
        """
        A domain whose mail exchangers resolve only to internal addresses
        fails permanently with 5.4.4 without a connection.
        """
        for addresses in (["127.0.0.1"], ["192.168.1.1", "0.0.0.0"], ["169.254.1.1"], ["224.0.0.1"], ["240.0.0.1"]):
            self.setUpWith(mx={"remote.example": [(10, "mx.remote.example")]}, a={"mx.remote.example": addresses})
            self.enqueue()
            self.clock.advance(0)
            self.assertEqual(self.connects, [], addresses)
            [(_, data)] = self.bounces
            self.assertEqual(self.bounceRecipients(data), [("rfc822; bob@remote.example", "5.4.4")], addresses)
            self.assertIn(b"no usable mail exchanger", data)
            self.stop()

    def test_onlyInternalV6(self):
        """
        IPv6 loopback, unique-local and IPv4-mapped loopback addresses are
        internal too.
        """
        self.setUpWith(mx={"remote.example": [(10, "mx.remote.example")]}, aaaa={"mx.remote.example": ["::1", "fd00::1", "::ffff:127.0.0.1"]})
        self.enqueue()
        self.clock.advance(0)
        self.assertEqual(self.connects, [])
        [(_, data)] = self.bounces
        self.assertEqual(self.bounceRecipients(data), [("rfc822; bob@remote.example", "5.4.4")])

    def test_implicitMXInternal(self):
        """
        A domain without MX whose own address is internal (such as
        C{localhost}) fails permanently with 5.4.4.
        """
        self.setUpWith(a={"localhost": ["127.0.0.1"]}, aaaa={"localhost": ["::1"]})
        self.enqueue(recipients=[Address("x", "localhost")])
        self.clock.advance(0)
        self.assertEqual(self.connects, [])
        [(_, data)] = self.bounces
        self.assertEqual(self.bounceRecipients(data), [("rfc822; x@localhost", "5.4.4")])

    def test_mixedAddressesKept(self):
        """
        A host with at least one public address is used.
        """
        self.setUpWith(mx={"remote.example": [(10, "mx.remote.example")]}, a={"mx.remote.example": ["127.0.0.1", PUBLIC_V4]})
        self.enqueue()
        self.clock.advance(0)
        self.assertEqual([e.host for e in self.connects], ["mx.remote.example"])

    def test_relayHostNotFiltered(self):
        """
        A configured smarthost may be internal: it is the operator's choice.
        """
        self.setUpRelay(relayHost="127.0.0.1")
        self.start()
        self.enqueue()
        self.clock.advance(0)
        self.assertEqual([e.host for e in self.connects], ["127.0.0.1"])

    def test_defaultEndpointFiltersAddresses(self):
        """
        The default endpoint for MX hosts resolves the name itself and
        connects only to public addresses, whatever the system resolver
        answers at connection time; the smarthost endpoint is not filtered.
        """
        from twisted.internet.address import IPv4Address as V4
        from twisted.internet.address import IPv6Address as V6
        from twisted.internet.testing import MemoryReactorClock

        class NameResolver:
            def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
                receiver.resolutionBegan(None)
                for a in ("127.0.0.1", "10.0.0.1", PUBLIC_V4):
                    receiver.addressResolved(V4("TCP", a, portNumber))
                for a in ("::1", "fe80::1", PUBLIC_V6):
                    receiver.addressResolved(V6("TCP", a, portNumber))
                receiver.resolutionComplete()
                return receiver

        reactor = MemoryReactorClock()
        reactor.nameResolver = NameResolver()
        relay = RelayService(OutboundQueue(self.mktemp(), reactor), reactor, "mx.example.org", lambda s, d: None)
        relay.dispatcher._defaultMXEndpoint("mx.remote.example", 25).connect(protocol.Factory.forProtocol(protocol.Protocol))
        reactor.advance(10)
        self.assertEqual(sorted({c[0] for c in reactor.tcpClients}), sorted([PUBLIC_V4, PUBLIC_V6]))
        reactor.tcpClients[:] = []
        relay.dispatcher._defaultEndpoint("smarthost", 25).connect(protocol.Factory.forProtocol(protocol.Protocol))
        reactor.advance(10)
        self.assertIn("127.0.0.1", {c[0] for c in reactor.tcpClients})
