"""Hostile and malformed requests end to end.

Requests go out as raw bytes on a socket: urllib and most clients would
normalise ``..`` away before the daemon ever saw it. Each bad request must get
a JSON error and must never reach the upstream.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.conftest import watch
from tests.support.client import assert_json_error, bearer, raw_get, raw_request
from tests.support.daemon import Daemon
from tests.support.remotes import generic_remote
from tests.support.upstream import Upstream

ADMIN = "adm-input-5d1e"

TRAVERSAL = [
    "/api/r/../x",
    "/api/r/files/../../x",
    "/api/r/files/../other/x",
    "/api/r/%2e%2e/x",
    "/api/r/files/%2E%2E/%2e%2e/etc/passwd",
    "/api/r/files/.%2e/x",
    "/api/r/a%2f..%2f..%2fetc/passwd",
    "/api/r/files/a%2Fb",
    "/api/r/files\\..\\..\\x",
    "/api/r/files/%5c..%5cx",
    "/api/r/files/a%00.bin",
    "/api/r/files/a.bin%00",
    "/api/r/files/a%0d%0aX-Injected:%20yes",
    "/api/r/files/a%01b",
    "/api/r/files/a%7fb",
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Upstream]]:
    """One daemon and upstream for the module's hostile requests: they change
    nothing a later test could see (one daemon instead of twenty)."""
    up = Upstream().start()
    for p in ("/x", "/etc/passwd", "/files/a.bin", "/other/x", "/files/x"):
        up.add(p, b"should never be requested")
    d = Daemon(tmp_path_factory.mktemp("hostile"), {"r": generic_remote(up)}, env={"SPARKCACHE_ADMIN_TOKEN": ADMIN})
    try:
        yield d.start(), up
    finally:
        d.kill()
        up.stop()


@pytest.fixture
def upstream(shared: tuple[Daemon, Upstream]) -> Upstream:
    """The shared upstream, its record of requests emptied for this test."""
    up = shared[1]
    up.forget_requests()
    return up


@pytest.fixture
def hostile(request: pytest.FixtureRequest, shared: tuple[Daemon, Upstream], upstream: Upstream) -> Daemon:
    watch(request, shared[0], upstream)
    return shared[0]


@pytest.mark.parametrize("path", TRAVERSAL)
def test_traversal_and_malformed_paths_rejected(hostile, upstream, path):
    resp = raw_get(hostile.port, path)
    assert_json_error(resp, 400)
    assert resp.header("X-Injected") is None
    assert upstream.total() == 0, f"{path} reached upstream:\n{upstream.describe()}"


def test_overlong_path_is_414(hostile, upstream):
    resp = raw_get(hostile.port, "/api/r/files/" + "a" * 5000)
    assert_json_error(resp, 414)
    assert upstream.total() == 0, upstream.describe()


def test_max_path_length_is_configurable(upstream, daemon_factory):
    upstream.add("/files/" + "b" * 100, b"short enough")
    d = daemon_factory({"r": generic_remote(upstream)}, server={"max_path_length": 200})
    ok = raw_get(d.port, "/api/r/files/" + "b" * 100)
    assert ok.status == 200 and ok.body == b"short enough", ok.describe()
    assert_json_error(raw_get(d.port, "/api/r/files/" + "b" * 300), 414)
    assert upstream.count("/files/" + "b" * 300) == 0


def test_unknown_remote_is_404(hostile, upstream):
    assert_json_error(raw_get(hostile.port, "/api/nope/files/a.bin"), 404)
    assert upstream.total() == 0


def test_post_on_generic_path_is_405(hostile, upstream):
    # With an admin token, so that the answer is about the method, not about auth.
    resp = hostile.request("POST", "/api/r/files/a.bin", headers={**bearer(ADMIN), "Content-Type": "application/octet-stream"}, body=b"x")
    assert_json_error(resp, 405)
    resp = hostile.request("PUT", "/api/r/files/a.bin", headers=bearer(ADMIN), body=b"x")
    assert_json_error(resp, 405)
    assert upstream.total() == 0, upstream.describe()


def test_raw_traversal_in_absolute_form_target(hostile, upstream):
    # An absolute-form request target must not smuggle a traversal past the router.
    req = (
        b"GET http://127.0.0.1:%d/api/r/files/../../x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % hostile.port
    )
    resp = raw_request(hostile.port, req)
    assert 400 <= resp.status < 500, resp.describe()
    assert upstream.total() == 0, upstream.describe()


def test_good_request_after_bad_ones(hostile, upstream):
    for path in TRAVERSAL[:3]:
        raw_get(hostile.port, path)
    resp = raw_get(hostile.port, "/api/r/files/a.bin")
    assert resp.status == 200 and resp.body == b"should never be requested", resp.describe()
    assert [r.path for r in upstream.requests] == ["/files/a.bin"]


def test_request_body_over_max_body_size_is_413(daemon_factory):
    write = "wr-input-77aa"
    d = daemon_factory({"uploads": {"type": "local"}}, server={"max_body_size": "64KiB"},
                       env={"SPARKCACHE_WRITE_TOKEN": write})
    ok = d.request("PUT", "/api/uploads/small.bin", headers=bearer(write), body=b"x" * 65536)
    assert ok.status in (200, 201), ok.describe()
    # A body one byte over the cap is read and dropped, never stored or routed.
    big = d.request("PUT", "/api/uploads/big.bin", headers=bearer(write), body=b"y" * 65537)
    assert "max_body_size" in assert_json_error(big, 413)["error"]
    assert_json_error(d.get("/api/uploads/big.bin"), 404)
    # Chunked bodies (no Content-Length) are capped as they arrive.
    head = (b"PUT /api/uploads/chunked.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + write.encode()
            + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    chunk = b"z" * 40000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(2)) + b"0\r\n\r\n"
    assert_json_error(raw_request(d.port, head + body), 413)
    assert_json_error(d.get("/api/uploads/chunked.bin"), 404)


def test_form_content_type_bodies_reach_the_app_unparsed(daemon_factory):
    # curl --data-binary sends application/x-www-form-urlencoded, and some
    # clients label uploads multipart/form-data: twisted.web would parse such a
    # POST body in memory on the reactor (and reject a tarball that is not
    # valid multipart). The app must get the bytes as sent.
    import io
    import tarfile

    write = "wr-input-88bb"
    d = daemon_factory({}, env={"SPARKCACHE_WRITE_TOKEN": write})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"hello\n"
        info = tarfile.TarInfo("README")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    for ctype in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz"):
        resp = d.request("POST", "/upload", headers={**bearer(write), "Content-Type": ctype}, body=buf.getvalue())
        assert resp.status in (200, 201), resp.describe()
        assert resp.json()["id"]
