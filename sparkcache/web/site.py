"""The HTTP site: the request and channel classes every listener uses.

Requests are counted while in flight (graceful stop waits for them), bodies
are capped at ``server.max_body_size``, and requests twisted.web refuses before
routing, or that fail outside any app's error handlers, are answered in JSON
rather than with its HTML pages.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.server import Request, Site

from sparkcache.web.errors import internal_error
from sparkcache.web.serve import error_body

log = Logger()


class _CappedBody:
    """A request body file that stops storing bytes past a limit.

    twisted.web spools every body before routing; without a cap one client
    could fill the temp disk. Past the limit the rest is read and dropped,
    and the request is answered 413 instead of being routed.
    """

    def __init__(self, inner: Any, cap: int) -> None:
        self.inner, self.cap, self.size, self.overflow = inner, cap, 0, False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.cap:
            self.overflow = True
            return
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class TrackedRequest(Request):
    """A request that the site counts while it is in flight (for graceful stop)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        # Never parse form bodies on the reactor: `curl --data-binary` sends
        # application/x-www-form-urlencoded by default, and twisted.web would
        # decode a multi-GB upload in memory. Apps read request.content.
        kw.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kw)

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        cap = getattr(getattr(self.channel, "site", None), "max_body_size", None)
        if cap is not None:
            self.content = _CappedBody(self.content, cap)  # type: ignore[assignment]
            if length is not None and length > cap:
                self.content.overflow = True

    def process(self) -> None:
        site: SparkSite = self.channel.site  # type: ignore[attr-defined]
        site.active.add(self)
        self.notifyFinish().addBoth(lambda _: site.active.discard(self))
        if isinstance(self.content, _CappedBody) and self.content.overflow:
            self.setHeader(b"Connection", b"close")
            body = error_body(self, 413, f"request body larger than server.max_body_size ({site.max_body_size} bytes)")
            self.write(body)
            self.finish()
            return
        super().process()

    def processingFailed(self, reason: Failure) -> Failure:
        # An exception outside any app's error handlers (in a resource's
        # render, or in an app's catch-all itself): the JSON 500 every app
        # falls back to, where twisted.web would send its HTML page.
        body = internal_error(self, reason)
        if not self.finished and not self._disconnected:
            self.write(body)
            self.finish()
        return reason


class JsonErrorChannel(HTTPChannel):
    """Requests twisted.web rejects before routing (header lines over 16 KiB,
    too many headers, malformed request lines) get a JSON error too."""

    _first_bytes_seen = False

    def dataReceived(self, data: bytes) -> None:
        # A TLS ClientHello on a plain-HTTP listener: skopeo, podman and
        # docker try https first against an insecure registry. Closing at
        # once makes them fall back to http now, not after their 10 s
        # handshake timeout (twisted.web would wait for a request line).
        if not self._first_bytes_seen and data:
            self._first_bytes_seen = True
            if data[:1] == b"\x16" and self.transport is not None:
                self.transport.loseConnection()
                return
        super().dataReceived(data)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._reject(400, b"Bad Request", b"malformed or oversized request")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._reject(431, b"Request Header Fields Too Large", b"request line or header longer than 16 KiB")

    def _reject(self, status: int, reason: bytes, message: bytes) -> None:
        body = b'{"error": "%s", "status": %d}\n' % (message, status)
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.loseConnection()


def _channel(factory: Any) -> _GenericHTTPChannelProtocol:
    return _GenericHTTPChannelProtocol(JsonErrorChannel())


class SparkSite(Site):
    requestFactory = TrackedRequest
    protocol = _channel  # type: ignore[assignment]
    noisy = False

    def __init__(self, resource: Any, access_log: bool = False, max_body_size: int | None = None, **kw: Any) -> None:
        super().__init__(resource, **kw)
        self.active: set[TrackedRequest] = set()
        self.access_log = access_log
        self.max_body_size = max_body_size

    def log(self, request: Any) -> None:
        # Off by default: at CI-fleet request rates a line per hit costs a
        # fifth of the hit path and floods the journal; /metrics counts them.
        if not self.access_log:
            return
        # twisted.web's access log would print Authorization-free lines, but
        # URLs can carry signed query strings: log method, path and status only.
        path = request.uri.split(b"?", 1)[0].decode("latin-1", "replace")
        log.info("{method} {path} {code} {size}", method=request.method.decode("latin-1"), path=path,
                 code=request.code, size=request.sentLength)
