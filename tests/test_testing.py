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
        self.assertTrue(verifyObject(interfaces.IUserDatabase, users))
        self.assertTrue(verifyObject(interfaces.IMaildropStore, store))
        self.assertTrue(verifyObject(interfaces.IOutboundQueue, router.queue))
        self.assertTrue(verifyObject(interfaces.IMailRouter, router))
        drop = self.successResultOf(store.openMaildrop(ALICE))
        self.assertTrue(verifyObject(interfaces.IMaildrop, drop))
        self.assertTrue(verifyObject(interfaces.IDelivery, store.beginDelivery([ALICE])))
        self.assertTrue(verifyObject(interfaces.IPOP3Avatar, testing.FakePOP3Avatar(ALICE, store)))
        self.assertTrue(verifyObject(interfaces.ISubmissionAvatar, testing.FakeSubmissionAvatar(ALICE, router)))

    def test_wireForm(self) -> None:
        """
        C{wireForm} makes every line end CRLF and ends the message with one.
        """
        self.assertEqual(testing.wireForm(b"a\nb\r\nc\rd"), b"a\r\nb\r\nc\r\nd\r\n")
        self.assertEqual(testing.wireForm(b""), b"")
