#!/usr/bin/env python3
"""
One C{twistd -n pop3gw --store postgresql://...} node under many open POP3
sessions, and one large message retrieved: prints the database connections
the node holds with C{--sessions} sessions logged in (each holding its own
maildrop's lock), the time to log them all in, and the node's RSS before,
during and after a C{RETR} of a C{--size} MiB message.

It starts its own private PostgreSQL cluster (as C{tests/pgcluster.py}
does: C{initdb} in a temporary directory, Unix socket only) and its own
node on loopback ports chosen by the kernel; both are stopped by PID and
their directories removed at the end.  Users are inserted directly with
one salted SHA-256 hash (cheap to verify, so the logins measure the store,
not Argon2).  Run from the repository root with the virtualenv's Python;
nothing here is run by the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import poplib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import pgcluster  # noqa: E402

PASSWORD = "bench password"
BIN = os.path.dirname(sys.executable)


def sshaHash(password: str) -> str:
    salt = os.urandom(8)
    return "{SSHA256}" + base64.b64encode(hashlib.sha256(password.encode() + salt).digest() + salt).decode()


def rss(pid: int) -> int:
    """
    @return: the resident set size of C{pid}, in KiB.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def login(port: int, user: str, timeout: float) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(reader.readline(), timeout)
    writer.write(f"USER {user}\r\nPASS {PASSWORD}\r\n".encode())
    await asyncio.wait_for(reader.readline(), timeout)
    reply = await asyncio.wait_for(reader.readline(), timeout)
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"login of {user} refused: {reply!r}")
    return writer


async def openSessions(port: int, count: int, timeout: float) -> list:
    # Two checks run and 16 wait per client address (pop3gw.anvil).
    semaphore = asyncio.Semaphore(16)

    async def one(i: int) -> asyncio.StreamWriter:
        async with semaphore:
            return await login(port, f"u{i}@example.org", timeout)

    return await asyncio.gather(*(one(i) for i in range(count)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--size", type=int, default=40, help="MiB of the large message")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()

    class _Case:
        def fail(self, text: str) -> None:
            raise SystemExit(text)

        skipTest = fail

        def addCleanup(self, *a) -> None:
            pass

    binDir = pgcluster.binDirectory()
    if binDir is None:
        raise SystemExit("PostgreSQL is not installed")
    cluster = pgcluster.Cluster(binDir).start()
    dataDir = tempfile.mkdtemp(prefix="pop3gw-bench-")
    node = None
    try:
        uri = cluster.newDatabase()
        subprocess.run([os.path.join(BIN, "pop3gw"), "--store", uri, "init"], check=True, capture_output=True)
        import psycopg

        with psycopg.connect(uri, autocommit=True) as conn:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO pop3gw_users (address, lookup_key, hash) VALUES (%s, %s, %s)",
                    [(f"u{i}@example.org", f"u{i}@example.org", sshaHash(PASSWORD)) for i in range(args.sessions)],
                )
        big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * (args.size * 1024 * 1024 // 1000)
        subprocess.run([os.path.join(BIN, "pop3gw"), "--store", uri, "deliver", "u0@example.org"], input=big,
                       check=True, capture_output=True)
        config = os.path.join(dataDir, "bench.ini")
        with open(config, "w") as f:
            f.write("[limits]\nfailure-delay = 0.2\n")
        node = subprocess.Popen(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "--logfile=-", "pop3gw", "--config", config,
             "--data-dir", dataDir, "--store", uri, "--pop3", "tcp:0:interface=127.0.0.1", "--submission", "none"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        port = None
        assert node.stdout is not None
        for raw in node.stdout:
            m = re.search(rb"pop3 listening on 127\.0\.0\.1:(\d+)", raw)
            if m:
                port = int(m.group(1))
                break
        if port is None:
            raise SystemExit("the node did not start")
        threading.Thread(target=lambda: [None for _ in node.stdout], daemon=True).start()

        def connections() -> int:
            with psycopg.connect(cluster.uri(), autocommit=True) as conn:
                name = uri.split("/")[3].split("?")[0]
                return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)).fetchone()[0]

        print(f"node pid {node.pid}; {connections()} database connection(s) at start; RSS {rss(node.pid)} KiB")
        loop = asyncio.new_event_loop()
        started = time.monotonic()
        writers = loop.run_until_complete(openSessions(port, args.sessions, args.timeout))
        took = time.monotonic() - started
        print(f"{len(writers)} POP3 sessions logged in (each holding its maildrop) in {took:.1f} s; "
              f"database connections of the node: {connections()}; RSS {rss(node.pid)} KiB")
        for w in writers:
            w.write(b"QUIT\r\n")
        loop.run_until_complete(asyncio.sleep(1))
        for w in writers:
            w.close()
        loop.close()

        before = rss(node.pid)
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss(node.pid))
                time.sleep(0.05)

        threading.Thread(target=sample, daemon=True).start()
        deadline = time.monotonic() + args.timeout
        while True:
            client = poplib.POP3("127.0.0.1", port, timeout=args.timeout)
            client.user("u0@example.org")
            try:
                client.pass_(PASSWORD)
                break
            except poplib.error_proto:
                client.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        started = time.monotonic()
        _, lines, octets = client.retr(1)
        took = time.monotonic() - started
        client.quit()
        done.set()
        print(f"RETR of a {octets}-octet message in {took:.1f} s: node RSS {before} KiB before, "
              f"peak {peak[0]} KiB during, {rss(node.pid)} KiB after")
    finally:
        if node is not None and node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
        cluster.stop()
        shutil.rmtree(dataDir, ignore_errors=True)


if __name__ == "__main__":
    main()
