"""The /npm/ app over in-memory HTTP through the daemon's real root, in front of
an in-memory registry (tests/support/npm_packages.py): packument forms and
negotiation, the tarball rewrite, gzip, tarball verification, freshness,
names in every spelling, and errors in npm's JSON."""

from __future__ import annotations

import gzip
import hashlib
import json
from typing import Any

import pytest
import pytest_twisted

from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401
from tests.support.npm_packages import (
    ABBREVIATED, NpmMemoryUpstream, integrity, make_tarball, npm_error, packument_of as doc,
)

FULL = "application/json"
PNPM_ACCEPT = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"
CONFIG: dict[str, Any] = {"remotes": {"npm": {"type": "npm", "upstream": UPSTREAM}}}


@pytest.fixture
def up() -> NpmMemoryUpstream:
    u = NpmMemoryUpstream()
    u.publish("left-pad", "1.0.0")
    u.publish("left-pad", "1.3.0")
    u.publish("@team/util", "2.0.0", {"left-pad": "^1.0.0"})
    return u


@pytest.fixture
def h(harness_factory: MakeHarness, up: NpmMemoryUpstream) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG, upstream=up))




@pytest_twisted.ensureDeferred
async def test_full_and_abbreviated_are_separate_entries_each_fetched_in_its_form(h: Harness,
                                                                                 up: NpmMemoryUpstream) -> None:
    full = await h.get("/npm/npm/left-pad", {"Accept": FULL})
    assert full.header("Content-Type") == FULL
    assert full.header("Vary") == "Accept, Accept-Encoding"
    assert full.header("X-Cache") == "MISS"
    d = doc(full)
    assert "readme" in d["versions"]["1.0.0"]  # the full form
    abbr = await h.get("/npm/npm/left-pad", {"Accept": PNPM_ACCEPT})
    assert abbr.header("Content-Type") == ABBREVIATED
    assert abbr.header("X-Cache") == "MISS"
    a = doc(abbr)
    assert "readme" not in a["versions"]["1.0.0"]
    accepts = [r.header("accept") for r in up.requests_for("/left-pad")]
    assert accepts[0] == FULL and ABBREVIATED in (accepts[1] or "")
    again = await h.get("/npm/npm/left-pad", {"Accept": PNPM_ACCEPT})
    assert again.header("X-Cache") == "HIT" and doc(again) == a
    assert up.count("/left-pad") == 2


@pytest_twisted.ensureDeferred
async def test_tarball_urls_point_here_and_digests_are_untouched(h: Harness, up: NpmMemoryUpstream) -> None:
    d = doc(await h.get("/npm/npm/@team%2futil", {"Accept": FULL}))
    dist = d["versions"]["2.0.0"]["dist"]
    assert dist["tarball"] == "http://cache.test/npm/npm/@team/util/-/util-2.0.0.tgz"
    want = up.docs["@team/util"]["versions"]["2.0.0"]["dist"]
    assert {k: v for k, v in dist.items() if k != "tarball"} == {k: v for k, v in want.items() if k != "tarball"}
    # Everything but the URLs is byte-for-byte upstream's.
    raw = json.dumps(up.docs["@team/util"]).replace(UPSTREAM + "/@team/util/-/",
                                                    "http://cache.test/npm/npm/@team/util/-/")
    resp = await h.get("/npm/npm/@team%2futil", {"Accept": FULL})
    assert resp.body == raw.encode()


@pytest_twisted.ensureDeferred
async def test_gzip_is_offered_to_clients_that_take_it(h: Harness) -> None:
    plain = await h.get("/npm/npm/left-pad", {"Accept": FULL})
    gz = await h.get("/npm/npm/left-pad", {"Accept": FULL, "Accept-Encoding": "gzip, deflate"})
    assert plain.header("Content-Encoding") is None
    assert gz.header("Content-Encoding") == "gzip"
    assert gzip.decompress(gz.body) == plain.body
    refused = await h.get("/npm/npm/left-pad", {"Accept": FULL, "Accept-Encoding": "gzip;q=0"})
    assert refused.header("Content-Encoding") is None


@pytest_twisted.ensureDeferred
async def test_scoped_names_in_every_spelling_are_one_package(h: Harness, up: NpmMemoryUpstream) -> None:
    bodies = set()
    for path in ("/npm/npm/@team%2futil", "/npm/npm/@team%2Futil", "/npm/npm/@team/util"):
        resp = await h.get(path, {"Accept": FULL})
        bodies.add(json.dumps(doc(resp), sort_keys=True))
    assert len(bodies) == 1
    assert up.count("/@team%2Futil") == 1


