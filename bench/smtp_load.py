#!/usr/bin/env python3
"""
SMTP submission load generator for any submission server (pop3gw, Postfix,
twistd mail, ...).

Each client repeats: connect, EHLO, AUTH PLAIN, MAIL FROM:<user>, RCPT TO,
DATA (a message with a unique X-Bench-Id header and From: the user), QUIT,
until C{--count} messages in total were tried.  Prints messages/s, p50/p99
per message, errors and the client's own CPU use (and the server's with
C{--pid}).  With C{--maildir}, the recipient's Maildir is then searched for
every X-Bench-Id: found, lost and duplicated are printed, and "LOST MAIL"
when any accepted message is missing.

Standard library only (helpers shared with the other load generator are
in C{_common.py} next to this script); nothing here is run by the test
suite.  Every loop is bounded by a count and a time, and only C{--host} is
contacted (loopback unless C{--allow-remote}).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import ssl
import sys
import time
import uuid
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
    emit,
    errorText,
    latencies,
    positive,
    shown,
    userFor,
)

#: Seconds any single connect, read or write may take.
DEFAULT_TIMEOUT = 30.0

#: Octets of each Maildir file read when looking for the X-Bench-Id header.
HEADER_READ = 16 * 1024

#: Seconds between two scans of the Maildir while waiting for deliveries.
SCAN_INTERVAL = 0.2

_SIZE_FIELD = re.compile(r",[SW]=[0-9]+")


# ------------------------------------------------------------- SMTP client


class SMTPFailure(_common.Failure):
    """
    A message failed; C{kind} is a short category for counting (the stage
    and the reply code, e.g. C{"RCPT 550"}).
    """


_tlsContext: list = []


def clientTLSContext() -> ssl.SSLContext:
    """
    One shared client context without certificate checks, built on first
    use (building one loads no CA store, but is still not free).
    """
    if not _tlsContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        _tlsContext.append(context)
    return _tlsContext[0]


class SMTPClient(_common.StreamClient):
    """
    A minimal SMTP client over asyncio streams, every read bounded by
    C{timeout}.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        super().__init__(reader, writer, timeout)
        self.extensions: dict = {}

    async def greet(self) -> None:
        await self.reply("greeting", 220)

    async def reply(self, stage: str, *expected: int) -> list:
        """
        Read one (possibly multi-line) reply.

        @return: its lines, without CRLF.
        @raise SMTPFailure: if its code is not one of C{expected}.
        """
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not line:
                raise SMTPFailure(f"{stage} closed", "connection closed")
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                break
        code = lines[-1][:3]
        if not code.isdigit() or int(code) not in expected:
            text = b" | ".join(lines)[:200].decode("ascii", "replace")
            raise SMTPFailure(f"{stage} {code.decode('ascii', 'replace')}", text)
        return lines

    async def command(self, line: bytes, stage: str, *expected: int) -> list:
        self.writer.write(line + b"\r\n")
        return await self.reply(stage, *expected)

    async def ehlo(self) -> None:
        lines = await self.command(b"EHLO bench.invalid", "EHLO", 250)
        self.extensions = {}
        for line in lines[1:]:
            words = line[4:].decode("ascii", "replace").split()
            if words:
                self.extensions[words[0].upper()] = [w.upper() for w in words[1:]]

    async def startTLS(self) -> None:
        """
        STARTTLS without certificate checks (a benchmark of a local server,
        not a secure channel), then EHLO again.
        """
        await self.command(b"STARTTLS", "STARTTLS", 220)
        await asyncio.wait_for(self.writer.start_tls(clientTLSContext()), self.timeout)
        await self.ehlo()

    async def authPlain(self, user: str, password: str) -> None:
        if "PLAIN" not in self.extensions.get("AUTH", []):
            raise SMTPFailure("AUTH not offered", f"EHLO AUTH: {self.extensions.get('AUTH')}")
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
        await self.command(b"AUTH PLAIN " + token, "AUTH", 235)


def makeMessage(size: int, benchId: str, sender: str, rcpt: str) -> bytes:
    """
    The DATA payload: a message of C{size} octets in LF form (more if the
    headers alone are longer), sent with CRLF line ends, dot-stuffed, with
    the final C{.CRLF}.  Its body starts with a line beginning with a dot.
    """
    head = (
        f"From: <{sender}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: smtp_load {benchId}\r\n"
        f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        f"Message-ID: <{benchId}@bench.invalid>\r\n"
        f"X-Bench-Id: {benchId}\r\n"
        f"\r\n"
        f"..this body line starts with a dot\r\n"
    ).encode()
    lfSize = len(head) - head.count(b"\r\n") - 1  # minus CRs and one stuffing dot
    rest = max(0, size - lfSize)
    full, partial = divmod(rest, len(FILLER) + 1)
    body = (FILLER + b"\r\n") * full
    if partial:
        body += FILLER[: partial - 1] + b"\r\n"
    return head + body + b".\r\n"


