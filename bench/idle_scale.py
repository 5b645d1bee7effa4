#!/usr/bin/env python3
"""
Memory of idle connections: C{--count} (1,000) connections to each of POP3,
submission, POP3 over TLS and submission over TLS (TLS ones after the
handshake and the greeting), held open at the same time, each kind
against a freshly started server, and the server's PSS, RSS and USS
(C{/proc/PID/smaps_rollup}) before and after, per connection.

It starts C{twistd pop3gw} itself (from C{--bin}) with its connection
limits raised (C{[limits] max-connections}, C{max-connections-per-ip}) and
C{RLIMIT_NOFILE} raised to its hard limit for both sides.  Everything runs
on 127.0.0.1 in a temporary directory removed at the end; the server is
stopped by its PID.  Standard library only, plus the C{twistd} of C{--bin}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import pop3_load

KINDS = ("pop3", "submission", "pop3s", "submissions")


def freePort() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def hold(port: int, count: int, tls: bool, pid: int, settle: float) -> dict:
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    before = pop3_load.serverMemory(pid)
    conns = []
    errors = 0

    async def one():
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context), 60
        )
        line = await asyncio.wait_for(reader.readline(), 60)
        if not line:
            raise ConnectionError("closed")
        return writer

    opened = 0
    while opened < count:
        batch = min(25, count - opened)
        opened += batch
        for r in await asyncio.gather(*(one() for _ in range(batch)), return_exceptions=True):
            if isinstance(r, BaseException):
                errors += 1
            else:
                conns.append(r)
    await asyncio.sleep(settle)
    after = pop3_load.serverMemory(pid)
    for w in conns:
        w.transport.abort()
    await asyncio.sleep(0.2)
    n = len(conns)
    out = {"opened": n, "errors": errors}
    for key in ("pss", "rss", "uss"):
        out[key] = (after[f"{key}_kb"] - before[f"{key}_kb"]) / n if n else None
    return out


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default=os.path.dirname(sys.executable))
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--kinds", default=",".join(KINDS))
    args = p.parse_args()
    if args.count > 20000:
        raise SystemExit("at most 20000 connections")
    pop3_load.raiseFileLimit()
    data = tempfile.mkdtemp(prefix="idle-scale-")
    ports = {kind: freePort() for kind in KINDS}
    with open(os.path.join(data, "limits.ini"), "w") as f:
        f.write(f"[limits]\nmax-connections = {4 * args.count + 100}\nmax-connections-per-ip = {4 * args.count + 100}\n")
    command = [os.path.join(args.bin, "twistd"), "-n", "--pidfile=", "pop3gw", "--data-dir", data,
               "--domain", "example.org", "--config", os.path.join(data, "limits.ini")]
    for kind, port in ports.items():
        command += [f"--{kind}", f"tcp:{port}:interface=127.0.0.1"]
    print(f"{'kind':12} {'open':>6} {'errors':>6} {'PSS KB/conn':>12} {'RSS KB/conn':>12} {'USS KB/conn':>12}")
    proc = None
    try:
        for kind in args.kinds.split(","):
            # A fresh server per kind: memory freed by one kind's connections
            # would otherwise be reused by the next and hide its cost.
            log = open(os.path.join(data, "twistd.log"), "ab")
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=data)
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", ports[kind]), 1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.05)
            # A few connections first, so lazily built state is not counted.
            asyncio.run(hold(ports[kind], 5, kind.endswith("s"), proc.pid, 0.1))
            r = asyncio.run(hold(ports[kind], args.count, kind.endswith("s"), proc.pid, args.settle))
            print(f"{kind:12} {r['opened']:>6} {r['errors']:>6} {r['pss']:>12.2f} {r['rss']:>12.2f} {r['uss']:>12.2f}",
                  flush=True)
            stop(proc)
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
