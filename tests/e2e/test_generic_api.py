"""The HTTP API end to end: auth, purge, local remotes, listing, prefetch, management."""

from __future__ import annotations

import base64
import hashlib
import json
import os

import pytest

from tests.support.client import assert_json_error, basic, bearer, get_until_hit, sha256
from tests.support.daemon import project_version
from tests.support.remotes import generic_remote

ADMIN = "adm-7f3c1e9b2d"
WRITE = "wrt-41d8a6c0e5"
READ = "rd-9b0e27f4a1"
TOKENS = {"SPARKCACHE_ADMIN_TOKEN": ADMIN, "SPARKCACHE_WRITE_TOKEN": WRITE, "SPARKCACHE_READ_TOKEN": READ}


def assert_unauthorized(resp):
    assert_json_error(resp, 401)
    challenge = resp.header("WWW-Authenticate") or ""
    assert challenge.startswith("Bearer") and 'realm="sparkcache"' in challenge, resp.describe()


# -- purge -------------------------------------------------------------------


@pytest.fixture
def cached(upstream, daemon_factory):
    """A daemon with files/a.bin and files/b.bin cached (one upstream GET each)."""
    upstream.add("/files/a.bin", b"object a")
    upstream.add("/files/b.bin", b"object b")
    d = daemon_factory({"r": generic_remote(upstream)}, env=TOKENS)
    for p in ("a", "b"):
        assert d.get(f"/api/r/files/{p}.bin").header("X-Cache") == "MISS"
        get_until_hit(d, f"/api/r/files/{p}.bin", f"object {p}".encode())
    return d


def test_delete_purges_one_entry(cached, upstream):
    resp = cached.request("DELETE", "/api/r/files/a.bin", headers=bearer(ADMIN))
    assert resp.status == 200, resp.describe()
    assert resp.json() == {"purged": 1}
    a = cached.get("/api/r/files/a.bin")
    assert a.header("X-Cache") == "MISS" and a.body == b"object a", a.describe()
    assert upstream.count("/files/a.bin") == 2
    assert cached.get("/api/r/files/b.bin").header("X-Cache") == "HIT"


def test_delete_remote_purges_all_its_entries(cached):
    resp = cached.request("DELETE", "/api/r/", headers=bearer(ADMIN))
    assert resp.status == 200, resp.describe()
    assert resp.json() == {"purged": 2}
    assert cached.get("/api/r/files/a.bin").header("X-Cache") == "MISS"
    assert cached.get("/api/r/files/b.bin").header("X-Cache") == "MISS"


@pytest.mark.parametrize(
    "query,purged,missed",
    [("", 2, {"a", "b"}), ("?remote=r", 2, {"a", "b"}), ("?remote=r&path=files/a.bin", 1, {"a"})],
    ids=["all", "remote", "entry"],
)
def test_admin_purge(cached, query, purged, missed):
    resp = cached.request("POST", "/admin/purge" + query, headers=bearer(ADMIN))
    assert resp.status == 200, resp.describe()
    assert resp.json() == {"purged": purged}
    for p in ("a", "b"):
        want = "MISS" if p in missed else "HIT"
        assert cached.get(f"/api/r/files/{p}.bin").header("X-Cache") == want, p


@pytest.mark.parametrize(
    "method,path",
    [("DELETE", "/api/r/files/a.bin"), ("DELETE", "/api/r/"), ("POST", "/admin/purge"), ("POST", "/admin/purge?remote=r")],
)
def test_purge_needs_admin(cached, method, path):
    assert_unauthorized(cached.request(method, path))
    assert_unauthorized(cached.request(method, path, headers=bearer("not-a-token")))
    assert_json_error(cached.request(method, path, headers=bearer(READ)), 403)
    assert_json_error(cached.request(method, path, headers=bearer(WRITE)), 403)
    assert cached.get("/api/r/files/a.bin").header("X-Cache") == "HIT", "an unauthorised purge purged"


# -- authentication ----------------------------------------------------------


def test_anonymous_read_disabled(upstream, daemon_factory):
    upstream.add("/files/s.bin", b"secret stuff")
    auth = {"anonymous_read": False, "tokens": [{"name": "ci", "token_env": "TEST_CI_TOKEN", "scopes": ["read"]}]}
    d = daemon_factory({"r": generic_remote(upstream)}, auth=auth, env={**TOKENS, "TEST_CI_TOKEN": "ci-5e2b8d"})

    assert_unauthorized(d.get("/api/r/files/s.bin"))
    assert upstream.total() == 0, "an unauthenticated request reached upstream"
    assert_unauthorized(d.get("/api/r/files/s.bin", headers=bearer("wrong")))
    assert_unauthorized(d.get("/api/r/files/s.bin", headers=basic("ci", "wrong")))
    assert_unauthorized(d.get("/api/r/files/s.bin", headers={"Authorization": "Basic !!notbase64"}))
    assert_unauthorized(d.get("/api/r/files/s.bin", headers={"Authorization": "Bearer"}))

    for headers in (bearer(READ), bearer("ci-5e2b8d"), basic("anyone", READ), basic("ci", "ci-5e2b8d"), bearer(ADMIN), basic("x", WRITE)):
        resp = d.get("/api/r/files/s.bin", headers=headers)
        assert resp.status == 200, f"{headers}: {resp.describe()}"
        assert resp.body == b"secret stuff"
    assert upstream.count("/files/s.bin") == 1


