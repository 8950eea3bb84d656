"""A ``type: oci`` remote at its edges: vanished bodies, error formats, listings, token scopes.

- A cached blob or manifest whose body vanished from disk: HEAD never says
  200 unless the GET would succeed, and both fetch it again.
- Errors from the generic serving helpers (416 on an unsatisfiable Range)
  come in the OCI JSON form; digests of other algorithms are a clear 400.
- ``_catalog`` only lists what the remote's ``repositories`` allow, and
  upstream ``Link`` paging headers point at this daemon.
- A hung upstream costs one timeout, not one per pull of a stale tag.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from tests.support.client import Response, eventually, get_until_hit
from tests.support.registry import ALL_MANIFEST_TYPES, Fault, Front, build_image, oci_remote, running_registry

ACCEPT = {"Accept": ", ".join(ALL_MANIFEST_TYPES)}


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    work = tmp_path_factory.mktemp("oci-hardening")
    with running_registry(work) as registry:
        layout = work / "layout"
        img = build_image(layout, "img", {"data.bin": os.urandom(200_000)}, arch="amd64")
        for repo_tag in ("team/app:1", "team/app:2", "team/tool:1", "team/zzz:1", "other/secret:1"):
            registry.push(layout, "img", repo_tag)
        yield SimpleNamespace(registry=registry, img=img, layer=img.layers[0])


@pytest.fixture
def cache(daemon_factory: Any, front: Front) -> Any:
    return daemon_factory({"hub": oci_remote(front.url, repositories=[r"^team/"])})


def _oci_error(resp: Response, status: int, code: str) -> None:
    assert resp.status == status, resp.describe()
    assert (resp.header("Content-Type") or "").startswith("application/json"), resp.describe()
    if resp.body:
        assert resp.json()["errors"][0]["code"] == code, resp.describe()


def _remove_body(cache: Any, digest: str) -> None:
    found = list(Path(cache.data_dir).rglob(digest.split(":")[1]))
    assert found, f"no stored body for {digest}"
    for p in found:
        p.unlink()


def test_vanished_blob_body_is_fetched_again_not_headed_200(cache: Any, front: Front, reg: SimpleNamespace) -> None:
    path = f"/v2/hub/team/app/blobs/{reg.layer.digest}"
    get_until_hit(cache, path)
    _remove_body(cache, reg.layer.digest)
    head = cache.head(path)
    assert head.status == 200 and int(head.header("Content-Length") or 0) == reg.layer.size, head.describe()
    # The 200 was honest: the GET that follows has the body.
    resp = cache.get(path)
    assert resp.status == 200, resp.describe()
    assert "sha256:" + hashlib.sha256(resp.body).hexdigest() == reg.layer.digest
    assert front.count("GET", f"/blobs/{reg.layer.digest}", status=200) == 2, front.describe()


def test_vanished_manifest_body_is_fetched_again(cache: Any, front: Front, reg: SimpleNamespace) -> None:
    path = "/v2/hub/team/app/manifests/1"
    first = cache.get(path, ACCEPT)
    assert first.status == 200 and first.header("Docker-Content-Digest") == reg.img.digest, first.describe()
    _remove_body(cache, reg.img.digest)
    for method in ("HEAD", "GET"):
        resp = cache.request(method, path, headers=ACCEPT)
        assert resp.status == 200, f"{method}: {resp.describe()}"
        assert resp.header("Docker-Content-Digest") == reg.img.digest
    assert resp.body == first.body
    by_digest = cache.get(f"/v2/hub/team/app/manifests/{reg.img.digest}", ACCEPT)
    assert by_digest.status == 200 and by_digest.body == first.body, by_digest.describe()
    # Listings too.
    tags = get_until_hit(cache, "/v2/hub/team/app/tags/list")
    _remove_body(cache, "sha256:" + hashlib.sha256(tags.body).hexdigest())
    assert cache.head("/v2/hub/team/app/tags/list").status == 200
    again = cache.get("/v2/hub/team/app/tags/list")
    assert again.status == 200 and again.json() == tags.json(), again.describe()


def test_serving_errors_are_oci_json(cache: Any, front: Front, reg: SimpleNamespace) -> None:
    path = f"/v2/hub/team/app/blobs/{reg.layer.digest}"
    # Cold and cached: an unsatisfiable Range is RANGE_INVALID, with the size.
    for _ in range(2):
        resp = cache.get(path, {"Range": f"bytes={reg.layer.size + 10}-"})
        _oci_error(resp, 416, "RANGE_INVALID")
        assert resp.header("Content-Range") == f"bytes */{reg.layer.size}", resp.describe()
        get_until_hit(cache, path)
    other = "sha512:" + "ab" * 64
    _oci_error(cache.get(f"/v2/hub/team/app/blobs/{other}"), 400, "UNSUPPORTED")
    _oci_error(cache.head(f"/v2/hub/team/app/blobs/{other}"), 400, "UNSUPPORTED")
    _oci_error(cache.get(f"/v2/hub/team/app/manifests/{other}", ACCEPT), 400, "UNSUPPORTED")
    assert front.count("GET", "sha512") == 0, front.describe()


def _follow(cache: Any, path: str, key: str) -> tuple[list[str], list[str]]:
    """Every page's items and the Link paths that led to them."""
    items: list[str] = []
    links: list[str] = []
    while True:
        resp = cache.get(path)
        assert resp.status == 200, resp.describe()
        items += resp.json()[key] or []
        link = resp.header("Link")
        if not link:
            return items, links
        assert link.startswith("<") and 'rel="next"' in link, link
        path = link[1:link.index(">")]
        links.append(path)
        assert len(links) < 10, links


