# -*- test-case-name: tests.test_acmeclient -*-
"""
Certificates that renew themselves: ACME (RFC 8555) for the server's host
name, with the HTTP-01 challenge answered on a listener of pop3gw's own.

Settings are the C{[acme]} section of the INI file: C{directory} (the CA's
directory URL; without it ACME is off), C{contact} (an e-mail address the
CA may write to), C{http} (the endpoint the CA's validation reaches on
port 80, e.g. C{tcp:80}), C{ca-file} (to trust an ACME server with a
private CA, as in tests).

The account key, the certificate key and the full chain live under
C{DATA/acme/} (0600).  While a certificate obtained this way exists it is
the one served (unless C{--tls-cert} names another); before the first one
arrives the generated self-signed certificate is.  The server asks for a
new certificate when there is none or it expires within L{RENEW_BEFORE}
seconds, looks again every L{CHECK_INTERVAL} seconds (sooner after a
failure), and the certificate reload that already exists serves the new
one to new handshakes, with no restart.

The C{acme} library (Certbot's, with C{josepy}) speaks the protocol; it
blocks, so it runs in a thread.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.logger import Logger
from twisted.web.resource import Resource

from pop3gw import fsutil

if TYPE_CHECKING:
    from twisted.web.server import Site

    from pop3gw.config import ACMESettings

ACME_DIR = "acme"
ACCOUNT_KEY = "account.pem"
ACCOUNT_FILE = "account.json"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"

#: Renew when the certificate has less than this left (seconds).
RENEW_BEFORE = 30 * 86400.0

#: How often the server looks, and how soon it tries again after a failure.
CHECK_INTERVAL = 12 * 3600.0
RETRY_AFTER_FAILURE = 3600.0

#: Seconds the CA has to validate and issue.
ORDER_DEADLINE = 120.0

CHALLENGE_PREFIX = b".well-known/acme-challenge"

log = Logger()


class ACMEError(Exception):
    """
    Obtaining a certificate failed (the message says where), for one log
    line.
    """


def paths(dataDir: str) -> tuple[str, str]:
    """
    The certificate (full chain) and key files ACME writes.
    """
    directory = os.path.join(dataDir, ACME_DIR)
    return os.path.join(directory, CERT_FILE), os.path.join(directory, KEY_FILE)


class ChallengeTokens:
    """
    The HTTP-01 answers being offered: token -> key authorization.
    Written from the ACME thread, read by the HTTP listener.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: Dict[str, str] = {}

    def offer(self, token: str, answer: str) -> None:
        with self._lock:
            self._answers[token] = answer

    def withdraw(self, token: str) -> None:
        with self._lock:
            self._answers.pop(token, None)

    def answer(self, token: str) -> Optional[str]:
        with self._lock:
            return self._answers.get(token)


class _ChallengePage(Resource):
    isLeaf = True

    def __init__(self, tokens: ChallengeTokens) -> None:
        super().__init__()
        self.tokens = tokens

    def render_GET(self, request) -> bytes:
        parts = [p for p in request.path.split(b"/") if p]
        prefix = CHALLENGE_PREFIX.split(b"/")
        answer = None
        if len(parts) == len(prefix) + 1 and parts[:-1] == prefix:
            try:
                answer = self.tokens.answer(parts[-1].decode("ascii"))
            except UnicodeDecodeError:
                answer = None
        if answer is None:
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"Content-Type", b"application/octet-stream")
        return answer.encode("ascii")


def challengeSite(tokens: ChallengeTokens) -> "Site":
    """
    The HTTP site of C{[acme] http}: C{/.well-known/acme-challenge/TOKEN},
    404 for anything else.  No access log, no request body (see
    L{pop3gw.httpsite}).
    """
    # Loaded here: Twisted's web server is only for the HTTP-01 listener.
    from pop3gw.httpsite import getOnlySite

    return getOnlySite(_ChallengePage(tokens))


def certificateExpiry(path: str) -> Optional[float]:
    """
    When the first certificate in C{path} expires (POSIX seconds), or
    C{None} when there is none readable.
    """
    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.timestamp()


