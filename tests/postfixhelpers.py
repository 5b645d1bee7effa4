"""
A private Postfix instance for end-to-end tests: its own configuration,
queue and data directories under a temporary directory, its SMTP server on
a loopback port chosen when it starts, its log in a file of its own.  The
system's Postfix (C{/etc/postfix}, C{/var/spool/postfix}) is never used.

Postfix needs the C{postfix} user and the C{postdrop} group, which the
Debian package creates, and root to start its master daemon (which then
runs its daemons as C{postfix}).  Every instance is stopped by the PID its
master wrote (C{postfix stop}, then C{SIGKILL} to the master's process
group if it is still there), and its directory removed.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Optional

from tests.e2e import missing, requireProgram

#: The services of a Postfix that takes mail over SMTP on loopback and
#: delivers it with smtp, lmtp or pipe; nothing chrooted (the private queue
#: directory has none of the files a chroot needs).  The SMTP server's
#: line is added in front with the port chosen at start.
MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
"""

#: Seconds to wait for Postfix to start or stop.
TIMEOUT = 60.0


def freePort() -> int:
    """
    A loopback TCP port nobody listens on right now.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
    finally:
        probe.close()


def requirePostfix(testcase) -> str:
    """
    The path of the C{postfix} command, after checking that a private
    instance can run here: root, and the C{postfix} user and C{postdrop}
    group of the Debian package.
    """
    postfix = requireProgram(testcase, "postfix")
    if os.geteuid() != 0:
        testcase.skipTest("a private Postfix instance needs root: its master daemon starts as root")
    for kind, lookup, name in (("user", pwd.getpwnam, "postfix"), ("group", grp.getgrnam, "postdrop")):
        try:
            lookup(name)
        except KeyError:
            missing(testcase, f"Postfix's {kind} {name} does not exist (Debian's postfix package creates it)")
    return postfix


def shareWithPostfix(path: str) -> None:
    """
    Give a Unix socket pop3gw made (mode 0660) to the C{postfix} group,
    as the README says: its daemons run as C{postfix}.
    """
    os.chown(path, -1, grp.getgrnam("postfix").gr_gid)


class PrivatePostfix:
    """
    One private Postfix instance.

    @ivar top: the temporary directory holding everything of it.
    @ivar configDirectory: its C{config_directory} (C{main.cf}, C{master.cf}).
    @ivar port: the loopback port its SMTP server listens on.
    @ivar maillog: the path of its log file (C{maillog_file}).
    """

    def __init__(self, testcase, mainCf: str = "", masterCf: str = "") -> None:
        self.testcase = testcase
        self.postfix = requirePostfix(testcase)
        self.top = tempfile.mkdtemp(prefix="pop3gw-postfix-")
        testcase.addCleanup(shutil.rmtree, self.top, True)
        # Postfix's daemons (user postfix) reach their queue directory and
        # pop3gw's sockets through it.
        os.chmod(self.top, 0o755)
        self.configDirectory = os.path.join(self.top, "etc")
        self.queueDirectory = os.path.join(self.top, "spool")
        dataDirectory = os.path.join(self.top, "data")
        for path in (self.configDirectory, self.queueDirectory, dataDirectory):
            os.mkdir(path, 0o755)
        postfixUser = pwd.getpwnam("postfix")
        os.chown(dataDirectory, postfixUser.pw_uid, postfixUser.pw_gid)
        self.maillog = os.path.join(self.top, "maillog")
        self.port = freePort()
        self.masterPid: Optional[int] = None
        with open(os.path.join(self.configDirectory, "main.cf"), "w") as f:
            f.write(
                "compatibility_level = 3.6\n"
                f"queue_directory = {self.queueDirectory}\n"
                f"data_directory = {dataDirectory}\n"
                "mail_owner = postfix\n"
                "setgid_group = postdrop\n"
                "inet_interfaces = loopback-only\n"
                "inet_protocols = ipv4\n"
                "mynetworks = 127.0.0.0/8\n"
                "myhostname = mta.example.org\n"
                "mydestination =\n"
                "alias_maps =\n"
                "alias_database =\n"
                # Headers reach pop3gw as the test wrote them.
                "local_header_rewrite_clients =\n"
                "smtp_tls_security_level = none\n"
                "smtpd_tls_security_level = none\n"
                f"maillog_file_prefixes = {self.top}\n"
                f"maillog_file = {self.maillog}\n"
                + mainCf
            )
        with open(os.path.join(self.configDirectory, "master.cf"), "w") as f:
            f.write(f"127.0.0.1:{self.port} inet n - n - - smtpd\n" + MASTER_CF + masterCf)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """
        Run C{postfix -c CONFIG ARGS...}.
        """
        result = subprocess.run([self.postfix, "-c", self.configDirectory, *args], capture_output=True,
                                stdin=subprocess.DEVNULL, timeout=TIMEOUT)
        if check and result.returncode != 0:
            raise AssertionError(f"postfix {' '.join(args)} exited {result.returncode}: "
                                 f"{result.stdout + result.stderr!r}\n{self.log()}")
        return result

    def start(self) -> "PrivatePostfix":
        """
        Start the instance; stop it when the test ends.
        """
        self.testcase.addCleanup(self.stop)
        self.run("start")
        self.masterPid = self._pidFromFile()
        if self.masterPid is None:
            raise AssertionError(f"Postfix started but wrote no master.pid:\n{self.log()}")
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"Postfix does not listen on 127.0.0.1:{self.port}:\n{self.log()}")

    def stop(self) -> None:
        """
        Stop the instance: C{postfix stop}, then kill the master's process
        group by its PID if it is still there.
        """
        pid = self.masterPid if self.masterPid is not None else self._pidFromFile()
        self.masterPid = None
        if pid is None:
            return
        self.run("stop", check=False)
        deadline = time.monotonic() + TIMEOUT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                os.kill(pid, signal.SIGKILL)

    def _pidFromFile(self) -> Optional[int]:
        """
        The PID the master daemon wrote, if it did (also when C{start}
        failed half-way).
        """
        try:
            with open(os.path.join(self.queueDirectory, "pid", "master.pid")) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def log(self) -> str:
        """
        The instance's log so far.
        """
        try:
            with open(self.maillog, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def waitForLog(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """
        Wait until a line of the instance's log matches C{pattern} (a
        regular expression); return the match.
        """
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = rx.search(self.log())
            if m:
                return m
            time.sleep(0.1)
        raise AssertionError(f"no Postfix log line matching {pattern!r} in:\n{self.log()}")


def _alive(pid: int) -> bool:
    """
    Whether process C{pid} still exists (not yet reaped counts: a zombie
    of another parent holds nothing of ours).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
