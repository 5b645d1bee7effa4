"""
Tests for L{pop3gw.users}: the users and aliases files.
"""

from __future__ import annotations

import fcntl
import os
import stat

from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pop3gw import users
from pop3gw.address import Address
from pop3gw.fsutil import Owner
from pop3gw.interfaces import (
    IUserDirectory,
    IUserStore,
    LookupWouldBlock,
    TemporaryFailure,
    UnknownUser,
    UserExists,
)
from pop3gw.users import UsersFile
from tests.test_passwords import ALICE, ARGON2ID, BOB, CAROL, HASH_A, HASH_B, SSHA256_SECRET
from tests.util import OTHER_GID, OTHER_UID, makeTempDirectory, requireRoot, withUmask


def _captureLog(testCase: SynchronousTestCase) -> list:
    """
    Capture L{pop3gw.users}' log events as formatted text.
    """
    events: list = []
    testCase.patch(users, "_log", Logger(observer=events.append))
    return events


class UsersFileContract:
    """
    Reading behaviour shared by L{UsersFile} and
    L{pop3gw.testing.FakeUserDatabase}: subclasses set C{self.db} with users
    alice (L{HASH_A}) and bob (L{HASH_B}), and alias
    C{postmaster@example.org} of alice.
    """

    db: IUserStore

    def test_interface(self) -> None:
        """
        The database provides L{IUserDirectory} and L{IUserStore}.
        """
        self.assertTrue(verifyObject(IUserDirectory, self.db))
        self.assertTrue(verifyObject(IUserStore, self.db))

    def test_lookups(self) -> None:
        """
        C{passwordHash}, C{exists} and C{addresses} report the users.
        """
        self.assertEqual(self.db.passwordHash(ALICE), HASH_A)
        self.assertEqual(self.db.passwordHash(BOB), HASH_B)
        self.assertIsNone(self.db.passwordHash(CAROL))
        self.assertTrue(self.db.snapshot().exists(ALICE))
        self.assertFalse(self.db.snapshot().exists(CAROL))
        self.assertEqual(self.db.snapshot().addresses(), [ALICE, BOB])

    def test_resolveAndOwns(self) -> None:
        """
        C{resolve} maps users to themselves and aliases to their owner;
        C{owns} is true for a user's own address and its aliases only.
        """
        postmaster = Address("postmaster", "example.org")
        self.assertEqual(self.db.snapshot().resolve(ALICE), (ALICE,))
        self.assertEqual(self.db.snapshot().resolve(postmaster), (ALICE,))
        self.assertEqual(self.db.snapshot().resolve(CAROL), ())
        self.assertTrue(self.db.snapshot().owns(ALICE, ALICE))
        self.assertTrue(self.db.snapshot().owns(ALICE, postmaster))
        self.assertFalse(self.db.snapshot().owns(BOB, postmaster))
        self.assertFalse(self.db.snapshot().owns(ALICE, BOB))

    def test_setPasswordAndRemove(self) -> None:
        """
        C{setPassword} creates or updates as asked, refusing to create an
        existing user or update a missing one; C{remove} removes, refusing
        a missing user.
        """
        self.assertRaises(UserExists, self.db.setPassword, ALICE, HASH_B, True)
        self.assertRaises(UnknownUser, self.db.setPassword, CAROL, HASH_B, False)
        self.db.setPassword(CAROL, HASH_A, True)
        self.db.setPassword(ALICE, HASH_B, False)
        self.assertEqual(self.db.passwordHash(CAROL), HASH_A)
        self.assertEqual(self.db.passwordHash(ALICE), HASH_B)
        self.db.remove(BOB)
        self.assertFalse(self.db.snapshot().exists(BOB))
        self.assertRaises(UnknownUser, self.db.remove, BOB)
        self.assertEqual(self.db.snapshot().addresses(), [ALICE, CAROL])


    def test_caseInsensitiveLookups(self) -> None:
        """
        Users and aliases are found whatever the case of the local part,
        and every answer names the user as stored.
        """
        shouting = Address("ALICE", "example.org")
        self.assertEqual(self.db.passwordHash(shouting), HASH_A)
        self.assertEqual(self.db.lookupUser(shouting), (ALICE, HASH_A))
        self.assertEqual(self.db.lookupUser(Address("Bob", "example.org")), (BOB, HASH_B))
        self.assertIsNone(self.db.lookupUser(CAROL))
        try:
            peeked = self.db.peekUser(Address("Alice", "example.org"))
        except LookupWouldBlock:
            # A database backend may never have the answer at hand.
            peeked = self.db.lookupUser(Address("Alice", "example.org"))
        self.assertEqual(peeked, (ALICE, HASH_A))
        self.assertTrue(self.db.snapshot().exists(shouting))
        self.assertEqual(self.db.snapshot().resolve(shouting), (ALICE,))
        self.assertEqual(self.db.snapshot().resolve(Address("PostMaster", "example.org")), (ALICE,))
        self.assertTrue(self.db.snapshot().owns(ALICE, shouting))
        self.assertTrue(self.db.snapshot().owns(ALICE, Address("POSTMASTER", "example.org")))
        self.assertFalse(self.db.snapshot().owns(BOB, shouting))
        self.assertFalse(self.db.snapshot().owns(BOB, Address("Postmaster", "example.org")))
        self.assertEqual(self.db.snapshot().addresses(), [ALICE, BOB])

    def test_caseInsensitiveChanges(self) -> None:
        """
        A user cannot be added again in another case; changing or removing
        a user in another case changes the stored user.
        """
        self.assertRaises(UserExists, self.db.setPassword, Address("Alice", "example.org"), HASH_B, True)
        self.db.setPassword(Address("ALICE", "example.org"), HASH_B, False)
        self.assertEqual(self.db.lookupUser(ALICE), (ALICE, HASH_B))
        self.db.remove(Address("Bob", "example.org"))
        self.assertEqual(self.db.snapshot().addresses(), [ALICE])

    def test_upgradePasswordHash(self) -> None:
        """
        C{upgradePasswordHash} replaces the user's hash only while it is
        still the one the caller verified, and says whether it did.
        """
        upgraded = "{ARGON2ID}" + ARGON2ID
        self.assertFalse(self.db.upgradePasswordHash(ALICE, HASH_B, upgraded))
        self.assertEqual(self.db.passwordHash(ALICE), HASH_A)
        self.assertFalse(self.db.upgradePasswordHash(CAROL, HASH_A, upgraded))
        self.assertTrue(self.db.upgradePasswordHash(Address("Alice", "example.org"), HASH_A, upgraded))
        self.assertEqual(self.db.lookupUser(ALICE), (ALICE, upgraded))
        self.assertEqual(self.db.passwordHash(BOB), HASH_B)


