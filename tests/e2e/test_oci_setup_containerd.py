"""A real containerd using what /setup hands out, and pushing to a type: oci-local remote.

containerd runs as a private daemon (temporary root, state and socket; CRI
off). The ``hosts.toml`` from ``/setup/containerd`` is used as served, except
that its upstream fallback (``server``) is pointed at a closed port so the
test can never reach the internet. Then ``ctr image push`` sends the pulled
image into an ``oci-local`` repository: containerd's pusher (HEAD, POST,
one PUT per blob) and its token handshake (the 401 challenge, the OAuth2
form post to ``/setup/token``). Needs root (containerd mounts snapshots);
skipped otherwise, with the reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from tests.support.registry import Registry, build_image, build_index, oci_remote, skopeo
from tests.support.tools import require_tool

NOWHERE = "http://127.0.0.1:9"
WRITE = "ctrd-wr-8e31d2"


@pytest.fixture(scope="module")
def containerd() -> Iterator[SimpleNamespace]:
    require_tool("containerd")
    require_tool("ctr")
    if os.geteuid() != 0:
        pytest.skip("containerd needs root here (it mounts snapshots)")
    base = Path(tempfile.mkdtemp(prefix="sc-ctrs-", dir="/tmp"))  # short: the socket path must fit sockaddr_un
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
    with open(base / "containerd.log", "wb") as log:
        proc = subprocess.Popen(["containerd", "--config", str(base / "config.toml")], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (sock.exists() and subprocess.run(["ctr", "--address", str(sock), "version"], capture_output=True,
                                                    timeout=10).returncode == 0):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip("containerd could not start here:\n"
                            + (base / "containerd.log").read_text(errors="replace")[-2000:])
            time.sleep(0.1)
        yield SimpleNamespace(sock=sock)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        subprocess.run(["umount", "-R", str(base / "root")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def ctr(c: SimpleNamespace, *args: str) -> str:
    cmd = ["ctr", "--address", str(c.sock), "-n", "setup", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def test_setup_hosts_toml_pull_then_push_to_oci_local(containerd: SimpleNamespace, daemon_factory: Any,
                                                      tmp_path: Path) -> None:
    require_tool("docker-registry")
    require_tool("skopeo")
    registry = Registry(tmp_path / "registry").start()
    try:
        layout = tmp_path / "layout"
        amd = build_image(layout, "amd", {"bin/tool": os.urandom(150_000)}, arch="amd64")
        arm = build_image(layout, "arm", {"bin/tool": os.urandom(150_000)}, arch="arm64")
        idx = build_index(layout, "multi", [amd, arm])
        registry.push(layout, "multi", "library/tool:2.0")
        cache = daemon_factory({"hub": oci_remote(registry.url, registries=["docker.io"]), "loc": {"type": "oci-local"}},
                               env={"SPARKCACHE_WRITE_TOKEN": WRITE})

        snippet = cache.get("/setup/containerd?registry=docker.io")
        assert snippet.status == 200, snippet.describe()
        text = snippet.body.decode()
        assert 'server = "https://registry-1.docker.io"' in text
        hosts = tmp_path / "hosts" / "docker.io"
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(text.replace("https://registry-1.docker.io", NOWHERE))

        ref = "docker.io/library/tool:2.0"
        ctr(containerd, "image", "pull", "--all-platforms", "--hosts-dir", str(tmp_path / "hosts"), ref)
        listed = [line.split() for line in ctr(containerd, "images", "ls").splitlines()[1:]]
        assert [cols[2] for cols in listed if cols and cols[0] == ref] == [idx.digest]

        # Push it on into a local repository: an index, two manifests, their blobs.
        dest = f"127.0.0.1:{cache.port}/loc/mirrored/tool:2.0"
        ctr(containerd, "images", "push", "--plain-http", "--user", f"ci:{WRITE}", dest, ref)
        raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{dest}").stdout
        assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == idx.digest
        head = cache.head(f"/v2/loc/mirrored/tool/manifests/{arm.digest}")
        assert head.status == 200, head.describe()
        # Without credentials containerd's push is refused.
        proc = subprocess.run(["ctr", "--address", str(containerd.sock), "-n", "setup", "images", "push",
                               "--plain-http", f"127.0.0.1:{cache.port}/loc/other:1", ref],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode != 0 and cache.head("/v2/loc/other/manifests/1").status == 404
    finally:
        registry.stop()