@pytest_twisted.ensureDeferred
async def test_tarballs_are_verified_and_served_from_the_cache(h: Harness, up: NpmMemoryUpstream) -> None:
    for path in ("/npm/npm/@team/util/-/util-2.0.0.tgz", "/npm/npm/@team%2futil/-/util-2.0.0.tgz"):
        resp = await h.get(path)
        assert resp.status == 200, resp.describe()
        assert resp.body == up.tarballs[("@team/util", "2.0.0")]
    await h.settle()
    assert up.count("/@team/util/-/util-2.0.0.tgz") == 1
    m = h.metrics.render().decode()
    assert 'sparkcache_registry_requests_total{form="tarball",remote="npm",result="miss"} 1.0' in m
    assert 'sparkcache_registry_requests_total{form="tarball",remote="npm",result="hit"} 1.0' in m


@pytest_twisted.ensureDeferred
async def test_a_tarball_that_does_not_match_its_integrity_is_refused(h: Harness, up: NpmMemoryUpstream) -> None:
    good = up.tarballs[("left-pad", "1.3.0")]
    up.add("/left-pad/-/left-pad-1.3.0.tgz", make_tarball("left-pad", "1.3.0", files={"evil.js": b"x"}))
    await h.get("/npm/npm/left-pad", {"Accept": FULL})
    bad = await h.get("/npm/npm/left-pad/-/left-pad-1.3.0.tgz")
    assert bad.status != 200 or len(bad.body) < len(up.files["/left-pad/-/left-pad-1.3.0.tgz"].data)
    await h.settle()
    assert await h.store.index.get("npm:left-pad/-/left-pad-1.3.0.tgz") is None
    up.add("/left-pad/-/left-pad-1.3.0.tgz", good)
    ok = await h.get("/npm/npm/left-pad/-/left-pad-1.3.0.tgz")
    assert ok.status == 200 and hashlib.sha512(ok.body).hexdigest() == hashlib.sha512(good).hexdigest()


@pytest_twisted.ensureDeferred
async def test_sha1_is_checked_when_there_is_no_integrity(h: Harness, up: NpmMemoryUpstream) -> None:
    d = up.docs["left-pad"]
    del d["versions"]["1.0.0"]["dist"]["integrity"]
    d["versions"]["1.0.0"]["dist"]["shasum"] = "0" * 40
    up.write_docs("left-pad")
    bad = await h.get("/npm/npm/left-pad/-/left-pad-1.0.0.tgz")
    assert bad.status != 200 or bad.body != up.tarballs[("left-pad", "1.0.0")]
    await h.settle()
    assert await h.store.index.get("npm:left-pad/-/left-pad-1.0.0.tgz") is None


@pytest_twisted.ensureDeferred
async def test_a_tarball_no_packument_lists_is_never_fetched(h: Harness, up: NpmMemoryUpstream) -> None:
    up.add("/left-pad/-/left-pad-9.9.9.tgz", b"made up")
    resp = await h.get("/npm/npm/left-pad/-/left-pad-9.9.9.tgz")
    assert "not listed" in npm_error(resp, 404)
    assert up.count("/left-pad/-/left-pad-9.9.9.tgz") == 0


@pytest_twisted.ensureDeferred
async def test_the_tarball_is_fetched_from_the_url_the_packument_names(h: Harness, up: NpmMemoryUpstream) -> None:
    data = up.tarballs[("left-pad", "1.0.0")]
    up.add("/storage/lp.tgz", data)
    up.docs["left-pad"]["versions"]["1.0.0"]["dist"]["tarball"] = UPSTREAM + "/storage/x/-/left-pad-1.0.0.tgz"
    up.add("/storage/x/-/left-pad-1.0.0.tgz", data)
    up.write_docs("left-pad")
    d = doc(await h.get("/npm/npm/left-pad", {"Accept": FULL}))
    assert d["versions"]["1.0.0"]["dist"]["tarball"] == "http://cache.test/npm/npm/left-pad/-/left-pad-1.0.0.tgz"
    resp = await h.get("/npm/npm/left-pad/-/left-pad-1.0.0.tgz")
    assert resp.status == 200 and resp.body == data
    assert up.count("/storage/x/-/left-pad-1.0.0.tgz") == 1
    assert up.count("/left-pad/-/left-pad-1.0.0.tgz") == 0


