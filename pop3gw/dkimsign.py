# -*- test-case-name: tests.test_dkimsign -*-
"""
DKIM signing of the mail that leaves (RFC 6376, RFC 8463), with dkimpy.

L{SigningQueue} stands between the router and the outbound queue: only
what goes to the queue (mail for remote recipients, relayed) passes
through it, so local deliveries are never signed.  Its deliveries hold the
message (after the submission fix-ups: the C{Date:}, C{Message-ID:} and
C{From:} fields pop3gw adds are already in it) until the commit, sign it
in the runner they are given (the server's is a
L{pop3gw.runner.ProcessPoolRunner}: signing is CPU work that holds the
GIL, so neither the reactor thread nor a pool thread does it), then
write the C{DKIM-Signature:} fields and the message to the queue: the
signature is stored with the message, and every retry sends the same
octets.

Which domain signs
==================

The domain of the first C{From:} address, when it has an active key: DMARC
(RFC 7489 3.1.1) only counts a DKIM signature whose C{d=} is aligned with
the C{From:} domain.  Otherwise the nearest parent of it that has one, up
to its organizational domain (C{example.org} for C{a@sub.example.org}, from
the Public Suffix List): DMARC's default relaxed alignment (C{adkim=r})
counts that signature too; a parent above the organizational domain is a
public suffix and never signs.  Otherwise the envelope sender's domain
(or, the same way, a parent of it), when it has one (a valid signature that does not align still helps the domain's
reputation).  Otherwise the message leaves unsigned, as it did before
keys existed.

A domain whose active key cannot be used (unreadable, malformed) gets no
unsigned mail: the commit fails with L{TemporaryFailure} (the client sees
C{451 4.3.0} and keeps the message), and every such message logs one
error line naming the key file, so the operator finds it at once.
"""

from __future__ import annotations

import email.utils
import re
from typing import Any, Callable, Optional, Sequence

import dkim
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from pop3gw.address import Address, AddressError
from pop3gw.dkimkeys import SIGNATURE_ALGORITHMS, KeyProblem, Keyring, SigningKey
from pop3gw.interfaces import (
    IBlockingRunner,
    IDelivery,
    IOutboundQueue,
    IQueuedDelivery,
    ITwoPhaseDelivery,
    TemporaryFailure,
)
from pop3gw.mailauth import OrganizationalDomains
from pop3gw.wire import CRLFStream

#: The header fields signed, when present, in this order (RFC 6376 5.4.1's
#: list, minus the trace and list fields a forwarder may change).
SIGNED_FIELDS = (
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
)

#: Fields signed once more than they appear, so that none can be added
#: without breaking the signature (RFC 6376 8.15, "over-signing").
OVERSIGNED_FIELDS = (b"from",)

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:")


class KeyUnavailable(TemporaryFailure):
    """
    The domain that should sign has an active key that cannot be used.
    """


def headerSection(message: bytes) -> list[tuple[bytes, bytes]]:
    """
    The header fields of C{message} (CRLF line ends), as (lower-case name,
    unfolded value) pairs, in order.
    """
    end = message.find(b"\r\n\r\n")
    head = message if end == -1 else message[: end + 2]
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line)
            continue
        m = _FIELD.match(line)
        if m is None:
            if fields or line:
                break
            continue
        fields.append((m.group(1).lower(), line[m.end() :].strip()))
    return fields


def fromDomain(fields: Sequence[tuple[bytes, bytes]]) -> Optional[str]:
    """
    The domain of the first address of the first C{From:} field, lower
    case, or C{None}.
    """
    for name, value in fields:
        if name != b"from":
            continue
        for _, spec in email.utils.getaddresses([value.decode("utf-8", "replace")]):
            try:
                return Address.parse(spec).domain.lower()
            except AddressError:
                continue
        return None
    return None


