"""``type: npm-local`` (publish, dist-tags, whoami) and ``type: npm-group``
(first member that has a name wins: the dependency-confusion guard), over
in-memory HTTP through the daemon's real root."""

from __future__ import annotations

import base64
import os
import json
from typing import Any

import pytest
import pytest_twisted

from tests.support.client import Response
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401
from tests.support.npm_packages import (
    NpmMemoryUpstream, make_tarball, npm_error, packument_of as doc, publish_body,
)

READ, WRITE = "rd-npm-1", "wr-npm-2"
TOKENS = [{"name": "reader", "token": READ, "scopes": ["read"]},
          {"name": "ci-publisher", "token": WRITE, "scopes": ["read", "write"]}]
CONFIG: dict[str, Any] = {
    "auth": {"anonymous_read": True, "tokens": TOKENS},
    "remotes": {
        "npm": {"type": "npm", "upstream": UPSTREAM},
        "internal": {"type": "npm-local"},
        "all": {"type": "npm-group", "members": ["internal", "npm"]},
    },
}
AUTH = {"Authorization": f"Bearer {WRITE}", "Content-Type": "application/json"}
FULL = {"Accept": "application/json"}
ABBR = {"Accept": "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"}


@pytest.fixture
def up() -> NpmMemoryUpstream:
    u = NpmMemoryUpstream()
    u.publish("left-pad", "1.3.0")
    u.publish("@team/util", "9.0.0")  # the public package an attacker published under the internal name
    return u


@pytest.fixture
def h(harness_factory: MakeHarness, up: NpmMemoryUpstream) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG, upstream=up))




async def publish(h: Harness, name: str, version: str, body: dict[str, Any] | None = None,
                  headers: dict[str, str] | None = None) -> Response:
    body = body or publish_body(name, version, make_tarball(name, version))
    path = "/npm/internal/" + name.replace("/", "%2f")
    return await h.put(path, json.dumps(body).encode(), headers or AUTH)


@pytest_twisted.ensureDeferred
async def test_publish_then_install_from_the_local_remote(h: Harness) -> None:
    data = make_tarball("@team/util", "1.0.0")
    resp = await publish(h, "@team/util", "1.0.0", publish_body("@team/util", "1.0.0", data))
    assert resp.status == 201, resp.describe()
    d = doc(await h.get("/npm/internal/@team%2futil", FULL))
    assert d["dist-tags"] == {"latest": "1.0.0"}
    assert d["versions"]["1.0.0"]["dist"]["tarball"] == "http://cache.test/npm/internal/@team/util/-/util-1.0.0.tgz"
    assert "_attachments" not in d
    a = doc(await h.get("/npm/internal/@team/util", ABBR))
    assert set(a) == {"name", "modified", "dist-tags", "versions"}
    assert (await h.get("/npm/internal/@team/util", ABBR)).header("Content-Type") == \
        "application/vnd.npm.install-v1+json"
    tgz = await h.get("/npm/internal/@team/util/-/util-1.0.0.tgz")
    assert tgz.status == 200 and tgz.body == data
    entries = {e.key: e for e in await h.store.list("internal")}
    assert entries and all(e.pinned for e in entries.values())
    # A second version merges with the first.
    assert (await publish(h, "@team/util", "1.1.0")).status == 201
    d = doc(await h.get("/npm/internal/@team%2Futil", FULL))
    assert sorted(d["versions"]) == ["1.0.0", "1.1.0"] and d["dist-tags"]["latest"] == "1.1.0"


@pytest_twisted.ensureDeferred
async def test_an_internal_name_hides_the_upstreams_package_in_a_group(h: Harness, up: NpmMemoryUpstream) -> None:
    # Before the internal package exists, the group serves upstream's.
    before = doc(await h.get("/npm/all/@team%2futil", FULL))
    assert list(before["versions"]) == ["9.0.0"]
    assert before["versions"]["9.0.0"]["dist"]["tarball"].startswith("http://cache.test/npm/npm/")
    assert (await publish(h, "@team/util", "1.0.0")).status == 201
    for headers in (FULL, ABBR):
        resp = await h.get("/npm/all/@team%2futil", headers)
        d = doc(resp)
        assert list(d["versions"]) == ["1.0.0"], "upstream's higher version must not be merged in"
        assert d["versions"]["1.0.0"]["dist"]["tarball"] == \
            "http://cache.test/npm/internal/@team/util/-/util-1.0.0.tgz"
        assert resp.header("X-Npm-Member") == "internal"
    # Through the group, a tarball of the name comes from the internal member only.
    assert (await h.get("/npm/all/@team/util/-/util-1.0.0.tgz")).status == 200
    assert (await h.get("/npm/all/@team/util/-/util-9.0.0.tgz")).status == 404
    # Public names still come through.
    assert "1.3.0" in doc(await h.get("/npm/all/left-pad", FULL))["versions"]
    assert (await h.get("/npm/all/left-pad/-/left-pad-1.3.0.tgz")).status == 200