async def sendOne(args: argparse.Namespace, user: str, benchId: str) -> None:
    """
    One full session delivering one message.
    """
    client = await SMTPClient.open(args.host, args.port, args.timeout)
    try:
        await client.ehlo()
        if args.starttls:
            await client.startTLS()
        if not args.no_auth:
            await client.authPlain(user, args.password)
        await client.command(b"MAIL FROM:<" + user.encode() + b">", "MAIL", 250)
        await client.command(b"RCPT TO:<" + args.rcpt.encode() + b">", "RCPT", 250, 251)
        await client.command(b"DATA", "DATA", 354)
        client.writer.write(makeMessage(args.size, benchId, user, args.rcpt))
        await client.reply("DATA end", 250)
        try:
            await client.command(b"QUIT", "QUIT", 221)
        except (SMTPFailure, OSError, asyncio.TimeoutError):
            # The message was accepted; a sloppy QUIT is not a lost message.
            pass
    except BaseException:
        client.abort()
        raise
    await client.close()


async def runLevel(args: argparse.Namespace, concurrency: int, runId: str) -> dict:
    """
    C{concurrency} clients sending C{--count} messages in total.
    """
    users = args.users or concurrency
    state = {"next": 0, "lat": [], "accepted": [], "failed": [], "errors": {}, "samples": []}
    deadline = time.monotonic() + args.seconds
    prefix = f"{runId}-c{concurrency}-"

    async def worker(index: int) -> None:
        user = userFor(args.user, index, users)
        while state["next"] < args.count and time.monotonic() < deadline:
            benchId = f"{prefix}{state['next']:07d}"
            state["next"] += 1
            t0 = time.perf_counter()
            try:
                await sendOne(args, user, benchId)
            except Exception as e:
                countError(state["errors"], state["samples"], e, f"{user}: ")
                state["failed"].append(benchId)
                await asyncio.sleep(ERROR_BACKOFF)
            else:
                state["lat"].append(time.perf_counter() - t0)
                state["accepted"].append(benchId)

    meter = CPUMeter(args.pid)
    meter.start()
    tasks = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=args.seconds + 10 * args.timeout + 5)
    await cancelPending(pending)
    cpu = meter.stop()
    n = len(state["accepted"])
    wall = cpu["wall_s"]
    result = {
        "bench": "smtp-submit",
        "host": args.host,
        "port": args.port,
        "concurrency": concurrency,
        "size": args.size,
        "count": args.count,
        "tried": state["next"],
        "accepted": n,
        "messages_per_s": round(n / wall, 1) if wall else None,
        **latencies(state["lat"]),
        "errors": sum(state["errors"].values()),
        "errors_by_kind": state["errors"],
        "unfinished": len(pending),
        "prefix": prefix,
    }
    result.update(cpu)
    if n and "server_cpu_s" in cpu:
        result["server_cpu_ms_per_message"] = round(1000 * cpu["server_cpu_s"] / n, 3)
    if state["samples"]:
        result["error_samples"] = state["samples"]
    result["_accepted"] = state["accepted"]
    result["_failed"] = state["failed"]
    return result


# ---------------------------------------------------------------- checking


def maildirKey(name: str) -> str:
    """
    A Maildir file's unique name: without C{:info} and without C{,S=}/C{,W=}.
    """
    return _SIZE_FIELD.sub("", name.split(":", 1)[0])


class MaildirScanner:
    """
    Finds X-Bench-Id headers with a given prefix in C{new/} and C{cur/},
    reading each file (by unique name) once.
    """

    def __init__(self, maildir: str) -> None:
        self.maildir = maildir
        self.seen: dict = {}  # key -> bench id or None

    def _names(self) -> list:
        out = []
        for sub in ("new", "cur"):
            try:
                for name in os.listdir(os.path.join(self.maildir, sub)):
                    if not name.startswith("."):
                        out.append((sub, name))
            except FileNotFoundError:
                pass
        return out

    def ignoreExisting(self) -> None:
        """
        Mark every message already present as not ours.
        """
        for _, name in self._names():
            self.seen[maildirKey(name)] = None

    def scan(self, pattern: "re.Pattern") -> None:
        for sub, name in self._names():
            key = maildirKey(name)
            if key in self.seen:
                continue
            try:
                with open(os.path.join(self.maildir, sub, name), "rb") as f:
                    head = f.read(HEADER_READ)
            except FileNotFoundError:
                continue  # moved new -> cur meanwhile; seen on the next scan
            match = pattern.search(head)
            self.seen[key] = match.group(1).decode() if match else None

    def counts(self) -> dict:
        found: dict = {}
        for benchId in self.seen.values():
            if benchId is not None:
                found[benchId] = found.get(benchId, 0) + 1
        return found


