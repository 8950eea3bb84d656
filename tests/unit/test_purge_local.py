"""Purges never lose data that exists nowhere else.

Every kind of upload (``type: local`` PUTs, OCI pushes, pypi-local uploads,
npm-local publishes, code-sync uploads) survives ``POST /admin/purge`` of
everything and of its remote; deleting local content is the explicit
``DELETE /admin/local?remote=&path=``; bad query bytes are JSON 400s."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from tests.support.client import assert_json_error, bearer
from tests.support.fake_mirrors import FakeMirrors
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401
from tests.support.npm_packages import make_tarball, publish_body
from tests.support.pypi_packages import wheel

WRITE, ADMIN = "wr-0d15ea5e", "ad-b16b00b5"
CONFIG: dict[str, Any] = {
    "auth": {"anonymous_read": True, "tokens": [
        {"name": "w", "token": WRITE, "scopes": ["read", "write"]},
        {"name": "a", "token": ADMIN, "scopes": ["read", "write", "admin"]}]},
    "remotes": {
        "files": {"type": "generic", "upstream": UPSTREAM},
        "uploads": {"type": "local"},
        "loc": {"type": "oci-local"},
        "pyint": {"type": "pypi-local"},
        "npmint": {"type": "npm-local"},
    },
}
SHARED = b"the same bytes, uploaded and cached" * 50


@pytest.fixture
def h(tmp_path: Path, harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG, mirrors=FakeMirrors(tmp_path)))


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def tgz(tmp: Path, files: dict[str, bytes]) -> Deferred[bytes]:
    """A tar.gz of ``files``, made by tar as a code-sync client makes one (in a thread)."""
    for name, data in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    return deferToThread(lambda: subprocess.run(["tar", "-czf", "-", "-C", str(tmp), *files], check=True,
                                                capture_output=True).stdout)


def pypi_upload(data: Any) -> tuple[bytes, str]:
    boundary = "b0undary1234"
    fields = {":action": "file_upload", "protocol_version": "1", "name": "inhouse", "version": "1.0",
              "filetype": "bdist_wheel", "sha256_digest": data.sha256, "metadata_version": "2.1"}
    out = b""
    for k, v in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    out += (f'--{boundary}\r\nContent-Disposition: form-data; name="content"; filename="{data.filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data.data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def upload_everything(h: Harness, tmp: Path) -> dict[str, bytes]:
    """One upload of each kind; returns the URL each is read back from → its bytes."""
    w = bearer(WRITE)
    out: dict[str, bytes] = {}
    assert (await h.put("/api/uploads/dir/shared.bin", SHARED, w)).status == 201
    out["/api/uploads/dir/shared.bin"] = SHARED
    layer, config = b"layer bytes" * 10, b'{"architecture":"amd64"}'
    for blob in (layer, config):
        assert (await h.post(f"/v2/loc/app/blobs/uploads/?digest={sha(blob)}", blob, w)).status == 201
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(layer), "size": len(layer)}],
    }).encode()
    put = await h.put("/v2/loc/app/manifests/v1", manifest,
                      {**w, "Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert put.status == 201, put.describe()
    out["/v2/loc/app/manifests/v1"] = manifest
    out[f"/v2/loc/app/blobs/{sha(layer)}"] = layer
    dist = wheel("inhouse", "1.0")
    body, ctype = pypi_upload(dist)
    assert (await h.post("/pypi/pyint/", body, {**w, "Content-Type": ctype})).status == 200
    out[f"/pypi/pyint/files/inhouse/{dist.filename}"] = dist.data
    tarball = make_tarball("@team/util", "1.0.0")
    pub = await h.put("/npm/npmint/@team%2futil", json.dumps(publish_body("@team/util", "1.0.0", tarball)).encode(),
                      {**w, "Content-Type": "application/json"})
    assert pub.status == 201, pub.describe()
    out["/npm/npmint/@team/util/-/util-1.0.0.tgz"] = tarball
    sync = await h.post("/upload", await tgz(tmp, {"src/main.c": b"int main(){}\n"}), w)
    assert sync.status == 201, sync.describe()
    got = await h.get(sync.json()["url"])
    assert got.status == 200
    out[sync.json()["url"]] = got.body
    for url, data in out.items():
        got = await h.get(url)
        assert got.status == 200 and got.body == data, (url, got.describe())
    return out


async def assert_all_there(h: Harness, uploads: dict[str, bytes]) -> None:
    for url, data in uploads.items():
        got = await h.get(url)
        assert got.status == 200 and got.body == data, (url, got.describe())


@pytest_twisted.ensureDeferred
async def test_purging_everything_keeps_every_kind_of_upload(h: Harness, tmp_path: Path) -> None:
    uploads = await upload_everything(h, tmp_path / "tree")
    # A cached body with the same bytes as an upload: its row goes, the body stays.
    h.upstream.add("/shared.bin", SHARED)
    h.upstream.add("/other.bin", b"only cached")
    for path in ("/api/files/shared.bin", "/api/files/other.bin"):
        assert (await h.get(path)).status == 200
    await h.settle()
    purged = await h.post("/admin/purge", None, bearer(ADMIN))
    assert purged.status == 200 and purged.json() == {"purged": 2}, purged.describe()
    assert await h.store.index.get("files:shared.bin") is None
    await assert_all_there(h, uploads)
    assert (await h.get("/api/files/other.bin")).header("X-Cache") == "MISS"


@pytest_twisted.ensureDeferred
async def test_purging_a_local_remote_refuses_and_says_how_to_delete(h: Harness, tmp_path: Path) -> None:
    uploads = await upload_everything(h, tmp_path / "tree")
    for remote in ("uploads", "loc", "pyint", "npmint"):
        for query in (f"remote={remote}", f"remote={remote}&path=dir/shared.bin"):
            refused = await h.post(f"/admin/purge?{query}", None, bearer(ADMIN))
            assert_json_error(refused, 400)
            assert "/admin/local" in refused.json()["error"], refused.describe()
    # The generic API's whole-remote DELETE refuses the same way.
    refused = await h.delete("/api/uploads/", bearer(ADMIN))
    assert_json_error(refused, 400)
    assert "/admin/local" in refused.json()["error"]
    await assert_all_there(h, uploads)


@pytest_twisted.ensureDeferred
async def test_purge_by_path_of_a_cached_entry(h: Harness) -> None:
    h.upstream.add("/a.bin", b"cached")
    assert (await h.get("/api/files/a.bin")).status == 200
    await h.settle()
    one = await h.post("/admin/purge?remote=files&path=/a.bin", None, bearer(ADMIN))
    assert one.status == 200 and one.json() == {"purged": 1}
    none = await h.post("/admin/purge?remote=files&path=/a.bin", None, bearer(ADMIN))
    assert none.status == 200 and none.json() == {"purged": 0}


@pytest_twisted.ensureDeferred
async def test_deleting_local_content_is_explicit_per_key(h: Harness, tmp_path: Path) -> None:
    uploads = await upload_everything(h, tmp_path / "tree")
    admin = bearer(ADMIN)
    assert_json_error(await h.delete("/admin/local?remote=uploads&path=dir/shared.bin", bearer(WRITE)), 403)
    assert_json_error(await h.delete("/admin/local?remote=uploads", admin), 400)
    assert_json_error(await h.delete("/admin/local?remote=nope&path=x", admin), 404)
    assert_json_error(await h.delete("/admin/local?remote=uploads&path=dir/other.bin", admin), 404)
    listed = await h.get("/admin/local?remote=uploads", admin)
    assert listed.status == 200 and [e["path"] for e in listed.json()["entries"]] == ["dir/shared.bin"]
    summary = await h.get("/admin/local", admin)
    assert {r["remote"] for r in summary.json()["remotes"]} >= {"uploads", "loc", "pyint", "npmint", "@upload"}
    gone = await h.delete("/admin/local?remote=uploads&path=/dir/shared.bin", admin)
    assert gone.status == 200 and gone.json() == {"deleted": 1}, gone.describe()
    assert_json_error(await h.get("/api/uploads/dir/shared.bin"), 404)
    # A code-sync upload is deleted by its id the same way.
    sync_url = next(u for u in uploads if u.startswith("/uploads/"))
    upload_id = sync_url.rsplit("/", 1)[1]
    gone = await h.delete(f"/admin/local?remote=@upload&path=upload/{upload_id}", admin)
    assert gone.status == 200 and gone.json() == {"deleted": 1}, gone.describe()
    assert (await h.get(sync_url)).status == 404
    del uploads["/api/uploads/dir/shared.bin"], uploads[sync_url]
    await assert_all_there(h, uploads)


@pytest_twisted.ensureDeferred
async def test_code_sync_uploads_stay_evictable(h: Harness, tmp_path: Path) -> None:
    """Kept from purges, but not pinned: LRU eviction under storage.max_size may take them."""
    sync = await h.post("/upload", await tgz(tmp_path / "tree", {"a.txt": b"a"}), bearer(WRITE))
    entry = await h.store.index.get(f"upload/{sync.json()['id']}")
    assert entry is not None and entry.kept and not entry.pinned
    assert await h.store.purge_all() == 0
    h.store.max_size = 0
    assert await h.store.evict() == 1
    assert (await h.get(sync.json()["url"])).status == 404


@pytest.mark.parametrize("query", [
    "remote=%ff", "remote=files&path=%ff", "remote=files&path=a%c3%28", "remote=%80%80&path=x",
])
@pytest_twisted.ensureDeferred
async def test_non_utf8_purge_arguments_are_json_400s(h: Harness, query: str) -> None:
    resp = await h.post(f"/admin/purge?{query}", None, bearer(ADMIN))
    assert_json_error(resp, 400)
    assert "UTF-8" in resp.json()["error"]
    resp = await h.request("DELETE", f"/admin/local?{query}", None, bearer(ADMIN))
    assert_json_error(resp, 400)
    resp = await h.get(f"/admin/local?{query}", bearer(ADMIN))
    assert_json_error(resp, 400)
