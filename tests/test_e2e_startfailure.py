"""
End-to-end: C{twistd pop3gw} whose port is taken, started the way
operators start it (C{--logfile FILE}, in the foreground or daemonized):
one line on the terminal, exit status 1, the line in the log too, the pid
file gone, and no process left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import silentUDPPort, twistdCommand

TIMEOUT = 60


def _processesOf(marker: str) -> list:
    """
    The pids of the live processes whose command line holds C{marker}.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().split(") ", 1)[1][:1] == "Z"
        except OSError:
            continue
        if marker.encode() in cmdline and not zombie:
            found.append(int(entry))
    return found


class StartFailureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pop3gw-e2e-start-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        # Anything still running on this data directory is stopped by pid.
        self.addCleanup(self.killLeftovers)
        self.dataDir = os.path.join(self.dir, "data")
        self.config = os.path.join(self.dir, "test.ini")
        with open(self.config, "w") as f:
            f.write(f"[inbound]\nchecks = no\ndns-server = 127.0.0.1:{silentUDPPort(self)}\n")
        self.log = os.path.join(self.dir, "pop3gw.log")
        self.pidfile = os.path.join(self.dir, "pop3gw.pid")
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.description = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
        self.refusal = f"pop3gw: pop3: cannot listen on {self.description}: Address already in use"

    def killLeftovers(self) -> None:
        for pid in _processesOf(self.dataDir):
            os.kill(pid, signal.SIGKILL)

    def twistd(self, *twistdArgs: str, pop3: str = "", extra: tuple = ()) -> subprocess.CompletedProcess:
        command = twistdCommand() + [
            *twistdArgs, f"--pidfile={self.pidfile}", f"--logfile={self.log}", "pop3gw", "--config", self.config,
            "--data-dir", self.dataDir, "--hostname", "mail.example.org", "--pop3", pop3 or self.description,
            "--submission", "none", *extra]
        return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def readLog(self) -> str:
        with open(self.log) as f:
            return f.read()

    def assertRefused(self, result: subprocess.CompletedProcess, daemon: bool) -> None:
        stderr = result.stderr.decode()
        self.assertEqual(result.returncode, 1, stderr)
        self.assertEqual(result.stdout, b"")
        lines = stderr.splitlines()
        self.assertEqual(lines[0], self.refusal, stderr)
        if daemon:
            # What the daemonizing twistd itself prints after it.
            self.assertEqual(lines[1:], ["An error has occurred: b'pop3gw did not start (the line above says why)'",
                                         "Please look at log file for more information."])
        else:
            self.assertEqual(lines, [self.refusal])
        log = self.readLog()
        self.assertIn(" [stderr#error] " + self.refusal + "\n", log)
        self.assertNotIn("Traceback", stderr + log)
        self.assertNotIn("listening on", log)
        self.assertFalse(os.path.exists(self.pidfile))
        deadline = time.monotonic() + 10
        while _processesOf(self.dataDir) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(_processesOf(self.dataDir), [])

    def test_foreground(self) -> None:
        """
        C{twistd -n --logfile FILE pop3gw} on a port in use.
        """
        self.assertRefused(self.twistd("-n"), daemon=False)

    def test_daemon(self) -> None:
        """
        A daemonizing C{twistd --logfile FILE pop3gw} on a port in use
        returns (it waited for ever), exit 1, the line on its stderr.
        """
        self.assertRefused(self.twistd(), daemon=True)

    def test_workers(self) -> None:
        """
        The supervisor of C{--workers 2} binds the listeners: the same,
        in the foreground and daemonized, and no worker is left.
        """
        self.assertRefused(self.twistd("-n", extra=("--workers", "2")), daemon=False)
        self.assertRefused(self.twistd(extra=("--workers", "2")), daemon=True)

    def test_daemonStarts(self) -> None:
        """
        On a free port the daemonizing C{twistd} exits 0 at once, its
        stderr read to the end (the daemon keeps no copy of it), and the
        pid file names the daemon, which serves until stopped; a second
        daemon on its data directory says so on the terminal, exit 1.
        """
        result = self.twistd(pop3="tcp:0:interface=127.0.0.1")
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, b"", b""))
        with open(self.pidfile) as f:
            pid = int(f.read())
        self.assertEqual(_processesOf(self.dataDir), [pid])
        deadline = time.monotonic() + 10
        while "pop3 listening on" not in self.readLog() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertIn("pop3 listening on", self.readLog())
        # A second daemon on the same data directory is told of the first.
        self.pidfile = os.path.join(self.dir, "second.pid")
        second = self.twistd(pop3="tcp:0:interface=127.0.0.1")
        self.assertEqual(second.returncode, 1, second.stderr)
        self.assertEqual(second.stderr.decode().splitlines()[0],
                         f"pop3gw: another pop3gw server (pid {pid}) is running on the data directory {self.dataDir}")
        self.assertFalse(os.path.exists(self.pidfile))
        deadline = time.monotonic() + 10
        while _processesOf(self.dataDir) != [pid] and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(_processesOf(self.dataDir), [pid])
        self.pidfile = os.path.join(self.dir, "pop3gw.pid")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _processesOf(self.dataDir) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(_processesOf(self.dataDir), [])
        self.assertFalse(os.path.exists(self.pidfile))
