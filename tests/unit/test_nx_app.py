"""Nx's self-hosted remote cache (``type: nx``) on the in-memory daemon: GET
(404 on a miss), PUT (200, then 409: never overwritten), tokens and scopes,
an entry over max_entry_size refused before the body, a failing store
answered as a miss and a full one declined, both with the 403 Nx builds on
(it fails the task on a 413 or 507), and /setup/nx."""

from __future__ import annotations

import errno
from typing import Any

import pytest
import pytest_twisted

from tests.support.client import Response
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401

WRITER, READER = "nx-w-1", "nx-r-2"
TOKENS = [{"name": "ci", "token": WRITER, "scopes": ["write"]}, {"name": "dev", "token": READER, "scopes": ["read"]}]
CONFIG = {
    "auth": {"anonymous_read": False, "tokens": TOKENS},
    "remotes": {"nx": {"type": "nx", "max_entry_size": 1000}, "other": {"type": "nx"}},
}
W = {"Authorization": f"Bearer {WRITER}"}
R = {"Authorization": f"Bearer {READER}"}
HASH = "16140196395425330557"
URL = f"/nx/nx/v1/cache/{HASH}"


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


def json_error(resp: Response, status: int) -> str:
    assert resp.status == status, resp.describe()
    assert (resp.header("Content-Type") or "").startswith("application/json"), resp.describe()
    return str(resp.json()["error"]) if resp.body else ""


def count(h: Harness, form: str, result: str, remote: str = "nx") -> float:
    want = f'sparkcache_registry_requests_total{{form="{form}",remote="{remote}",result="{result}"}} '
    for line in h.metrics.render().decode().splitlines():
        if line.startswith(want):
            return float(line.split()[-1])
    return 0.0


@pytest_twisted.ensureDeferred
async def test_miss_put_hit_then_409_keeps_the_first_body(h: Harness) -> None:
    json_error(await h.get(URL, R), 404)
    put = await h.put(URL, b"tarball one", {**W, "Content-Type": "application/octet-stream"})
    assert put.status == 200, put.describe()
    got = await h.get(URL, R)
    assert got.status == 200 and got.body == b"tarball one"
    assert got.header("Content-Type") == "application/octet-stream"
    # Nx's spec: an existing record is never overridden.
    assert "already stored" in json_error(await h.put(URL, b"tarball two", W), 409)
    assert (await h.get(URL, R)).body == b"tarball one"
    head = await h.head(URL, R)
    assert head.status == 200 and head.header("Content-Length") == str(len(b"tarball one"))
    # Another remote is another cache.
    assert (await h.get(f"/nx/other/v1/cache/{HASH}", R)).status == 404
    assert count(h, "entry", "miss") == 1 and count(h, "entry", "hit") == 3
    assert count(h, "upload", "stored") == 1 and count(h, "upload", "exists") == 1


@pytest_twisted.ensureDeferred
async def test_tokens_and_scopes(h: Harness) -> None:
    json_error(await h.get(URL), 401)  # anonymous_read is off
    json_error(await h.get(URL, {"Authorization": "Bearer wrong"}), 401)
    assert "write" in json_error(await h.put(URL, b"x", R), 403)
    json_error(await h.put(URL, b"x"), 401)
    assert (await h.get(URL, R)).status == 404  # nothing was kept by the refused PUTs


@pytest_twisted.ensureDeferred
async def test_anonymous_reads_when_the_daemon_allows_them(harness_factory: MakeHarness) -> None:
    h = await harness_factory({**CONFIG, "auth": {"anonymous_read": True, "tokens": TOKENS}})
    assert (await h.put(URL, b"out", W)).status == 200
    assert (await h.get(URL)).body == b"out"
    json_error(await h.put(f"/nx/nx/v1/cache/{HASH}1", b"x"), 401)


@pytest_twisted.ensureDeferred
async def test_too_large_is_declined_before_the_body(h: Harness) -> None:
    assert "at most 1000 bytes" in json_error(await h.put(URL, b"x" * 1001, W), 403)
    json_error(await h.get(URL, R), 404)
    assert count(h, "upload", "rejected") == 1
    assert (await h.put(URL, b"x" * 1000, W)).status == 200


@pytest_twisted.ensureDeferred
async def test_a_failing_store_is_a_miss_and_a_full_one_declines(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (await h.put(URL, b"kept", W)).status == 200

    def broken_index(key: str) -> Any:
        raise OSError("disk I/O error")

    async def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h.store.index, "get", broken_index)
    json_error(await h.get(URL, R), 404)
    monkeypatch.undo()
    monkeypatch.setattr(h.cache, "adopt", full)
    assert "No space left" in json_error(await h.put("/nx/nx/v1/cache/42", b"new", W), 403)
    monkeypatch.undo()
    json_error(await h.get("/nx/nx/v1/cache/42", R), 404)
    assert (await h.get(URL, R)).body == b"kept"


@pytest_twisted.ensureDeferred
async def test_bad_paths_and_methods(h: Harness) -> None:
    json_error(await h.get("/nx/nope/v1/cache/1", R), 404)
    json_error(await h.get("/nx/nx/v2/cache/1", R), 404)
    json_error(await h.get("/nx/nx/v1/cache/1/2", R), 404)
    json_error(await h.get("/nx/nx/v1/cache/a%20b", R), 400)
    json_error(await h.put("/nx/nx/v1/cache/a%20b", b"x", W), 400)
    json_error(await h.request("DELETE", URL, None, W), 405)
    json_error(await h.post(URL, b"x", W), 405)


@pytest_twisted.ensureDeferred
async def test_setup_nx(h: Harness) -> None:
    got = await h.get("/setup/nx?remote=other", R)
    assert got.status == 200, got.describe()
    text = got.body.decode()
    assert f"export NX_SELF_HOSTED_REMOTE_CACHE_SERVER={h.base_url}/nx/other\n" in text
    assert "NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN=" in text
    assert "/nx/nx\n" in (await h.get("/setup/nx", R)).body.decode()
    assert (await h.get("/setup/nx?remote=nope", R)).status == 404
