"""The kv remote (sparkcache.protocols.kv) on the in-memory daemon: ccache's three
layouts, Gradle's media type and 413, sccache's WebDAV calls, auth, immutable
keys, bad keys, and a failing or full store answering misses and clean errors."""

from __future__ import annotations

import base64
import errno
import os
from typing import Any

import pytest
import pytest_twisted

from sparkcache.config import ConfigError
from sparkcache.protocols import load_config_data
from sparkcache.store import SpoolFile, Store
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401

WRITER, READER = "kv-writer-token", "kv-reader-token"
CONFIG = {
    "auth": {"anonymous_read": False, "tokens": [
        {"name": "w", "token": WRITER, "scopes": ["read", "write"]},
        {"name": "r", "token": READER, "scopes": ["read"]},
    ]},
    "remotes": {
        "builds": {"type": "kv", "max_entry_size": 1000},
        "tiny": {"type": "kv", "max_entry_size": 1, "max_key_length": 40},
    },
}
BEARER = {"Authorization": f"Bearer {WRITER}"}
READ = {"Authorization": f"Bearer {READER}"}
GRADLE = "application/vnd.gradle.build-cache-artifact.v1"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


def form_count(h: Harness, remote: str, form: str, result: str) -> float:
    value = h.metrics.registry.get_sample_value("sparkcache_registry_requests_total",
                                                {"remote": remote, "form": form, "result": result})
    return value or 0.0


def spool_files(h: Harness) -> list[str]:
    return os.listdir(h.store.spool_dir) if os.path.isdir(h.store.spool_dir) else []


