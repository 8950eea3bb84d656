"""``/-/v1/search`` and ``/-/npm/v1/security/*`` (npm audit) are passed through
to the upstream uncached and streamed (sparkcache.web.proxy), or answered with
a JSON 404 when the remote turns them off."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.web.client import ResponseFailed

from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401
from tests.support.memory import read_body
from tests.support.npm_packages import NpmMemoryUpstream

CONFIG: dict[str, Any] = {"remotes": {
    "npm": {"type": "npm", "upstream": [UPSTREAM + "/down", UPSTREAM]},
    "quiet": {"type": "npm", "upstream": UPSTREAM, "search": False, "audit": False},
    "internal": {"type": "npm-local"},
    "all": {"type": "npm-group", "members": ["internal", "npm"]},
}}
SEARCH = {"objects": [{"package": {"name": "left-pad", "version": "1.3.0"}}], "total": 1, "time": "now"}


@pytest.fixture
def up() -> NpmMemoryUpstream:
    u = NpmMemoryUpstream()
    u.behave("/down/-/v1/search", status=503)
    u.behave("/down/-/npm/v1/security/advisories/bulk", status=503)
    return u


@pytest.fixture
def h(harness_factory: MakeHarness, up: NpmMemoryUpstream) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG, upstream=up))


@pytest_twisted.ensureDeferred
async def test_search_is_passed_through_uncached_with_fallback(h: Harness, up: NpmMemoryUpstream) -> None:
    up.add("/-/v1/search", json.dumps(SEARCH).encode(), "application/json")
    for path in ("/npm/npm/-/v1/search?text=left&size=20", "/npm/all/-/v1/search?text=left&size=20"):
        resp = await h.get(path)
        assert resp.status == 200, resp.describe()
        assert resp.json() == SEARCH and resp.header("X-Cache") == "PASS"
    assert [r.path for r in up.requests_for("/-/v1/search")] == ["/-/v1/search?text=left&size=20"] * 2
    assert up.count("/down/-/v1/search") == 2
    assert await h.store.list("npm") == []


@pytest_twisted.ensureDeferred
async def test_audit_posts_are_passed_through_with_their_body(h: Harness, up: NpmMemoryUpstream) -> None:
    up.behave("/-/npm/v1/security/advisories/bulk", status=200, body=b'{"left-pad": []}',
              headers={"Content-Type": "application/json"})
    resp = await h.post("/npm/all/-/npm/v1/security/advisories/bulk", b'{"left-pad": ["1.3.0"]}',
                        {"Content-Type": "application/json"})
    assert resp.status == 200, resp.describe()
    assert resp.json() == {"left-pad": []}
    seen = up.requests_for("/-/npm/v1/security/advisories/bulk", "POST")
    assert len(seen) == 1 and seen[0].header("content-type") == "application/json"


@pytest_twisted.ensureDeferred
async def test_turned_off_or_local_answers_json(h: Harness, up: NpmMemoryUpstream) -> None:
    resp = await h.get("/npm/quiet/-/v1/search?text=x")
    assert resp.status == 404 and "search" in resp.json()["error"]
    resp = await h.post("/npm/quiet/-/npm/v1/security/audits/quick", b"{}", {"Content-Type": "application/json"})
    assert resp.status == 404 and "audit" in resp.json()["error"]
    local = await h.get("/npm/internal/-/v1/search?text=x")
    assert local.json()["objects"] == []
    assert up.total() == 0


@pytest_twisted.ensureDeferred
async def test_a_large_answer_streams_and_a_cut_one_aborts_the_client(h: Harness, up: NpmMemoryUpstream) -> None:
    big = json.dumps({"objects": [{"package": {"name": f"p{i}"}} for i in range(20000)]}).encode()
    up.add("/-/v1/search", big, "application/json")
    up.behave("/-/v1/search", pause_at=1000)
    response = await h.open("GET", "/npm/npm/-/v1/search?text=p")
    assert response.code == 200  # headers are through while upstream is still held
    up.resume("/-/v1/search")
    assert await read_body(response) == big
    up.behave("/-/v1/search", truncate_at=5000)
    with pytest.raises(ResponseFailed):
        await h.get("/npm/npm/-/v1/search?text=p")


@pytest_twisted.ensureDeferred
async def test_an_unreachable_upstream_is_a_json_502(harness_factory: MakeHarness, up: NpmMemoryUpstream) -> None:
    h = await harness_factory({"remotes": {"npm": {"type": "npm", "upstream": UPSTREAM}}}, upstream=up)
    up.behave("/-/v1/search", reset=True)
    resp = await h.get("/npm/npm/-/v1/search?text=x")
    assert resp.status == 502 and resp.header("Content-Type") == "application/json"
