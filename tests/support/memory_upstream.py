"""An upstream origin in memory: a twisted.web resource for unit tests.

The same vocabulary as the socket-bound one end-to-end tests use
(tests/support/upstream.py: ``add``, ``behave(path, **Behaviour)``,
``resume``, ``count``), served through a :class:`MemoryAgent`, so a daemon
under test reaches it with no port and every misbehaviour is exact::

    up = MemoryUpstream()
    up.add("/files/a.bin", b"...")
    up.behave("/files/a.bin", truncate_at=100)     # 100 body bytes, then a reset
    up.behave("/meta", status=503, times=1)         # one failure, then the file again
    up.behave("/slow", pause_at=10)                 # 10 bytes, then wait for resume()
    await up.until_paused("/slow"); up.resume("/slow")
    up.count("/files/a.bin")                        # GET requests seen

Every host name reaches the same resource (``base_url`` is a name, not a
socket); the Host header of each request is recorded. Time-based behaviours
(``delay``, ``rate``, ``chunk_delay``) are refused: a unit test holds a
response with ``stall``/``pause_at`` and drives timeouts with its clock.
"""

from __future__ import annotations

import email.utils
import hashlib
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.support.memory import REQUEST_DEADLINE, MemoryAgent
from tests.support.upstream import Behaviour, File, RecordedRequest, not_modified, take_behaviour

BASE_URL = "http://upstream.test"


class _Gate:
    """An Event for the reactor: open() releases every waiter, and later ones pass."""

    def __init__(self) -> None:
        self.is_open = False
        self._waiters: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        if self.is_open:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def open(self) -> None:
        self.is_open = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


