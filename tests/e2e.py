"""
Helpers for end-to-end tests: start the real C{twistd pop3gw} process on
loopback with a private data directory, and run the C{pop3gw} command.

Every process started is stopped by PID in a cleanup, and the data
directory is removed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

BIN = os.path.dirname(sys.executable)
START_TIMEOUT = 60.0
_LISTENING = re.compile(r"(\w+) listening on (\S+):(\d+) ")
_LISTENING_UNIX = re.compile(r"(\w+) listening on (/\S+) \(unix:")


def twistdCommand() -> list:
    twistd = os.path.join(BIN, "twistd")
    if os.path.exists(twistd):
        return [twistd]
    return [sys.executable, "-m", "twisted"]


def pop3gwCommand() -> list:
    script = os.path.join(BIN, "pop3gw")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "pop3gw"]


def missing(testcase, what: str) -> None:
    """
    Skip the test for a missing tool or feature, except under CI
    (C{CI=true}), where .ci/run installs everything the tests use and
    anything missing is a failure.
    """
    if os.environ.get("CI"):
        testcase.fail(f"{what} (.ci/run should have installed it)")
    testcase.skipTest(what)


def requireProgram(testcase, name: str) -> str:
    """
    The path of an installed program; see L{missing} for when it is not.
    """
    path = shutil.which(name)
    if path is None:
        missing(testcase, f"{name} is not installed")
    return path


def requireSwaksTLS(testcase) -> str:
    """
    The path of a swaks that can do STARTTLS.  Debian's swaks needs
    Net::SSLeay for it (libnet-ssleay-perl, only recommended, so left out
    by C{apt-get install --no-install-recommends}); see L{missing} for when
    it is not there.
    """
    swaks = requireProgram(testcase, "swaks")
    support = subprocess.run([swaks, "--support"], capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    if not re.search(rb"^=== TLS supported", support.stdout + support.stderr, re.M):
        missing(testcase, "swaks cannot do TLS: Net::SSLeay is missing (Debian: libnet-ssleay-perl)")
    return swaks


def requirePortsFree(testcase, ports, host: str = "127.0.0.1") -> None:
    """
    Skip the test when one of C{ports} cannot be listened on at C{host},
    for example because the server from the README's first set-up step is
    still running.  The check binds as Twisted's listeners do (with
    C{SO_REUSEADDR}), so connections in TIME_WAIT do not count.
    """
    busy = []
    for port in ports:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError:
            busy.append(str(port))
        finally:
            probe.close()
    if busy:
        what = "port" if len(busy) == 1 else "ports"
        testcase.skipTest(f"{host} {what} {', '.join(busy)} in use (is a pop3gw from the README's first step still running?)")


def silentUDPPort(testcase) -> int:
    """
    A UDP port on 127.0.0.1 bound (and never read) until C{testcase} ends:
    a name server that never answers, so that a server under test asks no
    real one.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    testcase.addCleanup(sock.close)
    return sock.getsockname()[1]


class Pop3gwProcess:
    """
    One running C{twistd -n pop3gw}.

    @ivar ports: listener name -> port number, read from the server's log.
    @ivar paths: listener name -> Unix socket path, read from the server's
        log (a listener given in C{args} as C{unix:PATH}).
    @ivar cwd: the server's working directory (C{None}: the tests').
    """

    def __init__(self, testcase, args=(), listeners=("pop3", "submission"), config: Optional[str] = None,
                 dataDir: Optional[str] = None, failureDelay: float = 0.2, extraConfig: str = "",
                 cwd: Optional[str] = None) -> None:
        self.testcase = testcase
        self.cwd = cwd
        if dataDir is None:
            dataDir = tempfile.mkdtemp(prefix="pop3gw-e2e-")
            testcase.addCleanup(shutil.rmtree, dataDir, True)
        self.dataDir = dataDir
        self.listeners = listeners
        self.args = list(args)
        if config is None:
            config = os.path.join(dataDir, "test.ini")
            with open(config, "w") as f:
                f.write(f"[limits]\nfailure-delay = {failureDelay}\n{extraConfig}")
                if "[inbound]" not in extraConfig:
                    # No DNS beyond loopback: the inbound checks of --mx
                    # run only in tests that give them a test name server,
                    # and its reverse lookups go to a port that never
                    # answers.
                    f.write(f"\n[inbound]\nchecks = no\ndns-server = 127.0.0.1:{silentUDPPort(testcase)}\n")
        self.config = config
        self.proc: Optional[subprocess.Popen] = None
        self.output: list = []
        self.ports: dict = {}
        self.paths: dict = {}
        self._portsReady = threading.Event()

    def command(self) -> list:
        cmd = twistdCommand() + ["-n", "--pidfile=", "--logfile=-", "pop3gw", "--config", self.config,
                                 "--data-dir", self.dataDir, "--hostname", "mail.example.org"]
        for name in ("pop3", "pop3s", "submission", "submissions", "mx"):
            if name in self.listeners:
                cmd += [f"--{name}", "tcp:0:interface=127.0.0.1"]
            elif name in ("pop3", "submission"):
                cmd += [f"--{name}", "none"]
        return cmd + self.args

    def start(self) -> "Pop3gwProcess":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=self.cwd)
        self.testcase.addCleanup(self.stop)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._portsReady.wait(0.1):
                return self
            if self.proc.poll() is not None:
                break
        self.stop()
        raise AssertionError("pop3gw did not start:\n" + self.log())

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            self.output.append(line)
            m = _LISTENING.search(line)
            if m:
                self.ports[m.group(1)] = int(m.group(3))
            m = _LISTENING_UNIX.search(line)
            if m:
                self.paths[m.group(1)] = m.group(2)
            if all(n in self.ports or n in self.paths for n in self.listeners):
                self._portsReady.set()

    def log(self) -> str:
        return "".join(self.output)

    def waitForLog(self, pattern: str, timeout: float = 10.0) -> str:
        """
        Wait until a log line matches C{pattern} (a regex); return it.
        """
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.output):
                if rx.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r} in:\n{self.log()}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def cli(self, *args: str, input: bytes = b"", check: bool = True) -> subprocess.CompletedProcess:
        """
        Run C{pop3gw --data-dir DATA ARGS...}.
        """
        result = subprocess.run(pop3gwCommand() + ["--data-dir", self.dataDir, *args], input=input,
                                capture_output=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"pop3gw {' '.join(args)} exited {result.returncode}: {result.stderr!r}")
        return result

    def addUser(self, address: str, password: str) -> None:
        self.cli("user", "add", address, input=password.encode() + b"\n")

    def deliver(self, address: str, message: bytes) -> None:
        self.cli("deliver", address, input=message)

    def maildir(self, address: str) -> str:
        local, domain = address.split("@")
        return os.path.join(self.dataDir, "mail", domain, local)