def test_inline_token_from_config(upstream, daemon_factory):
    upstream.add("/files/s.bin", b"x")
    auth = {"anonymous_read": False, "tokens": [{"name": "inline", "token": "inline-c0ffee", "scopes": ["read"]}]}
    d = daemon_factory({"r": generic_remote(upstream)}, auth=auth, env={"SPARKCACHE_ADMIN_TOKEN": ADMIN})
    assert d.get("/api/r/files/s.bin", headers=bearer("inline-c0ffee")).status == 200
    assert_unauthorized(d.get("/api/r/files/s.bin", headers=bearer("inline-c0ffe")))


# -- local remotes -------------------------------------------------------------


@pytest.fixture
def local(daemon_factory):
    return daemon_factory({"uploads": {"type": "local"}}, env=TOKENS)


def test_local_put_then_get(local):
    body = os.urandom(50_000)
    assert_unauthorized(local.request("PUT", "/api/uploads/dir/file.bin", body=body))
    assert_json_error(local.request("PUT", "/api/uploads/dir/file.bin", headers=bearer(READ), body=body), 403)
    assert_json_error(local.get("/api/uploads/dir/file.bin"), 404)

    resp = local.request("PUT", "/api/uploads/dir/file.bin", headers=bearer(WRITE), body=body)
    assert resp.status == 201, resp.describe()
    doc = resp.json()
    assert doc["size"] == len(body)
    assert sha256(body) in doc["digest"], doc
    assert doc["path"].lstrip("/") == "dir/file.bin", doc

    got = local.get("/api/uploads/dir/file.bin")
    assert got.status == 200, got.describe()
    assert got.body == body
    assert got.header("Content-Length") == str(len(body))

    # Basic auth with the token as password, as CI tools send it; overwrite.
    resp = local.request("PUT", "/api/uploads/dir/file.bin", headers=basic("ci", WRITE), body=b"second version")
    assert resp.status == 201, resp.describe()
    assert local.get("/api/uploads/dir/file.bin").body == b"second version"


def test_local_put_checksums(local):
    body = b"checked contents"
    good_hex = hashlib.sha256(body).hexdigest()
    good_b64 = base64.b64encode(hashlib.sha256(body).digest()).decode()
    bad_hex = hashlib.sha256(b"other").hexdigest()
    bad_b64 = base64.b64encode(hashlib.sha256(b"other").digest()).decode()

    for name, headers in (("x-checksum", {"X-Checksum-Sha256": bad_hex}), ("digest", {"Digest": f"sha-256={bad_b64}"})):
        resp = local.request("PUT", f"/api/uploads/{name}.txt", headers={**bearer(WRITE), **headers}, body=body)
        assert_json_error(resp, 400)
        assert_json_error(local.get(f"/api/uploads/{name}.txt"), 404)

    for name, headers in (("x-checksum", {"X-Checksum-Sha256": good_hex}), ("digest", {"Digest": f"sha-256={good_b64}"})):
        resp = local.request("PUT", f"/api/uploads/{name}.txt", headers={**bearer(WRITE), **headers}, body=body)
        assert resp.status == 201, resp.describe()
        assert local.get(f"/api/uploads/{name}.txt").body == body


# -- listing and prefetch ------------------------------------------------------


def test_listing(upstream, daemon_factory):
    data = os.urandom(12_345)
    upstream.add("/files/a.bin", data, content_type="application/x-a")
    d = daemon_factory({"r": generic_remote(upstream)}, env=TOKENS)
    empty = d.get("/api/r/")
    assert empty.status == 200, empty.describe()
    assert empty.json()["remote"] == "r" and empty.json()["entries"] == [], empty.describe()

    get_until_hit(d, "/api/r/files/a.bin", data)  # committed
    listing = d.get("/api/r/")
    assert listing.status == 200, listing.describe()
    doc = listing.json()
    assert doc["remote"] == "r"
    matching = [e for e in doc["entries"] if e["path"].lstrip("/") == "files/a.bin"]
    assert len(matching) == 1, doc
    entry = matching[0]
    assert entry["size"] == len(data)
    assert sha256(data) in entry["digest"]
    assert entry["content_type"] == "application/x-a"
    for key in ("fetched", "expires", "last_access"):
        assert key in entry, entry


