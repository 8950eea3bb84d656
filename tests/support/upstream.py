"""A controllable upstream HTTP/1.1 server for end-to-end tests.

It runs the standard library's ``ThreadingHTTPServer`` on ``127.0.0.1`` in a
background thread, serves bodies from an in-memory mapping (and optionally a
directory), records every request, answers conditional requests with ``304``
and misbehaves on demand, per path::

    up = Upstream().start()
    up.add("/files/a.bin", b"...")
    up.behave("/files/a.bin", pause_at=65536)      # hold the body half-way
    ...
    up.resume("/files/a.bin")
    assert up.count("/files/a.bin") == 1
    up.stop()                                       # connection refused from now on
    up.start()                                      # same port again

Behaviours (see :class:`Behaviour`): a status override, a delay before the
headers, a slow body, a truncated body, chunked transfer encoding, a
connection reset, a stall until released or stopped, and redirects.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import pytest

__all__ = ["Behaviour", "RecordedRequest", "Upstream", "not_modified", "take_behaviour", "upstream_fixture"]


@dataclass
class Behaviour:
    """How the upstream misbehaves for one path.

    Fields compose: e.g. ``chunked=True, truncate_at=1000`` sends a chunked
    body and closes the connection before the terminating chunk.
    """

    status: int | None = None  # answer this status (with ``body``) instead of the file
    body: bytes | None = None  # body sent with a status override
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers
    delay: float = 0.0  # seconds to wait before the status line
    chunk_size: int = 64 * 1024  # body is written in pieces of this size ...
    chunk_delay: float = 0.0  # ... with this pause after each piece
    rate: int | None = None  # bytes per second; sets chunk_delay from chunk_size
    truncate_at: int | None = None  # send this many body bytes, then close
    chunked: bool = False  # Transfer-Encoding: chunked, no Content-Length
    reset: bool = False  # reset the connection (RST) instead of answering
    stall: bool = False  # send nothing until resume() or stop()
    pause_at: int | None = None  # send this many body bytes, then wait for resume()
    redirect: str | None = None  # Location of a redirect (path or absolute URL)
    redirect_status: int = 302
    conditional: bool = True  # honour If-None-Match / If-Modified-Since
    validators: bool = True  # send ETag and Last-Modified
    times: int | None = None  # apply to the next N requests only, then lapse


@dataclass
class RecordedRequest:
    method: str
    path: str  # as sent, query included
    headers: dict[str, str]  # lower-cased names
    time: float
    status: int | None = None  # what the upstream answered (None: no answer)
    body_sent: int = 0  # body bytes written

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class File:
    data: bytes
    content_type: str
    etag: str
    last_modified: float


class _Aborted(Exception):
    """The server is stopping or the test asked for a dead connection."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, owner: "Upstream", port: int) -> None:
        self.owner = owner
        self.stopping = threading.Event()
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)
        # serve_forever() accepts once select() says a connection waits; a client
        # that resets first leaves a blocking accept() hanging, and stop() (which
        # waits for serve_forever) with it. Non-blocking, that accept just fails.
        self.socket.setblocking(False)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conn_lock:
            if self.stopping.is_set():
                self.shutdown_request(request)
                return
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.conn_lock:
            self.connections.discard(request)
        try:
            super().shutdown_request(request)
        except OSError:
            pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients (the daemon) hang up on us all the time in these tests.
        pass

    def drop_connections(self) -> None:
        with self.conn_lock:
            conns = list(self.connections)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sparkcache-test-upstream/1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        try:
            self.server.owner._handle(self)
        except (_Aborted, OSError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch


class Upstream:
    """A controllable HTTP/1.1 origin on 127.0.0.1 (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = os.path.realpath(root) if root is not None else None
        self.port = 0
        self.files: dict[str, File] = {}
        self.behaviours: dict[str, Behaviour] = {}
        self.requests: list[RecordedRequest] = []
        self._lock = threading.RLock()
        self._gates: dict[str, threading.Event] = {}
        self._paused: dict[str, threading.Event] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._last_modified = time.time() - 3600

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> "Upstream":
        """Start serving; after stop(), serve again on the same port."""
        if self._server is not None:
            return self
        deadline = time.monotonic() + 10
        while True:
            try:
                server = _Server(self, self.port)
                break
            except OSError:
                if self.port == 0 or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"upstream-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop: close the listening socket and every open connection.

        Later connections are refused; handlers stuck in a stall or pause give up.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.stopping.set()
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    restart = start

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> "Upstream":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- content -------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "") -> str:
        return self.base_url + path

    def add(
        self,
        path: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        etag: str | None = None,
        last_modified: float | None = None,
    ) -> None:
        """Serve ``data`` at ``path``; replacing a body gives it new validators."""
        assert path.startswith("/"), path
        with self._lock:
            if last_modified is None:
                # Whole seconds, strictly increasing, in the past: If-Modified-Since
                # comparisons then work even for updates within one second.
                self._last_modified = max(float(int(time.time() - 60)), self._last_modified + 1)
                last_modified = self._last_modified
            if etag is None:
                etag = '"' + hashlib.sha256(data).hexdigest()[:20] + f'-{int(last_modified)}"'
            self.files[path] = File(data, content_type, etag, last_modified)

    def remove(self, path: str) -> None:
        with self._lock:
            self.files.pop(path, None)

    def behave(self, path: str, behaviour: Behaviour | None = None, **kwargs: Any) -> Behaviour:
        """Set how ``path`` (exact, or without its query) misbehaves."""
        b = behaviour or Behaviour(**kwargs)
        with self._lock:
            self.behaviours[path] = b
            self._gates[path] = threading.Event()
            self._paused[path] = threading.Event()
        return b

    def clear(self, path: str | None = None) -> None:
        """Forget the behaviour of ``path`` (or all); releases anything held."""
        with self._lock:
            paths = [path] if path is not None else list(self.behaviours)
            for p in paths:
                self.behaviours.pop(p, None)
                gate = self._gates.get(p)
                if gate is not None:
                    gate.set()

    def resume(self, path: str) -> None:
        """Let stalled or paused responses for ``path`` continue."""
        with self._lock:
            self._gates.setdefault(path, threading.Event()).set()

    def wait_paused(self, path: str, timeout: float = 30) -> None:
        """Wait until a response for ``path`` reached its pause/stall point."""
        with self._lock:
            ev = self._paused.setdefault(path, threading.Event())
        if not ev.wait(timeout):
            raise AssertionError(f"upstream never reached the pause point of {path} within {timeout}s; requests: {self.describe()}")

    # -- observations ------------------------------------------------------

    def requests_for(self, path: str, method: str | None = "GET") -> list[RecordedRequest]:
        """Requests for ``path``; without a query in ``path`` the query is ignored."""
        with self._lock:
            out = []
            for r in self.requests:
                p = r.path if "?" in path else r.path.split("?", 1)[0]
                if p == path and (method is None or r.method == method):
                    out.append(r)
            return out

    def count(self, path: str, method: str | None = "GET") -> int:
        return len(self.requests_for(path, method))

    def total(self) -> int:
        with self._lock:
            return len(self.requests)

    def forget_requests(self) -> None:
        """Start the record afresh (an upstream a module's tests share: each sees its own requests)."""
        with self._lock:
            self.requests.clear()

    def wait_requests(self, path: str, n: int = 1, method: str | None = "GET", timeout: float = 30) -> list[RecordedRequest]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.requests_for(path, method)
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {n} {method} request(s) for {path}, saw {len(got)}; requests: {self.describe()}")
            time.sleep(0.02)

    def describe(self) -> str:
        with self._lock:
            return "\n".join(f"  {r.method} {r.path} -> {r.status} ({r.body_sent} body bytes)" for r in self.requests) or "  (none)"

    # -- serving -----------------------------------------------------------

    def _behaviour(self, path: str) -> tuple[str | None, Behaviour | None]:
        with self._lock:
            return take_behaviour(self.behaviours, path)

    def _lookup(self, path: str) -> File | None:
        with self._lock:
            f = self.files.get(path) or self.files.get(path.split("?", 1)[0])
        if f is not None or self.root is None:
            return f
        rel = urllib.parse.unquote(path.split("?", 1)[0]).lstrip("/")
        full = os.path.realpath(os.path.join(self.root, rel))
        if not (full == self.root or full.startswith(self.root + os.sep)) or not os.path.isfile(full):
            return None
        st = os.stat(full)
        with open(full, "rb") as fh:
            data = fh.read()
        ctype = "application/octet-stream"
        if full.endswith((".txt", "Release", "Packages")):
            ctype = "text/plain"
        return File(data, ctype, f'"{st.st_mtime_ns:x}-{st.st_size:x}"', float(int(st.st_mtime)))

    def _wait(self, server: _Server, gate: threading.Event | None, seconds: float | None) -> None:
        """Sleep ``seconds`` (None: until ``gate`` opens); abort when the server stops."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            if server.stopping.is_set():
                raise _Aborted()
            if gate is not None and gate.is_set():
                return
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                server.stopping.wait(min(left, 0.05))
            else:
                server.stopping.wait(0.05)

    def _handle(self, h: _Handler) -> None:
        server = h.server
        length = int(h.headers.get("Content-Length") or 0)
        if length:
            h.rfile.read(length)
        rec = RecordedRequest(h.command, h.path, {k.lower(): v for k, v in h.headers.items()}, time.time())
        with self._lock:
            self.requests.append(rec)
        key, b = self._behaviour(h.path)
        b = b or Behaviour()
        gate = self._gates.get(key) if key else None
        paused = self._paused.get(key) if key else None

        if b.reset:
            h.close_connection = True
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            raise _Aborted()
        if b.stall:
            if paused is not None:
                paused.set()
            self._wait(server, gate, None)
        if b.delay:
            self._wait(server, None, b.delay)

        head = h.command == "HEAD"
        if b.status is not None:
            body = b.body if b.body is not None else f"upstream says {b.status}\n".encode()
            self._send_simple(h, rec, b.status, body, {"Content-Type": "text/plain", **b.headers}, head)
            return
        if b.redirect is not None:
            self._send_simple(h, rec, b.redirect_status, b"", {"Location": b.redirect, **b.headers}, head)
            return
        if h.command not in ("GET", "HEAD"):
            self._send_simple(h, rec, 405, b"method not allowed\n", {"Allow": "GET, HEAD"}, head)
            return
        f = self._lookup(h.path)
        if f is None:
            self._send_simple(h, rec, 404, b"not found\n", {"Content-Type": "text/plain"}, head)
            return

        validators = {}
        if b.validators:
            validators = {"ETag": f.etag, "Last-Modified": email.utils.formatdate(f.last_modified, usegmt=True)}
        if b.conditional and b.validators and not_modified(h.headers.get, f):
            rec.status = 304
            h.send_response(304)
            for k, v in validators.items():
                h.send_header(k, v)
            h.end_headers()
            return

        rec.status = 200
        h.send_response(200)
        h.send_header("Content-Type", f.content_type)
        for k, v in validators.items():
            h.send_header(k, v)
        if b.chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Content-Length", str(len(f.data)))
        for k, v in b.headers.items():
            h.send_header(k, v)
        h.end_headers()
        if head:
            return
        self._send_body(h, rec, server, f.data, b, gate, paused)

    def _send_simple(self, h: _Handler, rec: RecordedRequest, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        rec.status = status
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)
            rec.body_sent = len(body)

    def _send_body(
        self,
        h: _Handler,
        rec: RecordedRequest,
        server: _Server,
        data: bytes,
        b: Behaviour,
        gate: threading.Event | None,
        paused: threading.Event | None,
    ) -> None:
        size = max(1, b.chunk_size)
        delay = b.chunk_delay
        if b.rate:
            delay = size / float(b.rate)
        limit = len(data) if b.truncate_at is None else min(b.truncate_at, len(data))
        pos = 0
        while pos < limit:
            if b.pause_at is not None and pos >= b.pause_at and gate is not None and not gate.is_set():
                if paused is not None:
                    paused.set()
                self._wait(server, gate, None)
            end = min(limit, pos + size)
            if b.pause_at is not None and pos < b.pause_at < end:
                end = b.pause_at
            piece = data[pos:end]
            if b.chunked:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                h.wfile.write(piece)
            pos = end
            rec.body_sent = pos
            if delay and pos < limit:
                self._wait(server, None, delay)
        if b.pause_at is not None and b.pause_at >= limit and gate is not None and not gate.is_set():
            # A pause at (or past) the end of the body holds back completion.
            if paused is not None:
                paused.set()
            self._wait(server, gate, None)
        if limit < len(data):
            # Truncated: close without completing the body (or the chunk stream).
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if b.chunked:
            h.wfile.write(b"0\r\n\r\n")


def take_behaviour(behaviours: dict[str, Behaviour], path: str) -> tuple[str | None, Behaviour | None]:
    """(key, behaviour) for ``path`` (exact, or without its query), using up one of
    its ``times``; (None, None) when none applies."""
    for key in (path, path.split("?", 1)[0]):
        b = behaviours.get(key)
        if b is None:
            continue
        if b.times is not None:
            if b.times <= 0:
                return None, None
            b.times -= 1
        return key, b
    return None, None


def not_modified(header: Callable[[str], str | None], f: File) -> bool:
    """Whether the request whose headers ``header(name)`` reads may be answered 304 for ``f``."""
    inm = header("If-None-Match")
    if inm is not None:
        tags = [t.strip() for t in inm.split(",")]
        return "*" in tags or f.etag in tags or ("W/" + f.etag) in tags
    ims = header("If-Modified-Since")
    if ims is not None:
        try:
            when = email.utils.parsedate_to_datetime(ims).timestamp()
        except (TypeError, ValueError):
            return False
        return int(f.last_modified) <= when
    return False


@pytest.fixture
def upstream_fixture() -> Iterator[Upstream]:
    up = Upstream().start()
    try:
        yield up
    finally:
        up.stop()