@pytest_twisted.ensureDeferred
async def test_a_failing_earlier_member_is_not_skipped(harness_factory: MakeHarness, up: NpmMemoryUpstream) -> None:
    cfg = {"remotes": {"npm": {"type": "npm", "upstream": UPSTREAM},
                       "second": {"type": "npm", "upstream": UPSTREAM + "/b"},
                       "g": {"type": "npm-group", "members": ["npm", "second"]}}}
    h = await harness_factory(cfg, upstream=up)
    up.add("/b/left-pad", json.dumps({"name": "left-pad", "versions": {}}).encode(), "application/json")
    up.behave("/left-pad", status=503)
    assert (await h.get("/npm/g/left-pad", FULL)).status == 502
    assert up.count("/b/left-pad") == 0


@pytest_twisted.ensureDeferred
async def test_republishing_a_version_is_refused(h: Harness) -> None:
    assert (await publish(h, "left-pad", "1.0.0")).status == 201
    other = make_tarball("left-pad", "1.0.0", files={"b": b"2"})
    again = await publish(h, "left-pad", "1.0.0", publish_body("left-pad", "1.0.0", other))
    assert "previously published" in npm_error(again, 403)
    tgz = await h.get("/npm/internal/left-pad/-/left-pad-1.0.0.tgz")
    assert tgz.body == make_tarball("left-pad", "1.0.0")


def _tampered() -> dict[str, Any]:
    body = publish_body("evil", "1.0.0", make_tarball("evil", "1.0.0"))
    body["_attachments"]["evil-1.0.0.tgz"]["data"] = base64.b64encode(make_tarball("evil", "6.6.6")).decode()
    del body["_attachments"]["evil-1.0.0.tgz"]["length"]
    return body


def _mismatched_name() -> dict[str, Any]:
    body = publish_body("evil", "1.0.0", make_tarball("evil", "1.0.0"))
    body["name"] = "other"
    return body


def _no_attachment() -> dict[str, Any]:
    body = publish_body("evil", "1.0.0", make_tarball("evil", "1.0.0"))
    body["_attachments"] = {}
    return body


def _traversal_attachment() -> dict[str, Any]:
    body = publish_body("evil", "1.0.0", make_tarball("evil", "1.0.0"))
    body["_attachments"] = {"../../x.tgz": body["_attachments"]["evil-1.0.0.tgz"]}
    return body


def _bad_base64() -> dict[str, Any]:
    body = publish_body("evil", "1.0.0", make_tarball("evil", "1.0.0"))
    body["_attachments"]["evil-1.0.0.tgz"]["data"] = "!!!not base64!!!"
    return body


@pytest.mark.parametrize("make,status,words", [
    (_tampered, 400, "integrity"), (_mismatched_name, 400, "URL names"), (_no_attachment, 400, "no tarball"),
    (_traversal_attachment, 400, "invalid attachment name"), (_bad_base64, 400, "base64"),
])
@pytest_twisted.ensureDeferred
async def test_malformed_publishes_are_refused_and_store_nothing(h: Harness, make: Any, status: int,
                                                               words: str) -> None:
    resp = await publish(h, "evil", "1.0.0", make())
    assert words in npm_error(resp, status)
    assert await h.store.list("internal") == []
    assert not os.listdir(h.store.spool_dir)


