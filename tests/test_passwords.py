"""
Tests for L{pop3gw.passwords}: the password schemes.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pop3gw import passwords
from pop3gw.address import Address
from pop3gw.passwords import hashPassword, sha256Crypt, sha512Crypt, verifyPassword

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
        L{passwords.canVerify} is true exactly for the schemes
        L{verifyPassword} can check.
        """
        for stored in ["{ARGON2ID}" + ARGON2ID, "{argon2i}" + ARGON2I, "{BLF-CRYPT}" + BCRYPT_2Y,
                       "{SHA256-CRYPT}" + SHA256_VECTORS[0][3], "{SHA512-CRYPT}" + SHA512_VECTORS[0][3],
                       "{SSHA256}" + SSHA256_SECRET, "{SSHA256.hex}" + SSHA256_SECRET_HEX]:
            self.assertTrue(passwords.canVerify(stored), stored)
        for stored in ["{PLAIN}x", "{CRAM-MD5}x", "{CLEARTEXT}x", "{MD5-CRYPT}x", "{SSHA}x", "{SHA256}x", "x", ""]:
            self.assertFalse(passwords.canVerify(stored), stored)

    def test_malformedHashCannotBeVerified(self) -> None:
        """
        L{passwords.canVerify} checks the syntax of the hash for its
        scheme: a malformed Argon2 string, bcrypt hash, SHA-crypt string
        (glibc's C{*0} error string included) or SSHA value counts as a
        hash pop3gw cannot verify, and L{passwords.isMalformed} says so;
        well-formed variants (C{rounds=}, an empty salt, every bcrypt
        prefix) are accepted.
        """
        malformed = [
            "{ARGON2ID}$argon2id$garbage",
            "{ARGON2ID}" + ARGON2I,
            "{ARGON2I}" + ARGON2ID,
            "{ARGON2ID}" + ARGON2ID + "$",
            "{ARGON2ID}" + ARGON2ID.replace("m=1024", "m=x"),
            "{BLF-CRYPT}notbcrypt",
            "{BLF-CRYPT}" + BCRYPT_2B[:-1],
            "{BLF-CRYPT}" + BCRYPT_2B.replace("$05$", "$5$"),
            "{BLF-CRYPT}" + BCRYPT_2B.replace("$2b$", "$2x$"),
            "{BLF-CRYPT}" + BCRYPT_2B.replace("$05$", "$99$"),
            "{SHA256-CRYPT}$5$short",
            "{SHA512-CRYPT}*0",
            "{SHA256-CRYPT}" + SHA512_VECTORS[0][3],
            "{SHA512-CRYPT}" + SHA512_VECTORS[0][3][:-1],
            "{SHA512-CRYPT}" + SHA512_VECTORS[0][3][:-1] + "!",
            "{SHA256-CRYPT}$5$rounds=x$salt$" + "a" * 43,
            "{SHA256-CRYPT}$5$salt$with$" + "a" * 43,
            "{SSHA512}!!notbase64!!",
            "{SSHA256.hex}zz",
            "{SSHA256}" + SSHA512_SECRET[:10],
            "{SSHA512}" + SSHA256_SECRET,
            "{SSHA256.HEX}" + SSHA256_SECRET_HEX[:64],
            "{SSHA256}" + SSHA256_SECRET[:-1],
            "{SHA256-CRYPT}$5$s\u00e4lt$" + "a" * 43,
        ]
        for stored in malformed:
            self.assertFalse(passwords.canVerify(stored), stored)
            self.assertTrue(passwords.isMalformed(stored), stored)
        wellFormed = [
            "{ARGON2ID}" + ARGON2ID,
            "{ARGON2I}" + ARGON2I,
            "{ARGON2ID}" + hashPassword("x")[len("{ARGON2ID}"):],
            "{BLF-CRYPT}" + BCRYPT_2A,
            "{BLF-CRYPT}" + BCRYPT_2B,
            "{BLF-CRYPT}" + BCRYPT_72Y,
            "{SSHA512}" + SSHA512_SECRET,
            "{SSHA256.B64}" + SSHA256_SECRET,
            "{SSHA256.HEX}" + SSHA256_SECRET_HEX.upper(),
        ] + ["{SHA256-CRYPT}" + v[3] for v in SHA256_VECTORS] + ["{SHA512-CRYPT}" + v[3] for v in SHA512_VECTORS]
        for stored in wellFormed:
            self.assertTrue(passwords.canVerify(stored), stored)
            self.assertFalse(passwords.isMalformed(stored), stored)
        for stored in ["{PLAIN}x", "{CRAM-MD5}x", "x"]:
            self.assertFalse(passwords.isMalformed(stored), stored)

    def test_plainPassword(self) -> None:
        """
        L{passwords.plainPassword} decodes Dovecot's plain-text schemes and
        their encodings, and nothing else.
        """
        self.assertEqual(passwords.plainPassword("{PLAIN}two words:x"), "two words:x")
        self.assertEqual(passwords.plainPassword("{clear}p\u00e4ss"), "p\u00e4ss")
        self.assertEqual(passwords.plainPassword("{CLEARTEXT}pw"), "pw")
        self.assertEqual(passwords.plainPassword("{PLAIN.B64}c2VjcmV0"), "secret")
        self.assertEqual(passwords.plainPassword("{PLAIN.HEX}736563726574"), "secret")
        for stored in ["{PLAIN.B64}!!", "{PLAIN.HEX}zz", "{PLAIN.B64}/w==", "{CRAM-MD5}abc", "{SSHA256}x", "pw"]:
            self.assertIsNone(passwords.plainPassword(stored), stored)

    def test_upgradedHash(self) -> None:
        """
        L{passwords.upgradedHash} gives an Argon2id hash of the password for
        every verifiable scheme but Argon2, and L{None} otherwise.
        """
        for stored in ["{SHA256-CRYPT}" + SHA256_VECTORS[3][3], HASH_A, HASH_B, "{SSHA256}" + SSHA256_SECRET]:
            upgraded = passwords.upgradedHash(stored, b"pw")
            self.assertTrue(upgraded.startswith("{ARGON2ID}$argon2id$"), stored)
            self.assertTrue(verifyPassword(upgraded, "pw"))
        for stored in ["{ARGON2ID}" + ARGON2ID, "{ARGON2I}" + ARGON2I, "{PLAIN}pw", "{CRAM-MD5}x", "pw"]:
            self.assertIsNone(passwords.upgradedHash(stored, b"pw"), stored)


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
            passwords.ARGON2_MEMORY_COST,
            passwords.ARGON2_TIME_COST,
            passwords.ARGON2_PARALLELISM,
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
        self.assertTrue(passwords.DUMMY_HASH.startswith("{ARGON2ID}$argon2id$"))
        self.assertIs(passwords.DUMMY_HASH, passwords.DUMMY_HASH)
        self.assertIs(passwords.dummyHash(), passwords.DUMMY_HASH)
        self.assertFalse(verifyPassword(passwords.DUMMY_HASH, ""))
        self.assertRaises(AttributeError, getattr, passwords, "NO_SUCH_NAME")

    def test_dummyHashOncePerProcess(self) -> None:
        """
        Pool threads asking for the dummy hash at the same time all get the
        same one.
        """
        import threading

        fresh = passwords._DummyHash()
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
        limit = passwords.MAX_PASSWORD_BYTES
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
