# -*- test-case-name: tests.test_dkimkeys -*-
"""
DKIM keys (RFC 6376, RFC 8463): where they live in the data directory, the
commands' side of them (generate, activate, remove, list) and the
server's side (L{Keyring}: the active keys, loaded in the I/O pool).

Storage
=======

Under C{DATA/dkim/}:

  - C{keys}: the index, one line per key::

        DOMAIN SELECTOR ALGORITHM CREATED ACTIVE

    C{ALGORITHM} is C{rsa} or C{ed25519}, C{CREATED} an ISO 8601 UTC time,
    C{ACTIVE} C{yes} or C{no}.  Lines starting with C{#} are comments.
  - C{DOMAIN/SELECTOR.pem}: the private key, PEM (an RSA key in PKCS#1,
    C{BEGIN RSA PRIVATE KEY}; an Ed25519 key in PKCS#8, C{BEGIN PRIVATE
    KEY}: both read by OpenSSL-based tools such as OpenDKIM).

Every file is mode 0600 and every directory 0700, given to the data
directory's owner (L{pop3gw.fsutil}); the index is rewritten atomically
under the exclusive C{flock} of C{DATA/dkim/.lock}, so two commands never
interleave.  A key file is written (and fsynced) before the index names
it, and the index drops a key before its file is removed.

With C{--store postgresql://...} the keys are rows of the database
instead (L{pop3gw.pgdkim.PostgresKeyStore}), so every node signs with the
same keys; both stores provide L{pop3gw.interfaces.IDKIMKeyStore}, and
the rules below (selectors, active keys, rotation) are this module's.

Active keys
===========

Mail from a domain is signed with each of its active keys: at most one
per algorithm, so a domain can be signed with RSA and Ed25519 at once
(RFC 8463 section 5 recommends both while verifiers catch up).  The first
key generated for a domain and algorithm is active; a later one (a
rotation) is not, until L{KeyStore.activate} makes it so and deactivates
the previous key of its algorithm, which stays published until removed.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import os
import re
from typing import Iterator, Mapping, Optional, Sequence, Union

import attr
from twisted.logger import Logger
from zope.interface import implementer

from pop3gw import fsutil
from pop3gw.address import AddressError, parseDomain
from pop3gw.interfaces import IDKIMKeyStore, Pop3gwError, TemporaryFailure

#: The directory, under the data directory, that holds the keys.
DKIM_DIR = "dkim"
#: The index file's name in L{DKIM_DIR}.
INDEX_FILE = "keys"
LOCK_FILE = ".lock"

#: Algorithms, as named on the command line, the index and the DNS C{k=} tag.
RSA = "rsa"
ED25519 = "ed25519"
ALGORITHMS = (RSA, ED25519)

#: The DKIM C{a=} value of each algorithm.
SIGNATURE_ALGORITHMS = {RSA: b"rsa-sha256", ED25519: b"ed25519-sha256"}

#: Size of generated RSA keys (RFC 8301 requires at least 1024 and
#: recommends 2048; larger keys do not fit a 255-octet DNS string well).
RSA_BITS = 2048

#: Longest TXT character-string (RFC 1035 3.3).
TXT_STRING = 255

_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")

_HEADER = "# domain selector algorithm created active\n"


class DKIMKeyError(Pop3gwError):
    """
    A key command cannot be done; the text is one line for the operator.
    """


@attr.s(auto_attribs=True, frozen=True)
class KeyRecord:
    """
    One line of the index.

    @ivar created: when the key was generated, ISO 8601 UTC.
    """

    domain: str
    selector: str
    algorithm: str
    created: str
    active: bool

    def line(self) -> str:
        return f"{self.domain} {self.selector} {self.algorithm} {self.created} {'yes' if self.active else 'no'}\n"


def checkDomain(text: str) -> str:
    """
    @return: C{text} as a lower-case domain name of letters, digits and
        hyphens (IDNs in their A-label form).
    @raise DKIMKeyError: it is not one.
    """
    try:
        domain = parseDomain(text.strip().rstrip("."))
    except AddressError:
        domain = ""
    domain = domain.lower()
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        raise DKIMKeyError(f"bad domain {text!r}")
    return domain


def checkSelector(text: str) -> str:
    """
    @return: C{text}, lower case, if it is a DKIM selector (dot-separated
        DNS labels of letters, digits and hyphens).
    @raise DKIMKeyError: it is not one.
    """
    selector = text.strip().lower()
    if not _SELECTOR.match(selector) or len(selector) > 200:
        raise DKIMKeyError(f"bad selector {text!r} (letters, digits, hyphens and dots)")
    return selector


def parseIndex(data: str) -> list[KeyRecord]:
    """
    Parse the index; a malformed line is skipped.
    """
    records = []
    for line in data.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#") or len(fields) != 5:
            continue
        domain, selector, algorithm, created, active = fields
        if algorithm not in ALGORITHMS or active not in ("yes", "no"):
            continue
        if not _SELECTOR.match(selector) or "/" in domain or domain.startswith("."):
            continue
        records.append(KeyRecord(domain, selector, algorithm, created, active == "yes"))
    return records


def publicKeyData(algorithm: str, privatePEM: bytes) -> str:
    """
    The C{p=} value of the DNS record for a private key: the base64 of the
    DER SubjectPublicKeyInfo for RSA (RFC 6376 3.6.1), of the raw 32-octet
    public key for Ed25519 (RFC 8463 4.2).

    @raise ValueError: the key cannot be read or is not of C{algorithm}.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = serialization.load_pem_private_key(privatePEM, password=None)
    if algorithm == RSA and isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode("ascii")
    if algorithm == ED25519 and isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")
    raise ValueError(f"not an {algorithm} private key")


