"""
End-to-end: C{[acme]} against Let's Encrypt's test ACME server, pebble
(Debian's C{pebble} package), which validates the HTTP-01 challenge on the
real C{twistd pop3gw}'s listener, resolving the host name through a DNS
server of the test's own on loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess, requireProgram
from tests.postfixhelpers import freePort
from tests.tlshelpers import makeCA, makeLeaf

DNS_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dnshelpers.py")
HOST = "mail.example.org"


class ACMEEndToEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.work = tempfile.mkdtemp(prefix="pop3gw-acme-")
        self.addCleanup(shutil.rmtree, self.work, True)

    def spawn(self, command: list, env=None) -> subprocess.Popen:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)

        def stop() -> None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            proc.stdout.close()

        self.addCleanup(stop)
        return proc

    def startDNS(self) -> int:
        zone = os.path.join(self.work, "zone.json")
        with open(zone, "w") as f:
            json.dump({HOST: [["A", "127.0.0.1"]]}, f)
        proc = self.spawn([sys.executable, DNS_HELPER, zone])
        line = proc.stdout.readline().decode()
        m = re.match(r"port=(\d+)$", line.strip())
        self.assertIsNotNone(m, line)
        return int(m.group(1))

    def startPebble(self, httpPort: int, dnsPort: int) -> tuple[str, str, int]:
        pebble = requireProgram(self, "pebble")
        caCert, caKey = makeCA("pebble test CA")
        cert, key = makeLeaf(caCert, caKey, "localhost", ips=("127.0.0.1",))
        files = {}
        for name, data in (("ca.pem", caCert), ("cert.pem", cert), ("key.pem", key)):
            files[name] = os.path.join(self.work, name)
            with open(files[name], "wb") as f:
                f.write(data)
        port, management = freePort(), freePort()
        config = os.path.join(self.work, "pebble.json")
        with open(config, "w") as f:
            json.dump({"pebble": {
                "listenAddress": f"127.0.0.1:{port}",
                "managementListenAddress": f"127.0.0.1:{management}",
                "certificate": files["cert.pem"],
                "privateKey": files["key.pem"],
                "httpPort": httpPort,
                "tlsPort": freePort(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }}, f)
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
        self.spawn([pebble, "-config", config, "-dnsserver", f"127.0.0.1:{dnsPort}"], env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                time.sleep(0.1)
        return f"https://127.0.0.1:{port}/dir", files["ca.pem"], management

    def test_certificateObtained(self) -> None:
        """
        With [acme] pointing at pebble, the server answers pebble's HTTP-01
        validation, writes the issued chain under DATA/acme/ (0600), and
        its POP3S listener then serves a certificate for the host name that
        verifies against pebble's root; the account is kept for the next
        start.
        """
        httpPort = freePort()
        directory, caFile, management = self.startPebble(httpPort, self.startDNS())
        server = Pop3gwProcess(
            self,
            args=["--domain", "example.org"],
            listeners=("pop3s",),
            extraConfig=(f"[acme]\ndirectory = {directory}\ncontact = postmaster@example.org\n"
                         f"http = tcp:{httpPort}:interface=127.0.0.1\nca-file = {caFile}\n"),
        ).start()
        server.waitForLog(r"acme: new certificate for mail\.example\.org, valid until ", timeout=120)
        rootContext = ssl.create_default_context(cafile=caFile)
        with urllib.request.urlopen(f"https://127.0.0.1:{management}/roots/0", context=rootContext, timeout=30) as r:
            root = r.read()
        rootFile = os.path.join(self.work, "pebble-root.pem")
        with open(rootFile, "wb") as f:
            f.write(root)
        context = ssl.create_default_context(cafile=rootFile)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", server.ports["pop3s"]), 10) as raw:
                    with context.wrap_socket(raw, server_hostname=HOST) as tls:
                        greeting = tls.recv(100)
                        subject = dict(x[0] for x in tls.getpeercert()["subject"]) if tls.getpeercert()["subject"] \
                            else {}
                        names = [v for k, v in tls.getpeercert()["subjectAltName"] if k == "DNS"]
                break
            except ssl.SSLCertVerificationError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.assertTrue(greeting.startswith(b"+OK"), greeting)
        self.assertEqual(names, [HOST], subject)
        acmeDir = os.path.join(server.dataDir, "acme")
        for name in ("account.pem", "account.json", "cert.pem", "key.pem"):
            self.assertEqual(os.stat(os.path.join(acmeDir, name)).st_mode & 0o777, 0o600, name)
