"""Keyed blobs (sparkcache.protocols._keyed), the base of every build-cache
protocol, through a minimal protocol of their own on the in-memory daemon:
PUT once (idempotent), 413 before the body, digest-checked keys, misses on a
failing store, quotas and TTLs."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import pytest_twisted
from klein import Klein

from sparkcache.context import Context
from sparkcache.protocols import PROTOCOLS
from sparkcache.protocols._keyed import KeyedBlobs, keyed_options
from sparkcache.protocols.base import Built, ProtocolSpec, RemoteKind
from sparkcache.web.errors import JSON, add_error_handling, guarded
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401

WRITER = "w-token"


class BlobApp:
    app = Klein()
    add_error_handling(app, JSON)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.blobs = {n: KeyedBlobs(ctx, r, JSON) for n, r in ctx.config.remotes.items() if r.type == "blobs"}

    def gate(self, request: Any) -> Any:
        if request.method != b"PUT":
            return None
        remote = request.path.split(b"/")[2].decode()
        return self.blobs[remote].body_gate(request)

    @app.route("/<remote>/<name>", methods=["GET", "HEAD", "PUT"])
    async def entry(self, request: Any, remote: str, name: str) -> Any:
        blobs = self.blobs[remote]
        if request.method == b"PUT":
            self.ctx.auth.require(request, "write")
            verify = name if name.startswith("sha-") is False and len(name) == 64 else None
            stored = await blobs.put(request, name, {"content-type": "application/x-test"}, expected_sha256=verify)
            request.setResponseCode(201 if stored.created else 200)
            return b""
        self.ctx.auth.require(request, "read")
        return await blobs.serve(request, name)


def build(ctx: Context) -> Built:
    app = BlobApp(ctx)
    return Built(resource=guarded(app.app, JSON, 4096), gate=app.gate)


SPEC = ProtocolSpec("blobs", (b"blobs",), build,
                    (RemoteKind("blobs", needs_upstream=False, options=keyed_options, url="/blobs/{name}/"),))
CONFIG = {
    "auth": {"tokens": [{"name": "w", "token": WRITER, "scopes": ["write"]}]},
    "remotes": {"b": {"type": "blobs", "max_entry_size": 1000, "quota": 2500, "ttl": "1h"}},
}
AUTH = {"Authorization": f"Bearer {WRITER}"}


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG, protocols=(*PROTOCOLS, SPEC)))


@pytest_twisted.ensureDeferred
async def test_put_once_then_get(h: Harness) -> None:
    assert (await h.get("/blobs/b/k1")).status == 404
    assert (await h.put("/blobs/b/k1", b"first", AUTH)).status == 201
    # A second PUT of the key is idempotent: the stored bytes stay.
    assert (await h.put("/blobs/b/k1", b"second", AUTH)).status == 200
    got = await h.get("/blobs/b/k1")
    assert got.status == 200 and got.body == b"first" and got.header("Content-Type") == "application/x-test"
    assert (await h.put("/blobs/b/k2", b"x")).status == 401


@pytest_twisted.ensureDeferred
async def test_too_large_is_refused_before_the_body_and_a_wrong_digest_never_kept(h: Harness) -> None:
    resp = await h.put("/blobs/b/big", b"x" * 1001, AUTH)
    assert resp.status == 413 and (await h.get("/blobs/b/big")).status == 404
    body = b"content"
    right = hashlib.sha256(body).hexdigest()
    assert (await h.put(f"/blobs/b/{right}", body, AUTH)).status == 201
    wrong = hashlib.sha256(b"other").hexdigest()
    assert (await h.put(f"/blobs/b/{wrong}", body, AUTH)).status == 400
    assert (await h.get(f"/blobs/b/{wrong}")).status == 404


@pytest_twisted.ensureDeferred
async def test_quota_evicts_least_recently_used_and_ttl_expires(h: Harness) -> None:
    for i in range(2):
        assert (await h.put(f"/blobs/b/q{i}", bytes([i]) * 1000, AUTH)).status == 201
        h.clock.advance(1)
    assert (await h.get("/blobs/b/q0")).status == 200  # q0 is now more recent than q1
    h.clock.advance(1)
    # 3000 bytes > the 2500 quota: the put evicts the least recently used (q1).
    assert (await h.put("/blobs/b/q2", b"z" * 1000, AUTH)).status == 201
    await h.store.evict_remote("b", 2500)  # waits for nothing the put started; idempotent
    present = [(await h.get(f"/blobs/b/q{i}")).status for i in range(3)]
    assert present == [200, 404, 200]
    h.clock.advance(3601)
    assert (await h.get("/blobs/b/q2")).status == 404


@pytest_twisted.ensureDeferred
async def test_a_failing_index_is_a_miss(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (await h.put("/blobs/b/k", b"v", AUTH)).status == 201

    def broken(key: str) -> Any:
        raise OSError("disk I/O error")

    monkeypatch.setattr(h.store.index, "get", broken)
    assert (await h.get("/blobs/b/k")).status == 404
