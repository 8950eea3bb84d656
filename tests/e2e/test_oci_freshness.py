"""Tags on a ``type: oci`` remote: TTL, HEAD revalidation, moved tags, stale-on-error.

The remote's ``tag_ttl`` is one second. Once it lapses, the cache asks the
upstream with a HEAD (which Docker Hub does not count as a pull) and fetches
the manifest again only when ``Docker-Content-Digest`` changed. When the
upstream is down or answers 5xx/429, the last known digest is served
(``X-Cache: STALE``) and skopeo still pulls the image from the cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from tests.support.client import Response, eventually
from tests.support.registry import ALL_MANIFEST_TYPES, Fault, Front, build_image, oci_remote, running_registry, skopeo

ACCEPT = {"Accept": ", ".join(ALL_MANIFEST_TYPES)}


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    work = tmp_path_factory.mktemp("oci-fresh")
    with running_registry(work) as registry:
        layout = work / "layout"
        one = build_image(layout, "one", {"v": b"one" + os.urandom(50_000)})
        two = build_image(layout, "two", {"v": b"two" + os.urandom(50_000)})
        yield SimpleNamespace(registry=registry, layout=layout, one=one, two=two)


@pytest.fixture
def cache(daemon_factory: Any, front: Front) -> Any:
    return daemon_factory({"hub": oci_remote(front.url, tag_ttl="1s")})


def _state(cache: Any, path: str, state: str) -> Response:
    """Poll ``path`` until it answers 200 with X-Cache ``state`` (the TTL has to lapse first)."""
    def probe() -> Response | None:
        r = cache.get(path, ACCEPT)
        assert r.status == 200, r.describe()
        return r if r.header("X-Cache") == state else None

    resp: Response = eventually(probe, timeout=20, interval=0.2, message=f"{path} never answered X-Cache: {state}")
    return resp


def test_tag_revalidated_with_head_and_refetched_when_moved(cache: Any, front: Front, reg: SimpleNamespace) -> None:
    reg.registry.push(reg.layout, "one", "moving/app:latest")
    path = "/v2/hub/moving/app/manifests/latest"
    first = cache.get(path, ACCEPT)
    assert first.status == 200 and first.header("X-Cache") == "MISS", first.describe()
    assert first.header("Docker-Content-Digest") == reg.one.digest

    # Unchanged upstream: a HEAD refreshes the tag, no second GET.
    again = _state(cache, path, "REVALIDATED")
    assert again.header("Docker-Content-Digest") == reg.one.digest and again.body == first.body
    assert front.count("HEAD", "/manifests/latest", status=200) >= 1, front.describe()
    assert front.count("GET", "/manifests/latest") == 1, front.describe()

    # Moved upstream: after the TTL the new digest is fetched and served.
    reg.registry.push(reg.layout, "two", "moving/app:latest")
    moved = eventually(lambda: (r := cache.get(path, ACCEPT)).header("Docker-Content-Digest") == reg.two.digest and r,
                       timeout=20, interval=0.2)
    assert hashlib.sha256(moved.body).hexdigest() == reg.two.digest.split(":")[1]
    assert front.count("GET", "/manifests/latest") == 2, front.describe()
    # The old manifest stays available by digest, from the cache.
    old = cache.get(f"/v2/hub/moving/app/manifests/{reg.one.digest}", ACCEPT)
    assert old.status == 200 and old.header("X-Cache") == "HIT", old.describe()
    assert front.count("GET", f"/manifests/{reg.one.digest}") == 0


def test_stale_tag_served_when_upstream_fails_or_is_gone(cache: Any, front: Front, reg: SimpleNamespace,
                                                         tmp_path: Path) -> None:
    reg.registry.push(reg.layout, "one", "steady/app:1")
    src = f"docker://127.0.0.1:{cache.port}/hub/steady/app:1"
    skopeo("copy", "--src-tls-verify=false", src, f"oci:{tmp_path / 'warm'}:x")
    path = "/v2/hub/steady/app/manifests/1"

    front.fault("/manifests/1", Fault(status=503))
    stale = _state(cache, path, "STALE")
    assert stale.header("Docker-Content-Digest") == reg.one.digest
    front.clear()
    front.fault("/manifests/1", Fault(status=429))
    assert cache.get(path, ACCEPT).header("X-Cache") == "STALE"

    front.stop()  # connection refused from now on
    skopeo("copy", "--src-tls-verify=false", src, f"oci:{tmp_path / 'offline'}:x")
    raw = skopeo("inspect", "--raw", "--tls-verify=false", src).stdout.encode()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == reg.one.digest


def test_tag_deleted_upstream_is_not_served_stale(cache: Any, front: Front, reg: SimpleNamespace) -> None:
    reg.registry.push(reg.layout, "two", "gone/app:1")
    path = "/v2/hub/gone/app/manifests/1"
    assert cache.get(path, ACCEPT).status == 200
    front.fault("/manifests/1", Fault(status=404))
    # A 404 is an answer, not an outage: it passes through once the TTL lapses.
    resp = eventually(lambda: (r := cache.get(path, ACCEPT)).status == 404 and r, timeout=20, interval=0.2)
    assert resp.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
