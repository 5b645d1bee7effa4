"""
Tests for L{pop3gw.bounces}: one bounce per batch of permanent failures,
stored before the failures are marked notified.
"""

from __future__ import annotations

import email

from twisted.internet import defer
from twisted.logger import Logger, capturedLogs
from twisted.trial import unittest

from pop3gw.address import Address
from pop3gw.bounces import Bouncer, noticeRecipient
from pop3gw.interfaces import PermanentFailure, TemporaryFailure, UnknownUser
from pop3gw.queue import FAILED, listEntries
from tests.queuehelpers import ALICE, BOB, CAROL, QueueTestMixin, readJSON

POSTMASTER = Address("postmaster", "example.org")


class BouncerTests(QueueTestMixin, unittest.SynchronousTestCase):
    """
    L{Bouncer.notify} over a real queue in a temp dir and a fake clock.
    """

    def setUp(self):
        self.setUpQueue()
        self.stored = []
        self.errors = []
        self.attempts = []
        self.bouncer = Bouncer(self.queue, self.clock, "mx.example.org", self.bounceDelivery, Logger(), 60, 3600,
                               postmasterOf=self.postmasterOf)

    def postmasterOf(self, sender):
        self.attempts.append(("postmasterOf", sender))
        return POSTMASTER

    def bounceDelivery(self, sender, data):
        self.attempts.append(sender)
        if self.errors:
            return defer.fail(self.errors.pop(0))
        self.stored.append((sender, data))
        return defer.succeed(None)

    def notify(self, entry):
        """
        Run L{Bouncer.notify}; return what it logged, by format.
        """
        with capturedLogs() as events:
            self.successResultOf(self.bouncer.notify(entry))
        return [e["log_format"].format(**e) for e in events]

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

    def assertNotice(self, data, says):
        """
        C{data} is a postmaster notice (an RFC 3464 report with its own
        subject, to the postmaster) naming carol's failure and saying
        C{says}.
        """
        report = email.message_from_bytes(data)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertEqual(report["To"], "<postmaster@example.org>")
        self.assertEqual(report["Subject"], "Postmaster Copy: Undelivered Mail")
        self.assertEqual(report["Auto-Submitted"], "auto-replied")
        self.assertIn(b"Final-Recipient: rfc822; carol@remote.example\r\nAction: failed\r\nStatus: 5.1.1\r\n", data)
        self.assertIn(says, data)

    def test_nullSenderNoticeToPostmaster(self):
        """
        A failure of a message with the null sender cannot be returned: a
        notice goes to the postmaster instead (a report naming the failed
        recipients, with the original header), is logged, and the failure
        is marked notified.
        """
        entry = self.failedEntry(sender=None)
        logged = self.notify(entry)
        self.assertEqual(self.attempts, [("postmasterOf", None), POSTMASTER])
        [(to, data)] = self.stored
        self.assertEqual(to, POSTMASTER)
        self.assertNotice(data, b"\r\nIt has the null sender <>, so there is nobody to return it to.\r\n")
        self.assertIn(b"\r\nSubject: hi\r\n", data)
        self.assertIn(f"relay: bounce for {entry.queueId} cannot be returned: the message has the null sender; "
                      "notice sent to postmaster postmaster@example.org", logged)
        self.assertEqual([r["notified"] for r in readJSON(self.root, entry.queueId)["recipients"]], [False, True])
        self.assertEqual(self.notify(entry), [])
        self.assertEqual(len(self.stored), 1)

    def test_senderGoneNoticeToPostmaster(self):
        """
        A sender who no longer exists cannot get the bounce: a notice
        naming the sender goes to the postmaster instead.
        """
        entry = self.failedEntry()
        self.errors.append(UnknownUser("alice@example.org"))
        logged = self.notify(entry)
        self.assertEqual(self.attempts, [ALICE, ("postmasterOf", ALICE), POSTMASTER])
        [(to, data)] = self.stored
        self.assertNotice(data, b"\r\nThe report could not be returned to its sender <alice@example.org>:\r\n"
                                b"the sender is not a local user any more.\r\n")
        self.assertIn(f"relay: bounce for {entry.queueId} cannot be returned: sender alice@example.org is not a "
                      "local user any more; notice sent to postmaster postmaster@example.org", logged)
        self.assertTrue(entry.recipients[1].notified)

    def test_senderRefusesNoticeToPostmaster(self):
        """
        A bounce the sender's maildrop refuses for good goes to the
        postmaster as a notice saying so.
        """
        entry = self.failedEntry()
        self.errors.append(PermanentFailure("message too large"))
        logged = self.notify(entry)
        self.assertEqual(self.attempts, [ALICE, ("postmasterOf", ALICE), POSTMASTER])
        [(to, data)] = self.stored
        self.assertNotice(data, b"\r\nThe report could not be returned to its sender <alice@example.org>:\r\n"
                                b"the sender's maildrop refused it (message too large).\r\n")
        self.assertIn(f"relay: bounce for {entry.queueId} cannot be returned: sender alice@example.org refused it "
                      "(message too large); notice sent to postmaster postmaster@example.org", logged)
        self.assertTrue(entry.recipients[1].notified)

    def test_givenUpNoticeToPostmaster(self):
        """
        A bounce that still cannot be stored C{keepTrying} seconds after
        the message was queued is given up, and a notice goes to the
        postmaster.
        """
        entry = self.failedEntry()
        self.clock.advance(3600)
        self.errors.append(TemporaryFailure("disk full"))
        self.notify(entry)
        self.assertEqual(len(self.flushLoggedErrors(TemporaryFailure)), 1)
        self.assertEqual(self.attempts, [ALICE, ("postmasterOf", ALICE), POSTMASTER])
        [(to, data)] = self.stored
        self.assertNotice(data, b"\r\nThe report could not be returned to its sender <alice@example.org>:\r\n"
                                b"storing it kept failing until the retry period ran out (disk full).\r\n")
        self.assertTrue(entry.recipients[1].notified)

    def test_failedNoticeDropped(self):
        """
        A notice that cannot be stored is logged (one line) and dropped:
        not retried, never noticed in turn; the failure is marked
        notified.
        """
        for error in (UnknownUser("postmaster@example.org"), PermanentFailure("too large"),
                      TemporaryFailure("disk full")):
            entry = self.failedEntry(sender=None)
            del self.attempts[:]
            self.errors.append(error)
            logged = self.notify(entry)
            self.assertEqual(self.attempts, [("postmasterOf", None), POSTMASTER])
            self.assertEqual(logged, [
                f"relay: bounce for {entry.queueId} cannot be returned: the message has the null sender; the "
                f"notice to postmaster postmaster@example.org cannot be stored either ({error}), dropped"])
            self.assertEqual(self.stored, [])
            self.assertTrue(readJSON(self.root, entry.queueId)["recipients"][1]["notified"])
            self.assertIsNone(readJSON(self.root, entry.queueId)["lastError"])

    def test_bounceAndNoticeRefused(self):
        """
        When the sender is gone and the postmaster's notice cannot be
        stored either, one line says both and nothing more is tried.
        """
        entry = self.failedEntry()
        self.errors += [UnknownUser("alice@example.org"), UnknownUser("postmaster@example.org")]
        logged = self.notify(entry)
        self.assertEqual(self.attempts, [ALICE, ("postmasterOf", ALICE), POSTMASTER])
        self.assertEqual(logged, [
            f"relay: bounce for {entry.queueId} cannot be returned: sender alice@example.org is not a local user "
            "any more; the notice to postmaster postmaster@example.org cannot be stored either "
            "(postmaster@example.org), dropped"])
        self.assertTrue(entry.recipients[1].notified)
        self.assertEqual(self.notify(entry), [])

    def test_noPostmaster(self):
        """
        Without a postmaster to receive it, the notice is dropped with a
        log line.
        """
        self.bouncer.postmasterOf = lambda sender: None
        entry = self.failedEntry(sender=None)
        logged = self.notify(entry)
        self.assertEqual(self.attempts, [])
        self.assertIn(f"relay: bounce for {entry.queueId} cannot be returned: the message has the null sender; "
                      "no postmaster to notify, dropped", logged)
        self.assertTrue(entry.recipients[1].notified)


    def test_noticeFailsUnexpectedly(self):
        """
        A notice whose storing fails with an unexpected error is logged
        with its traceback and dropped.
        """
        entry = self.failedEntry(sender=None)
        self.errors.append(ZeroDivisionError())
        self.notify(entry)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.attempts, [("postmasterOf", None), POSTMASTER])
        self.assertTrue(entry.recipients[1].notified)

