"""Generic remotes end to end: singleflight, tailing clients, truncation, ranges, redirects.

Objects "in flight" are held by the upstream at a pause point (``pause_at``)
until the test resumes them, so these tests depend on ordering, never on
wall-clock speed.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import threading
import time

import pytest

from tests.support.client import Fetch, Response, assert_json_error, eventually, get_until_hit, sha256
from tests.support.remotes import generic_remote
from tests.support.tools import require_tool

MiB = 1024 * 1024


@pytest.fixture(params=[True, False], ids=["sendfile", "producer"])
def daemon_factory(request, daemon_factory):
    """Every test here runs twice: bodies sent by os.sendfile threads (the
    default for large bodies on plain TCP) and by the reactor's push producers."""

    def make(*args, **kwargs):
        kwargs["server"] = {"sendfile": request.param, **kwargs.get("server", {})}
        return daemon_factory(*args, **kwargs)

    return make


def test_64_concurrent_clients_one_upstream_fetch(upstream, daemon_factory):
    data = os.urandom(2 * MiB)
    upstream.add("/files/big.bin", data)
    upstream.behave("/files/big.bin", pause_at=256 * 1024)
    d = daemon_factory({"r": generic_remote(upstream)})

    clients = [Fetch(d.port, "/api/r/files/big.bin") for _ in range(64)]
    for c in clients:
        c.start()
    for c in clients:
        assert c.sent.wait(30), "a client could not send its request"
    upstream.wait_paused("/files/big.bin")
    time.sleep(0.5)  # let the daemon read every request while the fetch is held
    upstream.resume("/files/big.bin")

    want = sha256(data)
    for i, c in enumerate(clients):
        resp = c.response()
        assert resp.status == 200, f"client {i}: {resp.describe()}"
        assert sha256(resp.body) == want, f"client {i} got {len(resp.body)} bytes, not the object"
    assert upstream.count("/files/big.bin") == 1, upstream.describe()


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(1024)
        if not chunk:
            raise AssertionError(f"connection closed before the end of the headers: {buf!r}")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head, rest


