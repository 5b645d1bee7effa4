#!/usr/bin/env python3
"""
Cost of a large maildrop: log in, STAT and UIDL a maildrop of 1,000, 10,000
and 50,000 messages (C{--counts}), and the server's memory while the
session holds the listing, pop3gw beside Dovecot.

One maildrop serves both: pop3gw's data directory is C{DATA}, its mail
C{DATA/mail/example.org/big/}, which is also where the private Dovecot of
C{../shared/bench/peers/dovecot.sh} (C{--dovecot}, needs root) finds it.
The messages are written the way C{pop3_load.py seed} writes them (both
sizes in the name).  For each count the script grows the maildrop, then
takes C{--repeats} turns of each server, alternating, and prints:

- C{login+STAT+UIDL ms}: connect, USER/PASS, STAT, UIDL read to its end;
  the first Dovecot login of a count (index built) is shown apart;
- C{RSS delta KB}: server memory (C{VmRSS}) of the process serving the
  session once UIDL is answered, minus a baseline, and the same per
  message in bytes.  pop3gw: the one server process, restarted before each
  turn so memory kept from an earlier session does not hide this one's;
  its baseline is a session of the same user with the maildrop moved
  away, so the password check (Argon2 memory the allocator keeps) is not
  counted.  Dovecot: its per-session C{pop3} process; the baseline is a
  session of a 1-message maildrop;
- C{server CPU ms}: CPU time of the server's processes (Dovecot: the whole
  tree, the session's exited processes included) for that session, the
  steadier figure on a shared machine;
- C{deliver ms}: one C{pop3gw deliver} into the maildrop of that size.

With C{--base-src DIR}, a third server ("before") serves the same
maildrops (its data directory's C{mail} is a link to pop3gw's) with the
C{pop3gw} package of C{DIR} (say a C{git archive} of an earlier commit),
for a before/after comparison in the same run.

Everything runs on 127.0.0.1 and in a temporary directory removed at the
end; both servers are stopped by PID.  Standard library only (plus the
C{twistd} and C{pop3gw} of C{--bin}).
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

DOMAIN = "example.org"
PASSWORD = "bench-password"
_HERE = os.path.dirname(os.path.abspath(__file__))
#: The shared harness's Dovecot peer: C{../shared/bench/peers/} of the
#: checkout (or of the directory holding a worktree of it).
DOVECOT_SH = next(
    (
        p
        for p in (
            os.path.join(_HERE, "..", "..", "shared", "bench", "peers", "dovecot.sh"),
            os.path.join(_HERE, "..", "..", "..", "shared", "bench", "peers", "dovecot.sh"),
        )
        if os.path.exists(p)
    ),
    "dovecot.sh",
)
VMAIL = 5000


def freePort() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def waitPort(port: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def rssKB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _stat(pid: int) -> tuple:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return fields


def treeCPU(root: int) -> float:
    """
    CPU seconds of C{root} and every process under it, plus what its
    exited children used (C{cutime}, C{cstime}).
    """
    parents: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
            except (OSError, ValueError):
                continue
    total = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            fields = _stat(pid)
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:13])
        if pid == root:
            total += sum(int(x) for x in fields[13:15])
        todo.extend(parents.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int, comm: str) -> list:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        name = data[data.index("(") + 1 : data.rindex(")")]
        ppid = int(data[data.rindex(")") + 2 :].split()[1])
        if ppid == pid and name == comm:
            found.append(int(entry))
    return found


def seed(maildir: str, start: int, stop: int, size: int) -> None:
    """
    Add messages C{start}..C{stop-1} of C{size} octets to C{maildir/new}.
    """
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
    stamp = 1_700_000_000
    for n in range(start, stop):
        data = pop3_load.seedMessage(size, n, str(stamp))
        wire = len(data) + data.count(b"\n")
        unique = f"{stamp + n}.M{n % 1000000:06d}P{os.getpid()}Q{n}.{host}"
        tmp = os.path.join(maildir, "tmp", unique)
        with open(tmp, "xb") as f:
            f.write(data)
        os.rename(tmp, os.path.join(maildir, "new", f"{unique},S={len(data)},W={wire}"))


async def session(port: int, user: str, memoryOf) -> tuple:
    """
    Log in, STAT, UIDL; measure; QUIT.

    @return: (milliseconds until UIDL was read, RSS KB of C{memoryOf()},
        message count from STAT).
    """
    t0 = time.perf_counter()
    client = await pop3_load.POP3Client.open("127.0.0.1", port, 300.0)
    await client.command(b"USER " + user.encode())
    await client.command(b"PASS " + PASSWORD.encode())
    stat = await client.command(b"STAT")
    _, body = await client.multiline(b"UIDL")
    elapsed = (time.perf_counter() - t0) * 1000
    rss = memoryOf()
    await client.quit()
    count = int(stat.split()[1])
    listed = body.count(b"\r\n")
    if listed != count:
        raise SystemExit(f"UIDL listed {listed} messages, STAT said {count}")
    return elapsed, rss, count


class Pop3gw:
    """
    A pop3gw server; with C{source}, the C{pop3gw} package of that
    directory (a checkout of an earlier commit) is imported instead of the
    installed one.
    """

    def __init__(self, bin: str, data: str, source: str = "", name: str = "pop3gw") -> None:
        self.bin = bin
        self.data = data
        self.name = name
        self.port = freePort()
        self.proc = None
        self.env = dict(os.environ)
        if source:
            self.env["PYTHONPATH"] = os.path.abspath(source)

    def cli(self, *args: str, stdin: bytes = b"") -> float:
        t0 = time.perf_counter()
        subprocess.run(
            [os.path.join(self.bin, "pop3gw"), "--data-dir", self.data, *args],
            input=stdin, check=True, stdout=subprocess.DEVNULL, env=self.env,
        )
        return (time.perf_counter() - t0) * 1000

    def addUser(self, address: str) -> None:
        self.cli("user", "add", address, stdin=PASSWORD.encode() + b"\n")

    def start(self) -> None:
        self.log = open(os.path.join(self.data, f"twistd-{self.name}.log"), "ab")
        self.proc = subprocess.Popen(
            [os.path.join(self.bin, "twistd"), "-n", "--pidfile=", "pop3gw", "--data-dir", self.data,
             "--domain", DOMAIN, "--pop3", f"tcp:{self.port}:interface=127.0.0.1",
             "--submission", f"tcp:{freePort()}:interface=127.0.0.1"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.data, env=self.env,
        )
        waitPort(self.port)

    def memory(self) -> int:
        return rssKB(self.proc.pid)

    def cpu(self) -> float:
        return treeCPU(self.proc.pid)

    def fresh(self) -> None:
        """
        Restart, so memory the allocator kept from an earlier session does
        not hide this one's.
        """
        self.stop()
        self.start()

    def baseline(self, maildir: str, tiny: str, big: str) -> int:
        """
        RSS KB during a session of C{big} with its maildrop moved away (an
        empty one in its place): the password check and everything else
        but the listing, whose cost is then what a session with the
        maildrop adds.
        """
        os.rename(maildir, maildir + ".away")
        try:
            _, base, _ = asyncio.run(session(self.port, big, self.memory))
        finally:
            shutil.rmtree(maildir)
            os.rename(maildir + ".away", maildir)
        return base

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Dovecot:
    name = "dovecot"

    def __init__(self, data: str, script: str) -> None:
        self.data = data
        self.script = script
        self.port = freePort()
        self.env = dict(os.environ, DOVECOT_POP3_PORT=str(self.port))

    def sh(self, *args: str) -> None:
        subprocess.run(["bash", self.script, args[0], self.data, *args[1:]], env=self.env, check=True, stdout=subprocess.DEVNULL)

    def addUser(self, address: str) -> None:
        self.sh("adduser", address, PASSWORD)

    def start(self) -> None:
        self.sh("start")
        with open(os.path.join(self.data, "dovecot", "run", "master.pid")) as f:
            self.master = int(f.read())
        waitPort(self.port)

    def fresh(self) -> None:
        """
        Nothing: every Dovecot session is a new process.
        """

    def baseline(self, maildir: str, tiny: str, big: str) -> int:
        """
        RSS KB of the C{pop3} process during a session of C{tiny} (one
        message): every session is a new process, and moving C{big}'s
        maildrop away would make Dovecot index it again.
        """
        _, base, _ = asyncio.run(session(self.port, tiny, self.memory))
        return base

    def cpu(self) -> float:
        return treeCPU(self.master)

    def memory(self) -> int:
        pids = children(self.master, "pop3")
        return sum(rssKB(p) for p in pids)

    def stop(self) -> None:
        subprocess.run(["bash", self.script, "stop", self.data], env=self.env, stdout=subprocess.DEVNULL)


def spread(values: list) -> str:
    return f"{statistics.median(values):.0f} [{min(values):.0f}..{max(values):.0f}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default=os.path.dirname(sys.executable), help="directory holding twistd and pop3gw")
    p.add_argument("--counts", default="1000,10000,50000")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dovecot", action="store_true", help="also serve the maildrop with a private Dovecot (root)")
    p.add_argument("--dovecot-sh", default=DOVECOT_SH, help="the shared harness's peers/dovecot.sh")
    p.add_argument(
        "--base-src", default="",
        help="also serve the maildrop with the pop3gw package of this directory (a checkout of an earlier commit)",
    )
    args = p.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    if counts[-1] > 200_000:
        raise SystemExit("at most 200000 messages")
    data = tempfile.mkdtemp(prefix="maildrop-scale-")
    os.chmod(data, 0o755)
    servers: list = [Pop3gw(args.bin, data)]
    if args.base_src:
        # A data directory of its own (each server locks its own), whose
        # mail is the same directory.
        beforeData = os.path.join(data, "before")
        os.makedirs(beforeData)
        os.makedirs(os.path.join(data, "mail"))
        os.symlink(os.path.join(data, "mail"), os.path.join(beforeData, "mail"))
        servers.append(Pop3gw(args.bin, beforeData, args.base_src, "before"))
    if args.dovecot:
        servers.append(Dovecot(data, args.dovecot_sh))
    big = f"big@{DOMAIN}"
    tiny = f"tiny@{DOMAIN}"
    maildir = os.path.join(data, "mail", DOMAIN, "big")
    message = pop3_load.seedMessage(args.size, 0, "deliver")
    try:
        for server in servers:
            server.addUser(big)
            server.addUser(tiny)
        seed(os.path.join(data, "mail", DOMAIN, "tiny"), 0, 1, args.size)
        seed(maildir, 0, 0, args.size)
        for server in servers:
            server.start()
        print(
            f"{'messages':>8} {'server':8} {'login+STAT+UIDL ms':>22} {'first':>7} {'server CPU ms':>20} "
            f"{'RSS delta KB':>22} {'B/msg':>6} {'deliver ms':>10}"
        )
        have = 0
        for count in counts:
            seed(maildir, have, count, args.size)
            have = count
            if args.dovecot:
                subprocess.run(["chown", "-R", f"{VMAIL}:{VMAIL}", os.path.join(data, "mail")], check=True)
            results: dict = {s.name: {"ms": [], "cpu": [], "kb": [], "first": None} for s in servers}
            for server in servers:
                try:
                    asyncio.run(session(server.port, tiny, server.memory))
                except OSError as e:
                    raise SystemExit(f"{server.name}: {e}") from None
            for _ in range(args.repeats + 1):
                for server in servers:
                    server.fresh()
                    asyncio.run(session(server.port, tiny, server.memory))
                    base = server.baseline(maildir, tiny, big)
                    cpu = server.cpu()
                    ms, rss, seen = asyncio.run(session(server.port, big, server.memory))
                    time.sleep(0.2)  # Dovecot's session process exits
                    cpu = server.cpu() - cpu
                    if seen != count:
                        raise SystemExit(f"{server.name}: STAT says {seen}, expected {count}")
                    r = results[server.name]
                    if r["first"] is None:
                        r["first"] = ms
                        continue
                    r["ms"].append(ms)
                    r["cpu"].append(cpu * 1000)
                    r["kb"].append(rss - base)
            before = {sub: set(os.listdir(os.path.join(maildir, sub))) for sub in ("new", "cur")}
            deliver = servers[0].cli("deliver", big, stdin=message)
            # The delivered message is taken out again so every count is exact.
            for sub in ("new", "cur"):
                for name in set(os.listdir(os.path.join(maildir, sub))) - before[sub]:
                    os.unlink(os.path.join(maildir, sub, name))
            for server in servers:
                deliverText = f"{deliver:.0f}" if server.name == "pop3gw" else ""
                r = results[server.name]
                perMessage = statistics.median(r["kb"]) * 1024 / count
                print(
                    f"{count:>8} {server.name:8} {spread(r['ms']):>22} {r['first']:>7.0f} {spread(r['cpu']):>20} "
                    f"{spread(r['kb']):>22} "
                    f"{perMessage:>6.0f} {deliverText:>10}",
                    flush=True,
                )
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