def test_catalog_is_filtered_and_paging_links_point_here(cache: Any, front: Front, reg: SimpleNamespace) -> None:
    resp = cache.get("/v2/hub/_catalog")
    assert resp.status == 200, resp.describe()
    assert resp.json()["repositories"] == ["team/app", "team/tool", "team/zzz"]
    repos, links = _follow(cache, "/v2/hub/_catalog?n=2", "repositories")
    assert repos == ["team/app", "team/tool", "team/zzz"], (repos, links)
    assert links and all(p.startswith("/v2/hub/_catalog?") and "n=2" in p for p in links), links
    assert not any(front.url in p for p in links)
    # This registry's tags/list may ignore n (older distribution); the rewrite
    # itself is covered in tests/unit/test_oci_mirror.py.
    tags, links = _follow(cache, "/v2/hub/team/app/tags/list?n=1", "tags")
    assert sorted(tags) == ["1", "2"], (tags, links)
    assert all(p.startswith("/v2/hub/team/app/tags/list?") for p in links), links


def _upstream_timeouts(cache: Any) -> float:
    text = cache.get("/metrics").body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sparkcache_upstream_requests") and "_created" not in line
               and 'status="timeout"' in line)


def test_unreachable_upstream_is_not_asked_again_for_every_stale_tag(daemon_factory: Any, front: Front,
                                                                      reg: SimpleNamespace) -> None:
    cache = daemon_factory({"hub": oci_remote(front.url, tag_ttl="1s", read_timeout="1s")})
    path = "/v2/hub/team/tool/manifests/1"
    assert cache.get(path, ACCEPT).status == 200
    front.fault("/manifests/1", Fault(delay=3.0))  # longer than read_timeout: a hung upstream

    def stale() -> Response | None:
        r = cache.get(path, ACCEPT)
        assert r.status == 200, r.describe()
        return r if r.header("X-Cache") == "STALE" else None

    first = eventually(stale, timeout=20, interval=0.2)
    assert first.header("Docker-Content-Digest") == reg.img.digest
    assert _upstream_timeouts(cache) == 1
    # The next pulls are answered from the cache at once, with no new wait on upstream.
    for _ in range(3):
        again = cache.get(path, ACCEPT)
        assert again.status == 200 and again.header("X-Cache") == "STALE", again.describe()
    assert _upstream_timeouts(cache) == 1
