"""The dagger engine cache service (``type: dagger``) on the in-memory daemon:
every endpoint in the shapes of dagger v0.18.14's engine/cache/cachemanager
client, signed blob URLs (expiry, tampering, wrong method), digest refusal,
ranges, auth, a failing store, the state surviving a restart, and /setup."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted

from sparkcache.config import ConfigError
from sparkcache.protocols import load_config_data
from sparkcache.protocols.dagger.graph import record_digest
from tests.support.dagger_client import Blob, root_key, sha256, two_step_graph
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401

WRITER, READER = "w-token", "r-token"
CONFIG = {
    "auth": {"anonymous_read": False,
             "tokens": [{"name": "w", "token": WRITER, "scopes": ["read", "write"]},
                        {"name": "r", "token": READER, "scopes": ["read"]}]},
    "remotes": {"d": {"type": "dagger", "max_entry_size": 4000, "url_ttl": "5m", "export_period": "90s"}},
}


def basic(token: str) -> dict[str, str]:
    # The engine's SetBasicAuth(token, "").
    return {"Authorization": "Basic " + base64.b64encode(f"{token}:".encode()).decode(),
            "Content-Type": "application/json"}


W, R = basic(WRITER), basic(READER)


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:  # noqa: F811
    return pytest_twisted.blockon(harness_factory(CONFIG))


async def call(h: Harness, method: str, path: str, req: Any = None, headers: dict[str, str] = W,
               status: int = 200) -> Any:
    body = None if req is None else json.dumps(req).encode() + b"\n"
    resp = await h.request(method, f"/dagger/d{path}", body, headers)
    assert resp.status == status, (path, resp.status, resp.body[:300])
    assert (resp.header("Content-Type") or "").startswith("application/json")
    return json.loads(resp.body) if resp.body.strip() else None


def local(url: str) -> str:
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == "http://cache.test"
    return parts.path + "?" + parts.query


async def upload(h: Harness, blob: Blob, status: int = 200) -> None:
    got = await call(h, "GET", "/layerUploadURL", {"Digest": blob.digest})
    assert got["Skip"] is False
    resp = await h.put(local(got["URL"]), blob.data, got["Headers"])  # the client sends Content-Length
    assert resp.status == status, resp.body


async def export(h: Harness, tag: str) -> tuple[Any, Any, dict[str, list[Blob]]]:
    keys, links, refs = two_step_graph(tag)
    wanted = (await call(h, "POST", "/records", {"CacheKeys": keys, "Links": links}))["ExportRecords"]
    updated = []
    for rec in wanted:
        for blob in refs[rec["CacheRefID"]]:
            got = await call(h, "GET", "/layerUploadURL", {"Digest": blob.digest})
            if not got["Skip"]:
                await upload(h, blob)
        updated.append({"RecordDigest": rec["Digest"], "Layers": [b.descriptor() for b in refs[rec["CacheRefID"]]]})
    assert await call(h, "POST", "/layers", {"UpdatedRecords": updated}) == {}
    return keys, links, refs


@pytest_twisted.ensureDeferred
async def test_config_in_nanoseconds_and_auth(h: Harness) -> None:
    assert await call(h, "GET", "/config", {"EngineID": "e1"}, R) == {
        "ImportPeriod": 300 * 10**9, "ExportPeriod": 90 * 10**9, "ExportTimeout": 600 * 10**9}
    await call(h, "GET", "/config", {"EngineID": "e1"}, {}, status=401)
    await call(h, "GET", "/config", {"EngineID": "e1"}, basic("nope"), status=401)
    # Reading is enough for the reads; every write needs the write scope.
    await call(h, "POST", "/records", {"CacheKeys": [], "Links": []}, R, status=403)
    await call(h, "POST", "/layers", {"UpdatedRecords": []}, R, status=403)
    await call(h, "GET", "/layerUploadURL", {"Digest": sha256(b"x")}, R, status=403)
    await call(h, "GET", "/cacheMountUploadURL", {"CacheName": "c", "Digest": sha256(b"x"), "Size": 1}, R, status=403)
    await call(h, "GET", "/import", None, R)
    await call(h, "GET", "/nothing", None, status=404)
    resp = await h.get("/dagger/other/config", R)
    assert resp.status == 404 and json.loads(resp.body)["status"] == 404


@pytest_twisted.ensureDeferred
async def test_records_layers_and_the_buildkit_cache_config(h: Harness) -> None:
    assert await call(h, "GET", "/import", None, R) == {}
    keys, links, refs = await export(h, "a")
    cfg = await call(h, "GET", "/import", None, R)
    base, top = refs["ref-a-2"]
    assert cfg["layers"] == [
        {"blob": base.digest, "parent": -1, "annotations": {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "size": len(base.data),
            "diffID": base.descriptor()["annotations"]["containerd.io/uncompressed"],
            "createdAt": "2025-01-02T03:04:05Z"}},
        {"blob": top.digest, "parent": 0, "annotations": {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "size": len(top.data),
            "diffID": top.descriptor()["annotations"]["containerd.io/uncompressed"],
            "createdAt": "2025-01-02T03:04:05Z"}},
    ]
    records = {r["digest"]: (i, r) for i, r in enumerate(cfg["records"])}
    root_index, root = records[keys[0]["ID"]]
    assert root == {"digest": keys[0]["ID"], "layers": [{"layer": 0, "createdAt": "2025-01-02T03:04:05Z"}]}
    assert records[links[0]["Digest"]][1] == {
        "digest": links[0]["Digest"], "inputs": [[{"link": root_index}]],
        "layers": [{"layer": 1, "createdAt": "2025-01-02T03:04:06Z"}]}
    # Reported again: nothing is wanted, its layers are stored.
    again = await call(h, "POST", "/records", {"CacheKeys": keys, "Links": links})
    assert again == {"ExportRecords": []}
    # A new result of a known key is wanted, named by its record digest.
    keys[1]["Results"].append({"ID": "ref-new", "CreatedAt": "2025-01-03T00:00:00Z", "Description": "d"})
    again = await call(h, "POST", "/records", {"CacheKeys": keys, "Links": links})
    assert again == {"ExportRecords": [{"Digest": record_digest(keys[1]["ID"], "ref-new"), "CacheRefID": "ref-new"}]}


@pytest_twisted.ensureDeferred
async def test_only_results_with_stored_layers_and_their_inputs_are_imported(h: Harness) -> None:
    keys, links, refs = two_step_graph("p")
    wanted = (await call(h, "POST", "/records", {"CacheKeys": keys, "Links": links}))["ExportRecords"]
    by_ref = {r["CacheRefID"]: r["Digest"] for r in wanted}
    # Layers of the exec's record reported, but only the base pushed: not importable.
    base, top = refs["ref-p-2"]
    await upload(h, base)
    await call(h, "POST", "/layers", {"UpdatedRecords": [
        {"RecordDigest": by_ref["ref-p-2"], "Layers": [base.descriptor(), top.descriptor()]},
        {"RecordDigest": sha256(b"unknown record"), "Layers": [base.descriptor()]}]})
    assert await call(h, "GET", "/import", None, R) == {}
    # ... and still wanted.
    again = (await call(h, "POST", "/records", {"CacheKeys": keys, "Links": links}))["ExportRecords"]
    assert sorted(r["CacheRefID"] for r in again) == ["ref-p-1", "ref-p-2"]
    await upload(h, top)
    cfg = await call(h, "GET", "/import", None, R)
    # The exec's record and the root it links to (without results of its own).
    assert [r.get("layers") for r in cfg["records"]] == [[{"layer": 1, "createdAt": "2025-01-02T03:04:06Z"}], None]
    # A layer without a diffID would fail the engine's whole import: never listed.
    nodiff = dict(top.descriptor(), annotations={})
    await call(h, "POST", "/layers", {"UpdatedRecords": [{"RecordDigest": by_ref["ref-p-2"], "Layers": [nodiff]}]})
    assert await call(h, "GET", "/import", None, R) == {}


@pytest_twisted.ensureDeferred
async def test_malformed_bodies_are_400(h: Harness) -> None:
    await call(h, "POST", "/records", None, status=400)
    resp = await h.post("/dagger/d/records", b"{not json", W)
    assert resp.status == 400 and json.loads(resp.body)["status"] == 400
    await call(h, "POST", "/records", {"CacheKeys": [{"ID": 5}]}, status=400)
    await call(h, "POST", "/records", {"CacheKeys": [], "Links": [{"ID": "a", "LinkedID": "b", "Input": -1,
                                                                     "Digest": sha256(b"")}]}, status=400)
    await call(h, "POST", "/records", {"Links": [{"ID": "a", "LinkedID": "b", "Digest": "md5:x"}]}, status=400)
    await call(h, "POST", "/layers", {"UpdatedRecords": [{"RecordDigest": "x", "Layers": []}]}, status=400)
    await call(h, "POST", "/layers", {"UpdatedRecords": [{"RecordDigest": sha256(b""), "Layers": [{"size": 1}]}]},
               status=400)
    await call(h, "GET", "/layerUploadURL", {"Digest": "sha256:abc"}, status=400)
    await call(h, "GET", "/layerDownloadURL", {}, R, status=400)
    await call(h, "GET", "/cacheMountUploadURL", {"CacheName": "", "Digest": sha256(b""), "Size": 0}, status=400)
    await call(h, "GET", "/cacheMountUploadURL", {"CacheName": "c", "Digest": sha256(b""), "Size": "1"}, status=400)
    # Over the 1 MiB cap of a small body: refused before it is kept.
    resp = await h.request("GET", "/dagger/d/layerUploadURL", b" " * (1 << 20 | 1), W)
    assert resp.status == 413


@pytest_twisted.ensureDeferred
async def test_signed_urls_expire_refuse_tampering_and_wrong_digests(h: Harness) -> None:
    blob = Blob(b"layer bytes " * 10)
    got = await call(h, "GET", "/layerUploadURL", {"Digest": blob.digest})
    url = local(got["URL"])
    # Tampered: another digest, another operation, a changed expiry, no signature.
    other = Blob(b"other")
    assert (await h.put(url.replace(blob.digest[7:], other.digest[7:]), other.data)).status == 403
    assert (await h.get(url)).status == 403  # a PUT URL is no GET URL
    exp = url.split("exp=")[1].split("&")[0]
    assert (await h.put(url.replace(f"exp={exp}", f"exp={int(exp) + 1}"), blob.data)).status == 403
    assert (await h.put(url.split("?")[0], blob.data)).status == 403
    # The body must hash to the digest: refused, nothing kept.
    resp = await h.put(url, b"not the layer")
    assert resp.status == 400 and json.loads(resp.body)["status"] == 400
    await call(h, "GET", "/layerDownloadURL", {"Digest": blob.digest}, R, status=404)
    # Expired: 5 minutes later.
    h.clock.advance(301)
    assert (await h.put(url, blob.data)).status == 403
    await upload(h, blob)
    assert (await call(h, "GET", "/layerUploadURL", {"Digest": blob.digest})) == {"URL": "", "Headers": {},
                                                                                    "Skip": True}
    down = local((await call(h, "GET", "/layerDownloadURL", {"Digest": blob.digest}, R))["URL"])
    # Ranges as the engine's urlReaderAt asks them, and HEAD.
    resp = await h.get(down, {"Range": "bytes=0-"})
    assert resp.status in (200, 206) and resp.body == blob.data
    resp = await h.get(down, {"Range": "bytes=7-"})
    assert resp.status == 206 and resp.body == blob.data[7:]
    assert resp.header("Content-Range") == f"bytes 7-{len(blob.data) - 1}/{len(blob.data)}"
    assert (await h.head(down)).status == 200
    # Blob URLs need no token, only their signature; a GET URL uploads nothing.
    assert (await h.put(down, blob.data)).status == 403
    h.clock.advance(301)
    assert (await h.get(down)).status == 403


@pytest_twisted.ensureDeferred
async def test_cache_mounts(h: Harness) -> None:
    assert await call(h, "GET", "/cacheMountConfig", {}, R) == {"SyncedCacheMounts": []}
    tarball = b"zstd tar of a cache mount" * 20
    req = {"CacheName": "npm cache", "Digest": sha256(tarball), "Size": len(tarball)}
    got = await call(h, "GET", "/cacheMountUploadURL", req)
    assert got["Skip"] is False
    # A mount upload is answered exactly 200.
    resp = await h.put(local(got["URL"]), tarball, got["Headers"])
    assert resp.status == 200
    assert (await call(h, "GET", "/cacheMountUploadURL", req))["Skip"] is True
    mounts = (await call(h, "GET", "/cacheMountConfig", {}, R))["SyncedCacheMounts"]
    assert [(m["Name"], m["Digest"], m["Size"], m["MediaType"]) for m in mounts] == [
        ("npm cache", sha256(tarball), len(tarball), "application/vnd.oci.image.layer.v1.tar+zstd")]
    resp = await h.get(local(mounts[0]["URL"]), {"Range": "bytes=0-"})
    assert resp.body == tarball
    # Over max_entry_size: refused at the URL, before any upload.
    await call(h, "GET", "/cacheMountUploadURL", {"CacheName": "big", "Digest": sha256(b""), "Size": 4001},
               status=413)
    # A new content of the same mount replaces it.
    newer = b"newer contents" * 3
    got = await call(h, "GET", "/cacheMountUploadURL", dict(req, Digest=sha256(newer), Size=len(newer)))
    assert (await h.put(local(got["URL"]), newer)).status == 200
    mounts = (await call(h, "GET", "/cacheMountConfig", {}, R))["SyncedCacheMounts"]
    assert [m["Digest"] for m in mounts] == [sha256(newer)]


@pytest_twisted.ensureDeferred
async def test_a_full_store_fails_uploads_cleanly_and_reads_miss(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    keys, links, refs = two_step_graph("f")

    async def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h.cache, "adopt", full)
    wanted = (await call(h, "POST", "/records", {"CacheKeys": keys, "Links": links}))["ExportRecords"]
    assert len(wanted) == 2  # the graph lives on in memory
    await upload(h, refs["ref-f-1"][0], status=507)
    assert await call(h, "GET", "/import", None, R) == {}
    await call(h, "GET", "/layerDownloadURL", {"Digest": refs["ref-f-1"][0].digest}, R, status=404)
    monkeypatch.undo()
    await export(h, "g")

    def broken(key: str) -> Any:
        raise OSError("disk I/O error")

    monkeypatch.setattr(h.store.index, "get", broken)
    # A store that fails to read: every layer is a miss, the import reports nothing.
    assert await call(h, "GET", "/import", None, R) == {}


@pytest_twisted.ensureDeferred
async def test_graph_and_secret_survive_a_restart(harness_factory: MakeHarness) -> None:  # noqa: F811
    h = await harness_factory(CONFIG)
    keys, links, refs = await export(h, "r")
    blob = refs["ref-r-1"][0]
    down = local((await call(h, "GET", "/layerDownloadURL", {"Digest": blob.digest}, R))["URL"])
    before = await call(h, "GET", "/import", None, R)
    await h.stop()
    # The same data directory, as a restarted daemon has.
    h2 = await harness_factory(dict(CONFIG, storage={"data_dir": h.config.storage.data_dir}), clock=h.clock)
    assert await call(h2, "GET", "/import", None, R) == before
    # A URL signed before the restart still holds (the secret was stored).
    assert (await h2.get(down)).body == blob.data
    assert (await call(h2, "POST", "/records", {"CacheKeys": keys, "Links": links}))["ExportRecords"] == []


@pytest_twisted.ensureDeferred
async def test_the_graph_is_bounded(harness_factory: MakeHarness) -> None:  # noqa: F811
    cfg = json.loads(json.dumps(CONFIG))
    cfg["remotes"]["d"]["max_keys"] = 3
    h = await harness_factory(cfg)
    for i in range(5):
        key = {"ID": root_key(sha256(str(i).encode())), "Results": [{"ID": f"ref{i}"}]}
        await call(h, "POST", "/records", {"CacheKeys": [key], "Links": []})
    app = h.app(b"dagger")
    graph = app.remotes["d"].state.graph
    assert len(graph.keys) == 3 and sorted(rid for _k, rid in graph.records.values()) == ["ref2", "ref3", "ref4"]


@pytest_twisted.ensureDeferred
async def test_setup_prints_the_engine_environment(h: Harness) -> None:
    resp = await h.get("/setup/dagger", R)
    assert resp.status == 200
    assert "_EXPERIMENTAL_DAGGER_CACHESERVICE_URL=http://cache.test/dagger/d\n" in resp.body.decode()
    assert "_EXPERIMENTAL_DAGGER_CACHESERVICE_TOKEN=" in resp.body.decode()
    assert (await h.get("/setup/dagger?remote=nope", R)).status == 404


def test_options_are_checked() -> None:
    def load(remote: dict[str, Any], environ: dict[str, str] | None = None) -> Any:
        return load_config_data({"storage": {"data_dir": "/tmp/x"}, "remotes": {"d": {"type": "dagger", **remote}}},
                                environ=environ or {}).remotes["d"].options

    with pytest.raises(ConfigError, match="more than zero"):
        load({"import_period": 0})
    with pytest.raises(ConfigError, match="16 characters"):
        load({"signing_secret": "short"})
    opts = load({"signing_secret_env": "S", "quota": "1GiB"}, {"S": "s" * 20})
    assert opts.signing_secret == "s" * 20 and opts.keyed.quota == 1 << 30
    assert "s" * 20 not in json.dumps(opts.redacted())
    with pytest.raises(ConfigError):
        load({"upstream": "http://x.example", "bogus": 1})


def test_record_digests_are_stable() -> None:
    assert record_digest("k", "r") == "sha256:" + hashlib.sha256(b"k\nr").hexdigest()


@pytest_twisted.ensureDeferred
async def test_a_re_report_does_not_rewrite_the_graph(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    keys, links, _refs = await export(h, "s")
    adopted: list[str] = []
    real = h.cache.adopt

    async def counting(target: Any, spool: Any, headers: Any) -> Any:
        adopted.append(target.key)
        return await real(target, spool, headers)

    monkeypatch.setattr(h.cache, "adopt", counting)
    await call(h, "POST", "/records", {"CacheKeys": keys, "Links": links})
    assert adopted == []
    keys.append({"ID": "new-key", "Results": [{"ID": "new-ref"}]})
    await call(h, "POST", "/records", {"CacheKeys": keys, "Links": links})
    assert adopted == ["_dagger:d:graph"]


@pytest_twisted.ensureDeferred
async def test_an_unsigned_upload_is_refused_before_its_body(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    await call(h, "GET", "/config", {"EngineID": "e"})  # the remote's state is loaded
    spools: list[str] = []
    real = h.store.new_spool

    def new_spool(prefix: str = "dl-", scratch: bool = False) -> Any:
        spools.append(prefix)
        return real(prefix, scratch)

    monkeypatch.setattr(h.store, "new_spool", new_spool)
    blob = Blob(b"y" * 3000)
    resp = await h.put(f"/dagger/d/blobs/{blob.digest[7:]}?op=put&exp=9999999999&sig=forged", blob.data)
    assert resp.status == 403 and json.loads(resp.body)["status"] == 403
    assert spools == []
