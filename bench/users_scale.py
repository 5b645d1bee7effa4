#!/usr/bin/env python3
"""
Cost of many users: a users file of C{--users} lines (10,000), every user
with the same password hash (one C{pop3gw user add}, then copies of its
line, so the file is written in a moment), and:

- start-up: seconds from starting C{twistd pop3gw} until it accepts
  connections, and its RSS then;
- cold login: USER/PASS/QUIT of users nobody logged in as yet (the
  password hash is checked), and warm: the same users again (the
  credential cache answers), milliseconds each;
- C{pop3gw user add} of one more user into the big file (it rewrites the
  file), then that user's first login, at once: milliseconds, and whether
  it succeeded (the server re-reads the file when a login finds it
  changed).

C{--repeats} turns of the logins; medians and ranges are printed.
Everything runs on 127.0.0.1 in a temporary directory removed at the end;
the server is stopped by its PID.  Standard library only, plus the
C{twistd} and C{pop3gw} of C{--bin}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import pop3_load

PASSWORD = "bench-password"


def freePort() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rssKB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def login(port: int, user: str) -> float:
    t0 = time.perf_counter()
    client = await pop3_load.POP3Client.open("127.0.0.1", port, 60.0)
    await client.command(b"USER " + user.encode())
    await client.command(b"PASS " + PASSWORD.encode())
    await client.quit()
    return (time.perf_counter() - t0) * 1000


def spread(values: list) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}..{max(values):.1f}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default=os.path.dirname(sys.executable))
    p.add_argument("--users", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.users > 1_000_000:
        raise SystemExit("at most 1000000 users")
    pop3gw = os.path.join(args.bin, "pop3gw")
    data = tempfile.mkdtemp(prefix="users-scale-")
    proc = None
    try:
        subprocess.run([pop3gw, "--data-dir", data, "user", "add", "u0@example.org"], input=(PASSWORD + "\n").encode(),
                       check=True, stdout=subprocess.DEVNULL)
        path = os.path.join(data, "users")
        with open(path) as f:
            [line] = [x for x in f if x.startswith("u0@")]
        rest = line.split(":", 1)[1]
        with open(path + ".new", "w") as f:
            for n in range(args.users):
                f.write(f"u{n}@example.org:{rest}")
        os.chmod(path + ".new", os.stat(path).st_mode)
        os.rename(path + ".new", path)
        port = freePort()
        t0 = time.perf_counter()
        log = open(os.path.join(data, "twistd.log"), "wb")
        proc = subprocess.Popen(
            [os.path.join(args.bin, "twistd"), "-n", "--pidfile=", "pop3gw", "--data-dir", data,
             "--domain", "example.org", "--pop3", f"tcp:{port}:interface=127.0.0.1", "--submission", "none"],
            stdout=log, stderr=subprocess.STDOUT, cwd=data,
        )
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.perf_counter() - t0 > 120 or proc.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.01)
        started = time.perf_counter() - t0
        print(f"start-up with {args.users} users: {started:.2f} s, RSS {rssKB(proc.pid)} KB", flush=True)
        cold, warm, added, visible = [], [], [], []
        step = max(1, args.users // (args.repeats + 1))
        for r in range(args.repeats):
            user = f"u{step * (r + 1)}@example.org"
            cold.append(asyncio.run(login(port, user)))
            warm.append(asyncio.run(login(port, user)))
            new = f"new{r}@example.org"
            t0 = time.perf_counter()
            subprocess.run([pop3gw, "--data-dir", data, "user", "add", new], input=(PASSWORD + "\n").encode(),
                           check=True, stdout=subprocess.DEVNULL)
            added.append((time.perf_counter() - t0) * 1000)
            visible.append(asyncio.run(login(port, new)))
        print(f"cold login ms {spread(cold)}; warm login ms {spread(warm)}", flush=True)
        print(f"user add ms {spread(added)}; that user's first login ms {spread(visible)} (every one succeeded)",
              flush=True)
        print(f"RSS after: {rssKB(proc.pid)} KB", flush=True)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
