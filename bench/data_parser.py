#!/usr/bin/env python3
"""
Micro benchmark of the SMTP message data reader (L{pop3gw.smtpdata}): the
time to read a message after DATA (or as BDAT chunks) in TCP-sized reads,
with no network and no disk (the delivery only counts octets).

Run with the project's venv (it imports pop3gw)::

    .venv/bin/python bench/data_parser.py
    .venv/bin/python bench/data_parser.py --compare /tmp/old/smtpdata.py

C{--compare FILE} loads another version of C{pop3gw/smtpdata.py} (e.g. one
taken from an older commit with C{git show OLD:pop3gw/smtpdata.py}) and
runs both side by side, alternating, so that the figures share the
machine's load.  Prints, per message kind and version, the median, minimum
and maximum MB/s over the repeats.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from types import ModuleType

from zope.interface import implementer

from pop3gw import smtpdata
from pop3gw.interfaces import IDelivery


@implementer(IDelivery)
class CountingDelivery:
    """
    Counts the octets written.
    """

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


def message(kind: str, size: int) -> bytes:
    """
    A message of about C{size} octets: C{text} (78-octet lines, some
    dot-stuffed), C{base64} (76-octet lines) or C{lf} (bare LF line ends).
    """
    head = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: bench\r\n\r\n"
    if kind == "base64":
        line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"
    elif kind == "lf":
        line = b"The quick brown fox jumps over the lazy dog, line ended by a bare LF only.....\n"
    else:
        line = b"The quick brown fox jumps over the lazy dog; transparency follows........\r\n..x\r\n"
    body = line * (size // len(line) + 1)
    # After a bare LF, "." is content: the end needs a CRLF before it.
    return head + body + b"\r\n.\r\n"


def loadModule(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("smtpdata_compare", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runOnce(module: ModuleType, data: bytes, read: int, count: int) -> float:
    """
    Read C{data} C{count} times in reads of C{read} octets; return the
    seconds taken.
    """
    start = time.perf_counter()
    for _ in range(count):
        delivery = CountingDelivery()
        reader = module._MessageReader(delivery, 1 << 40, None, lambda present: [])
        buf = bytearray()
        for i in range(0, len(data), read):
            buf += data[i : i + read]
            if reader.consume(buf):
                break
        else:
            raise SystemExit("the end of the data was not found")
        if reader.finish() is not None:
            raise SystemExit("the message was refused")
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20 * 1024 * 1024, help="message size in octets")
    parser.add_argument("--read", type=int, default=64 * 1024, help="octets per TCP read")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--count", type=int, default=1, help="messages read per timing (for small sizes)")
    parser.add_argument("--compare", help="another smtpdata.py to run side by side")
    parser.add_argument("--kinds", default="text,base64,lf")
    options = parser.parse_args(argv)
    versions = [("current", smtpdata)]
    if options.compare:
        versions.insert(0, ("compare", loadModule(options.compare)))
    print(
        f"message size {options.size} octets, reads of {options.read} octets,"
        f" {options.count} message(s) per timing, {options.repeat} repeats"
    )
    for kind in options.kinds.split(","):
        data = message(kind, options.size)
        times: dict[str, list[float]] = {name: [] for name, _ in versions}
        for _ in range(options.repeat):
            for name, module in versions:
                times[name].append(runOnce(module, data, options.read, options.count))
        for name, _ in versions:
            rates = [len(data) * options.count / t / 1e6 for t in times[name]]
            print(
                f"{kind:7} {name:8} median {statistics.median(rates):8.1f} MB/s"
                f"  min {min(rates):8.1f}  max {max(rates):8.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
