"""
Tests for L{pop3gw.directory}: the immutable users directory the reactor
thread reads.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pop3gw.address import Address
from pop3gw.directory import Directory, Senders
from pop3gw.interfaces import IDirectorySnapshot, TemporaryFailure

ALICE = Address("alice", "example.org")
BOB = Address("bob", "example.org")
POSTMASTER = Address("postmaster", "example.org")


def a(text: str) -> Address:
    return Address.parse(text)


class DirectoryTests(SynchronousTestCase):
    """
    Tests for L{Directory}.
    """

    def setUp(self) -> None:
        self.directory = Directory.fromEntries(
            [ALICE, BOB, a("carol@example.net")], [(POSTMASTER, ALICE), (a("ghost@example.org"), a("nobody@example.org"))]
        )

    def test_interface(self) -> None:
        """
        L{Directory} provides L{IDirectorySnapshot}.
        """
        self.assertTrue(verifyObject(IDirectorySnapshot, self.directory))

    def test_answers(self) -> None:
        """
        Users exist, aliases resolve to their owner (one level: an alias of
        no user resolves to nothing), C{addresses} is sorted and
        C{domains} holds the users' domains.
        """
        self.assertTrue(self.directory.exists(a("ALICE@example.org")))
        self.assertFalse(self.directory.exists(POSTMASTER))
        self.assertEqual(self.directory.resolve(a("PostMaster@example.org")), ALICE)
        self.assertIsNone(self.directory.resolve(a("ghost@example.org")))
        self.assertEqual(self.directory.addresses(), [ALICE, BOB, a("carol@example.net")])
        self.assertEqual(self.directory.domains(), frozenset({"example.org", "example.net"}))

    def test_sendersOf(self) -> None:
        """
        C{sendersOf(user)} is a frozen L{Senders} that allows exactly what
        C{owns(user, ...)} allows: the user's own address and its aliases,
        in any case; a user not in the directory may send as itself only.
        """
        senders = self.directory.sendersOf(ALICE)
        self.assertIsInstance(senders, Senders)
        for address, allowed in [
            (ALICE, True),
            (a("Alice@example.org"), True),
            (POSTMASTER, True),
            (a("POSTMASTER@example.org"), True),
            (BOB, False),
            (a("ghost@example.org"), False),
        ]:
            self.assertEqual(senders.allows(address), allowed, address)
            self.assertEqual(self.directory.owns(ALICE, address), allowed, address)
        stranger = a("dave@example.org")
        self.assertTrue(self.directory.sendersOf(stranger).allows(stranger))
        self.assertFalse(self.directory.sendersOf(stranger).allows(POSTMASTER))

    def test_sendersOfCaseVariants(self) -> None:
        """
        With two users differing only in case (an old file), an exact
        spelling finds its own user and any other spelling finds the first:
        C{sendersOf} follows the same rule, and an alias shadowed by a user
        of the same key belongs to that user.
        """
        upper = a("Alice@example.org")
        directory = Directory.fromEntries([upper, ALICE], [(a("Bob@example.org"), ALICE), (a("abuse@example.org"), ALICE)])
        first, second = directory.sendersOf(upper), directory.sendersOf(ALICE)
        self.assertTrue(first.allows(upper))
        self.assertTrue(first.allows(a("ALICE@example.org")))
        self.assertFalse(first.allows(ALICE))
        self.assertTrue(second.allows(ALICE))
        self.assertFalse(second.allows(upper))
        self.assertFalse(second.allows(a("ALICE@example.org")))
        self.assertTrue(second.allows(a("ABUSE@example.org")))
        self.assertTrue(second.allows(a("Bob@example.org")))
        directory = Directory.fromEntries([ALICE, BOB], [(a("Bob@example.org"), ALICE)])
        self.assertFalse(directory.sendersOf(ALICE).allows(a("Bob@example.org")))
        self.assertTrue(directory.sendersOf(BOB).allows(a("Bob@example.org")))

    def test_unavailable(self) -> None:
        """
        An unavailable directory (a store never read) answers every
        question with L{TemporaryFailure}.
        """
        directory = Directory.unavailable("cannot read users file x: Permission denied")
        for call in (
            lambda: directory.exists(ALICE),
            lambda: directory.resolve(ALICE),
            lambda: directory.owns(ALICE, ALICE),
            lambda: directory.sendersOf(ALICE),
            directory.addresses,
            directory.domains,
        ):
            e = self.assertRaises(TemporaryFailure, call)
            self.assertEqual(str(e), "cannot read users file x: Permission denied")
