"""
Tests for L{pop3gw.bounces}: one bounce per batch of permanent failures,
stored before the failures are marked notified.
"""

from __future__ import annotations

import email

from twisted.internet import defer
from twisted.logger import Logger, capturedLogs
from twisted.trial import unittest

from pop3gw.bounces import Bouncer
from pop3gw.interfaces import TemporaryFailure, UnknownUser
from pop3gw.queue import FAILED, listEntries
from tests.queuehelpers import ALICE, BOB, CAROL, QueueTestMixin, readJSON


class BouncerTests(QueueTestMixin, unittest.SynchronousTestCase):
    """
    L{Bouncer.notify} over a real queue in a temp dir and a fake clock.
    """

    def setUp(self):
        self.setUpQueue()
        self.stored = []
        self.errors = []
        self.bouncer = Bouncer(self.queue, self.clock, "mx.example.org", self.bounceDelivery, Logger(), 60, 3600)

    def bounceDelivery(self, sender, data):
        if self.errors:
            return defer.fail(self.errors.pop(0))
        self.stored.append((sender, data))
        return defer.succeed(None)

    def failedEntry(self, sender=ALICE):
        entry = self.enqueue(sender=sender, recipients=[BOB, CAROL])
        entry.recipients[1].fail("5.1.1", "550 5.1.1 unknown")
        return entry

    def test_oneBounceThenNotified(self):
        """
        The failed recipients not yet notified get one report to the sender,
        naming them with their status; they are then marked notified on
        disk, and a second call stores nothing.
        """
        entry = self.failedEntry()
        self.successResultOf(self.bouncer.notify(entry))
        [(sender, data)] = self.stored
        self.assertEqual(sender, ALICE)
        report = email.message_from_bytes(data)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertIn(b"Final-Recipient: rfc822; carol@remote.example", data)
        self.assertEqual([r["notified"] for r in readJSON(self.root, entry.queueId)["recipients"]], [False, True])
        self.successResultOf(self.bouncer.notify(entry))
        self.assertEqual(len(self.stored), 1)

    def test_nullSenderOnlyLogged(self):
        """
        A message with the null sender is never bounced: the failure is
        logged and marked notified.
        """
        entry = self.failedEntry(sender=None)
        with capturedLogs() as events:
            self.successResultOf(self.bouncer.notify(entry))
        self.assertEqual(self.stored, [])
        self.assertTrue(any("null sender" in e.get("log_format", "") for e in events))
        self.assertTrue(entry.recipients[1].notified)

    def test_senderGone(self):
        """
        A sender who no longer exists gets no bounce; the failure counts as
        notified.
        """
        entry = self.failedEntry()
        self.errors.append(UnknownUser("alice@example.org"))
        self.successResultOf(self.bouncer.notify(entry))
        self.assertTrue(entry.recipients[1].notified)

    def test_storeFailureRetried(self):
        """
        A bounce that cannot be stored leaves the failure unnotified, with
        the next attempt C{retryDelay} away; after C{keepTrying} seconds it
        is given up.
        """
        entry = self.failedEntry()
        self.errors.append(TemporaryFailure("disk full"))
        self.successResultOf(self.bouncer.notify(entry))
        self.assertEqual(len(self.flushLoggedErrors(TemporaryFailure)), 1)
        [stored] = listEntries(self.root)
        self.assertEqual((stored.lastError, stored.nextAttempt), ("bounce could not be stored", self.clock.seconds() + 60))
        self.assertFalse(stored.recipients[1].notified)
        self.clock.advance(3600)
        self.errors.append(TemporaryFailure("disk full"))
        self.successResultOf(self.bouncer.notify(entry))
        self.assertEqual(len(self.flushLoggedErrors(TemporaryFailure)), 1)
        self.assertTrue(entry.recipients[1].notified)
        self.assertEqual(entry.recipients[1].state, FAILED)