def verify(args: argparse.Namespace, scanner: MaildirScanner, result: dict) -> None:
    """
    Wait up to C{--verify-seconds} for every accepted message to appear,
    then count found, lost and duplicated ones into C{result}.
    """
    pattern = re.compile(rb"^X-Bench-Id: (" + re.escape(result["prefix"].encode()) + rb"[0-9]+)", re.M)
    accepted = set(result["_accepted"])
    failed = set(result["_failed"])
    t0 = time.monotonic()
    deadline = t0 + args.verify_seconds
    while True:
        scanner.scan(pattern)
        found = scanner.counts()
        if accepted <= found.keys() or time.monotonic() >= deadline:
            break
        time.sleep(SCAN_INTERVAL)
    lost = sorted(accepted - found.keys())
    result.update(
        {
            "found": len(accepted & found.keys()),
            "lost": len(lost),
            "duplicated": sum(1 for v in found.values() if v > 1),
            "extra_copies": sum(v - 1 for v in found.values() if v > 1),
            "delivered_despite_error": len(failed & found.keys()),
            "verify_wait_s": round(time.monotonic() - t0, 3),
        }
    )
    if lost:
        result["lost_sample"] = lost[:MAX_SAMPLES]


def resultText(r: dict) -> str:
    text = (
        f"smtp c={r['concurrency']} size={r['size']}: {r['messages_per_s']} messages/s "
        f"({r['accepted']}/{r['count']} accepted in {r['wall_s']} s), per message p50 "
        f"{shown(r['p50_ms'])} ms p99 {shown(r['p99_ms'])} ms max {shown(r['max_ms'])} ms, errors {r['errors']}; "
        f"{cpuText(r)}"
    )
    text += errorText(r)
    if "found" in r:
        text += (
            f"\n  maildir: found {r['found']}, lost {r['lost']}, duplicated {r['duplicated']}"
            f" (extra copies {r['extra_copies']}), delivered despite an error "
            f"{r['delivered_despite_error']}, waited {r['verify_wait_s']} s"
        )
        if r["lost"]:
            text += f"\n  LOST MAIL: {r['lost']} accepted messages missing, e.g. {', '.join(r['lost_sample'])}"
        if r["duplicated"]:
            text += "\n  DUPLICATED MAIL"
    return text


async def runAll(args: argparse.Namespace) -> int:
    runId = uuid.uuid4().hex[:12]
    status = 0
    for concurrency in args.concurrency:
        scanner = None
        if args.maildir:
            scanner = MaildirScanner(args.maildir)
            scanner.ignoreExisting()
        result = await runLevel(args, concurrency, runId)
        if scanner is not None:
            verify(args, scanner, result)
        del result["_accepted"], result["_failed"]
        emit(args, result, resultText(result))
        if result["errors"] or result.get("lost") or result.get("duplicated"):
            status = 1
    return status


# -------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="smtp_load.py", description=__doc__.split("\n\n")[0].strip(), epilog="See bench/README.rst."
    )
    addTarget(ap)
    ap.add_argument("--user", required=True, help="login and MAIL FROM; {i} becomes 1..--users per client")
    ap.add_argument("--users", type=positive(int), help="distinct users for {i} (default: the concurrency)")
    ap.add_argument("--password", default="")
    ap.add_argument("--no-auth", action="store_true", help="skip AUTH (servers that do not offer it)")
    ap.add_argument("--starttls", action="store_true", help="STARTTLS before AUTH (no certificate check)")
    ap.add_argument("--rcpt", required=True, help="the recipient of every message")
    ap.add_argument("--count", type=positive(int), default=1000, help="messages per concurrency level")
    ap.add_argument(
        "--concurrency", type=concurrencyList, default=[1], help="comma-separated client counts (e.g. 1,20)"
    )
    ap.add_argument("--size", type=positive(int), default=4096, help="message size in octets (LF form)")
    ap.add_argument("--maildir", help="the recipient's Maildir: check every accepted message arrived")
    ap.add_argument("--verify-seconds", type=float, default=30.0, help="wait for deliveries at most this long")
    ap.add_argument("--seconds", type=positive(float), default=600.0, help="duration bound per level")
    ap.add_argument("--timeout", type=positive(float), default=DEFAULT_TIMEOUT, help="per connect/read")
    ap.add_argument("--pid", type=int, help="server process id: its CPU is reported")
    ap.add_argument("--json", action="store_true", help="one JSON line per result on stdout")
    return ap


def main(argv: Optional[list] = None) -> int:
    args = parser().parse_args(argv)
    _common.checkHost(args, "smtp_load")
    if not args.no_auth and not args.password:
        raise SystemExit("smtp_load: --password is required unless --no-auth")
    try:
        return asyncio.run(runAll(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
