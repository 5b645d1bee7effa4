# -*- test-case-name: tests.test_tls -*-
"""
OpenSSL context factories for the outbound relay client (a smarthost, or
MX delivery); the server side is L{pop3gw.tls}.

Relay client policy:

  - TLS 1.2 minimum, the options of L{pop3gw.tls.COMMON_OPTIONS}.
  - C{clientContextFactory(host)}: the server certificate must chain to the
    trust root (the system's by default) and match C{host} (checked with
    C{service_identity}); otherwise the handshake fails.  With
    C{verify=False} traffic is encrypted but the server is not
    authenticated.
  - C{opportunisticClientContextFactory(host)} (RFC 7435, MX delivery):
    encrypts, tries to verify, never fails because of verification; the
    outcome is recorded for the log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from cryptography import x509
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from pop3gw.tls import COMMON_OPTIONS, isIPAddress

if TYPE_CHECKING:
    # Not exported by twisted.internet.ssl, which returns its providers.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

#: TLS 1.2 cipher suites offered by the relay client: wider than the server
#: list (other MTAs vary) but still without anything broken.
CLIENT_CIPHERS_TLS12 = "HIGH:!aNULL:!eNULL:!MD5:!3DES:!RC4:!DSS:!PSK:!SRP:!CAMELLIA"


def _newClientContext() -> SSL.Context:
    """
    A client context with the relay client policy and no verification set.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(COMMON_OPTIONS)
    ctx.set_cipher_list(CLIENT_CIPHERS_TLS12.encode("ascii"))
    return ctx


def _peerCertificate(conn: SSL.Connection) -> x509.Certificate | None:
    """
    The peer's leaf certificate as a C{cryptography} object.
    """
    try:
        return conn.get_peer_certificate(as_cryptography=True)
    except TypeError:
        cert = conn.get_peer_certificate()
        return None if cert is None else cert.to_cryptography()


def _asTrustRoot(trustRoot) -> IOpenSSLTrustRoot:
    if trustRoot is None:
        return tssl.platformTrust()
    if isinstance(trustRoot, tssl.Certificate):
        return tssl.trustRootFromCertificates([trustRoot])
    return trustRoot


def clientContextFactory(
    hostname: str, verify: bool = True, trustRoot=None
) -> IOpenSSLClientConnectionCreator:
    """
    A client connection creator for the relay client to a smarthost.

    @param hostname: the smarthost's name (or IP address): sent as SNI and,
        with C{verify}, checked against its certificate.
    @param verify: if C{True}, the handshake fails unless the certificate
        chains to C{trustRoot} and matches C{hostname}.  If C{False} traffic
        is encrypted but the server is not authenticated.
    @param trustRoot: an C{IOpenSSLTrustRoot} or a
        C{twisted.internet.ssl.Certificate}; default: the platform's.
    """
    if verify:
        return tssl.optionsForClientTLS(
            hostname,
            trustRoot=_asTrustRoot(trustRoot),
            extraCertificateOptions={
                "raiseMinimumTo": tssl.TLSVersion.TLSv1_2,
            },
        )
    return _UnverifiedClientCreator(hostname=hostname)


def _serverName(hostname: str) -> bytes | None:
    if not hostname or isIPAddress(hostname):
        return None
    try:
        return hostname.encode("idna")
    except UnicodeError:
        return None


@implementer(IOpenSSLClientConnectionCreator)
@attrs.define(eq=False)
class _UnverifiedClientCreator:
    """
    Encrypt, send SNI, verify nothing.
    """

    hostname: str
    _context: SSL.Context = attrs.field(factory=_newClientContext, init=False)

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        name = _serverName(self.hostname)
        if name is not None:
            connection.set_tlsext_host_name(name)
        return connection


#: A few X509_V_ERR codes, for readable log lines.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
}


@attrs.define
class VerificationResult:
    """
    What an opportunistic TLS handshake learned about the peer.

    @ivar verified: C{None} until the handshake completes; then C{True} if
        the chain was trusted and the certificate matched the host name,
        C{False} otherwise.
    @ivar reason: why it was not verified (for the log), else C{None}.
    """

    verified: bool | None = None
    reason: str | None = None
    _chainErrors: list[str] = attrs.field(factory=list, repr=False)


@implementer(IOpenSSLClientConnectionCreator)
@attrs.define(eq=False)
class OpportunisticClientTLS:
    """
    Client connection creator for MX delivery (RFC 7435): encrypts, tries
    to verify, never fails because of verification.

    Use one instance per connection; after the handshake its C{result}
    (a L{VerificationResult}) says whether the peer was verified.  (Each
    new connection made with it starts a fresh C{result}.)

    How: the OpenSSL verify callback always returns true but records any
    chain error; when the handshake is done, the leaf is checked against
    the host name with C{service_identity}.
    """

    hostname: str
    trustRoot: object = None
    result: VerificationResult = attrs.field(factory=VerificationResult)
    _context: SSL.Context | None = attrs.field(default=None, init=False)

    def _getContext(self) -> SSL.Context:
        if self._context is None:
            ctx = _newClientContext()
            _asTrustRoot(self.trustRoot)._addCACertsToContext(ctx)
            self._context = ctx
        return self._context

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        result = self.result = VerificationResult()
        hostname = self.hostname

        def verifyCallback(conn, cert, errno, depth, ok):
            if not ok:
                result._chainErrors.append(
                    "{} (depth {})".format(_VERIFY_ERRORS.get(errno, f"error {errno}"), depth)
                )
            return True

        def infoCallback(conn, where, ret):
            if not where & SSL.SSL_CB_HANDSHAKE_DONE or result.verified is not None:
                return
            try:
                result.verified, result.reason = _judge(conn, hostname, result._chainErrors)
            except Exception:
                result.verified, result.reason = False, "cannot check the certificate"

        connection = SSL.Connection(self._getContext(), None)
        connection.set_verify(SSL.VERIFY_PEER, verifyCallback)
        connection.set_info_callback(infoCallback)
        name = _serverName(hostname)
        if name is not None:
            connection.set_tlsext_host_name(name)
        return connection


def _judge(conn: SSL.Connection, hostname: str, chainErrors: list[str]) -> tuple[bool, str | None]:
    if chainErrors:
        return False, chainErrors[0]
    cert = _peerCertificate(conn)
    if cert is None:
        return False, "no certificate"
    try:
        if isIPAddress(hostname):
            verify_certificate_ip_address(cert, hostname)
        else:
            verify_certificate_hostname(cert, hostname)
    except (VerificationError, CertificateError, ValueError):
        return False, f"certificate does not match {hostname}"
    return True, None


def opportunisticClientContextFactory(hostname: str, trustRoot=None) -> OpportunisticClientTLS:
    """
    A client connection creator for opportunistic TLS to an MX host
    (RFC 7435): the connection is encrypted even if the certificate cannot
    be verified.  Read C{.result.verified} after the handshake.

    @param hostname: the MX host name: sent as SNI and checked against the
        certificate.
    @param trustRoot: as for L{clientContextFactory} (default: the
        platform's).
    """
    return OpportunisticClientTLS(hostname=hostname, trustRoot=trustRoot)