@pytest_twisted.ensureDeferred
async def test_packuments_revalidate_after_their_ttl_and_go_stale_on_error(h: Harness, up: NpmMemoryUpstream) -> None:
    await h.get("/npm/npm/left-pad", {"Accept": FULL})
    up.publish("left-pad", "1.4.0")
    assert "1.4.0" not in doc(await h.get("/npm/npm/left-pad", {"Accept": FULL}))["versions"]
    h.clock.advance(301)
    fresh = await h.get("/npm/npm/left-pad", {"Accept": FULL})
    assert "1.4.0" in doc(fresh)["versions"]
    h.clock.advance(301)
    same = await h.get("/npm/npm/left-pad", {"Accept": FULL})
    assert same.header("X-Cache") == "REVALIDATED"
    assert up.requests_for("/left-pad")[-1].header("if-none-match")
    h.clock.advance(301)
    up.behave("/left-pad", status=503)
    stale = await h.get("/npm/npm/left-pad", {"Accept": FULL})
    assert stale.header("X-Cache") == "STALE" and "1.4.0" in doc(stale)["versions"]


@pytest_twisted.ensureDeferred
async def test_a_packument_that_is_not_json_is_never_kept(h: Harness, up: NpmMemoryUpstream) -> None:
    up.behave("/nothere", status=200, body=b"<html>proxy error</html>")
    resp = await h.get("/npm/npm/nothere", {"Accept": FULL})
    assert "no usable packument" in npm_error(resp, 502)
    assert await h.store.index.get("npm:nothere") is None
    # With a good one stored, a broken refresh serves the stale one.
    await h.get("/npm/npm/left-pad", {"Accept": FULL})
    h.clock.advance(301)
    up.write_docs("left-pad", full=b'{"name": "left-pad", "versions": {')
    stale = await h.get("/npm/npm/left-pad", {"Accept": FULL})
    assert stale.header("X-Cache") == "STALE"
    assert "1.3.0" in doc(stale)["versions"]


@pytest_twisted.ensureDeferred
async def test_unknown_packages_are_a_briefly_cached_404(h: Harness, up: NpmMemoryUpstream) -> None:
    assert npm_error(await h.get("/npm/npm/no-such-pkg"), 404) == "Not found"
    assert npm_error(await h.get("/npm/npm/no-such-pkg"), 404) == "Not found"
    assert up.count("/no-such-pkg") == 1


@pytest_twisted.ensureDeferred
async def test_ping_and_the_root_answer(h: Harness) -> None:
    assert (await h.get("/npm/npm/-/ping")).json() == {}
    assert (await h.get("/npm/npm/-/ping?write=true")).json() == {}
    assert (await h.get("/npm/npm/")).json()["remote"] == "npm"


@pytest.mark.parametrize("path", [
    "/npm/npm/..%2f..%2fetc%2fpasswd", "/npm/npm/@team%2f..", "/npm/npm/@team%2f..%2f..%2fx",
    "/npm/npm/@..%2fx", "/npm/npm/.hidden", "/npm/npm/_under", "/npm/npm/a%00b", "/npm/npm/a%5cb",
    "/npm/npm/@team/util/-/..%2f..%2fx.tgz", "/npm/npm/left-pad/-/x.zip", "/npm/npm/has%20space",
    "/npm/npm/a/b/c/d", "/npm/npm/%ff",
])
@pytest_twisted.ensureDeferred
async def test_bad_names_are_json_errors_and_reach_nothing(h: Harness, up: NpmMemoryUpstream, path: str) -> None:
    resp = await h.get(path)
    assert resp.status in (400, 404), resp.describe()
    npm_error(resp, resp.status)
    assert up.total() == 0
    assert not [e for e in await h.store.list("npm")]


@pytest_twisted.ensureDeferred
async def test_writes_to_a_cache_remote_are_refused(h: Harness) -> None:
    resp = await h.put("/npm/npm/left-pad", b"{}", {"Content-Type": "application/json"})
    assert "npm-local" in npm_error(resp, 405)


def test_integrity_of_a_made_tarball_is_stable() -> None:
    assert integrity(make_tarball("a", "1.0.0")) == integrity(make_tarball("a", "1.0.0"))