def txtValue(algorithm: str, publicKey: str) -> str:
    """
    The DKIM key record's text (RFC 6376 3.6.1): C{v=DKIM1; k=ALG; p=KEY}.
    """
    return f"v=DKIM1; k={algorithm}; p={publicKey}"


def txtStrings(value: str) -> list[str]:
    """
    C{value} cut into DNS character-strings of at most L{TXT_STRING} octets
    (a 2048-bit RSA key's record is longer than one); a verifier joins them
    without a separator (RFC 6376 3.6.2.2).
    """
    return [value[i : i + TXT_STRING] for i in range(0, len(value), TXT_STRING)] or [""]


def zoneLine(name: str, value: str) -> str:
    """
    A zone-file line publishing the TXT record C{value} at C{name}::

        NAME. IN TXT "first 255 octets" "the rest"
    """
    quoted = " ".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in txtStrings(value))
    return f"{name}. IN TXT {quoted}"


def generatePrivateKey(algorithm: str) -> bytes:
    """
    A new private key, PEM (see the module docstring for the formats).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if algorithm == RSA:
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    edKey = ed25519.Ed25519PrivateKey.generate()
    return edKey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def signingKeyData(algorithm: str, privatePEM: bytes) -> bytes:
    """
    The private key in the form dkimpy signs with: the PEM itself for RSA,
    the base64 of the 32-octet seed for Ed25519.

    @raise ValueError: the key cannot be read or is not of C{algorithm}.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = serialization.load_pem_private_key(privatePEM, password=None)
    if algorithm == RSA and isinstance(key, rsa.RSAPrivateKey):
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    if algorithm == ED25519 and isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        return base64.b64encode(seed)
    raise ValueError(f"not an {algorithm} private key")


