#!/usr/bin/env python3
"""
POP3 sessions/s and durable submissions/s of 1, 2 and 3 C{twistd -n pop3gw}
nodes on one PostgreSQL database, beside one Maildir node, with the shared
yardstick's client (C{../shared/bench/mailbench.py}): the figures of
C{docs/scaling.rst}.

It starts a private PostgreSQL cluster (as C{tests/pgcluster.py} does:
C{initdb} in a temporary directory, Unix socket only) and, for each
configuration, its nodes on loopback ports chosen by the kernel, each with
its own data directory.  Every node gets its own C{mailbench.py} process
(started together, so their windows coincide): the concurrency is split
across the nodes, and each node's clients log in as their own users (a
load balancer spreads clients, and a maildrop is served by one node at a
time).  Users are added with C{pop3gw user add} (the default password
scheme, as the yardstick does) and seeded with 20 messages of 2,048 octets
each, the yardstick's C{pop3-sessions} set; submissions go to one local
user with the yardstick's message size.  Configurations take turns within
each repeat, in a rotated order, so they share the machine's noise.

Server CPU per operation counts the nodes' processes and the PostgreSQL
server's (the postmaster and its backends), read from C{/proc} over the
same window; it is steadier than rates on a shared machine.  C{--src DIR}
runs the nodes from another source tree (a C{git archive} of an older
commit) with this virtualenv's dependencies, for before/after figures in
one run.  Run from the repository root with the virtualenv's Python;
nothing here is run by the test suite; every process is stopped by PID and
every directory removed at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pop3gw.pgmail import storeMessage  # noqa: E402
from tests import pgcluster  # noqa: E402

PASSWORD = "bench password"
BIN = os.path.dirname(sys.executable)
#: The yardstick's client: C{../shared/bench/mailbench.py} beside the
#: checkout (or two levels up, from a worktree); C{--mailbench} overrides.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAILBENCH = next(
    (p for p in (os.path.join(ROOT, up, "shared", "bench", "mailbench.py") for up in ("..", os.path.join("..", "..")))
     if os.path.exists(p)),
    "mailbench.py",
)
CONFIG = "[limits]\nfailure-delay = 0.2\nmessages-per-hour = 1000000\nrecipients-per-day = 1000000\n"
SEED_COUNT, SEED_SIZE = 20, 2048


def treeCPU(roots: list[int]) -> float:
    """
    @return: CPU seconds (user + system, children reaped included) of the
        processes C{roots} and all their descendants alive now.
    """
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(b")") + 2:].split()
        parents[int(name)] = int(rest[1])
        cpu[int(name)] = sum(int(x) for x in rest[11:15]) / tick
    total = 0.0
    for pid in cpu:
        p = pid
        while p > 1:
            if p in roots:
                total += cpu[pid]
                break
            p = parents.get(p, 0)
    return total


def makeMessage(size: int, seq: int) -> bytes:
    """
    A message of exactly C{size} octets with LF line ends, as the
    yardstick's C{maildir_seed.py} writes them.
    """
    head = (f"From: seed@example.org\nTo: user@example.org\nSubject: bench seed {seq}\n"
            f"Message-ID: <seed.{os.getpid()}.{seq}@bench.invalid>\nDate: Thu, 01 Jan 2026 00:00:00 +0000\n\n"
            ".this line starts with a dot\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\n"
    full, rest = divmod(size - len(head), len(line))
    body = line * full + (b"z" * (rest - 1) + b"\n" if rest > 1 else b"\n" if rest else b"")
    return head + body


class Node:
    """
    One C{twistd -n pop3gw} process.
    """

    #: Where to write each database node's cProfile statistics (C{--profile}).
    profileDir: Optional[str] = None

    def __init__(self, store: Optional[str], src: Optional[str], dataDir: Optional[str] = None) -> None:
        self.dataDir = dataDir or tempfile.mkdtemp(prefix="pop3gw-bench-node-")
        self.config = os.path.join(self.dataDir, "bench.ini")
        with open(self.config, "w") as f:
            f.write(CONFIG)
        self.store = store
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if src is not None:
            self.env["PYTHONPATH"] = src
        self.proc: Optional[subprocess.Popen] = None
        self.ports: dict[str, int] = {}

    def storeArgs(self) -> list[str]:
        return ["--store", self.store] if self.store else ["--data-dir", self.dataDir]

    def cli(self, *args: str, input: bytes = b"") -> None:
        subprocess.run([os.path.join(BIN, "pop3gw"), "--config", self.config, *self.storeArgs(), *args],
                       input=input, check=True, capture_output=True, env=self.env)

    def start(self) -> "Node":
        profile = []
        if self.profileDir is not None and self.store:
            path = os.path.join(self.profileDir, f"node-{len(os.listdir(self.profileDir))}.pstats")
            profile = [f"--profile={path}", "--profiler=cprofile", "--savestats"]
        command = [os.path.join(BIN, "twistd"), "-n", *profile, "--pidfile=", "--logfile=-", "pop3gw", "--config", self.config,
                   "--data-dir", self.dataDir, "--domain", "example.org", "--hostname", "mail.example.org",
                   "--pop3", "tcp:0:interface=127.0.0.1", "--submission", "tcp:0:interface=127.0.0.1"]
        if self.store:
            command += ["--store", self.store]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env)
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            m = re.search(rb"(pop3|submission) listening on 127\.0\.0\.1:(\d+)", raw)
            if m:
                self.ports[m.group(1).decode()] = int(m.group(2))
            if len(self.ports) == 2:
                break
        if len(self.ports) != 2:
            raise SystemExit("a node did not start")
        stdout = self.proc.stdout
        threading.Thread(target=lambda: [None for _ in stdout], daemon=True).start()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def users(config: str, node: int, count: int) -> list[str]:
    return [f"{config}n{node}u{i}@example.org" for i in range(1, count + 1)]


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


def runClients(mailbench: str, kind: str, nodes: list[Node], index: int, conc: int, extra: list[list[str]],
               pids: list[int], database: Optional[int]) -> tuple:
    """
    One C{mailbench.py KIND} process per node, started together, each with
    its share of the concurrency, its own users and C{extra[k]}; the CPU
    of the nodes' process trees (C{pids}) and of the database server's
    (C{database}) is read around them.

    @return: the mailbench results, the wall time and the CPU seconds of
        the nodes and of the database.
    """
    procs = []
    for k, (node, c) in enumerate(zip(nodes, split(conc, len(nodes))), 1):
        port = node.ports["pop3" if kind == "pop3-sessions" else "submission"]
        command = [sys.executable, mailbench, kind, "--port", str(port), "--user", f"c{index}n{k}u{{i}}@example.org",
                   "--users", str(c), "--password", PASSWORD, "--concurrency", str(c), *extra[k - 1]]
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    dbPids = [database] if database is not None else []
    cpu0, db0, t0 = treeCPU(pids), treeCPU(dbPids), time.monotonic()
    results = []
    for p in procs:
        out, err = p.communicate()
        line = next((x for x in out.decode().splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"mailbench failed: {err.decode()[-2000:]}")
        results.append(json.loads(line[len("RESULT "):]))
    return results, time.monotonic() - t0, treeCPU(pids) - cpu0, treeCPU(dbPids) - db0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--nodes", default="1,2,3", help="node counts on the database, comma-separated")
    parser.add_argument("--no-maildir", action="store_true", help="leave out the Maildir node")
    parser.add_argument("--src", action="append", default=[],
                        help="LABEL=DIR: also run the database nodes from source tree DIR (repeatable)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conc", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--smtp-count", type=int, default=600)
    parser.add_argument("--smtp-size", type=int, default=4096)
    parser.add_argument("--only", default="pop3-sessions,smtp-submit")
    parser.add_argument("--mailbench", default=MAILBENCH, help="the yardstick's client")
    parser.add_argument("--profile", metavar="DIR", help="write each database node's cProfile statistics to DIR "
                        "(the figures then include the profiler's cost)")
    args = parser.parse_args()
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        Node.profileDir = os.path.abspath(args.profile)
    benches = args.only.split(",")

    import psycopg

    binDir = pgcluster.binDirectory()
    if binDir is None:
        raise SystemExit("PostgreSQL is not installed")
    cluster = pgcluster.Cluster(binDir).start()
    dirs: list[str] = []
    running: list[Node] = []
    try:
        sources: list[tuple[str, Optional[str]]] = [("", None)] + [
            (label + ":", path) for label, _, path in (s.partition("=") for s in args.src)]
        configs: list[tuple[str, Optional[str], Optional[str], int]] = []  # name, store, src, nodes
        if not args.no_maildir:
            configs.append(("maildir 1 node", None, None, 1))
        for label, src in sources:
            uri = cluster.newDatabase()
            init = Node(uri, src)
            dirs.append(init.dataDir)
            init.cli("init")
            for n in (int(x) for x in args.nodes.split(",")):
                configs.append((f"{label}postgresql {n} node{'s' if n > 1 else ''}", uri, src, n))
        # Users and seed messages, per configuration (disjoint sets).
        maildirNode: Optional[Node] = None
        for index, (name, store, src, n) in enumerate(configs):
            setup = Node(store, src)
            dirs.append(setup.dataDir)
            if store is None:
                maildirNode = setup
            addresses = [a for k, c in enumerate(split(args.conc, n), 1) for a in users(f"c{index}", k, c)]
            for address in addresses + ([f"sink{index}@example.org"]):
                setup.cli("user", "add", address, input=PASSWORD.encode() + b"\n")
            for address in addresses:
                if store is None:
                    local = address.split("@")[0]
                    root = os.path.join(setup.dataDir, "mail", "example.org", local)
                    for sub in ("tmp", "new", "cur"):
                        os.makedirs(os.path.join(root, sub), exist_ok=True)
                    for i in range(SEED_COUNT):
                        with open(os.path.join(root, "new", f"{int(time.time())}.M{i}P{os.getpid()}.bench"), "wb") as f:
                            f.write(makeMessage(SEED_SIZE, i))
                else:
                    with psycopg.connect(store) as conn:
                        for i in range(SEED_COUNT):
                            data = makeMessage(SEED_SIZE, i).replace(b"\n", b"\r\n")
                            storeMessage(conn, io.BytesIO(data), len(data), [(address, None, False)])
            print(f"set up {name}", flush=True)
        table: dict[tuple[str, str], list[dict]] = {}
        print(f"load at start: {open('/proc/loadavg').read().split()[:3]}; {os.cpu_count()} CPUs", flush=True)
        for rep in range(args.repeats):
            order = configs[rep % len(configs):] + configs[:rep % len(configs)]
            for bench in benches:
                for name, store, src, n in order:
                    index = configs.index((name, store, src, n))
                    nodes = []
                    for _ in range(n):
                        dataDir = maildirNode.dataDir if store is None and maildirNode else None
                        node = Node(store, src, dataDir)
                        if dataDir is None:
                            dirs.append(node.dataDir)
                        running.append(node)
                        nodes.append(node.start())
                    pids = [node.proc.pid for node in nodes if node.proc is not None]
                    database = cluster.pid if store is not None else None
                    if bench == "pop3-sessions":
                        extra = [["--seconds", str(args.seconds)]] * n
                        outcomes, wall, cpu, dbCPU = runClients(
                            args.mailbench, bench, nodes, index, args.conc, extra, pids, database
                        )
                        ops = sum(o["sessions"] for o in outcomes)
                        errors = sum(o["errors"] for o in outcomes)
                        rate = ops / args.seconds
                        # The CPU window includes the clients' start and
                        # their warm-up second: the measured window's share.
                        cpu, dbCPU = cpu * args.seconds / wall, dbCPU * args.seconds / wall
                    else:
                        extra = [["--count", str(c), "--size", str(args.smtp_size), "--rcpt", f"sink{index}@example.org"]
                                 for c in split(args.smtp_count, n)]
                        outcomes, wall, cpu, dbCPU = runClients(
                            args.mailbench, "smtp-submit", nodes, index, args.conc, extra, pids, database
                        )
                        ops = sum(o["accepted"] for o in outcomes)
                        errors = sum(o["errors"] + o["rejected_or_failed"] for o in outcomes)
                        # From the first client's start to the last one's
                        # last 250.
                        rate = ops / max(o["accepted"] / o["accept_msgs_per_s"] for o in outcomes)
                    row = {
                        "rate": rate,
                        "nodeMs": 1000 * cpu / ops if ops else float("nan"),
                        "cpuMs": 1000 * (cpu + dbCPU) / ops if ops else float("nan"),
                        "errors": errors,
                    }
                    table.setdefault((bench, name), []).append(row)
                    print(f"repeat {rep + 1} {bench} {name}: {rate:.1f}/s, node CPU {row['nodeMs']:.2f} ms/op, "
                          f"node + database CPU {row['cpuMs']:.2f} ms/op, errors {errors}", flush=True)
                    for node in nodes:
                        node.stop()
                        running.remove(node)
        print()
        print(f"load at end: {open('/proc/loadavg').read().split()[:3]}")
        for bench in benches:
            print(f"\n{bench}: median [min..max] over {args.repeats} repeats, c={args.conc}")
            print(f"| {'configuration':32} | {'ops/s':>26} | {'node CPU ms/op':>26} "
                  f"| {'node + database CPU ms/op':>26} | errors |")
            for name, _store, _src, _n in configs:
                rows = table[(bench, name)]
                cells = []
                for key, form in (("rate", "8.1f"), ("nodeMs", "8.2f"), ("cpuMs", "8.2f")):
                    values = [r[key] for r in rows]
                    cells.append(f"{statistics.median(values):{form}} [{min(values):{form[1:]}}..{max(values):{form[1:]}}]")
                print(f"| {name:32} | " + " | ".join(f"{c:>26}" for c in cells) + f" | {sum(r['errors'] for r in rows):6} |")
    finally:
        for node in running:
            node.stop()
        cluster.stop()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
