"""
DKIM signing of relayed mail: the fields signed, the canonicalisation, the
domain chosen, and where the signature goes (the queue, before the commit).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re

import dkim
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.address import Address
from pop3gw.dkimkeys import Keyring, KeyStore
from pop3gw.dkimsign import SigningQueue, signatures
from pop3gw.interfaces import TemporaryFailure
from pop3gw.queue import OutboundQueue
from pop3gw.router import Router
from pop3gw.runner import ImmediateRunner
from pop3gw.testing import FakeMaildropStore, FakeOutboundQueue, FakeUserDatabase

ALICE = Address("alice", "example.org")
REMOTE = Address("bob", "remote.example")

MESSAGE = (
    b"Received: from client (authenticated user) by mail.example.org (pop3gw) with ESMTPSA id x; date\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@remote.example\r\n"
    b"Subject: Hello\r\n"
    b"Date: Tue, 01 Dec 2026 23:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hello  Bob, \r\n"
    b"\r\n"
    b"line two\t \r\n"
    b"\r\n"
    b"\r\n"
)


def tags(message: bytes, index: int = 0) -> dict:
    """
    The tags of the C{index}th C{DKIM-Signature:} field of C{message}.
    """
    fields = re.findall(rb"^DKIM-Signature:(.*?\r\n)(?! |\t)", message, re.S | re.M)
    value = b"".join(fields[index].split())
    return dict(t.split(b"=", 1) for t in value.split(b";") if t)


class KeysMixin:
    def makeKeys(self, *specs) -> tuple:
        """
        Generate C{(domain, selector, algorithm)} keys in a new data
        directory; return it and a dkimpy DNS function serving their
        records.
        """
        dataDir = self.mktemp()
        os.makedirs(dataDir)
        store = KeyStore(dataDir)
        txt = {}
        for domain, selector, algorithm in specs:
            record = store.generate(domain, selector, algorithm)
            name, value = store.publicRecord(record)
            txt[name.encode() + b"."] = value.encode()

        def dnsfunc(name, timeout=5):
            return txt.get(name)

        keyring = Keyring(dataDir)
        keyring.refresh()
        return dataDir, keyring, dnsfunc


class SignaturesTests(KeysMixin, SynchronousTestCase):
    def test_rsaRelaxed(self) -> None:
        """
        An rsa-sha256 signature, relaxed/relaxed, covers the listed fields
        present (each once) plus From once more (over-signing), not the
        trace or X- fields; dkimpy verifies it.
        """
        _, keyring, dnsfunc = self.makeKeys(("example.org", "s1", "rsa"))
        header = signatures(MESSAGE, keyring.keysFor("example.org"))
        self.assertTrue(header.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org;"))
        self.assertTrue(header.endswith(b"\r\n"))
        t = tags(header)
        self.assertEqual(t[b"s"], b"s1")
        self.assertEqual(
            t[b"h"], b"from:to:subject:date:message-id:mime-version:content-type:from"
        )
        self.assertTrue(dkim.verify(header + MESSAGE, dnsfunc=dnsfunc))
        # Another From: added on the way breaks it (over-signing).
        self.assertFalse(dkim.verify(header + b"From: mallory@evil.example\r\n" + MESSAGE, dnsfunc=dnsfunc))

    def test_bodyHashByHand(self) -> None:
        """
        The C{bh=} tag is the SHA-256 of the body canonicalised by hand as
        RFC 6376 3.4.4 says: trailing white space removed, runs of white
        space made one space, empty lines at the end dropped.
        """
        _, keyring, _ = self.makeKeys(("example.org", "s1", "ed25519"))
        header = signatures(MESSAGE, keyring.keysFor("example.org"))
        canonical = b"Hello Bob,\r\n\r\nline two\r\n"
        self.assertEqual(tags(header)[b"bh"], base64.b64encode(hashlib.sha256(canonical).digest()))

    def test_dualSignature(self) -> None:
        """
        A domain with an active RSA and an active Ed25519 key gets two
        signatures, RSA first; each verifies.
        """
        _, keyring, dnsfunc = self.makeKeys(("example.org", "r", "rsa"), ("example.org", "e", "ed25519"))
        header = signatures(MESSAGE, keyring.keysFor("example.org"))
        signed = header + MESSAGE
        self.assertEqual([tags(signed, i)[b"a"] for i in (0, 1)], [b"rsa-sha256", b"ed25519-sha256"])
        d = dkim.DKIM(signed)
        self.assertTrue(d.verify(idx=0, dnsfunc=dnsfunc))
        self.assertTrue(d.verify(idx=1, dnsfunc=dnsfunc))


class RecordingRunner(ImmediateRunner):
    def __init__(self) -> None:
        self.calls: list = []

    def run(self, f, *args):
        self.calls.append(f)
        return super().run(f, *args)


class SigningQueueTests(KeysMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.inner = FakeOutboundQueue()
        self.runner = RecordingRunner()

    def send(self, queue, sender, data=MESSAGE) -> list:
        delivery = queue.beginDelivery(sender, [REMOTE])
        for i in range(0, len(data), 7):
            delivery.write(data[i : i + 7])
        failures: list = []
        delivery.commit().addErrback(failures.append)
        return failures

    def test_signedBeforeQueued(self) -> None:
        """
        The queue gets the signature fields followed by the message as
        written, once the signing (in the runner) is done.
        """
        _, keyring, dnsfunc = self.makeKeys(("example.org", "s1", "rsa"))
        self.assertEqual(self.send(SigningQueue(self.inner, keyring, self.runner), ALICE), [])
        self.assertEqual(self.runner.calls, [signatures])
        [(sender, recipients, data)] = self.inner.entries
        self.assertEqual((sender, recipients), (ALICE, [REMOTE]))
        self.assertTrue(data.startswith(b"DKIM-Signature: "))
        self.assertEqual(data[data.index(b"Received: ") :], MESSAGE)
        self.assertTrue(dkim.verify(data, dnsfunc=dnsfunc))

    def test_smtputf8PassedOn(self) -> None:
        """
        Whether a message needs SMTPUTF8 reaches the queue through the
        signing wrapper, signed or not.
        """
        _, keyring, _ = self.makeKeys(("example.org", "s1", "ed25519"))
        for queue in (SigningQueue(self.inner, keyring, self.runner), SigningQueue(self.inner, [], self.runner)):
            delivery = queue.beginDelivery(ALICE, [REMOTE], smtputf8=True)
            delivery.write(MESSAGE)
            self.successResultOf(delivery.commit())
        self.assertEqual(self.inner.smtputf8, [True, True])

    def test_fromDomainFirst(self) -> None:
        """
        The From: domain signs when it has a key (DMARC alignment), even if
        the envelope sender's domain has one too; otherwise the envelope
        sender's domain signs.
        """
        _, keyring, _ = self.makeKeys(("example.org", "org", "ed25519"), ("example.net", "net", "ed25519"))
        queue = SigningQueue(self.inner, keyring, self.runner)
        self.send(queue, Address("alice", "example.net"))
        self.send(queue, Address("alice", "example.net"), MESSAGE.replace(b"alice@example.org", b"alice@elsewhere.example"))
        self.assertEqual([tags(e[2])[b"d"] for e in self.inner.entries], [b"example.org", b"example.net"])

    def test_organizationalDomain(self) -> None:
        """
        A From: domain without a key of its own is signed with the key of
        the nearest parent up to its organizational domain (relaxed DMARC
        alignment), before the envelope sender's domain; an exact key
        wins; a parent above the organizational domain (a public suffix)
        never signs.
        """
        _, keyring, dnsfunc = self.makeKeys(("example.org", "org", "ed25519"), ("b.example.org", "b", "ed25519"),
                                            ("example.net", "net", "ed25519"))
        queue = SigningQueue(self.inner, keyring, self.runner)
        sender = Address("alice", "example.net")
        for domain in (b"sub.example.org", b"a.b.example.org", b"b.example.org", b"example.co.uk"):
            self.send(queue, sender, MESSAGE.replace(b"alice@example.org", b"alice@" + domain))
        self.assertEqual([tags(e[2])[b"d"] for e in self.inner.entries],
                         [b"example.org", b"b.example.org", b"b.example.org", b"example.net"])
        self.assertTrue(dkim.verify(self.inner.entries[0][2], dnsfunc=dnsfunc))

    def test_noKeyUnsigned(self) -> None:
        """
        A message from a domain without a key is queued unchanged and not
        given to the runner; with no key at all, the queue's own delivery
        is used directly.
        """
        _, keyring, _ = self.makeKeys(("example.net", "net", "ed25519"))
        self.send(SigningQueue(self.inner, keyring, self.runner), ALICE)
        empty = Keyring(self.mktemp())
        empty.refresh()
        queue = SigningQueue(self.inner, empty, self.runner)
        self.assertIs(type(queue.beginDelivery(ALICE, [REMOTE])), type(self.inner.beginDelivery(ALICE, [REMOTE])))
        self.assertEqual([e[2] for e in self.inner.entries], [MESSAGE])
        self.assertEqual(self.runner.calls, [])

    def test_unusableKeyRefused(self) -> None:
        """
        When the signing domain's active key cannot be used, nothing is
        queued: the commit fails with L{TemporaryFailure} (the client gets
        451 and keeps the message), and each such message logs one error
        line naming the key file (never sent to the client).
        """
        dataDir, _, _ = self.makeKeys(("example.org", "s1", "rsa"))
        path = KeyStore(dataDir).keyPath("example.org", "s1")
        with open(path, "wb") as f:
            f.write(b"not a key")
        keyring = Keyring(dataDir)
        keyring.log = Logger(observer=lambda e: None)
        keyring.refresh()
        queue = SigningQueue(self.inner, keyring, self.runner)
        events: list = []
        queue.log = Logger(observer=events.append)
        for _ in range(2):
            [failure] = self.send(queue, ALICE)
            self.assertIsInstance(failure.value, TemporaryFailure)
            self.assertEqual(str(failure.value), "DKIM key for example.org unusable")
        self.assertEqual(self.inner.entries, [])
        line = f"dkim: not queueing id=-: the key for example.org is unusable: {path} is not a readable rsa private key"
        self.assertEqual([formatEvent(e) for e in events], [line] * 2)

    def test_storedSignatureIsSent(self) -> None:
        """
        With the real queue, the signature is part of the stored C{.msg}
        file the relay sends on every attempt.
        """
        _, keyring, dnsfunc = self.makeKeys(("example.org", "s1", "ed25519"))
        root = self.mktemp()
        outbound = OutboundQueue(root, Clock())
        queue = SigningQueue(outbound, keyring, self.runner)
        delivery = queue.beginDelivery(ALICE, [REMOTE])
        delivery.write(MESSAGE)
        self.successResultOf(delivery.commit())
        [entry] = outbound.loadEntries()
        self.assertEqual(entry.queueId, delivery.queueId)
        with outbound.openMessage(entry) as f:
            stored = f.read()
        self.assertTrue(stored.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256;"))
        self.assertTrue(stored.endswith(MESSAGE))
        self.assertTrue(dkim.verify(stored, dnsfunc=dnsfunc))


class RouterTests(KeysMixin, SynchronousTestCase):
    def test_localCopyUnsigned(self) -> None:
        """
        A message with a local and a remote recipient: only the copy for
        the queue is signed; the maildrop copy is stored as written.
        """
        _, keyring, _ = self.makeKeys(("example.org", "s1", "ed25519"))
        users = FakeUserDatabase({ALICE: "hash"})
        store, outbound = FakeMaildropStore(), FakeOutboundQueue()
        router = Router(["example.org"], users, store, SigningQueue(outbound, keyring, ImmediateRunner()))
        delivery = router.beginDelivery(ALICE, [ALICE, REMOTE])
        delivery.write(MESSAGE)
        self.successResultOf(defer.maybeDeferred(delivery.commit))
        self.assertEqual(store.boxes[ALICE], [("uid1", MESSAGE)])
        self.assertTrue(outbound.entries[0][2].startswith(b"DKIM-Signature: "))


class RetryTests(KeysMixin, SynchronousTestCase):
    def test_retrySendsSameOctets(self) -> None:
        """
        A signed message whose first relay attempt is refused with 451 at
        the end of the data is sent again, octet for octet, on the retry:
        the signature was made once, when it was queued, and verifies.
        """
        from tests.queuehelpers import OK, successReplies
        from tests.test_relay_service import RelayTestMixin

        class Harness(RelayTestMixin):
            pass

        h = Harness()
        h.mktemp, h.successResultOf, h.addCleanup = self.mktemp, self.successResultOf, self.addCleanup
        h.setUpRelay()
        h.start()
        _, keyring, dnsfunc = self.makeKeys(("example.org", "s1", "rsa"))
        queue = SigningQueue(h.queue, keyring, ImmediateRunner())
        delivery = queue.beginDelivery(ALICE, [REMOTE])
        delivery.write(MESSAGE)
        self.successResultOf(delivery.commit())
        h.clock.advance(0)
        first = successReplies()
        first[first.index(OK, 4)] = b"451 4.3.0 try again\r\n"
        sentFirst = h.connects[0].serve(first)
        h.clock.advance(5 * 60)
        sentSecond = h.connects[1].serve(successReplies())
        data = [s for s in sentFirst if s.startswith(b"DKIM-Signature: ")]
        self.assertEqual(len(data), 1)
        self.assertEqual([s for s in sentSecond if s.startswith(b"DKIM-Signature: ")], data)
        unstuffed = data[0].replace(b"\r\n..", b"\r\n.")[: -len(b".\r\n")]
        self.assertTrue(dkim.verify(unstuffed, dnsfunc=dnsfunc))


class TwoPhaseTests(KeysMixin, SynchronousTestCase):
    def test_withdrawnWhenLocalFails(self) -> None:
        """
        With the real (two-phase) queue, a signed remote copy is withdrawn
        when the local copy of the same message cannot be stored, so the
        client's retry does not send it twice.
        """
        _, keyring, _ = self.makeKeys(("example.org", "s1", "ed25519"))
        users = FakeUserDatabase({ALICE: "hash"})
        store = FakeMaildropStore()
        store.failCommit = True
        outbound = OutboundQueue(self.mktemp(), Clock())
        router = Router(["example.org"], users, store, SigningQueue(outbound, keyring, ImmediateRunner()))
        delivery = router.beginDelivery(ALICE, [ALICE, REMOTE])
        delivery.write(MESSAGE)
        self.failureResultOf(defer.maybeDeferred(delivery.commit), TemporaryFailure)
        self.assertEqual(outbound.loadEntries(), [])

    def test_twoPhaseOnlyOverTwoPhase(self) -> None:
        """
        A signing delivery offers the two phases only when the queue's own
        delivery does; over a queue without them it commits in one step.
        """
        from pop3gw.interfaces import ITwoPhaseDelivery

        _, keyring, _ = self.makeKeys(("example.org", "s1", "ed25519"))
        overFake = SigningQueue(FakeOutboundQueue(), keyring, ImmediateRunner()).beginDelivery(ALICE, [REMOTE])
        overReal = SigningQueue(OutboundQueue(self.mktemp(), Clock()), keyring, ImmediateRunner()).beginDelivery(ALICE, [REMOTE])
        self.assertFalse(ITwoPhaseDelivery.providedBy(overFake))
        self.assertTrue(ITwoPhaseDelivery.providedBy(overReal))
        overReal.abort()
