"""The seed endpoints (sparkcache.protocols.seed) on the in-memory daemon:
/bin and /cache (mutable names, digest headers, 413 before the body, write
token), /artifacts (upload, listing, one file or a tar stream by glob,
retention), bad input, a full store, GET / and /admin/purge."""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import tarfile
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted

from sparkcache.protocols.seed import ARTIFACTS, BIN, SeedConfig
from tests.support.client import assert_json_error
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401

WRITER = "seed-w-3f9a"
READER = "seed-r-81c2"
ADMIN = "seed-a-07d4"
CONFIG = {
    "auth": {"anonymous_read": False, "tokens": [
        {"name": "w", "token": WRITER, "scopes": ["write"]},
        {"name": "r", "token": READER, "scopes": ["read"]},
        {"name": "a", "token": ADMIN, "scopes": ["admin"]},
    ]},
    "seed": {"max_entry_size": 4096, "artifact_retention": "2h"},
}
W = {"Authorization": f"Bearer {WRITER}"}
R = {"Authorization": f"Bearer {READER}"}


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- /bin and /cache -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bin_put_get_head_and_replace(h: Harness) -> None:
    assert (await h.get("/bin/pipeline", R)).status == 404
    put = await h.put("/bin/pipeline", b"\x7fELF v1", W)
    assert put.status == 201 and put.json() == {"name": "pipeline", "size": 7, "sha256": sha(b"\x7fELF v1")}
    got = await h.get("/bin/pipeline", R)
    assert got.status == 200 and got.body == b"\x7fELF v1"
    head = await h.head("/bin/pipeline", R)
    assert head.status == 200 and head.body == b"" and head.header("Content-Length") == "7"
    # Binaries are mutable names: a re-PUT replaces the bytes.
    assert (await h.put("/bin/pipeline", b"\x7fELF version 2", W)).status == 201
    assert (await h.get("/bin/pipeline", R)).body == b"\x7fELF version 2"
    assert (await h.head("/bin/other", R)).status == 404


@pytest_twisted.ensureDeferred
async def test_cache_keys_with_slashes(h: Harness) -> None:
    key = "/cache/go/linux-amd64/go.sum-3b1f.tar.zst"
    assert (await h.put(key, b"archive", W)).status == 201
    assert (await h.get(key, R)).body == b"archive"
    assert (await h.get("/cache/go/linux-amd64", R)).status == 404
    # The same name under /bin is another entry.
    assert (await h.get("/bin/go/linux-amd64/go.sum-3b1f.tar.zst", R)).status == 404
    assert_json_error(await h.put("/cache/go/", b"x", W), 400)


@pytest_twisted.ensureDeferred
async def test_digest_headers_are_checked(h: Harness) -> None:
    body = b"dependency archive"
    ok = await h.put("/cache/k1", body, {**W, "X-Checksum-Sha256": sha(body)})
    assert ok.status == 201
    b64 = base64.b64encode(hashlib.sha256(body).digest()).decode()
    assert (await h.put("/cache/k2", body, {**W, "Digest": f"sha-256={b64}"})).status == 201
    bad = await h.put("/cache/k3", body, {**W, "X-Checksum-Sha256": sha(b"other")})
    assert_json_error(bad, 400)
    assert (await h.get("/cache/k3", R)).status == 404
    # A mismatching re-PUT leaves the stored body as it was.
    assert_json_error(await h.put("/cache/k1", b"new", {**W, "X-Checksum-Sha256": sha(b"other")}), 400)
    assert (await h.get("/cache/k1", R)).body == body
    assert_json_error(await h.put("/cache/k4", body, {**W, "Digest": "sha-256=!!"}), 400)


@pytest_twisted.ensureDeferred
async def test_tokens(h: Harness) -> None:
    assert_json_error(await h.put("/bin/x", b"x"), 401)
    assert_json_error(await h.put("/bin/x", b"x", R), 403)
    assert_json_error(await h.put("/bin/x", b"x", {"Authorization": "Bearer wrong"}), 401)
    assert_json_error(await h.post("/artifacts/j1?path=a", b"x", R), 403)
    assert (await h.put("/bin/x", b"x", W)).status == 201
    # anonymous_read is off here: reads need a token too.
    assert_json_error(await h.get("/bin/x"), 401)
    assert_json_error(await h.get("/artifacts/j1"), 401)
    basic = base64.b64encode(f"ci:{READER}".encode()).decode()
    assert (await h.get("/bin/x", {"Authorization": f"Basic {basic}"})).body == b"x"


