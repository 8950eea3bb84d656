"""Connections end to end, on a real ``twistd`` daemon: the file-descriptor
limit, slowloris, request smuggling on raw sockets, an upstream 429, and a
Range on a cold miss of unknown length.

The fd-limit test runs the daemon under ``ulimit -n 512`` and opens 2,000
idle sockets to it: the daemon holds what its connection cap allows, answers
the rest ``503``, keeps serving the keep-alive clients it already had, and
serves new clients once the idle sockets time out, with no restart. Nothing
waits on wall-clock time except through ``eventually`` with generous bounds.
"""

from __future__ import annotations

import http.client
import os
import resource
import select
import socket
import subprocess
import time
from typing import Any, Iterator

import pytest

from tests.support import daemon as daemon_module
from tests.support.client import Fetch, assert_json_error, eventually, get_until_hit, sha256
from tests.support.remotes import generic_remote
from tests.support.tools import require_tool

FD_LIMIT = 512
FLOOD = 2000
CLIENTS = 30


@pytest.fixture
def limited_fds(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Daemons started in this test run under ``ulimit -n 512``; this process
    may open the 2,000 sockets of the flood."""
    original = daemon_module.twistd_command

    def command(*args: Any, **kw: Any) -> list[str]:
        return ["sh", "-c", f'ulimit -n {FD_LIMIT} && exec "$0" "$@"', *original(*args, **kw)]

    monkeypatch.setattr(daemon_module, "twistd_command", command)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FLOOD + 4 * CLIENTS + 256
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"needs {want} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _connect_all(port: int, n: int) -> list[socket.socket]:
    """Start ``n`` connections at once (non-blocking connects: those the
    listen backlog cannot take yet keep retrying in the kernel)."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    return socks


def _answered_503(socks: list[socket.socket]) -> int:
    n = 0
    for s in socks:
        try:
            if s.recv(13, socket.MSG_PEEK | socket.MSG_DONTWAIT).startswith(b"HTTP/1.1 503 "):
                n += 1
        except OSError:
            pass
    return n


def test_fd_limit_keeps_serving_held_clients_and_recovers(upstream, daemon_factory, limited_fds) -> None:
    data = os.urandom(200 * 1024)  # above the single-read size: served by a producer, an fd per client
    upstream.add("/files/a.bin", data)
    # The kept clients idle through the whole flood, which a loaded machine may
    # stretch past the default idle timeout (60 s): theirs must not run out.
    d = daemon_factory({"r": generic_remote(upstream)}, server={"header_timeout": "4s", "idle_timeout": "600s"})
    get_until_hit(d, "/api/r/files/a.bin", data)
    baseline = _open_files(d.pid)

    # Keep-alive clients the daemon already has when the flood comes.
    kept = [http.client.HTTPConnection("127.0.0.1", d.port, timeout=30) for _ in range(CLIENTS)]
    for c in kept:
        c.request("GET", "/api/r/files/a.bin")
        r = c.getresponse()
        assert r.status == 200 and sha256(r.read()) == sha256(data)

    flood = _connect_all(d.port, FLOOD)
    try:
        # The daemon takes what its cap allows (3/4 of 512), and no more.
        held = eventually(lambda: (n := _open_files(d.pid) - baseline - CLIENTS) > 300 and n, 30,
                          message="the daemon never took the flood's connections")
        peak = max(_open_files(d.pid) for _ in range(20))
        # The clients it had are served as ever, while the flood holds every slot.
        for i, c in enumerate(kept):
            c.request("GET", "/api/r/files/a.bin")
            r = c.getresponse()
            assert r.status == 200 and sha256(r.read()) == sha256(data), f"kept client {i}: {r.status}"
        assert peak < FD_LIMIT, f"the daemon reached its fd limit ({peak} open)"
        shed = _answered_503(flood)
        # Newcomers while the flood holds every slot: told to come back (503),
        # served if a slot freed, or closed at once; never a hung connection.
        newcomers = [Fetch(d.port, "/api/r/files/a.bin", timeout=60) for _ in range(CLIENTS)]
        for f in newcomers:
            f.start()
        outcomes: dict[str, int] = {}
        for f in newcomers:
            f.join(90)
            assert not f.is_alive(), "a newcomer hung"
            res = f.result
            key = str(res.status) if not isinstance(res, BaseException) else "closed"
            if not isinstance(res, BaseException):
                assert res.status in (200, 503), res.describe()
            outcomes[key] = outcomes.get(key, 0) + 1

        # No restart: the idle sockets time out (the header deadline), the rest
        # of the flood is taken and times out in turn, and then new clients are
        # served. The flood's sockets stay open on this side all along.
        eventually(lambda: _open_files(d.pid) <= baseline + CLIENTS + 8, 120,
                   message=f"the flood's connections were never released ({_open_files(d.pid)} fds open)")
        served = 0
        for _ in range(CLIENTS):
            r = d.get("/api/r/files/a.bin")
            assert r.status == 200 and sha256(r.body) == sha256(data), r.describe()
            served += 1
        assert d.get("/health").status == 200
        for i, c in enumerate(kept):  # their idle timeout (600 s) is not over: still connected
            c.request("GET", "/api/r/files/a.bin")
            r = c.getresponse()
            assert r.status == 200 and sha256(r.read()) == sha256(data), f"kept client {i} after: {r.status}"
        print(f"\nfd limit {FD_LIMIT}: {baseline} fds at rest, at most {peak} during a flood of {FLOOD} idle "
              f"sockets; {held} descriptors taken by the flood at once (the cap, 3/4 of the limit, less the kept "
              f"clients, plus 503s lingering), {shed} flood sockets answered 503 at the first wave; "
              f"{CLIENTS}/{CLIENTS} kept clients served during the flood and after it, "
              f"newcomers during it: {outcomes}, "
              f"{served}/{CLIENTS} new clients served after it; accept() hit EMFILE "
              f"{d.log().count('EMFILE encountered')} times")
    finally:
        for s in flood:
            s.close()
        for c in kept:
            c.close()


def test_slowloris_head_is_cut_while_a_normal_client_is_served(upstream, daemon_factory) -> None:
    upstream.add("/files/a.txt", b"hello\n")
    d = daemon_factory({"r": generic_remote(upstream)}, server={"header_timeout": "2s"})
    sock = socket.create_connection(("127.0.0.1", d.port), timeout=30)
    try:
        sock.sendall(b"GET /api/r/files/a.txt HTTP/1.1\r\nHost: x\r\n")
        got = b""
        for i in range(200):  # a header line every 0.2 s, far longer than 2 s if never cut
            try:
                sock.sendall(b"X-Slow-%d: y\r\n" % i)
            except (BrokenPipeError, ConnectionResetError):
                break
            ready, _, _ = select.select([sock], [], [], 0.2)
            if ready:
                got = sock.recv(4096)
                break
            if i == 3:
                assert d.get("/api/r/files/a.txt").body == b"hello\n"
        assert got.startswith(b"HTTP/1.1 408 "), got
        assert upstream.count("/files/a.txt") == 1  # only the normal client's request ran
    finally:
        sock.close()


def _raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data``; everything the daemon answers until it closes the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        sock.close()


SMUGGLING = [
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
    b"Transfer-Encoding: chunked, identity\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 48\r\n",
]


def test_smuggled_request_never_runs(upstream, daemon_factory) -> None:
    upstream.add("/files/smuggled", b"must never be fetched\n")
    d = daemon_factory({"r": generic_remote(upstream)})
    smuggled = b"GET /api/r/files/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    for framing in SMUGGLING:
        out = _raw_exchange(d.port, b"POST /api/r/files/x HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n0\r\n\r\n"
                            + smuggled)
        assert out.count(b"HTTP/1.1 ") == 1, (framing, out)
        assert out.startswith(b"HTTP/1.1 400 "), (framing, out)
    assert upstream.count("/files/smuggled") == 0
    assert d.get("/health").status == 200


def test_upstream_429_is_relayed_with_retry_after(upstream, daemon_factory) -> None:
    upstream.add("/files/limited.bin", b"x")
    upstream.behave("/files/limited.bin", status=429, body=b"slow down\n", headers={"Retry-After": "17"})
    d = daemon_factory({"r": generic_remote(upstream)})
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    try:
        conn.request("GET", "/api/r/files/limited.bin")
        r = conn.getresponse()
        body = r.read()
    finally:
        conn.close()
    assert (r.status, r.reason) == (429, "Too Many Requests"), body
    assert r.getheader("Retry-After") == "17"
    assert r.getheader("Content-Type") == "application/json"


@pytest.mark.parametrize("sendfile", [True, False], ids=["sendfile", "producer"])
def test_range_on_a_chunked_cold_miss_is_206_from_the_spool(upstream, daemon_factory, sendfile: bool) -> None:
    size = 1024 * 1024
    data = os.urandom(size)
    upstream.add("/files/c.bin", data)
    upstream.behave("/files/c.bin", chunked=True, pause_at=600 * 1024)
    d = daemon_factory({"r": generic_remote(upstream)}, server={"sendfile": sendfile})
    path = "/api/r/files/c.bin"

    early = Fetch(d.port, path, {"Range": "bytes=100-199"})
    early.start()
    upstream.wait_paused("/files/c.bin")
    # Bytes already in the spool: answered now, with an unknown total.
    r = early.response(30)
    assert r.status == 206, r.describe()
    assert r.header("Content-Range") == "bytes 100-199/*" and r.body == data[100:200]

    late = Fetch(d.port, path, {"Range": "bytes=900000-900099"})
    tail = Fetch(d.port, path, {"Range": "bytes=1000000-"})
    past = Fetch(d.port, path, {"Range": "bytes=2000000-"})
    for f in (late, tail, past):
        f.start()
        assert f.sent.wait(30)
    time.sleep(0.3)  # let the daemon take the three requests while the body is held
    assert not late.got_headers.is_set() and not tail.got_headers.is_set()
    upstream.resume("/files/c.bin")

    r = late.response(30)
    assert r.status == 206 and r.body == data[900000:900100], r.describe()
    assert r.header("Content-Range") in ("bytes 900000-900099/*", f"bytes 900000-900099/{size}")
    r = tail.response(30)
    assert r.status == 206 and r.header("Content-Range") == f"bytes 1000000-{size - 1}/{size}", r.describe()
    assert r.body == data[1000000:]
    r = past.response(30)
    assert_json_error(r, 416)
    assert r.header("Content-Range") == f"bytes */{size}"
    assert upstream.count("/files/c.bin") == 1

    # Absurd positions on the stored body: 416 or the whole body, never a 5xx.
    huge = "9" * 5000
    get_until_hit(d, path, data)
    assert_json_error(d.get(path, {"Range": f"bytes={huge}-"}), 416)
    r = d.get(path, {"Range": f"bytes=0-{huge}"})
    assert r.status == 206 and r.body == data and r.header("Content-Range") == f"bytes 0-{size - 1}/{size}"
    r = d.get(path, {"Range": f"bytes={huge}-1"})
    assert r.status in (200, 416), r.describe()


def test_curl_reads_a_206_of_unknown_length(upstream, daemon_factory) -> None:
    curl = require_tool("curl")
    data = os.urandom(256 * 1024)
    upstream.add("/files/u.bin", data)
    upstream.behave("/files/u.bin", chunked=True, pause_at=128 * 1024)
    d = daemon_factory({"r": generic_remote(upstream)})
    starter = Fetch(d.port, "/api/r/files/u.bin")
    starter.start()
    upstream.wait_paused("/files/u.bin")
    out = subprocess.run([curl, "-sS", "-f", "-r", "1000-1999", "-D", "-", "-o", "/dev/stdout",
                          d.url("/api/r/files/u.bin")], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 206 ") and b"Content-Range: bytes 1000-1999/*" in head, head
    assert body == data[1000:2000]
    upstream.resume("/files/u.bin")
    assert starter.response(30).body == data