def signedFields(fields: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """
    The C{h=} list for a message with C{fields}: each of L{SIGNED_FIELDS}
    as often as it appears, then L{OVERSIGNED_FIELDS} once more.
    """
    present = [name for name, _ in fields]
    names = [name for name in SIGNED_FIELDS for _ in range(present.count(name))]
    return names + [name for name in OVERSIGNED_FIELDS]


def signatures(message: bytes, keys: Sequence[SigningKey]) -> bytes:
    """
    The C{DKIM-Signature:} fields (relaxed/relaxed, one per key, CRLF
    line ends) for C{message} (CRLF line ends).  Blocking: CPU work.
    """
    include = signedFields(headerSection(message))
    out = []
    for key in keys:
        signer = dkim.DKIM(message, linesep=b"\r\n")
        out.append(
            signer.sign(
                key.selector.encode("ascii"),
                key.domain.encode("ascii"),
                key.privateKey,
                signature_algorithm=SIGNATURE_ALGORITHMS[key.algorithm],
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=include,
            )
        )
    return b"".join(out)


@implementer(IQueuedDelivery)
class _SigningDelivery:
    """
    One message on its way to the queue: held until the commit, then
    signed and written to the queue's delivery C{inner}.  It provides
    L{ITwoPhaseDelivery} when C{inner} does (so that the router can still
    withdraw the signed copy), and only then.
    """

    def __init__(self, queue: "SigningQueue", inner: IDelivery, sender: Optional[Address]) -> None:
        self._queue = queue
        self._inner = inner
        self._sender = sender
        self._chunks: list[bytes] = []
        self._crlf = CRLFStream()
        self._state = "open"
        queued = IQueuedDelivery(inner, None)
        self.queueId = None if queued is None else queued.queueId
        if ITwoPhaseDelivery.providedBy(inner):
            alsoProvides(self, ITwoPhaseDelivery)

    def write(self, data: bytes) -> None:
        if self._state != "open":
            raise TemporaryFailure("delivery is not open")
        self._chunks.append(self._crlf.feed(data))

    def prepare(self) -> defer.Deferred:
        if self._state != "open":
            return defer.fail(TemporaryFailure("delivery is not open"))
        self._state = "signing"
        message = b"".join(self._chunks)
        self._chunks = []
        if message and not message.endswith(b"\r\n"):
            message += b"\n" if message.endswith(b"\r") else b"\r\n"
        d = self._queue.sign(message, self._sender, self.queueId)

        def signed(header: bytes) -> Any:
            self._state = "prepared"
            self._inner.write(header)
            self._inner.write(message)
            if ITwoPhaseDelivery.providedBy(self._inner):
                return self._inner.prepare()
            return self._inner.commit()

        def failed(f: Failure) -> Failure:
            self._state = "aborted"
            self._inner.abort()
            return f

        d.addCallback(signed)
        d.addErrback(failed)
        return d

    def release(self) -> None:
        if self._state == "prepared":
            self._state = "committed"
            if ITwoPhaseDelivery.providedBy(self._inner):
                self._inner.release()

    def discard(self) -> defer.Deferred:
        if self._state == "prepared" and ITwoPhaseDelivery.providedBy(self._inner):
            self._state = "aborted"
            return self._inner.discard()
        self.abort()
        return defer.succeed(None)

    def commit(self) -> defer.Deferred:
        return self.prepare().addCallback(lambda _: self.release())

    def abort(self) -> None:
        if self._state == "open":
            self._state = "aborted"
            self._chunks = []
            self._inner.abort()


@implementer(IOutboundQueue)
class SigningQueue:
    """
    An L{IOutboundQueue} that DKIM-signs each message before C{queue}
    stores it (see the module docstring).

    @param keyring: the active keys.
    @param runner: where signing runs (L{signatures}, its arguments
        picklable: the server's L{pop3gw.runner.ProcessPoolRunner}).
    """

    log = Logger()

    def __init__(
        self,
        queue: IOutboundQueue,
        keyring: Keyring,
        runner: IBlockingRunner,
        organizational: Optional[Callable[[str], str]] = None,
    ) -> None:
        self.queue = queue
        self.keyring = keyring
        self.runner = runner
        self._organizational = organizational

    def _aligned(self, domain: str) -> list[str]:
        """
        C{domain} and its parents up to its organizational domain, nearest
        first: the names a relaxed-aligned signature may use.
        """
        if self._organizational is None:
            self._organizational = OrganizationalDomains()
        organizational = self._organizational(domain)
        labels = domain.split(".")
        names = [".".join(labels[i:]) for i in range(len(labels))]
        if organizational not in names:
            return [domain]
        return names[: names.index(organizational) + 1]

    def beginDelivery(
        self, sender: Optional[Address], recipients: Sequence[Address], trace: bytes = b"", smtputf8: bool = False
    ):
        inner = self.queue.beginDelivery(sender, recipients, trace, smtputf8=smtputf8)
        if not len(self.keyring):
            return inner
        return _SigningDelivery(self, inner, sender)

    def keysFor(self, message: bytes, sender: Optional[Address]) -> tuple[Optional[str], Any]:
        """
        The signing domain for C{message} and its keys (see the module
        docstring): C{(domain, keys)}, C{(domain, KeyProblem)}, or
        C{(None, None)}.
        """
        candidates = [fromDomain(headerSection(message))]
        if sender is not None:
            candidates.append(sender.domain.lower())
        for candidate in candidates:
            if candidate is None:
                continue
            for domain in self._aligned(candidate.rstrip(".")):
                keys = self.keyring.keysFor(domain)
                if keys is not None:
                    return domain, keys
        return None, None

    def sign(self, message: bytes, sender: Optional[Address], queueId: Optional[str]) -> defer.Deferred:
        """
        @return: a C{Deferred} firing with the C{DKIM-Signature:} fields to
            put before C{message} (C{b""} when no domain signs it), or
            failing with L{KeyUnavailable}.
        """
        domain, keys = self.keysFor(message, sender)
        if domain is None:
            return defer.succeed(b"")
        if isinstance(keys, KeyProblem):
            self.log.error(
                "dkim: not queueing id={queueId}: the key for {domain} is unusable: {why}",
                queueId=queueId or "-",
                domain=domain,
                why=keys.reason,
            )
            return defer.fail(KeyUnavailable(f"DKIM key for {domain} unusable"))
        d = self.runner.run(signatures, message, keys)

        def signed(header: bytes) -> bytes:
            self.log.info(
                "dkim: signed id={queueId} d={domain} s={selectors}",
                queueId=queueId or "-",
                domain=domain,
                selectors=",".join(k.selector for k in keys),
            )
            return header

        def failed(f: Failure) -> Failure:
            self.log.failure("dkim: signing id={queueId} for {domain} failed", f, queueId=queueId or "-", domain=domain)
            return Failure(TemporaryFailure("DKIM signing failed"))

        return d.addCallbacks(signed, failed)
