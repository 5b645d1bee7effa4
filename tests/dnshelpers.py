"""
An authoritative DNS server in memory (C{twisted.names}) on loopback, for
the SPF, DKIM and DMARC tests, and the records and keys they publish.

Run as a script (C{python tests/dnshelpers.py ZONE.json}) it serves the
records of a JSON file (C{{"name": [["TXT", "text"], ["A", "192.0.2.1"],
["MX", 10, "mx.example"]]}}) on 127.0.0.1 (UDP and TCP, a port chosen at
run time, printed as C{port=N}) until killed: the end-to-end tests give it
to a real C{twistd pop3gw}.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Optional

from twisted.internet import defer
from twisted.names import authority, common, dns, server
from twisted.python import failure

SOA = dns.Record_SOA(mname=b"ns.test", rname=b"hostmaster.test", serial=1, refresh=60, retry=60,
                     expire=60, minimum=60, ttl=60)


class ServerFailure(Exception):
    """
    Answered with SERVFAIL.
    """


class _ServerFactory(server.DNSServerFactory):
    def gotResolverError(self, failure, protocol, message, address):
        if failure.check(ServerFailure):
            self.sendReply(protocol, self._responseFromMessage(message=message, rCode=dns.ESERVER), address)
            return
        super().gotResolverError(failure, protocol, message, address)


class MemoryAuthority(authority.FileAuthority):
    """
    Authoritative for every name, from a dict.

    @ivar failing: names answered with SERVFAIL.
    @ivar silent: names never answered.
    """

    def __init__(self, records: dict, failing=(), silent=()) -> None:
        common.ResolverBase.__init__(self)
        self._cache = {}
        self.soa = (b"", SOA)
        self.records = {name.lower().encode(): list(rrs) for name, rrs in records.items()}
        self.failing = {n.lower().encode() for n in failing}
        self.silent = {n.lower().encode() for n in silent}
        self.queries: list = []

    def loadFile(self, filename) -> None:
        raise NotImplementedError("in memory only")

    def _lookup(self, name, cls, type, timeout=None):
        self.queries.append((name.decode(), dns.QUERY_TYPES.get(type, type)))
        if name.lower() in self.silent:
            return defer.Deferred()
        if name.lower() in self.failing:
            return defer.fail(failure.Failure(ServerFailure(name)))
        if name.lower() not in self.records:
            return defer.fail(failure.Failure(dns.AuthoritativeDomainError(name)))
        return super()._lookup(name, cls, type, timeout)


def txt(text: str) -> dns.Record_TXT:
    """
    A TXT record, split in 255-octet strings.
    """
    data = text.encode()
    return dns.Record_TXT(*[data[i:i + 255] for i in range(0, len(data), 255)] or [b""], ttl=60)


def a(address: str) -> dns.Record_A:
    return dns.Record_A(address, ttl=60)


def mx(preference: int, name: str) -> dns.Record_MX:
    return dns.Record_MX(preference, name.encode(), ttl=60)


def listen(reactor, records: dict, failing=(), silent=()) -> tuple[MemoryAuthority, int, list]:
    """
    Serve C{records} on 127.0.0.1 (UDP, and TCP on the same port).

    @return: the authority, the port number and the listening ports (to
        stop).
    """
    auth = MemoryAuthority(records, failing, silent)
    factory = _ServerFactory(authorities=[auth])
    factory.noisy = False
    udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    port = udp.getHost().port
    ports = [udp]
    try:
        ports.append(reactor.listenTCP(port, factory, interface="127.0.0.1"))
    except Exception:
        pass
    return auth, port, ports


def rsaKey(bits: int = 1024) -> tuple[bytes, str]:
    """
    A new RSA key: its PEM private key and the C{p=} of its DKIM record.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(public).decode()


def ed25519Key() -> tuple[bytes, str]:
    """
    A new Ed25519 key (RFC 8463): its base64 private key, as dkimpy signs
    with, and the C{p=} of its DKIM record.
    """
    import nacl.signing

    key = nacl.signing.SigningKey.generate()
    return base64.b64encode(bytes(key)), base64.b64encode(bytes(key.verify_key)).decode()


def sign(message: bytes, domain: str, selector: str, pem: bytes, headers: Optional[list] = None,
         algorithm: bytes = b"rsa-sha256") -> bytes:
    """
    C{message} with a DKIM-Signature (relaxed/relaxed, rsa-sha256 unless
    told) on top.
    """
    import dkim

    signature = dkim.sign(message, selector.encode(), domain.encode(), pem, canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=headers, signature_algorithm=algorithm)
    return signature + message


def _record(entry: list):
    kind = entry[0]
    if kind == "TXT":
        return txt(entry[1])
    if kind == "A":
        return a(entry[1])
    if kind == "MX":
        return mx(entry[1], entry[2])
    raise ValueError(kind)


def startProcess(testcase, zone: dict) -> int:
    """
    Run this module as a process serving C{zone} (the JSON form), stopped
    by its pid and its files removed when C{testcase} ends.

    @return: its port on 127.0.0.1.
    """
    import os
    import re
    import shutil
    import signal
    import subprocess
    import tempfile

    work = tempfile.mkdtemp(prefix="pop3gw-dns-")
    testcase.addCleanup(shutil.rmtree, work, True)
    path = os.path.join(work, "zone.json")
    with open(path, "w") as f:
        json.dump(zone, f)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), path], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        assert proc.stdout is not None
        proc.stdout.close()

    testcase.addCleanup(stop)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    m = re.match(r"port=(\d+)$", line.strip())
    if m is None:
        raise AssertionError(f"the DNS server did not start: {line!r}")
    return int(m.group(1))


def main(path: str) -> None:
    from twisted.internet import reactor

    with open(path) as f:
        zone = json.load(f)
    records = {name: [_record(e) for e in entries] for name, entries in zone.items()}
    _, port, _ = listen(reactor, records)
    print(f"port={port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1])
