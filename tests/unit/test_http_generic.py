"""The generic app (``/api/<remote>/<path>``) over in-memory HTTP, through the daemon's
real root: routing, errors, auth, and the cache's cases against an in-memory
upstream whose misbehaviour is exact, with freshness driven by the harness clock."""

from __future__ import annotations

import os
from typing import Any, Awaitable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater

from tests.support.client import Response, assert_json_error, basic, bearer, sha256
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401
from tests.support.memory import read_body

READER, WRITER, ADMIN = "rd-0c1f", "wr-93be", "ad-57aa"
TOKENS = [{"name": "reader", "token": READER, "scopes": ["read"]},
          {"name": "writer", "token": WRITER, "scopes": ["read", "write"]},
          {"name": "admin", "token": ADMIN, "scopes": ["read", "write", "admin"]}]
CONFIG: dict[str, Any] = {
    "auth": {"anonymous_read": True, "tokens": TOKENS},
    "remotes": {
        "files": {"type": "generic", "upstream": UPSTREAM, "mutable_patterns": ["^/meta/"],
                  "immutable_patterns": ["^/releases/", "^/meta/"], "check_mutable_updates": True,
                  "read_timeout": "10s", "cache": {"mutable_ttl": "60s", "negative_ttl": "30s"}},
        "uploads": {"type": "local"},
        "images": {"type": "oci", "upstream": UPSTREAM},
    },
}


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


async def broken_or_error(request: Awaitable[Response]) -> int | None:
    """None when the transfer broke off (a client can tell it is incomplete), else the status."""
    try:
        return (await request).status
    except Exception:
        return None


# -- routing and errors -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_routing_errors_are_json(h: Harness) -> None:
    assert "no remote named" in assert_json_error(await h.get("/api/"), 404)["error"]
    assert "unknown remote 'nope'" in assert_json_error(await h.get("/api/nope/releases/a"), 404)["error"]
    # A remote of another protocol is named, with where it is served.
    assert "/v2/images/" in assert_json_error(await h.get("/api/images/x"), 404)["error"]
    outside = assert_json_error(await h.get("/api/files/elsewhere/a.bin"), 403)
    assert "immutable_patterns" in outside["error"]
    put = await h.put("/api/files/releases/a.bin", b"x", bearer(WRITER))
    assert_json_error(put, 405)
    assert put.header("Allow") == "GET, HEAD, DELETE"
    assert_json_error(await h.request("PATCH", "/api/files/releases/a.bin"), 405)
    assert_json_error(await h.request("PATCH", "/api/files"), 405)
    # A CR/LF that decodes from the path is refused before any router sees it.
    assert_json_error(await h.get("/api/files/releases/a%0d%0ab"), 400)
    assert h.upstream.total() == 0


# -- auth ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reads_need_a_token_when_anonymous_reads_are_off(harness_factory: MakeHarness) -> None:
    h = await harness_factory({**CONFIG, "auth": {"anonymous_read": False, "tokens": TOKENS}})
    h.upstream.add("/releases/a.bin", b"a" * 100)
    denied = await h.get("/api/files/releases/a.bin")
    assert_json_error(denied, 401)
    assert (denied.header("WWW-Authenticate") or "").startswith("Bearer")
    assert_json_error(await h.get("/api/files/releases/a.bin", bearer("not-a-token")), 401)
    assert h.upstream.total() == 0  # nothing was fetched for a caller that may not read
    ok = await h.get("/api/files/releases/a.bin", bearer(READER))
    assert ok.status == 200 and ok.body == b"a" * 100
    # Basic auth with the token as the password is what apt and pip send.
    await h.settle()
    hit = await h.get("/api/files/releases/a.bin", basic("x", READER))
    assert hit.status == 200 and hit.header("X-Cache") == "HIT"
    # The hit path (served without routing) checks credentials too.
    assert_json_error(await h.get("/api/files/releases/a.bin"), 401)


@pytest_twisted.ensureDeferred
async def test_uploads_and_purges_need_their_scopes(h: Harness) -> None:
    assert_json_error(await h.put("/api/uploads/tools/t.bin", b"tool"), 401)
    assert_json_error(await h.put("/api/uploads/tools/t.bin", b"tool", bearer(READER)), 403)
    put = await h.put("/api/uploads/tools/t.bin", b"tool", bearer(WRITER))
    assert put.status == 201 and put.json()["digest"] == "sha256:" + sha256(b"tool")
    got = await h.get("/api/uploads/tools/t.bin")
    assert got.status == 200 and got.body == b"tool"
    # Deleting is an admin's job, on uploads and cached files alike.
    assert_json_error(await h.delete("/api/uploads/tools/t.bin", bearer(WRITER)), 403)
    gone = await h.delete("/api/uploads/tools/t.bin", bearer(ADMIN))
    assert gone.status == 200 and gone.json() == {"purged": 1}
    assert_json_error(await h.get("/api/uploads/tools/t.bin"), 404)


