"""``server.workers: 2`` on an ``ssl:`` listener: the parent holds the TCP
socket, each worker wraps it in TLS with the endpoint string's certificate;
verifying clients (curl --cacert, Python's ssl) reach both workers, and a
killed worker comes back serving TLS (docs/workers.rst)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import time
from pathlib import Path

from tests.support.daemon import free_port
from tests.support.remotes import generic_remote
from tests.support.tools import require_tool


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    openssl = require_tool("openssl", "openssl makes the listener's self-signed certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return key, cert


def _https_get(port: int, cafile: Path, path: str) -> tuple[int, bytes]:
    """One request on a fresh, verified TLS connection (a new accept: either worker)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _curl_get(curl: str, port: int, cafile: Path, path: str) -> tuple[int, bytes]:
    proc = subprocess.run(
        [curl, "-sS", "--max-time", "30", "--cacert", str(cafile), "-o", "-", "-w", "\n%{http_code}",
         f"https://127.0.0.1:{port}{path}"],
        capture_output=True, timeout=60,
    )
    if proc.returncode != 0:
        raise OSError(proc.stderr.decode(errors="replace"))
    body, _, code = proc.stdout.rpartition(b"\n")
    return int(code), body


def _workers_seen(get, d, stale: frozenset[int] = frozenset(), timeout: float = 60) -> dict[int, int]:
    """worker index -> pid from /health over TLS, until both answered (a pid in
    ``stale``, a killed worker, does not count)."""
    seen: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = get("/health")
        except (OSError, http.client.HTTPException):
            continue  # a connection the killed worker had accepted, reset
        assert status == 200, body
        h = json.loads(body)
        if h["pid"] not in stale:
            seen[h["worker"]] = h["pid"]
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only workers {seen} answered over TLS\n{d.log_tail()}")


def test_two_workers_share_an_ssl_listener_and_survive_a_kill(tmp_path, upstream, daemon_factory):
    curl = require_tool("curl", "curl --cacert verifies the workers' TLS")
    key, cert = _self_signed(tmp_path)
    data = os.urandom(300_000)
    upstream.add("/files/x.bin", data)
    tcp_port, tls_port = free_port(), free_port()
    d = daemon_factory(
        {"r": generic_remote(upstream)},
        port=tcp_port,
        server={"workers": 2, "listen": [f"tcp:{tcp_port}:interface=127.0.0.1",
                                         f"ssl:{tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"]},
    )

    def py(path: str) -> tuple[int, bytes]:
        return _https_get(tls_port, cert, path)

    def cu(path: str) -> tuple[int, bytes]:
        return _curl_get(curl, tls_port, cert, path)

    workers = _workers_seen(py, d)
    assert _workers_seen(cu, d) == workers  # both clients reach both workers, certificate verified
    # The parent never accepts: every answer names a worker process it started.
    for pid in workers.values():
        assert pid != d.pid
    # Bodies through TLS from either worker (a miss, then hits).
    for get in (py, cu, py, cu):
        assert get("/api/r/files/x.bin") == (200, data)
    assert upstream.count("/files/x.bin") == 1
    # A plain-HTTP request on the TLS port is not answered as HTTP.
    proc = subprocess.run([curl, "-sS", "--max-time", "10", f"http://127.0.0.1:{tls_port}/health"],
                          capture_output=True, timeout=30)
    assert b'"pid"' not in proc.stdout

    os.kill(workers[1], signal.SIGKILL)
    again = _workers_seen(py, d, stale=frozenset({workers[1]}))
    assert again[0] == workers[0] and again[1] != workers[1]
    # The restarted worker answers curl over TLS too, and serves the body.
    assert _workers_seen(cu, d, stale=frozenset({workers[1]})) == again
    for get in (py, cu, py, cu):
        assert get("/api/r/files/x.bin") == (200, data)
    assert upstream.count("/files/x.bin") == 1
    assert "worker 1 (pid %d) died (signal 9)" % workers[1] in d.log()
    assert d.stop() == 0
