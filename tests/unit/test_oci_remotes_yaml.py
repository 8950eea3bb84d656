"""The FastAPI artifact cache's ``remotes.yaml`` running in the daemon (in
memory, against an in-memory registry): its ``package: docker`` remote is a
registry at ``/v2/<remote>/...`` whose ``immutable_patterns`` refuse other
images with 403 DENIED and whose ``cache.mutable_ttl`` is the tag TTL; its
descriptions show in ``GET /`` and ``/config``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml

from tests.support.client import Response
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fastapi_remotes.yaml"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def fixture_config() -> dict[str, Any]:
    """The fixture as it is, with every upstream moved to the in-memory one."""
    data = yaml.safe_load(FIXTURE.read_text())
    for name, body in data["remotes"].items():
        if "base_url" in body:
            body["base_url"] = UPSTREAM if body["package"] == "docker" else f"{UPSTREAM}/{name}"
    return data


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def publish(h: Harness, path: str, manifest: bytes) -> None:
    h.upstream.add(path, manifest, MANIFEST)
    h.upstream.behave(path, headers={"Docker-Content-Digest": digest(manifest)})


def oci_error(resp: Response, status: int) -> dict[str, Any]:
    assert resp.status == status, resp.describe()
    assert resp.header("Content-Type") == "application/json", resp.describe()
    err: dict[str, Any] = json.loads(resp.body)["errors"][0]
    return err


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(fixture_config()))


@pytest_twisted.ensureDeferred
async def test_immutable_patterns_refuse_other_images_with_403(h: Harness) -> None:
    manifest = b'{"schemaVersion": 2, "mediaType": "%s"}' % MANIFEST.encode()
    publish(h, "/v2/library/nginx/manifests/1.27", manifest)
    publish(h, "/v2/library/redis/manifests/7", manifest)
    ok = await h.get("/v2/dockerhub/library/nginx/manifests/1.27")
    assert ok.status == 200 and ok.body == manifest, ok.describe()
    refused = await h.get("/v2/dockerhub/library/redis/manifests/7")
    err = oci_error(refused, 403)
    assert err["code"] == "DENIED" and "library/redis" in err["message"]
    assert oci_error(await h.get(f"/v2/dockerhub/library/redis/blobs/{digest(b'x')}"), 403)["code"] == "DENIED"
    # Refused before anything is asked upstream.
    assert h.upstream.count("/v2/library/redis/manifests/7") == 0
    assert h.upstream.total() == 1


@pytest_twisted.ensureDeferred
async def test_mutable_ttl_is_the_tag_ttl(h: Harness) -> None:
    path = "/v2/library/nginx/manifests/latest"
    manifest = b'{"schemaVersion": 2, "mediaType": "%s", "v": 1}' % MANIFEST.encode()
    publish(h, path, manifest)
    assert (await h.get("/v2/dockerhub/library/nginx/manifests/latest")).header("X-Cache") == "MISS"
    await h.settle()
    # cache.mutable_ttl is 600 in the file (the oci default would be 300).
    h.clock.advance(599)
    fresh = await h.get("/v2/dockerhub/library/nginx/manifests/latest")
    assert fresh.header("X-Cache") == "HIT" and h.upstream.count(path, "HEAD") == 0
    h.clock.advance(2)
    moved = manifest.replace(b'"v": 1', b'"v": 2')
    publish(h, path, moved)
    again = await h.get("/v2/dockerhub/library/nginx/manifests/latest")
    assert again.body == moved and again.header("Docker-Content-Digest") == digest(moved), again.describe()
    assert h.upstream.count(path, "HEAD") == 1 and h.upstream.count(path, "GET") == 2


@pytest_twisted.ensureDeferred
async def test_the_other_remotes_serve_and_descriptions_show(h: Harness) -> None:
    h.upstream.add("/github/org/tool/releases/download/v1/tool.tgz", b"tool bytes")
    got = await h.get("/api/github/org/tool/releases/download/v1/tool.tgz")
    assert got.status == 200 and got.body == b"tool bytes", got.describe()
    # github's immutable_patterns: anything else is refused, as in the FastAPI cache.
    assert (await h.get("/api/github/org/tool/archive/main.zip")).status == 403
    h.upstream.add("/alpine/v3.20/main/x86_64/APKINDEX.tar.gz", b"index")
    assert (await h.get("/api/alpine/v3.20/main/x86_64/APKINDEX.tar.gz")).body == b"index"
    index = json.loads((await h.get("/")).body)
    listed = {r["name"]: r for r in index["remotes"]}
    assert listed["dockerhub"]["url"] == "/v2/dockerhub/" and listed["dockerhub"]["type"] == "oci"
    assert listed["images"]["type"] == "oci-local"
    assert listed["rocky"]["description"] == "Rocky Linux 9 BaseOS"
    shown = json.loads((await h.get("/config")).body)
    assert shown["remotes"]["builds"]["description"] == "Build outputs uploaded by CI"
    assert "mirror-pass" not in json.dumps(shown)
