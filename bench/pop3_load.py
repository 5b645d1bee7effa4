#!/usr/bin/env python3
"""
POP3 load generator for any POP3 server (pop3gw, Dovecot, twistd mail, ...).

Subcommands::

    sessions  C concurrent clients repeat USER/PASS, STAT, LIST, UIDL, QUIT
    retr      one client RETRs every message and checks each one's size
    idle      hold N connections open; server memory per connection
    seed      write N messages of SIZE octets into a Maildir (tmp -> new)

Every measuring run prints the client's own CPU time as a percentage of the
wall time (100 = one core busy; near 100 means the figure is the client's
limit, not the server's), and the server's CPU when C{--pid} is given.
With C{--json}, each result is one JSON line on stdout and the human summary
goes to stderr.

Standard library only (helpers shared with the other load generator are
in C{_common.py} next to this script); nothing here is run by the test
suite.  Every loop is bounded by a count and a time, and only C{--host} is
contacted (loopback unless C{--allow-remote}).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import sys
import time
from typing import Optional

import _common
from _common import (
    ERROR_BACKOFF,
    FILLER,
    MAX_SAMPLES,
    CPUMeter,
    addTarget,
    cancelPending,
    concurrencyList,
    countError,
    cpuText,
    describe,
    emit,
    errorText,
    latencies,
    positive,
    shown,
    userFor,
)

#: Seconds any single read, connect or write may take before the operation
#: counts as failed.
DEFAULT_TIMEOUT = 10.0

#: Octets asked for per read of a multi-line response.
READ_CHUNK = 256 * 1024

#: Largest multi-line response accepted (a runaway server must not eat RAM).
MAX_RESPONSE = 512 * 1024 * 1024

#: Default upper bound of sessions started by one C{sessions} level.
DEFAULT_MAX_SESSIONS = 1_000_000

#: Connections opened at once by C{idle} (below Twisted's default listen
#: backlog of 50, so no SYN is dropped and retried a second later).
IDLE_BATCH = 25



# --------------------------------------------------------------- reporting


def serverMemory(pid: int) -> dict:
    """
    Memory of C{pid} in KiB: RSS (from C{/proc/PID/status}), and PSS and
    USS (private pages: Private_Clean + Private_Dirty) from
    C{/proc/PID/smaps_rollup}; a value is C{None} when it cannot be read.

    USS is the steadiest per-connection figure for one process; PSS also
    moves when other processes sharing its library pages start or exit.
    """
    out: dict = {"rss_kb": None, "pss_kb": None, "uss_kb": None}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_kb"] = int(line.split()[1])
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["pss_kb"] = int(line.split()[1])
                elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                    out["uss_kb"] = (out["uss_kb"] or 0) + int(line.split()[1])
    except OSError:
        pass
    return out


def raiseFileLimit() -> tuple:
    """
    Raise this process's soft C{RLIMIT_NOFILE} to its hard limit.

    @return: the (soft, hard) limits now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ------------------------------------------------------------- POP3 client


class POP3Failure(_common.Failure):
    """
    A session failed; C{kind} is a short category for counting.
    """


class MaildropInUse(POP3Failure):
    """
    The server answered C{-ERR [IN-USE]}: another session holds the maildrop.
    """


