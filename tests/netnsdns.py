"""
Run a command in a private network namespace whose only DNS server is a
twisted.names authoritative server on 127.0.0.1:53 serving given TXT
records: for programs, such as OpenDKIM's C{opendkim-testmsg}, that ask
the system resolver and cannot be pointed at another server or port.

Usage (inside C{unshare --user --map-root-user --net --mount}, which makes
the network and the mounts private to this process and its children, and
needs no privilege where unprivileged user namespaces are allowed, as on
Debian)::

    python netnsdns.py RECORDS.json -- COMMAND [ARG...]

C{RECORDS.json} maps DNS names to lists of TXT strings.  The command's
standard input, output and exit status are passed through.  Port 53 is
free in a new namespace: nothing else runs there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def main(argv: list) -> int:
    recordsPath, separator, *command = argv
    assert separator == "--", "usage: netnsdns.py RECORDS.json -- COMMAND [ARG...]"
    with open(recordsPath) as f:
        txt = json.load(f)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    fd, resolvConf = tempfile.mkstemp(prefix="pop3gw-resolv-")
    os.write(fd, b"nameserver 127.0.0.1\noptions attempts:1 timeout:5\n")
    os.close(fd)
    try:
        subprocess.run(["mount", "--bind", resolvConf, "/etc/resolv.conf"], check=True)
        return serve(txt, command)
    finally:
        os.unlink(resolvConf)


def serve(txt: dict, command: list) -> int:
    from twisted.internet import reactor, threads
    from twisted.names import authority, common, dns, server

    class MemoryAuthority(authority.FileAuthority):
        def __init__(self, soa, records) -> None:
            common.ResolverBase.__init__(self)
            self.soa, self.records = soa, records
            self._cache = {}

    zones = {name.split(".", 1)[1] if "._domainkey." not in name else name.split("._domainkey.", 1)[1] for name in txt}
    authorities = []
    for zone in sorted(zones):
        soa = dns.Record_SOA(mname=b"ns." + zone.encode(), rname=b"root." + zone.encode(), serial=1, refresh=60,
                             retry=60, expire=60, minimum=60, ttl=60)
        records: dict = {zone.encode(): [soa]}
        for name, strings in txt.items():
            if name.endswith("." + zone):
                records[name.lower().encode()] = [dns.Record_TXT(*[s.encode() for s in strings], ttl=60)]
        authorities.append(MemoryAuthority((zone.encode(), soa), records))
    factory = server.DNSServerFactory(authorities=authorities)
    reactor.listenUDP(53, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    reactor.listenTCP(53, factory, interface="127.0.0.1")
    result = {}

    def run() -> None:
        result["status"] = subprocess.run(command).returncode

    d = threads.deferToThread(run)
    d.addErrback(lambda f: result.setdefault("status", 70) and f.printTraceback())
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    return result.get("status", 70)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