class FakeUserDatabaseContractTests(UsersFileContract, SynchronousTestCase):
    """
    The contract over the in-memory fake.
    """

    def setUp(self) -> None:
        from pop3gw.testing import FakeUserDatabase

        self.db = FakeUserDatabase({ALICE: HASH_A, BOB: HASH_B}, {Address("postmaster", "example.org"): ALICE})


class UsersFileContractTests(UsersFileContract, SynchronousTestCase):
    """
    The contract over L{UsersFile}.
    """

    def setUp(self) -> None:
        directory = makeTempDirectory(self)
        path = os.path.join(directory, "users")
        with open(path, "w") as f:
            f.write(f"alice@example.org:{HASH_A}\nbob@example.org:{HASH_B}\n")
        with open(os.path.join(directory, "aliases"), "w") as f:
            f.write("postmaster@example.org: alice@example.org\n")
        self.db = UsersFile(path, os.path.join(directory, "aliases"))


class UsersFileTests(SynchronousTestCase):
    """
    Tests for L{UsersFile}'s file handling.
    """

    def setUp(self) -> None:
        self.directory = makeTempDirectory(self)
        self.path = os.path.join(self.directory, "users")
        self.aliasesPath = os.path.join(self.directory, "aliases")

    def writeFile(self, path: str, data: bytes) -> None:
        """
        Replace C{path} with C{data} the way an editor or another process
        would (a new inode, so the change is always noticed).
        """
        tmp = path + ".new"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def test_writesNotReadBack(self) -> None:
        """
        A change made through L{UsersFile} (add, password change, removal)
        parses the users file only if it changed since this process last
        read it, and what it wrote is taken as written rather than read
        and parsed back: the snapshot answers for the new contents at once.
        A change made by someone else in between is read, not lost.
        """
        self.writeFile(self.path, b"alice@example.org:" + HASH_A.encode() + b"\n")
        parsed: list = []
        realParse = users.parseUsers

        def parseUsers(data: bytes):
            parsed.append(data)
            return realParse(data)

        self.patch(users, "parseUsers", parseUsers)
        db = UsersFile(self.path)
        del parsed[:]
        db.setPassword(BOB, HASH_B, create=True)
        self.assertEqual(parsed, [])
        self.assertTrue(db.snapshot().exists(BOB))
        self.assertEqual(db.peekUser(BOB), (BOB, HASH_B))
        self.writeFile(self.path, self.read() + b"carol@example.org:" + HASH_A.encode() + b"\n")
        db.setPassword(ALICE, HASH_B, create=False)
        self.assertEqual(len(parsed), 1)
        self.assertEqual(
            self.read(),
            b"alice@example.org:%s\nbob@example.org:%s\ncarol@example.org:%s\n"
            % (HASH_B.encode(), HASH_B.encode(), HASH_A.encode()),
        )
        self.assertTrue(db.snapshot().exists(CAROL))
        del parsed[:]
        db.remove(BOB)
        self.assertEqual(parsed, [])
        self.assertFalse(db.snapshot().exists(BOB))
        self.assertEqual(db.peekUser(ALICE), (ALICE, HASH_B))
        self.assertEqual(UsersFile(self.path).refresh().addresses(), [ALICE, CAROL])

    def test_missingFile(self) -> None:
        """
        A missing users file means no users; a missing aliases file means
        no aliases.
        """
        db = UsersFile(self.path, self.aliasesPath)
        self.assertEqual(db.refresh().addresses(), [])
        self.assertIsNone(db.passwordHash(ALICE))
        self.assertEqual(db.refresh().resolve(ALICE), ())

    def test_passwdFileFormat(self) -> None:
        """
        Fields after the hash are ignored, comments and blank lines are
        skipped, domains are lower-cased and text NFC-normalised, and CRLF
        line ends are accepted.
        """
        self.writeFile(
            self.path,
            b"# users\n"
            b"\n"
            b"   # indented comment\n"
            + f"alice@Example.ORG:{HASH_A}:1000:1000:Alice:/home/alice:/bin/sh:userdb_quota=1G\n".encode()
            + f"bob@example.org:{HASH_B}\r\n".encode()
            + "jose\u0301@example.org:{PLAIN}x\n".encode("utf-8"),
        )
        db = UsersFile(self.path)
        self.assertEqual(db.passwordHash(ALICE), HASH_A)
        self.assertEqual(db.passwordHash(BOB), HASH_B)
        self.assertEqual(db.passwordHash(Address.parse("jos\u00e9@example.org")), "{PLAIN}x")
        self.assertEqual(len(db.refresh().addresses()), 3)

    def test_storedSpelling(self) -> None:
        """
        A user written with capitals is found in any case and answered in
        its stored spelling (which names its maildrop); an alias whose
        target is written in another case resolves to the stored user.
        """
        stored = Address("Alice", "example.org")
        self.writeFile(self.path, f"Alice@example.org:{HASH_A}\n".encode())
        self.writeFile(self.aliasesPath, b"Abuse@example.org: ALICE@example.org\n")
        db = UsersFile(self.path, self.aliasesPath)
        for spelling in ("alice", "Alice", "ALICE"):
            self.assertEqual(db.lookupUser(Address(spelling, "example.org")), (stored, HASH_A))
            self.assertEqual(db.refresh().resolve(Address(spelling, "example.org")), (stored,))
        self.assertEqual(db.refresh().resolve(Address("abuse", "example.org")), (stored,))
        self.assertTrue(db.refresh().owns(stored, Address("ABUSE", "example.org")))
        self.assertEqual(db.refresh().addresses(), [stored])
        db.setPassword(ALICE, HASH_B, False)
        self.assertEqual(self.read(), f"Alice@example.org:{HASH_B}\n".encode())

    def test_caseVariantsInOldFile(self) -> None:
        """
        A file written before lookups ignored case may hold two users that
        differ only in case: each still logs in with its own spelling
        (exact matches win), any other spelling finds the first one in the
        file, and loading it logs one warning naming both lines.
        """
        upper = Address("Alice", "example.org")
        events = _captureLog(self)
        self.writeFile(self.path, f"Alice@example.org:{HASH_A}\nbob@example.org:{HASH_B}\nalice@example.org:{HASH_B}\n".encode())
        db = UsersFile(self.path)
        self.assertEqual(db.lookupUser(upper), (upper, HASH_A))
        self.assertEqual(db.lookupUser(ALICE), (ALICE, HASH_B))
        self.assertEqual(db.lookupUser(Address("ALICE", "example.org")), (upper, HASH_A))
        self.assertTrue(db.refresh().owns(ALICE, ALICE))
        self.assertFalse(db.refresh().owns(ALICE, upper))
        self.assertEqual(db.refresh().addresses(), [upper, ALICE, BOB])
        self.assertEqual(
            [formatEvent(e) for e in events],
            [f"users file {self.path}: lines 1,3 (alice@example.org) differ only in case; "
             "other spellings find line 1"],
        )
        db.remove(ALICE)
        self.assertEqual(self.read(), f"Alice@example.org:{HASH_A}\nbob@example.org:{HASH_B}\n".encode())

    def test_unverifiableSchemesWarned(self) -> None:
        """
        Loading the file logs one warning per user whose hash pop3gw
        cannot verify (plain text, CRAM-MD5, unknown or missing scheme),
        naming the user, the line and the scheme but never the secret; the
        same file is not warned about again until it changes.
        """
        events = _captureLog(self)
        self.writeFile(
            self.path,
            f"alice@example.org:{HASH_A}\n".encode()
            + b"bob@example.org:{PLAIN}sekrit\n"
            + b"carol@example.org:{CRAM-MD5}0123abcd\n"
            + b"dave@example.org:$1$salt$md5cryptsekrit\n"
            + f"erin@example.org:{{SSHA256}}{SSHA256_SECRET}\n".encode(),
        )
        db = UsersFile(self.path)
        texts = [formatEvent(e) for e in events]
        self.assertEqual(
            texts,
            [
                f"users file {self.path} line 2: bob@example.org has password scheme PLAIN, which pop3gw "
                "does not accept; bob@example.org cannot log in until its password is set with "
                "'pop3gw user passwd'",
                f"users file {self.path} line 3: carol@example.org has password scheme CRAM-MD5, which pop3gw "
                "does not accept; carol@example.org cannot log in until its password is set with "
                "'pop3gw user passwd'",
                f"users file {self.path} line 4: dave@example.org has no {{SCHEME}} prefix, which pop3gw "
                "does not accept; dave@example.org cannot log in until its password is set with "
                "'pop3gw user passwd'",
            ],
        )
        self.assertNotIn("sekrit", "".join(texts))
        self.assertEqual(db.unverifiableUsers(), [(BOB, "PLAIN"), (CAROL, "CRAM-MD5"),
                                                  (Address("dave", "example.org"), None)])
        db.refresh()
        db.passwordHash(ALICE)
        self.assertEqual(len(events), 3)
        db.setPassword(BOB, HASH_B, False)
        self.assertEqual(len(events), 3)

    def test_unverifiableWarnedOncePerUser(self) -> None:
        """
        Reloading a changed users file warns only about the users whose
        hash cannot be verified and who are new or whose hash changed;
        the others were warned about when they first appeared.  A case
        variant pair is warned about once too.
        """
        events = _captureLog(self)
        self.writeFile(
            self.path,
            f"alice@example.org:{HASH_A}\n".encode()
            + b"bob@example.org:{PLAIN}sekrit\n"
            + b"carol@example.org:{CRAM-MD5}0123abcd\n"
            + f"Alice@example.org:{HASH_B}\n".encode(),
        )
        db = UsersFile(self.path)
        self.assertEqual(len(events), 3)
        del events[:]
        for _ in range(4):
            # Each rewrite is a reload, like re-hash upgrades at login.
            db.setPassword(ALICE, HASH_B, False)
            db.setPassword(ALICE, HASH_A, False)
        self.assertEqual(events, [])
        db.setPassword(BOB, "{PLAIN}other", False)
        db.setPassword(Address("dave", "example.org"), "{SHA512-CRYPT}*0", True)
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                f"users file {self.path} line 2: bob@example.org has password scheme PLAIN, which pop3gw "
                "does not accept; bob@example.org cannot log in until its password is set with "
                "'pop3gw user passwd'",
                f"users file {self.path} line 5: dave@example.org has a malformed SHA512-CRYPT hash, which "
                "pop3gw does not accept; dave@example.org cannot log in until its password is set with "
                "'pop3gw user passwd'",
            ],
        )

    def test_malformedHashesWarned(self) -> None:
        """
        A hash in a scheme pop3gw verifies but malformed for it is warned
        about at load like an unverifiable scheme, and listed by
        C{unverifiableUsers}.
        """
        events = _captureLog(self)
        self.writeFile(
            self.path,
            f"alice@example.org:{HASH_A}\n".encode()
            + b"bob@example.org:{SSHA512}!!notbase64!!\n"
            + b"carol@example.org:{SSHA256.hex}zz\n",
        )
        db = UsersFile(self.path)
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                f"users file {self.path} line 2: bob@example.org has a malformed SSHA512 hash, which pop3gw "
                "does not accept; bob@example.org cannot log in until its password is set with "
                "'pop3gw user passwd'",
                f"users file {self.path} line 3: carol@example.org has a malformed SSHA256.HEX hash, which pop3gw "
                "does not accept; carol@example.org cannot log in until its password is set with "
                "'pop3gw user passwd'",
            ],
        )
        self.assertEqual(db.unverifiableUsers(), [(BOB, "SSHA512"), (CAROL, "SSHA256.HEX")])

    def test_addUsers(self) -> None:
        """
        C{addUsers} appends several users (with their extra fields) in one
        atomic rewrite, and adds none if any of them exists in any case.
        """
        self.writeFile(self.path, f"# users\nalice@example.org:{HASH_A}\n".encode())
        db = UsersFile(self.path)
        self.assertRaises(UserExists, db.addUsers, [(BOB, HASH_B, ""), (Address("ALICE", "example.org"), HASH_B, "")])
        self.assertEqual(self.read(), f"# users\nalice@example.org:{HASH_A}\n".encode())
        db.addUsers([(BOB, HASH_B, ":1000:1000::/home/bob"), (CAROL, HASH_A, "")])
        self.assertEqual(
            self.read(),
            f"# users\nalice@example.org:{HASH_A}\nbob@example.org:{HASH_B}:1000:1000::/home/bob\n"
            f"carol@example.org:{HASH_A}\n".encode(),
        )
        self.assertEqual(db.refresh().addresses(), [ALICE, BOB, CAROL])
        self.assertRaises(ValueError, db.addUsers, [(Address("dave", "example.org"), "{X}a\nb", "")])
        self.assertRaises(
            UserExists, db.addUsers, [(Address("dave", "example.org"), HASH_A, ""), (Address("Dave", "example.org"), HASH_B, "")]
        )
        self.assertEqual(db.refresh().addresses(), [ALICE, BOB, CAROL])

    def test_malformedLines(self) -> None:
        """
        Malformed lines (no colon, a bad address, bad UTF-8) and duplicate
        addresses are skipped with one warning naming their line numbers
        and never the hash; the first entry of a duplicate wins.
        """
        events = _captureLog(self)
        self.writeFile(
            self.path,
            b"no colon here\n"
            + f"alice@example.org:{HASH_A}\n".encode()
            + f"not an address:{HASH_B}\n".encode()
            + f"alice@example.org:{HASH_B}\n".encode()
            + b"\xff\xfe@example.org:x\n"
            + f"bob@example.org:{HASH_B}\n".encode(),
        )
        db = UsersFile(self.path)
        self.assertEqual(db.refresh().addresses(), [ALICE, BOB])
        self.assertEqual(db.passwordHash(ALICE), HASH_A)
        self.assertEqual(len(events), 1)
        text = formatEvent(events[0])
        self.assertIn("1,3,4,5", text)
        self.assertIn(self.path, text)
        self.assertNotIn("$6$", text)
        self.assertNotIn("$2y$", text)
        # The warning is not repeated on later lookups of the same file.
        db.passwordHash(ALICE)
        db.refresh()
        self.assertEqual(len(events), 1)

    def test_reloadOnChange(self) -> None:
        """
        A change to the users file is seen by the next lookup, without an
        explicit reload.
        """
        self.writeFile(self.path, f"alice@example.org:{HASH_A}\n".encode())
        db = UsersFile(self.path)
        self.assertFalse(db.refresh().exists(BOB))
        self.writeFile(self.path, f"alice@example.org:{HASH_B}\nbob@example.org:{HASH_B}\n".encode())
        self.assertTrue(db.refresh().exists(BOB))
        self.assertEqual(db.passwordHash(ALICE), HASH_B)
        os.unlink(self.path)
        self.assertEqual(db.refresh().addresses(), [])

    def test_snapshotReadsNoFile(self) -> None:
        """
        C{snapshot()} answers from memory: a change to the files is seen
        only once the blocking side re-reads them (C{refresh()}, or a
        C{lookupUser} in the pool), which swaps in a new snapshot.
        """
        self.writeFile(self.path, f"alice@example.org:{HASH_A}\n".encode())
        self.writeFile(self.aliasesPath, b"")
        db = UsersFile(self.path, self.aliasesPath)
        before = db.snapshot()
        self.writeFile(self.path, f"alice@example.org:{HASH_A}\nbob@example.org:{HASH_B}\n".encode())
        self.assertIs(db.snapshot(), before)
        self.assertFalse(db.snapshot().exists(BOB))
        self.assertEqual(db.lookupUser(BOB), (BOB, HASH_B))
        self.assertTrue(db.snapshot().exists(BOB))
        self.writeFile(self.aliasesPath, b"abuse@example.org: bob@example.org\n")
        self.assertEqual(db.snapshot().resolve(Address("abuse", "example.org")), ())
        self.assertEqual(db.refresh().resolve(Address("abuse", "example.org")), (BOB,))
        self.assertEqual(db.snapshot().resolve(Address("abuse", "example.org")), (BOB,))

    def test_peekUserOnlyWhenUnchanged(self) -> None:
        """
        C{peekUser} answers from memory while a C{stat} shows both files as
        they were read, and raises L{LookupWouldBlock} (so the check goes to
        the pool, which re-reads) once either changed: a password changed
        by C{pop3gw user passwd} counts at the next login.
        """
        self.writeFile(self.path, f"alice@example.org:{HASH_A}\n".encode())
        self.writeFile(self.aliasesPath, b"")
        db = UsersFile(self.path, self.aliasesPath)
        self.assertEqual(db.peekUser(ALICE), (ALICE, HASH_A))
        self.writeFile(self.path, f"alice@example.org:{HASH_B}\n".encode())
        self.assertRaises(LookupWouldBlock, db.peekUser, ALICE)
        self.assertEqual(db.lookupUser(ALICE), (ALICE, HASH_B))
        self.assertEqual(db.peekUser(ALICE), (ALICE, HASH_B))
        self.writeFile(self.aliasesPath, b"abuse@example.org: alice@example.org\n")
        self.assertRaises(LookupWouldBlock, db.peekUser, ALICE)
        db.refresh()
        self.assertEqual(db.peekUser(ALICE), (ALICE, HASH_B))

    def test_reloadSameInodeNewSize(self) -> None:
        """
        A file rewritten in place (same inode) is re-read when its size
        changes.
        """
        with open(self.path, "w") as f:
            f.write(f"alice@example.org:{HASH_A}\n")
        db = UsersFile(self.path)
        with open(self.path, "a") as f:
            f.write(f"bob@example.org:{HASH_B}\n")
        db.refresh()
        self.assertEqual(db.refresh().addresses(), [ALICE, BOB])

    def test_failedLoadKeepsContents(self) -> None:
        """
        A users file that cannot be read keeps the previous users and logs
        one error (not one per lookup).
        """
        self.writeFile(self.path, f"alice@example.org:{HASH_A}\n".encode())
        db = UsersFile(self.path)
        events = _captureLog(self)
        os.unlink(self.path)
        os.mkdir(self.path)  # open() now fails with EISDIR
        self.assertEqual(db.passwordHash(ALICE), HASH_A)
        self.assertEqual(db.passwordHash(ALICE), HASH_A)
        self.assertEqual(len(events), 1)
        self.assertIn("keeping the previous contents", formatEvent(events[0]))
        os.rmdir(self.path)

    def test_neverReadableFailsTemporarily(self) -> None:
        """
        A users file that exists but has never been readable is not taken
        for an empty one: construction succeeds and logs one error, every
        lookup raises L{TemporaryFailure} (so mail is deferred, not bounced
        as "unknown user", and C{user list} does not print nothing), and
        L{UsersFile.refresh} raises nothing.  Once readable, it is used.
        """
        os.mkdir(self.path)  # open() fails with EISDIR, as with EACCES
        events = _captureLog(self)
        db = UsersFile(self.path)
        self.assertRaises(TemporaryFailure, db.passwordHash, ALICE)
        self.assertRaises(TemporaryFailure, db.refresh().exists, ALICE)
        self.assertRaises(TemporaryFailure, db.refresh().resolve, ALICE)
        self.assertRaises(TemporaryFailure, db.refresh().addresses)
        db.refresh()
        self.assertEqual(len(events), 1)
        self.assertIn("cannot read users file", formatEvent(events[0]))
        os.rmdir(self.path)
        self.writeFile(self.path, f"alice@example.org:{HASH_A}\n".encode())
        self.assertEqual(db.passwordHash(ALICE), HASH_A)

    def test_neverReadableAliasesFailTemporarily(self) -> None:
        """
        The same holds for an aliases file that has never been readable.
        """
        self.writeFile(self.path, f"alice@example.org:{HASH_A}\n".encode())
        os.mkdir(self.aliasesPath)
        _captureLog(self)
        db = UsersFile(self.path, self.aliasesPath)
        self.assertRaises(TemporaryFailure, db.refresh().resolve, ALICE)

    def test_aliases(self) -> None:
        """
        Aliases resolve to their user, are re-read on change, skip
        malformed lines, and an alias of a missing user resolves to
        L{None}.  A user's own address wins over an alias of the same name.
        """
        events = _captureLog(self)
        self.writeFile(self.path, f"alice@example.org:{HASH_A}\nbob@example.org:{HASH_B}\n".encode())
        self.writeFile(
            self.aliasesPath,
            b"# aliases\n"
            b"abuse@Example.org: alice@example.org\n"
            b"broken line\n"
            b"ghost@example.org: nobody@example.org\n"
            b"bob@example.org: alice@example.org\n",
        )
        db = UsersFile(self.path, self.aliasesPath)
        abuse = Address("abuse", "example.org")
        self.assertEqual(db.refresh().resolve(abuse), (ALICE,))
        self.assertTrue(db.refresh().owns(ALICE, abuse))
        self.assertEqual(db.refresh().resolve(Address("ghost", "example.org")), ())
        self.assertEqual(db.refresh().resolve(BOB), (BOB,))
        self.assertFalse(db.refresh().owns(ALICE, BOB))
        self.assertFalse(db.refresh().exists(abuse))
        self.assertEqual(len(events), 1)
        self.assertIn("line(s) 3", formatEvent(events[0]))
        self.writeFile(self.aliasesPath, b"abuse@example.org: bob@example.org\n")
        self.assertEqual(db.refresh().resolve(abuse), (BOB,))
        self.assertFalse(db.refresh().owns(ALICE, abuse))

    def test_createFile(self) -> None:
        """
        C{setPassword} creates a missing users file with mode 0600 and one
        C{address:hash} line.
        """
        db = UsersFile(self.path)
        db.setPassword(ALICE, HASH_A, True)
        self.assertEqual(self.read(), f"alice@example.org:{HASH_A}\n".encode())
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(db.passwordHash(ALICE), HASH_A)

    def test_rewritePreserves(self) -> None:
        """
        Rewrites keep comments, blank lines, malformed lines, the address as
        written and the fields after the hash; removal drops only the
        user's line.
        """
        original = (
            b"# header\n"
            b"\n"
            + f"alice@Example.org:{HASH_A}:1000:1000::/home/alice\n".encode()
            + b"garbage\n"
            + f"bob@example.org:{HASH_B}\n".encode()
        )
        self.writeFile(self.path, original)
        _captureLog(self)
        db = UsersFile(self.path)
        db.setPassword(ALICE, HASH_B, False)
        self.assertEqual(
            self.read(),
            b"# header\n"
            b"\n"
            + f"alice@Example.org:{HASH_B}:1000:1000::/home/alice\n".encode()
            + b"garbage\n"
            + f"bob@example.org:{HASH_B}\n".encode(),
        )
        db.remove(ALICE)
        db.setPassword(CAROL, HASH_A, True)
        self.assertEqual(
            self.read(),
            b"# header\n\ngarbage\n" + f"bob@example.org:{HASH_B}\ncarol@example.org:{HASH_A}\n".encode(),
        )

    def test_badHashRefused(self) -> None:
        """
        C{setPassword} refuses a hash that could corrupt the file or is not
        in C{{SCHEME}} form, and writes nothing.
        """
        db = UsersFile(self.path)
        for bad in ["{X}a:b", "{X}a\nbob@example.org:{PLAIN}x", "plain", "{X}a\r"]:
            self.assertRaises(ValueError, db.setPassword, ALICE, bad, True)
        self.assertFalse(os.path.exists(self.path))

    def test_crashDuringReplace(self) -> None:
        """
        If the rename fails (a crash), the old file is intact, no temporary
        file remains, and the error propagates.
        """
        original = f"alice@example.org:{HASH_A}\n".encode()
        self.writeFile(self.path, original)
        db = UsersFile(self.path)

        def crash(src: str, dst: str) -> None:
            raise OSError(5, "simulated crash")

        self.patch(db, "_replace", crash)
        self.assertRaises(OSError, db.setPassword, BOB, HASH_B, True)
        self.assertRaises(OSError, db.remove, ALICE)
        self.assertEqual(self.read(), original)
        self.assertEqual(sorted(os.listdir(self.directory)), ["users", "users.lock"])
        self.assertEqual(db.refresh().addresses(), [ALICE])

    def test_writeHoldsLock(self) -> None:
        """
        The read-modify-write runs under an exclusive lock on the sidecar
        C{users.lock} file, which another writer cannot take meanwhile.
        """
        db = UsersFile(self.path)
        self.assertEqual(db.lockPath, os.path.join(self.directory, "users.lock"))
        seen = []

        def replace(src: str, dst: str) -> None:
            fd = os.open(db.lockPath, os.O_RDWR)
            try:
                self.assertRaises(BlockingIOError, fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
            seen.append(dst)
            os.replace(src, dst)

        self.patch(db, "_replace", replace)
        db.setPassword(ALICE, HASH_A, True)
        self.assertEqual(seen, [self.path])
        # Released afterwards.
        fd = os.open(db.lockPath, os.O_RDWR)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def test_concurrentWritersKeepBothUpdates(self) -> None:
        """
        Two writers with stale views (two C{pop3gw user add} processes)
        each re-read the file under the lock, so neither loses the other's
        update.
        """
        first = UsersFile(self.path)
        second = UsersFile(self.path)
        first.setPassword(ALICE, HASH_A, True)
        second.setPassword(BOB, HASH_B, True)
        self.assertRaises(UserExists, second.setPassword, ALICE, HASH_B, True)
        self.assertEqual(first.refresh().addresses(), [ALICE, BOB])
        self.assertEqual(
            self.read(), f"alice@example.org:{HASH_A}\nbob@example.org:{HASH_B}\n".encode()
        )


class UsersFileModesAndOwnerTests(SynchronousTestCase):
    """
    The users file and its lock are private whatever the umask, and keep
    the data directory's owner.
    """

    HASH = "{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA"

    def setUp(self) -> None:
        self.directory = makeTempDirectory(self)
        self.path = os.path.join(self.directory, "users")

    def test_modesWhateverUmask(self) -> None:
        """
        Under umask 277 and 000 the users file and C{users.lock} are
        created 0600.
        """
        for mask in (0o277, 0o000):
            for name in ("users", "users.lock"):
                _unlinkIfThere(os.path.join(self.directory, name))
            withUmask(self, mask)
            UsersFile(self.path).setPassword(ALICE, self.HASH, True)
            for name in ("users", "users.lock"):
                mode = stat.S_IMODE(os.stat(os.path.join(self.directory, name)).st_mode)
                self.assertEqual(mode, 0o600, (oct(mask), name))

    def test_ownerGivenAndKept(self) -> None:
        """
        Run as root with the data directory's owner, a new users file and
        lock file belong to that owner, and a rewrite keeps whatever owner
        the file had.
        """
        requireRoot(self)
        db = UsersFile(self.path, owner=Owner(OTHER_UID, OTHER_GID))
        db.setPassword(ALICE, self.HASH, True)
        for name in ("users", "users.lock"):
            st = os.stat(os.path.join(self.directory, name))
            self.assertEqual((st.st_uid, st.st_gid), (OTHER_UID, OTHER_GID), name)
        os.chown(self.path, OTHER_UID + 2, OTHER_GID + 2)
        db.remove(ALICE)
        st = os.stat(self.path)
        self.assertEqual((st.st_uid, st.st_gid), (OTHER_UID + 2, OTHER_GID + 2))


def _unlinkIfThere(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


class AliasesParsingTests(SynchronousTestCase):
    """
    Tests for L{pop3gw.passwdfile.parseAliases}.
    """

    def test_goodLines(self) -> None:
        """
        One target, several targets separated by commas (each once, in
        order), and C{@domain} catch-all lines are parsed; comments and
        blank lines are skipped; CRLF line ends are accepted.
        """
        from pop3gw.passwdfile import parseAliases

        aliases, catchAll, bad = parseAliases(
            b"# lists\n\n"
            b"abuse@example.org: alice@example.org\r\n"
            b"team@example.org:alice@example.org ,bob@example.org,  alice@example.org\n"
            b"@Example.ORG: carol@example.org\n"
        )
        self.assertEqual(bad, [])
        self.assertEqual(
            aliases.entries,
            {
                Address("abuse", "example.org"): (ALICE,),
                Address("team", "example.org"): (ALICE, BOB),
            },
        )
        self.assertEqual(catchAll, {"example.org": (CAROL,)})

    def test_malformedLines(self) -> None:
        """
        Lines without a colon, with a bad alias or a bad or empty target,
        in bad UTF-8, or defining an alias or a catch-all again are
        reported by 1-based line number and ignored; the others are kept.
        """
        from pop3gw.passwdfile import parseAliases, parseAliasLine

        aliases, catchAll, bad = parseAliases(
            b"ok@example.org: alice@example.org\n"
            b"no colon here\n"
            b"bad..alias@example.org: alice@example.org\n"
            b"x@example.org: alice@example.org,\n"
            b"y@example.org:\n"
            b"\xff@example.org: alice@example.org\n"
            b"ok@example.org: bob@example.org\n"
            b"@example.org: alice@example.org\n"
            b"@example.org: bob@example.org\n"
            b"@: bob@example.org\n"
        )
        self.assertEqual(bad, [2, 3, 4, 5, 6, 7, 9, 10])
        self.assertEqual(aliases.entries, {Address("ok", "example.org"): (ALICE,)})
        self.assertEqual(catchAll, {"example.org": (ALICE,)})
        self.assertEqual(parseAliasLine(b"x@example.org: alice@example.org,").problem, "target '' is not an address")

    def test_loggedOnceWithLineNumber(self) -> None:
        """
        The server logs a malformed aliases line with its number once per
        change of the file, not at every refresh, and resolves the rest.
        """
        events = _captureLog(self)
        directory = makeTempDirectory(self)
        usersPath, aliasesPath = os.path.join(directory, "users"), os.path.join(directory, "aliases")
        with open(usersPath, "w") as f:
            f.write(f"alice@example.org:{HASH_A}\n")
        with open(aliasesPath, "w") as f:
            f.write("team@example.org: alice@example.org\nteam2@example.org alice@example.org\n")
        db = UsersFile(usersPath, aliasesPath)
        for _ in range(3):
            self.assertEqual(db.refresh().resolve(Address("team", "example.org")), (ALICE,))
        self.assertEqual(
            [formatEvent(e) for e in events],
            [f"aliases file {aliasesPath}: ignored malformed or duplicate line(s) 2"],
        )

    def test_reloadCatchAllAndPostmaster(self) -> None:
        """
        A catch-all added to the aliases file is used after the next
        refresh without a restart; the postmaster and delimiter given to
        L{UsersFile} apply to every snapshot.
        """
        directory = makeTempDirectory(self)
        usersPath, aliasesPath = os.path.join(directory, "users"), os.path.join(directory, "aliases")
        with open(usersPath, "w") as f:
            f.write(f"alice@example.org:{HASH_A}\nbob@example.org:{HASH_B}\n")
        db = UsersFile(usersPath, aliasesPath, postmaster=BOB, delimiter="-")
        anyone = Address("anyone", "example.org")
        self.assertEqual(db.refresh().resolve(anyone), ())
        self.assertEqual(db.refresh().resolve(Address("postmaster", "example.org")), (BOB,))
        self.assertEqual(db.refresh().resolve(Address("alice-x", "example.org")), (ALICE,))
        self.assertEqual(db.refresh().resolve(Address("alice+x", "example.org")), ())
        with open(aliasesPath + ".new", "w") as f:
            f.write("@example.org: alice@example.org\n")
        os.replace(aliasesPath + ".new", aliasesPath)
        self.assertEqual(db.refresh().resolve(anyone), (ALICE,))
        self.assertEqual(db.snapshot().resolve(Address("alice+x", "example.org")), (ALICE,))
