"""
DKIM keys in the data directory: the index, the key files, rotation, and
the server's keyring.
"""

from __future__ import annotations

import base64
import os
import stat

from cryptography.hazmat.primitives import serialization
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pop3gw import dkimkeys
from pop3gw.dkimkeys import DKIMKeyError, KeyProblem, KeyRecord, Keyring, KeyStore
from pop3gw.interfaces import IDKIMKeyStore


class TXTTests(SynchronousTestCase):
    def test_longValueSplit(self) -> None:
        """
        A TXT value longer than 255 octets is cut into 255-octet strings,
        each quoted, on one zone-file line; a short one is one string.
        """
        value = "v=DKIM1; k=rsa; p=" + "A" * 400
        self.assertEqual(
            dkimkeys.zoneLine("s._domainkey.example.org", value),
            's._domainkey.example.org. IN TXT "' + value[:255] + '" "' + value[255:] + '"',
        )
        self.assertEqual(dkimkeys.zoneLine("x.example.org", "v=spf1 mx -all"), 'x.example.org. IN TXT "v=spf1 mx -all"')

    def test_names(self) -> None:
        """
        Domains are lower-cased and must be made of DNS labels; selectors
        likewise; anything that could escape the key directory is refused.
        """
        self.assertEqual(dkimkeys.checkDomain("Example.ORG."), "example.org")
        self.assertEqual(dkimkeys.checkSelector("Sel-1.2026"), "sel-1.2026")
        for bad in ("localhost", "../etc", "a/b.org", "exa mple.org", "1.2.3.4", ""):
            self.assertRaises(DKIMKeyError, dkimkeys.checkDomain, bad)
        for bad in ("../x", "a/b", "-x", "x-", "", "a..b"):
            self.assertRaises(DKIMKeyError, dkimkeys.checkSelector, bad)


