"""
C{etc/pop3gw.service}: systemd accepts it, rates its sandbox "OK", and it
leaves on only what pop3gw needs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import missing, requireProgram

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "etc", "pop3gw.service")
#: The highest overall exposure C{systemd-analyze security} still calls "OK".
MAX_EXPOSURE = 2.0
SYSTEM_UNIT_DIRS = ("/usr/lib/systemd/system", "/lib/systemd/system")

#: Child program: turn on the kernel's MemoryDenyWriteExecute (prctl
#: PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN; Linux 6.3+), then build the relay
#: client's TLS connections as the outbound queue does.
MDWE_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    print("unsupported")
    sys.exit(0)
from pop3gw.tlsclient import clientContextFactory, opportunisticClientContextFactory
for creator in (clientContextFactory("relay.example.org"), opportunisticClientContextFactory("mx.example.org")):
    try:
        creator.clientConnectionForTLS(object())
    except MemoryError:
        print("refused")
        sys.exit(0)
print("allowed")
"""


def unitSettings() -> dict:
    """
    The unit's C{[Service]} settings, name -> list of values.
    """
    settings: dict = {}
    section = None
    with open(UNIT) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
                continue
            if section == "[Service]":
                name, _, value = line.partition("=")
                settings.setdefault(name, []).append(value)
    return settings


class UnitTests(SynchronousTestCase):
    def analyze(self) -> str:
        analyze = requireProgram(self, "systemd-analyze")
        helpText = subprocess.run([analyze, "security", "--help"], capture_output=True, timeout=60)
        if b"--offline" not in helpText.stdout:
            missing(self, "systemd-analyze has no --offline (systemd 252 or later has)")
        return analyze

    def test_securityExposure(self) -> None:
        """
        C{systemd-analyze security --offline=yes} rates the unit's overall
        exposure at most 2.0 ("OK").
        """
        analyze = self.analyze()
        result = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", UNIT], capture_output=True,
                                timeout=60, stdin=subprocess.DEVNULL)
        output = result.stdout.decode()
        self.assertEqual(result.returncode, 0, output + result.stderr.decode())
        overall = re.search(r"Overall exposure level for pop3gw\.service: (\d+\.\d+) (\w+)", output)
        self.assertIsNotNone(overall, output)
        self.assertLessEqual(float(overall.group(1)), MAX_EXPOSURE, output)
        self.assertEqual(overall.group(2), "OK", output)

    def test_verify(self) -> None:
        """
        C{systemd-analyze verify} finds nothing to complain about.  It runs
        on a scratch root holding the system's units, the unit under test,
        and stand-ins for the programs the unit runs (C{/opt/pop3gw} is not
        installed here), since verify checks that they exist.
        """
        analyze = self.analyze()
        systemDir = next((d for d in SYSTEM_UNIT_DIRS if os.path.isdir(d)), None)
        if systemDir is None:
            missing(self, "no system unit directory (" + ", ".join(SYSTEM_UNIT_DIRS) + ")")
        root = tempfile.mkdtemp(prefix="pop3gw-unit-")
        self.addCleanup(shutil.rmtree, root, True)
        shutil.copytree(systemDir, os.path.join(root, "usr", "lib", "systemd", "system"), symlinks=True)
        settings = unitSettings()
        for key in ("ExecStart", "ExecReload"):
            program = settings[key][0].lstrip("-@:+!").split()[0]
            stub = os.path.join(root, program.lstrip("/"))
            os.makedirs(os.path.dirname(stub), exist_ok=True)
            with open(stub, "w") as f:
                f.write("#!/bin/sh\n")
            os.chmod(stub, 0o755)
        os.makedirs(os.path.join(root, "etc", "systemd", "system"))
        shutil.copy(UNIT, os.path.join(root, "etc", "systemd", "system", "pop3gw.service"))
        result = subprocess.run([analyze, "verify", "--man=no", f"--root={root}", "pop3gw.service"],
                                capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, b""))

    def test_whatPop3gwNeeds(self) -> None:
        """
        The sandbox keeps what pop3gw uses: ports below 1024 for its user
        (and no other capability), a writable data directory and runtime
        directory (everything else read-only), Internet and Unix sockets,
        and the system calls of an ordinary service.
        """
        settings = unitSettings()
        self.assertEqual(settings["User"], ["pop3gw"])
        self.assertEqual(settings["AmbientCapabilities"], ["CAP_NET_BIND_SERVICE"])
        self.assertEqual(settings["CapabilityBoundingSet"], ["CAP_NET_BIND_SERVICE"])
        self.assertEqual(settings["ProtectSystem"], ["strict"])
        self.assertEqual(settings["StateDirectory"], ["pop3gw"])
        self.assertEqual(settings["RuntimeDirectory"], ["pop3gw"])
        self.assertEqual(settings["RestrictAddressFamilies"], ["AF_INET AF_INET6 AF_UNIX"])
        self.assertEqual(settings["SystemCallFilter"], ["@system-service"])
        self.assertEqual(settings["ExecReload"], ["/bin/kill -HUP $MAINPID"])
        self.assertIn("--config /etc/pop3gw/pop3gw.ini", settings["ExecStart"][0])

    def test_stopSignalsTheSupervisorOnly(self) -> None:
        """
        C{systemctl stop} sends SIGTERM to the main process only (the
        supervisor with C{--workers N}, which stops its workers and does not
        replace them), and SIGKILL to whatever is left once it exited.
        """
        self.assertEqual(unitSettings()["KillMode"], ["mixed"])

    def test_writableExecutableMemoryAllowed(self) -> None:
        """
        The unit does not set C{MemoryDenyWriteExecute=}: the relay client's
        TLS (pyOpenSSL's callbacks, made by cffi at run time) needs writable
        executable memory, so with it no mail would leave.  This runs the
        relay client's TLS set-up under the kernel's own
        MemoryDenyWriteExecute (Linux 6.3 and later) to show it.
        """
        probe = subprocess.run([sys.executable, "-c", MDWE_PROBE], capture_output=True, timeout=60,
                               stdin=subprocess.DEVNULL)
        self.assertEqual(probe.returncode, 0, probe.stderr)
        verdict = probe.stdout.decode().strip()
        if verdict == "unsupported":
            self.skipTest("this kernel has no PR_SET_MDWE (Linux 6.3 and later)")
        if verdict == "allowed":
            self.skipTest("the relay client's TLS works without writable executable memory now: "
                          "MemoryDenyWriteExecute=yes would fit")
        self.assertEqual(verdict, "refused")
        self.assertNotIn("MemoryDenyWriteExecute", unitSettings())
