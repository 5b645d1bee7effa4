#!/usr/bin/env python3
"""
The cost of an SMTP submission connection alone: each client repeats
connect, greeting, EHLO, AUTH PLAIN, QUIT and close, sending no message,
until C{--count} connections in total were made.  Prints connections/s
and, with C{--pid}, the server's CPU per connection (user and system time
of all its threads from C{/proc}, so Linux only), split into user and
system time.

Run it beside the yardstick's C{smtp-submit} (session and reuse modes):
their difference per message is a connection's part plus whatever a
slower message rate costs the server elsewhere (fewer messages per
group commit and per reactor turn); this figure is the connection's part
alone.

    python3 bench/smtp_connections.py --port 4587 --user 'u{i}@example.org' \\
        --password pw --count 4000 --concurrency 8 --pid "$(cat twistd.pid)"

Standard library only; only C{--host} (loopback) is contacted; every
loop is bounded by C{--count}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import time


def cpuTicks(pid: int) -> tuple[int, int]:
    """
    User and system clock ticks used so far by every thread of C{pid}.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


async def reply(reader: asyncio.StreamReader) -> bytes:
    """
    Read one SMTP reply; return its last line.
    """
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line


async def connection(host: str, port: int, user: str, password: str, timeout: float) -> None:
    """
    One connection: greeting, EHLO, AUTH PLAIN, QUIT, close.
    """
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
        for command, expected in ((None, b"220"), (b"EHLO bench.client", b"250"), (b"AUTH PLAIN " + token, b"235"), (b"QUIT", b"221")):
            if command is not None:
                writer.write(command + b"\r\n")
            line = await asyncio.wait_for(reply(reader), timeout)
            if not line.startswith(expected):
                raise ConnectionError(f"unexpected reply {line[:100]!r}")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def run(args: argparse.Namespace) -> int:
    left = [args.count]
    errors = [0]

    async def client(number: int) -> None:
        user = args.user.replace("{i}", str(number % args.users + 1))
        while left[0] > 0:
            left[0] -= 1
            try:
                await connection(args.host, args.port, user, args.password, args.timeout)
            except (OSError, ConnectionError, asyncio.TimeoutError):
                errors[0] += 1

    before = cpuTicks(args.pid) if args.pid else None
    start = time.monotonic()
    await asyncio.gather(*(client(number) for number in range(args.concurrency)))
    wall = time.monotonic() - start
    done = args.count - errors[0]
    line = f"{args.count} connections, {errors[0]} errors, {args.count / wall:.0f}/s"
    if before is not None and done:
        after = cpuTicks(args.pid)
        tick = 1000.0 / os.sysconf("SC_CLK_TCK")
        user, system = ((a - b) * tick / args.count for a, b in zip(after, before))
        line += f"; server CPU {user + system:.3f} ms per connection (user {user:.3f}, system {system:.3f})"
    print(line)
    return 1 if errors[0] else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", required=True, help="login; {i} becomes 1..--users")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--password", required=True)
    ap.add_argument("--count", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--pid", type=int, help="the server's process id: its CPU is reported")
    args = ap.parse_args()
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        ap.error("only a loopback --host")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