# ccache's keys, as each layout lays them out (bazel: the key repeated to 64 hex digits).
CCACHE_KEY = "3c1d9e0b7a5f2468ace13579bdf02468ace1357"
LAYOUTS = {
    "subdirs": f"{CCACHE_KEY[:2]}/{CCACHE_KEY[2:]}",
    "flat": CCACHE_KEY,
    "bazel": "ac/" + (CCACHE_KEY * 2)[:64],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest_twisted.ensureDeferred
async def test_ccache_layouts_miss_then_put_then_hit(h: Harness, layout: str) -> None:
    path = f"/kv/builds/{LAYOUTS[layout]}"
    assert (await h.get(path, BEARER)).status == 404
    # ccache's Basic auth: the token as the password of the URL's user info.
    assert (await h.put(path, b"result-" + layout.encode(), basic("ccache", WRITER))).status == 201
    got = await h.get(path, READ)
    assert got.status == 200 and got.body == b"result-" + layout.encode()
    assert got.header("Content-Type") == "application/octet-stream"
    head = await h.head(path, BEARER)
    assert head.status == 200 and head.header("Content-Length") == str(len(got.body)) and head.body == b""
    # One layout's key is not another's.
    others = [p for name, p in LAYOUTS.items() if name != layout]
    assert [(await h.get(f"/kv/builds/{p}", READ)).status for p in others] == [404, 404]


@pytest_twisted.ensureDeferred
async def test_a_put_of_a_stored_key_is_idempotent_and_keeps_the_bytes(h: Harness) -> None:
    assert (await h.put("/kv/builds/k/1", b"first", BEARER)).status == 201
    again = await h.put("/kv/builds/k/1", b"second", BEARER)
    assert again.status == 200
    assert (await h.get("/kv/builds/k/1", READ)).body == b"first"
    assert spool_files(h) == []
    assert form_count(h, "builds", "upload", "stored") == 1 and form_count(h, "builds", "upload", "exists") == 1


@pytest_twisted.ensureDeferred
async def test_auth_write_scope_for_puts_read_scope_for_gets(h: Harness) -> None:
    refused = await h.put("/kv/builds/a", b"x")
    assert refused.status == 401 and refused.json()["status"] == 401
    challenges = refused.headers.get_all("WWW-Authenticate") or []
    assert any(c.startswith("Basic ") for c in challenges) and any(c.startswith("Bearer ") for c in challenges)
    assert (await h.put("/kv/builds/a", b"x", READ)).status == 403
    assert (await h.put("/kv/builds/a", b"x", basic("gradle", "wrong"))).status == 401
    assert (await h.get("/kv/builds/a")).status == 401
    assert (await h.get("/kv/builds/a", READ)).status == 404  # nothing was stored by the refused PUTs
    assert spool_files(h) == []


@pytest_twisted.ensureDeferred
async def test_gradle_cache_media_type_and_413_before_the_body(h: Harness) -> None:
    path = "/kv/builds/cache/0123456789abcdef0123456789abcdef"
    assert (await h.get(path, basic("gradle", WRITER))).status == 404
    put = await h.put(path, b"gradle-artifact", {**basic("gradle", WRITER), "Content-Type": GRADLE})
    assert put.status == 201
    got = await h.get(path, {**basic("gradle", WRITER), "Accept": f"{GRADLE}, */*"})
    assert got.status == 200 and got.body == b"gradle-artifact" and got.header("Content-Type") == GRADLE
    # Over max_entry_size: 413 from the headers alone, nothing spooled or stored.
    big = await h.put("/kv/builds/cache/ffffffffffffffffffffffffffffffff", b"x" * 1001,
                      {**basic("gradle", WRITER), "Content-Type": GRADLE})
    assert big.status == 413 and big.json()["status"] == 413
    assert (await h.get("/kv/builds/cache/ffffffffffffffffffffffffffffffff", READ)).status == 404
    assert (await h.put("/kv/tiny/k", b"ab", BEARER)).status == 413
    assert spool_files(h) == []


@pytest_twisted.ensureDeferred
async def test_a_gate_refusal_comes_before_any_byte_is_stored(h: Harness) -> None:
    """The 413 is the body gate's: announced too large, the body is never read."""
    resp = await h.open("PUT", "/kv/builds/early", b"y" * 5000, BEARER)
    assert resp.code == 413
    assert spool_files(h) == []


@pytest_twisted.ensureDeferred
async def test_sccache_webdav_check_propfind_mkcol_put(h: Harness) -> None:
    assert (await h.get("/kv/builds/.sccache_check", BEARER)).status == 404
    assert (await h.put("/kv/builds/.sccache_check", b"Hello, World!", BEARER)).status == 201
    # Directories: PROPFIND says none exist, MKCOL "creates" them, a PUT needs none.
    assert (await h.request("PROPFIND", "/kv/builds/a/b/c/", None, {**BEARER, "Depth": "0"})).status == 404
    assert (await h.request("PROPFIND", "/kv/builds/", None, BEARER)).status == 404
    for d in ("a/", "a/b/", "a/b/c/"):
        assert (await h.request("MKCOL", f"/kv/builds/{d}", None, BEARER)).status == 201
    assert (await h.request("MKCOL", "/kv/builds/a/", None, READ)).status == 403
    key = "a/b/c/abc123def456"
    assert (await h.put(f"/kv/builds/{key}", b"object", BEARER)).status == 201
    found = await h.request("PROPFIND", f"/kv/builds/{key}", b'<?xml version="1.0"?><propfind xmlns="DAV:"/>',
                            {**READ, "Depth": "0", "Content-Type": "application/xml"})
    assert found.status == 207 and b"<D:getcontentlength>6</D:getcontentlength>" in found.body
    assert f"<D:href>/kv/builds/{key}</D:href>".encode() in found.body
    assert (await h.request("PROPFIND", "/kv/builds/a/b/c/missing", None, READ)).status == 404
    opts = await h.request("OPTIONS", "/kv/builds/", None, READ)
    assert opts.status == 200 and "PROPFIND" in (opts.header("Allow") or "") and opts.header("DAV") == "1"


@pytest.mark.parametrize("path, status", [
    ("/kv/builds/a/%2e%2e/b", 400), ("/kv/builds/../etc/passwd", 400), ("/kv/builds/a%2fb", 400),
    ("/kv/builds/a%0d%0ab", 400), ("/kv/builds/a%00", 400), ("/kv/builds/a%20b", 400),
    ("/kv/builds/a%3Cb", 400), ("/kv/builds/" + "k" * 300, 400), ("/kv/tiny/" + "k" * 41, 400),
    ("/kv/builds/" + "/".join(["d"] * 40), 400), ("/kv/builds/dir/", 400), ("/kv/builds/", 400),
    ("/kv/nosuch/k", 404), ("/kv/", 404),
])
@pytest_twisted.ensureDeferred
async def test_bad_keys_are_refused_with_json(h: Harness, path: str, status: int) -> None:
    for method in ("GET", "PUT"):
        resp = await h.request(method, path, b"body" if method == "PUT" else None, BEARER)
        assert resp.status == status, (method, path, resp.describe())
        assert resp.json()["status"] == status
    assert spool_files(h) == []
    assert await h.store.list("builds") == []


@pytest_twisted.ensureDeferred
async def test_a_failing_index_is_a_miss(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (await h.put("/kv/builds/k", b"v", BEARER)).status == 201

    def broken(key: str) -> Any:
        raise OSError(errno.EIO, "disk I/O error")

    monkeypatch.setattr(h.store.index, "get", broken)
    assert (await h.get("/kv/builds/k", READ)).status == 404
    assert (await h.request("PROPFIND", "/kv/builds/k", None, READ)).status == 404


@pytest_twisted.ensureDeferred
async def test_a_full_disk_is_a_clean_507_and_keeps_nothing(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: SpoolFile, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(SpoolFile, "write", full)
        resp = await h.put("/kv/builds/ab/cdef", b"object", BEARER)
    assert resp.status == 507 and resp.json()["status"] == 507
    assert (await h.get("/kv/builds/ab/cdef", READ)).status == 404

    async def commit_fails(self: Store, spool: SpoolFile, entry: Any) -> Any:
        self.discard(spool)
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Store, "commit", commit_fails)
        resp = await h.put("/kv/builds/ab/cdef", b"object", BEARER)
    assert resp.status == 507
    assert (await h.get("/kv/builds/ab/cdef", READ)).status == 404
    assert spool_files(h) == []
    # The store has room again: the same key is stored.
    assert (await h.put("/kv/builds/ab/cdef", b"object", BEARER)).status == 201
    assert (await h.get("/kv/builds/ab/cdef", READ)).body == b"object"
    assert form_count(h, "builds", "upload", "rejected") >= 1  # the failed commit (a spool write failure is 507 before _keyed sees it)


@pytest_twisted.ensureDeferred
async def test_delete_needs_admin(h: Harness) -> None:
    assert (await h.put("/kv/builds/gone", b"v", BEARER)).status == 201
    assert (await h.delete("/kv/builds/gone", BEARER)).status == 403
    assert (await h.get("/kv/builds/gone", READ)).status == 200


@pytest_twisted.ensureDeferred
async def test_setup_snippets(h: Harness) -> None:
    cc = await h.get("/setup/ccache?layout=bazel", READ)
    assert cc.status == 200
    assert f'CCACHE_REMOTE_STORAGE="{h.base_url}/kv/builds|layout=bazel|bearer-token=$SPARKCACHE_TOKEN"' in cc.body.decode()
    assert (await h.get("/setup/ccache?layout=nested", READ)).status == 400
    sc = (await h.get("/setup/sccache?remote=tiny", READ)).body.decode()
    assert f"SCCACHE_WEBDAV_ENDPOINT={h.base_url}/kv/tiny\n" in sc and "SCCACHE_WEBDAV_TOKEN" in sc
    gr = (await h.get("/setup/gradle-cache", READ)).body.decode()
    assert f"url = '{h.base_url}/kv/builds/cache/'" in gr and "allowInsecureProtocol" in gr and "credentials" in gr
    assert (await h.get("/setup/gradle-cache?remote=nosuch", READ)).status == 404
    for secret in (WRITER, READER):
        assert secret not in cc.body.decode() + sc + gr


def test_config_options() -> None:
    cfg = load_config_data({"remotes": {"k": {"type": "kv", "max_entry_size": "2MiB", "quota": "1GiB",
                                              "ttl": "7d", "max_key_length": 200}}})
    opts = cfg.remotes["k"].options
    assert (opts.keyed.max_entry_size, opts.keyed.quota, opts.keyed.ttl, opts.max_key_length) == \
        (2 << 20, 1 << 30, 7 * 86400, 200)
    with pytest.raises(ConfigError, match="max_key_length"):
        load_config_data({"remotes": {"k": {"type": "kv", "max_key_length": 0}}})
    with pytest.raises(ConfigError, match="upstream|unknown"):
        load_config_data({"remotes": {"k": {"type": "kv", "bogus": 1}}})