def test_prefetch(upstream, daemon_factory):
    upstream.add("/files/p1.bin", b"prefetched one")
    upstream.add("/files/p2.bin", os.urandom(70_000))
    d = daemon_factory({"r": generic_remote(upstream)}, env=TOKENS)
    body = json.dumps({"paths": ["files/p1.bin", "files/p2.bin", "files/missing.bin"]}).encode()
    ctype = {"Content-Type": "application/json"}

    assert_unauthorized(d.request("POST", "/api/r/", headers=ctype, body=body))
    assert_json_error(d.request("POST", "/api/r/", headers={**ctype, **bearer(READ)}, body=body), 403)
    assert upstream.total() == 0

    resp = d.request("POST", "/api/r/", headers={**ctype, **bearer(WRITE)}, body=body)
    assert resp.status == 200, resp.describe()
    results = {r["path"].lstrip("/"): r for r in resp.json()["results"]}
    assert results["files/p1.bin"]["status"] == "cached"
    assert results["files/p1.bin"]["size"] == len(b"prefetched one")
    assert results["files/p2.bin"]["status"] == "cached"
    assert results["files/p2.bin"]["size"] == 70_000
    assert results["files/missing.bin"]["status"] == "error"
    assert results["files/missing.bin"]["code"] == 404

    hit = d.get("/api/r/files/p1.bin")
    assert hit.header("X-Cache") == "HIT" and hit.body == b"prefetched one", hit.describe()
    assert upstream.count("/files/p1.bin") == 1
    assert upstream.count("/files/p2.bin") == 1


# -- management ------------------------------------------------------------------


def test_root_health_metrics(upstream, daemon_factory):
    upstream.add("/files/m.bin", b"measured")
    d = daemon_factory({"r": generic_remote(upstream), "uploads": {"type": "local"}})

    root = d.get("/")
    assert root.status == 200, root.describe()
    doc = root.json()
    assert doc["name"] == "sparkcache"
    assert doc["version"] == project_version()
    remotes = {r["name"]: r for r in doc["remotes"]}
    assert remotes["r"]["type"] == "generic"
    assert remotes["r"]["upstream"].rstrip("/") == upstream.base_url
    assert remotes["uploads"]["type"] == "local"

    health = d.get("/health")
    assert health.status == 200 and health.json()["status"] == "ok", health.describe()

    assert d.get("/api/r/files/m.bin").status == 200
    assert d.get("/api/r/files/m.bin").status == 200
    metrics = d.get("/metrics")
    assert metrics.status == 200, metrics.describe()
    assert (metrics.header("Content-Type") or "").startswith("text/plain")
    text = metrics.body.decode()
    assert "sparkcache_requests_total" in text
    series = [line for line in text.splitlines() if line.startswith("sparkcache_requests_total{")]
    assert any('remote="r"' in line for line in series), series


def test_config_redacts_secrets(upstream, daemon_factory):
    remote = generic_remote(upstream, credentials={"username": "ci-user", "password_env": "TEST_UPSTREAM_PASSWORD"})
    auth = {"tokens": [{"name": "ci", "token": "inline-token-8a7d", "scopes": ["write"]}]}
    env = {**TOKENS, "TEST_UPSTREAM_PASSWORD": "upstream-pass-3c9f"}
    d = daemon_factory({"r": remote}, auth=auth, env=env)

    resp = d.get("/config")
    assert resp.status == 200, resp.describe()
    text = resp.body.decode()
    for secret in ("upstream-pass-3c9f", "inline-token-8a7d", ADMIN, WRITE, READ):
        assert secret not in text, f"/config leaks a secret: {secret}"
    doc = resp.json()
    creds = doc["remotes"]["r"]["credentials"]
    assert creds["password"] == "***", creds
    assert creds["username"] == "ci-user", creds
    assert doc["remotes"]["r"]["upstream"].rstrip("/") == upstream.base_url
    assert any(t.get("token") == "***" for t in doc["auth"]["tokens"]), doc["auth"]


def test_oci_remotes_are_not_served_under_api(daemon_factory):
    d = daemon_factory({"cache": {"type": "oci-local"}, "files": {"type": "local"}})
    err = assert_json_error(d.get("/api/cache/v2/x/manifests/latest"), 404)
    assert "/v2/cache/" in err["error"]
    urls = {r["name"]: r["url"] for r in d.get("/").json()["remotes"]}
    assert urls == {"cache": "/v2/cache/", "files": "/api/files/"}