@pytest_twisted.ensureDeferred
async def test_a_large_packument_is_inflated_as_it_is_sent_to_clients_without_gzip(h: Harness,
                                                                                    up: NpmMemoryUpstream) -> None:
    for i in range(600):
        up.publish("big", f"1.0.{i}")
    upstream_body = up.files["/big"].data
    assert len(upstream_body) > 256 << 10
    want = upstream_body.replace(UPSTREAM.encode() + b"/big/-/", b"http://cache.test/npm/npm/big/-/")
    gz = await h.get("/npm/npm/big", {"Accept": FULL, "Accept-Encoding": "gzip"})
    assert gzip.decompress(gz.body) == want
    plain = await h.get("/npm/npm/big", {"Accept": FULL})
    assert plain.header("Content-Encoding") is None and plain.body == want
    head = await h.head("/npm/npm/big", {"Accept": FULL})
    assert head.status == 200 and head.body == b""
    # The tarballs of the large packument are found too.
    tgz = await h.get("/npm/npm/big/-/big-1.0.599.tgz")
    assert tgz.status == 200 and tgz.body == up.tarballs[("big", "1.0.599")]


@pytest_twisted.ensureDeferred
async def test_conditional_requests_from_clients_get_304(h: Harness) -> None:
    first = await h.get("/npm/npm/left-pad", {"Accept": FULL})
    etag = first.header("ETag")
    assert etag
    again = await h.get("/npm/npm/left-pad", {"Accept": FULL, "If-None-Match": etag})
    assert again.status == 304 and again.body == b""
    abbr = await h.get("/npm/npm/left-pad", {"Accept": PNPM_ACCEPT, "If-None-Match": etag})
    assert abbr.status == 200  # another form, another tag


@pytest_twisted.ensureDeferred
async def test_a_stored_packument_is_rendered_once_however_many_ask(h: Harness, up: NpmMemoryUpstream) -> None:
    from twisted.internet.defer import gatherResults
    app = h.app(b"npm")
    first = await gatherResults([h.get("/npm/npm/left-pad", {"Accept": FULL, "Accept-Encoding": "gzip"})
                                 for _ in range(5)])
    assert {r.status for r in first} == {200}
    renders = app.derived.computed
    assert renders == 1
    for _ in range(5):
        await h.get("/npm/npm/left-pad", {"Accept": FULL})
        await h.get("/npm/npm/left-pad", {"Accept": FULL, "Accept-Encoding": "gzip"})
    assert app.derived.computed == renders
    # Another public URL is another rendering; so is a changed upstream body.
    await h.get("/npm/npm/left-pad", {"Accept": FULL, "X-Forwarded-Host": "cache.example"})
    assert app.derived.computed == renders + 1
    up.publish("left-pad", "1.4.0")
    h.clock.advance(301)
    assert "1.4.0" in doc(await h.get("/npm/npm/left-pad", {"Accept": FULL}))["versions"]
    assert app.derived.computed == renders + 2


@pytest_twisted.ensureDeferred
async def test_a_tarball_hit_counts_as_a_use_for_eviction(h: Harness) -> None:
    await h.get("/npm/npm/left-pad/-/left-pad-1.0.0.tgz")
    await h.settle()
    before = (await h.store.index.get("npm:left-pad/-/left-pad-1.0.0.tgz")).last_access
    h.clock.advance(1000)
    assert (await h.get("/npm/npm/left-pad/-/left-pad-1.0.0.tgz")).header("X-Cache") == "HIT"
    await h.store.index.flush_access()
    stored = {e.key: e.last_access for e in await h.store.list("npm")}  # read back from SQLite
    assert stored["npm:left-pad/-/left-pad-1.0.0.tgz"] == before + 1000


@pytest_twisted.ensureDeferred
async def test_further_upstreams_are_tried_when_the_first_fails(harness_factory: MakeHarness,
                                                               up: NpmMemoryUpstream) -> None:
    h = await harness_factory({"remotes": {"npm": {"type": "npm", "upstream": [UPSTREAM + "/down", UPSTREAM]}}},
                              upstream=up)
    up.behave("/down/left-pad", status=503)
    d = doc(await h.get("/npm/npm/left-pad", {"Accept": FULL}))
    assert d["versions"]["1.3.0"]["dist"]["tarball"] == "http://cache.test/npm/npm/left-pad/-/left-pad-1.3.0.tgz"
    # The tarball the packument names on the second upstream; the first is tried for the same path if it fails.
    up.behave("/left-pad/-/left-pad-1.3.0.tgz", status=502)
    up.add("/down/left-pad/-/left-pad-1.3.0.tgz", up.tarballs[("left-pad", "1.3.0")])
    tgz = await h.get("/npm/npm/left-pad/-/left-pad-1.3.0.tgz")
    assert tgz.status == 200 and tgz.body == up.tarballs[("left-pad", "1.3.0")]
    assert up.count("/down/left-pad") == 1 and up.count("/down/left-pad/-/left-pad-1.3.0.tgz") == 1
