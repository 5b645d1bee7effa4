"""
The in-memory fakes provide the interfaces they claim.
"""

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pop3gw import interfaces, testing
from pop3gw.address import Address

ALICE = Address("alice", "example.org")


class FakesTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        """
        Every fake passes C{verifyObject} for its interface.
        """
        users = testing.FakeUserDatabase({ALICE: "{PLAIN}x"})
        store = testing.FakeMaildropStore()
        router = testing.FakeRouter(users=users, store=store)
        self.assertTrue(verifyObject(interfaces.IUserDirectory, users))
        self.assertTrue(verifyObject(interfaces.IUserStore, users))
        self.assertTrue(verifyObject(interfaces.IMaildropStore, store))
        self.assertTrue(verifyObject(interfaces.IOutboundQueue, router.queue))
        self.assertTrue(verifyObject(interfaces.IMailRouter, router))
        self.assertTrue(verifyObject(interfaces.IRoutedDelivery, router.beginDelivery(None, [ALICE])))
        store.add(ALICE, b"x\n")
        drop = self.successResultOf(store.openMaildrop(ALICE))
        self.assertTrue(verifyObject(interfaces.IMaildrop, drop))
        self.assertTrue(verifyObject(interfaces.IMessageInfo, drop.messages[0]))
        self.assertTrue(verifyObject(interfaces.IDelivery, store.beginDelivery([ALICE])))
        self.assertTrue(verifyObject(interfaces.IPOP3Avatar, testing.FakePOP3Avatar(ALICE, store)))
        self.assertTrue(verifyObject(interfaces.ISubmissionAvatar, testing.FakeSubmissionAvatar(ALICE, router)))

    def test_wireForm(self) -> None:
        """
        C{wireForm} makes every line end CRLF and ends the message with one.
        """
        self.assertEqual(testing.wireForm(b"a\nb\r\nc\rd"), b"a\r\nb\r\nc\r\nd\r\n")
        self.assertEqual(testing.wireForm(b""), b"")

    def test_maildropRecordsCommit(self) -> None:
        """
        C{FakeMaildrop.commit} records the deleted and seen indexes it was
        given; C{FakeMaildropStore.seen} holds the seen messages, which the
        next snapshot reports.
        """
        store = testing.FakeMaildropStore()
        store.add(ALICE, b"a\n", uid="a")
        store.add(ALICE, b"b\n", uid="b", seen=True)
        store.add(ALICE, b"c\n", uid="c")
        drop = self.successResultOf(store.openMaildrop(ALICE))
        self.assertEqual([m.seen for m in drop.messages], [False, True, False])
        drop.commit([1], [0, 1])
        self.assertEqual((drop.committed, drop.committedSeen), ({1}, {0, 1}))
        self.assertEqual(store.seen, {(ALICE, "a")})
        drop = self.successResultOf(store.openMaildrop(ALICE))
        self.assertEqual([(m.uid, m.seen) for m in drop.messages], [("a", True), ("c", False)])


class ThreadPoolsTests(SynchronousTestCase):
    """
    The fake thread pools report through C{callInThreadWithCallback}'s
    callback as a real pool thread does, failures included.
    """

    def results(self, pool, *jobs) -> list:
        reported: list = []
        for f in jobs:
            pool.callInThreadWithCallback(lambda ok, result: reported.append((ok, result)), f)
        return reported

    def test_immediate(self) -> None:
        """
        C{ImmediateThreadPool} runs each job at once and records it.
        """
        pool = testing.ImmediateThreadPool()

        def boom():
            raise ValueError("x")

        reported = self.results(pool, lambda: 1, boom)
        self.assertEqual(reported[0], (True, 1))
        self.assertEqual(reported[1][0], False)
        self.assertIsInstance(reported[1][1].value, ValueError)
        self.assertEqual(len(pool.calls), 2)

    def test_held(self) -> None:
        """
        C{HeldThreadPool} runs nothing until C{runAll}, which runs the jobs
        in order, including those added meanwhile.
        """
        pool = testing.HeldThreadPool()
        order: list = []
        reported = self.results(pool, lambda: order.append(1), lambda: pool.callInThreadWithCallback(None, order.append, 3))
        pool.callInThreadWithCallback(None, order.append, 2)
        self.assertEqual((order, len(pool.pending)), ([], 3))
        pool.runAll()
        self.assertEqual((order, pool.pending, [ok for ok, _ in reported]), ([1, 2, 3], [], [True, True]))

    def test_clocked(self) -> None:
        """
        C{ClockedThreadPool} runs at most C{threads} jobs at a time, each
        finishing C{cost} seconds after it started.
        """
        from twisted.internet.task import Clock

        clock = Clock()
        pool = testing.ClockedThreadPool(clock, threads=2, cost=1.0)
        reported = self.results(pool, lambda: "a", lambda: "b", lambda: "c")
        self.assertEqual((pool.busy, pool.mostQueued, reported), (2, 1, []))
        clock.advance(1.0)
        self.assertEqual([r for _, r in reported], ["a", "b"])
        clock.advance(1.0)
        self.assertEqual(([r for _, r in reported], pool.done, pool.busy), (["a", "b", "c"], 3, 0))
