"""The cargo app (``/cargo/<remote>/``) over in-memory HTTP through the daemon's
real root, against an in-memory upstream sparse registry: config.json
rewrite, index files (TTL, revalidation, 304s), crates verified against
their index line's cksum, upstream's dl template, errors in cargo's form,
bad input, metrics and /setup/cargo."""

from __future__ import annotations

import email.utils
import hashlib
import json
from typing import Any

import pytest
import pytest_twisted

from sparkcache.protocols.cargo import names
from tests.support.client import Response
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401

DL_HOST = "http://dl.test"
CRATE_A = b"\x1f\x8b crate a " * 300
CRATE_B = b"\x1f\x8b crate b " * 200
CONFIG: dict[str, Any] = {
    "remotes": {"crates": {"type": "cargo", "upstream": UPSTREAM + "/index",
                           "cache": {"mutable_ttl": "60s", "negative_ttl": "30s"}}},
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def index_line(name: str, vers: str, data: bytes, **more: Any) -> str:
    return json.dumps({"name": name, "vers": vers, "deps": [], "cksum": sha(data), "features": {},
                       "yanked": False, **more})


def publish(h: Harness, name: str, versions: dict[str, bytes], dl: str = DL_HOST + "/files/{crate}/{version}") -> None:
    """Put ``name``'s index file, its crates and a config.json on the upstream."""
    h.upstream.add("/index/config.json", json.dumps({"dl": dl, "api": "https://registry.example"}).encode(),
                   content_type="application/json")
    lines = "\n".join(index_line(name, v, d) for v, d in versions.items()) + "\n"
    h.upstream.add("/index/" + names.index_path(name), lines.encode(), content_type="text/plain")
    for v, d in versions.items():
        url = dl.replace("{crate}", name).replace("{version}", v).replace("{sha256-checksum}", sha(d)) \
            .replace("{lowerprefix}", names.prefix(name.lower())).replace("{prefix}", names.prefix(name))
        if not any(m in dl for m in ("{crate}", "{version}", "{prefix}", "{lowerprefix}", "{sha256-checksum}")):
            url = f"{dl}/{name}/{v}/download"
        h.upstream.add(url.removeprefix(DL_HOST).removeprefix(UPSTREAM), d, content_type="application/gzip")


async def get(h: Harness, path: str, headers: dict[str, str] | None = None) -> Response:
    """GET, then wait for any fetch it started to be committed or dropped."""
    resp = await h.get(path, headers)
    await h.settle()
    return resp


def cargo_error(resp: Response, status: int) -> str:
    """The detail of an error in cargo's form, ``{"errors": [{"detail": ...}]}``."""
    assert resp.status == status, resp.describe()
    assert (resp.header("Content-Type") or "").startswith("application/json"), resp.describe()
    doc = resp.json()
    assert set(doc) == {"errors"} and isinstance(doc["errors"][0]["detail"], str), resp.describe()
    return str(doc["errors"][0]["detail"])


def form_count(h: Harness, form: str, result: str) -> float:
    want = f'sparkcache_registry_requests_total{{form="{form}",remote="crates",result="{result}"}} '
    for line in h.metrics.render().decode().splitlines():
        if line.startswith(want):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


# -- config.json -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_config_json_points_dl_at_the_cache(h: Harness) -> None:
    up = {"dl": DL_HOST + "/{crate}", "api": "https://registry.example", "auth-required": True}
    h.upstream.add("/index/config.json", json.dumps(up).encode(), content_type="application/json")
    resp = await get(h, "/cargo/crates/index/config.json")
    assert resp.status == 200, resp.describe()
    assert resp.json() == {"dl": f"{h.base_url}/cargo/crates/crates/{{crate}}/{{version}}/download",
                           "auth-required": True}
    assert resp.header("X-Cache") == "MISS"
    # behind a TLS proxy the URL is the one clients see; the stored body is upstream's exactly
    resp = await get(h, "/cargo/crates/index/config.json",
                       {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "cache.example"})
    assert resp.json()["dl"].startswith("https://cache.example/cargo/crates/crates/")
    assert resp.header("X-Cache") == "HIT"
    assert h.upstream.count("/index/config.json") == 1
    entry = await h.store.index.get("crates:index/config.json")
    assert entry is not None and entry.digest == sha(json.dumps(up).encode())
    assert form_count(h, "config", "miss") == 1 and form_count(h, "config", "hit") == 1


@pytest_twisted.ensureDeferred
async def test_config_without_a_usable_dl_is_a_502_never_upstreams_url(h: Harness) -> None:
    h.upstream.add("/index/config.json", b'{"dl": "file:///etc/passwd"}')
    assert "dl" in cargo_error(await get(h, "/cargo/crates/index/config.json"), 502)
    h.upstream.add("/index/config.json", b"<html>not json</html>")
    h.clock.advance(61)
    assert "config.json" in cargo_error(await get(h, "/cargo/crates/index/config.json"), 502)


# -- index files ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_index_files_are_served_as_stored_with_ttl_and_revalidation(h: Harness) -> None:
    publish(h, "serde", {"1.0.0": CRATE_A})
    body = h.upstream.files["/index/se/rd/serde"].data
    first = await get(h, "/cargo/crates/index/se/rd/serde")
    assert first.status == 200 and first.body == body and first.header("X-Cache") == "MISS"
    again = await get(h, "/cargo/crates/index/se/rd/serde")
    assert again.body == body and again.header("X-Cache") == "HIT"
    assert h.upstream.count("/index/se/rd/serde") == 1
    h.clock.advance(61)
    third = await get(h, "/cargo/crates/index/se/rd/serde")
    assert third.header("X-Cache") == "REVALIDATED" and third.body == body
    asked = h.upstream.requests_for("/index/se/rd/serde")[-1]
    assert asked.header("if-none-match") and asked.status == 304
    # a new version upstream shows once the TTL is up
    publish(h, "serde", {"1.0.0": CRATE_A, "1.0.1": CRATE_B})
    h.clock.advance(61)
    fourth = await get(h, "/cargo/crates/index/se/rd/serde")
    assert b'"1.0.1"' in fourth.body
    assert form_count(h, "index", "revalidated") == 1 and form_count(h, "index", "hit") == 1


@pytest_twisted.ensureDeferred
async def test_cargos_conditional_requests_get_304_against_the_stored_entry(h: Harness) -> None:
    publish(h, "abc", {"1.0.0": CRATE_A})
    first = await get(h, "/cargo/crates/index/3/a/abc")
    etag, modified = first.header("ETag"), first.header("Last-Modified")
    assert etag and modified
    await get(h, "/cargo/crates/index/3/a/abc")  # now a stored hit
    same = await get(h, "/cargo/crates/index/3/a/abc", {"If-None-Match": etag})
    assert same.status == 304 and same.body == b"" and same.header("ETag") == etag
    other = await get(h, "/cargo/crates/index/3/a/abc", {"If-None-Match": '"something-else"'})
    assert other.status == 200 and other.body == first.body
    # If-Modified-Since (cargo's question when it got no ETag): 304 unless changed after it
    assert (await get(h, "/cargo/crates/index/3/a/abc", {"If-Modified-Since": modified})).status == 304
    earlier = email.utils.formatdate(email.utils.parsedate_to_datetime(modified).timestamp() - 10, usegmt=True)
    assert (await get(h, "/cargo/crates/index/3/a/abc", {"If-Modified-Since": earlier})).status == 200
    assert (await get(h, "/cargo/crates/index/3/a/abc", {"If-Modified-Since": "yesterday"})).status == 200
    # If-None-Match wins over If-Modified-Since
    both = await get(h, "/cargo/crates/index/3/a/abc", {"If-None-Match": '"x"', "If-Modified-Since": modified})
    assert both.status == 200
    # after the upstream changed, the old validators no longer match
    publish(h, "abc", {"1.0.0": CRATE_A, "1.1.0": CRATE_B})
    h.clock.advance(61)
    changed = await get(h, "/cargo/crates/index/3/a/abc", {"If-None-Match": etag})
    assert changed.status == 200 and b'"1.1.0"' in changed.body
    assert h.upstream.count("/index/3/a/abc") == 2


@pytest.mark.parametrize("status", [404, 410, 451])
@pytest_twisted.ensureDeferred
async def test_missing_crates_pass_through_and_are_cached_briefly(h: Harness, status: int) -> None:
    h.upstream.behave("/index/no/pe/nope", status=status)
    resp = await get(h, "/cargo/crates/index/no/pe/nope")
    # 410 means what 404 does to cargo (and the cache); 451 keeps its status
    assert resp.status == (451 if status == 451 else 404), resp.describe()
    cargo_error(resp, resp.status)
    assert (await get(h, "/cargo/crates/index/no/pe/nope")).status == resp.status
    assert h.upstream.count("/index/no/pe/nope") == 1  # remembered for negative_ttl
    h.clock.advance(31)
    await get(h, "/cargo/crates/index/no/pe/nope")
    assert h.upstream.count("/index/no/pe/nope") == 2


@pytest_twisted.ensureDeferred
async def test_stale_index_is_served_when_upstream_fails(h: Harness) -> None:
    publish(h, "abcd", {"1.0.0": CRATE_A})
    body = (await get(h, "/cargo/crates/index/ab/cd/abcd")).body
    h.clock.advance(61)
    h.upstream.behave("/index/ab/cd/abcd", status=503)
    stale = await get(h, "/cargo/crates/index/ab/cd/abcd")
    assert stale.status == 200 and stale.body == body and stale.header("X-Cache") == "STALE"


# -- crates -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_crate_is_fetched_from_upstreams_dl_verified_and_kept(h: Harness) -> None:
    publish(h, "serde", {"1.0.0": CRATE_A, "1.0.1": CRATE_B})
    await get(h, "/cargo/crates/index/se/rd/serde")
    resp = await get(h, "/cargo/crates/crates/serde/1.0.0/download")
    assert resp.status == 200 and resp.body == CRATE_A, resp.describe()
    assert 'filename="serde-1.0.0.crate"' in (resp.header("Content-Disposition") or "")
    asked = h.upstream.requests_for("/files/serde/1.0.0")
    assert len(asked) == 1 and asked[0].header("host") == "dl.test"
    await h.settle()
    again = await get(h, "/cargo/crates/crates/serde/1.0.0/download")
    assert again.body == CRATE_A and again.header("X-Cache") == "HIT"
    # immutable: no revalidation, however long
    h.clock.advance(10 * 86400)
    assert (await get(h, "/cargo/crates/crates/serde/1.0.0/download")).header("X-Cache") == "HIT"
    assert h.upstream.count("/files/serde/1.0.0") == 1
    assert form_count(h, "crate", "miss") == 1 and form_count(h, "crate", "hit") == 2


@pytest.mark.parametrize("dl", [
    DL_HOST + "/api/v1/crates",                                         # no marker: /{crate}/{version}/download
    DL_HOST + "/{prefix}/{crate}/{crate}-{version}.crate",
    DL_HOST + "/{lowerprefix}/{crate}-{version}.crate",
    DL_HOST + "/by-sum/{sha256-checksum}",
    UPSTREAM + "/index/dl/{crate}/{version}",                           # on the index's own host
])
@pytest_twisted.ensureDeferred
async def test_every_dl_marker_reaches_upstreams_file(h: Harness, dl: str) -> None:
    publish(h, "Inflector", {"0.11.4": CRATE_A}, dl=dl)
    resp = await get(h, "/cargo/crates/crates/Inflector/0.11.4/download")
    assert resp.status == 200 and resp.body == CRATE_A, resp.describe() + "\n" + h.upstream.describe()


@pytest_twisted.ensureDeferred
async def test_crate_without_a_stored_index_fetches_the_index_first(h: Harness) -> None:
    publish(h, "abc", {"1.0.0": CRATE_A})
    resp = await get(h, "/cargo/crates/crates/abc/1.0.0/download")
    assert resp.status == 200 and resp.body == CRATE_A
    assert h.upstream.count("/index/3/a/abc") == 1 and h.upstream.count("/index/config.json") == 1


@pytest_twisted.ensureDeferred
async def test_tampered_crate_is_refused_and_nothing_is_kept(h: Harness) -> None:
    publish(h, "serde", {"1.0.0": CRATE_A})
    h.upstream.add("/files/serde/1.0.0", CRATE_A[:-1] + b"X")
    resp = await get(h, "/cargo/crates/crates/serde/1.0.0/download")
    # the last byte is held back until the digest matched: the body never arrives whole
    assert resp.status != 200 or resp.body != CRATE_A[:-1] + b"X"
    await h.settle()
    assert [e for e in await h.store.list("crates") if e.path.startswith("crates/")] == []
    # fixed upstream: fetched again and kept
    h.upstream.add("/files/serde/1.0.0", CRATE_A)
    ok = await get(h, "/cargo/crates/crates/serde/1.0.0/download")
    assert ok.status == 200 and ok.body == CRATE_A
    assert h.upstream.count("/files/serde/1.0.0") == 2


@pytest_twisted.ensureDeferred
async def test_crate_not_in_the_index_is_a_404_and_never_fetched(h: Harness) -> None:
    publish(h, "serde", {"1.0.0": CRATE_A})
    h.upstream.add("/files/serde/9.9.9", CRATE_B)
    h.upstream.add("/files/Serde/1.0.0", CRATE_B)
    assert "not in the index" in cargo_error(await get(h, "/cargo/crates/crates/serde/9.9.9/download"), 404)
    # names are matched exactly against the index line
    cargo_error(await get(h, "/cargo/crates/crates/Serde/1.0.0/download"), 404)
    assert h.upstream.count("/files/serde/9.9.9") == 0 and h.upstream.count("/files/Serde/1.0.0") == 0
    h.upstream.behave("/index/no/pe/nope", status=404)
    cargo_error(await get(h, "/cargo/crates/crates/nope/1.0.0/download"), 404)


@pytest_twisted.ensureDeferred
async def test_republished_version_is_a_new_entry(h: Harness) -> None:
    publish(h, "abc", {"1.0.0": CRATE_A})
    assert (await get(h, "/cargo/crates/crates/abc/1.0.0/download")).body == CRATE_A
    await h.settle()
    publish(h, "abc", {"1.0.0": CRATE_B})
    h.clock.advance(61)
    await get(h, "/cargo/crates/index/3/a/abc")
    assert (await get(h, "/cargo/crates/crates/abc/1.0.0/download")).body == CRATE_B


# -- bad input and errors ------------------------------------------------------------------


@pytest.mark.parametrize("path, status", [
    ("/cargo/crates/index/se/rd/Serde", 400),
    ("/cargo/crates/index/se/xx/serde", 400),
    ("/cargo/crates/index/1/ab", 400),
    ("/cargo/crates/index/se/rd/se.de", 400),
    ("/cargo/crates/index/ab/cd/" + "abcd" * 20, 400),
    ("/cargo/crates/index/%2e%2e/etc/passwd", 400),
    ("/cargo/crates/index/se/rd/..", 400),
    ("/cargo/crates/index/se/rd/serde%2f..", 400),
    ("/cargo/crates/crates/serde/1.0/download", 400),
    ("/cargo/crates/crates/serde/../download", 400),
    ("/cargo/crates/crates/-x/1.0.0/download", 400),
    ("/cargo/crates/crates/serde/1.0.0/other", 404),
    ("/cargo/crates/crates/serde/1.0.0", 404),
    ("/cargo/crates/elsewhere", 404),
    ("/cargo/crates/", 404),
    ("/cargo/crates/index/", 404),
    ("/cargo/nope/index/config.json", 404),
    ("/cargo/", 404),
])
@pytest_twisted.ensureDeferred
async def test_bad_input_is_a_4xx_in_cargos_form_and_reaches_no_upstream(h: Harness, path: str, status: int) -> None:
    cargo_error(await get(h, path), status)
    assert h.upstream.total() == 0
    assert await h.store.list("crates") == []


@pytest_twisted.ensureDeferred
async def test_the_cache_is_read_only(h: Harness) -> None:
    for method in ("PUT", "POST", "DELETE"):
        resp = await h.request(method, "/cargo/crates/index/se/rd/serde", b"x")
        cargo_error(resp, 405)
        assert resp.header("Allow") == "GET, HEAD"


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_is_a_502_in_cargos_form(h: Harness) -> None:
    h.upstream.behave("/index/3/a/abc", reset=True)
    cargo_error(await get(h, "/cargo/crates/index/3/a/abc"), 502)


@pytest_twisted.ensureDeferred
async def test_reads_need_the_read_scope(harness_factory: MakeHarness) -> None:
    h = await harness_factory({**CONFIG, "auth": {"anonymous_read": False,
                                                  "tokens": [{"name": "ci", "token": "t-1", "scopes": ["read"]}]}})
    publish(h, "abc", {"1.0.0": CRATE_A})
    cargo_error(await get(h, "/cargo/crates/index/3/a/abc"), 401)
    assert h.upstream.total() == 0
    ok = await get(h, "/cargo/crates/index/3/a/abc", {"Authorization": "Bearer t-1"})
    assert ok.status == 200


# -- /setup/cargo -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_setup_snippets(h: Harness) -> None:
    mirror = await get(h, "/setup/cargo")
    assert mirror.status == 200 and mirror.header("X-Install-Path") == "~/.cargo/config.toml"
    text = mirror.body.decode()
    assert '[source.crates-io]\nreplace-with = "sparkcache"' in text
    assert f'registry = "sparse+{h.base_url}/cargo/crates/index/"' in text
    named = (await get(h, "/setup/cargo?mode=registry&remote=crates")).body.decode()
    assert '[registries."crates"]' in named and f'index = "sparse+{h.base_url}/cargo/crates/index/"' in named
    assert (await get(h, "/setup/cargo?remote=nope")).status == 404
    assert (await get(h, "/setup/cargo?mode=other")).status == 400


@pytest_twisted.ensureDeferred
async def test_head_and_shared_fetches(h: Harness) -> None:
    publish(h, "serde", {"1.0.0": CRATE_A, "1.0.1": CRATE_B})
    head = await h.head("/cargo/crates/index/se/rd/serde")
    assert head.status == 200 and head.body == b""
    # concurrent downloads of one crate share one upstream fetch; config.json is fetched once for all crates
    both = [h.get("/cargo/crates/crates/serde/1.0.0/download") for _ in range(3)]
    both.append(h.get("/cargo/crates/crates/serde/1.0.1/download"))
    got = [await d for d in both]
    await h.settle()
    assert [r.body for r in got] == [CRATE_A, CRATE_A, CRATE_A, CRATE_B]
    assert h.upstream.count("/files/serde/1.0.0") == 1 and h.upstream.count("/index/config.json") == 1
    head = await h.head("/cargo/crates/crates/serde/1.0.0/download")
    assert head.status == 200 and head.body == b"" and head.header("X-Cache") == "HIT"


@pytest_twisted.ensureDeferred
async def test_crate_of_a_registry_without_config_json_is_a_404(h: Harness) -> None:
    h.upstream.add("/index/3/a/abc", (index_line("abc", "1.0.0", CRATE_A) + "\n").encode())
    h.upstream.add("/files/abc/1.0.0", CRATE_A)
    assert "config.json" in cargo_error(await get(h, "/cargo/crates/crates/abc/1.0.0/download"), 404)
    cargo_error(await get(h, "/cargo/crates/index/config.json"), 404)
    assert h.upstream.count("/files/abc/1.0.0") == 0


@pytest_twisted.ensureDeferred
async def test_crates_need_no_fresh_config_json(h: Harness) -> None:
    publish(h, "serde", {"1.0.0": CRATE_A, "1.0.1": CRATE_B})
    assert (await get(h, "/cargo/crates/crates/serde/1.0.0/download")).body == CRATE_A
    h.clock.advance(3600)  # config.json and the index file are stale now
    h.upstream.behave("/index/config.json", status=503)
    # a stored crate is served from the store; another one takes dl from the stored config.json
    assert (await get(h, "/cargo/crates/crates/serde/1.0.0/download")).header("X-Cache") == "HIT"
    assert (await get(h, "/cargo/crates/crates/serde/1.0.1/download")).body == CRATE_B
    assert h.upstream.count("/index/config.json") == 1
    # cargo's own config.json request revalidates it (served stale while upstream fails)
    assert (await get(h, "/cargo/crates/index/config.json")).header("X-Cache") == "STALE"