def test_slow_reader_does_not_hold_back_a_fast_one(upstream, daemon_factory):
    size = 16 * MiB  # well past what socket buffers on both sides can absorb
    data = os.urandom(size)
    upstream.add("/files/shared.bin", data)
    upstream.behave("/files/shared.bin", pause_at=64 * 1024)
    d = daemon_factory({"r": generic_remote(upstream)})

    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(30)
    slow.connect(("127.0.0.1", d.port))
    slow.sendall(b"GET /api/r/files/shared.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    upstream.wait_paused("/files/shared.bin")
    head, first = _read_head(slow)
    assert head.split(b" ")[1] == b"200", head

    received = [len(first)]
    slow_done = threading.Event()
    stop_slow = threading.Event()

    def trickle() -> None:
        try:
            while not stop_slow.is_set():
                chunk = slow.recv(1024)
                if not chunk:
                    slow_done.set()
                    return
                received[0] += len(chunk)
                time.sleep(0.01)  # ~100 KiB/s: 16 MiB would take minutes
        except OSError:
            pass

    reader = threading.Thread(target=trickle, daemon=True)
    reader.start()

    fast = Fetch(d.port, "/api/r/files/shared.bin")
    fast.start()
    assert fast.sent.wait(30)
    time.sleep(0.3)  # the fast client attaches to the running fetch
    upstream.resume("/files/shared.bin")

    resp = fast.response(120)
    slow_at_fast_end = received[0]
    slow_finished_first = slow_done.is_set()
    stop_slow.set()
    slow.close()
    reader.join(10)

    assert resp.status == 200, resp.describe()
    assert sha256(resp.body) == sha256(data), "the fast client got a wrong body"
    assert not slow_finished_first, "the slow client finished before the fast one"
    assert slow_at_fast_end < size, "the slow client had everything when the fast one finished"

    # The slow client hanging up cancelled nothing: the object is complete and cached.
    get_until_hit(d, "/api/r/files/shared.bin", data)
    assert upstream.count("/files/shared.bin") == 1, upstream.describe()


def _expect_no_complete_body(port: int, path: str, full_size: int) -> BaseException | Response:
    """GET ``path``: an error status or a read error, never a complete 200 body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        try:
            # (A reset can come before the client read the status line: the
            # kernel then drops the headers it had received. Aborted either way.)
            resp = conn.getresponse()
            body = resp.read()
        except (http.client.IncompleteRead, ConnectionError) as e:
            return e
        result = Response(resp.status, resp.headers, body)
        assert resp.status >= 500, f"a truncated upstream body was served as complete:\n{result.describe()}"
        return result
    finally:
        conn.close()


def _assert_refetched_then_cached(d, upstream, path: str, data: bytes) -> None:
    """After a failed fetch nothing is cached: the next GET is a MISS that goes upstream."""
    upstream.clear(path)
    n = upstream.count(path)
    resp = d.get("/api/r" + path)
    assert resp.status == 200, resp.describe()
    assert resp.header("X-Cache") == "MISS", "a truncated body must not have been cached"
    assert sha256(resp.body) == sha256(data)
    assert upstream.count(path) == n + 1, upstream.describe()
    get_until_hit(d, "/api/r" + path, data)
    eventually(lambda: d.spool_files() == [], message="spool not emptied after a failed fetch")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_truncated_upstream_body_mid_stream(upstream, daemon_factory, chunked):
    """Upstream breaks off while the client is being streamed the body: the client sees a read error."""
    data = os.urandom(256 * 1024)
    upstream.add("/files/cut.bin", data)
    upstream.behave("/files/cut.bin", pause_at=50_000, truncate_at=100_000, chunked=chunked)
    d = daemon_factory({"r": generic_remote(upstream)})

    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    try:
        conn.request("GET", "/api/r/files/cut.bin")
        upstream.wait_paused("/files/cut.bin")
        resp = conn.getresponse()
        assert resp.status == 200, f"HTTP {resp.status}"
        head = resp.read(10_000)  # the body is streaming to us
        assert head == data[:10_000]
        upstream.resume("/files/cut.bin")  # ... and now upstream breaks off
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            rest = resp.read()
            raise AssertionError(f"the body ended cleanly after {len(head) + len(rest)} of {len(data)} bytes")
    finally:
        conn.close()

    _assert_refetched_then_cached(d, upstream, "/files/cut.bin", data)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_truncated_upstream_body_is_never_served_or_cached(upstream, daemon_factory, chunked):
    """Upstream breaks off at once: a read error, or an error status if nothing was sent yet."""
    data = os.urandom(256 * 1024)
    upstream.add("/files/cut.bin", data)
    upstream.behave("/files/cut.bin", truncate_at=100_000, chunked=chunked)
    d = daemon_factory({"r": generic_remote(upstream)})

    outcome = _expect_no_complete_body(d.port, "/api/r/files/cut.bin", len(data))
    if isinstance(outcome, http.client.IncompleteRead):
        assert len(outcome.partial) < len(data)
    elif isinstance(outcome, Response):
        assert_json_error(outcome, 502)

    _assert_refetched_then_cached(d, upstream, "/files/cut.bin", data)


def test_truncated_upstream_body_curl_sees_partial_transfer(upstream, daemon_factory, tmp_path):
    curl = require_tool("curl", "curl checks how a real client sees a truncated transfer")
    data = os.urandom(256 * 1024)
    upstream.add("/files/cut.bin", data)
    upstream.behave("/files/cut.bin", pause_at=50_000, truncate_at=100_000)
    d = daemon_factory({"r": generic_remote(upstream)})
    out = tmp_path / "out.bin"
    proc = subprocess.Popen(
        [curl, "-sS", "--max-time", "30", "-o", str(out), d.url("/api/r/files/cut.bin")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        upstream.wait_paused("/files/cut.bin")
        # curl writes what it receives: once bytes are there, the 200 is on its way.
        eventually(lambda: out.exists() and out.stat().st_size > 0, message="curl received no body bytes")
        upstream.resume("/files/cut.bin")
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # 18: partial file (clean close before Content-Length); 56: receive failure (reset).
    assert proc.returncode in (18, 56), f"curl exit {proc.returncode}: {stderr}"
    assert out.stat().st_size < len(data)


def test_range_on_hit(upstream, daemon_factory):
    data = os.urandom(100_000)
    upstream.add("/files/r.bin", data)
    d = daemon_factory({"r": generic_remote(upstream)})
    assert d.get("/api/r/files/r.bin").status == 200
    get_until_hit(d, "/api/r/files/r.bin", data)

    cases = [
        ("bytes=10-19", 10, 19),
        ("bytes=-100", 99_900, 99_999),
        ("bytes=99990-", 99_990, 99_999),
        ("bytes=99990-200000", 99_990, 99_999),
        ("bytes=0-0", 0, 0),
    ]
    for spec, a, b in cases:
        resp = d.get("/api/r/files/r.bin", headers={"Range": spec})
        assert resp.status == 206, f"{spec}: {resp.describe()}"
        assert resp.header("Content-Range") == f"bytes {a}-{b}/100000", f"{spec}: {resp.describe()}"
        assert resp.body == data[a : b + 1], spec
        assert resp.header("Content-Length") == str(b - a + 1), spec
        assert resp.header("X-Cache") == "HIT", spec

    bad = d.get("/api/r/files/r.bin", headers={"Range": "bytes=100000-100010"})
    assert bad.status == 416, bad.describe()
    if bad.header("Content-Range") is not None:
        assert bad.header("Content-Range") == "bytes */100000"
    assert upstream.count("/files/r.bin") == 1


def test_range_on_in_flight_miss(upstream, daemon_factory):
    size = MiB
    data = os.urandom(size)
    upstream.add("/files/inflight.bin", data)
    upstream.behave("/files/inflight.bin", pause_at=128 * 1024)
    d = daemon_factory({"r": generic_remote(upstream)})

    full = Fetch(d.port, "/api/r/files/inflight.bin")
    full.start()
    upstream.wait_paused("/files/inflight.bin")
    early = Fetch(d.port, "/api/r/files/inflight.bin", {"Range": "bytes=1000-1999"})
    late = Fetch(d.port, "/api/r/files/inflight.bin", {"Range": "bytes=600000-600099"})
    early.start()
    late.start()
    assert early.sent.wait(30) and late.sent.wait(30)
    time.sleep(0.3)
    upstream.resume("/files/inflight.bin")

    for fetch, a, b in ((early, 1000, 1999), (late, 600_000, 600_099)):
        resp = fetch.response()
        assert resp.status == 206, resp.describe()
        assert resp.header("Content-Range") == f"bytes {a}-{b}/{size}", resp.describe()
        assert resp.body == data[a : b + 1]
    resp = full.response()
    assert resp.status == 200 and sha256(resp.body) == sha256(data)
    assert upstream.count("/files/inflight.bin") == 1, upstream.describe()


def test_redirect_to_another_server_is_followed(upstream, upstream_factory, daemon_factory):
    other = upstream_factory()
    data = os.urandom(10_000)
    other.add("/real/a.bin", data)
    upstream.behave("/files/a.bin", redirect=other.url("/real/a.bin"))
    d = daemon_factory({"r": generic_remote(upstream)})

    resp = d.get("/api/r/files/a.bin")
    assert resp.status == 200, resp.describe()
    assert resp.header("Location") is None
    assert resp.body == data
    assert other.count("/real/a.bin") == 1
    assert d.get("/api/r/files/a.bin").body == data


def test_relative_redirect_is_followed(upstream, daemon_factory):
    upstream.add("/files/v2/b.bin", b"moved here")
    upstream.behave("/files/b.bin", redirect="/files/v2/b.bin", redirect_status=301)
    d = daemon_factory({"r": generic_remote(upstream)})
    resp = d.get("/api/r/files/b.bin")
    assert resp.status == 200, resp.describe()
    assert resp.body == b"moved here"
    assert resp.header("Location") is None


def test_redirect_to_another_host_drops_credentials(upstream, upstream_factory, daemon_factory):
    other = upstream_factory()
    other.add("/real/c.bin", b"signed download")
    upstream.behave("/files/c.bin", redirect=other.url("/real/c.bin?X-Signature=abc"))
    remote = generic_remote(upstream, credentials={"username": "ci", "password_env": "TEST_UPSTREAM_PASSWORD"})
    d = daemon_factory({"r": remote}, env={"TEST_UPSTREAM_PASSWORD": "hunter2-upstream"})

    resp = d.get("/api/r/files/c.bin")
    assert resp.status == 200 and resp.body == b"signed download", resp.describe()
    first = upstream.requests_for("/files/c.bin")[0]
    assert (first.header("Authorization") or "").startswith("Basic "), "credentials were not sent upstream"
    hop = other.requests_for("/real/c.bin")[0]
    assert hop.header("Authorization") is None, "Authorization leaked to the redirect's host"