class NoticeRecipientTests(unittest.SynchronousTestCase):
    """
    L{noticeRecipient}: who gets pop3gw's notices about a message.
    """

    def isLocal(self, domain):
        return domain in ("example.org", "example.net")

    def test_configured(self):
        """
        The C{[pop3gw] postmaster} user, when set, whatever the sender.
        """
        bob = Address("bob", "example.net")
        for sender in (None, ALICE):
            self.assertEqual(noticeRecipient(sender, bob, "mail.example.org", self.isLocal), bob)

    def test_sendersDomain(self):
        """
        Without it, C{postmaster@} the sender's domain.
        """
        sender = Address("carol", "example.net")
        self.assertEqual(noticeRecipient(sender, None, "mail.example.org", self.isLocal),
                         Address("postmaster", "example.net"))

    def test_hostnamesDomain(self):
        """
        Without it and without a sender, C{postmaster@} the local domain
        the host name is in (itself or the nearest parent); C{None} when
        it is in none.
        """
        self.assertEqual(noticeRecipient(None, None, "mail.example.org", self.isLocal), POSTMASTER)
        self.assertEqual(noticeRecipient(None, None, "example.net", self.isLocal), Address("postmaster", "example.net"))
        self.assertIsNone(noticeRecipient(None, None, "mail.other.example", self.isLocal))

