"""
Tests for L{pop3gw.router}.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import alsoProvides, implementer
from zope.interface.verify import verifyObject

from pop3gw.address import Address
from pop3gw.interfaces import (
    IDelivery,
    IMailRouter,
    IQueuedDelivery,
    IRoutedDelivery,
    ITwoPhaseDelivery,
    MessageTooLarge,
    PermanentFailure,
    RelayDenied,
    TemporaryFailure,
    UnknownUser,
)
from pop3gw.queue import OutboundQueue, listEntries
from pop3gw.router import Router
from pop3gw.testing import FakeMaildropStore, FakeOutboundQueue, FakeRouter, FakeUserDatabase
from tests.util import makeTempDirectory

ALICE = Address("alice", "example.org")
BOB = Address("bob", "example.org")
ALIAS = Address("postmaster", "example.org")
REMOTE = Address("carol", "remote.example")


def makeRouter(queue=None, store=None):
    users = FakeUserDatabase({ALICE: "x", BOB: "y"}, {ALIAS: ALICE})
    store = store if store is not None else FakeMaildropStore()
    queue = queue if queue is not None else FakeOutboundQueue()
    return Router(["Example.ORG.", "example.net"], users, store, queue), store, queue


@implementer(ITwoPhaseDelivery)
class RecordingTwoPhase:
    """
    A two-phase delivery recording the calls made to it in C{log}.
    """

    def __init__(self, log, failPrepare=False):
        self.log = log
        self.failPrepare = failPrepare
        self.data = b""

    def write(self, data):
        self.data += data

    def prepare(self):
        self.log.append("prepare")
        if self.failPrepare:
            return defer.fail(TemporaryFailure("disk full"))
        return defer.succeed(None)

    def release(self):
        self.log.append("release")

    def discard(self):
        self.log.append("discard")
        return defer.succeed(None)

    def commit(self):
        raise AssertionError("commit must not be used on a two-phase delivery")

    def abort(self):
        self.log.append("abort-remote")


@implementer(IDelivery)
class RecordingLocal:
    """
    A maildrop delivery recording its commit/abort in C{log}.
    """

    def __init__(self, log, error=None):
        self.log = log
        self.error = error

    def write(self, data):
        pass

    def commit(self):
        self.log.append("commit-local")
        if self.error is not None:
            return defer.fail(self.error)
        return defer.succeed(None)

    def abort(self):
        self.log.append("abort-local")


class TwoPhaseQueue:
    def __init__(self, log, failPrepare=False):
        self.log = log
        self.failPrepare = failPrepare
        self.calls = []

    def beginDelivery(self, sender, recipients, trace=b"", smtputf8=False):
        self.calls.append((sender, list(recipients), trace))
        return RecordingTwoPhase(self.log, self.failPrepare)


class LocalStore:
    def __init__(self, log, error=None):
        self.log = log
        self.error = error
        self.calls = []

    def beginDelivery(self, recipients, trace=b""):
        self.calls.append((list(recipients), trace))
        return RecordingLocal(self.log, self.error)


class RecipientTests(SynchronousTestCase):
    """
    Tests for L{Router.isLocalDomain} and L{Router.checkRecipient}.
    """

    def test_interface(self):
        """
        L{Router} provides L{IMailRouter}.
        """
        self.assertTrue(verifyObject(IMailRouter, makeRouter()[0]))

    def test_localDomain(self):
        """
        Configured domains are local whatever their case or trailing dot.
        """
        router = makeRouter()[0]
        self.assertTrue(router.isLocalDomain("example.org"))
        self.assertTrue(router.isLocalDomain("example.net"))
        self.assertFalse(router.isLocalDomain("remote.example"))
        self.assertFalse(router.isLocalDomain("sub.example.org"))

    def test_liveDomains(self):
        """
        A container of domains that is not a plain collection is asked on
        every lookup, so domains added later become local.
        """

        class Live:
            def __init__(self):
                self.names = set()

            def __contains__(self, name):
                return name in self.names

            def __iter__(self):
                return iter(self.names)

        live = Live()
        router = Router(live, FakeUserDatabase(), FakeMaildropStore(), FakeOutboundQueue())
        self.assertFalse(router.isLocalDomain("late.example"))
        live.names.add("late.example")
        self.assertTrue(router.isLocalDomain("Late.Example"))

    def test_localUser(self):
        """
        A local user resolves to itself, an alias to its owner.
        """
        router = makeRouter()[0]
        self.assertEqual(router.checkRecipient(BOB), (BOB,))
        self.assertEqual(router.checkRecipient(ALIAS), (ALICE,))

    def test_recipientInAnyCase(self):
        """
        A recipient or alias in another case than the users and aliases
        files resolves to the user as stored, so the message goes to the
        maildrop of the stored spelling.
        """
        from pop3gw.users import UsersFile

        directory = makeTempDirectory(self)
        with open(os.path.join(directory, "users"), "w") as f:
            f.write("Alice@example.org:{ARGON2ID}x\n")
        with open(os.path.join(directory, "aliases"), "w") as f:
            f.write("postmaster@example.org: alice@EXAMPLE.org\n")
        users = UsersFile(os.path.join(directory, "users"), os.path.join(directory, "aliases"))
        store = FakeMaildropStore()
        router = Router(["example.org"], users, store, FakeOutboundQueue())
        stored = Address("Alice", "example.org")
        recipients = [router.checkRecipient(Address.parse(a)) for a in ("ALICE@Example.ORG", "PostMaster@example.org")]
        self.assertEqual(recipients, [(stored,), (stored,)])
        delivery = router.beginDelivery(None, [u for users in recipients for u in users])
        delivery.write(b"Subject: x\r\n\r\nhi\r\n")
        self.successResultOf(delivery.commit())
        self.assertEqual(list(store.boxes), [stored])

    def test_unknownLocal(self):
        """
        An unknown address in a local domain raises L{UnknownUser}.
        """
        router = makeRouter()[0]
        self.assertRaises(UnknownUser, router.checkRecipient, Address("nobody", "example.org"))

    def test_remote(self):
        """
        A remote address is returned unchanged, alone.
        """
        self.assertEqual(makeRouter()[0].checkRecipient(REMOTE), (REMOTE,))


class DeliveryTests(SynchronousTestCase):
    """
    Tests for L{Router.beginDelivery} with the in-memory fakes.
    """

    def test_fanOut(self):
        """
        Local recipients go into the maildrops and remote ones into the
        queue, each with the trace header, once committed.
        """
        router, store, queue = makeRouter()
        d = router.beginDelivery(ALICE, [ALICE, REMOTE, BOB, ALICE], b"Received: x\r\n")
        self.assertTrue(verifyObject(IRoutedDelivery, d))
        d.write(b"Subject: s\r\n\r\nbody\r\n")
        self.assertEqual(store.boxes, {})
        self.assertEqual(queue.entries, [])
        self.successResultOf(d.commit())
        data = b"Received: x\r\nSubject: s\r\n\r\nbody\r\n"
        self.assertEqual(store.boxes[ALICE][0][1], data)
        self.assertEqual(store.boxes[BOB][0][1], data)
        self.assertEqual(len(store.boxes[ALICE]), 1)
        self.assertEqual(queue.entries, [(ALICE, [REMOTE], data)])

    def test_onlyLocal(self):
        """
        Without remote recipients nothing is queued.
        """
        router, store, queue = makeRouter()
        d = router.beginDelivery(None, [BOB])
        d.write(b"x\r\n")
        self.successResultOf(d.commit())
        self.assertEqual(queue.entries, [])
        self.assertEqual(list(store.boxes), [BOB])

    def test_abort(self):
        """
        Aborting aborts every part; nothing is stored.
        """
        router, store, queue = makeRouter()
        d = router.beginDelivery(ALICE, [BOB, REMOTE])
        d.write(b"x\r\n")
        d.abort()
        d.abort()
        self.assertEqual(store.deliveries[0].state, "aborted")
        self.assertEqual(store.boxes, {})
        self.assertEqual(queue.entries, [])

    def test_queueFailure(self):
        """
        If queueing fails, the local part is aborted and the commit fails
        with L{TemporaryFailure}.
        """
        router, store, queue = makeRouter()
        queue.failCommit = True
        d = router.beginDelivery(ALICE, [BOB, REMOTE])
        d.write(b"x\r\n")
        self.failureResultOf(d.commit(), TemporaryFailure)
        self.assertEqual(store.boxes, {})
        self.assertEqual(store.deliveries[0].state, "aborted")


class CommitOrderTests(SynchronousTestCase):
    """
    The queue part is made durable first and released last.
    """

    def test_order(self):
        """
        A successful commit prepares the queue part, commits the local part,
        then releases the queue part.
        """
        log = []
        router = Router(["example.org"], FakeUserDatabase(), LocalStore(log), TwoPhaseQueue(log))
        d = router.beginDelivery(ALICE, [BOB, REMOTE])
        self.assertIsNone(self.successResultOf(d.commit()))
        self.assertEqual(log, ["prepare", "commit-local", "release"])

    def test_prepareFails(self):
        """
        If the queue part cannot be made durable, the local part is aborted,
        never committed.
        """
        log = []
        router = Router(["example.org"], FakeUserDatabase(), LocalStore(log), TwoPhaseQueue(log, True))
        d = router.beginDelivery(ALICE, [BOB, REMOTE])
        self.failureResultOf(d.commit(), TemporaryFailure)
        self.assertEqual(log, ["prepare", "abort-local"])

    def test_localFails(self):
        """
        If the local part fails after the queue part was prepared, the queue
        part is discarded (not released) and the commit fails.
        """
        log = []
        store = LocalStore(log, TemporaryFailure("disk full"))
        router = Router(["example.org"], FakeUserDatabase(), store, TwoPhaseQueue(log))
        d = router.beginDelivery(ALICE, [BOB, REMOTE])
        self.failureResultOf(d.commit(), TemporaryFailure)
        self.assertEqual(log, ["prepare", "commit-local", "discard"])

    def test_permanentKept(self):
        """
        A permanent failure of a part (message too large) is passed on as is.
        """
        log = []
        store = LocalStore(log, MessageTooLarge("big"))
        router = Router(["example.org"], FakeUserDatabase(), store, TwoPhaseQueue(log))
        d = router.beginDelivery(ALICE, [BOB, REMOTE])
        self.failureResultOf(d.commit(), MessageTooLarge)

    def test_unexpectedError(self):
        """
        An unexpected exception from a part is logged and reported as
        L{TemporaryFailure}.
        """
        log = []
        store = LocalStore(log, OSError("boom"))
        router = Router(["example.org"], FakeUserDatabase(), store, TwoPhaseQueue(log))
        d = router.beginDelivery(ALICE, [BOB])
        self.failureResultOf(d.commit(), TemporaryFailure)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_commitTwice(self):
        """
        A second commit fails instead of delivering twice.
        """
        log = []
        router = Router(["example.org"], FakeUserDatabase(), LocalStore(log), TwoPhaseQueue(log))
        d = router.beginDelivery(ALICE, [BOB])
        self.successResultOf(d.commit())
        self.failureResultOf(d.commit(), TemporaryFailure)
        self.assertEqual(log, ["commit-local"])


class RealQueueTests(SynchronousTestCase):
    """
    The router with the real L{OutboundQueue}.
    """

    def test_localFailureRemovesQueueEntry(self):
        """
        When the maildrop fails after the queue entry was made durable, the
        entry is removed and never announced to the relay.
        """
        root = self.mktemp()
        queue = OutboundQueue(root, Clock())
        announced = []
        queue.addListener(announced.append)
        store = FakeMaildropStore()
        store.failCommit = True
        router = Router(["example.org"], FakeUserDatabase(), store, queue)
        d = router.beginDelivery(ALICE, [BOB, REMOTE])
        d.write(b"Subject: x\r\n\r\nbody\r\n")
        self.failureResultOf(d.commit(), TemporaryFailure)
        self.assertEqual(listEntries(root), [])
        self.assertEqual([n for n in os.listdir(root) if not n.startswith(".")], [])
        self.assertEqual(announced, [])

    def test_success(self):
        """
        A successful commit leaves one queue entry for the remote recipient,
        announced to the relay.
        """
        root = self.mktemp()
        queue = OutboundQueue(root, Clock())
        announced = []
        queue.addListener(announced.append)
        store = FakeMaildropStore()
        router = Router(["example.org"], FakeUserDatabase(), store, queue)
        d = router.beginDelivery(ALICE, [BOB, REMOTE])
        d.write(b"Subject: x\r\n\r\nbody\r\n")
        self.successResultOf(d.commit())
        [entry] = listEntries(root)
        self.assertEqual([r.address for r in entry.recipients], [REMOTE])
        self.assertEqual([e.queueId for e in announced], [entry.queueId])
        self.assertEqual(store.boxes[BOB][0][1], b"Subject: x\r\n\r\nbody\r\n")


class DeliveryIdentityTests(SynchronousTestCase):
    """
    The delivery the router returns says where the message goes, so the
    submission server can name one id for it and log its routing: the
    queue id of its remote part (C{queueId}, L{None} when purely local),
    and its local and remote recipients.
    """

    def test_queueIdOfRemotePart(self):
        """
        With remote recipients, C{queueId} is the id of the queue entry the
        commit makes: the id C{pop3gw queue list}, the relay's log lines
        and bounces use.
        """
        root = self.mktemp()
        queue = OutboundQueue(root, Clock())
        router = Router(["example.org"], FakeUserDatabase(), FakeMaildropStore(), queue)
        d = router.beginDelivery(ALICE, [BOB, REMOTE, ALICE])
        d.write(b"Subject: x\r\n\r\nbody\r\n")
        self.successResultOf(d.commit())
        [entry] = listEntries(root)
        self.assertEqual(d.queueId, entry.queueId)
        self.assertEqual(d.localRecipients, (BOB, ALICE))
        self.assertEqual(d.remoteRecipients, (REMOTE,))

    def test_queueIdThroughIQueuedDelivery(self):
        """
        The queue id is read through L{IQueuedDelivery} (adaptation): a
        queue delivery that does not provide it names no id, even with an
        attribute of that name.
        """

        class Named(FakeOutboundQueue):
            def __init__(self, declared):
                super().__init__()
                self.declared = declared

            def beginDelivery(self, sender, recipients, trace=b"", smtputf8=False):
                delivery = super().beginDelivery(sender, recipients, trace, smtputf8)
                delivery.queueId = "q1"
                if self.declared:
                    alsoProvides(delivery, IQueuedDelivery)
                return delivery

        for declared, expected in ((False, None), (True, "q1")):
            router = Router(["example.org"], FakeUserDatabase(), FakeMaildropStore(), Named(declared))
            self.assertEqual(router.beginDelivery(ALICE, [REMOTE]).queueId, expected)

    def test_onlyLocal(self):
        """
        A purely local message has no queue id.
        """
        router, store, queue = makeRouter()
        d = router.beginDelivery(ALICE, [BOB])
        self.assertIsNone(d.queueId)
        self.assertEqual(d.localRecipients, (BOB,))
        self.assertEqual(d.remoteRecipients, ())
        d.abort()

    def test_queueWithoutIds(self):
        """
        A queue whose deliveries have no C{queueId} gives L{None}.
        """
        router, store, queue = makeRouter()
        d = router.beginDelivery(ALICE, [REMOTE])
        self.assertIsNone(d.queueId)
        self.assertEqual(d.remoteRecipients, (REMOTE,))
        d.abort()


class UnroutableDomainTests(SynchronousTestCase):
    def test_unroutableRemoteDomainsRefused(self) -> None:
        """
        A non-local recipient at C{localhost}, another single-label name or
        an IPv4 address written as a domain is refused at once with
        L{PermanentFailure}; ordinary remote domains pass.
        """
        from pop3gw.router import isRoutableDomain

        router = makeRouter()[0]
        for bad in ("x@localhost", "x@127.0.0.1", "x@10.1.2.3", "x@intranet"):
            self.assertRaises(PermanentFailure, router.checkRecipient, Address.parse(bad))
        good = Address.parse("carol@remote.example")
        self.assertEqual(router.checkRecipient(good), (good,))
        self.assertTrue(isRoutableDomain("xn--bcher-kva.example"))
        self.assertFalse(isRoutableDomain("1.2.3.4"))


class MailRouterContract:
    """
    What every L{IMailRouter} does, checked over L{Router} and
    L{pop3gw.testing.FakeRouter}: subclasses implement L{makeRouter} over
    the given users, maildrop store and outbound queue, with the local
    domains C{Example.ORG.} and C{example.net}.
    """

    def makeRouter(self, domains, users, store, queue):
        raise NotImplementedError()

    def setUp(self) -> None:
        self.users = FakeUserDatabase({ALICE: "x", BOB: "y"}, {ALIAS: ALICE})
        self.store = FakeMaildropStore()
        self.queue = FakeOutboundQueue()
        self.router = self.makeRouter(["Example.ORG.", "example.net"], self.users, self.store, self.queue)

    def deliver(self, recipients, sender=ALICE):
        delivery = self.router.beginDelivery(sender, recipients, b"Received: x\r\n")
        delivery.write(b"Subject: hi\r\n\r\n")
        delivery.write(b"body\r\n")
        return delivery, delivery.commit()

    def test_interface(self) -> None:
        """
        The router provides L{IMailRouter}, and its deliveries
        L{IRoutedDelivery}.
        """
        self.assertTrue(verifyObject(IMailRouter, self.router))
        self.assertTrue(verifyObject(IRoutedDelivery, self.router.beginDelivery(ALICE, [BOB, REMOTE])))

    def test_localDomains(self) -> None:
        """
        Configured domains are local whatever their case or trailing dot;
        subdomains and other domains are not.
        """
        for domain in ("example.org", "EXAMPLE.org", "example.org.", "example.net"):
            self.assertTrue(self.router.isLocalDomain(domain), domain)
        for domain in ("sub.example.org", "remote.example", "org"):
            self.assertFalse(self.router.isLocalDomain(domain), domain)

    def test_checkRecipient(self) -> None:
        """
        A local user resolves to itself as stored and an alias to its
        owner, in any case; an unknown local address is L{UnknownUser}; a
        remote address is itself; a domain that cannot be a public mail
        domain is refused with L{PermanentFailure}.
        """
        self.assertEqual(self.router.checkRecipient(BOB), (BOB,))
        self.assertEqual(self.router.checkRecipient(Address.parse("BOB@Example.ORG")), (BOB,))
        self.assertEqual(self.router.checkRecipient(Address("PostMaster", "example.org")), (ALICE,))
        self.assertRaises(UnknownUser, self.router.checkRecipient, Address("nobody", "example.org"))
        self.assertEqual(self.router.checkRecipient(REMOTE), (REMOTE,))
        self.assertRaises(PermanentFailure, self.router.checkRecipient, Address("root", "localhost"))

    def test_checkRecipientList(self) -> None:
        """
        A distribution list resolves to all its users, each once; a
        sub-address to its base user; an unknown address of a domain with
        a catch-all to the catch-all user, in domains given in any case.
        """
        self.users.aliases[Address("team", "example.org")] = (BOB, ALICE, BOB)
        self.users.catchAll["example.net"] = BOB
        self.assertEqual(self.router.checkRecipient(Address("Team", "example.org")), (BOB, ALICE))
        self.assertEqual(self.router.checkRecipient(Address("team+x", "example.org")), (BOB, ALICE))
        self.assertEqual(self.router.checkRecipient(Address("alice+x", "example.org")), (ALICE,))
        self.assertEqual(self.router.checkRecipient(Address("whoever", "example.net")), (BOB,))
        self.assertRaises(UnknownUser, self.router.checkRecipient, Address("whoever", "example.org"))

    def test_delivery(self) -> None:
        """
        Local recipients get one copy each in their maildrops and the
        remote ones one queue entry, with the trace first; recipients
        given twice count once; the delivery names both parts.
        """
        delivery, committed = self.deliver([BOB, REMOTE, ALICE, BOB])
        self.assertIsNone(self.successResultOf(committed))
        routed = IRoutedDelivery(delivery)
        self.assertEqual((routed.localRecipients, routed.remoteRecipients), ((BOB, ALICE), (REMOTE,)))
        message = b"Received: x\r\nSubject: hi\r\n\r\nbody\r\n"
        self.assertEqual({a: [data for _, data in box] for a, box in self.store.boxes.items()}, {BOB: [message], ALICE: [message]})
        self.assertEqual(self.queue.entries, [(ALICE, [REMOTE], message)])

    def test_oneSideOnly(self) -> None:
        """
        A message with only local recipients makes no queue entry and names
        no queue id; one with only remote recipients touches no maildrop.
        """
        delivery, committed = self.deliver([BOB])
        self.successResultOf(committed)
        self.assertIsNone(IRoutedDelivery(delivery).queueId)
        self.assertEqual(self.queue.entries, [])
        delivery, committed = self.deliver([REMOTE], sender=None)
        self.successResultOf(committed)
        self.assertEqual(IRoutedDelivery(delivery).localRecipients, ())
        self.assertEqual(list(self.store.boxes), [BOB])
        self.assertEqual([(s, r) for s, r, _ in self.queue.entries], [(None, [REMOTE])])

    def test_smtputf8ToQueue(self) -> None:
        """
        C{smtputf8=True} is handed to the queue with the remote part.
        """
        delivery = self.router.beginDelivery(ALICE, [BOB, REMOTE], b"", smtputf8=True)
        delivery.write(b"Subject: \xc3\xa4\r\n\r\nbody\r\n")
        self.successResultOf(delivery.commit())
        self.assertEqual(self.queue.smtputf8, [True])

    def test_queueFailure(self) -> None:
        """
        If the queue part cannot be made durable, the commit fails with
        L{TemporaryFailure} and no maildrop gets a copy, so the client's
        retry duplicates nothing.
        """
        self.queue.failCommit = True
        _, committed = self.deliver([BOB, REMOTE])
        self.failureResultOf(committed, TemporaryFailure)
        self.assertEqual(self.store.boxes, {})
        self.assertEqual(self.queue.entries, [])

    def test_localFailure(self) -> None:
        """
        If a maildrop cannot be written, the commit fails with
        L{TemporaryFailure}.
        """
        self.store.failCommit = True
        _, committed = self.deliver([BOB])
        self.failureResultOf(committed, TemporaryFailure)
        self.assertEqual(self.store.boxes, {})

    def test_abort(self) -> None:
        """
        An aborted delivery leaves nothing anywhere, and cannot be written
        to or committed any more.
        """
        delivery = self.router.beginDelivery(ALICE, [BOB, REMOTE])
        delivery.write(b"Subject: hi\r\n\r\nbody\r\n")
        delivery.abort()
        delivery.abort()
        self.assertRaises(TemporaryFailure, delivery.write, b"more\r\n")
        self.failureResultOf(delivery.commit(), TemporaryFailure)
        self.assertEqual((self.store.boxes, self.queue.entries), ({}, []))

    def test_checkLocalRecipient(self) -> None:
        """
        For local-only mail, a local user or alias resolves as with
        C{checkRecipient}, an unknown local address is L{UnknownUser}, and
        any address outside the local domains is L{RelayDenied} (not
        queued, whatever the domain).
        """
        self.assertEqual(self.router.checkLocalRecipient(Address.parse("BOB@Example.ORG")), (BOB,))
        self.assertEqual(self.router.checkLocalRecipient(Address("PostMaster", "example.org")), (ALICE,))
        self.assertRaises(UnknownUser, self.router.checkLocalRecipient, Address("nobody", "example.org"))
        for address in (REMOTE, Address("root", "localhost"), Address("bob", "sub.example.org")):
            self.assertRaises(RelayDenied, self.router.checkLocalRecipient, address)

    def test_localDelivery(self) -> None:
        """
        A local-only delivery writes every local copy, never asks the
        queue, names no remote part, and refuses a remote recipient with
        L{RelayDenied} before anything is written.
        """
        self.assertRaises(RelayDenied, self.router.beginLocalDelivery, None, [BOB, REMOTE])
        delivery = self.router.beginLocalDelivery(None, [BOB, ALICE, BOB], b"Received: x\r\n")
        delivery.write(b"Subject: hi\r\n\r\nbody\r\n")
        self.assertIsNone(self.successResultOf(delivery.commit()))
        routed = IRoutedDelivery(delivery)
        self.assertEqual((routed.localRecipients, routed.remoteRecipients, routed.queueId), ((BOB, ALICE), (), None))
        message = b"Received: x\r\nSubject: hi\r\n\r\nbody\r\n"
        self.assertEqual({a: [data for _, data in box] for a, box in self.store.boxes.items()}, {BOB: [message], ALICE: [message]})
        self.assertEqual(self.queue.entries, [])


class RouterContractTests(MailRouterContract, SynchronousTestCase):
    """
    The L{IMailRouter} contract over L{Router}.
    """

    def makeRouter(self, domains, users, store, queue):
        return Router(domains, users, store, queue)


class FakeRouterContractTests(MailRouterContract, SynchronousTestCase):
    """
    The L{IMailRouter} contract over L{pop3gw.testing.FakeRouter}.
    """

    def makeRouter(self, domains, users, store, queue):
        return FakeRouter(domains, users, store, queue)
