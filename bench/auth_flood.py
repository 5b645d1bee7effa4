#!/usr/bin/env python3
"""
Logins under a password-guessing flood, for any POP3 or submission server.

C{--connections} clients (32 by default) bound to one source address
(C{--flood-source}, 127.0.0.2, or several addresses in turn) each connect, send one wrong password
(POP3 C{USER}/C{PASS}, or submission C{EHLO}/C{AUTH PLAIN}) and hang up at
once without reading the answer, over and over.  Meanwhile users who have
not logged in before (so no password cache can help) log in with the right
password from another source address (C{--good-source}, 127.0.0.3): one
after the other, then all at once.  A baseline round without the flood
comes first.  For each round the script prints how many logins succeeded
and each one's latency (connect to the reply to the password).

With C{--start} it starts the server itself: C{twistd -n pop3gw} on
loopback ports chosen by the kernel, with a new data directory holding the
users it needs, stopped by its PID and removed at the end; the figures then
include the server's CPU and the count of its log lines about failed and
refused password checks.  Without C{--start} it loads C{--host}:C{--port},
whose users C{--user} (C{{i}} becomes 1, 2, ...) must exist with
C{--password} and must not have logged in recently.

Standard library only (with C{_common.py} next to this script); nothing
here is run by the test suite.  Every loop is bounded by a count and a time
(C{--seconds} for the whole run, C{--timeout} per read), and only C{--host}
is contacted (loopback unless C{--allow-remote}).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

import _common
from _common import (
    ERROR_BACKOFF,
    CPUMeter,
    countError,
    cpuText,
    emit,
    latencies,
    positive,
    shown,
)

#: Seconds any single connect, read or write may take.
DEFAULT_TIMEOUT = 10.0

#: Seconds the whole run may take.
DEFAULT_SECONDS = 300.0

#: Bound on flood attempts over the whole run.
DEFAULT_MAX_ATTEMPTS = 10_000_000

#: Seconds a started server may take to listen.
START_TIMEOUT = 60.0

#: Seconds a started server may take to stop after SIGTERM.
STOP_TIMEOUT = 15.0

#: Log lines kept from a started server (the rest are only counted).
MAX_LOG_LINES = 200_000

_LISTENING = re.compile(r"(\w+) listening on (\S+):(\d+) ")

ROUNDS = ("baseline", "sequential", "concurrent")


# ------------------------------------------------------------------ server


class StartedServer:
    """
    A C{twistd -n pop3gw} started by this script: a new data directory
    with C{count} users, POP3 and submission on loopback ports chosen by
    the kernel.
    """

    def __init__(self, args: argparse.Namespace, count: int) -> None:
        self.args = args
        self.count = count
        self.dataDir = tempfile.mkdtemp(prefix="pop3gw-auth-flood-")
        self.proc: Optional[subprocess.Popen] = None
        self.ports: dict = {}
        self.lines: list = []
        self.counted = {"authentication failed": 0, "password check refused": 0, "authentication unavailable": 0}
        self._ready = threading.Event()
        self._reader: Optional[threading.Thread] = None

    def start(self) -> None:
        t0 = time.monotonic()
        for i in range(1, self.count + 1):
            if time.monotonic() - t0 > self.args.seconds:
                raise SystemExit("auth_flood: adding users took longer than --seconds")
            user = self.args.user.replace("{i}", str(i))
            result = subprocess.run(
                [self.args.pop3gw, "--data-dir", self.dataDir, "user", "add", user],
                input=(self.args.password + "\n").encode(),
                capture_output=True,
                timeout=60,
            )
            if result.returncode != 0:
                reason = result.stderr.decode(errors="replace").strip()
                raise SystemExit(f"auth_flood: pop3gw user add {user}: {reason}")
        command = [
            self.args.twistd, "-n", "--pidfile=", "--logfile=-", "pop3gw",
            "--data-dir", self.dataDir, "--hostname", "bench.invalid",
            "--pop3", "tcp:0:interface=127.0.0.1", "--submission", "tcp:0:interface=127.0.0.1",
        ]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(START_TIMEOUT):
            self.stop()
            raise SystemExit("auth_flood: the server did not start:\n" + "".join(self.lines[-40:]))

    def _read(self) -> None:
        """
        Read the server's log until it ends: L{stop} ends the process
        (SIGTERM, then SIGKILL after L{STOP_TIMEOUT}), so this loop is
        bounded by the run's time; at most L{MAX_LOG_LINES} lines are kept.
        """
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            if len(self.lines) < MAX_LOG_LINES:
                self.lines.append(line)
            for phrase in self.counted:
                if phrase + ":" in line:
                    self.counted[phrase] += 1
            m = _LISTENING.search(line)
            if m:
                self.ports[m.group(1)] = int(m.group(3))
                if "pop3" in self.ports and "submission" in self.ports:
                    self._ready.set()

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> None:
        """
        Stop the server by its PID and remove its data directory.
        """
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            if self._reader is not None:
                self._reader.join(5)
        finally:
            shutil.rmtree(self.dataDir, ignore_errors=True)


# ----------------------------------------------------------------- clients


def authPlain(user: str, password: str) -> bytes:
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


async def connect(args: argparse.Namespace, source: str):
    return await asyncio.wait_for(
        asyncio.open_connection(args.host, args.port, local_addr=(source, 0), limit=_common.MAX_LINE),
        args.timeout,
    )


async def readLine(args: argparse.Namespace, reader: asyncio.StreamReader, what: str) -> bytes:
    line = await asyncio.wait_for(reader.readline(), args.timeout)
    if not line:
        raise _common.Failure("closed", f"connection closed awaiting the {what} reply")
    return line


async def readSMTPReply(args: argparse.Namespace, reader: asyncio.StreamReader, what: str) -> bytes:
    """
    The last line of a (possibly multi-line) SMTP reply.
    """
    for _ in range(100):
        line = await readLine(args, reader, what)
        if line[3:4] != b"-":
            return line
    raise _common.Failure("garbage", f"over 100 lines in the {what} reply")


async def goodLogin(args: argparse.Namespace, user: str) -> float:
    """
    Log C{user} in with the right password from C{--good-source}.

    @return: seconds from the connect to the reply to the password.
    @raise _common.Failure: the login did not succeed.
    """
    t0 = time.perf_counter()
    reader, writer = await connect(args, args.good_source)
    try:
        if args.protocol == "pop3":
            await readLine(args, reader, "greeting")
            writer.write(b"USER " + user.encode() + b"\r\n")
            line = await readLine(args, reader, "USER")
            if not line.startswith(b"+OK"):
                raise _common.Failure("USER refused", line.decode("ascii", "replace").strip())
            writer.write(b"PASS " + args.password.encode() + b"\r\n")
            line = await readLine(args, reader, "PASS")
            elapsed = time.perf_counter() - t0
            if not line.startswith(b"+OK"):
                raise _common.Failure("login refused", line.decode("ascii", "replace").strip())
            writer.write(b"QUIT\r\n")
        else:
            await readSMTPReply(args, reader, "greeting")
            writer.write(b"EHLO bench.invalid\r\n")
            await readSMTPReply(args, reader, "EHLO")
            writer.write(b"AUTH PLAIN " + authPlain(user, args.password) + b"\r\n")
            line = await readSMTPReply(args, reader, "AUTH")
            elapsed = time.perf_counter() - t0
            if not line.startswith(b"235"):
                raise _common.Failure("login refused", line.decode("ascii", "replace").strip())
            writer.write(b"QUIT\r\n")
        try:
            await asyncio.wait_for(reader.readline(), args.timeout)
        except Exception:
            pass
        return elapsed
    finally:
        writer.close()


class Flood:
    """
    C{--connections} workers, each sending one wrong password from
    C{--flood-source} and hanging up, again and again.
    """

    def __init__(self, args: argparse.Namespace, deadline: float) -> None:
        self.args = args
        self.deadline = deadline
        self.attempts = 0
        self.errors: dict = {}
        self.samples: list = []
        self.stopping = False

    async def worker(self, source: str) -> None:
        args = self.args
        while not self.stopping and time.monotonic() < self.deadline and self.attempts < args.max_attempts:
            self.attempts += 1
            password = "wrong" if args.same_password else f"wrong{self.attempts}"
            try:
                _, writer = await connect(args, source)
            except Exception as e:
                countError(self.errors, self.samples, e)
                await asyncio.sleep(ERROR_BACKOFF)
                continue
            if args.protocol == "pop3":
                writer.write(b"USER " + args.flood_user.encode() + b"\r\nPASS " + password.encode() + b"\r\n")
            else:
                writer.write(b"EHLO bench.invalid\r\nAUTH PLAIN " + authPlain(args.flood_user, password) + b"\r\n")
            # Hang up at once, without reading a reply (a FIN after the
            # data, so the server does read the guess).
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), args.timeout)
            except Exception:
                pass

    async def run(self) -> None:
        sources = self.args.flood_source.split(",")
        await asyncio.gather(*(self.worker(sources[i % len(sources)]) for i in range(self.args.connections)))


async def runRound(args: argparse.Namespace, name: str, users: list) -> dict:
    """
    Log C{users} in from C{--good-source}: one after the other, or (for
    the C{concurrent} round) all at once.
    """
    results: list = []
    if name == "concurrent":
        results = list(await asyncio.gather(*(goodLogin(args, u) for u in users), return_exceptions=True))
    else:
        for user in users:
            try:
                results.append(await goodLogin(args, user))
            except Exception as e:
                results.append(e)
    ok = [r for r in results if isinstance(r, float)]
    errors: dict = {}
    samples: list = []
    for r in results:
        if isinstance(r, BaseException):
            countError(errors, samples, r)
    out = {
        "round": name,
        "logins": len(users),
        "succeeded": len(ok),
        "within_limit": sum(1 for r in ok if r <= args.login_limit),
        "latency_ms": [round(r * 1000, 1) if isinstance(r, float) else None for r in results],
        "errors_by_kind": errors,
        "error_samples": samples,
    }
    out.update(latencies(ok))
    return out


async def measure(args: argparse.Namespace, pid: Optional[int]) -> dict:
    deadline = time.monotonic() + args.seconds
    per = args.users
    names = [r for r in ROUNDS if r in args.rounds]
    users = {name: [args.user.replace("{i}", str(k * per + i + 1)) for i in range(per)] for k, name in enumerate(names)}
    rounds = []
    if "baseline" in names:
        rounds.append(await runRound(args, "baseline", users["baseline"]))
    flood = Flood(args, deadline)
    meter = CPUMeter(pid)
    meter.start()
    t0 = time.monotonic()
    floodTask = asyncio.ensure_future(flood.run())
    try:
        await asyncio.sleep(min(args.flood_warmup, max(0.0, deadline - time.monotonic())))
        for name in names:
            if name != "baseline" and time.monotonic() < deadline:
                rounds.append(await runRound(args, name, users[name]))
    finally:
        flood.stopping = True
        await asyncio.wait_for(floodTask, args.timeout * 2)
    floodSeconds = time.monotonic() - t0
    result = {
        "bench": "auth-flood",
        "protocol": args.protocol,
        "host": args.host,
        "port": args.port,
        "flood_source": args.flood_source,
        "good_source": args.good_source,
        "connections": args.connections,
        "same_password": args.same_password,
        "flood_attempts": flood.attempts,
        "flood_s": round(floodSeconds, 2),
        "flood_attempts_per_s": round(flood.attempts / floodSeconds, 1) if floodSeconds else None,
        "flood_errors_by_kind": flood.errors,
        "flood_error_samples": flood.samples,
        "login_limit_s": args.login_limit,
        "rounds": rounds,
    }
    result.update(meter.stop())
    return result


def report(args: argparse.Namespace, result: dict, server: Optional[StartedServer]) -> str:
    text = (
        f"auth flood on {args.protocol} {args.host}:{args.port}: {args.connections} connections from "
        f"{args.flood_source} sent {result['flood_attempts']} wrong passwords "
        f"({'the same one' if args.same_password else 'each a new one'}) in {result['flood_s']} s "
        f"= {shown(result['flood_attempts_per_s'])}/s, hanging up at once; {cpuText(result)}"
    )
    if result["flood_errors_by_kind"]:
        text += "\n  flood errors: " + ", ".join(f"{k} {v}" for k, v in sorted(result["flood_errors_by_kind"].items()))
    for r in result["rounds"]:
        during = "without the flood" if r["round"] == "baseline" else "during the flood"
        text += (
            f"\n{r['round']} ({during}): {r['succeeded']}/{r['logins']} logins of uncached users from "
            f"{args.good_source} succeeded, {r['within_limit']} within {args.login_limit:g} s; "
            f"p50 {shown(r['p50_ms'])} ms, max {shown(r['max_ms'])} ms; each (ms): "
            + ", ".join(shown(v) for v in r["latency_ms"])
        )
        for sample in r["error_samples"]:
            text += "\n  e.g. " + sample
    if server is not None:
        text += "\nserver log: " + ", ".join(f'"{k}" {v}' for k, v in server.counted.items())
    return text


# -------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    here = os.path.dirname(sys.executable)

    def program(name: str) -> str:
        path = os.path.join(here, name)
        return path if os.path.exists(path) else (shutil.which(name) or name)

    ap = argparse.ArgumentParser(
        prog="auth_flood.py",
        description=__doc__.split("\n\n")[0].strip(),
        epilog="See bench/README.rst.",
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, help="the server's port (not with --start)")
    ap.add_argument("--allow-remote", action="store_true", help="permit a non-loopback --host")
    ap.add_argument("--start", action="store_true", help="start twistd pop3gw with its users, stop it at the end")
    ap.add_argument("--twistd", default=program("twistd"), help="twistd to start (default: next to this Python)")
    ap.add_argument("--pop3gw", default=program("pop3gw"), help="pop3gw command to add users with")
    ap.add_argument("--pid", type=int, help="server process id, for its CPU (set by --start)")
    ap.add_argument("--protocol", choices=("pop3", "submission"), default="pop3")
    ap.add_argument(
        "--flood-source",
        default="127.0.0.2",
        help="source address of the flood, or several separated by commas, one per connection in turn (default 127.0.0.2)",
    )
    ap.add_argument("--good-source", default="127.0.0.3", help="source address of the good logins (default 127.0.0.3)")
    ap.add_argument("--connections", type=positive(int), default=32, help="flood connections at once (default 32)")
    ap.add_argument("--flood-user", default="x", help="login name the flood guesses for (default x)")
    ap.add_argument("--same-password", action="store_true", help="the flood sends the same wrong password each time")
    ap.add_argument(
        "--flood-warmup", type=float, default=3.0, help="seconds of flood before the first round (default 3)"
    )
    ap.add_argument("--user", default="u{i}@example.org", help="good logins; {i} becomes 1, 2, ...")
    ap.add_argument("--password", default="bench-password", help="the good users' password")
    ap.add_argument("--users", type=positive(int), default=10, help="logins per round (default 10)")
    ap.add_argument(
        "--rounds",
        default=",".join(ROUNDS),
        help="comma-separated rounds among baseline,sequential,concurrent (default all); each its own users",
    )
    ap.add_argument("--login-limit", type=positive(float), default=3.0, help="seconds a login should take at most")
    ap.add_argument("--timeout", type=positive(float), default=DEFAULT_TIMEOUT)
    ap.add_argument("--seconds", type=positive(float), default=DEFAULT_SECONDS, help="bound on the whole run")
    ap.add_argument("--max-attempts", type=positive(int), default=DEFAULT_MAX_ATTEMPTS)
    ap.add_argument("--json", action="store_true", help="one JSON line on stdout, the summary on stderr")
    return ap


def main(argv: Optional[list] = None) -> int:
    args = parser().parse_args(argv)
    args.rounds = [r.strip() for r in args.rounds.split(",") if r.strip()]
    unknown = set(args.rounds) - set(ROUNDS)
    if unknown or not args.rounds:
        raise SystemExit(f"auth_flood: --rounds takes {','.join(ROUNDS)}")
    if args.start == (args.port is not None):
        raise SystemExit("auth_flood: give either --start or --port")
    _common.checkHost(args, "auth_flood")
    server = None
    try:
        if args.start:
            server = StartedServer(args, args.users * len(args.rounds))
            server.start()
            args.port = server.ports["pop3" if args.protocol == "pop3" else "submission"]
            args.pid = server.pid
        result = asyncio.run(measure(args, args.pid))
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None:
            server.stop()
    if server is not None:
        result["server_log"] = dict(server.counted)
    emit(args, result, report(args, result, server))
    good = all(r["within_limit"] == r["logins"] for r in result["rounds"])
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