class POP3Client(_common.StreamClient):
    """
    A minimal POP3 client over asyncio streams: one command at a time, every
    read bounded by C{timeout}.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        super().__init__(reader, writer, timeout)
        self.greeting = b""
        #: C{time.monotonic()} after which a multi-line response is given
        #: up, or C{None}.
        self.deadline: Optional[float] = None

    async def greet(self) -> None:
        """
        Read the greeting (which must be C{+OK}).
        """
        self.greeting = await self._status(b"greeting")

    async def _status(self, what: bytes) -> bytes:
        line = await asyncio.wait_for(self.reader.readline(), self.timeout)
        if not line:
            raise POP3Failure("closed", f"connection closed awaiting {what.decode()} reply")
        if line.startswith(b"+OK"):
            return line
        text = line[:200].decode("ascii", "replace").strip()
        if line.startswith(b"-ERR"):
            if b"[IN-USE]" in line.upper():
                raise MaildropInUse("in-use", text)
            raise POP3Failure(f"-ERR {what.decode()}", text)
        raise POP3Failure("garbage", text)

    async def command(self, line: bytes) -> bytes:
        """
        Send C{line} and return the C{+OK} status line.

        @raise POP3Failure: on C{-ERR}, garbage or a closed connection.
        """
        self.writer.write(line + b"\r\n")
        return await self._status(line.split(b" ", 1)[0].upper())

    async def multiline(self, line: bytes) -> tuple:
        """
        Send C{line}, expect C{+OK} and a multi-line body.

        @return: (status line, body): the body is still dot-stuffed, with
            CRLF line ends, without the terminating C{.CRLF}.
        """
        status = await self.command(line)
        chunks = []
        tail = b"\r\n"  # the status line's CRLF precedes the body
        total = 0
        while True:
            chunk = await asyncio.wait_for(self.reader.read(READ_CHUNK), self.timeout)
            if not chunk:
                raise POP3Failure("closed", "connection closed inside a multi-line response")
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_RESPONSE:
                raise POP3Failure("too-large", f"response over {MAX_RESPONSE} octets")
            tail = (tail + chunk)[-5:]
            if tail == b"\r\n.\r\n":
                break
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise POP3Failure("deadline", "--seconds passed inside a multi-line response")
        data = b"".join(chunks)
        return status, data[:-3]

    async def quit(self) -> None:
        """
        Send QUIT, expect C{+OK}, close.
        """
        try:
            await self.command(b"QUIT")
        finally:
            await self.close()


def inspectBody(body: bytes) -> dict:
    """
    Check a dot-stuffed CRLF multi-line body.

    @return: C{octets}, its size after unstuffing; C{unstuffed_dots}, lines
        that begin with a single dot (a server fault: RFC 1939 requires
        stuffing); C{bare_lf}, LFs not preceded by CR.
    """
    dotLines = body.count(b"\r\n.") + (1 if body.startswith(b".") else 0)
    doubleDotLines = body.count(b"\r\n..") + (1 if body.startswith(b"..") else 0)
    return {
        "octets": len(body) - dotLines,
        "unstuffed_dots": dotLines - doubleDotLines,
        "bare_lf": body.count(b"\n") - body.count(b"\r\n"),
    }


# ---------------------------------------------------------------- sessions


async def oneSession(args: argparse.Namespace, user: str) -> None:
    """
    USER/PASS, STAT, LIST, UIDL, QUIT.
    """
    client = await POP3Client.open(args.host, args.port, args.timeout)
    try:
        await client.command(b"USER " + user.encode())
        await client.command(b"PASS " + args.password.encode())
        await client.command(b"STAT")
        await client.multiline(b"LIST")
        await client.multiline(b"UIDL")
        await client.command(b"QUIT")
    except BaseException:
        client.abort()
        raise
    await client.close()


async def runSessionLevel(args: argparse.Namespace, concurrency: int) -> dict:
    """
    C{concurrency} clients doing full sessions for C{--warmup} then
    C{--seconds} seconds, or until C{--max-sessions} were started.

    Sessions/s counts the sessions completed inside the measured window
    (after the warm-up); latencies are those of the sessions started inside
    it; CPU is measured over it.  Errors and IN-USE are counted over the
    whole run, warm-up included.
    """
    users = args.users or concurrency
    state = {"started": 0, "lat": [], "completed": 0, "errors": {}, "in_use": 0, "samples": []}
    warmEnd = time.monotonic() + args.warmup
    deadline = warmEnd + args.seconds

    async def worker(index: int) -> None:
        user = userFor(args.user, index, users)
        while time.monotonic() < deadline and state["started"] < args.max_sessions:
            state["started"] += 1
            t0 = time.monotonic()
            try:
                await oneSession(args, user)
            except MaildropInUse:
                state["in_use"] += 1
                await asyncio.sleep(ERROR_BACKOFF)
            except Exception as e:
                countError(state["errors"], state["samples"], e, f"{user}: ")
                await asyncio.sleep(ERROR_BACKOFF)
            else:
                t1 = time.monotonic()
                if warmEnd <= t1 <= deadline:
                    state["completed"] += 1
                if t0 >= warmEnd:
                    state["lat"].append(t1 - t0)

    tasks = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
    meter = CPUMeter(args.pid)
    if args.warmup:
        await asyncio.wait(tasks, timeout=args.warmup)
    meter.start()
    # The window ends at the deadline, or earlier once --max-sessions ran.
    await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    cpu = meter.stop()
    # Workers stop by themselves after the deadline; the grace covers the
    # sessions still running then (each read is bounded by --timeout).
    done, pending = await asyncio.wait(tasks, timeout=6 * args.timeout + 5)
    await cancelPending(pending)
    n = state["completed"]
    wall = cpu["wall_s"]
    result = {
        "bench": "pop3-sessions",
        "host": args.host,
        "port": args.port,
        "concurrency": concurrency,
        "users": users if "{i}" in args.user else 1,
        "warmup_s": args.warmup,
        "sessions": n,
        "sessions_per_s": round(n / wall, 1) if wall else None,
        "errors": sum(state["errors"].values()),
        "errors_by_kind": state["errors"],
        "in_use": state["in_use"],
        "unfinished": len(pending),
    }
    result.update(latencies(state["lat"]))
    result.update(cpu)
    if n and "server_cpu_s" in cpu:
        result["server_cpu_ms_per_session"] = round(1000 * cpu["server_cpu_s"] / n, 3)
    if state["samples"]:
        result["error_samples"] = state["samples"]
    return result


def sessionText(r: dict) -> str:
    text = (
        f"sessions c={r['concurrency']} users={r['users']}: "
        f"{r['sessions_per_s']} sessions/s ({r['sessions']} in {r['wall_s']} s), "
        f"latency p50 {shown(r['p50_ms'])} ms p99 {shown(r['p99_ms'])} ms max {shown(r['max_ms'])} ms, "
        f"errors {r['errors']}, IN-USE {r['in_use']}; {cpuText(r)}"
    )
    text += errorText(r)
    if r["in_use"] and r["users"] < r["concurrency"]:
        text += (
            "\n  note: fewer users than clients; a maildrop is locked per session, "
            "so IN-USE is expected (use --user 'u{i}@domain' --users C)"
        )
    return text


async def cmdSessions(args: argparse.Namespace) -> int:
    status = 0
    for concurrency in args.concurrency:
        result = await runSessionLevel(args, concurrency)
        emit(args, result, sessionText(result))
        if result["errors"]:
            status = 1
    return status


# -------------------------------------------------------------------- retr


async def cmdRetr(args: argparse.Namespace) -> int:
    """
    Log in, LIST, RETR every message (or the first C{--max-messages}),
    check each size against LIST, QUIT without DELE.
    """
    user = userFor(args.user, 0, 1)
    deadline = time.monotonic() + args.seconds
    result: dict = {
        "bench": "pop3-retr",
        "host": args.host,
        "port": args.port,
        "user": user,
        "messages": 0,
        "bytes": 0,
        "wire_bytes": 0,
        "size_mismatches": 0,
        "unstuffed_dots": 0,
        "bare_lf": 0,
        "errors": 0,
        "complete": False,
    }
    samples = []
    meter = CPUMeter(args.pid)
    meter.start()
    client = None
    perMessage: list = []
    try:
        client = await POP3Client.open(args.host, args.port, args.timeout)
        client.deadline = deadline
        await client.command(b"USER " + user.encode())
        await client.command(b"PASS " + args.password.encode())
        stat = await client.command(b"STAT")
        _, listing = await client.multiline(b"LIST")
        sizes = []
        for line in listing.split(b"\r\n"):
            if line:
                number, size = line.split()[:2]
                sizes.append((int(number), int(size)))
        result["listed"] = len(sizes)
        result["stat"] = stat.decode("ascii", "replace").strip()
        if args.expect_count is not None and len(sizes) != args.expect_count:
            samples.append(f"LIST shows {len(sizes)} messages, expected {args.expect_count}")
            result["errors"] += 1
        todo = sizes[: args.max_messages]
        for number, listed in todo:
            if time.monotonic() >= deadline:
                samples.append(f"stopped by --seconds {args.seconds} before message {number}")
                break
            m0 = time.perf_counter()
            _, body = await client.multiline(b"RETR %d" % number)
            perMessage.append(time.perf_counter() - m0)
            seen = inspectBody(body)
            result["messages"] += 1
            result["bytes"] += seen["octets"]
            result["wire_bytes"] += len(body) + 3
            result["unstuffed_dots"] += seen["unstuffed_dots"]
            result["bare_lf"] += seen["bare_lf"]
            if seen["octets"] != listed:
                result["size_mismatches"] += 1
                if len(samples) < MAX_SAMPLES:
                    samples.append(f"message {number}: LIST says {listed}, RETR gave {seen['octets']}")
        else:
            result["complete"] = True
        await client.quit()
        client = None
    except Exception as e:
        result["errors"] += 1
        samples.append(describe(e))
        if client is not None:
            client.abort()
    cpu = meter.stop()
    # Transfer time only: the client's own size checks are not counted.
    retrSeconds = sum(perMessage)
    result.update(cpu)
    result["retr_s"] = round(retrSeconds, 3)
    result["MB_per_s"] = round(result["wire_bytes"] / retrSeconds / 1e6, 2) if retrSeconds else None
    result["messages_per_s"] = round(result["messages"] / retrSeconds, 1) if retrSeconds else None
    result.update(latencies(perMessage))
    if samples:
        result["error_samples"] = samples[:MAX_SAMPLES]
    text = (
        f"retr {user}: {shown(result['MB_per_s'])} MB/s, {shown(result['messages_per_s'])} messages/s, "
        f"{result['messages']}/{result.get('listed')} messages, {result['bytes']} bytes "
        f"({result['wire_bytes']} on the wire) in {result['retr_s']} s; per message p50 "
        f"{shown(result['p50_ms'])} ms max {shown(result['max_ms'])} ms; size mismatches "
        f"{result['size_mismatches']}, unstuffed dot lines {result['unstuffed_dots']}, "
        f"bare LF {result['bare_lf']}, errors {result['errors']}; {cpuText(result)}"
    )
    for sample in samples[:MAX_SAMPLES]:
        text += "\n  " + sample
    emit(args, result, text)
    bad = result["errors"] or result["size_mismatches"] or result["unstuffed_dots"] or result["bare_lf"]
    return 1 if bad else 0


# -------------------------------------------------------------------- idle


async def probe(client: POP3Client) -> int:
    """
    1 if C{client}'s connection still answers a command, else 0.
    """
    try:
        client.writer.write(b"NOOP\r\n")
        line = await asyncio.wait_for(client.reader.readline(), client.timeout)
    except Exception:
        return 0
    return 1 if line.startswith((b"+OK", b"-ERR")) else 0


async def cmdIdle(args: argparse.Namespace) -> int:
    """
    Open C{--count} connections, read each greeting, hold them, measure the
    server's memory before and after, close them all.
    """
    soft, hard = raiseFileLimit()
    if soft != resource.RLIM_INFINITY and soft < args.count + 64:
        print(
            f"pop3_load: warning: RLIMIT_NOFILE is {soft} (hard {hard}), "
            f"fewer than {args.count} connections may open",
            file=sys.stderr,
        )
    if not serverMemory(args.pid)["rss_kb"]:
        raise SystemExit(f"pop3_load: cannot read /proc/{args.pid}/status")
    hardDeadline = time.monotonic() + args.seconds
    # One connection first, so lazily built server state is not counted.
    try:
        warm = await POP3Client.open(args.host, args.port, args.timeout)
        await warm.quit()
    except Exception as e:
        print(f"pop3_load: warm-up connection failed: {describe(e)}", file=sys.stderr)
    await asyncio.sleep(args.settle)
    before = serverMemory(args.pid)
    meter = CPUMeter(args.pid)
    meter.start()
    conns: list = []
    errors: dict = {}
    samples: list = []
    t0 = time.perf_counter()
    opened = 0
    while opened < args.count and time.monotonic() < hardDeadline:
        batch = min(args.batch, args.count - opened)
        opened += batch
        results = await asyncio.gather(
            *(POP3Client.open(args.host, args.port, args.timeout) for _ in range(batch)),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                countError(errors, samples, r)
            else:
                conns.append(r)
    openSeconds = time.perf_counter() - t0
    await asyncio.sleep(min(args.settle, max(0.0, hardDeadline - time.monotonic())))
    after = serverMemory(args.pid)
    cpu = meter.stop()
    # Liveness after the measurement: every connection must still answer
    # (NOOP is not valid before login, so -ERR counts as an answer too).
    alive = sum(await asyncio.gather(*(probe(c) for c in conns)))
    for c in conns:
        c.abort()
    await asyncio.sleep(0.1)
    n = len(conns)
    result = {
        "bench": "pop3-idle",
        "host": args.host,
        "port": args.port,
        "pid": args.pid,
        "requested": args.count,
        "opened": n,
        "alive_at_measure": alive,
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "open_s": round(openSeconds, 3),
        "nofile_soft_limit": soft,
        "rss_before_kb": before["rss_kb"],
        "rss_after_kb": after["rss_kb"],
        "pss_before_kb": before["pss_kb"],
        "pss_after_kb": after["pss_kb"],
        "uss_before_kb": before["uss_kb"],
        "uss_after_kb": after["uss_kb"],
    }
    result.update(cpu)
    for key in ("rss", "pss", "uss"):
        b, a = before[f"{key}_kb"], after[f"{key}_kb"]
        result[f"{key}_kb_per_conn"] = round((a - b) / n, 2) if n and a is not None and b is not None else None
    if samples:
        result["error_samples"] = samples
    text = (
        f"idle pid {args.pid}: {n}/{args.count} connections open ({alive} alive at measure, "
        f"opened in {result['open_s']} s), RSS {before['rss_kb']} -> {after['rss_kb']} KB "
        f"= {shown(result['rss_kb_per_conn'])} KB/conn, PSS {before['pss_kb']} -> {after['pss_kb']} KB "
        f"= {shown(result['pss_kb_per_conn'])} KB/conn, USS {before['uss_kb']} -> {after['uss_kb']} KB "
        f"= {shown(result['uss_kb_per_conn'])} KB/conn, errors {result['errors']}; {cpuText(result)}"
    )
    for sample in samples:
        text += "\n  e.g. " + sample
    emit(args, result, text)
    return 1 if errors or alive < n else 0


# -------------------------------------------------------------------- seed


def seedMessage(size: int, number: int, stamp: str) -> bytes:
    """
    A message of exactly C{size} octets (LF line ends) once C{size} exceeds
    its headers; otherwise just the headers.  The body starts with a line
    beginning with a dot and a line that is only a dot, so the server's
    dot-stuffing is exercised.
    """
    head = (
        f"From: Bench Seed <seed@bench.invalid>\n"
        f"To: <maildrop@bench.invalid>\n"
        f"Subject: pop3_load seed {number}\n"
        f"Date: Thu, 01 Jan 2026 00:00:00 +0000\n"
        f"Message-ID: <{stamp}.{number}@bench.invalid>\n"
        f"X-Bench-Seq: {number}\n"
        f"\n"
        f".this body line starts with a dot\n"
        f".\n"
    ).encode()
    rest = size - len(head)
    if rest <= 0:
        return head
    full, partial = divmod(rest, len(FILLER) + 1)
    body = (FILLER + b"\n") * full
    if partial:
        body += FILLER[: partial - 1] + b"\n"
    return head + body


def cmdSeed(args: argparse.Namespace) -> int:
    """
    Write C{--count} messages of C{--size} octets into C{--maildir}: each to
    C{tmp/}, then renamed into C{new/}, with Dovecot's C{,S=} and C{,W=}
    sizes in the name.  One directory fsync at the end.
    """
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(args.maildir, sub), mode=0o700, exist_ok=True)
    stamp = f"{int(time.time())}"
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
    pid = os.getpid()
    total = 0
    t0 = time.perf_counter()
    deadline = time.monotonic() + args.seconds
    written = 0
    for n in range(args.count):
        if time.monotonic() >= deadline:
            print(f"pop3_load: stopped by --seconds after {written} messages", file=sys.stderr)
            break
        data = seedMessage(args.size, n, stamp)
        wire = len(data) + data.count(b"\n")
        unique = f"{stamp}.P{pid}Q{n}.{host}"
        tmp = os.path.join(args.maildir, "tmp", unique)
        with open(tmp, "xb") as f:
            f.write(data)
        os.chmod(tmp, 0o600)
        os.rename(tmp, os.path.join(args.maildir, "new", f"{unique},S={len(data)},W={wire}"))
        written += 1
        total += len(data)
    fd = os.open(os.path.join(args.maildir, "new"), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    print(
        f"seed: {written} messages, {total} bytes into {os.path.join(args.maildir, 'new')} "
        f"in {time.perf_counter() - t0:.2f} s"
    )
    return 0


# -------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pop3_load.py",
        description=__doc__.split("\n\n")[0].strip(),
        epilog="See bench/README.rst.",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, login: bool = True, seconds: float = 10.0) -> None:
        addTarget(p)
        p.add_argument(
            "--pid",
            type=int,
            help="server process id: its CPU (and memory for idle) is reported",
        )
        p.add_argument(
            "--timeout",
            type=positive(float),
            default=DEFAULT_TIMEOUT,
            help=f"seconds any one connect/read may take (default {DEFAULT_TIMEOUT})",
        )
        p.add_argument(
            "--seconds",
            type=positive(float),
            default=seconds,
            help=f"duration bound in seconds (default {seconds})",
        )
        p.add_argument("--json", action="store_true", help="one JSON line per result on stdout")
        if login:
            p.add_argument("--user", required=True, help="login; {i} becomes 1..--users per client")
            p.add_argument("--password", required=True)
            p.add_argument(
                "--users",
                type=positive(int),
                help="distinct users for {i} (default: the concurrency)",
            )

    p = sub.add_parser("sessions", help="full sessions USER/PASS STAT LIST UIDL QUIT")
    common(p, seconds=5.0)
    p.add_argument(
        "--concurrency",
        type=concurrencyList,
        default=[1],
        help="comma-separated client counts, run one after the other (e.g. 1,50)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds of sessions before the measured window (default 1; "
        "fills caches such as pop3gw's password cache)",
    )
    p.add_argument(
        "--max-sessions",
        type=positive(int),
        default=DEFAULT_MAX_SESSIONS,
        help="bound on sessions started per concurrency level",
    )
    p.set_defaults(run=cmdSessions)

    p = sub.add_parser("retr", help="one client RETRs every message; MB/s; sizes checked")
    common(p, seconds=120.0)
    p.add_argument("--max-messages", type=positive(int), default=None, help="RETR only the first N")
    p.add_argument("--expect-count", type=int, help="LIST must show exactly this many messages")
    p.set_defaults(run=cmdRetr)

    p = sub.add_parser("idle", help="hold N idle connections; server KB per connection")
    common(p, login=False, seconds=120.0)
    p.add_argument("--count", type=positive(int), default=1000)
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait before measuring")
    p.add_argument(
        "--batch",
        type=positive(int),
        default=IDLE_BATCH,
        help=f"connections opened at once (default {IDLE_BATCH})",
    )
    p.set_defaults(run=cmdIdle)

    p = sub.add_parser("seed", help="write N messages of SIZE octets into a Maildir")
    p.add_argument("--maildir", required=True, help="the Maildir (cur/ new/ tmp/ made if missing)")
    p.add_argument("--count", type=positive(int), default=200)
    p.add_argument("--size", type=positive(int), default=10 * 1024, help="octets per message (LF form)")
    p.add_argument("--seconds", type=positive(float), default=600.0)
    p.set_defaults(run=cmdSeed)
    return ap


def main(argv: Optional[list] = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "seed":
        return args.run(args)
    _common.checkHost(args, "pop3_load")
    if args.command == "idle" and not args.pid:
        raise SystemExit("pop3_load: idle needs --pid")
    if args.command == "idle":
        raiseFileLimit()
    elif args.command == "sessions" and max(args.concurrency) > 500:
        raiseFileLimit()
    try:
        return asyncio.run(args.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
