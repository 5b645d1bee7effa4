"""
The end-to-end helpers decide between running, skipping and failing on a
fresh machine: a busy default port is a skip, a swaks without TLS is a skip
outside CI and a failure under CI, and .ci/run installs what the tests use.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import unittest

from twisted.trial.unittest import FailTest, SynchronousTestCase

from tests.e2e import requirePortsFree, requireSwaksTLS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What swaks 20201014.0 prints for C{--support} when Net::SSLeay is
#: missing (on stderr) and when it is there (on stdout).
SWAKS_WITHOUT_TLS = "echo '=== Basic AUTH supported'\necho '*** TLS not available: requires Net::SSLeay' >&2\n"
SWAKS_WITH_TLS = "echo '=== Basic AUTH supported'\necho '=== TLS supported'\n"


class PortsTests(SynchronousTestCase):
    def test_busyPortSkips(self) -> None:
        """
        A port something listens on makes the test skip, with a reason that
        names the port and the likely cause.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with self.assertRaises(unittest.SkipTest) as e:
            requirePortsFree(SynchronousTestCase(), [port])
        self.assertEqual(
            str(e.exception),
            f"127.0.0.1 port {port} in use (is a pop3gw from the README's first step still running?)",
        )

    def test_freePortRuns(self) -> None:
        """
        Ports nobody listens on let the test run, and are left free.
        """
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        requirePortsFree(SynchronousTestCase(), [port])
        again = socket.socket()
        self.addCleanup(again.close)
        again.bind(("127.0.0.1", port))


class SwaksTLSTests(SynchronousTestCase):
    def fakeSwaks(self, script: str, ci: bool) -> str:
        """
        Put a fake C{swaks} printing C{script}'s output first on C{PATH},
        with C{CI} set or not.
        """
        bindir = os.path.abspath(self.mktemp())
        os.makedirs(bindir)
        path = os.path.join(bindir, "swaks")
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + script)
        os.chmod(path, stat.S_IRWXU)
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        env["PATH"] = bindir
        if ci:
            env["CI"] = "true"
        self.patch(os, "environ", env)
        return path

    def test_withoutTLSSkips(self) -> None:
        """
        Outside CI, a swaks without Net::SSLeay skips the TLS test and says
        which package is missing.
        """
        self.fakeSwaks(SWAKS_WITHOUT_TLS, ci=False)
        with self.assertRaises(unittest.SkipTest) as e:
            requireSwaksTLS(SynchronousTestCase())
        self.assertEqual(str(e.exception), "swaks cannot do TLS: Net::SSLeay is missing (Debian: libnet-ssleay-perl)")

    def test_withoutTLSFailsUnderCI(self) -> None:
        """
        Under C{CI=true}, a swaks without Net::SSLeay is a failure: .ci/run
        should have installed it.
        """
        self.fakeSwaks(SWAKS_WITHOUT_TLS, ci=True)
        with self.assertRaises(FailTest) as e:
            requireSwaksTLS(SynchronousTestCase())
        self.assertIn("libnet-ssleay-perl", str(e.exception))
        self.assertIn(".ci/run should have installed it", str(e.exception))

    def test_withTLS(self) -> None:
        """
        A swaks that reports TLS support is used.
        """
        path = self.fakeSwaks(SWAKS_WITH_TLS, ci=True)
        self.assertEqual(requireSwaksTLS(SynchronousTestCase()), path)


class CIScriptTests(SynchronousTestCase):
    def test_installsOptionalParts(self) -> None:
        """
        .ci/run installs with C{--no-install-recommends}, so it names the
        parts the tests need that Debian only recommends or packages apart:
        Net::SSLeay for swaks' STARTTLS, and systemd for systemd-analyze.
        """
        with open(os.path.join(ROOT, ".ci", "run")) as f:
            script = f.read()
        self.assertIn("--no-install-recommends", script)
        packages = re.search(r'^PACKAGES="([^"]*)"', script, re.M)
        self.assertIsNotNone(packages)
        for name in ("curl", "openssl", "fetchmail", "mpop", "swaks", "libnet-ssleay-perl", "msmtp", "fail2ban",
                     "systemd"):
            self.assertIn(name, packages.group(1).split())
