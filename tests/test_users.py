"""
Tests for L{pop3gw.users}: password schemes and the users/aliases files.
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
from pop3gw.interfaces import IUserDatabase, TemporaryFailure, UnknownUser, UserExists
from pop3gw.users import UsersFile, hashPassword, sha256Crypt, sha512Crypt, verifyPassword
from pop3gw.fsutil import Owner
from tests.util import OTHER_GID, OTHER_UID, makeTempDirectory, requireRoot, withUmask

ALICE = Address("alice", "example.org")
BOB = Address("bob", "example.org")
CAROL = Address("carol", "example.org")

# sha512-crypt vectors.  The first two are from Ulrich Drepper's
# specification; the rest were made with glibc's crypt(3) (Python 3.11's
# crypt module) and "openssl passwd -6" when this module was written.
SHA512_VECTORS = [
    (b"Hello world!", b"saltstring", None,
     "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"),
    (b"the minimum number is still observed", b"roundstoolow", 10,
     "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaTfF4ZEQpyUNGc0dqbpBYYBaHHrsX."),
    (b"pw", b"salt", 5000,
     "$6$rounds=5000$salt$AkOOBO38SQQ8T8Q46KuCONe.8zg41nvCDKDq7pVQd2n2hy8sf8aR3G89VY.57up0eSIa/69odCCcLT4hx7FpW/"),
    (b"password", b"saltsalt", None,
     "$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/"),
    (b"correct horse", b"abcdefghijklmnopqrstuvwxyz", 1000,
     "$6$rounds=1000$abcdefghijklmnop$K9ViLilDpRy6xLunKXsaoeGhKInKdDtpCLyoTSCkDcguT34R9cMK08/eq3hGwOWWgyYCTwWqVmKpFAHjf73Mv/"),
    ("p\u00e4ssw\u00f6rd".encode("utf-8"), b"NaCl", 10000,
     "$6$rounds=10000$NaCl$c2yKH1jhhR4NTnYCQwTphdUqMEi.G.vXd2dorMQgnTWW0HmCOdIW.SqlIDW3E/UCuebIvMDwBz.bxP1N5DtpG."),
    (b"x" * 100, b"long", 1000,
     "$6$rounds=1000$long$UKr4Zfo/ioVs7ChCCo/HpRNwy62wUYJzMfjfnrhaNuuZ4jcEz7UOrqYs2abMMxSoAb/SK9FT8jLnsLoRPJVBg."),
    (b"pw", b"", 1000,
     "$6$rounds=1000$$Ww46dvdmbJa51Tn2FjNpXolxguszXFYv9Rxe3VazHhtMSHfmYDtk1WRGASHU.A.aIG6LLP4iqYBXgPIOSQrGS0"),
    (b"", b"salt", 1000,
     "$6$rounds=1000$salt$8.6rbmbp5x0d6GHKoit3wSooHPfMEY9cwCpDMr6.bC46HXi1Eqr7xqKZ9RPwaFW/eCyoUBBNRq1xG/f612CuH0"),
]

# sha256-crypt vectors: the first two are from Ulrich Drepper's
# specification; all were checked with "openssl passwd -5 -salt SALT PW"
# (with "rounds=N$SALT" as the salt for a rounds field).
SHA256_VECTORS = [
    (b"Hello world!", b"saltstring", None, "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    (b"Hello world!", b"saltstringsaltstring", 10000,
     "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA"),
    (b"the minimum number is still observed", b"roundstoolow", 10,
     "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC"),
    (b"password", b"saltsalt", None, "$5$saltsalt$gOjOtoMpVhru2uyjeJSEc/JaLQWOXMNmlOnj6T4AtC."),
    (b"correct horse", b"abcdefghijklmnopqrstuvwxyz", 1000,
     "$5$rounds=1000$abcdefghijklmnop$sMH/aXVPoABuMIam8Brfej2trWzGTpr5d2WuYZNwEmA"),
    ("p\u00e4ssw\u00f6rd".encode("utf-8"), b"NaCl", None, "$5$NaCl$pWaJIHze1zdvnnRmpvrtTMk/LWEA0bwZKGyKZ/xpU18"),
    (b"x" * 100, b"long", None, "$5$long$wpi./ia8pC0K3oNxjvO9k3LLIpskESSREW7vw8zHBb6"),
]

# Dovecot's salted SHA-2: base64(digest(password + salt) + salt), checked
# with "openssl dgst -sha256/-sha512 -binary" over password + salt.
SSHA256_SECRET = "pBFKVQdg8aaZi2INYzmnxxLtStvyMgIOC7TahNLLqCIBAgME"  # secret, salt 01020304
SSHA256_SECRET_HEX = "a4114a550760f1a6998b620d6339a7c712ed4adbf232020e0bb4da84d2cba82201020304"
SSHA512_SECRET = (
    "MKbQg3rPvz03V+1S0+/jlDdn0B0IiGGxl7kZMimdo1IHHWN6DtzxJMCchsX5U1lrRY7apW/oopOgERexYda1nAECAwQ="
)
SSHA512_PASS = "kK3BP/20I0UJ6Mr9XSdQnrgNZbMXUvGLxh2qHoRz6HUfRqbHZ23m926mL2Ga33/fZtWMaQo1wB6KyFtI8uexcU5hQ2xOYUNs"

# bcrypt hashes made with the bcrypt library; the $2y$ one (the htpasswd -B
# and PHP prefix) is the $2b$ one renamed, which is the same algorithm.
BCRYPT_2B = "$2b$05$abcdefghijklmnopqrstuuoXuKqgZXLiJqzfmMXDDhSFPIvxV7t8."  # hunter2
BCRYPT_2Y = "$2y$05$abcdefghijklmnopqrstuuoXuKqgZXLiJqzfmMXDDhSFPIvxV7t8."
BCRYPT_2A = "$2a$05$abcdefghijklmnopqrstuuoXuKqgZXLiJqzfmMXDDhSFPIvxV7t8."
BCRYPT_72Y = "$2b$04$abcdefghijklmnopqrstuuwurWIdVVT4m5pTArtqnFNM69nySdHj."  # "y" * 72

ARGON2I = "$argon2i$v=19$m=1024,t=1,p=4$pStRx7+MdHrJq/Ch+T7U6g$qY13zQcQP0LE1oRU7gJ7YZvCjylEGRRMTlMCj8ilswI"  # argon-i
ARGON2ID = "$argon2id$v=19$m=1024,t=1,p=4$wbTEbHydu7HcZaNwzkiVHA$7CrNG+vZe1flSHcWu+qUm4Xo28rUV+si7q2N50Dk8u0"  # argon-id

HASH_A = "{SHA512-CRYPT}" + SHA512_VECTORS[3][3]  # password
HASH_B = "{BLF-CRYPT}" + BCRYPT_2Y  # hunter2


class Sha512CryptTests(SynchronousTestCase):
    """
    Tests for the pure-Python sha512-crypt.
    """

    def test_vectors(self) -> None:
        """
        L{sha512Crypt} reproduces the specification's and glibc's outputs,
        including the default rounds (no C{rounds=} field), clamping of low
        rounds to 1000, salt truncation to 16 characters, empty salts and
        passwords, non-ASCII and long passwords.
        """
        for password, salt, rounds, expected in SHA512_VECTORS:
            self.assertEqual(sha512Crypt(password, salt, rounds), expected)

    def test_verify(self) -> None:
        """
        C{{SHA512-CRYPT}} hashes verify with the right password only, with
        the scheme name in any case.
        """
        for password, _salt, _rounds, hashed in SHA512_VECTORS:
            self.assertTrue(verifyPassword("{SHA512-CRYPT}" + hashed, password.decode("utf-8")))
            self.assertFalse(verifyPassword("{SHA512-CRYPT}" + hashed, password.decode("utf-8") + "x"))
        self.assertTrue(verifyPassword("{sha512-crypt}" + SHA512_VECTORS[3][3], "password"))

    def test_verifyUnclampedRoundsField(self) -> None:
        """
        A stored hash whose C{rounds=} is below the minimum verifies like
        glibc does: computed with the minimum, comparing only the hash.
        """
        hashed = SHA512_VECTORS[1][3].replace("rounds=1000", "rounds=10")
        self.assertTrue(verifyPassword("{SHA512-CRYPT}" + hashed, "the minimum number is still observed"))

    def test_malformed(self) -> None:
        """
        Malformed sha512-crypt strings give C{False}, not an exception.
        """
        good = SHA512_VECTORS[2][3]
        for bad in [
            "",
            "$5$salt$" + good[-86:],
            "$6$salt",
            "$6$salt$" + good[-86:-1],
            "$6$salt$" + good[-86:] + "x",
            "$6$salt$" + good[-86:-1] + "!",
            "$6$rounds=x$salt$" + good[-86:],
            "$6$rounds=-5$salt$" + good[-86:],
            "$6$rounds=99999999999999$salt$" + good[-86:],
            "$6$a$b$c$" + good[-86:],
            "$6$s\u00e4lt$" + good[-86:],
        ]:
            self.assertFalse(verifyPassword("{SHA512-CRYPT}" + bad, "pw"), bad)


class Sha256CryptTests(SynchronousTestCase):
    """
    Tests for sha256-crypt, the same implementation as sha512-crypt with
    the other digest.
    """

    def test_vectors(self) -> None:
        """
        L{sha256Crypt} reproduces the specification's and OpenSSL's
        outputs: default and explicit rounds, clamping, salt truncation,
        non-ASCII and long passwords.
        """
        for password, salt, rounds, expected in SHA256_VECTORS:
            self.assertEqual(sha256Crypt(password, salt, rounds), expected)

    def test_verify(self) -> None:
        """
        C{{SHA256-CRYPT}} hashes verify with the right password only, with
        the scheme name in any case; a C{$6$} hash under the C{SHA256-CRYPT}
        name (or the reverse) does not.
        """
        for password, _salt, _rounds, hashed in SHA256_VECTORS:
            self.assertTrue(verifyPassword("{SHA256-CRYPT}" + hashed, password.decode("utf-8")))
            self.assertFalse(verifyPassword("{SHA256-CRYPT}" + hashed, password.decode("utf-8") + "x"))
        self.assertTrue(verifyPassword("{sha256-crypt}" + SHA256_VECTORS[3][3], "password"))
        self.assertFalse(verifyPassword("{SHA256-CRYPT}" + SHA512_VECTORS[3][3], "password"))
        self.assertFalse(verifyPassword("{SHA512-CRYPT}" + SHA256_VECTORS[3][3], "password"))

    def test_malformed(self) -> None:
        """
        Malformed sha256-crypt strings give C{False}, not an exception.
        """
        good = SHA256_VECTORS[3][3][-43:]
        for bad in ["", "$5$salt", "$5$salt$" + good[:-1], "$5$salt$" + good + "x", "$5$salt$" + good[:-1] + "!",
                    "$5$rounds=x$salt$" + good, "$5$a$b$c$" + good]:
            self.assertFalse(verifyPassword("{SHA256-CRYPT}" + bad, "password"), bad)


class SaltedSha2Tests(SynchronousTestCase):
    """
    Tests for Dovecot's C{{SSHA256}} and C{{SSHA512}}.
    """

    def test_verify(self) -> None:
        """
        Base64 (the default, or C{.B64}/C{.BASE64}) and C{.HEX} encodings
        verify with the right password only; the password is UTF-8.
        """
        for stored in ["{SSHA256}" + SSHA256_SECRET, "{ssha256.b64}" + SSHA256_SECRET,
                       "{SSHA256.HEX}" + SSHA256_SECRET_HEX, "{SSHA512}" + SSHA512_SECRET,
                       "{SSHA512.BASE64}" + SSHA512_SECRET]:
            self.assertTrue(verifyPassword(stored, "secret"), stored)
            self.assertFalse(verifyPassword(stored, "secreT"), stored)
        self.assertTrue(verifyPassword("{SSHA512}" + SSHA512_PASS, "p\u00e4ss"))

    def test_malformed(self) -> None:
        """
        Bad base64 or hex, no salt, or the other digest's scheme give
        C{False}.
        """
        import base64

        digestOnly = base64.b64encode(base64.b64decode(SSHA256_SECRET)[:32]).decode()
        for stored in ["{SSHA256}", "{SSHA256}!!!!" + SSHA256_SECRET, "{SSHA256}" + SSHA256_SECRET[:-1],
                       "{SSHA256}" + digestOnly, "{SSHA256.HEX}" + SSHA256_SECRET, "{SSHA256}" + SSHA256_SECRET_HEX,
                       "{SSHA512}" + SSHA256_SECRET, "{SSHA256}" + SSHA512_SECRET, "{SSHA256.XX}" + SSHA256_SECRET]:
            self.assertFalse(verifyPassword(stored, "secret"), stored)


class SchemeTests(SynchronousTestCase):
    """
    Tests for the scheme helpers the checker and C{user import} use.
    """

    def test_canVerify(self) -> None:
        """
        L{users.canVerify} is true exactly for the schemes
        L{verifyPassword} can check.
        """
        for stored in ["{ARGON2ID}x", "{argon2i}x", "{BLF-CRYPT}x", "{SHA256-CRYPT}x", "{SHA512-CRYPT}x",
                       "{SSHA256}x", "{SSHA512.HEX}x"]:
            self.assertTrue(users.canVerify(stored), stored)
        for stored in ["{PLAIN}x", "{CRAM-MD5}x", "{CLEARTEXT}x", "{MD5-CRYPT}x", "{SSHA}x", "{SHA256}x", "x", ""]:
            self.assertFalse(users.canVerify(stored), stored)

    def test_plainPassword(self) -> None:
        """
        L{users.plainPassword} decodes Dovecot's plain-text schemes and
        their encodings, and nothing else.
        """
        self.assertEqual(users.plainPassword("{PLAIN}two words:x"), "two words:x")
        self.assertEqual(users.plainPassword("{clear}p\u00e4ss"), "p\u00e4ss")
        self.assertEqual(users.plainPassword("{CLEARTEXT}pw"), "pw")
        self.assertEqual(users.plainPassword("{PLAIN.B64}c2VjcmV0"), "secret")
        self.assertEqual(users.plainPassword("{PLAIN.HEX}736563726574"), "secret")
        for stored in ["{PLAIN.B64}!!", "{PLAIN.HEX}zz", "{PLAIN.B64}/w==", "{CRAM-MD5}abc", "{SSHA256}x", "pw"]:
            self.assertIsNone(users.plainPassword(stored), stored)

    def test_upgradedHash(self) -> None:
        """
        L{users.upgradedHash} gives an Argon2id hash of the password for
        every verifiable scheme but Argon2, and L{None} otherwise.
        """
        for stored in ["{SHA256-CRYPT}" + SHA256_VECTORS[3][3], HASH_A, HASH_B, "{SSHA256}" + SSHA256_SECRET]:
            upgraded = users.upgradedHash(stored, b"pw")
            self.assertTrue(upgraded.startswith("{ARGON2ID}$argon2id$"), stored)
            self.assertTrue(verifyPassword(upgraded, "pw"))
        for stored in ["{ARGON2ID}" + ARGON2ID, "{ARGON2I}" + ARGON2I, "{PLAIN}pw", "{CRAM-MD5}x", "pw"]:
            self.assertIsNone(users.upgradedHash(stored, b"pw"), stored)


class BcryptTests(SynchronousTestCase):
    """
    Tests for C{{BLF-CRYPT}}.
    """

    def test_prefixes(self) -> None:
        """
        C{$2y$}, C{$2b$} and C{$2a$} hashes verify with the right password
        only.
        """
        for hashed in [BCRYPT_2Y, BCRYPT_2B, BCRYPT_2A]:
            self.assertTrue(verifyPassword("{BLF-CRYPT}" + hashed, "hunter2"), hashed)
            self.assertFalse(verifyPassword("{BLF-CRYPT}" + hashed, "hunter3"), hashed)

    def test_longPassword(self) -> None:
        """
        Like the tools that make bcrypt hashes, only the first 72 bytes of
        the password count; a longer password does not raise.
        """
        self.assertTrue(verifyPassword("{BLF-CRYPT}" + BCRYPT_72Y, "y" * 72))
        self.assertTrue(verifyPassword("{BLF-CRYPT}" + BCRYPT_72Y, "y" * 80))
        self.assertFalse(verifyPassword("{BLF-CRYPT}" + BCRYPT_72Y, "y" * 71))

    def test_malformed(self) -> None:
        """
        Malformed or foreign bcrypt strings give C{False}.
        """
        for bad in ["", "$2x$05$abc", "$2b$05$short", "$2b$99$" + BCRYPT_2B[7:], BCRYPT_2B[:-5]]:
            self.assertFalse(verifyPassword("{BLF-CRYPT}" + bad, "hunter2"), bad)


class Argon2Tests(SynchronousTestCase):
    """
    Tests for L{hashPassword} and the Argon2 schemes.
    """

    def test_hashPassword(self) -> None:
        """
        L{hashPassword} makes an C{{ARGON2ID}} hash with the module's
        parameters, salted (two hashes differ), which verifies.
        """
        hashed = hashPassword("s\u00e9cret")
        prefix = "{ARGON2ID}$argon2id$v=19$m=%d,t=%d,p=%d$" % (
            users.ARGON2_MEMORY_COST,
            users.ARGON2_TIME_COST,
            users.ARGON2_PARALLELISM,
        )
        self.assertTrue(hashed.startswith(prefix), hashed)
        self.assertNotEqual(hashed, hashPassword("s\u00e9cret"))
        self.assertTrue(verifyPassword(hashed, "s\u00e9cret"))
        self.assertTrue(verifyPassword(hashed, "s\u00e9cret".encode("utf-8")))
        self.assertFalse(verifyPassword(hashed, "secret"))

    def test_schemes(self) -> None:
        """
        C{{ARGON2ID}} and C{{ARGON2I}} hashes from elsewhere verify; a
        scheme that does not match the hash's type gives C{False}.
        """
        self.assertTrue(verifyPassword("{ARGON2ID}" + ARGON2ID, "argon-id"))
        self.assertFalse(verifyPassword("{ARGON2ID}" + ARGON2ID, "argon-i"))
        self.assertTrue(verifyPassword("{ARGON2I}" + ARGON2I, "argon-i"))
        self.assertFalse(verifyPassword("{ARGON2I}" + ARGON2I, "argon-id"))
        self.assertFalse(verifyPassword("{ARGON2I}" + ARGON2ID, "argon-id"))
        self.assertFalse(verifyPassword("{ARGON2ID}" + ARGON2I, "argon-i"))

    def test_malformed(self) -> None:
        """
        Malformed Argon2 strings give C{False}.
        """
        for bad in ["", "$argon2id$", "$argon2id$v=19$m=x,t=1,p=1$aaaa$bbbb", ARGON2ID[:-3] + "!!!"]:
            self.assertFalse(verifyPassword("{ARGON2ID}" + bad, "argon-id"), bad)

    def test_dummyHash(self) -> None:
        """
        C{DUMMY_HASH} is one valid C{{ARGON2ID}} hash, made once, that
        ordinary passwords do not match.
        """
        self.assertTrue(users.DUMMY_HASH.startswith("{ARGON2ID}$argon2id$"))
        self.assertIs(users.DUMMY_HASH, users.DUMMY_HASH)
        self.assertIs(users.dummyHash(), users.DUMMY_HASH)
        self.assertFalse(verifyPassword(users.DUMMY_HASH, ""))
        self.assertRaises(AttributeError, getattr, users, "NO_SUCH_NAME")

    def test_dummyHashOncePerProcess(self) -> None:
        """
        Pool threads asking for the dummy hash at the same time all get the
        same one.
        """
        import threading

        fresh = users._DummyHash()
        results: list = []
        threads = [threading.Thread(target=lambda: results.append(fresh())) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(results), 4)
        self.assertEqual(len(set(results)), 1)


class VerifyPasswordTests(SynchronousTestCase):
    """
    Tests for L{verifyPassword}'s scheme handling.
    """

    def test_unknownOrMissingScheme(self) -> None:
        """
        Unknown schemes, plain text, a missing C{}} and non-text hashes give
        C{False}, even when the text after the scheme would match.
        """
        for stored in [
            "{PLAIN}pw",
            "{CRYPT}" + SHA512_VECTORS[2][3],
            SHA512_VECTORS[2][3],
            "{SHA512-CRYPT" + SHA512_VECTORS[2][3],
            "pw",
            "",
            None,
            b"{PLAIN}pw",
        ]:
            self.assertFalse(verifyPassword(stored, "pw"), stored)

    def test_overlongPassword(self) -> None:
        """
        A password longer than C{MAX_PASSWORD_BYTES} never matches (and is
        not hashed), even when it would.
        """
        limit = users.MAX_PASSWORD_BYTES
        longPassword = "p" * (limit + 1)
        hashed = "{SHA512-CRYPT}" + sha512Crypt(longPassword.encode("ascii"), b"salt", 1000)
        self.assertFalse(verifyPassword(hashed, longPassword))
        hashed = "{SHA512-CRYPT}" + sha512Crypt(longPassword[:-1].encode("ascii"), b"salt", 1000)
        self.assertTrue(verifyPassword(hashed, longPassword[:-1]))

    def test_unencodablePassword(self) -> None:
        """
        A password that is not encodable as UTF-8 (a lone surrogate) gives
        C{False}.
        """
        self.assertFalse(verifyPassword("{SHA512-CRYPT}" + SHA512_VECTORS[2][3], "\ud800"))
        self.assertFalse(verifyPassword("{BLF-CRYPT}" + BCRYPT_2B, "\ud800"))


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

    db: IUserDatabase

    def test_interface(self) -> None:
        """
        The database provides L{IUserDatabase}.
        """
        self.assertTrue(verifyObject(IUserDatabase, self.db))

    def test_lookups(self) -> None:
        """
        C{passwordHash}, C{exists} and C{addresses} report the users.
        """
        self.assertEqual(self.db.passwordHash(ALICE), HASH_A)
        self.assertEqual(self.db.passwordHash(BOB), HASH_B)
        self.assertIsNone(self.db.passwordHash(CAROL))
        self.assertTrue(self.db.exists(ALICE))
        self.assertFalse(self.db.exists(CAROL))
        self.assertEqual(self.db.addresses(), [ALICE, BOB])

    def test_resolveAndOwns(self) -> None:
        """
        C{resolve} maps users to themselves and aliases to their owner;
        C{owns} is true for a user's own address and its aliases only.
        """
        postmaster = Address("postmaster", "example.org")
        self.assertEqual(self.db.resolve(ALICE), ALICE)
        self.assertEqual(self.db.resolve(postmaster), ALICE)
        self.assertIsNone(self.db.resolve(CAROL))
        self.assertTrue(self.db.owns(ALICE, ALICE))
        self.assertTrue(self.db.owns(ALICE, postmaster))
        self.assertFalse(self.db.owns(BOB, postmaster))
        self.assertFalse(self.db.owns(ALICE, BOB))

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
        self.assertFalse(self.db.exists(BOB))
        self.assertRaises(UnknownUser, self.db.remove, BOB)
        self.assertEqual(self.db.addresses(), [ALICE, CAROL])


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
        self.assertEqual(self.db.peekUser(Address("Alice", "example.org")), (ALICE, HASH_A))
        self.assertTrue(self.db.exists(shouting))
        self.assertEqual(self.db.resolve(shouting), ALICE)
        self.assertEqual(self.db.resolve(Address("PostMaster", "example.org")), ALICE)
        self.assertTrue(self.db.owns(ALICE, shouting))
        self.assertTrue(self.db.owns(ALICE, Address("POSTMASTER", "example.org")))
        self.assertFalse(self.db.owns(BOB, shouting))
        self.assertFalse(self.db.owns(BOB, Address("Postmaster", "example.org")))
        self.assertEqual(self.db.addresses(), [ALICE, BOB])

    def test_caseInsensitiveChanges(self) -> None:
        """
        A user cannot be added again in another case; changing or removing
        a user in another case changes the stored user.
        """
        self.assertRaises(UserExists, self.db.setPassword, Address("Alice", "example.org"), HASH_B, True)
        self.db.setPassword(Address("ALICE", "example.org"), HASH_B, False)
        self.assertEqual(self.db.lookupUser(ALICE), (ALICE, HASH_B))
        self.db.remove(Address("Bob", "example.org"))
        self.assertEqual(self.db.addresses(), [ALICE])

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

    def test_missingFile(self) -> None:
        """
        A missing users file means no users; a missing aliases file means
        no aliases.
        """
        db = UsersFile(self.path, self.aliasesPath)
        self.assertEqual(db.addresses(), [])
        self.assertIsNone(db.passwordHash(ALICE))
        self.assertIsNone(db.resolve(ALICE))

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
        self.assertEqual(len(db.addresses()), 3)

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
            self.assertEqual(db.resolve(Address(spelling, "example.org")), stored)
        self.assertEqual(db.resolve(Address("abuse", "example.org")), stored)
        self.assertTrue(db.owns(stored, Address("ABUSE", "example.org")))
        self.assertEqual(db.addresses(), [stored])
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
        self.assertTrue(db.owns(ALICE, ALICE))
        self.assertFalse(db.owns(ALICE, upper))
        self.assertEqual(db.addresses(), [upper, ALICE, BOB])
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
        db.reload()
        db.passwordHash(ALICE)
        self.assertEqual(len(events), 3)
        db.setPassword(BOB, HASH_B, False)
        self.assertEqual(len(events), 5)

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
        self.assertEqual(db.addresses(), [ALICE, BOB, CAROL])
        self.assertRaises(ValueError, db.addUsers, [(Address("dave", "example.org"), "{X}a\nb", "")])

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
        self.assertEqual(db.addresses(), [ALICE, BOB])
        self.assertEqual(db.passwordHash(ALICE), HASH_A)
        self.assertEqual(len(events), 1)
        text = formatEvent(events[0])
        self.assertIn("1,3,4,5", text)
        self.assertIn(self.path, text)
        self.assertNotIn("$6$", text)
        self.assertNotIn("$2y$", text)
        # The warning is not repeated on later lookups of the same file.
        db.passwordHash(ALICE)
        db.reload()
        self.assertEqual(len(events), 1)

    def test_reloadOnChange(self) -> None:
        """
        A change to the users file is seen by the next lookup, without an
        explicit reload.
        """
        self.writeFile(self.path, f"alice@example.org:{HASH_A}\n".encode())
        db = UsersFile(self.path)
        self.assertFalse(db.exists(BOB))
        self.writeFile(self.path, f"alice@example.org:{HASH_B}\nbob@example.org:{HASH_B}\n".encode())
        self.assertTrue(db.exists(BOB))
        self.assertEqual(db.passwordHash(ALICE), HASH_B)
        os.unlink(self.path)
        self.assertEqual(db.addresses(), [])

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
        db.reload()
        self.assertEqual(db.addresses(), [ALICE, BOB])

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
        L{UsersFile.reload} raises nothing.  Once readable, it is used.
        """
        os.mkdir(self.path)  # open() fails with EISDIR, as with EACCES
        events = _captureLog(self)
        db = UsersFile(self.path)
        self.assertRaises(TemporaryFailure, db.passwordHash, ALICE)
        self.assertRaises(TemporaryFailure, db.exists, ALICE)
        self.assertRaises(TemporaryFailure, db.resolve, ALICE)
        self.assertRaises(TemporaryFailure, db.addresses)
        db.reload()
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
        self.assertRaises(TemporaryFailure, db.resolve, ALICE)

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
        self.assertEqual(db.resolve(abuse), ALICE)
        self.assertTrue(db.owns(ALICE, abuse))
        self.assertIsNone(db.resolve(Address("ghost", "example.org")))
        self.assertEqual(db.resolve(BOB), BOB)
        self.assertFalse(db.owns(ALICE, BOB))
        self.assertFalse(db.exists(abuse))
        self.assertEqual(len(events), 1)
        self.assertIn("line(s) 3", formatEvent(events[0]))
        self.writeFile(self.aliasesPath, b"abuse@example.org: bob@example.org\n")
        self.assertEqual(db.resolve(abuse), BOB)
        self.assertFalse(db.owns(ALICE, abuse))

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
        self.assertEqual(db.addresses(), [ALICE])

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
        self.assertEqual(first.addresses(), [ALICE, BOB])
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
