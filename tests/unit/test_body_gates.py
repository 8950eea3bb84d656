"""Body gates: where a request body goes is decided from its headers alone.

The daemon's real site and resource tree (``SparkcacheService``, listeners
never started) are driven in memory: a request's head goes into a channel of
the real ``SparkSite`` and what comes back is read off the transport before
any body byte has been sent. A refused request must be answered right there,
exactly as its handler answers the same request without a body, and leave
nothing in the spool; an accepted upload must be going into a spool file.
"""

from __future__ import annotations

import http.client
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from sparkcache.protocols import load_config_data
from sparkcache.service import SparkcacheService
from sparkcache.web.bodies import CappedBody, SpoolBody

WRITE = "wr-gates-3c1f"
READ = "rd-gates-9a0e"
TEN_GIB = 10 << 30


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[SparkcacheService]:
    config = load_config_data({
        "storage": {"data_dir": str(tmp_path / "data")},
        "server": {"max_body_size": "1MiB"},
        "remotes": {
            "files": {"type": "generic", "upstream": "http://127.0.0.1:9"},
            "uploads": {"type": "local"},
            "pushes": {"type": "oci-local"},
            "hub": {"type": "oci", "upstream": "http://127.0.0.1:9", "registries": ["docker.io"]},
        },
        # seeds of repositories on this host need only the write scope
        "git": {"allowed_hosts": ["http://x"]},
        "auth": {"anonymous_read": False, "tokens": [
            {"name": "w", "token": WRITE, "scopes": ["read", "write"]},
            {"name": "r", "token": READ, "scopes": ["read"]},
        ]},
    }, environ={})
    svc = SparkcacheService(config, reactor=MemoryReactorClock())
    os.makedirs(svc.store.spool_dir, exist_ok=True)  # (the store is never started here)
    yield svc


class Conn:
    """One in-memory connection to the daemon's site."""

    def __init__(self, svc: SparkcacheService) -> None:
        self.svc = svc
        self.proto = svc.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.proto.makeConnection(self.transport)

    def head(self, method: str, target: str, headers: dict[str, str]) -> None:
        lines = [f"{method} {target} HTTP/1.1", "Host: cache.test", *(f"{k}: {v}" for k, v in headers.items())]
        self.proto.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    @property
    def request(self) -> Any:
        return self.proto._channel.requests[-1]

    def response(self) -> http.client.HTTPResponse:
        data = self.transport.value()
        assert data, "no answer"

        class Wire:
            def makefile(self, *args: Any, **kw: Any) -> io.BytesIO:
                return io.BytesIO(data)

        resp = http.client.HTTPResponse(Wire())  # type: ignore[arg-type]
        resp.begin()
        return resp

    def close(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))


def spool(svc: SparkcacheService) -> list[str]:
    return sorted(os.listdir(svc.store.spool_dir))


def answer(svc: SparkcacheService, method: str, target: str, headers: dict[str, str],
           length: int) -> tuple[http.client.HTTPResponse, bytes, Conn]:
    conn = Conn(svc)
    conn.head(method, target, {**headers, "Content-Length": str(length)})
    resp = conn.response()
    return resp, resp.read(), conn


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# (method, target, headers, status, what the error body must show)
REFUSED = [
    # An anonymous upload: 401, with the challenge each protocol's clients follow.
    ("PUT", "/api/uploads/big.bin", {}, 401, "authentication required"),
    ("POST", "/v2/pushes/team/app/blobs/uploads/", {}, 401, "UNAUTHORIZED"),
    ("PATCH", "/v2/pushes/team/app/blobs/uploads/0123abcd", {}, 401, "UNAUTHORIZED"),
    ("PUT", "/v2/pushes/team/app/manifests/v1", {}, 401, "UNAUTHORIZED"),
    ("POST", "/upload", {}, 401, "authentication required"),
    ("POST", "/sync/seed?repo=http://x/y.git", {}, 401, "authentication required"),
    ("POST", "/git/app/git-upload-pack", {"User-Agent": "git/2.39.5"}, 401, "authentication required"),
    # Not enough scope.
    ("PUT", "/api/uploads/big.bin", bearer(READ), 403, "write scope"),
    ("PATCH", "/v2/pushes/team/app/blobs/uploads/0123abcd", bearer(READ), 403, "DENIED"),
    # No upload possible there.
    ("PUT", "/api/files/big.bin", bearer(WRITE), 405, "read-through cache"),
    ("PUT", "/v2/hub/library/alpine/blobs/uploads/0123abcd", bearer(WRITE), 405, "UNSUPPORTED"),
    ("PUT", "/api/nowhere/big.bin", bearer(WRITE), 404, "unknown remote"),
    ("PATCH", "/v2/pushes/team/app/blobs/uploads/0123abcd", bearer(WRITE), 404, "BLOB_UPLOAD_UNKNOWN"),
    ("PUT", "/api/uploads/%2e%2e/x", bearer(WRITE), 400, "dot segments"),
]


@pytest.mark.parametrize("method,target,headers,status,says", REFUSED)
def test_refused_from_the_headers_before_any_body_byte(daemon: SparkcacheService, method: str, target: str,
                                                       headers: dict[str, str], status: int, says: str) -> None:
    conn = Conn(daemon)
    conn.head(method, target, {**headers, "Content-Length": str(TEN_GIB), "Expect": "100-continue"})
    out = conn.transport.value()
    assert b"100 Continue" not in out
    resp = conn.response()
    body = resp.read()
    assert resp.status == status, body
    assert says.encode() in body
    assert resp.getheader("Connection") == "close"
    assert conn.transport.disconnecting  # (no half-close on this transport: closed outright)
    conn.send(b"x" * 100_000)  # what the client sends anyway is dropped
    assert conn.transport.value() == out
    assert spool(daemon) == []
    conn.close()


