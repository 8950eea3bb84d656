"""The Go module proxy app (/go/<remote>/) on the whole daemon in memory."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.web.client import ResponseFailed

from sparkcache.protocols.go.paths import escape
from tests.support.go_modules import GREET, SAMPLE, WORDS, ModuleVersion, module_zip, proxy_tree
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401

UPSTREAM = "http://proxy.test/mod"
SUMDB = "http://sumdb.test/db"
TREE = proxy_tree(SAMPLE)
WORDS_V2 = f"{escape(WORDS)}/@v/v0.2.0"


def config(**remote: Any) -> dict[str, Any]:
    return {"remotes": {"golang": {"type": "go", "upstream": UPSTREAM, "sumdb": {"sum.golang.org": SUMDB},
                                   **remote}}}


async def proxy(harness_factory: MakeHarness, tree: dict[str, bytes] = TREE, **remote: Any) -> Harness:
    h: Harness = await harness_factory(config(**remote))
    for tail, data in tree.items():
        h.upstream.add(f"/mod/{tail}", data)
    return h


def text_error(resp: Any, status: int) -> None:
    assert resp.status == status, resp.describe()
    assert resp.header("Content-Type") == "text/plain; charset=utf-8", resp.describe()
    assert resp.body.strip() and not resp.body.lstrip().startswith((b"{", b"<")), resp.describe()


def form(h: Harness, form: str, result: str) -> float:
    value = h.metrics.registry.get_sample_value(
        "sparkcache_registry_requests_total", {"remote": "golang", "form": form, "result": result})
    return value or 0.0


@pytest_twisted.ensureDeferred
async def test_files_are_served_and_canonical_ones_kept_for_good(harness_factory: MakeHarness) -> None:
    h = await proxy(harness_factory)
    for ext in ("info", "mod", "zip"):
        resp = await h.get(f"/go/golang/{WORDS_V2}.{ext}")
        assert resp.status == 200 and resp.body == TREE[f"{WORDS_V2}.{ext}"], resp.describe()
        assert resp.header("X-Cache") == "MISS"
    await h.settle()
    h.clock.advance(10 * 365 * 86400)
    for ext in ("info", "mod", "zip"):
        resp = await h.get(f"/go/golang/{WORDS_V2}.{ext}")
        assert resp.status == 200 and resp.header("X-Cache") == "HIT", resp.describe()
        assert h.upstream.count(f"/mod/{WORDS_V2}.{ext}") == 1
    head = await h.head(f"/go/golang/{WORDS_V2}.zip")
    assert head.status == 200 and head.body == b"" and int(head.header("Content-Length")) == len(TREE[f"{WORDS_V2}.zip"])
    assert form(h, "zip", "miss") == 1 and form(h, "zip", "hit") == 2 and form(h, "mod", "hit") == 1


@pytest_twisted.ensureDeferred
async def test_list_latest_and_queries_are_mutable(harness_factory: MakeHarness) -> None:
    tree = dict(TREE)
    tree[f"{escape(GREET)}/@v/master.info"] = b'{"Version":"v1.1.0"}'
    h = await proxy(harness_factory, tree)
    for tail in ("example.com/greet/@v/list", "example.com/greet/@latest", "example.com/greet/@v/master.info"):
        first = await h.get(f"/go/golang/{tail}")
        assert first.status == 200 and first.header("X-Cache") == "MISS", first.describe()
        await h.settle()
        assert (await h.get(f"/go/golang/{tail}")).header("X-Cache") == "HIT"
    h.upstream.add("/mod/example.com/greet/@v/list", b"v1.0.0\nv1.1.0\nv1.2.0\n")
    h.clock.advance(299)
    assert (await h.get("/go/golang/example.com/greet/@v/list")).body == TREE["example.com/greet/@v/list"]
    h.clock.advance(2)  # past the go type's 300 s mutable_ttl
    resp = await h.get("/go/golang/example.com/greet/@v/list")
    assert resp.body == b"v1.0.0\nv1.1.0\nv1.2.0\n", resp.describe()
    await h.settle()
    # Stale while the upstream fails; revalidated (304) once it is back.
    h.clock.advance(301)
    h.upstream.behave("/mod/example.com/greet/@v/list", status=503, times=1)
    resp = await h.get("/go/golang/example.com/greet/@v/list")
    assert resp.status == 200 and resp.header("X-Cache") == "STALE" and b"v1.2.0" in resp.body
    resp = await h.get("/go/golang/example.com/greet/@v/list")
    assert resp.status == 200 and resp.header("X-Cache") == "REVALIDATED", resp.describe()
    assert h.upstream.requests_for("/mod/example.com/greet/@v/list")[-1].header("if-none-match")


@pytest_twisted.ensureDeferred
async def test_not_found_is_a_plain_text_404_cached_briefly(harness_factory: MakeHarness) -> None:
    h = await proxy(harness_factory)
    for tail in ("example.com/@v/list", "example.com/nothing/@v/v1.0.0.info"):
        text_error(await h.get(f"/go/golang/{tail}"), 404)
        text_error(await h.get(f"/go/golang/{tail}"), 404)
        assert h.upstream.count(f"/mod/{tail}") == 1
    h.clock.advance(61)
    text_error(await h.get("/go/golang/example.com/@v/list"), 404)
    assert h.upstream.count("/mod/example.com/@v/list") == 2
    h.upstream.behave("/mod/example.com/gone/@v/list", status=410)
    resp = await h.get("/go/golang/example.com/gone/@v/list")
    assert resp.status in (404, 410) and resp.header("Content-Type") == "text/plain; charset=utf-8"
    # Other upstream failures are errors, not "not found" (go must not fall through on them).
    h.upstream.behave("/mod/example.com/broken/@v/list", status=500)
    text_error(await h.get("/go/golang/example.com/broken/@v/list"), 502)


@pytest_twisted.ensureDeferred
async def test_bad_input_is_refused_before_any_fetch(harness_factory: MakeHarness) -> None:
    h = await proxy(harness_factory)
    for tail in ("Example.com/x/@v/list", "example.com/X/@v/list", "example.com/x/@v/v1.0.0.tar",
                 "example.com/x/@v/..%2f..%2fetc.info", "example.com/x/@v/master.zip", "example.com/../x/@v/list",
                 "example.com/" + "a" * 600 + "/@v/list", "localhost/@v/list", "example.com/x/@v/%2e%2e.info",
                 "sumdb/sum.golang.org/lookup/Example.com/x@v1.0.0", "sumdb/evil.test/supported",
                 "sumdb/sum.golang.org/tile/8/0/../../x", "sumdb/sum.golang.org/../../etc/passwd"):
        resp = await h.get(f"/go/golang/{tail}")
        assert 400 <= resp.status < 500, (tail, resp.describe())
        assert resp.header("Content-Type") == "text/plain; charset=utf-8", (tail, resp.describe())
    for path in ("/go/nothing/example.com/x/@v/list", "/go/", "/go/golang/example.com/x/@v/list?x=1"):
        resp = await h.get(path)
        assert 400 <= resp.status < 500 and resp.header("Content-Type") == "text/plain; charset=utf-8", path
    text_error(await h.request("PUT", f"/go/golang/{WORDS_V2}.zip", b"x"), 405)
    assert h.upstream.requests == []
    assert await h.store.list("golang") == []


@pytest_twisted.ensureDeferred
async def test_a_zip_that_is_no_module_zip_is_never_stored(harness_factory: MakeHarness) -> None:
    tree = dict(TREE)
    evil = ModuleVersion(WORDS, "v0.2.0", {"go.mod": b"module example.com/Upper/words\n", "../../x.go": b"x"})
    tree[f"{WORDS_V2}.zip"] = module_zip(evil, prefix="example.com/Upper/words@v0.2.0/")
    h = await proxy(harness_factory, tree)
    try:
        resp = await h.get(f"/go/golang/{WORDS_V2}.zip")
        assert resp.status != 200, resp.describe()
    except ResponseFailed:
        pass  # the transfer was cut off before its last byte
    await h.settle()
    assert [e.path for e in await h.store.list("golang")] == []
    # A wrong module in the zip, and a zip whose go.mod contradicts the stored .mod.
    h.upstream.add(f"/mod/{WORDS_V2}.zip", module_zip(SAMPLE[0]))
    assert await _broken(h, f"/go/golang/{WORDS_V2}.zip")
    assert (await h.get(f"/go/golang/{WORDS_V2}.mod")).status == 200
    await h.settle()
    forged = ModuleVersion(WORDS, "v0.2.0", {**SAMPLE[1].files, "go.mod": b"module example.com/Upper/words\n// x\n"})
    h.upstream.add(f"/mod/{WORDS_V2}.zip", module_zip(forged))
    assert await _broken(h, f"/go/golang/{WORDS_V2}.zip")
    h.upstream.add(f"/mod/{WORDS_V2}.zip", TREE[f"{WORDS_V2}.zip"])
    assert (await h.get(f"/go/golang/{WORDS_V2}.zip")).status == 200
    await h.settle()
    assert sorted(e.path for e in await h.store.list("golang")) == [f"{WORDS_V2}.mod", f"{WORDS_V2}.zip"]


@pytest_twisted.ensureDeferred
async def test_a_mod_that_contradicts_the_stored_zip_is_never_stored(harness_factory: MakeHarness) -> None:
    tree = dict(TREE)
    tree[f"{WORDS_V2}.mod"] = b"module example.com/Upper/words\n\nrequire evil.example v1.0.0\n"
    h = await proxy(harness_factory, tree)
    assert (await h.get(f"/go/golang/{WORDS_V2}.zip")).status == 200
    await h.settle()
    assert await _broken(h, f"/go/golang/{WORDS_V2}.mod")
    assert [e.path for e in await h.store.list("golang")] == [f"{WORDS_V2}.zip"]


async def _broken(h: Harness, path: str) -> bool:
    """Whether the client never got a whole 200 for ``path`` (and nothing was committed)."""
    try:
        resp = await h.get(path)
        ok = resp.status != 200
    except ResponseFailed:
        ok = True
    await h.settle()
    return ok


# -- the checksum database -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sumdb_is_proxied_for_allow_listed_names(harness_factory: MakeHarness) -> None:
    h = await proxy(harness_factory, credentials={"username": "u", "password": "secret"})
    lookup = b"42\nexample.com/greet v1.1.0 h1:x=\nexample.com/greet v1.1.0/go.mod h1:y=\n\nsigned tree\n"
    h.upstream.add("/db/lookup/example.com/greet@v1.1.0", lookup)
    h.upstream.add("/db/tile/8/0/000.p/43", b"\x00" * 32 * 43)
    h.upstream.add("/db/latest", b"go.sum database tree\n43\nroot=\n")
    resp = await h.get("/go/golang/sumdb/sum.golang.org/supported")
    assert resp.status == 200 and resp.body == b""
    for _ in range(2):
        resp = await h.get("/go/golang/sumdb/sum.golang.org/lookup/example.com/greet@v1.1.0")
        assert resp.status == 200 and resp.body == lookup
        resp = await h.get("/go/golang/sumdb/sum.golang.org/tile/8/0/000.p/43")
        assert resp.status == 200 and len(resp.body) == 32 * 43
        resp = await h.get("/go/golang/sumdb/sum.golang.org/latest")
        assert resp.status == 200 and resp.body.startswith(b"go.sum database tree")
        await h.settle()
    assert h.upstream.count("/db/latest") == 2  # asked every time ...
    h.upstream.behave("/db/latest", status=503)
    resp = await h.get("/go/golang/sumdb/sum.golang.org/latest")
    assert resp.status == 200 and resp.header("X-Cache") == "STALE"  # ... and served stale when it cannot be
    h.clock.advance(10 * 365 * 86400)
    assert (await h.get("/go/golang/sumdb/sum.golang.org/tile/8/0/000.p/43")).header("X-Cache") == "HIT"
    assert h.upstream.count("/db/lookup/example.com/greet@v1.1.0") == 1
    assert h.upstream.count("/db/tile/8/0/000.p/43") == 1
    # The remote's credentials are for its GOPROXY upstream, never for the database.
    assert all(r.header("authorization") is None for r in h.upstream.requests if r.path.startswith("/db/"))
    text_error(await h.get("/go/golang/sumdb/sum.golang.google.cn/supported"), 404)
    text_error(await h.get("/go/golang/sumdb/sum.golang.org/lookup/example.com/greet@master"), 404)
    assert all(r.path.startswith("/db/") for r in h.upstream.requests)
    assert form(h, "sumdb", "hit") >= 2


@pytest_twisted.ensureDeferred
async def test_sumdb_off_answers_not_supported(harness_factory: MakeHarness) -> None:
    h: Harness = await harness_factory({"remotes": {"golang": {"type": "go", "upstream": UPSTREAM, "sumdb": False}}})
    text_error(await h.get("/go/golang/sumdb/sum.golang.org/supported"), 404)
    text_error(await h.get("/go/golang/sumdb/sum.golang.org/latest"), 404)
    assert h.upstream.requests == []


# -- /setup/go -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_setup_prints_go_env_lines(harness_factory: MakeHarness) -> None:
    h: Harness = await harness_factory({"remotes": {
        "golang": {"type": "go", "upstream": UPSTREAM},
        "private": {"type": "go", "upstream": UPSTREAM, "sumdb": False},
    }})
    resp = await h.get("/setup/go")
    assert resp.status == 200, resp.describe()
    text = resp.body.decode()
    assert "go env -w GOPROXY=http://cache.test/go/golang\n" in text
    assert "go env -w GOSUMDB=sum.golang.org\n" in text
    assert ",direct" not in text
    other = (await h.get("/setup/go?remote=private")).body.decode()
    assert "GOPROXY=http://cache.test/go/private\n" in other and "proxies no checksum database" in other
    assert (await h.get("/setup/go?remote=nope")).status == 404
    listing = json.loads((await h.get("/")).body)
    assert "/go/golang/" in json.dumps(listing)
