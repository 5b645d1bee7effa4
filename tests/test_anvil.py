"""
Tests for L{pop3gw.anvil}: password checks accounted per client.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.anvil import (
    PENALTY_DECAY,
    REFUSAL_LOG_INTERVAL,
    AuthAccounting,
    CheckSlot,
    penaltyDelay,
)
from pop3gw.interfaces import AuthenticationBusy

FLOODER = "192.0.2.66"
OTHER = "198.51.100.7"


class AuthAccountingTests(SynchronousTestCase):
    """
    Tests for L{AuthAccounting}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.anvil = AuthAccounting(self.clock, checksPerClient=2, waitingPerClient=3, maxPending=10, maxWaiting=100)

    def fail(self, peer: str, n: int) -> None:
        """
        Count C{n} failures of C{peer}, each with other credentials.
        """
        for i in range(n):
            self.anvil.failed(peer, self.anvil.digest(b"x@example.org", b"guess%d" % (i,)))

    def test_shareAndWaiting(self) -> None:
        """
        A client gets C{checksPerClient} slots at once; its next checks
        wait without a slot, up to C{waitingPerClient}; beyond that a check
        fails at once with L{AuthenticationBusy}.  Another client is not
        held up.
        """
        first = [self.successResultOf(self.anvil.admit(FLOODER)) for _ in range(2)]
        waiting = [self.anvil.admit(FLOODER) for _ in range(3)]
        for d in waiting:
            self.assertNoResult(d)
        self.failureResultOf(self.anvil.admit(FLOODER), AuthenticationBusy)
        self.assertEqual((self.anvil.running(FLOODER), self.anvil.held(FLOODER)), (2, 5))
        self.assertEqual((self.anvil.pending, self.anvil.waiting), (2, 3))
        self.assertIsInstance(self.successResultOf(self.anvil.admit(OTHER)), CheckSlot)
        self.assertEqual(self.anvil.pending, 3)
        self.assertEqual(len(first), 2)

    def test_releaseStartsNextWaiting(self) -> None:
        """
        When a check of a client finishes, its oldest waiting check gets the
        slot; when all are done the client's record is gone.
        """
        slots = [self.successResultOf(self.anvil.admit(FLOODER)) for _ in range(2)]
        a, b = self.anvil.admit(FLOODER), self.anvil.admit(FLOODER)
        self.anvil.release(slots[0])
        slotA = self.successResultOf(a)
        self.assertNoResult(b)
        self.assertEqual((self.anvil.running(FLOODER), self.anvil.held(FLOODER)), (2, 3))
        self.anvil.release(slots[0])  # a second release of one slot is ignored
        self.assertEqual(self.anvil.running(FLOODER), 2)
        self.anvil.release(slots[1])
        slotB = self.successResultOf(b)
        self.anvil.release(slotA)
        self.anvil.release(slotB)
        self.assertEqual((self.anvil.pending, self.anvil.waiting, len(self.anvil)), (0, 0, 0))

    def test_cancelWaiting(self) -> None:
        """
        A waiting check that is cancelled gives its place up.
        """
        slots = [self.successResultOf(self.anvil.admit(FLOODER)) for _ in range(2)]
        waiting = self.anvil.admit(FLOODER)
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual((self.anvil.held(FLOODER), self.anvil.waiting), (2, 0))
        for slot in slots:
            self.anvil.release(slot)
        self.assertEqual(len(self.anvil), 0)

    def test_ipv6CountedPer64(self) -> None:
        """
        The addresses of one IPv6 /64 share one client's share; another /64
        has its own; an IPv4-mapped address is its IPv4 address.
        """
        self.successResultOf(self.anvil.admit("2001:db8:bad:1::1"))
        self.successResultOf(self.anvil.admit("2001:db8:bad:1::2"))
        self.assertNoResult(self.anvil.admit("2001:db8:bad:1:ffff::3"))
        self.successResultOf(self.anvil.admit("2001:db8:bad:2::1"))
        self.assertEqual(self.anvil.held("2001:db8:bad:1::99"), 3)
        self.successResultOf(self.anvil.admit("::ffff:192.0.2.5"))
        self.assertEqual(self.anvil.running("192.0.2.5"), 1)

    def test_loopbackAddressesSeparate(self) -> None:
        """
        Each loopback address has its own share, so a local flood from one
        (127.0.0.2) does not hold up another (127.0.0.3); Unix-socket
        clients share one.
        """
        for _ in range(2):
            self.successResultOf(self.anvil.admit("127.0.0.2"))
        self.assertNoResult(self.anvil.admit("127.0.0.2"))
        self.successResultOf(self.anvil.admit("127.0.0.3"))
        for _ in range(2):
            self.successResultOf(self.anvil.admit("unix"))
        self.assertNoResult(self.anvil.admit("unix"))

    def test_totalPending(self) -> None:
        """
        Beyond C{maxPending} checks in the hash threads in all, a client
        with a free share waits (without a slot) rather than being refused,
        and gets the next free slot.
        """
        anvil = AuthAccounting(self.clock, checksPerClient=2, waitingPerClient=3, maxPending=3)
        slots = [self.successResultOf(anvil.admit(f"192.0.2.{i}")) for i in range(3)]
        waiting = anvil.admit("192.0.2.9")
        self.assertNoResult(waiting)
        self.assertEqual((anvil.pending, anvil.waiting), (3, 1))
        anvil.release(slots[0])
        self.assertIsInstance(self.successResultOf(waiting), CheckSlot)
        self.assertEqual((anvil.pending, anvil.waiting), (3, 0))

    def test_turnsGoRound(self) -> None:
        """
        When the hash threads are full, the free slots go round the waiting
        clients one check each, in the order they began to wait: a newcomer
        behind many flooding clients waits for one check of each, not for
        all their queued checks.
        """
        anvil = AuthAccounting(self.clock, checksPerClient=2, waitingPerClient=16, maxPending=4)
        flooders = [f"192.0.2.{i}" for i in range(1, 9)]
        slots = [self.successResultOf(anvil.admit(flooders[i // 2])) for i in range(4)]
        started: list = []

        def wait(peer: str) -> None:
            anvil.admit(peer).addCallback(lambda slot: started.append((peer, slot)))

        for peer in flooders:
            for _ in range(5):
                wait(peer)
        wait(OTHER)
        self.assertEqual(started, [])
        while not started or started[-1][0] != OTHER:
            anvil.release(slots.pop(0))
            slots.append(started[-1][1])
        # The clients with no check running (3 to 8), then the newcomer,
        # each get one turn before anyone gets another.
        self.assertEqual([peer for peer, _ in started], flooders[2:] + [OTHER])

    def test_totalPendingFromThreads(self) -> None:
        """
        By default the hash threads are handed two checks per thread at
        once.
        """
        self.assertEqual(AuthAccounting(self.clock, hashThreads=3).maxPending, 6)

    def test_totalWaiting(self) -> None:
        """
        Beyond C{maxWaiting} checks waiting in all, a check that would have
        to wait is refused at once.
        """
        anvil = AuthAccounting(self.clock, checksPerClient=1, waitingPerClient=3, maxPending=10, maxWaiting=2)
        for peer in ("192.0.2.1", "192.0.2.2"):
            self.successResultOf(anvil.admit(peer))
            self.assertNoResult(anvil.admit(peer))
        self.successResultOf(anvil.admit("192.0.2.3"))
        self.failureResultOf(anvil.admit("192.0.2.3"), AuthenticationBusy)

    def test_penaltySchedule(self) -> None:
        """
        The wait before a check grows with a client's recent failures: none
        for two, then 2, 4, 8 and at most 15 seconds.
        """
        self.assertEqual([penaltyDelay(n) for n in range(9)], [0, 0, 0, 2, 4, 8, 15, 15, 15])

    def test_penaltyDelaysCheck(self) -> None:
        """
        After repeated failures, a client's next check waits its penalty
        (without a slot) before it gets one; another client is not
        delayed.
        """
        self.fail(FLOODER, 4)
        self.assertEqual(self.anvil.delayFor(FLOODER), 4.0)
        d = self.anvil.admit(FLOODER)
        self.assertNoResult(d)
        self.assertEqual((self.anvil.pending, self.anvil.held(FLOODER)), (0, 1))
        self.successResultOf(self.anvil.admit(OTHER))
        self.clock.advance(3.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.successResultOf(d)
        self.assertEqual(self.anvil.running(FLOODER), 1)

    def test_penaltyDelayedChecksBounded(self) -> None:
        """
        Checks waiting out a penalty count towards the client's waiting
        share, so a penalised flood cannot pile them up.
        """
        self.fail(FLOODER, 6)
        delayed = [self.anvil.admit(FLOODER) for _ in range(5)]
        self.failureResultOf(self.anvil.admit(FLOODER), AuthenticationBusy)
        self.clock.advance(15)
        self.assertEqual([bool(d.called) for d in delayed], [True, True, False, False, False])

    def test_cancelDelayed(self) -> None:
        """
        A check cancelled while it waits out its penalty gives its place up
        and never gets a slot.
        """
        self.fail(FLOODER, 3)
        d = self.anvil.admit(FLOODER)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual((self.anvil.held(FLOODER), self.anvil.waiting), (0, 0))
        self.clock.advance(60)
        self.assertEqual(self.anvil.pending, 0)

    def test_repeatedCredentialsCountOnce(self) -> None:
        """
        The same wrong credentials again (a mail client with a stale
        password, polling) count once; other credentials count.
        """
        digest = self.anvil.digest(b"alice@example.org", b"old password")
        for _ in range(10):
            self.anvil.failed(OTHER, digest)
        self.assertEqual(self.anvil.delayFor(OTHER), 0.0)
        self.fail(OTHER, 2)
        self.assertEqual(self.anvil.delayFor(OTHER), 2.0)

    def test_penaltyDecays(self) -> None:
        """
        One counted failure is forgotten every L{PENALTY_DECAY} seconds
        without a new one; once all are, the client's record is gone.
        """
        self.fail(FLOODER, 5)
        self.assertEqual(self.anvil.delayFor(FLOODER), 8.0)
        self.clock.advance(PENALTY_DECAY)
        self.assertEqual(self.anvil.delayFor(FLOODER), 4.0)
        self.clock.advance(PENALTY_DECAY * 2)
        self.assertEqual(self.anvil.delayFor(FLOODER), 0.0)
        self.clock.advance(PENALTY_DECAY * 2)
        self.fail(OTHER, 1)
        self.assertEqual(len(self.anvil), 1)

    def test_loopbackNotPenalised(self) -> None:
        """
        Loopback and Unix-socket clients are not penalised for failures.
        """
        for peer in ("127.0.0.1", "::1", "unix"):
            self.fail(peer, 8)
            self.assertEqual(self.anvil.delayFor(peer), 0.0)
            self.successResultOf(self.anvil.admit(peer))

    def test_recordsBounded(self) -> None:
        """
        At most C{maxClients} penalty records are kept, the oldest idle one
        is forgotten first.
        """
        anvil = AuthAccounting(self.clock, maxClients=3)
        for i in range(5):
            anvil.failed(f"192.0.2.{i}", b"d")
        self.assertEqual(len(anvil), 3)

    def test_refusalsLoggedSparingly(self) -> None:
        """
        Refusals are logged at most once per L{REFUSAL_LOG_INTERVAL}, the
        next line counting those not logged; the line names the client.
        """
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(5):
            self.anvil.admit(FLOODER)
        for _ in range(3):
            self.anvil.admit(FLOODER).addErrback(lambda f: None)
        self.clock.advance(REFUSAL_LOG_INTERVAL)
        self.anvil.admit(FLOODER).addErrback(lambda f: None)
        lines = [formatEvent(e) for e in events if "password check refused" in e.get("log_format", "")]
        self.assertEqual(
            lines,
            [
                "password check refused: rhost=192.0.2.66 client=192.0.2.66 running=2 waiting=3 total_running=2"
                " total_waiting=3: its password checks are all running or waiting"
                " (and 0 more refused since the last such line)",
                "password check refused: rhost=192.0.2.66 client=192.0.2.66 running=2 waiting=3 total_running=2"
                " total_waiting=3: its password checks are all running or waiting"
                " (and 2 more refused since the last such line)",
            ],
        )
