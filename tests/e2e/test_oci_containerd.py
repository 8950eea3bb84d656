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
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from tests.support.registry import Front, Registry, build_image, build_index, oci_remote
from tests.support.tools import require_tool

# The upstream fallback of hosts.toml: a closed port, so only the cache can answer.
NOWHERE = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    require_tool("docker-registry")
    require_tool("skopeo")
    work = tmp_path_factory.mktemp("oci-ctr")
    registry = Registry(work / "registry").start()
    layout = work / "layout"
    amd = build_image(layout, "amd", {"bin/tool": os.urandom(200_000)}, arch="amd64")
    arm = build_image(layout, "arm", {"bin/tool": os.urandom(200_000)}, arch="arm64")
    idx = build_index(layout, "multi", [amd, arm])
    try:
        registry.push(layout, "multi", "library/busy:1.0")
        registry.push(layout, "multi", "team/app:1.0")
        yield SimpleNamespace(registry=registry, idx=idx, amd=amd, arm=arm)
    finally:
        registry.stop()


@pytest.fixture(scope="module")
def containerd() -> Iterator[SimpleNamespace]:
    require_tool("containerd")
    require_tool("ctr")
    if os.geteuid() != 0:
        pytest.skip("containerd needs root here (it mounts snapshots); the tests run unprivileged")
    # A short path: the socket's must fit in sockaddr_un (108 bytes).
    base = Path(tempfile.mkdtemp(prefix="sc-ctrd-", dir="/tmp"))
    sock = base / "c.sock"
    (base / "config.toml").write_text(f"""version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
""")
    log = open(base / "containerd.log", "wb")
    proc = subprocess.Popen(["containerd", "--config", str(base / "config.toml")], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    log.close()
    try:
        deadline = time.monotonic() + 20
        while True:
            ok = sock.exists() and subprocess.run(["ctr", "--address", str(sock), "version"], capture_output=True,
                                                  timeout=10).returncode == 0
            if ok:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (base / "containerd.log").read_text(errors="replace")[-2000:]
                pytest.skip(f"containerd could not start on this runner:\n{why}")
            time.sleep(0.1)
        yield SimpleNamespace(sock=sock, base=base)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        subprocess.run(["umount", "-R", str(base / "root")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def front(reg: SimpleNamespace) -> Iterator[Front]:
    f = Front(reg.registry.url).start()
    yield f
    f.stop()


def _ctr(ctrd: SimpleNamespace, namespace: str, *args: str) -> str:
    cmd = ["ctr", "--address", str(ctrd.sock), "-n", namespace, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _hosts(tmp_path: Path, registry: str, body: str) -> Path:
    d = tmp_path / "hosts"
    (d / registry).mkdir(parents=True, exist_ok=True)
    (d / registry / "hosts.toml").write_text(body)
    return d


def _digest(ctrd: SimpleNamespace, namespace: str, ref: str) -> str:
    for line in _ctr(ctrd, namespace, "images", "ls").splitlines()[1:]:
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
    _ctr(containerd, "first", "image", "pull", "--hosts-dir", str(hosts), ref)
    assert _digest(containerd, "first", ref) == reg.idx.digest
    # containerd asked with ?ns=docker.io; upstream saw plain names, without ns.
    assert front.count("GET", "/v2/library/busy/manifests/1.0") == 1, front.describe()
    assert not any("ns=" in s.path for s in front.requests()), front.describe()
    before = {b.digest: front.count("GET", f"/blobs/{b.digest}", status=200) for b in reg.amd.blobs()}
    assert all(n == 1 for n in before.values()), front.describe()

    # A second containerd namespace pulls everything from the cache.
    _ctr(containerd, "second", "image", "pull", "--hosts-dir", str(hosts), ref)
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
    _ctr(containerd, "prefix", "image", "pull", "--hosts-dir", str(hosts), ref)
    assert _digest(containerd, "prefix", ref) == reg.idx.digest
    assert front.count("GET", "/v2/team/app/manifests/1.0") == 1, front.describe()
