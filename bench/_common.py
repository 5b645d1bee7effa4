"""
Helpers shared by C{pop3_load.py} and C{smtp_load.py}: CPU accounting,
latency summaries, failure categories, the stream client's plumbing, the
loopback check, result output and argument parsing.

Standard library only.  The scripts run as scripts, so this file is found
next to them (C{sys.path[0]}) and imported as C{_common}.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import sys
import time
from typing import Optional

#: Longest status or reply line accepted.
MAX_LINE = 64 * 1024

#: Seconds a worker waits after a failure before the next try, so a
#: refusing server does not turn the client into a busy loop.
ERROR_BACKOFF = 0.01

#: Error samples kept per result.
MAX_SAMPLES = 5

#: Bytes per filler line of generated messages (without the line end).
FILLER = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab"


# ------------------------------------------------------------- CPU, latency


def clientCPU() -> float:
    """
    CPU seconds (user + system) this process has used.
    """
    return time.process_time()


def _processCPU(pid: int) -> float:
    """
    CPU seconds (utime + stime) of process C{pid} from C{/proc/PID/stat}.

    @raise OSError: no such process.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name may hold spaces and parentheses: fields start after
    # the last ")".  utime and stime are fields 14 and 15 of the whole line.
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list:
    """
    The live child processes of C{pid} (from every thread's
    C{/proc/PID/task/TID/children}).
    """
    found: list = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return found


def serverCPU(pid: Optional[int]) -> Optional[float]:
    """
    CPU seconds (utime + stime) of process C{pid} plus those of its live
    descendants (the worker processes of C{twistd pop3gw --workers N}), or
    C{None} if unknown or unreadable.  A child that exited within the
    measured window takes its CPU time with it.
    """
    if not pid:
        return None
    try:
        total = _processCPU(pid)
    except OSError:
        return None
    pending = _children(pid)
    while pending:
        child = pending.pop()
        try:
            total += _processCPU(child)
        except OSError:
            continue
        pending.extend(_children(child))
    return total


class CPUMeter:
    """
    Wall time, client CPU and server CPU between L{start} and L{stop}.
    """

    def __init__(self, pid: Optional[int]) -> None:
        self.pid = pid

    def start(self) -> None:
        self._wall = time.perf_counter()
        self._client = clientCPU()
        self._server = serverCPU(self.pid)

    def stop(self) -> dict:
        wall = time.perf_counter() - self._wall
        client = clientCPU() - self._client
        out = {
            "wall_s": round(wall, 3),
            "client_cpu_s": round(client, 3),
            "client_cpu_pct": round(100 * client / wall, 1) if wall > 0 else None,
        }
        server = serverCPU(self.pid)
        if server is not None and self._server is not None:
            out["server_cpu_s"] = round(server - self._server, 3)
            out["server_cpu_pct"] = (
                round(100 * (server - self._server) / wall, 1) if wall > 0 else None
            )
        return out


def percentile(values: list, q: float) -> Optional[float]:
    """
    Nearest-rank percentile C{q} (0..100) of C{values}, or C{None} if empty.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(min(rank, len(ordered))) - 1]


def latencies(values: list) -> dict:
    """
    p50, p99 and max of C{values} (seconds) in milliseconds.
    """

    def ms(v: Optional[float]) -> Optional[float]:
        return None if v is None else round(v * 1000, 2)

    return {
        "p50_ms": ms(percentile(values, 50)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values) if values else None),
    }


# ---------------------------------------------------------------- failures


class Failure(Exception):
    """
    A session or message failed; C{kind} is a short category for counting.
    """

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


def classify(e: BaseException) -> str:
    """
    A short category for a failure.
    """
    if isinstance(e, Failure):
        return e.kind
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(e, asyncio.IncompleteReadError):
        return "closed"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, OSError):
        return f"oserror-{e.errno}"
    return type(e).__name__


def describe(e: BaseException) -> str:
    """
    One line about a failure: its category and its text.
    """
    if isinstance(e, Failure):
        return str(e)[:240]
    text = str(e)
    return f"{classify(e)}: {text}"[:240] if text else classify(e)


def countError(errors: dict, samples: list, e: BaseException, prefix: str = "") -> None:
    """
    Count C{e} by its category into C{errors}, and keep its description
    (after C{prefix}) in C{samples}, up to L{MAX_SAMPLES} different ones.
    """
    kind = classify(e)
    errors[kind] = errors.get(kind, 0) + 1
    sample = prefix + describe(e)
    if len(samples) < MAX_SAMPLES and sample not in samples:
        samples.append(sample)


async def cancelPending(pending: set) -> None:
    """
    Cancel the tasks still running and give them 5 seconds to end.
    """
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)


# ------------------------------------------------------------------ client


class StreamClient:
    """
    A line-protocol client over asyncio streams, every read bounded by
    C{timeout}; subclasses read the greeting in L{greet}.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    @classmethod
    async def open(cls, host: str, port: int, timeout: float):
        """
        Connect and read the greeting (L{greet}); on failure the connection
        is dropped.
        """
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=MAX_LINE), timeout
        )
        client = cls(reader, writer, timeout)
        try:
            await client.greet()
        except BaseException:
            client.abort()
            raise
        return client

    async def greet(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), self.timeout)
        except Exception:
            pass

    def abort(self) -> None:
        """
        Drop the connection at once (the server sees it lost, commits nothing).
        """
        transport = self.writer.transport
        if transport is not None:
            transport.abort()


# --------------------------------------------------------------- reporting


def cpuText(r: dict) -> str:
    text = f"client CPU {r['client_cpu_pct']}%"
    if "server_cpu_pct" in r:
        text += f", server CPU {r['server_cpu_pct']}%"
    if r.get("client_cpu_pct") is not None and r["client_cpu_pct"] >= 90:
        text += " (client-bound: the figure is the client's limit)"
    return text


def errorText(r: dict) -> str:
    """
    The lines after a summary: errors by kind, then the error samples.
    """
    text = ""
    if r["errors_by_kind"]:
        text += "\n  errors: " + ", ".join(f"{k} {v}" for k, v in sorted(r["errors_by_kind"].items()))
    for sample in r.get("error_samples", []):
        text += "\n  e.g. " + sample
    return text


def emit(args: argparse.Namespace, result: dict, text: str) -> None:
    """
    Print one result: C{text} for people, or with C{--json} one JSON line on
    stdout and C{text} on stderr.
    """
    if args.json:
        print(text, file=sys.stderr, flush=True)
        print(json.dumps(result, sort_keys=True), flush=True)
    else:
        print(text, flush=True)


def shown(value: Optional[float]) -> str:
    """
    C{value} for people: C{-} when there is none.
    """
    return "-" if value is None else str(value)


def userFor(template: str, index: int, users: int) -> str:
    """
    The login of client C{index} (0-based): C{{i}} in C{template} becomes
    C{index % users + 1}.
    """
    return template.replace("{i}", str(index % max(users, 1) + 1))


def checkHost(args: argparse.Namespace, prog: str) -> None:
    """
    Refuse a non-loopback C{--host} unless C{--allow-remote} was given;
    C{prog} starts the message.
    """
    if args.allow_remote or args.host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(
            f"{prog}: {args.host} is not a loopback address; "
            "pass --allow-remote to load a server you are responsible for"
        )


# ---------------------------------------------------------------- arguments


def concurrencyList(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected integers >= 1")
    return values


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be > 0")
        return value

    return parse


def addTarget(p: argparse.ArgumentParser) -> None:
    """
    C{--host}, C{--port} and C{--allow-remote}.
    """
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--allow-remote", action="store_true", help="permit a non-loopback --host")