@pytest_twisted.ensureDeferred
async def test_too_large_is_refused_before_the_body(h: Harness) -> None:
    resp = await h.put("/bin/big", b"x" * 4097, W)
    assert_json_error(resp, 413)
    assert_json_error(await h.post("/artifacts/j?path=big", b"x" * 4097, W), 413)
    assert (await h.get("/bin/big", R)).status == 404
    assert h.store.entries == 0
    # Refused from the header alone: the body gate answers, nothing is spooled.
    request: Any = _FakeRequest(b"PUT", b"/bin/big", {b"content-length": b"999999999", b"authorization": W["Authorization"].encode()})
    decision = h.svc.root.gates[b"bin"](request)
    assert decision is not None and decision.reply.status == 413


class _FakeRequest:
    def __init__(self, method: bytes, uri: bytes, headers: dict[bytes, bytes]) -> None:
        self.method, self.uri, self.path = method, uri, uri.split(b"?")[0]
        self.headers = headers
        self.args: dict[bytes, list[bytes]] = {}
        if b"?" in uri:
            from urllib.parse import parse_qs

            self.args = {k.encode(): [v.encode() for v in vs] for k, vs in parse_qs(uri.split(b"?")[1].decode()).items()}

    def getHeader(self, name: bytes) -> bytes | None:
        return self.headers.get(name.lower())


@pytest.mark.parametrize("path", [
    "/bin/%2e%2e/etc/passwd", "/bin/a/../b", "/bin/a%2fb", "/bin/x%00y", "/bin/x%0d%0a", "/cache/a\\b", "/bin/%ff",
])
@pytest_twisted.ensureDeferred
async def test_bad_names(h: Harness, path: str) -> None:
    assert_json_error(await h.put(path, b"x", W), 400)
    assert_json_error(await h.get(path, R), 400)


@pytest.mark.parametrize("path", [
    "../x", "/etc/passwd", "a/../../x", "a//b", "a/./b", ".", "a/", "x%00y", "x%0ay", "a\\b", "",
])
@pytest_twisted.ensureDeferred
async def test_bad_artifact_paths(h: Harness, path: str) -> None:
    resp = await h.post(f"/artifacts/job-1?path={path}", b"x", W)
    assert_json_error(resp, 400)
    assert (await h.get("/artifacts/job-1", R)).json()["artifacts"] == []


@pytest_twisted.ensureDeferred
async def test_bad_artifact_requests(h: Harness) -> None:
    assert_json_error(await h.post("/artifacts/job-1", b"x", W), 400)  # no ?path=
    assert_json_error(await h.post("/artifacts/job-1?path=%ff", b"x", W), 400)
    assert_json_error(await h.post("/artifacts/..?path=a", b"x", W), 400)
    assert_json_error(await h.get("/artifacts/job-1?glob=%01", R), 400)
    assert_json_error(await h.get("/artifacts/a/b", R), 404)
    assert_json_error(await h.get("/artifacts/", R), 404)
    assert_json_error(await h.request("DELETE", "/bin/x", None, W), 405)


# -- artifacts -------------------------------------------------------------------------


async def upload(h: Harness, job: str, files: dict[str, bytes]) -> None:
    for path, body in files.items():
        # As curl --data-binary sends it.
        headers = {**W, "Content-Type": "application/x-www-form-urlencoded"}
        resp = await h.post(f"/artifacts/{job}?path={quote(path, safe='/')}", body, headers)
        assert resp.status == 201, resp.describe()
        assert resp.json() == {"name": path, "size": len(body), "sha256": sha(body)}


FILES = {
    "dist/app.tar.gz": b"\x1f\x8b" + b"z" * 1000,
    "dist/app.sha256": b"abc  app.tar.gz\n",
    "reports/junit.xml": b"<testsuite/>",
    "reports/empty.txt": b"",
    "reports/blocks.bin": b"b" * 512,
}


