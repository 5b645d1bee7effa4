#!/usr/bin/env python3
"""
What the inbound checks (SPF, DKIM, DMARC; C{[inbound]}) cost per message
on C{--mx}: two real C{twistd pop3gw} side by side, one with C{checks = no},
one asking a DNS server on loopback (C{tests/dnshelpers.py} run as a
process), each sent the same DKIM-signed messages with C{smtplib} from
C{--clients} threads, in alternating rounds.  Prints messages/s and
p50/p99 per message for each, per round.

Run from the source tree with its venv: C{.venv/bin/python bench/mx_checks.py
--count 200 --clients 4 --rounds 3}.  Only 127.0.0.1 is contacted; every
process it starts is stopped, every temporary directory removed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.dnshelpers import rsaKey, sign  # noqa: E402

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
POP3GW = os.path.join(os.path.dirname(sys.executable), "pop3gw")
MESSAGE = (
    b"From: Alice <alice@good.example>\r\nTo: bob@example.org\r\nSubject: bench\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <%d@good.example>\r\n\r\n" + b"x" * 70 + b"\r\n"
)


def startDNS(work: str, public: str) -> tuple[subprocess.Popen, int]:
    path = os.path.join(work, "zone.json")
    with open(path, "w") as f:
        json.dump({
            "good.example": [["TXT", "v=spf1 ip4:127.0.0.1 -all"]],
            "sel._domainkey.good.example": [["TXT", f"v=DKIM1; k=rsa; p={public}"]],
            "_dmarc.good.example": [["TXT", "v=DMARC1; p=reject"]],
        }, f)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "dnshelpers.py"), path],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline().decode().strip().split("=")[1])


def startServer(work: str, name: str, inbound: str) -> tuple[subprocess.Popen, int]:
    data = os.path.join(work, name)
    os.makedirs(data)
    ini = os.path.join(data, "test.ini")
    with open(ini, "w") as f:
        f.write(f"[inbound]\n{inbound}")
    subprocess.run([POP3GW, "--data-dir", data, "user", "add", "bob@example.org"], input=b"pw\n", check=True,
                   capture_output=True)
    proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "--logfile=-", "pop3gw", "--config", ini, "--data-dir", data,
                             "--hostname", "mail.example.org", "--pop3", "none", "--submission", "none",
                             "--mx", "tcp:0:interface=127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        m = re.search(r"mx listening on 127\.0\.0\.1:(\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, int(m.group(1))
        if not line:
            break
    raise SystemExit(f"{name}: pop3gw did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run(port: int, messages: list, clients: int) -> tuple[float, list, int]:
    """
    Send C{messages} from C{clients} threads, one connection each.

    @return: seconds, per-message latencies, errors.
    """
    latencies: list = []
    errors = [0]
    lock = threading.Lock()
    queue = list(messages)

    def worker() -> None:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=60)
        smtp.ehlo("client.good.example")
        while True:
            with lock:
                if not queue:
                    break
                message = queue.pop()
            t = time.monotonic()
            try:
                smtp.sendmail("alice@good.example", ["bob@example.org"], message)
            except smtplib.SMTPException:
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append(time.monotonic() - t)
        smtp.quit()

    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return time.monotonic() - start, sorted(latencies), errors[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200, help="messages per server per round")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="pop3gw-bench-mx-")
    procs: list = []
    try:
        pem, public = rsaKey()
        dns, dnsPort = startDNS(work, public)
        procs.append(dns)
        off, offPort = startServer(work, "off", "checks = no\n")
        procs.append(off)
        on, onPort = startServer(work, "on", f"dns-server = 127.0.0.1:{dnsPort}\n")
        procs.append(on)
        messages = [sign(MESSAGE % i, "good.example", "sel", pem) for i in range(args.count)]
        for r in range(args.rounds):
            for name, port in (("checks=no ", offPort), ("checks=yes", onPort)):
                seconds, lat, errors = run(port, messages, args.clients)
                p50 = lat[len(lat) // 2] * 1000 if lat else float("nan")
                p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")
                print(f"round {r + 1} {name}: {len(lat) / seconds:7.1f} msg/s  p50 {p50:6.1f} ms  p99 {p99:6.1f} ms"
                      f"  errors {errors}", flush=True)
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(work, True)


if __name__ == "__main__":
    main()
