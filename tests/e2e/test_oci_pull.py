"""A ``type: oci`` remote in front of a real registry (distribution's ``docker-registry``).

Images are built offline into an OCI layout (tests/support/registry.py) and
pushed with skopeo: a two-platform OCI index and a single-platform Docker
schema 2 image. Between the cache and the registry sits a counting proxy
(:class:`Front`), so tests can tell what reached upstream.

Covered here: skopeo through path routing by tag and by digest (digests equal
to upstream's, every blob fetched once), containerd's ``?ns=`` routing with
``OCI-Namespace``, Docker Hub's implicit ``library/``, the docker.io default,
HEAD, Accept negotiation, allow-patterns (403), OCI error bodies, tags/list
and _catalog.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from tests.support.client import Response, get_until_hit
from tests.support.registry import (
    ALL_MANIFEST_TYPES, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Front, build_image, build_index,
    oci_remote, running_registry, skopeo,
)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    work = tmp_path_factory.mktemp("oci-pull")
    with running_registry(work) as registry:
        layout = work / "layout"
        amd = build_image(layout, "amd", {"bin/tool": os.urandom(300_000)}, arch="amd64",
                          extra_layers=[{"etc/conf": b"shared layer"}])
        arm = build_image(layout, "arm", {"bin/tool": os.urandom(200_000)}, arch="arm64",
                          extra_layers=[{"etc/conf": b"shared layer"}])
        idx = build_index(layout, "multi", [amd, arm])
        single = build_image(layout, "single", {"hello.txt": b"hello"}, arch="amd64")
        registry.push(layout, "multi", "library/busy:1.0")
        registry.push(layout, "multi", "team/app:1.0")
        registry.push(layout, "single", "team/single:v1", fmt="v2s2")
        status, headers, body = registry.manifest("team/single", "v1")
        assert status == 200
        yield SimpleNamespace(registry=registry, layout=layout, idx=idx, amd=amd, arm=arm,
                              single_digest=headers["docker-content-digest"], single_body=body, work=work)


@pytest.fixture
def cache(daemon_factory: Any, front: Front) -> Any:
    return daemon_factory({
        "hub": oci_remote(front.url, registries=["docker.io"], repositories=[r"^(library/)?busy$", r"^team/"]),
    })


def _errors(resp: Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, resp.describe()
    assert (resp.header("Content-Type") or "").startswith("application/json"), resp.describe()
    doc = resp.json()
    assert doc["errors"][0]["code"] == code, resp.describe()
    return doc


def _all_types() -> dict[str, str]:
    return {"Accept": ", ".join(ALL_MANIFEST_TYPES)}


def test_skopeo_by_tag_and_by_digest_through_path_routing(cache: Any, front: Front, reg: SimpleNamespace,
                                                         tmp_path: Path) -> None:
    src = f"docker://127.0.0.1:{cache.port}/hub/team/app"
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"{src}:1.0").stdout.encode()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == reg.idx.digest
    status, headers, upstream_body = reg.registry.manifest("team/app", "1.0")
    assert raw == upstream_body and headers["docker-content-digest"] == reg.idx.digest

    skopeo("copy", "--all", "--src-tls-verify=false", f"{src}:1.0", f"oci:{tmp_path / 'by-tag'}:x")
    skopeo("copy", "--all", "--src-tls-verify=false", f"{src}@{reg.idx.digest}", f"oci:{tmp_path / 'by-digest'}:x")
    for out in ("by-tag", "by-digest"):
        index = json.loads((tmp_path / out / "index.json").read_text())
        assert index["manifests"][0]["digest"] == reg.idx.digest

    # Every blob came from upstream exactly once, though two full copies ran.
    for blob in {b.digest for b in reg.idx.blobs()}:
        assert front.count("GET", f"/blobs/{blob}", status=200) == 1, front.describe()
    # The index fetched by tag was stored under its digest too: no GET by digest.
    assert front.count("GET", f"/manifests/{reg.idx.digest}") == 0, front.describe()
    for child in (reg.amd, reg.arm):
        assert front.count("GET", f"/manifests/{child.digest}") == 1, front.describe()


def test_ns_routing_docker_hub_library_and_default(cache: Any, front: Front, reg: SimpleNamespace) -> None:
    resp = cache.get("/v2/busy/manifests/1.0?ns=docker.io", _all_types())
    assert resp.status == 200, resp.describe()
    assert resp.header("OCI-Namespace") == "docker.io"
    assert resp.header("Docker-Content-Digest") == reg.idx.digest
    assert front.count("GET", "/v2/library/busy/manifests/1.0") == 1, front.describe()
    # No ns (dockerd's registry-mirrors): the remote serving docker.io; an
    # RKE2-style rewrite prefix on top of ns; the registry host as a path prefix.
    for path in ("/v2/library/busy/manifests/1.0", "/v2/hub/library/busy/manifests/1.0?ns=docker.io",
                 "/v2/docker.io/busy/manifests/1.0"):
        resp = cache.get(path, _all_types())
        assert resp.status == 200, f"{path}: {resp.describe()}"
        assert resp.header("Docker-Content-Digest") == reg.idx.digest
        assert resp.header("X-Cache") == "HIT", f"{path}: {resp.describe()}"
    assert front.count("GET", "/manifests/") == 1, front.describe()
    # Blobs by ns as well.
    blob = reg.amd.layers[0]
    resp = cache.get(f"/v2/busy/blobs/{blob.digest}?ns=docker.io")
    assert resp.status == 200 and hashlib.sha256(resp.body).hexdigest() == blob.digest.split(":")[1]
    _errors(cache.get("/v2/busy/manifests/1.0?ns=quay.io"), 404, "NAME_UNKNOWN")


def test_head_answers_like_get_without_body(cache: Any, front: Front, reg: SimpleNamespace) -> None:
    head = cache.head("/v2/hub/team/app/manifests/1.0", _all_types())
    assert head.status == 200 and head.body == b"", head.describe()
    get = cache.get("/v2/hub/team/app/manifests/1.0", _all_types())
    assert get.status == 200
    for name in ("Content-Type", "Content-Length", "Docker-Content-Digest"):
        assert head.header(name) == get.header(name), name
    assert int(get.header("Content-Length") or 0) == len(get.body) == reg.idx.size
    assert get.header("Content-Type") == OCI_INDEX
    assert get.header("Docker-Distribution-API-Version") == "registry/2.0"
    # Never 200 on HEAD unless GET would succeed.
    missing = cache.head("/v2/hub/team/app/manifests/nope", _all_types())
    assert missing.status == 404 and missing.body == b"", missing.describe()
    assert cache.head(f"/v2/hub/team/app/manifests/sha256:{'0' * 64}").status == 404
    blob = reg.arm.layers[0]
    bh = cache.head(f"/v2/hub/team/app/blobs/{blob.digest}")
    assert bh.status == 200 and bh.body == b"", bh.describe()
    assert bh.header("Docker-Content-Digest") == blob.digest
    assert int(bh.header("Content-Length") or 0) == blob.size
    assert cache.head(f"/v2/hub/team/app/blobs/sha256:{'1' * 64}").status == 404


def test_accept_negotiation(cache: Any, front: Front, reg: SimpleNamespace) -> None:
    path = "/v2/hub/team/single/manifests/v1"
    extra = "application/vnd.example.artifact+json"
    # Docker schema 2 in the store; the upstream was asked with the four types
    # plus what the client added.
    resp = cache.get(path, {"Accept": f"{DOCKER_MANIFEST}, {extra}"})
    assert resp.status == 200, resp.describe()
    assert resp.header("Content-Type") == DOCKER_MANIFEST
    assert resp.header("Docker-Content-Digest") == reg.single_digest and resp.body == reg.single_body
    sent = front.requests("GET", "/manifests/v1")[0].header("accept") or ""
    for t in (*ALL_MANIFEST_TYPES, extra):
        assert t in sent, sent
    # Served from the cache only to clients that accept its type.
    _errors(cache.get(path, {"Accept": OCI_MANIFEST}), 404, "MANIFEST_UNKNOWN")
    assert cache.get(path).status == 200  # no Accept: anything
    assert cache.get(path, {"Accept": "*/*"}).status == 200
    by_digest = f"/v2/hub/team/single/manifests/{reg.single_digest}"
    assert cache.get(by_digest, {"Accept": DOCKER_MANIFEST}).body == reg.single_body
    _errors(cache.get(by_digest, {"Accept": OCI_INDEX}), 404, "MANIFEST_UNKNOWN")
    # An index is not given to a client that only takes single manifests.
    _errors(cache.get("/v2/hub/team/app/manifests/1.0", {"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"}),
            404, "MANIFEST_UNKNOWN")
    assert front.count("GET", "/manifests/") == 2, front.describe()


def test_allow_patterns_and_errors(cache: Any, front: Front, reg: SimpleNamespace) -> None:
    _errors(cache.get("/v2/hub/other/thing/manifests/1.0"), 403, "DENIED")
    _errors(cache.get("/v2/hub/other/thing/blobs/" + reg.amd.layers[0].digest), 403, "DENIED")
    _errors(cache.get("/v2/hub/other/tags/list"), 403, "DENIED")
    assert front.count() == 0, front.describe()
    _errors(cache.get("/v2/hub/team/App/manifests/1.0"), 400, "NAME_INVALID")
    _errors(cache.get("/v2/hub/team/app/manifests/nope"), 404, "MANIFEST_UNKNOWN")
    _errors(cache.get(f"/v2/hub/team/app/blobs/sha256:{'2' * 64}"), 404, "BLOB_UNKNOWN")
    _errors(cache.get("/v2/hub/team/app/blobs/sha256:xyz"), 400, "DIGEST_INVALID")
    _errors(cache.request("PUT", "/v2/hub/team/app/manifests/2.0", body=b"{}"), 405, "UNSUPPORTED")
    _errors(cache.request("POST", "/v2/hub/team/app/blobs/uploads/"), 405, "UNSUPPORTED")
    _errors(cache.get("/v2/hub/team/app/nothing/here"), 404, "NAME_UNKNOWN")
    base = cache.get("/v2/")
    assert base.status == 200 and base.header("Docker-Distribution-API-Version") == "registry/2.0"


def test_tags_list_and_catalog(cache: Any, front: Front, reg: SimpleNamespace) -> None:
    resp = get_until_hit(cache, "/v2/hub/team/app/tags/list")
    assert resp.json()["tags"] == ["1.0"]
    assert front.count("GET", "/tags/list") == 1
    resp = cache.get("/v2/busy/tags/list?ns=docker.io&n=10")
    assert resp.status == 200 and resp.json()["tags"] == ["1.0"], resp.describe()
    assert front.count("GET", "/v2/library/busy/tags/list?n=10") == 1, front.describe()
    _errors(cache.get("/v2/hub/team/missing/tags/list"), 404, "NAME_UNKNOWN")
    for path in ("/v2/_catalog?ns=docker.io", "/v2/hub/_catalog"):
        resp = cache.get(path)
        assert resp.status == 200, resp.describe()
        assert {"library/busy", "team/app", "team/single"} <= set(resp.json()["repositories"])
    assert front.count("GET", "/_catalog") == 1
