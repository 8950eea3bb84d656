"""Small synchronous HTTP clients for end-to-end tests.

``http.client`` sends the path verbatim (``urllib`` would normalise it), and
``raw_request`` writes exact bytes on a socket, for malformed requests.
Every call has a timeout: a hung daemon fails the test instead of hanging it.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import socket
import threading
import time
from typing import Any, Callable, NamedTuple

DEFAULT_TIMEOUT = 30.0


class Response(NamedTuple):
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def describe(self) -> str:
        hdrs = "".join(f"\n  {k}: {v}" for k, v in self.headers.items())
        body = self.body[:500]
        return f"HTTP {self.status}{hdrs}\n  body[:500]={body!r}"


def request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Response:
    """One request on a fresh connection; ``path`` goes on the wire as given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.headers, data)
    finally:
        conn.close()


def raw_request(port: int, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> Response:
    """Send ``data`` exactly as given and parse one response."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock, method=data.split(b" ", 1)[0].decode("latin-1"))
        resp.begin()
        body = resp.read()
        return Response(resp.status, resp.headers, body)
    finally:
        sock.close()


def raw_get(port: int, path: bytes | str, headers: dict[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> Response:
    if isinstance(path, str):
        path = path.encode("latin-1")
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: 127.0.0.1:%d" % port, b"Connection: close"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}".encode("latin-1"))
    return raw_request(port, b"\r\n".join(lines) + b"\r\n\r\n", timeout)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str, password: str) -> dict[str, str]:
    cred = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {cred}"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def eventually(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, message: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        time.sleep(interval)


def get_until_hit(daemon: Any, path: str, body: bytes | None = None, timeout: float = 30.0) -> Response:
    """GET ``path`` until it is a cache HIT.

    A client can read the last byte of a miss before the daemon has committed
    the entry (fsync, rename, index row); a request in that window joins the
    finishing fetch and is still a MISS. Every answer on the way must carry
    the right body.
    """
    deadline = time.monotonic() + timeout
    while True:
        resp = daemon.get(path)
        assert resp.status == 200, resp.describe()
        if body is not None:
            assert sha256(resp.body) == sha256(body), f"wrong body ({len(resp.body)} bytes) for {path}"
        if resp.header("X-Cache") == "HIT":
            return resp
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never became a HIT within {timeout}s; last answer:\n{resp.describe()}")
        time.sleep(0.05)


def assert_json_error(resp: Response, status: int | tuple[int, ...]) -> dict[str, Any]:
    """The contract's error shape: JSON ``{"error": ..., "status": code}``."""
    wanted = status if isinstance(status, tuple) else (status,)
    assert resp.status in wanted, f"expected HTTP {wanted}, got:\n{resp.describe()}"
    ctype = resp.header("Content-Type") or ""
    assert ctype.split(";")[0].strip() == "application/json", f"error body is not JSON:\n{resp.describe()}"
    doc = resp.json()
    assert isinstance(doc, dict) and "error" in doc, f"no 'error' in body:\n{resp.describe()}"
    assert doc.get("status") == resp.status, f"'status' in body differs from the response's:\n{resp.describe()}"
    return doc


class Fetch(threading.Thread):
    """GET in a background thread; ``result`` is a Response or the exception raised."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 60) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.headers, self.timeout = port, path, headers or {}, timeout
        self.sent = threading.Event()
        self.got_headers = threading.Event()
        self.result: Response | BaseException | None = None
        self.done_at: float | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            conn.request("GET", self.path, headers=self.headers)
            self.sent.set()
            resp = conn.getresponse()
            self.got_headers.set()
            body = resp.read()
            self.result = Response(resp.status, resp.headers, body)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.result = e
        finally:
            self.done_at = time.monotonic()
            self.sent.set()
            conn.close()

    def response(self, timeout: float = 60) -> Response:
        self.join(timeout)
        assert not self.is_alive(), f"GET {self.path} did not finish within {timeout}s"
        if isinstance(self.result, BaseException):
            raise AssertionError(f"GET {self.path} failed: {self.result!r}") from self.result
        assert self.result is not None
        return self.result
