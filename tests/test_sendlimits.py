"""
Tests for L{pop3gw.sendlimits}: per-user sending limits, suspension and
the postmaster's notice, from the records to the submission dialogue and
the command line.
"""

import io
import os
import stat

from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pop3gw import cli, smtp
from pop3gw.address import Address
from pop3gw.auth import Realm
from pop3gw.interfaces import ISendingRecords, SendingLimited, TemporaryFailure
from pop3gw.runner import ImmediateRunner
from pop3gw.sendlimits import DATABASE, SendingLimits, SendingPolicy, noticeMessage
from pop3gw.testing import FakeRouter, FakeUserDatabase
from tests.test_smtp import ALICE_PLAIN, CountingChecker
from tests.util import makeTempDirectory

NOW = 1_780_000_000.0
ALICE = "alice@example.org"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class SendingRecordsContract:
    """
    What every L{ISendingRecords} does; C{make} returns a new instance on
    the one store of the test (as another process or node has).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.limits = self.make()

    def make(self, messages: int = 3, recipients: int = 10) -> ISendingRecords:
        raise NotImplementedError()

    def test_interface(self) -> None:
        """
        The records provide L{ISendingRecords}.
        """
        self.assertTrue(verifyObject(ISendingRecords, self.limits))

    def test_appPasswordUse(self) -> None:
        """
        The last use of each app password is kept, per user, whatever the
        case of the user.
        """
        self.limits.recordUse(ALICE, "phone", "192.0.2.7")
        self.clock.now += 60
        self.limits.recordUse(ALICE.upper(), "phone", "192.0.2.8")
        self.limits.recordUse(ALICE, "laptop", "192.0.2.9")
        self.assertEqual(self.make().lastUses(ALICE), {"phone": (NOW + 60, "192.0.2.8"), "laptop": (NOW + 60, "192.0.2.9")})
        self.assertEqual(self.limits.lastUses("bob@example.org"), {})

    def test_suspendedUsers(self) -> None:
        """
        The suspended users are listed with when and why.
        """
        self.assertEqual(self.limits.suspendedUsers(), [])
        for _ in range(3):
            self.send(self.limits)
        self.send(self.limits)
        self.assertEqual(self.make().suspendedUsers(),
                         [(ALICE, NOW, "messages-per-hour: 3 sent in the last hour, limit 3")])

    def test_recordMany(self) -> None:
        """
        Records written together count like records written one by one.
        """
        self.limits.recordMany([(ALICE, NOW - 10, 2, "192.0.2.7"), (ALICE.upper(), NOW - 5, 3, "192.0.2.7")])
        usage = self.make().usage(ALICE)
        self.assertEqual((usage.messagesLastHour, usage.recipientsLastDay), (2, 5))

    def send(self, limits: SendingLimits, recipients: int = 1, client: str = "192.0.2.7"):
        """
        Admit C{recipients} recipients for one message, then record it;
        the first refusal's decision, or C{(None, None)}.
        """
        for accepted in range(recipients):
            decision = limits.admit(ALICE, accepted, client)
            if decision[0] is not None:
                return decision
        limits.record(ALICE, recipients, client)
        return None, None

    def test_messagesPerHour(self) -> None:
        """
        The fourth message within an hour with a limit of three is refused
        and suspends the user, once: the suspension names the reason, the
        counts and the clients; the next attempt is refused as suspended.
        """
        for client in ("192.0.2.7", "198.51.100.8", "192.0.2.7"):
            self.assertEqual(self.send(self.limits, client=client), (None, None))
            self.clock.now += 60
        refusal, suspension = self.send(self.limits, client="203.0.113.9")
        self.assertEqual(refusal, "messages-per-hour: 3 sent in the last hour, limit 3")
        self.assertEqual(suspension.clients, ("203.0.113.9", "192.0.2.7", "198.51.100.8"))
        self.assertEqual((suspension.messagesLastHour, suspension.recipientsLastDay), (3, 3))
        self.assertEqual(self.send(self.limits), ("suspended", None))

    def test_suspensionOutlastsWindow(self) -> None:
        """
        A suspension stays after the hour has passed, until unsuspend,
        which also clears the counters.
        """
        for _ in range(3):
            self.send(self.limits)
        self.assertIsNotNone(self.send(self.limits)[1])
        self.clock.now += 7200
        self.assertEqual(self.send(self.limits)[0], "suspended")
        self.assertTrue(self.limits.unsuspend(ALICE.upper()))
        self.assertFalse(self.limits.unsuspend(ALICE))
        usage = self.limits.usage(ALICE)
        self.assertEqual((usage.messagesLastHour, usage.recipientsLastDay, usage.suspended), (0, 0, None))
        self.assertEqual(self.send(self.limits), (None, None))

    def test_hourSlides(self) -> None:
        """
        Messages older than an hour no longer count against
        messages-per-hour (but still against recipients-per-day).
        """
        for _ in range(3):
            self.send(self.limits)
        self.clock.now += 3601
        self.assertEqual(self.send(self.limits), (None, None))
        self.assertEqual(self.limits.usage(ALICE).recipientsLastDay, 4)

    def test_recipientsPerDay(self) -> None:
        """
        Recipients count across messages and within the message being
        sent: with a limit of 10, after 8 the third recipient of the next
        message is refused.
        """
        limits = self.make(messages=0, recipients=10)
        self.assertEqual(self.send(limits, recipients=8), (None, None))
        refusal, suspension = self.send(limits, recipients=3)
        self.assertEqual(refusal, "recipients-per-day: 10 recipients in the last day, limit 10")
        self.assertIsNotNone(suspension)

    def test_zeroMeansNoLimit(self) -> None:
        """
        0 turns a limit off.
        """
        limits = self.make(messages=0, recipients=0)
        for _ in range(50):
            self.assertEqual(self.send(limits, recipients=30), (None, None))

    def test_ownLimits(self) -> None:
        """
        A user's own limits replace the defaults, one at a time; 'default'
        (None with clear) goes back.
        """
        self.limits.setLimits(ALICE, messagesPerHour=1)
        got = self.limits.limitsOf(ALICE)
        self.assertEqual((got.messagesPerHour, got.recipientsPerDay, got.own), (1, 10, (True, False)))
        self.send(self.limits)
        self.assertEqual(self.send(self.limits)[0], "messages-per-hour: 1 sent in the last hour, limit 1")
        self.limits.setLimits(ALICE, clear=["messages-per-hour"])
        self.assertEqual(self.limits.limitsOf(ALICE), self.limits.defaults)

    def test_sharedBetweenProcesses(self) -> None:
        """
        Two instances on one data directory (two workers, or the server and
        the command) see each other's records and suspensions, and only one
        of them reports a suspension.
        """
        other = self.make()
        self.send(self.limits)
        self.send(other)
        self.send(self.limits)
        self.assertEqual(other.usage(ALICE).messagesLastHour, 3)
        first = self.send(other)
        second = self.send(self.limits)
        self.assertIsNotNone(first[1])
        self.assertEqual(second, ("suspended", None))

class SendingLimitsTests(SendingRecordsContract, SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = makeTempDirectory(self)
        super().setUp()

    def make(self, messages: int = 3, recipients: int = 10) -> SendingLimits:
        limits = SendingLimits(self.dir, messages, recipients, clock=self.clock)
        self.addCleanup(limits.close)
        return limits

    def test_fileMode(self) -> None:
        """
        The database is created mode 0600.
        """
        self.send(self.limits)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dir, DATABASE)).st_mode), 0o600)

    def test_notice(self) -> None:
        """
        The notice names the user, the reason, the counts, the clients and
        the command that lifts the suspension.
        """
        for _ in range(3):
            self.send(self.limits)
        suspension = self.send(self.limits)[1]
        text = noticeMessage(suspension, "mail.example.org", "postmaster@example.org",
                             "Tue, 01 Dec 2026 00:00:00 +0000", "<n@mail.example.org>").decode()
        self.assertIn("Subject: sending suspended for alice@example.org\n", text)
        self.assertIn("Reason: messages-per-hour: 3 sent in the last hour, limit 3\n", text)
        self.assertIn("  192.0.2.7\n", text)
        self.assertIn("  pop3gw user unsuspend alice@example.org\n", text)


class PostgresSendingLimitsTests(SendingRecordsContract, SynchronousTestCase):
    """
    The contract over L{pop3gw.pgaccounts.PostgresSendingLimits}: each
    instance made is another node on the same database.
    """

    def setUp(self) -> None:
        from tests.test_pgstore import newDatabase

        self.database = newDatabase(self)
        super().setUp()

    def make(self, messages: int = 3, recipients: int = 10):
        from pop3gw.pgaccounts import PostgresSendingLimits

        return PostgresSendingLimits(self.database, messages, recipients, clock=self.clock)

    def test_databaseDown(self) -> None:
        """
        With the database unreachable the records raise
        L{TemporaryFailure}, one of their C{errors}, and the policy lets the
        recipient through with one warning.
        """
        import tempfile

        from pop3gw.pgaccounts import PostgresSendingLimits
        from pop3gw.pgdatabase import Database

        socketDir = tempfile.mkdtemp(prefix="pop3gw-nopg-")
        self.addCleanup(os.rmdir, socketDir)
        database = Database(f"postgresql:///nothing?host={socketDir}", timeout=0.5)
        self.addCleanup(database.close)
        limits = PostgresSendingLimits(database, 1, 1)
        self.assertRaises(TemporaryFailure, limits.usage, ALICE)
        self.assertEqual(limits.errors, (TemporaryFailure,))
        policy = SendingPolicy(limits, ImmediateRunner(), lambda s: defer.succeed(None))
        with capturedLogs() as events:
            for _ in range(2):
                self.successResultOf(policy.admit(ALICE, 0, "192.0.2.7"))
        warnings = [formatEvent(e) for e in events if "sending limits unavailable" in formatEvent(e)]
        self.assertEqual(len(warnings), 1, warnings)


class SubmissionLimitTests(SynchronousTestCase):
    """
    The limits on the submission listener, through the real realm.
    """

    def setUp(self) -> None:
        self.dir = makeTempDirectory(self)
        self.users = FakeUserDatabase({Address.parse(ALICE): "x", Address.parse("bob@example.org"): "x"})
        self.router = FakeRouter(domains=("example.org",), users=self.users)
        self.limits = SendingLimits(self.dir, 2, 100)
        self.addCleanup(self.limits.close)
        self.notices: list = []
        self.policy = SendingPolicy(self.limits, ImmediateRunner(), lambda s: defer.succeed(self.notices.append(s)))
        checker = CountingChecker()
        checker.addUser(ALICE.encode(), b"secret")
        self.portal = Portal(Realm(self.users, self.router.store, self.router, self.policy), [checker])

    def session(self, peer: str = "192.0.2.7"):
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        factory = smtp.SubmissionFactory(self.portal, lambda secure, p: True, task.Clock(), "mail.example.org")
        proto = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        proto.makeConnection(transport)
        proto.dataReceived(b"EHLO client.example\r\nAUTH PLAIN " + ALICE_PLAIN + b"\r\n")
        self.assertIn(b"235 2.7.0", transport.value())
        transport.clear()
        return proto, transport

    def message(self, proto, transport) -> bytes:
        proto.dataReceived(
            b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
        )
        out = transport.value()
        transport.clear()
        if not out.endswith(b"250 2.1.5 OK\r\n"):
            proto.dataReceived(b"RSET\r\n")
            transport.clear()
            return out
        proto.dataReceived(b"DATA\r\nFrom: <alice@example.org>\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        out += transport.value()
        transport.clear()
        return out

    def test_thirdMessageRefused(self) -> None:
        """
        With messages-per-hour 2, the third message gets 451 4.7.1 at
        RCPT, the user is suspended (one warn line, one notice), and a new
        session is refused too, without a second notice.
        """
        proto, transport = self.session()
        for _ in range(2):
            self.assertIn(b"250 2.0.0", self.message(proto, transport))
        with capturedLogs() as events:
            out = self.message(proto, transport)
        self.assertEqual(out, b"250 2.1.0 OK\r\n451 4.7.1 Sending limit reached; ask your administrator\r\n")
        lines = [formatEvent(e) for e in events]
        self.assertIn(
            "sending suspended: user=alice@example.org rhost=192.0.2.7 "
            "reason=messages-per-hour: 2 sent in the last hour, limit 2",
            lines,
        )
        self.assertEqual([n.user for n in self.notices], [ALICE])
        proto2, transport2 = self.session("198.51.100.8")
        self.assertIn(b"451 4.7.1", self.message(proto2, transport2))
        self.assertEqual(len(self.notices), 1)
        self.assertEqual(len(self.router.store.boxes.get(Address.parse("bob@example.org"), [])), 2)

    def test_unknownRecipientNotCounted(self) -> None:
        """
        A refused recipient (unknown user) is refused as such, before the
        limits are asked.
        """
        proto, transport = self.session()
        proto.dataReceived(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\n")
        self.assertIn(b"550 5.1.1", transport.value())
        self.assertEqual(self.limits.usage(ALICE).messagesLastHour, 0)


class CommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = makeTempDirectory(self)
        self.store = ["--data-dir", self.dir]
        self.command("user", "add", ALICE, stdin="pw-alice\n")

    def command(self, *argv: str, stdin: str = ""):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main([*self.store, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def records(self, messages: int, recipients: int):
        """
        The records the command works on, as the server opens them.
        """
        limits = SendingLimits(self.dir, messages, recipients)
        self.addCleanup(limits.close)
        return limits

    def test_showAndSet(self) -> None:
        """
        C{user limits} shows the limits and counts; the options set the
        user's own values, C{default} returns to the default.
        """
        self.assertEqual(self.command("user", "limits", ALICE), (0, (
            "alice@example.org: messages-per-hour 200 (default), recipients-per-day 1000 (default); "
            "sent 0 messages in the last hour, 0 recipients in the last day; sending allowed\n"), ""))
        status, out, _ = self.command("user", "limits", "ALICE@example.org", "--messages-per-hour", "0",
                                  "--recipients-per-day", "50")
        self.assertIn("messages-per-hour none, recipients-per-day 50;", out)
        status, out, _ = self.command("user", "limits", ALICE, "--recipients-per-day", "default")
        self.assertIn("messages-per-hour none, recipients-per-day 1000 (default);", out)

    def test_suspendedListedAndLifted(self) -> None:
        """
        C{user list} marks a suspended user; C{user unsuspend} lifts it.
        """
        limits = self.records(1, 10)
        limits.record(ALICE, 1, "192.0.2.7")
        self.assertIsNotNone(limits.admit(ALICE, 0, "192.0.2.7")[1])
        self.assertEqual(self.command("user", "list")[1], "alice@example.org (sending suspended)\n")
        self.assertIn("sending SUSPENDED since", self.command("user", "limits", ALICE)[1])
        self.assertEqual(self.command("user", "unsuspend", ALICE),
                         (0, "alice@example.org: sending allowed again; counters cleared\n", ""))
        self.assertEqual(self.command("user", "list")[1], "alice@example.org\n")

    def test_unknownUser(self) -> None:
        """
        An unknown user is one line and exit 67.
        """
        self.assertEqual(self.command("user", "unsuspend", "bob@example.org"), (67, "", "pop3gw: no such user bob@example.org\n"))

    def test_badValue(self) -> None:
        """
        A limit that is not a number or 'default' is a usage error.
        """
        with self.assertRaises(SystemExit) as e:
            self.command("user", "limits", ALICE, "--messages-per-hour", "lots")
        self.assertEqual(e.exception.code, 2)


class DatabaseCommandTests(CommandTests):
    """
    The same commands with C{--store postgresql://...}: the records are in
    the database.
    """

    def setUp(self) -> None:
        from tests import pgcluster

        self.store = ["--store", pgcluster.database(self)]
        self.assertEqual(self.command("init")[0], 0)
        self.command("user", "add", ALICE, stdin="pw-alice\n")

    def records(self, messages: int, recipients: int):
        from pop3gw.pgaccounts import PostgresSendingLimits
        from pop3gw.pgdatabase import Database

        database = Database(self.store[1], maxConnections=1)
        self.addCleanup(database.close)
        return PostgresSendingLimits(database, messages, recipients)


class UnavailableTests(SynchronousTestCase):
    def test_failOpen(self) -> None:
        """
        When the records cannot be used (here: the data directory is gone),
        recipients are accepted and one warning is logged, not one per
        recipient.
        """
        import shutil

        dataDir = makeTempDirectory(self)
        limits = SendingLimits(os.path.join(dataDir, "gone"), 1, 1)
        self.addCleanup(limits.close)
        policy = SendingPolicy(limits, ImmediateRunner(), lambda s: defer.succeed(None))
        with capturedLogs() as events:
            for _ in range(3):
                self.successResultOf(policy.admit(ALICE, 0, "192.0.2.7"))
        warnings = [formatEvent(e) for e in events if "sending limits unavailable" in formatEvent(e)]
        self.assertEqual(len(warnings), 1, warnings)
        shutil.rmtree(dataDir, True)


class FastPathTests(SynchronousTestCase):
    def test_farBelowNoHop(self) -> None:
        """
        A user under half of each limit is let through from the counts
        read at most 10 s before (no records asked); near half a limit,
        or later, the records are asked again, and the limit still holds.
        """
        calls: list = []

        class CountingRunner(ImmediateRunner):
            def run(self, f, *args):
                calls.append(f.__name__)
                return super().run(f, *args)

        now = [0.0]
        limits = SendingLimits(makeTempDirectory(self), 10, 100)
        self.addCleanup(limits.close)
        policy = SendingPolicy(limits, CountingRunner(), lambda s: defer.succeed(None), clock=lambda: now[0])

        def send() -> None:
            self.successResultOf(policy.admit(ALICE, 0, "192.0.2.7"))
            policy.record(ALICE, 1, "192.0.2.7")

        for _ in range(5):
            send()
        self.assertEqual([c for c in calls if c != "recordMany"], ["admitWithUsage"])
        send()
        self.assertEqual(calls.count("admitWithUsage"), 2)
        now[0] += 11
        send()
        self.assertEqual(calls.count("admitWithUsage"), 3)
        for _ in range(3):
            send()
        self.failureResultOf(policy.admit(ALICE, 0, "192.0.2.7"), SendingLimited)


class BatchedRecordsTests(SynchronousTestCase):
    def test_recordsBatched(self) -> None:
        """
        With a reactor, the records of messages committed within a second
        are written together, once, a second after the first; C{flush}
        writes what waits at once (at stop).
        """
        calls: list = []

        class CountingRunner(ImmediateRunner):
            def run(self, f, *args):
                calls.append((f.__name__, len(args[0]) if f.__name__ == "recordMany" else None))
                return super().run(f, *args)

        clock = task.Clock()
        limits = SendingLimits(makeTempDirectory(self), 0, 0)
        self.addCleanup(limits.close)
        policy = SendingPolicy(limits, CountingRunner(), lambda s: defer.succeed(None), reactor=clock)
        for _ in range(3):
            policy.record(ALICE, 2, "192.0.2.7")
        self.assertEqual(calls, [])
        clock.advance(1)
        self.assertEqual(calls, [("recordMany", 3)])
        self.assertEqual(limits.usage(ALICE).recipientsLastDay, 6)
        policy.record(ALICE, 1, "192.0.2.7")
        self.successResultOf(policy.flush())
        self.assertEqual(calls[-1], ("recordMany", 1))
        clock.advance(5)
        self.assertEqual(len(calls), 2)
        self.assertEqual(limits.usage(ALICE).messagesLastHour, 4)

    def test_unwrittenCounted(self) -> None:
        """
        Records waiting to be written count in the next decision: with a
        limit of 2 messages an hour, the third is refused even before the
        first two are written.
        """
        clock = task.Clock()
        limits = SendingLimits(makeTempDirectory(self), 2, 0)
        self.addCleanup(limits.close)
        policy = SendingPolicy(limits, ImmediateRunner(), lambda s: defer.succeed(None), reactor=clock)
        for _ in range(2):
            self.successResultOf(policy.admit(ALICE, 0, "192.0.2.7"))
            policy.record(ALICE, 1, "192.0.2.7")
        self.failureResultOf(policy.admit(ALICE, 0, "192.0.2.7"), SendingLimited)
        self.assertEqual(limits.usage(ALICE).messagesLastHour, 0)