# -- the cache ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_miss_then_hit_with_range_and_head(h: Harness) -> None:
    data = os.urandom(200_000)
    h.upstream.add("/releases/v1/tool.tar.gz", data)
    miss = await h.get("/api/files/releases/v1/tool.tar.gz")
    assert miss.status == 200 and miss.body == data and miss.header("X-Cache") == "MISS"
    await h.settle()
    hit = await h.get("/api/files/releases/v1/tool.tar.gz")
    assert hit.status == 200 and hit.body == data and hit.header("X-Cache") == "HIT"
    part = await h.get("/api/files/releases/v1/tool.tar.gz", {"Range": "bytes=10-19"})
    assert part.status == 206 and part.body == data[10:20]
    assert part.header("Content-Range") == f"bytes 10-19/{len(data)}"
    head = await h.head("/api/files/releases/v1/tool.tar.gz")
    assert head.status == 200 and head.body == b"" and head.header("Content-Length") == str(len(data))
    assert h.upstream.count("/releases/v1/tool.tar.gz") == 1
    entry = await h.store.index.get("files:releases/v1/tool.tar.gz")
    assert entry is not None and entry.digest == sha256(data)


@pytest_twisted.ensureDeferred
async def test_a_miss_is_fetched_before_the_router_runs_and_the_handler_joins_it(h: Harness, monkeypatch: Any) -> None:
    for _ in range(500):  # the key filter, built in the background at start
        if h.store.index.surely_absent("files:releases/none"):
            break
        await deferLater(reactor, 0.01)
    started: list[tuple[str, bool]] = []
    real = h.cache.start_now

    def spy(req: Any) -> bool:
        ok = real(req)
        started.append((req.key, ok))
        return ok

    monkeypatch.setattr(h.cache, "start_now", spy)
    monkeypatch.setattr(type(h.cache), "get", _joins_only(type(h.cache).get, h.cache))
    data = os.urandom(50_000)
    h.upstream.add("/releases/early.bin", data)
    h.upstream.add("/releases/early.bin.asc", b"sig")
    got = await h.get("/api/files/releases/early.bin?v=1")
    assert got.status == 200 and got.body == data and got.header("X-Cache") == "MISS"
    head = await h.head("/api/files/releases/early.bin.asc")
    assert head.status == 200 and head.header("Content-Length") == "3"
    assert started == [("files:releases/early.bin?v=1", True), ("files:releases/early.bin.asc", True)]
    assert h.upstream.count("/releases/early.bin") == 1 and h.upstream.count("/releases/early.bin.asc") == 1
    await h.settle()
    # Stored: a hit, which starts nothing; outside the patterns: refused, nothing fetched.
    assert (await h.get("/api/files/releases/early.bin?v=1")).header("X-Cache") == "HIT"
    assert_json_error(await h.get("/api/files/elsewhere/x.bin"), 403)
    assert len(started) == 2 and h.upstream.total() == 2


def _joins_only(get: Any, cache: Any) -> Any:
    """``Cache.get`` that fails a test where a production it should have joined
    was not running (the request started its own)."""
    async def joining(self: Any, req: Any, source: Any = None) -> Any:
        if self is cache and not self.store.index.peek(req.key) and not self.fetching(req.key):
            raise AssertionError(f"{req.key}: not started before the handler's get")
        return await get(self, req, source)
    return joining


@pytest_twisted.ensureDeferred
async def test_concurrent_misses_share_one_upstream_request(h: Harness) -> None:
    data = os.urandom(100_000)
    h.upstream.add("/releases/big.bin", data)
    h.upstream.behave("/releases/big.bin", pause_at=1000)  # hold the body until every client is in
    opened = [h.open("GET", "/api/files/releases/big.bin") for _ in range(5)]
    await h.upstream.until_paused("/releases/big.bin")
    # Every client has its headers while upstream is still held: all of them are
    # tailing the one fetch, none waits for a body of its own.
    responses = await gatherResults(opened)
    assert [r.code for r in responses] == [200] * 5
    h.upstream.resume("/releases/big.bin")
    bodies = await gatherResults([read_body(r) for r in responses])
    assert all(b == data for b in bodies)
    assert h.upstream.count("/releases/big.bin") == 1