@pytest_twisted.ensureDeferred
async def test_publish_needs_the_write_scope_and_a_local_remote(h: Harness) -> None:
    body = json.dumps(publish_body("x", "1.0.0", make_tarball("x", "1.0.0"))).encode()
    assert npm_error(await h.put("/npm/internal/x", body, {"Content-Type": "application/json"}), 401)
    assert "write" in npm_error(await h.put("/npm/internal/x", body, {"Authorization": f"Bearer {READ}"}), 403)
    assert "npm-local" in npm_error(await h.put("/npm/npm/x", body, AUTH), 405)
    assert "npm-local" in npm_error(await h.put("/npm/all/x", body, AUTH), 405)
    assert npm_error(await h.put("/npm/internal/x", b"{not json", AUTH), 400)
    assert await h.store.list("internal") == []


@pytest_twisted.ensureDeferred
async def test_an_oversize_publish_is_refused_before_it_is_stored(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    from sparkcache.protocols.npm import publish as publish_module
    resp = await h.put("/npm/internal/x", b"{" + b" " * (publish_module.MAX_PUBLISH + 10) + b"}", AUTH)
    assert npm_error(resp, 413)
    assert await h.store.list("internal") == []


@pytest_twisted.ensureDeferred
async def test_dist_tags_and_whoami(h: Harness) -> None:
    await publish(h, "left-pad", "1.0.0")
    await publish(h, "left-pad", "2.0.0-beta.1")
    tags = (await h.get("/npm/internal/-/package/left-pad/dist-tags")).json()
    assert tags == {"latest": "2.0.0-beta.1"}
    put = await h.put("/npm/internal/-/package/left-pad/dist-tags/latest", b'"1.0.0"', AUTH)
    assert put.status == 200, put.describe()
    await h.put("/npm/internal/-/package/left-pad/dist-tags/next", b'"2.0.0-beta.1"', AUTH)
    assert (await h.get("/npm/internal/-/package/left-pad/dist-tags")).json() == \
        {"latest": "1.0.0", "next": "2.0.0-beta.1"}
    assert doc(await h.get("/npm/internal/left-pad", FULL))["dist-tags"]["latest"] == "1.0.0"
    assert npm_error(await h.put("/npm/internal/-/package/left-pad/dist-tags/x", b'"9.9.9"', AUTH), 404)
    assert (await h.delete("/npm/internal/-/package/left-pad/dist-tags/next", AUTH)).status == 200
    assert (await h.get("/npm/internal/-/package/left-pad/dist-tags")).json() == {"latest": "1.0.0"}
    assert (await h.get("/npm/internal/-/whoami", {"Authorization": f"Bearer {WRITE}"})).json() == \
        {"username": "ci-publisher"}
    assert npm_error(await h.get("/npm/internal/-/whoami"), 401)


@pytest_twisted.ensureDeferred
async def test_setup_snippets_point_at_the_group(h: Harness) -> None:
    npmrc = await h.get("/setup/npm")
    assert npmrc.status == 200 and "registry=http://cache.test/npm/all/\n" in npmrc.body.decode()
    assert "registry=http://cache.test/npm/internal/" in (await h.get("/setup/pnpm?remote=internal")).body.decode()
    assert 'registry "http://cache.test/npm/all/"' in (await h.get("/setup/yarn")).body.decode()
    assert 'npmRegistryServer: "http://cache.test/npm/all/"' in (await h.get("/setup/yarn?format=yml")).body.decode()
    assert npm_error(await h.get("/setup/npm?remote=nope"), 404)


@pytest_twisted.ensureDeferred
async def test_concurrent_publishes_of_one_package_both_land(h: Harness) -> None:
    from twisted.internet.defer import gatherResults
    bodies = [json.dumps(publish_body("left-pad", v, make_tarball("left-pad", v))).encode() for v in ("1.0.0", "2.0.0")]
    results = await gatherResults([h.put("/npm/internal/left-pad", b, AUTH) for b in bodies])
    assert [r.status for r in results] == [201, 201], [r.describe() for r in results]
    d = doc(await h.get("/npm/internal/left-pad", FULL))
    assert sorted(d["versions"]) == ["1.0.0", "2.0.0"]
    for v in ("1.0.0", "2.0.0"):
        assert (await h.get(f"/npm/internal/left-pad/-/left-pad-{v}.tgz")).body == make_tarball("left-pad", v)


@pytest_twisted.ensureDeferred
async def test_a_name_no_member_has_is_a_404_through_the_group(h: Harness) -> None:
    assert npm_error(await h.get("/npm/all/nobody-has-this", FULL), 404)
    assert npm_error(await h.get("/npm/all/nobody-has-this/-/nobody-has-this-1.0.0.tgz"), 404)
