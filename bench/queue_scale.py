#!/usr/bin/env python3
"""
Cost of a long outbound queue: drain C{--count} queued messages (5,000) to a
local sink (Postfix's C{smtp-sink}) through C{--relay-host}, and start the
server and run C{pop3gw queue list} with C{--waiting} entries (50,000) that
are not due.

Run it with the Python of the pop3gw install to measure (C{--bin} holds its
C{twistd} and C{pop3gw}): the queue is filled with pop3gw's own
C{OutboundQueue} (one entry written, the rest copies of it with their own
ids, so filling takes seconds, not one fsync pair per message).  Prints:

- drain: seconds from the server's start (and from its "queued messages
  loaded" line) until the queue directory is empty, messages/s, the
  messages the sink counted, the server's CPU seconds (and per message
  from its "queued messages loaded" line on), and its peak and final
  RSS;
- with C{--postfix} (root), the same messages through a private Postfix
  (relayhost = a sink of its own): submitted over SMTP and held, then
  released and flushed; seconds from the release until its queue is
  empty, and the CPU seconds its processes used meanwhile (the master,
  its live daemons, and those it reaped);
- waiting: seconds until the server logs the loaded queue, its RSS then,
  and the seconds C{pop3gw queue list} takes (and its line count); then
  the same again (a second start-up, which finds the queue's index the
  first one wrote, and a second listing).

Everything runs on 127.0.0.1 in a temporary directory removed at the end
(kept with C{KEEP=1} in the environment, for its logs); every process is
stopped by PID (Postfix with C{postfix -c DIR stop}).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet.task import Clock

from pop3gw.address import Address
from pop3gw.queue import OutboundQueue

SENDER = Address("alice", "example.org")
RECIPIENT = Address("bob", "remote.example")


def freePort() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    out["cpu"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def fill(root: str, count: int, size: int, due: bool) -> None:
    """
    Put C{count} entries of a C{size}-octet message into the queue at
    C{root}, due now or in a day.
    """
    clock = Clock()
    clock.advance(time.time())
    queue = OutboundQueue(root, clock)
    announced: list = []
    queue.addListener(announced.append)
    delivery = queue.beginDelivery(SENDER, [RECIPIENT])
    line = b"x" * 75 + b"\r\n"
    delivery.write(b"Subject: queue bench\r\n\r\n" + line * (size // len(line)))
    delivery.commit()
    [entry] = announced
    with open(os.path.join(root, entry.queueId + ".json"), "rb") as f:
        template = json.loads(f.read())
    template["nextAttempt"] = time.time() - 1 if due else time.time() + 86400
    message = os.path.join(root, entry.queueId + ".msg")
    for n in range(1, count):
        queueId = "%013x-%08x" % (int(time.time() * 1e6) & (16**13 - 1), n)
        template["id"] = queueId
        with open(os.path.join(root, queueId + ".json"), "w") as f:
            json.dump(template, f)
        os.link(message, os.path.join(root, queueId + ".msg"))
    with open(os.path.join(root, entry.queueId + ".json"), "w") as f:
        template["id"] = entry.queueId
        json.dump(template, f)


def queued(root: str) -> int:
    return sum(1 for n in os.listdir(root) if n.endswith(".json"))


class Server:
    def __init__(self, bin: str, data: str, *args: str) -> None:
        self.log = open(os.path.join(data, "twistd.log"), "w+b")
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(
            [os.path.join(bin, "twistd"), "-n", "--pidfile=", "pop3gw", "--data-dir", data, "--domain", "example.org",
             "--pop3", "none", "--submission", "none", *args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=data,
        )

    def logged(self, text: bytes) -> bool:
        self.log.seek(0)
        return text in self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def drain(args: argparse.Namespace, top: str) -> None:
    data = os.path.join(top, "drain")
    os.makedirs(os.path.join(data, "queue"))
    fill(os.path.join(data, "queue"), args.count, args.size, True)
    port = freePort()
    # Its running counter goes to a file: a pipe nobody reads would fill
    # and stop the sink.
    counter = open(os.path.join(top, "sink.out"), "w+b")
    sink = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{port}", "256"],
        stdout=counter, stderr=subprocess.STDOUT,
    )
    server = None
    try:
        time.sleep(0.3)
        options = ["--relay-host", f"127.0.0.1:{port}"]
        if args.connections:
            with open(os.path.join(data, "limits.ini"), "w") as f:
                f.write(f"[limits]\nrelay-connections = {args.connections}\n")
            options += ["--config", os.path.join(data, "limits.ini")]
        server = Server(args.bin, data, *options)
        peak = 0
        loaded = None
        loadedCPU = None
        deadline = time.monotonic() + args.timeout
        while queued(os.path.join(data, "queue")) and time.monotonic() < deadline:
            now = status(server.proc.pid)
            peak = max(peak, now["VmRSS"])
            if loaded is None and server.logged(b"queued messages loaded"):
                loaded = time.perf_counter() - server.start
                loadedCPU = now["cpu"]
            time.sleep(0.05)
        elapsed = time.perf_counter() - server.start
        if loaded is None:
            loaded = elapsed
        left = queued(os.path.join(data, "queue"))
        final = status(server.proc.pid)
        server.stop()
        server = None
    finally:
        if server is not None:
            server.stop()
        sink.send_signal(signal.SIGTERM)
        sink.wait(30)
        counter.seek(0)
        out = counter.read().decode("ascii", "replace")
    counted = out.replace("\r", "\n").strip().split("\n")[-1].strip()
    counted = counted[counted.rfind("sess=") :]
    sent = args.count - left
    print(
        f"drain: {sent} of {args.count} messages in {elapsed:.2f} s = {sent / elapsed:.0f} msg/s"
        f" (server start included), {elapsed - loaded:.2f} s = {sent / (elapsed - loaded):.0f} msg/s"
        f" from the queue loaded; sink counter {counted!r}; server CPU {final['cpu']:.2f} s"
        f" ({(final['cpu'] - (loadedCPU or 0.0)) / max(sent, 1) * 1000:.3f} ms per message after the load);"
        f" RSS peak {peak} KB, at the end {final['VmRSS']} KB",
        flush=True,
    )


def treeCPU(pid: int) -> float:
    """
    CPU seconds used by process C{pid}, its live children, and the
    children it reaped (a Postfix master and its daemons).
    """
    tick = os.sysconf("SC_CLK_TCK")

    def fields(p: int) -> list:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()

    total = 0
    mine = fields(pid)
    total += sum(int(x) for x in mine[11:15])
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            f = fields(int(name))
        except OSError:
            continue
        if int(f[1]) == pid:
            total += int(f[11]) + int(f[12])
    return total / tick


POSTFIX_MASTER = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

POSTFIX_MAIN = """\
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {spool}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {top}/maillog
maillog_file_prefixes = {top}
myhostname = bench-postfix.localdomain
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
relay_domains =
relayhost = [127.0.0.1]:{sink}
smtpd_recipient_restrictions = permit_mynetworks, reject
smtpd_end_of_data_restrictions = check_client_access static:HOLD
smtputf8_enable = no
biff = no
disable_dns_lookups = yes
smtp_host_lookup = native
alias_maps =
alias_database =
"""


def postfixDrain(args: argparse.Namespace, top: str) -> None:
    """
    The same drain through a private Postfix (root): the messages are
    submitted over SMTP and held, then released at once; the time runs
    from the release until the queue is empty.
    """
    import smtplib

    base = os.path.join(top, "postfix")
    etc, spool, data = (os.path.join(base, d) for d in ("etc", "spool", "data"))
    for d in (etc, spool, data):
        os.makedirs(d)
    for d in (top, base, etc):
        os.chmod(d, 0o755)
    shutil.chown(data, "postfix")
    port, sinkPort = freePort(), freePort()
    with open(os.path.join(etc, "main.cf"), "w") as f:
        f.write(POSTFIX_MAIN.format(etc=etc, spool=spool, data=data, top=base, sink=sinkPort))
    with open(os.path.join(etc, "master.cf"), "w") as f:
        f.write(POSTFIX_MASTER.format(port=port))
    postfix = ["/usr/sbin/postfix", "-c", etc]
    subprocess.run([*postfix, "check"], capture_output=True)
    subprocess.run([*postfix, "start"], check=True, capture_output=True)
    counter = open(os.path.join(top, "postfix-sink.out"), "w+b")
    sink = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{sinkPort}", "256"], stdout=counter, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client = smtplib.SMTP("127.0.0.1", port, timeout=30)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the Postfix peer did not start") from None
                time.sleep(0.1)
        line = b"x" * 75 + b"\r\n"
        message = b"Subject: queue bench\r\n\r\n" + line * (args.size // len(line))
        for _ in range(args.count):
            client.sendmail(str(SENDER), [str(RECIPIENT)], message)
        client.quit()
        queues = [os.path.join(spool, q) for q in ("incoming", "active", "deferred", "hold", "maildrop")]

        def count() -> int:
            return sum(len(files) for q in queues for _, _, files in os.walk(q))

        while count() < args.count and time.monotonic() < deadline + args.timeout:
            time.sleep(0.05)
        held = count()
        with open(os.path.join(spool, "pid", "master.pid")) as f:
            master = int(f.read().strip())
        cpuBefore = treeCPU(master)
        start = time.perf_counter()
        subprocess.run(["/usr/sbin/postsuper", "-c", etc, "-H", "ALL"], check=True, capture_output=True)
        # Released messages wait in the deferred queue: have them tried now.
        subprocess.run([*postfix, "flush"], check=True, capture_output=True)
        end = time.monotonic() + args.timeout
        while count() and time.monotonic() < end:
            time.sleep(0.05)
        elapsed = time.perf_counter() - start
        left = count()
        cpu = treeCPU(master) - cpuBefore
    finally:
        subprocess.run([*postfix, "stop"], capture_output=True)
        sink.send_signal(signal.SIGTERM)
        sink.wait(30)
    counter.seek(0)
    out = counter.read().decode("ascii", "replace").replace("\r", "\n").strip().split("\n")[-1]
    print(
        f"postfix drain: {held - left} of {held} held messages in {elapsed:.2f} s after their release ="
        f" {(held - left) / elapsed:.0f} msg/s; sink counter {out[out.rfind('sess='):]!r};"
        f" Postfix CPU {cpu:.2f} s ({cpu / max(held - left, 1) * 1000:.3f} ms per message)",
        flush=True,
    )


def waiting(args: argparse.Namespace, top: str) -> None:
    data = os.path.join(top, "waiting")
    os.makedirs(os.path.join(data, "queue"))
    fill(os.path.join(data, "queue"), args.waiting, args.size, False)
    # Files younger than 2 s are not indexed (pop3gw.queue.INDEX_RACY).
    time.sleep(2.5)

    def start() -> tuple:
        server = Server(args.bin, data, "--relay-host", "127.0.0.1:9")
        try:
            deadline = time.monotonic() + args.timeout
            while not server.logged(b"queued messages loaded") and time.monotonic() < deadline:
                time.sleep(0.02)
            started = time.perf_counter() - server.start
            rss = status(server.proc.pid)["VmRSS"]
        finally:
            server.stop()
        return started, rss

    def listing() -> tuple:
        t0 = time.perf_counter()
        out = subprocess.run(
            [os.path.join(args.bin, "pop3gw"), "--data-dir", data, "queue", "list"], capture_output=True, check=True
        )
        return time.perf_counter() - t0, len(out.stdout.splitlines())

    started, rss = start()
    listed, lines = listing()
    again, rssAgain = start()
    listedAgain, _ = listing()
    print(
        f"waiting: {args.waiting} entries: queue loaded {started:.2f} s after start, RSS {rss} KB;"
        f" queue list {listed:.2f} s for {lines} lines; second start {again:.2f} s, RSS {rssAgain} KB;"
        f" queue list again {listedAgain:.2f} s",
        flush=True,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default=os.path.dirname(sys.executable))
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--waiting", type=int, default=50000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--connections", type=int, default=0, help="[limits] relay-connections (default: pop3gw's)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--postfix", action="store_true", help="also drain the same through a private Postfix (root)")
    args = p.parse_args()
    if max(args.count, args.waiting) > 200_000:
        raise SystemExit("at most 200000 entries")
    top = tempfile.mkdtemp(prefix="queue-scale-")
    try:
        if args.count:
            drain(args, top)
            if args.postfix:
                postfixDrain(args, top)
        if args.waiting:
            waiting(args, top)
    finally:
        if not os.environ.get("KEEP"):
            shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