@pytest_twisted.ensureDeferred
async def test_stale_is_served_when_upstream_answers_5xx(h: Harness) -> None:
    h.upstream.add("/meta/index.json", b'{"v": 1}')
    assert (await h.get("/api/files/meta/index.json")).header("X-Cache") == "MISS"
    await h.settle()
    h.clock.advance(61)
    h.upstream.behave("/meta/index.json", status=503)
    stale = await h.get("/api/files/meta/index.json")
    assert stale.status == 200 and stale.body == b'{"v": 1}' and stale.header("X-Cache") == "STALE"
    assert h.upstream.count("/meta/index.json") == 2
    # Nothing cached to fall back on: the failure is the client's answer, in JSON.
    h.upstream.behave("/meta/other.json", status=503)
    assert_json_error(await h.get("/api/files/meta/other.json"), 502)


@pytest_twisted.ensureDeferred
async def test_stale_is_served_when_upstream_is_unreachable_or_silent(h: Harness) -> None:
    h.upstream.add("/meta/a.json", b"a1")
    await h.get("/api/files/meta/a.json")
    await h.settle()
    h.clock.advance(61)
    h.upstream.behave("/meta/a.json", reset=True)
    reset = await h.get("/api/files/meta/a.json")
    assert reset.status == 200 and reset.body == b"a1" and reset.header("X-Cache") == "STALE"
    # No answer at all: the read timeout runs on the daemon's clock, not the wall's.
    h.upstream.behave("/meta/a.json", stall=True)
    pending = h.get("/api/files/meta/a.json")
    await h.upstream.until_paused("/meta/a.json")
    h.clock.advance(10)
    silent = await pending
    assert silent.status == 200 and silent.body == b"a1" and silent.header("X-Cache") == "STALE"


@pytest_twisted.ensureDeferred
async def test_revalidation_with_304_keeps_the_body(h: Harness) -> None:
    h.upstream.add("/meta/Release", b"release v1")
    first = await h.get("/api/files/meta/Release")
    await h.settle()
    h.clock.advance(61)
    again = await h.get("/api/files/meta/Release")
    assert again.status == 200 and again.body == b"release v1" and again.header("X-Cache") == "REVALIDATED"
    conditional = h.upstream.requests_for("/meta/Release")[-1]
    assert conditional.header("If-None-Match") == first.header("ETag") and conditional.status == 304
    # Fresh again for a TTL: no upstream request.
    assert (await h.get("/api/files/meta/Release")).header("X-Cache") == "HIT"
    assert h.upstream.count("/meta/Release") == 2
    # A changed body upstream replaces the entry at the next revalidation.
    h.upstream.add("/meta/Release", b"release v2")
    h.clock.advance(61)
    assert (await h.get("/api/files/meta/Release")).body == b"release v2"


@pytest_twisted.ensureDeferred
async def test_a_404_is_cached_only_for_the_negative_ttl(h: Harness) -> None:
    assert_json_error(await h.get("/api/files/releases/missing.bin"), 404)
    assert_json_error(await h.get("/api/files/releases/missing.bin"), 404)
    assert h.upstream.count("/releases/missing.bin") == 1
    h.clock.advance(31)
    h.upstream.add("/releases/missing.bin", b"here now")
    found = await h.get("/api/files/releases/missing.bin")
    assert found.status == 200 and found.body == b"here now"
    assert h.upstream.count("/releases/missing.bin") == 2


@pytest_twisted.ensureDeferred
async def test_a_truncated_upstream_body_is_never_cached(h: Harness) -> None:
    data = os.urandom(300_000)
    h.upstream.add("/releases/t.bin", data)
    h.upstream.behave("/releases/t.bin", truncate_at=100_000, times=1)
    # The client sees a broken transfer (or a 502), never a short 200.
    assert await broken_or_error(h.get("/api/files/releases/t.bin")) in (None, 502)
    await h.settle()
    assert await h.store.index.get("files:releases/t.bin") is None
    assert os.listdir(h.store.spool_dir) == []
    whole = await h.get("/api/files/releases/t.bin")
    assert whole.status == 200 and whole.body == data and whole.header("X-Cache") == "MISS"
    assert h.upstream.count("/releases/t.bin") == 2


@pytest_twisted.ensureDeferred
async def test_purge_makes_the_next_request_a_miss(h: Harness) -> None:
    h.upstream.add("/releases/p.bin", b"p" * 10)
    await h.get("/api/files/releases/p.bin")
    await h.settle()
    assert_json_error(await h.delete("/api/files/releases/p.bin"), 401)
    purged = await h.delete("/api/files/releases/p.bin", bearer(ADMIN))
    assert purged.json() == {"purged": 1}
    assert (await h.get("/api/files/releases/p.bin")).header("X-Cache") == "MISS"
    assert h.upstream.count("/releases/p.bin") == 2
