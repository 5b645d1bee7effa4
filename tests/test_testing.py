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
