"""A real containerd pulling through a ``type: oci`` remote, configured with ``--hosts-dir``.

containerd runs as a private daemon (temporary root, state and socket; the
CRI plugin off). ``ctr image pull --hosts-dir`` reads a ``hosts.toml`` that
names the cache as a mirror of ``docker.io`` — containerd then sends
``?ns=docker.io`` on every request — or, RKE2-style, as a host with a path
prefix (``override_path``) for a registry the cache does not list. Needs root
(containerd mounts snapshots when it unpacks); skipped otherwise, with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from tests.support.containerd import ctr
from tests.support.registry import Front, build_image, build_index, oci_remote, running_registry

# The upstream fallback of hosts.toml: a closed port, so only the cache can answer.
NOWHERE = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    work = tmp_path_factory.mktemp("oci-ctr")
    with running_registry(work) as registry:
        layout = work / "layout"
        amd = build_image(layout, "amd", {"bin/tool": os.urandom(200_000)}, arch="amd64")
        arm = build_image(layout, "arm", {"bin/tool": os.urandom(200_000)}, arch="arm64")
        idx = build_index(layout, "multi", [amd, arm])
        registry.push(layout, "multi", "library/busy:1.0")
        registry.push(layout, "multi", "team/app:1.0")
        yield SimpleNamespace(registry=registry, idx=idx, amd=amd, arm=arm)


def _hosts(tmp_path: Path, registry: str, body: str) -> Path:
    d = tmp_path / "hosts"
    (d / registry).mkdir(parents=True, exist_ok=True)
    (d / registry / "hosts.toml").write_text(body)
    return d


def _digest(ctrd: SimpleNamespace, namespace: str, ref: str) -> str:
    for line in ctr(ctrd, namespace, "images", "ls").splitlines()[1:]:
        cols = line.split()
        if cols and cols[0] == ref:
            return cols[2]
    raise AssertionError(f"{ref} not in ctr images ls")


def test_ctr_pull_through_a_docker_io_mirror(containerd: SimpleNamespace, daemon_factory: Any, front: Front,
                                            reg: SimpleNamespace, tmp_path: Path) -> None:
    cache = daemon_factory({"hub": oci_remote(front.url, registries=["docker.io"])})
    hosts = _hosts(tmp_path, "docker.io", f'server = "{NOWHERE}"\n'
                                          f'[host."http://127.0.0.1:{cache.port}"]\n'
                                          '  capabilities = ["pull", "resolve"]\n')
    ref = "docker.io/library/busy:1.0"
    ctr(containerd, "first", "image", "pull", "--hosts-dir", str(hosts), ref)
    assert _digest(containerd, "first", ref) == reg.idx.digest
    # containerd asked with ?ns=docker.io; upstream saw plain names, without ns.
    assert front.count("GET", "/v2/library/busy/manifests/1.0") == 1, front.describe()
    assert not any("ns=" in s.path for s in front.requests()), front.describe()
    before = {b.digest: front.count("GET", f"/blobs/{b.digest}", status=200) for b in reg.amd.blobs()}
    assert all(n == 1 for n in before.values()), front.describe()

    # A second containerd namespace pulls everything from the cache.
    ctr(containerd, "second", "image", "pull", "--hosts-dir", str(hosts), ref)
    assert _digest(containerd, "second", ref) == reg.idx.digest
    assert {b.digest: front.count("GET", f"/blobs/{b.digest}", status=200) for b in reg.amd.blobs()} == before
    assert front.count("GET", "/manifests/") == 2, front.describe()  # the index and the amd64 manifest, once


def test_ctr_pull_with_a_path_prefix_rewrite(containerd: SimpleNamespace, daemon_factory: Any, front: Front,
                                            reg: SimpleNamespace, tmp_path: Path) -> None:
    cache = daemon_factory({"hub": oci_remote(front.url)})
    hosts = _hosts(tmp_path, "registry.example", f'server = "{NOWHERE}"\n'
                                                 f'[host."http://127.0.0.1:{cache.port}/v2/hub"]\n'
                                                 '  capabilities = ["pull", "resolve"]\n'
                                                 '  override_path = true\n')
    ref = "registry.example/team/app:1.0"
    ctr(containerd, "prefix", "image", "pull", "--hosts-dir", str(hosts), ref)
    assert _digest(containerd, "prefix", ref) == reg.idx.digest
    assert front.count("GET", "/v2/team/app/manifests/1.0") == 1, front.describe()