@pytest.mark.parametrize("method,target,headers,status,says", REFUSED)
def test_the_gate_answers_as_the_handler_does(daemon: SparkcacheService, method: str, target: str,
                                              headers: dict[str, str], status: int, says: str) -> None:
    """The same request without a body (no gate asked: the handler answers) gets the same answer."""
    early, early_body, c1 = answer(daemon, method, target, headers, TEN_GIB)
    late, late_body, c2 = answer(daemon, method, target, headers, 0)
    assert (late.status, late_body) == (early.status, early_body)
    for name in ("Content-Type", "Allow", "Docker-Distribution-API-Version"):
        assert late.getheader(name) == early.getheader(name), name
    assert late.headers.get_all("WWW-Authenticate") == early.headers.get_all("WWW-Authenticate")
    c1.close()
    c2.close()


def test_challenges_are_each_protocols_own(daemon: SparkcacheService) -> None:
    resp, body, _ = answer(daemon, "PUT", "/api/uploads/a.bin", {}, TEN_GIB)
    assert json.loads(body)["status"] == 401 and resp.getheader("WWW-Authenticate", "").startswith("Bearer")
    resp, body, _ = answer(daemon, "PATCH", "/v2/pushes/team/app/blobs/uploads/0123abcd", {}, TEN_GIB)
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    challenge = resp.getheader("WWW-Authenticate", "")
    assert challenge.startswith('Bearer realm="http://cache.test/setup/token"')
    assert 'scope="repository:pushes/team/app:pull,push"' in challenge
    resp, body, _ = answer(daemon, "POST", "/git/app/git-upload-pack", {"User-Agent": "git/2.39.5"}, 500)
    assert 'Basic realm="sparkcache"' in resp.headers.get_all("WWW-Authenticate")


@pytest.mark.parametrize("method,target,headers,length,status", [
    ("PUT", "/api/uploads/big.bin", bearer(WRITE), (1 << 20) + 1, 413),        # server.max_body_size
    ("PUT", "/v2/pushes/team/app/manifests/v1", bearer(WRITE), (4 << 20) + 1, 413),
    ("POST", "/sync/negotiate", bearer(READ), (1 << 20) + 1, 413),
])
def test_announced_bodies_over_a_limit_are_413_at_once(daemon: SparkcacheService, method: str, target: str,
                                                       headers: dict[str, str], length: int, status: int) -> None:
    resp, body, conn = answer(daemon, method, target, headers, length)
    assert resp.status == status, body
    assert spool(daemon) == []
    conn.close()


def test_uploads_go_into_a_spool_and_small_bodies_into_memory(daemon: SparkcacheService) -> None:
    cases = [
        ("PUT", "/api/uploads/a.bin", SpoolBody),
        ("POST", "/v2/pushes/team/app/blobs/uploads/?digest=sha256:" + "0" * 64, SpoolBody),
        ("POST", "/upload", SpoolBody),
        ("POST", "/sync/seed?repo=http://x/y.git", SpoolBody),
        ("PUT", "/v2/pushes/team/app/manifests/v1", CappedBody),
        ("POST", "/sync/negotiate", CappedBody),
    ]
    for method, target, kind in cases:
        conn = Conn(daemon)
        conn.head(method, target, {**bearer(WRITE), "Content-Length": "1000", "Expect": "100-continue"})
        assert conn.transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n", target
        assert isinstance(conn.request.content, kind), target
        if kind is SpoolBody:
            assert len(spool(daemon)) == 1, target
            conn.send(b"y" * 600)
            assert conn.request.content.size == 600
            assert os.path.getsize(os.path.join(daemon.store.spool_dir, spool(daemon)[0])) == 600
        conn.close()  # the client leaves mid-body
        assert spool(daemon) == [], f"{target}: spool file left behind"


def test_a_chunked_upload_over_the_limit_is_dropped_and_answered_413(daemon: SparkcacheService) -> None:
    conn = Conn(daemon)
    conn.head("PUT", "/api/uploads/a.bin", {**bearer(WRITE), "Transfer-Encoding": "chunked"})
    assert len(spool(daemon)) == 1
    chunk = b"z" * (512 << 10)
    for _ in range(3):
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    assert spool(daemon) == []  # gone as soon as the body outgrew the limit
    conn.send(b"0\r\n\r\n")
    resp = conn.response()
    assert resp.status == 413 and b"max_body_size" in resp.read()
    conn.close()


def test_reads_never_consult_a_gate(daemon: SparkcacheService, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[bytes] = []
    monkeypatch.setattr(daemon.root, "gates", {seg: (lambda r: asked.append(r.path)) for seg in daemon.root.gates})
    conn = Conn(daemon)
    conn.head("GET", "/api/uploads/a.bin", bearer(READ))
    conn.close()
    assert asked == []


def test_a_failing_gate_leaves_the_decision_to_the_handler(daemon: SparkcacheService,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(request: Any) -> None:
        raise RuntimeError("gate bug")

    monkeypatch.setitem(daemon.root.gates, b"api", broken)
    resp, body, conn = answer(daemon, "PUT", "/api/uploads/a.bin", {}, 0)
    conn2 = Conn(daemon)
    conn2.head("PUT", "/api/uploads/a.bin", {"Content-Length": "3"})
    assert conn2.transport.value() == b""  # not refused early: the handler answers once the body is in
    conn2.send(b"abc")
    late = conn2.response()
    assert (late.status, late.read()) == (resp.status, body) == (401, body)
    conn.close()
    conn2.close()