class CertificateObtainer:
    """
    Obtains and renews the certificate (blocking: run it in a thread).
    """

    def __init__(self, dataDir: str, hostname: str, settings: ACMESettings, tokens: ChallengeTokens,
                 owner: Optional[fsutil.Owner] = None, clock: Callable[[], float] = time.time) -> None:
        self.directory = os.path.join(dataDir, ACME_DIR)
        self.certPath, self.keyPath = paths(dataDir)
        self.hostname = hostname
        self.settings = settings
        self.tokens = tokens
        self.owner = owner
        self.clock = clock

    def needed(self) -> bool:
        """
        Whether there is no certificate yet or it expires soon.
        """
        expiry = certificateExpiry(self.certPath)
        return expiry is None or expiry - self.clock() < RENEW_BEFORE

    def _accountKey(self):
        import josepy

        path = os.path.join(self.directory, ACCOUNT_KEY)
        try:
            with open(path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            fsutil.replaceFile(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()), self.owner)
        return josepy.JWKEC(key=key)

    def _client(self, jwk):
        import josepy
        from acme import client, errors, messages

        verify = self.settings.caFile or True
        network = client.ClientNetwork(jwk, alg=josepy.ES256, verify_ssl=verify, user_agent="pop3gw")  # type: ignore[arg-type]
        url = self.settings.directory
        if url is None:
            raise ACMEError("[acme] directory is not set")
        directory = client.ClientV2.get_directory(url, network)
        acme = client.ClientV2(directory, network)
        accountFile = os.path.join(self.directory, ACCOUNT_FILE)
        try:
            with open(accountFile) as f:
                known = json.load(f)
        except (OSError, ValueError):
            known = None
        if known and known.get("directory") == self.settings.directory:
            network.account = messages.RegistrationResource(uri=known["uri"], body=messages.Registration())
            return acme
        contact = self.settings.contact
        registration = messages.NewRegistration.from_data(email=contact, terms_of_service_agreed=True) \
            if contact else messages.NewRegistration(terms_of_service_agreed=True)
        try:
            account = acme.new_account(registration)
        except errors.ConflictError as e:
            account = messages.RegistrationResource(uri=e.location, body=messages.Registration())
            network.account = account
        fsutil.replaceFile(accountFile, json.dumps({"directory": self.settings.directory, "uri": account.uri})
                           .encode("utf-8"), self.owner)
        return acme

    def obtain(self) -> float:
        """
        Order a certificate for the host name, answer its HTTP-01
        challenge, and write the full chain and key.

        @return: the new certificate's expiry (POSIX seconds).
        @raise ACMEError: any failure, in words.
        """
        from acme import challenges, crypto_util, errors, messages

        try:
            fsutil.makeDirectories(self.directory, self.owner)
            jwk = self._accountKey()
            acme = self._client(jwk)
            key = ec.generate_private_key(ec.SECP256R1())
            keyPem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
            csr = crypto_util.make_csr(keyPem, [self.hostname])
            order = acme.new_order(csr)
            offered = []
            try:
                for authorization in order.authorizations:
                    challenge = next((c for c in authorization.body.challenges
                                      if isinstance(c.chall, challenges.HTTP01)), None)
                    if challenge is None:
                        raise ACMEError(f"the CA offers no http-01 challenge for {authorization.body.identifier.value}")
                    response, validation = challenge.chall.response_and_validation(jwk)
                    token = challenge.chall.encode("token")
                    self.tokens.offer(token, validation)
                    offered.append(token)
                    acme.answer_challenge(challenge, response)
                deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_DEADLINE)
                order = acme.poll_and_finalize(order, deadline)
            finally:
                for token in offered:
                    self.tokens.withdraw(token)
            # Key first: a certificate on disk implies its key is there too.
            fsutil.replaceFile(self.keyPath, keyPem, self.owner)
            fsutil.replaceFile(self.certPath, order.fullchain_pem.encode("ascii"), self.owner)
        except ACMEError:
            raise
        except errors.ValidationError as e:
            problems = "; ".join(str(a.body.challenges[0].error) for a in e.failed_authzrs) or "validation failed"
            raise ACMEError(f"the CA could not validate {self.hostname}: {problems}") from None
        except (errors.Error, messages.Error) as e:
            raise ACMEError(f"ACME server {self.settings.directory}: {e}") from None
        except OSError as e:
            raise ACMEError(f"{getattr(e, 'filename', None) or self.settings.directory}: {e.strerror or e}") from None
        except Exception as e:
            # requests' connection errors and the like.
            raise ACMEError(f"ACME server {self.settings.directory}: {type(e).__name__}: {e}") from None
        expiry = certificateExpiry(self.certPath)
        if expiry is None:
            raise ACMEError(f"the CA's certificate in {self.certPath} cannot be read")
        return expiry


class Renewer:
    """
    The server's side: looks at start and every L{CHECK_INTERVAL} seconds,
    obtains in the I/O runner when needed, and tells the certificate
    manager to reload.
    """

    def __init__(self, obtainer: CertificateObtainer, runner, reactor, reload: Callable[[], object]) -> None:
        self.obtainer = obtainer
        self.runner = runner
        self.reactor = reactor
        self.reload = reload
        self.running = False
        self.nextCheck: Optional[float] = None
        self.failures = 0

    def check(self):
        """
        Renew if due (at most one attempt at a time; after a failure, not
        before L{RETRY_AFTER_FAILURE} seconds).
        """
        now = self.reactor.seconds()
        if self.running or (self.nextCheck is not None and now < self.nextCheck):
            return None
        self.running = True
        d = self.runner.run(self._checkBlocking)
        d.addCallbacks(self._done, self._failed)
        return d

    def _checkBlocking(self) -> Optional[float]:
        if not self.obtainer.needed():
            return None
        return self.obtainer.obtain()

    def _done(self, expiry: Optional[float]) -> None:
        self.running = False
        self.failures = 0
        self.nextCheck = None
        if expiry is not None:
            log.info(
                "acme: new certificate for {hostname}, valid until {until}",
                hostname=self.obtainer.hostname,
                until=datetime.datetime.fromtimestamp(expiry, datetime.timezone.utc).isoformat(),
            )
            self.reload()

    def _failed(self, reason) -> None:
        self.running = False
        self.failures += 1
        self.nextCheck = self.reactor.seconds() + RETRY_AFTER_FAILURE
        if reason.check(ACMEError):
            log.error("acme: cannot obtain a certificate for {hostname}: {error}; trying again in {delay} s",
                      hostname=self.obtainer.hostname, error=str(reason.value), delay=int(RETRY_AFTER_FAILURE))
        else:
            log.failure("acme: renewal failed", reason)
