"""
Peak memory of C{pop3gw import} copying one large message.

Starts one C{twistd pop3gw} (POP3 over implicit TLS, a test CA) holding a
message of C{--size} MiB for alice, then runs C{pop3gw import
pop3s://alice@...} into a fresh data directory once per checkout given
with C{--src} (C{PYTHONPATH} set to it, so the checkout's C{pop3gw} code
runs with this Python's libraries), alternating, C{--repeats} times, and
prints each run's peak RSS (C{/usr/bin/time -f %M}) and wall time, then
the median and spread per checkout::

    .venv/bin/python bench/import_rss.py --src /path/to/main --src . --size 50

Run from a checkout (it uses C{tests.e2e} and C{tests.tlshelpers}); the
server is stopped by PID and every temporary directory removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.e2e import Pop3gwProcess, pop3gwCommand  # noqa: E402
from tests.tlshelpers import makeCA, makeLeaf  # noqa: E402

ALICE = "alice@example.org"
PASSWORD = "alice-secret"


class _Cleanups:
    """
    What C{Pop3gwProcess} needs of a test case: cleanups, run at the end.
    """

    def __init__(self) -> None:
        self.cleanups: list = []

    def addCleanup(self, f, *args) -> None:
        self.cleanups.append((f, args))

    def fail(self, text: str) -> None:
        raise SystemExit(text)

    def skipTest(self, text: str) -> None:
        raise SystemExit(text)

    def run(self) -> None:
        while self.cleanups:
            f, args = self.cleanups.pop()
            f(*args)


def message(size: int) -> bytes:
    """
    A message of C{size} octets: a header and 1000-octet lines.
    """
    head = b"Subject: large\r\n\r\n"
    line = b"x" * 998 + b"\r\n"
    count = (size - len(head)) // len(line)
    return head + line * count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", required=True, help="a pop3gw checkout (repeatable)")
    parser.add_argument("--size", type=int, default=50, help="MiB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    case = _Cleanups()
    try:
        work = tempfile.mkdtemp(prefix="pop3gw-bench-import-")
        case.addCleanup(shutil.rmtree, work, True)
        caCert, caKey = makeCA("Bench CA")
        cert, key = makeLeaf(caCert, caKey, "mail.example.org", ips=("127.0.0.1",))
        paths = {}
        for label, data in (("ca.pem", caCert), ("cert.pem", cert), ("key.pem", key)):
            paths[label] = os.path.join(work, label)
            with open(paths[label], "wb") as f:
                f.write(data)
        server = Pop3gwProcess(case, args=["--domain", "example.org", "--tls-cert", paths["cert.pem"],
                                           "--tls-key", paths["key.pem"]], listeners=("pop3s",))
        server.start()
        server.addUser(ALICE, PASSWORD)
        # Written into the Maildir as another tool would (a message over
        # the server's size limit can still be there from before).
        maildir = server.maildir(ALICE)
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(maildir, sub), exist_ok=True)
        with open(os.path.join(maildir, "new", "1700000000.bench.localhost"), "wb") as f:
            f.write(message(args.size * 1024 * 1024).replace(b"\r\n", b"\n"))
        source = f"pop3s://{ALICE}@127.0.0.1:{server.ports['pop3s']}"
        results: dict = {src: [] for src in args.src}
        for repeat in range(args.repeats):
            for src in args.src:
                target = tempfile.mkdtemp(prefix="pop3gw-bench-import-to-", dir=work)
                base = pop3gwCommand() + ["--data-dir", target]
                env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
                subprocess.run(base + ["user", "add", ALICE], input=b"pw\n", env=env, check=True,
                               capture_output=True)
                started = time.monotonic()
                done = subprocess.run(["/usr/bin/time", "-f", "%M"] + base + ["import", source, "--ca-file",
                                      paths["ca.pem"]], input=PASSWORD.encode() + b"\n", env=env,
                                      capture_output=True)
                wall = time.monotonic() - started
                if done.returncode != 0 or b"copied 1 messages" not in done.stdout:
                    raise SystemExit(f"import failed: {done.stdout!r} {done.stderr!r}")
                rss = int(done.stderr.strip().splitlines()[-1]) / 1024
                results[src].append((rss, wall))
                print(f"run {repeat + 1} {src}: peak RSS {rss:.1f} MiB, {wall:.2f} s", flush=True)
                shutil.rmtree(target, True)
        for src, runs in results.items():
            rss = [r for r, _ in runs]
            wall = [w for _, w in runs]
            print(f"{src}: peak RSS median {statistics.median(rss):.1f} MiB [{min(rss):.1f}..{max(rss):.1f}], "
                  f"wall median {statistics.median(wall):.2f} s [{min(wall):.2f}..{max(wall):.2f}]")
    finally:
        case.run()


if __name__ == "__main__":
    main()
