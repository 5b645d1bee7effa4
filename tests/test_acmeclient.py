"""
Tests for L{pop3gw.acmeclient}: the [acme] settings, the HTTP-01 answers,
serving what ACME obtained, and the renewal schedule.  The protocol itself
is tested against a real ACME server in tests/test_e2e_acme.py.
"""

import datetime
import os

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from pop3gw import acmeclient
from pop3gw.acmeclient import ACMEError, ChallengeTokens, Renewer, challengeSite, paths
from pop3gw.config import ConfigError, parseACME
from pop3gw.runner import ImmediateRunner
from pop3gw.tls import CertificateManager
from tests.tlshelpers import makeCA, makeLeaf
from tests.util import makeTempDirectory


class SettingsTests(SynchronousTestCase):
    def test_offByDefault(self) -> None:
        """
        Without C{directory}, ACME is off.
        """
        self.assertFalse(parseACME({}).enabled)

    def test_parsed(self) -> None:
        """
        The directory URL, the contact (a C{mailto:} prefix dropped), the
        HTTP-01 endpoints and a CA file.
        """
        got = parseACME({"directory": "https://acme.example/dir", "contact": "mailto:pm@example.org",
                         "http": "tcp:80", "ca-file": "ca.pem"})
        self.assertEqual((got.directory, got.contact, got.http), ("https://acme.example/dir", "pm@example.org",
                                                                   ("tcp:80",)))
        self.assertEqual(got.caFile, os.path.abspath("ca.pem"))

    def test_refused(self) -> None:
        """
        A plain-HTTP directory, no HTTP-01 endpoint, a bad contact, an
        unknown key, settings without a directory, or ACME together with
        --tls-cert: each one line.
        """
        cases = [
            ({"directory": "http://acme.example/dir", "http": "tcp:80"}, "must be an https:// URL"),
            ({"directory": "https://acme.example/dir"}, "[acme] http: name the endpoint"),
            ({"directory": "https://a.example/d", "http": "tcp:80", "contact": "nobody"}, "is not an e-mail address"),
            ({"directory": "https://a.example/d", "http": "tcp:80", "staging": "yes"}, "unknown key 'staging'"),
            ({"http": "tcp:80"}, "[acme] needs directory"),
        ]
        for section, message in cases:
            with self.assertRaises(ConfigError) as e:
                parseACME(section)
            self.assertIn(message, str(e.exception))
        with self.assertRaises(ConfigError) as e:
            parseACME({"directory": "https://a.example/d", "http": "tcp:80"}, operatorCertificate=True)
        self.assertIn("both name the certificate", str(e.exception))


class ChallengeTests(SynchronousTestCase):
    def get(self, site, path: bytes):
        request = DummyRequest(path.strip(b"/").split(b"/"))
        request.path = path
        body = site.getResourceFor(request).render(request)
        return request.responseCode or 200, body

    def test_answers(self) -> None:
        """
        An offered token is answered with its key authorization; a
        withdrawn or unknown token, or another path, is 404.
        """
        tokens = ChallengeTokens()
        site = challengeSite(tokens)
        tokens.offer("tok-1", "tok-1.thumbprint")
        self.assertEqual(self.get(site, b"/.well-known/acme-challenge/tok-1"), (200, b"tok-1.thumbprint"))
        self.assertEqual(self.get(site, b"/.well-known/acme-challenge/tok-2")[0], 404)
        self.assertEqual(self.get(site, b"/tok-1")[0], 404)
        self.assertEqual(self.get(site, b"/.well-known/acme-challenge/tok-1/x")[0], 404)
        tokens.withdraw("tok-1")
        self.assertEqual(self.get(site, b"/.well-known/acme-challenge/tok-1")[0], 404)