def _utcNow() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def newRecord(records: Sequence[KeyRecord], domain: str, selector: Optional[str], algorithm: str,
              created: Optional[str] = None) -> KeyRecord:
    """
    The record of a new key for C{domain} beside C{records}: active if the
    domain has no active key of C{algorithm} yet.

    @param selector: the selector, or C{None} for C{ALGYYYYMMDD} (for
        example C{rsa20261201}).
    @raise DKIMKeyError: the selector is taken or a name is malformed.
    """
    domain = checkDomain(domain)
    if algorithm not in ALGORITHMS:
        raise DKIMKeyError(f"unknown algorithm {algorithm!r} (rsa or ed25519)")
    created = created or _utcNow()
    if selector is None:
        selector = algorithm.replace("ed25519", "ed") + created[:10].replace("-", "")
    selector = checkSelector(selector)
    if any(r.domain == domain and r.selector == selector for r in records):
        raise DKIMKeyError(f"{domain} already has a key with selector {selector} (choose another with --selector)")
    active = not any(r.domain == domain and r.algorithm == algorithm and r.active for r in records)
    return KeyRecord(domain, selector, algorithm, created, active)


def findRecord(records: Sequence[KeyRecord], domain: str, selector: str) -> KeyRecord:
    """
    @return: the record of C{selector} in C{domain}.
    @raise DKIMKeyError: there is none.
    """
    for r in records:
        if r.domain == domain and r.selector == selector:
            return r
    raise DKIMKeyError(f"no key with selector {selector} for {domain}")


def activated(records: Sequence[KeyRecord], chosen: KeyRecord) -> list[KeyRecord]:
    """
    C{records} with C{chosen} the active key of its domain and algorithm.
    """
    return [
        attr.evolve(r, active=(r is chosen)) if r.domain == chosen.domain and r.algorithm == chosen.algorithm else r
        for r in records
    ]


def checkRemovable(records: Sequence[KeyRecord], chosen: KeyRecord) -> None:
    """
    @raise DKIMKeyError: C{chosen} is its domain's active key of its
        algorithm and another key of that algorithm should be activated
        first.
    """
    others = [r for r in records if r.domain == chosen.domain and r.algorithm == chosen.algorithm and r is not chosen]
    if chosen.active and others:
        raise DKIMKeyError(
            f"{chosen.selector} is {chosen.domain}'s active {chosen.algorithm} key; "
            f"activate another first (pop3gw dkim activate {chosen.domain} {others[-1].selector})"
        )


def publicRecordOf(store: IDKIMKeyStore, record: KeyRecord) -> tuple[str, str]:
    """
    @return: the DNS name and TXT value to publish for C{record} of
        C{store}.
    @raise DKIMKeyError: its key cannot be read.
    """
    try:
        public = publicKeyData(record.algorithm, store.privateKey(record))
    except ValueError:
        raise DKIMKeyError(f"{store.where(record)} is not a readable {record.algorithm} private key") from None
    return f"{record.selector}._domainkey.{record.domain}", txtValue(record.algorithm, public)