class MemoryUpstream(Resource):
    isLeaf = True

    def __init__(self, base_url: str = BASE_URL) -> None:
        super().__init__()
        self.base_url = base_url
        self.files: dict[str, File] = {}
        self.behaviours: dict[str, Behaviour] = {}
        self.requests: list[RecordedRequest] = []
        self._gates: dict[str, _Gate] = {}
        self._paused: dict[str, _Gate] = {}
        self._version = 0
        self.agent = MemoryAgent(Site(self))

    # -- content ------------------------------------------------------------

    def url(self, path: str = "") -> str:
        return self.base_url + path

    def add(self, path: str, data: bytes, content_type: str = "application/octet-stream",
            etag: str | None = None, last_modified: float | None = None) -> None:
        """Serve ``data`` at ``path``; replacing a body gives it new validators."""
        assert path.startswith("/"), path
        self._version += 1
        if last_modified is None:
            last_modified = 1_600_000_000.0 + self._version  # strictly increasing whole seconds
        if etag is None:
            etag = '"' + hashlib.sha256(data).hexdigest()[:20] + f'-{self._version}"'
        self.files[path] = File(data, content_type, etag, last_modified)

    def remove(self, path: str) -> None:
        self.files.pop(path, None)

    def behave(self, path: str, behaviour: Behaviour | None = None, **kwargs: Any) -> Behaviour:
        """Set how ``path`` (exact, or without its query) misbehaves."""
        b = behaviour or Behaviour(**kwargs)
        if b.delay or b.rate or b.chunk_delay:
            raise ValueError("time-based behaviours need a socket upstream; use stall or pause_at")
        self.clear(path)
        self.behaviours[path] = b
        self._gates[path] = _Gate()
        self._paused[path] = _Gate()
        return b

    def clear(self, path: str | None = None) -> None:
        """Forget the behaviour of ``path`` (or all); releases anything held."""
        for p in [path] if path is not None else list(self.behaviours):
            self.behaviours.pop(p, None)
            gate = self._gates.get(p)
            if gate is not None:
                gate.open()

    def resume(self, path: str) -> None:
        """Let stalled or paused responses for ``path`` continue (and later ones pass)."""
        self._gates.setdefault(path, _Gate()).open()

    def until_paused(self, path: str) -> Deferred[None]:
        """Fires once a response for ``path`` reached its stall or pause point
        (fails after REQUEST_DEADLINE, so that a test cannot hang on it)."""
        return self._paused.setdefault(path, _Gate()).wait().addTimeout(REQUEST_DEADLINE, reactor)

    # -- observations -------------------------------------------------------

    def requests_for(self, path: str, method: str | None = "GET") -> list[RecordedRequest]:
        """Requests for ``path``; without a query in ``path`` the query is ignored."""
        return [r for r in self.requests
                if (r.path if "?" in path else r.path.split("?", 1)[0]) == path
                and (method is None or r.method == method)]

    def count(self, path: str, method: str | None = "GET") -> int:
        return len(self.requests_for(path, method))

    def total(self) -> int:
        return len(self.requests)

    def describe(self) -> str:
        return "\n".join(f"  {r.method} {r.path} -> {r.status} ({r.body_sent} body bytes)"
                         for r in self.requests) or "  (none)"

    # -- serving ------------------------------------------------------------

    def render(self, request: Any) -> Any:
        uri = request.uri.decode("latin-1")
        headers = {k.decode("latin-1").lower(): v[0].decode("latin-1")
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        rec = RecordedRequest(request.method.decode(), uri, headers, 0.0)
        self.requests.append(rec)
        key, found = take_behaviour(self.behaviours, uri)
        b = found or Behaviour()
        gate = self._gates.get(key) if key else None
        paused = self._paused.get(key) if key else None
        if b.reset:
            request.channel.transport.abortConnection()
            return NOT_DONE_YET
        if b.stall and gate is not None:
            if paused is not None:
                paused.open()
            gate.wait().addCallback(lambda _: self._answer_later(request, rec, b, gate, paused))
            return NOT_DONE_YET
        return self._answer(request, rec, b, gate, paused)

    def _answer_later(self, request: Any, rec: RecordedRequest, b: Behaviour, gate: _Gate | None,
                      paused: _Gate | None) -> None:
        out = self._answer(request, rec, b, gate, paused)
        if out is not NOT_DONE_YET and not request._disconnected:
            request.write(out)
            request.finish()

    def _answer(self, request: Any, rec: RecordedRequest, b: Behaviour, gate: _Gate | None,
                paused: _Gate | None) -> Any:
        if request._disconnected:
            return NOT_DONE_YET
        head = request.method == b"HEAD"
        if b.status is not None:
            body = b.body if b.body is not None else f"upstream says {b.status}\n".encode()
            return self._simple(request, rec, b.status, body, {"Content-Type": "text/plain", **b.headers})
        if b.redirect is not None:
            return self._simple(request, rec, b.redirect_status, b"", {"Location": b.redirect, **b.headers})
        if request.method not in (b"GET", b"HEAD"):
            return self._simple(request, rec, 405, b"method not allowed\n", {"Allow": "GET, HEAD"})
        f = self.files.get(rec.path) or self.files.get(rec.path.split("?", 1)[0])
        if f is None:
            return self._simple(request, rec, 404, b"not found\n", {"Content-Type": "text/plain"})
        validators = {}
        if b.validators:
            validators = {"ETag": f.etag, "Last-Modified": email.utils.formatdate(f.last_modified, usegmt=True)}
        if b.conditional and b.validators and not_modified(lambda name: request.getHeader(name), f):
            return self._simple(request, rec, 304, b"", validators, length=False)
        rec.status = 200
        request.setHeader(b"Content-Type", f.content_type.encode())
        for k, v in {**validators, **b.headers}.items():
            request.setHeader(k.encode(), v.encode())
        if not b.chunked:
            # twisted.web sends chunks when no length is set.
            request.setHeader(b"Content-Length", str(len(f.data)).encode())
        if head:
            return b""
        self._send(request, rec, f.data, b, gate, paused)
        return NOT_DONE_YET

    def _simple(self, request: Any, rec: RecordedRequest, status: int, body: bytes, headers: dict[str, str],
                length: bool = True) -> bytes:
        rec.status = status
        request.setResponseCode(status)
        for k, v in headers.items():
            request.setHeader(k.encode(), v.encode())
        if length:
            request.setHeader(b"Content-Length", str(len(body)).encode())
        if request.method == b"HEAD":
            return b""
        rec.body_sent = len(body)
        return body

    def _send(self, request: Any, rec: RecordedRequest, data: bytes, b: Behaviour, gate: _Gate | None,
              paused: _Gate | None) -> None:
        limit = len(data) if b.truncate_at is None else min(b.truncate_at, len(data))
        hold = b.pause_at if b.pause_at is not None and gate is not None and not gate.is_open else None
        first = limit if hold is None else min(hold, limit)
        if first:
            request.write(data[:first])
            rec.body_sent = first
        if hold is None:
            self._end(request, rec, data, limit)
            return
        assert gate is not None and paused is not None
        paused.open()

        def go_on(_: object) -> None:
            if request._disconnected:
                return
            if limit > first:
                request.write(data[first:limit])
                rec.body_sent = limit
            self._end(request, rec, data, limit)

        gate.wait().addCallback(go_on)

    def _end(self, request: Any, rec: RecordedRequest, data: bytes, limit: int) -> None:
        if limit < len(data):
            # Truncated: a reset before the body (or the chunk stream) is complete.
            request.channel.transport.abortConnection()
        else:
            request.finish()
