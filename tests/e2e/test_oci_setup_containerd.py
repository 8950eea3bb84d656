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
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tests.support.containerd import ctr
from tests.support.registry import build_image, build_index, oci_remote, running_registry, skopeo

NOWHERE = "http://127.0.0.1:9"
WRITE = "ctrd-wr-8e31d2"


def test_setup_hosts_toml_pull_then_push_to_oci_local(containerd: SimpleNamespace, daemon_factory: Any,
                                                      tmp_path: Path) -> None:
    with running_registry(tmp_path) as registry:
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
        ctr(containerd, "setup", "image", "pull", "--all-platforms", "--hosts-dir", str(tmp_path / "hosts"), ref)
        listed = [line.split() for line in ctr(containerd, "setup", "images", "ls").splitlines()[1:]]
        assert [cols[2] for cols in listed if cols and cols[0] == ref] == [idx.digest]

        # Push it on into a local repository: an index, two manifests, their blobs.
        dest = f"127.0.0.1:{cache.port}/loc/mirrored/tool:2.0"
        ctr(containerd, "setup", "images", "push", "--plain-http", "--user", f"ci:{WRITE}", dest, ref)
        raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{dest}").stdout
        assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == idx.digest
        head = cache.head(f"/v2/loc/mirrored/tool/manifests/{arm.digest}")
        assert head.status == 200, head.describe()
        # Without credentials containerd's push is refused.
        proc = subprocess.run(["ctr", "--address", str(containerd.sock), "-n", "setup", "images", "push",
                               "--plain-http", f"127.0.0.1:{cache.port}/loc/other:1", ref],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode != 0 and cache.head("/v2/loc/other/manifests/1").status == 404