@implementer(IDKIMKeyStore)
class KeyStore:
    """
    The keys under C{DATA/dkim}, as the C{pop3gw dkim} commands change
    them (blocking file work; no reactor).

    @param dataDir: the data directory.
    @param owner: who gets the files created (see L{pop3gw.fsutil}).
    """

    def __init__(self, dataDir: str, owner: Optional[fsutil.Owner] = None) -> None:
        self.root = os.path.join(dataDir, DKIM_DIR)
        self.indexPath = os.path.join(self.root, INDEX_FILE)
        self.owner = owner

    def keyPath(self, domain: str, selector: str) -> str:
        """
        The private key file of C{selector} in C{domain}.
        """
        return os.path.join(self.root, domain, selector + ".pem")

    def records(self) -> list[KeyRecord]:
        """
        The keys, in index order (none if there is no index).
        """
        try:
            with open(self.indexPath, encoding="utf-8") as f:
                return parseIndex(f.read())
        except FileNotFoundError:
            return []

    def where(self, record: Optional[KeyRecord]) -> str:
        """
        See L{IDKIMKeyStore.where}: the key file (the index for C{None}).
        """
        return self.indexPath if record is None else self.keyPath(record.domain, record.selector)

    def privateKey(self, record: KeyRecord) -> bytes:
        """
        See L{IDKIMKeyStore.privateKey}: the key file's content.
        """
        path = self.keyPath(record.domain, record.selector)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise DKIMKeyError(f"cannot read {path}: {e.strerror}") from None

    def publicRecord(self, record: KeyRecord) -> tuple[str, str]:
        """
        @return: the DNS name and TXT value to publish for C{record}.
        @raise DKIMKeyError: its key file cannot be read.
        """
        return publicRecordOf(self, record)

    def stamp(self) -> object:
        """
        See L{IDKIMKeyStore.stamp}: the C{stat} of the index and of each
        key file it names, so a key file replaced by hand is noticed too.
        """
        stamps: list = []
        try:
            records: list[Optional[KeyRecord]] = [None, *self.records()]
        except (OSError, UnicodeDecodeError):
            records = [None]
        for record in records:
            path = self.where(record)
            try:
                st = os.stat(path)
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                stamps.append(None)
            except OSError as e:
                stamps.append(("error", e.errno))
        return tuple(stamps)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[KeyRecord]]:
        fsutil.makeDirectories(self.root, self.owner)
        fd = fsutil.openLockFile(os.path.join(self.root, LOCK_FILE), self.owner)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self.records()
        finally:
            os.close(fd)

    def _write(self, records: Sequence[KeyRecord]) -> None:
        data = _HEADER + "".join(r.line() for r in records)
        fsutil.replaceFile(self.indexPath, data.encode("utf-8"), self.owner)

    def generate(self, domain: str, selector: Optional[str], algorithm: str, created: Optional[str] = None) -> KeyRecord:
        """
        Make a new key for C{domain}: active if the domain has no active key
        of C{algorithm} yet.

        @param selector: the selector, or C{None} for C{ALGYYYYMMDD} (for
            example C{rsa20261201}).
        @raise DKIMKeyError: the selector is taken or a name is malformed.
        """
        newRecord([], domain, selector, algorithm, created)
        pem = generatePrivateKey(algorithm)
        with self._locked() as records:
            record = newRecord(records, domain, selector, algorithm, created)
            self._writeKey(record, pem)
            self._write([*records, record])
        return record

    def load(self, keys: Sequence[tuple[KeyRecord, bytes]]) -> None:
        """
        Add keys (record and PEM) taken from another store (C{pop3gw
        migrate}), after the ones there.

        @raise DKIMKeyError: a selector is taken.
        """
        with self._locked() as records:
            for record, pem in keys:
                if any(r.domain == record.domain and r.selector == record.selector for r in records):
                    raise DKIMKeyError(f"{record.domain} already has a key with selector {record.selector}")
                self._writeKey(record, pem)
                records = [*records, record]
            self._write(records)

    def _writeKey(self, record: KeyRecord, pem: bytes) -> None:
        fsutil.makeDirectories(os.path.join(self.root, record.domain), self.owner)
        path = self.keyPath(record.domain, record.selector)
        fsutil.unlinkIfThere(path)
        fd = fsutil.createFile(path, self.owner)
        try:
            fsutil.writeAll(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsutil.fsyncDirectory(os.path.dirname(path))

    def activate(self, domain: str, selector: str) -> KeyRecord:
        """
        Sign C{domain}'s mail with C{selector} from now on, instead of its
        other key of the same algorithm (which stays, to be removed once
        mail signed with it has been delivered).

        @raise DKIMKeyError: no such key, or its file is unusable.
        """
        domain, selector = checkDomain(domain), checkSelector(selector)
        with self._locked() as records:
            chosen = findRecord(records, domain, selector)
            self.publicRecord(chosen)
            self._write(activated(records, chosen))
        return attr.evolve(chosen, active=True)

    def remove(self, domain: str, selector: str) -> KeyRecord:
        """
        Forget C{selector}'s key and delete its file.  The active key of an
        algorithm can only be removed when it is the domain's only key of
        that algorithm (the domain's mail is then no longer signed with it).

        @raise DKIMKeyError: no such key, or another key should be
            activated first.
        """
        domain, selector = checkDomain(domain), checkSelector(selector)
        with self._locked() as records:
            chosen = findRecord(records, domain, selector)
            checkRemovable(records, chosen)
            self._write([r for r in records if r is not chosen])
            fsutil.unlinkIfThere(self.keyPath(domain, selector))
            fsutil.fsyncDirectory(os.path.join(self.root, domain))
        return chosen


# --- The server's side ------------------------------------------------------


@attr.s(auto_attribs=True, frozen=True)
class SigningKey:
    """
    One active key, ready for dkimpy.

    @ivar privateKey: see L{signingKeyData}.
    """

    domain: str
    selector: str
    algorithm: str
    privateKey: bytes = attr.ib(repr=False)


@attr.s(auto_attribs=True, frozen=True)
class KeyProblem:
    """
    A domain has an active key that cannot be used.

    @ivar reason: one line for the log (never sent to a client).
    """

    reason: str


#: What the keyring knows of one domain.
DomainKeys = Union[tuple, KeyProblem]


class Keyring:
    """
    The active keys of every domain, as the server signs with them.

    L{refresh} (blocking: run it in the I/O pool, or the database threads)
    re-reads the keys when the store's L{IDKIMKeyStore.stamp} moved (the
    files changed; the database's keys changed), so keys generated,
    activated, removed (or, in the data directory, replaced by hand) are
    used within one check interval, without a restart.  L{keysFor} only
    reads the snapshot in memory (the reactor thread may call it).

    @param store: the key store, or a data directory (its L{KeyStore}).
    """

    log = Logger()

    def __init__(self, store: Union[str, IDKIMKeyStore]) -> None:
        self.store: IDKIMKeyStore = KeyStore(store) if isinstance(store, str) else store
        self._stamp: object = None
        self._loaded = False
        self._keys: Mapping[str, DomainKeys] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def keysFor(self, domain: str) -> Optional[DomainKeys]:
        """
        @return: C{domain}'s active L{SigningKey}s (a tuple), a L{KeyProblem},
            or C{None} if the domain has no active key.
        """
        return self._keys.get(domain.lower().rstrip("."))

    def refresh(self) -> None:
        """
        Reload the keys if the index changed since the last load.
        """
        try:
            stamp = self.store.stamp()
        except TemporaryFailure as e:
            self.log.warn("dkim: cannot read the keys: {why}", why=str(e))
            return
        if self._loaded and stamp == self._stamp:
            return
        self._stamp, self._loaded = stamp, True
        self._keys = self._load()

    def _load(self) -> Mapping[str, DomainKeys]:
        try:
            records = self.store.records()
        except TemporaryFailure as e:
            self.log.warn("dkim: cannot read the keys: {why}", why=str(e))
            self._loaded = False
            return self._keys
        except (OSError, UnicodeDecodeError) as e:
            self.log.error("dkim: cannot read {path}: {why}", path=self.store.where(None),
                           why=getattr(e, "strerror", None) or str(e))
            return self._keys
        keys: dict[str, DomainKeys] = {}
        for record in records:
            if not record.active:
                continue
            known = keys.get(record.domain, ())
            if isinstance(known, KeyProblem):
                continue
            try:
                data = signingKeyData(record.algorithm, self.store.privateKey(record))
            except TemporaryFailure as e:
                self.log.warn("dkim: cannot read the keys: {why}", why=str(e))
                self._loaded = False
                return self._keys
            except DKIMKeyError as e:
                problem = KeyProblem(str(e))
            except ValueError:
                problem = KeyProblem(f"{self.store.where(record)} is not a readable {record.algorithm} private key")
            else:
                keys[record.domain] = (*known, SigningKey(record.domain, record.selector, record.algorithm, data))
                continue
            self.log.error("dkim: key for {domain} unusable: {why}", domain=record.domain, why=problem.reason)
            keys[record.domain] = problem
        self.log.info(
            "dkim: signing keys loaded for {count} domain(s)",
            count=len(keys),
        )
        return keys