@pytest_twisted.ensureDeferred
async def test_artifacts_list_one_and_tar(h: Harness) -> None:
    await upload(h, "build-42", FILES)
    await upload(h, "build-43", {"dist/other": b"other job"})
    listing = (await h.get("/artifacts/build-42", R)).json()
    assert listing["job"] == "build-42"
    assert [a["path"] for a in listing["artifacts"]] == sorted(FILES)
    for a in listing["artifacts"]:
        assert a["size"] == len(FILES[a["path"]]) and a["sha256"] == sha(FILES[a["path"]])
        assert a["time"] == "2023-11-14T22:13:20Z"  # the harness clock
    one = await h.get("/artifacts/build-42?glob=reports/junit.*", R)
    assert one.status == 200 and one.body == b"<testsuite/>" and one.header("Content-Type") == "application/xml"
    assert 'filename="junit.xml"' in (one.header("Content-Disposition") or "")
    # Several: a tar stream, as tarfile reads it (fnmatch's * crosses '/').
    many = await h.get("/artifacts/build-42?glob=*", R)
    assert many.status == 200 and many.header("Content-Type") == "application/x-tar"
    assert len(many.body) % 10240 == 0
    with tarfile.open(fileobj=io.BytesIO(many.body)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == sorted(FILES)
        for m in members:
            assert m.isfile() and m.mode == 0o644
            f = tar.extractfile(m)
            assert f is not None and f.read() == FILES[m.name]
    head = await h.head("/artifacts/build-42?glob=dist/*", R)
    assert head.status == 200 and head.body == b""
    dist = await h.get("/artifacts/build-42?glob=dist/*", R)
    assert head.header("Content-Length") == str(len(dist.body))
    with tarfile.open(fileobj=io.BytesIO(dist.body)) as tar:
        assert tar.getnames() == ["dist/app.sha256", "dist/app.tar.gz"]
    assert_json_error(await h.get("/artifacts/build-42?glob=*.exe", R), 404)
    assert (await h.get("/artifacts/nobody", R)).json() == {"job": "nobody", "artifacts": []}


@pytest_twisted.ensureDeferred
async def test_long_and_unicode_names_in_the_tar(h: Harness) -> None:
    long = "/".join(["d" * 60] * 4) + "/résumé ✓.txt"
    await upload(h, "j", {long: b"long name", "short": b"s"})
    resp = await h.get("/artifacts/j?glob=*", R)
    with tarfile.open(fileobj=io.BytesIO(resp.body)) as tar:
        assert tar.getnames() == sorted([long, "short"])
        f = tar.extractfile(long)
        assert f is not None and f.read() == b"long name"


@pytest_twisted.ensureDeferred
async def test_reupload_replaces_and_retention_expires(h: Harness) -> None:
    await upload(h, "j", {"log.txt": b"first"})
    h.clock.advance(3600)
    await upload(h, "j", {"log.txt": b"second", "new.txt": b"n"})
    assert (await h.get("/artifacts/j?glob=log.txt", R)).body == b"second"
    h.clock.advance(3601)  # log.txt (re-uploaded 1h ago) is still within its 2h; nothing older is left
    assert [a["path"] for a in (await h.get("/artifacts/j", R)).json()["artifacts"]] == ["log.txt", "new.txt"]
    h.clock.advance(3600)
    assert (await h.get("/artifacts/j", R)).json()["artifacts"] == []
    assert_json_error(await h.get("/artifacts/j?glob=*", R), 404)
    # The sweep (every storage.expiry_interval) removes them from the store.
    await h.svc.runtime.getServiceNamed("seed-artifact-expiry").fn()
    assert await h.store.list(ARTIFACTS) == []
    # Binaries have no retention.
    await h.put("/bin/b", b"bin", W)
    h.clock.advance(10 * 86400)
    assert (await h.get("/bin/b", R)).body == b"bin"


@pytest_twisted.ensureDeferred
async def test_a_vanished_body_aborts_the_tar_instead_of_corrupting_it(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    await upload(h, "j", {"a": b"a" * 100, "b": b"b" * 100})
    real = h.store.open_range
    calls = []

    def second_gone(entry: Any, *args: Any) -> Any:
        calls.append(entry.path)
        if entry.path == "j/b":
            raise FileNotFoundError(entry.path)
        return real(entry, *args)

    monkeypatch.setattr(h.store, "open_range", second_gone)
    with pytest.raises(Exception):
        await h.get("/artifacts/j?glob=*", R)
    assert calls == ["j/a", "j/b"]


# -- a failing or full store -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_full_store_answers_507_and_reads_miss(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (await h.put("/cache/kept", b"kept", W)).status == 201

    def full(*args: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h.store.cas, "commit", full)
    assert_json_error(await h.put("/cache/new", b"new", W), 507)
    assert_json_error(await h.post("/artifacts/j?path=a", b"a", W), 507)
    assert (await h.get("/cache/new", R)).status == 404
    assert (await h.get("/cache/kept", R)).body == b"kept"

    def broken(*args: Any) -> Any:
        raise OSError("disk I/O error")

    monkeypatch.setattr(h.store.index, "get", broken)
    monkeypatch.setattr(h.store.index, "list_remote", broken)
    assert (await h.get("/cache/kept", R)).status == 404
    assert (await h.get("/artifacts/j", R)).json()["artifacts"] == []


@pytest_twisted.ensureDeferred
async def test_quota_per_area(harness_factory: MakeHarness) -> None:
    h = await harness_factory({**CONFIG, "seed": {"quota": 2000}})
    for i in range(3):
        assert (await h.put(f"/bin/b{i}", bytes([i]) * 900, W)).status == 201
        h.clock.advance(1)
    await h.store.evict_remote(BIN, 2000)
    assert [(await h.get(f"/bin/b{i}", R)).status for i in range(3)] == [404, 200, 200]
    assert (await h.put("/cache/c", b"c" * 1500, W)).status == 201  # another area, its own quota


# -- config, GET /, /admin/purge, metrics ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_internal_remotes_in_index_and_purge(h: Harness) -> None:
    await h.put("/bin/a", b"a", W)
    await h.put("/cache/a", b"a", W)
    index = (await h.get("/")).json()
    seeds = {r["name"]: r["url"] for r in index["internal_remotes"] if r["type"] == "seed"}
    assert seeds == {"seed/bin": "/bin/", "seed/cache": "/cache/", "seed/artifacts": "/artifacts/"}
    A = {"Authorization": f"Bearer {ADMIN}"}
    purged = await h.post("/admin/purge?remote=seed/bin", None, A)
    assert purged.status == 200 and purged.json() == {"purged": 1}
    assert (await h.get("/bin/a", R)).status == 404 and (await h.get("/cache/a", R)).status == 200
    assert (await h.post("/admin/purge?remote=seed%2Fcache&path=a", None, A)).json() == {"purged": 1}
    config = (await h.get("/config", R)).json()
    assert config["seed"] == {"enabled": True, "max_entry_size": 4096, "quota": None, "artifact_retention": 7200.0}
    metrics = (await h.get("/metrics")).body.decode()
    assert 'remote="seed/bin",result="stored"' in metrics


@pytest_twisted.ensureDeferred
async def test_disabled(harness_factory: MakeHarness) -> None:
    h = await harness_factory({"seed": {"enabled": False}})
    resp = await h.put("/bin/x", b"x")
    assert_json_error(resp, (401, 404, 405))
    assert_json_error(await h.get("/bin/x"), 404)
    assert (await h.get("/")).json()["internal_remotes"] == []


def test_defaults_and_bad_config(tmp_path: Any) -> None:
    from sparkcache.config import ConfigError
    from sparkcache.protocols import load_config, load_config_data

    cfg = load_config("etc/cache.yaml", environ={})
    assert cfg.section("seed") == SeedConfig()
    assert SeedConfig().artifact_retention == 7 * 86400 and SeedConfig().enabled
    for bad in ({"max_entry_size": "lots"}, {"artifact_retention": 0}, {"enabled": "yes"}, {"retention": "1d"}):
        with pytest.raises(ConfigError):
            load_config_data({"seed": bad}, "t.yaml", environ={})
    json.dumps(cfg.redacted())
