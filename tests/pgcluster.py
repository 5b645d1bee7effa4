"""
A private PostgreSQL cluster for the tests: C{initdb} into a temporary
directory as an unprivileged OS user, started with C{pg_ctl} listening on a
Unix socket only (no TCP port), stopped by PID and removed at the end.

The tests never use a system service.  L{shared} starts one cluster for the
whole test run on first use (the session fixture in C{tests/conftest.py}
stops it; under trial, an C{atexit} hook does); each test gets its own
database from L{Cluster.newDatabase}.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Optional
from urllib.parse import quote

from tests.e2e import missing

#: The OS user the cluster runs as when the tests run as root (PostgreSQL
#: refuses to run as root); Debian's postgresql package creates it.
CLUSTER_USER = "postgres"

#: Database super-user name given to initdb.
SUPERUSER = "pop3gw"

START_TIMEOUT = 60.0


def binDirectory() -> Optional[str]:
    """
    @return: the directory of Debian's PostgreSQL server programs (the
        newest version installed), or C{None}.
    """
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


class Cluster:
    """
    One private cluster.

    @ivar root: temporary directory holding the data directory and the
        socket directory.
    @ivar socketDir: where the server's Unix socket is.
    """

    def __init__(self, binDir: str) -> None:
        self.binDir = binDir
        self.root = tempfile.mkdtemp(prefix="pop3gw-pg-")
        self.dataDir = os.path.join(self.root, "data")
        self.socketDir = os.path.join(self.root, "socket")
        self.pid: Optional[int] = None
        self._counter = 0
        self._runAs: list[str] = []
        if os.geteuid() == 0:
            entry = pwd.getpwnam(CLUSTER_USER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._runAs = ["runuser", "-u", CLUSTER_USER, "--"]
        os.chmod(self.root, 0o755)

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            self._runAs + list(args), capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout, check=False
        )

    def start(self) -> "Cluster":
        result = self._run(
            os.path.join(self.binDir, "initdb"), "-D", self.dataDir, "-A", "trust", "-U", SUPERUSER,
            "-E", "UTF8", "--locale=C", "--no-sync",
        )
        if result.returncode:
            raise RuntimeError("initdb failed: " + result.stderr.decode(errors="replace"))
        self._run("mkdir", "-m", "0755", self.socketDir)
        self.startServer()
        return self

    def startServer(self) -> None:
        """
        Start the server on the cluster (again, after L{stopServer}).
        """
        options = f"-k {self.socketDir} -c listen_addresses='' -c fsync=off -c max_connections=200"
        result = self._run(
            os.path.join(self.binDir, "pg_ctl"), "start", "-w", "-t", str(int(START_TIMEOUT)), "-D", self.dataDir,
            "-l", os.path.join(self.root, "server.log"), "-o", options,
        )
        if result.returncode:
            log = ""
            try:
                with open(os.path.join(self.root, "server.log")) as f:
                    log = f.read()
            except OSError:
                pass
            raise RuntimeError("pg_ctl start failed: " + result.stderr.decode(errors="replace") + log)
        with open(os.path.join(self.dataDir, "postmaster.pid")) as f:
            self.pid = int(f.readline())

    def stopServer(self) -> None:
        """
        Stop the server (fast shutdown: sessions are disconnected), keeping
        the cluster for L{startServer}.
        """
        result = self._run(os.path.join(self.binDir, "pg_ctl"), "stop", "-w", "-m", "fast", "-D", self.dataDir)
        if result.returncode:
            raise RuntimeError("pg_ctl stop failed: " + result.stderr.decode(errors="replace"))
        self.pid = None

    def standby(self) -> "Cluster":
        """
        A streaming-replication standby of this cluster (C{pg_basebackup
        -R} over its socket), started on a socket directory of its own.
        Commits on this cluster then wait for the standby
        (C{synchronous_standby_names}), so nothing acknowledged is lost
        when the standby is promoted.
        """
        import psycopg

        other = Cluster(self.binDir)
        other._run("mkdir", "-m", "0755", other.socketDir)
        result = other._run(
            os.path.join(self.binDir, "pg_basebackup"), "-D", other.dataDir, "-R", "-X", "stream",
            "-h", self.socketDir, "-U", SUPERUSER, "--no-sync", "-c", "fast",
        )
        if result.returncode:
            other.remove()
            raise RuntimeError("pg_basebackup failed: " + result.stderr.decode(errors="replace"))
        other.startServer()
        with psycopg.connect(self.uri(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
        return other

    def promote(self) -> None:
        """
        Make this standby a primary.
        """
        result = self._run(os.path.join(self.binDir, "pg_ctl"), "promote", "-w", "-D", self.dataDir)
        if result.returncode:
            raise RuntimeError("pg_ctl promote failed: " + result.stderr.decode(errors="replace"))

    def uri(self, database: str = "postgres") -> str:
        """
        @return: the libpq URI of C{database} over the Unix socket.
        """
        return f"postgresql://{SUPERUSER}@/{database}?host={quote(self.socketDir, safe='')}"

    def newDatabase(self) -> str:
        """
        Create an empty database.

        @return: its URI.
        """
        import psycopg

        self._counter += 1
        name = f"test_{os.getpid()}_{self._counter}"
        with psycopg.connect(self.uri(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def dropDatabase(self, uri: str) -> None:
        """
        Drop the database of C{uri}, ending its connections first.
        """
        import psycopg

        name = uri.split("/")[3].split("?")[0]
        with psycopg.connect(self.uri(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """
        Stop the server by its PID (fast shutdown, then SIGKILL after a
        while) and remove every file.
        """
        pid, self.pid = self.pid, None
        if pid is not None:
            try:
                os.kill(pid, signal.SIGINT)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    os.kill(pid, 0)
                    time.sleep(0.05)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_shared: Optional[Cluster] = None


def shared(testcase) -> Cluster:
    """
    The test run's cluster, started on first use; see L{tests.e2e.missing}
    for when PostgreSQL or psycopg is not installed.
    """
    global _shared
    if _shared is None:
        binDir = binDirectory()
        if binDir is None:
            missing(testcase, "PostgreSQL is not installed (Debian: postgresql)")
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError:
            missing(testcase, "psycopg is not installed (pip install '.[postgresql]')")
        assert binDir is not None
        cluster = Cluster(binDir)
        try:
            _shared = cluster.start()
        except BaseException:
            cluster.remove()
            raise
        atexit.register(stopShared)
    return _shared


def stopShared() -> None:
    """
    Stop the test run's cluster, if one was started.
    """
    global _shared
    cluster, _shared = _shared, None
    if cluster is not None:
        cluster.stop()


def database(testcase) -> str:
    """
    A new database for C{testcase} in the shared cluster, dropped in its
    cleanups.

    @return: its URI.
    """
    cluster = shared(testcase)
    uri = cluster.newDatabase()
    testcase.addCleanup(cluster.dropDatabase, uri)
    return uri


def private(testcase) -> Cluster:
    """
    A cluster of C{testcase}'s own (to stop and start), stopped by its PID
    and removed in its cleanups.
    """
    shared(testcase)
    binDir = binDirectory()
    assert binDir is not None
    cluster = Cluster(binDir)
    testcase.addCleanup(cluster.stop)
    return cluster.start()