def writeCertificate(dataDir: str, days: int) -> float:
    caCert, caKey = makeCA()
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=days)
    cert, key = makeLeaf(caCert, caKey, "mail.example.org", notBefore=now - datetime.timedelta(days=1), notAfter=until)
    certPath, keyPath = paths(dataDir)
    os.makedirs(os.path.dirname(certPath), exist_ok=True)
    with open(keyPath, "wb") as f:
        f.write(key)
    with open(certPath, "wb") as f:
        f.write(cert + caCert)
    return until.replace(microsecond=0).timestamp()


class ServingTests(SynchronousTestCase):
    def test_preferredOnceThere(self) -> None:
        """
        Until ACME has written a certificate the generated one is served;
        once both files exist, the next reload serves them.
        """
        dataDir = makeTempDirectory(self)
        certs = CertificateManager(dataDir, hostname="mail.example.org", preferred=paths(dataDir))
        certs.load()
        self.assertTrue(certs.generated)
        until = writeCertificate(dataDir, 60)
        self.assertTrue(certs.reloadIfChanged())
        self.assertFalse(certs.generated)
        self.assertEqual(certs.expiry(), until)


class FakeObtainer:
    hostname = "mail.example.org"

    def __init__(self, needed: bool, result=None) -> None:
        self._needed = needed
        self.result = result
        self.obtained = 0

    def needed(self) -> bool:
        return self._needed

    def obtain(self) -> float:
        self.obtained += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


class RenewerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.reloads: list = []

    def renewer(self, obtainer) -> Renewer:
        return Renewer(obtainer, ImmediateRunner(), self.clock, lambda: self.reloads.append(1))

    def test_notDue(self) -> None:
        """
        A certificate not due for renewal is left alone.
        """
        obtainer = FakeObtainer(False)
        self.renewer(obtainer).check()
        self.assertEqual((obtainer.obtained, self.reloads), (0, []))

    def test_obtained(self) -> None:
        """
        A due certificate is obtained, logged with its expiry, and the
        certificate manager reloads.
        """
        obtainer = FakeObtainer(True, 1_800_000_000.0)
        with capturedLogs() as events:
            self.renewer(obtainer).check()
        self.assertEqual((obtainer.obtained, self.reloads), (1, [1]))
        self.assertIn("acme: new certificate for mail.example.org, valid until 2027-01-15T08:00:00+00:00",
                      [formatEvent(e) for e in events])

    def test_failureWaits(self) -> None:
        """
        A failure is one error line; the next attempt waits an hour.
        """
        obtainer = FakeObtainer(True, ACMEError("the CA could not validate mail.example.org: timeout"))
        renewer = self.renewer(obtainer)
        with capturedLogs() as events:
            renewer.check()
        lines = [formatEvent(e) for e in events]
        self.assertIn("acme: cannot obtain a certificate for mail.example.org: the CA could not validate "
                      "mail.example.org: timeout; trying again in 3600 s", lines)
        renewer.check()
        self.assertEqual(obtainer.obtained, 1)
        self.clock.advance(acmeclient.RETRY_AFTER_FAILURE)
        renewer.check()
        self.assertEqual(obtainer.obtained, 2)
        self.assertEqual(self.reloads, [])

    def test_unexpectedFailureLogged(self) -> None:
        """
        An unexpected error is logged as a failure, not raised.
        """
        renewer = self.renewer(FakeObtainer(True, RuntimeError("bug")))
        with capturedLogs() as events:
            renewer.check()
        self.assertTrue(any(e.get("log_failure") is not None and isinstance(e["log_failure"], Failure)
                            for e in events))
        self.flushLoggedErrors(RuntimeError)

    def test_needed(self) -> None:
        """
        A certificate is needed when there is none, or it has less than 30
        days left.
        """
        dataDir = makeTempDirectory(self)
        obtainer = acmeclient.CertificateObtainer(dataDir, "mail.example.org", parseACME({}), ChallengeTokens())
        self.assertTrue(obtainer.needed())
        writeCertificate(dataDir, 60)
        self.assertFalse(obtainer.needed())
        writeCertificate(dataDir, 20)
        self.assertTrue(obtainer.needed())
