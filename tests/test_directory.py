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
        self.assertEqual(self.directory.resolve(a("PostMaster@example.org")), (ALICE,))
        self.assertEqual(self.directory.resolve(a("ghost@example.org")), ())
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


CAROL = Address("carol", "example.org")
TEAM = Address("team", "example.org")


class ResolutionTests(SynchronousTestCase):
    """
    The order of L{Directory.resolve}: a user, an alias (a distribution
    list when several targets), the implicit postmaster, the sub-address
    base, then the domain's catch-all.
    """

    def directory(self, **kwargs) -> Directory:
        return Directory.fromEntries(
            [ALICE, BOB, CAROL, a("dave@example.net")],
            [
                (TEAM, (ALICE, BOB, a("ALICE@example.org"), a("ghost@example.org"))),
                (a("sales@example.org"), CAROL),
                (a("alice+x@example.org"), BOB),
                (a("gone@example.org"), a("ghost@example.org")),
            ],
            catchAll={"example.org": CAROL},
            **kwargs,
        )

    def test_distributionList(self) -> None:
        """
        An alias with several targets resolves to each target user once,
        in file order, as stored; targets that are not users are left
        out, and the lookup ignores case.
        """
        directory = self.directory()
        self.assertEqual(directory.resolve(TEAM), (ALICE, BOB))
        self.assertEqual(directory.resolve(a("TEAM@example.org")), (ALICE, BOB))

    def test_order(self) -> None:
        """
        A user wins over everything; an alias over the sub-address rule
        (C{alice+x} is an alias of bob); an alias none of whose targets is
        a user resolves to nothing rather than to the catch-all.
        """
        directory = self.directory()
        self.assertEqual(directory.resolve(a("Carol@example.org")), (CAROL,))
        self.assertEqual(directory.resolve(a("alice+x@example.org")), (BOB,))
        self.assertEqual(directory.resolve(a("gone@example.org")), ())

    def test_subaddress(self) -> None:
        """
        C{user+tag} resolves as its base (a user or an alias), in any
        case; the local part is cut at the first delimiter; a local part
        that starts with the delimiter is not a sub-address.
        """
        directory = self.directory()
        self.assertEqual(directory.resolve(a("alice+news@example.org")), (ALICE,))
        self.assertEqual(directory.resolve(a("ALICE+News+more@example.org")), (ALICE,))
        self.assertEqual(directory.resolve(a("team+x@example.org")), (ALICE, BOB))
        self.assertEqual(directory.resolve(a("dave+x@example.net")), (a("dave@example.net"),))
        self.assertEqual(directory.resolve(a("+alice@example.net")), ())

    def test_delimiter(self) -> None:
        """
        The delimiter is configurable (each of its characters separates);
        empty turns sub-addressing off, and C{user+tag} then falls to the
        catch-all, or nowhere.
        """
        directory = self.directory(delimiter="-+")
        self.assertEqual(directory.resolve(a("alice-news@example.org")), (ALICE,))
        self.assertEqual(directory.resolve(a("bob+news@example.org")), (BOB,))
        directory = self.directory(delimiter="")
        self.assertEqual(directory.resolve(a("alice+news@example.org")), (CAROL,))
        self.assertEqual(directory.resolve(a("dave+news@example.net")), ())

    def test_catchAll(self) -> None:
        """
        The catch-all of a domain takes only addresses that are neither a
        user nor an alias (nor a sub-address of one); other domains have
        none.
        """
        directory = self.directory()
        self.assertEqual(directory.resolve(a("whatever@example.org")), (CAROL,))
        self.assertEqual(directory.resolve(a("whatever+x@example.org")), (CAROL,))
        self.assertEqual(directory.resolve(BOB), (BOB,))
        self.assertEqual(directory.resolve(a("whatever@example.net")), ())

    def test_postmasterFirstUser(self) -> None:
        """
        Without a postmaster setting, C{postmaster@} each users' domain
        resolves to the first user of that domain in file order, in any
        case and with a sub-address; no other domain gets one.
        """
        directory = self.directory()
        self.assertEqual(directory.resolve(a("PostMaster@example.org")), (ALICE,))
        self.assertEqual(directory.resolve(a("postmaster+x@example.net")), (a("dave@example.net"),))
        self.assertEqual(directory.resolve(a("postmaster@example.com")), ())

    def test_postmasterSetting(self) -> None:
        """
        With a postmaster setting naming a user, C{postmaster@} every
        users' domain resolves to that user, who may send as it; an alias
        or user of that name still wins, and a setting naming no user
        falls back to the first user of each domain.
        """
        directory = self.directory(postmaster=a("Carol@example.org"))
        self.assertEqual(directory.resolve(a("postmaster@example.net")), (CAROL,))
        self.assertEqual(directory.resolve(POSTMASTER), (CAROL,))
        self.assertTrue(directory.owns(CAROL, a("postmaster@example.net")))
        self.assertFalse(directory.owns(ALICE, POSTMASTER))
        directory = Directory.fromEntries([ALICE, BOB], [(POSTMASTER, BOB)], postmaster=ALICE)
        self.assertEqual(directory.resolve(POSTMASTER), (BOB,))
        directory = Directory.fromEntries([ALICE, BOB], postmaster=a("ghost@example.org"))
        self.assertEqual(directory.resolve(POSTMASTER), (ALICE,))

    def test_postmasterOfADomainWithoutUsers(self) -> None:
        """
        C{postmaster@} a domain no user has (a C{--domain} with only
        aliases, or none) goes to the configured postmaster, in any case,
        before that domain's catch-all; without the setting it resolves to
        nobody.  It gives no right to send as it.
        """
        directory = Directory.fromEntries(
            [ALICE, BOB], catchAll={"example.com": (BOB,)}, postmaster=ALICE
        )
        self.assertEqual(directory.resolve(a("PostMaster@example.com")), (ALICE,))
        self.assertEqual(directory.resolve(a("postmaster@nousers.example")), (ALICE,))
        self.assertEqual(directory.resolve(a("other@example.com")), (BOB,))
        self.assertFalse(directory.owns(ALICE, a("postmaster@example.com")))
        self.assertEqual(Directory.fromEntries([ALICE]).resolve(a("postmaster@nousers.example")), ())

    def test_senders(self) -> None:
        """
        A user may send as its sub-addresses and those of its aliases and
        lists, but not as a catch-all address, nor as a sub-address that is
        itself someone else's alias; with no delimiter, no sub-addresses.
        """
        directory = self.directory()
        for user, address, allowed in [
            (ALICE, a("alice+news@example.org"), True),
            (ALICE, a("Alice+News@example.org"), True),
            (ALICE, TEAM, True),
            (BOB, a("team+x@example.org"), True),
            (ALICE, a("alice+x@example.org"), False),
            (BOB, a("alice+x@example.org"), True),
            (CAROL, a("whatever@example.org"), False),
            (CAROL, a("sales+q@example.org"), True),
            (BOB, a("alice+y@example.org"), False),
        ]:
            self.assertEqual(directory.owns(user, address), allowed, (user, address))
            self.assertEqual(directory.sendersOf(user).allows(address), allowed, (user, address))
        self.assertFalse(self.directory(delimiter="").owns(ALICE, a("alice+news@example.org")))
