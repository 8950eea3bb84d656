"""The gha protocol's v1 side (``_apis/artifactcache``) on the in-memory
daemon: reserve, PATCH chunks at their offsets (out of order), commit,
lookup by keys and restore-key prefixes, 409 on an existing key, 413, and
cache scopes."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted

from tests.support.gha_calls import path_of, restore_v2
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401

WRITER, READER = "w-token", "r-token"
V = "v1-version"
API = "/gha/ci/_apis/artifactcache"
CONFIG = {
    "auth": {"anonymous_read": False, "tokens": [{"name": "w", "token": WRITER, "scopes": ["write"]},
                                                  {"name": "r", "token": READER, "scopes": ["read"]}]},
    "remotes": {"ci": {"type": "gha", "max_entry_size": 1000, "scope": "refs/heads/main"}},
}


def auth(token: str = WRITER, scope: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json;api-version=6.0-preview.1",
               "Content-Type": "application/json"}
    if scope:
        headers["X-Sparkcache-Gha-Scope"] = scope
    return headers


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


async def save_v1(h: Harness, key: str, chunks: list[bytes], scope: str | None = None) -> int:
    resp = await h.post(f"{API}/caches", json.dumps({"key": key, "version": V, "cacheSize": 10}).encode(),
                        auth(scope=scope))
    assert resp.status == 201, resp.describe()
    cache_id = resp.json()["cacheId"]
    offsets, at = [], 0
    for c in chunks:
        offsets.append(at)
        at += len(c)
    # The last chunk first: chunks land at their offsets whatever the order.
    for start, c in reversed(list(zip(offsets, chunks))):
        headers = {**auth(scope=scope), "Content-Type": "application/octet-stream",
                   "Content-Range": f"bytes {start}-{start + len(c) - 1}/*"}
        patched = await h.request("PATCH", f"{API}/caches/{cache_id}", c, headers)
        assert patched.status == 204, patched.describe()
    done = await h.post(f"{API}/caches/{cache_id}", json.dumps({"size": at}).encode(), auth(scope=scope))
    assert done.status == 204, done.describe()
    return int(cache_id)


async def lookup(h: Harness, keys: list[str], token: str = READER, scope: str | None = None) -> Any:
    resp = await h.get(f"{API}/cache?keys={','.join(keys)}&version={V}", auth(token, scope))
    if resp.status == 204:
        return None
    assert resp.status == 200, resp.describe()
    found = resp.json()
    body = await h.get(path_of(found["archiveLocation"]))
    assert body.status == 200
    return found["cacheKey"], found["scope"], body.body


@pytest_twisted.ensureDeferred
async def test_reserve_patch_commit_lookup(h: Harness) -> None:
    assert await lookup(h, ["npm-a"]) is None
    await save_v1(h, "npm-a", [b"part one|", b"part two|", b"three"])
    assert await lookup(h, ["npm-a"]) == ("npm-a", "refs/heads/main", b"part one|part two|three")
    h.clock.advance(5)
    await save_v1(h, "npm-b", [b"newer"])
    assert await lookup(h, ["npm-zzz", "npm-"]) == ("npm-b", "refs/heads/main", b"newer")
    assert await lookup(h, ["npm-zzz", "npm-a", "npm-"]) == ("npm-a", "refs/heads/main", b"part one|part two|three")
    assert await lookup(h, ["npm-"]) is None
    # Entries are immutable: reserving an existing key is a 409.
    again = await h.post(f"{API}/caches", json.dumps({"key": "npm-a", "version": V}).encode(), auth())
    assert again.status == 409 and "immutable" in again.json()["message"]
    # v1 and v2 are one cache.
    assert await restore_v2(h, "x", V, READER, ["npm-a"], prefix="/gha/ci") == ("npm-a", b"part one|part two|three")
    listing = await h.get(f"{API}/caches?key=npm-", auth(READER))
    assert {c["cacheKey"] for c in listing.json()["artifactCaches"]} == {"npm-a", "npm-b"}


@pytest_twisted.ensureDeferred
async def test_bad_chunks_and_commits_store_nothing(h: Harness) -> None:
    resp = await h.post(f"{API}/caches", json.dumps({"key": "k", "version": V}).encode(), auth())
    cache_id = resp.json()["cacheId"]
    url = f"{API}/caches/{cache_id}"
    octets = {**auth(), "Content-Type": "application/octet-stream"}
    assert (await h.request("PATCH", url, b"abc", {**octets, "Content-Range": "bytes 0-3/*"})).status == 400
    assert (await h.request("PATCH", url, b"abc", octets)).status == 400
    absurd = {**octets, "Content-Range": f"bytes {'9' * 5000}-{'9' * 5000}/*"}
    assert (await h.request("PATCH", url, b"abc", absurd)).status == 400  # never int() of 5,000 digits
    assert (await h.request("PATCH", url, b"abc", {**octets, "Content-Range": "bytes 5-7/*"})).status == 204
    gap = await h.post(url, json.dumps({"size": 8}).encode(), auth())
    assert gap.status == 400 and "cover" in gap.json()["message"]
    assert await lookup(h, ["k"]) is None
    assert (await h.post(url, json.dumps({"size": 8}).encode(), auth())).status == 404  # dropped
    unknown = await h.request("PATCH", f"{API}/caches/999", b"a", {**octets, "Content-Range": "bytes 0-0/*"})
    assert unknown.status == 404
    assert not h.store._spools


@pytest_twisted.ensureDeferred
async def test_limits_and_auth(h: Harness) -> None:
    big = await h.post(f"{API}/caches", json.dumps({"key": "big", "version": V, "cacheSize": 5000}).encode(), auth())
    assert big.status == 413
    resp = await h.post(f"{API}/caches", json.dumps({"key": "k", "version": V}).encode(), auth())
    url = f"{API}/caches/{resp.json()['cacheId']}"
    octets = {**auth(), "Content-Type": "application/octet-stream"}
    assert (await h.request("PATCH", url, b"x" * 1001, {**octets, "Content-Range": "bytes 0-1000/*"})).status == 413
    assert (await h.request("PATCH", url, b"x" * 600, {**octets, "Content-Range": "bytes 0-599/*"})).status == 204
    # Together the chunks are over the limit too: the upload is dropped.
    assert (await h.request("PATCH", url, b"x" * 600, {**octets, "Content-Range": "bytes 600-1199/*"})).status == 413
    assert (await h.post(url, json.dumps({"size": 1200}).encode(), auth())).status == 404
    no_auth = await h.post(f"{API}/caches", json.dumps({"key": "k2", "version": V}).encode())
    assert no_auth.status == 401
    assert (await h.post(f"{API}/caches", json.dumps({"key": "k2", "version": V}).encode(), auth(READER))).status == 403
    assert (await h.get(f"{API}/cache?keys=k&version={V}")).status == 401
    assert (await h.request("PATCH", url, b"x", {"Content-Range": "bytes 0-0/*"})).status == 401
    assert (await h.get(f"{API}/cache?keys=&version={V}", auth(READER))).status == 400


@pytest_twisted.ensureDeferred
async def test_scopes_isolate_branches_and_fall_back(harness_factory: MakeHarness) -> None:
    config = {**CONFIG, "remotes": {"ci": {"type": "gha", "scope": "refs/heads/main",
                                           "restore_scopes": ["refs/heads/main"]}}}
    h = await harness_factory(config)
    await save_v1(h, "deps-main", [b"main"])
    await save_v1(h, "deps-feature", [b"feature"], scope="refs/heads/feature")
    # A branch sees its own entries, then the default branch's, as on GitHub.
    assert await lookup(h, ["deps-feature"], scope="refs/heads/feature") == ("deps-feature", "refs/heads/feature",
                                                                           b"feature")
    assert await lookup(h, ["x", "deps-"], scope="refs/heads/feature") == ("deps-feature", "refs/heads/feature",
                                                                          b"feature")
    assert await lookup(h, ["deps-main"], scope="refs/heads/feature") == ("deps-main", "refs/heads/main", b"main")
    # ... and no other branch's.
    assert await lookup(h, ["deps-feature"]) is None
    assert await lookup(h, ["deps-feature"], scope="refs/heads/other") is None
    # The same key in another scope is another entry, not a conflict.
    await save_v1(h, "deps-main", [b"mine"], scope="refs/heads/other")
    assert await lookup(h, ["deps-main"], scope="refs/heads/other") == ("deps-main", "refs/heads/other", b"mine")


@pytest_twisted.ensureDeferred
async def test_a_failing_index_is_a_miss(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    await save_v1(h, "k", [b"v"])

    def broken(*args: Any) -> Any:
        raise OSError("disk I/O error")

    monkeypatch.setattr(h.store.index, "get", broken)
    monkeypatch.setattr(h.store.index, "list_remote", broken)
    assert await lookup(h, ["k", "k"]) is None