class KeyStoreContract:
    """
    What every L{IDKIMKeyStore} does; C{makeStore} returns a new instance
    on the test's one store (as another node or the command has).
    """

    def makeStore(self) -> IDKIMKeyStore:
        raise NotImplementedError()

    def setUp(self) -> None:
        self.store = self.makeStore()

    def test_interface(self) -> None:
        """
        The store provides L{IDKIMKeyStore}.
        """
        self.assertTrue(verifyObject(IDKIMKeyStore, self.store))

    def test_generateAndPublish(self) -> None:
        """
        A generated key is listed (by every instance) and its public record
        matches its private key.
        """
        record = self.store.generate("Example.org", "s1", "ed25519", created="2026-12-01T00:00:00Z")
        self.assertEqual(record, KeyRecord("example.org", "s1", "ed25519", "2026-12-01T00:00:00Z", True))
        other = self.makeStore()
        self.assertEqual(other.records(), [record])
        key = serialization.load_pem_private_key(other.privateKey(record), None)
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.assertEqual(other.publicRecord(record),
                         ("s1._domainkey.example.org", "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()))

    def test_rotation(self) -> None:
        """
        A second key of the same algorithm is inactive; C{activate} makes it
        the active one and the first inactive (still listed); the active key
        cannot be removed while the other exists, the inactive one can
        (its file goes too).  An Ed25519 key is active beside an RSA one.
        """
        self.store.generate("example.org", "old", "rsa", created="c1")
        self.store.generate("example.org", "new", "rsa", created="c2")
        self.store.generate("example.org", "ed", "ed25519", created="c3")
        self.assertEqual([(r.selector, r.active) for r in self.store.records()], [("old", True), ("new", False), ("ed", True)])
        self.store.activate("example.org", "new")
        self.assertEqual([(r.selector, r.active) for r in self.store.records()], [("old", False), ("new", True), ("ed", True)])
        e = self.assertRaises(DKIMKeyError, self.store.remove, "example.org", "new")
        self.assertEqual(
            str(e), "new is example.org's active rsa key; activate another first (pop3gw dkim activate example.org old)"
        )
        old = self.store.records()[0]
        self.store.remove("example.org", "old")
        self.assertRaises(DKIMKeyError, self.store.privateKey, old)
        self.assertEqual([r.selector for r in self.store.records()], ["new", "ed"])

    def test_refusals(self) -> None:
        """
        A selector already used in the domain, an unknown selector and an
        unknown algorithm are refused with one line each.
        """
        self.store.generate("example.org", "s1", "ed25519")
        e = self.assertRaises(DKIMKeyError, self.store.generate, "example.org", "s1", "ed25519")
        self.assertEqual(str(e), "example.org already has a key with selector s1 (choose another with --selector)")
        e = self.assertRaises(DKIMKeyError, self.store.activate, "example.org", "nope")
        self.assertEqual(str(e), "no key with selector nope for example.org")
        self.assertRaises(DKIMKeyError, self.store.generate, "example.org", "s2", "dsa")


    def test_stampMoves(self) -> None:
        """
        The stamp is the same while nothing changes, and moves with each
        change made through any instance.
        """
        other = self.makeStore()
        before = self.store.stamp()
        self.assertEqual(self.store.stamp(), before)
        other.generate("example.org", "a", "ed25519")
        generated = self.store.stamp()
        self.assertNotEqual(generated, before)
        other.generate("example.org", "b", "ed25519")
        other.activate("example.org", "b")
        self.assertNotEqual(self.store.stamp(), generated)

    def test_keyringFollowsOtherInstance(self) -> None:
        """
        A keyring over one instance signs with the keys generated,
        activated and removed through another, after its next refresh.
        """
        keyring = Keyring(self.store)
        keyring.refresh()
        self.assertIsNone(keyring.keysFor("example.org"))
        other = self.makeStore()
        other.generate("example.org", "a", "ed25519")
        other.generate("example.org", "b", "ed25519")
        keyring.refresh()
        self.assertEqual([k.selector for k in keyring.keysFor("example.org")], ["a"])
        other.activate("example.org", "b")
        other.remove("example.org", "a")
        keyring.refresh()
        self.assertEqual([k.selector for k in keyring.keysFor("example.org")], ["b"])


class KeyStoreTests(KeyStoreContract, SynchronousTestCase):
    def makeStore(self) -> KeyStore:
        return KeyStore(self.dataDir)

    def setUp(self) -> None:
        self.dataDir = self.mktemp()
        os.makedirs(self.dataDir)
        super().setUp()

    def test_generateRSA(self) -> None:
        """
        C{generate} writes a 2048-bit RSA key (PKCS#1 PEM) to
        C{dkim/DOMAIN/SELECTOR.pem}, mode 0600 in 0700 directories, and
        names it active in the index; the public record holds the key's
        SubjectPublicKeyInfo.
        """
        record = self.store.generate("example.org", "s1", "rsa", created="2026-12-01T00:00:00Z")
        self.assertEqual(record, KeyRecord("example.org", "s1", "rsa", "2026-12-01T00:00:00Z", True))
        path = os.path.join(self.dataDir, "dkim", "example.org", "s1.pem")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dataDir, "dkim")).st_mode), 0o700)
        with open(path, "rb") as f:
            pem = f.read()
        self.assertTrue(pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----\n"))
        key = serialization.load_pem_private_key(pem, None)
        self.assertEqual(key.key_size, 2048)
        with open(os.path.join(self.dataDir, "dkim", "keys")) as f:
            self.assertEqual(f.read(), "# domain selector algorithm created active\nexample.org s1 rsa 2026-12-01T00:00:00Z yes\n")
        name, value = self.store.publicRecord(record)
        spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.assertEqual(name, "s1._domainkey.example.org")
        self.assertEqual(value, "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode())

    def test_generateEd25519(self) -> None:
        """
        An Ed25519 key is PKCS#8 PEM; its record holds the raw 32-octet
        public key (RFC 8463); the default selector is C{ed} and the date.
        """
        record = self.store.generate("example.org", None, "ed25519", created="2026-12-01T10:00:00Z")
        self.assertEqual(record.selector, "ed20261201")
        with open(self.store.keyPath("example.org", "ed20261201"), "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.assertEqual(self.store.publicRecord(record)[1], "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode())

class KeyringTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dataDir = self.mktemp()
        os.makedirs(self.dataDir)
        self.store = KeyStore(self.dataDir)
        self.keyring = Keyring(self.dataDir)

    def test_activeKeysLoaded(self) -> None:
        """
        The keyring holds each domain's active keys in the form dkimpy
        signs with (the RSA PEM; the Ed25519 seed in base64), none of the
        inactive ones.
        """
        self.keyring.refresh()
        self.assertEqual(len(self.keyring), 0)
        self.store.generate("example.org", "r", "rsa")
        self.store.generate("example.org", "r2", "rsa")
        self.store.generate("example.org", "e", "ed25519")
        self.keyring.refresh()
        keys = self.keyring.keysFor("Example.org")
        self.assertEqual([(k.domain, k.selector, k.algorithm) for k in keys], [("example.org", "r", "rsa"), ("example.org", "e", "ed25519")])
        self.assertTrue(keys[0].privateKey.startswith(b"-----BEGIN RSA PRIVATE KEY-----"))
        self.assertEqual(len(base64.b64decode(keys[1].privateKey)), 32)
        self.assertIsNone(self.keyring.keysFor("example.net"))

    def test_reloadOnIndexChange(self) -> None:
        """
        A refresh re-reads the keys only when the index changed: a key
        activated by the command is used after the next refresh.
        """
        self.store.generate("example.org", "a", "ed25519")
        self.store.generate("example.org", "b", "ed25519")
        self.keyring.refresh()
        self.assertEqual([k.selector for k in self.keyring.keysFor("example.org")], ["a"])
        self.store.activate("example.org", "b")
        self.keyring.refresh()
        self.assertEqual([k.selector for k in self.keyring.keysFor("example.org")], ["b"])

    def test_keyFileReplacedByHand(self) -> None:
        """
        A key file replaced by hand (the index unchanged) is used after the
        next refresh.
        """
        self.store.generate("example.org", "a", "ed25519")
        self.keyring.refresh()
        first = self.keyring.keysFor("example.org")[0].privateKey
        path = self.store.keyPath("example.org", "a")
        replacement = self.mktemp()
        with open(replacement, "wb") as f:
            f.write(dkimkeys.generatePrivateKey("ed25519"))
        os.rename(replacement, path)
        self.keyring.refresh()
        second = self.keyring.keysFor("example.org")[0].privateKey
        self.assertNotEqual(second, first)
        with open(path, "rb") as f:
            self.assertEqual(second, dkimkeys.signingKeyData("ed25519", f.read()))

    def test_unusableKey(self) -> None:
        """
        An active key whose file is not a key makes the domain a
        L{KeyProblem} naming the file (and logs it once); other domains
        keep their keys.
        """
        self.store.generate("example.org", "a", "ed25519")
        self.store.generate("example.net", "a", "ed25519")
        path = self.store.keyPath("example.org", "a")
        with open(path, "wb") as f:
            f.write(b"garbage")
        events: list = []
        self.keyring.log = Logger(observer=events.append)
        self.keyring.refresh()
        self.keyring.refresh()
        self.assertEqual(self.keyring.keysFor("example.org"), KeyProblem(f"{path} is not a readable ed25519 private key"))
        self.assertEqual(len(self.keyring.keysFor("example.net")), 1)
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                f"dkim: key for example.org unusable: {path} is not a readable ed25519 private key",
                "dkim: signing keys loaded for 2 domain(s)",
            ],
        )


