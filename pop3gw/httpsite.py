# -*- test-case-name: tests.test_httpsite -*-
"""
The one kind of HTTP site pop3gw serves (C{--metrics}, the ACME HTTP-01
responder): GET only, and no request body taken in.

Twisted's web server reads a request's whole body before its resource
answers, spooling any body of 100000 octets or more to a temporary file,
however long: a client could fill the disk through a listener that has
no use for a body (the ACME responder faces the internet on port 80).
Here a request that announces a body over L{MAX_REQUEST_BODY} octets, or
a chunked one, is answered C{413} as soon as its header ends and the
connection is closed; nothing of the body is kept.
"""

from __future__ import annotations

from io import BytesIO
from typing import Optional

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

#: The largest request body accepted (and then ignored), in octets.
MAX_REQUEST_BODY = 4096

_TOO_LARGE = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _BodilessRequest(Request):
    """
    A request whose body, if larger than L{MAX_REQUEST_BODY} or chunked,
    is refused instead of read.
    """

    _refused = False

    def gotLength(self, length: Optional[int]) -> None:
        self._body = BytesIO()
        self.content = self._body
        if length is not None and length <= MAX_REQUEST_BODY:
            return
        self._refused = True
        transport = self.channel.transport
        if transport is not None:
            transport.write(_TOO_LARGE)
            transport.loseConnection()

    def handleContentChunk(self, data: bytes) -> None:
        if not self._refused:
            self._body.write(data)

    def process(self) -> None:
        if not self._refused:
            super().process()


def getOnlySite(root: Resource) -> Site:
    """
    A site serving C{root} that refuses request bodies (see the module
    docstring), with no access log and no tracebacks shown.
    """
    site = Site(root, requestFactory=_BodilessRequest)
    site.noisy = False
    site.displayTracebacks = False
    return site
