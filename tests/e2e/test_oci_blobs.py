"""Blobs through a ``type: oci`` remote: singleflight, verification, Range, redirects.

- 8 skopeo pulls of one image at once (blob GETs held upstream for a moment so
  they overlap): each blob is fetched upstream exactly once.
- A corrupted blob (one byte flipped by the proxy in front of the registry):
  the client's connection is aborted (never a clean end), nothing is kept,
  and the next request fetches again and verifies.
- Range on a blob nobody fetched yet: 206 with Content-Range from the fetch
  in progress.
- Upstream 307 to "object storage" (another host name): followed by the
  cache, without the upstream credentials, and invisible to the client.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from tests.support.client import eventually, get_until_hit
from tests.support.registry import Fault, Front, build_image, oci_remote, running_registry, skopeo

BIG = 3 << 20


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    work = tmp_path_factory.mktemp("oci-blobs")
    with running_registry(work) as registry:
        layout = work / "layout"
        img = build_image(layout, "heavy", {"big.bin": os.urandom(BIG)}, extra_layers=[{"small": b"small layer"}])
        registry.push(layout, "heavy", "heavy/app:1")
        big = max(img.layers, key=lambda b: b.size)
        data = (layout / "blobs" / "sha256" / big.digest.split(":")[1]).read_bytes()
        yield SimpleNamespace(registry=registry, img=img, big=big, data=data)


@pytest.fixture
def cache(daemon_factory: Any, front: Front) -> Any:
    return daemon_factory({"hub": oci_remote(front.url)})


def test_eight_concurrent_pulls_fetch_each_blob_once(cache: Any, front: Front, reg: SimpleNamespace,
                                                    tmp_path: Path) -> None:
    front.fault("/blobs/", Fault(delay=1.0))
    src = f"docker://127.0.0.1:{cache.port}/hub/heavy/app:1"

    def pull(i: int) -> str:
        out = tmp_path / f"out{i}"
        skopeo("copy", "--src-tls-verify=false", src, f"oci:{out}:x", timeout=90)
        return str(json.loads((out / "index.json").read_text())["manifests"][0]["digest"])

    with ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(pull, range(8)))
    assert digests == [reg.img.digest] * 8
    for blob in reg.img.blobs():
        assert front.count("GET", f"/blobs/{blob.digest}", status=200) == 1, front.describe()
    assert front.count("GET", "/manifests/1") == 1, front.describe()


def test_digest_mismatch_aborts_the_client_and_keeps_nothing(cache: Any, front: Front, reg: SimpleNamespace,
                                                             tmp_path: Path) -> None:
    path = f"/v2/hub/heavy/app/blobs/{reg.big.digest}"
    front.fault(f"/blobs/{reg.big.digest}", Fault(corrupt=True, times=1))
    try:
        resp = cache.get(path)
    except (http.client.IncompleteRead, ConnectionError):
        pass  # aborted after the headers: the expected outcome for a 3 MiB body
    else:
        assert resp.status == 502, f"a corrupt blob ended cleanly:\n{resp.describe()}"
    eventually(lambda: cache.spool_files() == [], message="spool file of the failed fetch not removed")

    # Nothing was kept: the next request fetches again, verifies, and serves.
    good = cache.get(path)
    assert good.status == 200 and good.header("X-Cache") == "MISS", good.describe()
    assert hashlib.sha256(good.body).hexdigest() == reg.big.digest.split(":")[1]
    assert front.count("GET", f"/blobs/{reg.big.digest}") == 2, front.describe()

    # A real client fails on a corrupt small blob too (before any byte: a 502).
    small = min(reg.img.layers, key=lambda b: b.size)
    front.fault(f"/blobs/{small.digest}", Fault(corrupt=True))
    with pytest.raises(AssertionError):
        skopeo("copy", "--src-tls-verify=false", f"docker://127.0.0.1:{cache.port}/hub/heavy/app:1",
               f"oci:{tmp_path / 'bad'}:x")
    assert cache.get(f"/v2/hub/heavy/app/blobs/{small.digest}").status == 502
    # Nor does a HEAD say 200 for a blob that fails verification.
    assert cache.head(f"/v2/hub/heavy/app/blobs/{small.digest}").status == 502


def test_range_on_a_cold_blob(cache: Any, front: Front, reg: SimpleNamespace) -> None:
    path = f"/v2/hub/heavy/app/blobs/{reg.big.digest}"
    resp = cache.get(path, {"Range": "bytes=1000-1999"})
    assert resp.status == 206, resp.describe()
    assert resp.header("X-Cache") == "MISS"
    assert resp.header("Content-Range") == f"bytes 1000-1999/{reg.big.size}"
    assert resp.body == reg.data[1000:2000]
    assert resp.header("Docker-Content-Digest") == reg.big.digest
    hit = get_until_hit(cache, path, reg.data)
    assert hit.header("Content-Length") == str(reg.big.size)
    tail = cache.get(path, {"Range": "bytes=-100"})
    assert tail.status == 206 and tail.body == reg.data[-100:]
    assert front.count("GET", f"/blobs/{reg.big.digest}") == 1, front.describe()


def test_redirects_followed_server_side_without_credentials(daemon_factory: Any, front: Front,
                                                            reg: SimpleNamespace) -> None:
    cache = daemon_factory({"hub": oci_remote(front.url, credentials={"username": "u", "password": "p"})})
    front.fault("/blobs/", Fault(redirect=True))
    resp = cache.get(f"/v2/hub/heavy/app/blobs/{reg.big.digest}")
    assert resp.status == 200, resp.describe()
    assert hashlib.sha256(resp.body).hexdigest() == reg.big.digest.split(":")[1]
    first = [s for s in front.requests("GET", f"/blobs/{reg.big.digest}") if s.path.startswith("/v2/")]
    stored = front.requests("GET", "/_storage/")
    assert len(first) == 1 and first[0].status == 307 and (first[0].authorization or "").startswith("Basic ")
    assert len(stored) == 1 and stored[0].status == 200, front.describe()
    assert stored[0].authorization is None and (stored[0].host or "").startswith("localhost:")
