"""Build OCI image layouts offline, in pure Python, for push/pull tests and benchmarks.

``build_image(layout, tag, layer_sizes)`` writes an OCI image layout
(``oci-layout``, ``index.json``, ``blobs/sha256/...``) holding one image whose
layers are uncompressed tar archives of pseudo-random bytes (so nothing
compresses them away and every layer has a distinct digest). skopeo reads it
as ``oci:<layout>:<tag>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class Image:
    layout: Path
    tag: str
    manifest_digest: str
    manifest: bytes
    config_digest: str
    layer_digests: tuple[str, ...]
    size: int  # manifest + config + layers, bytes

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


def _write_blob(layout: Path, data: bytes) -> str:
    hexd = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / hexd
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return f"sha256:{hexd}"


def _write_blob_file(layout: Path, src: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    dest = layout / "blobs" / "sha256" / h.hexdigest()
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
    return f"sha256:{h.hexdigest()}", dest.stat().st_size


def _layer(layout: Path, size: int, rng: random.Random, index: int) -> tuple[str, int, str]:
    """(digest, size, diff_id) of a tar layer with one file of ``size`` random bytes, streamed to disk."""
    tmp = layout / f"layer-{index}.tmp"

    class _Random:
        def __init__(self, n: int) -> None:
            self.left = n

        def read(self, n: int = -1) -> bytes:
            n = self.left if n < 0 else min(n, self.left)
            self.left -= n
            return rng.randbytes(n)

    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"data/layer-{index}.bin")
        info.size = size
        info.mtime = 0
        info.mode = 0o644
        tar.addfile(info, _Random(size))  # type: ignore[arg-type]
    digest, n = _write_blob_file(layout, tmp)
    return digest, n, digest  # uncompressed: the diff_id is the blob digest


def build_image(layout: Path | str, tag: str, layer_sizes: list[int], seed: int = 0) -> Image:
    """Write (or add to) an OCI layout at ``layout`` with one image tagged ``tag``."""
    layout = Path(layout)
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    rng = random.Random(f"{seed}:{tag}")
    layers = [_layer(layout, size, rng, i) for i, size in enumerate(layer_sizes)]
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [diff for _, _, diff in layers]},
        "history": [{"created_by": f"sparkcache test layer {i}"} for i in range(len(layers))],
    }, sort_keys=True).encode()
    config_digest = _write_blob(layout, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": n} for d, n, _ in layers],
    }, sort_keys=True).encode()
    manifest_digest = _write_blob(layout, manifest)
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    index["manifests"].append({"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest),
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    index_path.write_text(json.dumps(index))
    return Image(layout, tag, manifest_digest, manifest, config_digest, tuple(d for d, _, _ in layers),
                 len(manifest) + len(config) + sum(n for _, n, _ in layers))


def blob_path(layout: Path | str, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    return Path(layout) / "blobs" / algo / hexd


def layout_manifest_digest(layout: Path | str, tag: str) -> str:
    """The manifest digest that ``tag`` names in an OCI layout (e.g. one skopeo wrote)."""
    index = json.loads((Path(layout) / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return str(m["digest"])
    raise KeyError(tag)