class PostgresKeyStoreTests(KeyStoreContract, SynchronousTestCase):
    """
    The contract over L{pop3gw.pgdkim.PostgresKeyStore}: each instance is
    another node on the same database.
    """

    def makeStore(self):
        from pop3gw.pgdkim import PostgresKeyStore

        return PostgresKeyStore(self.database)

    def setUp(self) -> None:
        from tests.test_pgstore import newDatabase

        self.database = newDatabase(self)
        super().setUp()

    def test_databaseDown(self) -> None:
        """
        With the database unreachable, a refresh keeps the keys the
        keyring has and logs one warning; they are re-read once it answers.
        """
        import tempfile

        from pop3gw.pgdatabase import Database
        from pop3gw.pgdkim import PostgresKeyStore

        self.store.generate("example.org", "a", "ed25519")
        keyring = Keyring(self.store)
        keyring.refresh()
        socketDir = tempfile.mkdtemp(prefix="pop3gw-nopg-")
        self.addCleanup(os.rmdir, socketDir)
        down = Database(f"postgresql:///nothing?host={socketDir}", timeout=0.5)
        self.addCleanup(down.close)
        keyring.store = PostgresKeyStore(down)
        events: list = []
        keyring.log = Logger(observer=events.append)
        keyring.refresh()
        self.assertEqual([k.selector for k in keyring.keysFor("example.org")], ["a"])
        self.assertEqual(len(events), 1)
        self.assertTrue(formatEvent(events[0]).startswith("dkim: cannot read the keys: database unavailable"))
