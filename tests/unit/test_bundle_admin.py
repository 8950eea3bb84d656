"""``GET /admin/export`` and ``POST /admin/import`` over in-memory HTTP through
the daemon's real root: scopes, JSON errors, a round trip between two
daemons (a HIT on the second, whose upstream has nothing), ``since``,
``map``, and a refused bundle that leaves nothing behind."""

from __future__ import annotations

import io
import os
import tarfile
from typing import Any

import pytest_twisted

from tests.support.client import assert_json_error, bearer
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401

READ, ADMIN = "rd-0b5e11", "ad-9d2c44"
AUTH = {"tokens": [{"name": "r", "token": READ, "scopes": ["read"]},
                   {"name": "a", "token": ADMIN, "scopes": ["admin"]}]}


def config(*names: str) -> dict[str, Any]:
    return {"auth": AUTH, "remotes": {n: {"type": "generic", "upstream": UPSTREAM,
                                          "mutable_patterns": [r"\.json$"], "cache": {"mutable_ttl": 600}}
                                      for n in names}}


async def cached(h: Harness, files: dict[str, bytes], remote: str = "files") -> None:
    for path, body in files.items():
        h.upstream.add(path, body)
        assert (await h.get(f"/api/{remote}{path}")).status == 200
    await h.settle()


async def export(h: Harness, query: str = "") -> bytes:
    resp = await h.get(f"/admin/export{query}", bearer(ADMIN))
    assert resp.status == 200, resp.describe()
    assert resp.header("Content-Type") == "application/x-tar"
    return resp.body


def error(resp: Any, status: int, says: str) -> None:
    doc = assert_json_error(resp, status)
    assert says in doc["error"], doc


def spools(h: Harness) -> list[str]:
    return os.listdir(h.store.spool_dir)


@pytest_twisted.ensureDeferred
async def test_round_trip_between_two_daemons(harness_factory: MakeHarness) -> None:  # noqa: F811
    a = await harness_factory(config("files"))
    files = {"/a.bin": os.urandom(100_000), "/meta.json": b'{"v": 1}'}
    await cached(a, files)
    data = await export(a)
    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert names[0] == "manifest.json" and names[-1] == "trailer.json" and len(names) == 4

    b = await harness_factory(config("files"))
    b.clock.advance(100)
    resp = await b.post("/admin/import", data, bearer(ADMIN))
    assert resp.status == 200, resp.describe()
    report = resp.json()
    assert (report["imported"], report["skipped_remotes"], report["git"]) == (2, {}, []), report
    assert spools(b) == []
    for path, body in files.items():
        got = await b.get(f"/api/files{path}")
        assert got.status == 200 and got.header("X-Cache") == "HIT" and got.body == body, got.describe()
    assert b.upstream.requests == []
    # The mutable entry: the importing side's TTL (600 s) from the original fetch.
    meta = await b.store.index.get("files:meta.json")
    assert meta is not None and meta.expires == meta.fetched + 600
    b.clock.advance(600)
    assert (await b.get("/api/files/a.bin")).header("X-Cache") == "HIT"  # immutable: still fresh


@pytest_twisted.ensureDeferred
async def test_scopes_and_errors_are_json(harness_factory: MakeHarness) -> None:  # noqa: F811
    h = await harness_factory(config("files"))
    assert_json_error(await h.get("/admin/export"), 401)
    assert_json_error(await h.get("/admin/export", bearer(READ)), 403)
    assert_json_error(await h.post("/admin/import", b"x" * 1000, bearer(READ)), 403)
    error(await h.get("/admin/export?remote=nope", bearer(ADMIN)), 404, "unknown remote")
    error(await h.get("/admin/export?since=yesterday", bearer(ADMIN)), 400, "since")
    assert_json_error(await h.get("/admin/import", bearer(ADMIN)), (404, 405))
    error(await h.post("/admin/import?map=files", b"", bearer(ADMIN)), 400, "OLD=NEW")
    error(await h.post("/admin/import?map=files=gone", b"", bearer(ADMIN)), 400, "not a remote")
    error(await h.post("/admin/import", b"not a tar at all" * 100, bearer(ADMIN)), 400, "bad bundle")
    error(await h.post("/admin/import", b"", bearer(ADMIN)), 400, "bad bundle")
    assert spools(h) == []


@pytest_twisted.ensureDeferred
async def test_a_bad_bundle_imports_nothing(harness_factory: MakeHarness) -> None:  # noqa: F811
    a = await harness_factory(config("files"))
    await cached(a, {"/one.bin": b"1" * 5000, "/two.bin": b"2" * 5000})
    data = bytearray(await export(a))
    member = tarfile.open(fileobj=io.BytesIO(bytes(data))).getmembers()[2]  # the second body
    data[member.offset_data] ^= 1
    b = await harness_factory(config("files"))
    error(await b.post("/admin/import", bytes(data), bearer(ADMIN)), 400, "sha256")
    # The first body was good: still not visible.
    assert (await b.store.refresh_stats())[1] == 0 and spools(b) == []


@pytest_twisted.ensureDeferred
async def test_since_remote_and_map(harness_factory: MakeHarness) -> None:  # noqa: F811
    a = await harness_factory(config("files", "other"))
    await cached(a, {"/old.bin": b"old"})
    a.clock.advance(1000)
    await cached(a, {"/new.bin": b"new"})
    await cached(a, {"/o.bin": b"other"}, remote="other")
    since = int(a.clock.seconds())
    data = await export(a, f"?remote=files&since={since}")
    b = await harness_factory(config("renamed"))
    skipped = (await b.post("/admin/import", data, bearer(ADMIN))).json()
    assert skipped["imported"] == 0 and list(skipped["skipped_remotes"]) == ["files"], skipped
    mapped = (await b.post("/admin/import?map=files=renamed", data, bearer(ADMIN))).json()
    assert mapped["imported"] == 1, mapped
    assert (await b.get("/api/renamed/new.bin")).header("X-Cache") == "HIT"
    assert await b.store.index.get("renamed:old.bin") is None
    assert await b.store.index.get("renamed:o.bin") is None


@pytest_twisted.ensureDeferred
async def test_export_waits_for_a_body_brought_into_the_local_tier(harness_factory: MakeHarness) -> None:  # noqa: F811
    from tests.unit.test_bundle import _Tiered

    a = await harness_factory(config("files"))
    body = os.urandom(50_000)
    await cached(a, {"/far.bin": body, "/near.bin": b"near"})
    entry = await a.store.index.get("files:far.bin")
    assert entry is not None and entry.digest is not None
    os.unlink(a.store.cas.local_path(entry.digest))
    a.store.cas = _Tiered(a.store.cas, {entry.digest: body})  # type: ignore[assignment]
    data = await export(a)
    tf = tarfile.open(fileobj=io.BytesIO(data))
    assert tf.extractfile(f"blobs/sha256/{entry.digest}").read() == body  # type: ignore[union-attr]
    assert a.store.cas.ensured == [entry.digest]
