"""A cargo sparse index as an index remote (sparkcache.protocols._index).

Three kinds of path, relative to the remote:

``index/config.json``
    Mutable. Served with ``dl`` pointed at this cache and ``api`` dropped
    (the cache is read-only: no publish, yank or login through it); every
    other key (``auth-required``...) as upstream wrote it.
``index/<prefix>/<name>``
    Mutable, served as stored (upstream's bytes and validators, so cargo's
    conditional requests are answered from the entry). Each line names a
    version and its ``cksum``: the digests a crate is verified against.
``crates/<name>/<version>/download``
    Immutable. Fetched from the URL upstream's own ``dl`` template gives for
    that crate, verified against its index line's ``cksum`` while streaming.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

from sparkcache.protocols._index import Freshness, Immutable, IndexRemote, Mutable
from sparkcache.protocols.cargo import names

CONFIG = "index/config.json"
# The markers cargo substitutes in a ``dl`` template.
MARKERS = ("{crate}", "{version}", "{prefix}", "{lowerprefix}", "{sha256-checksum}")
# config.json is a few hundred bytes; anything near this is no registry config.
MAX_CONFIG = 64 << 10


def crate_path(name: str, version: str) -> str:
    """The remote path of a crate file (what the cache's ``dl`` template gives)."""
    return f"crates/{name}/{version}/download"


def cache_dl(public_base: str) -> str:
    """The ``dl`` template clients get: ``public_base`` is the remote's URL (``.../cargo/<remote>``)."""
    return f"{public_base}/crates/{{crate}}/{{version}}/download"


def parse_dl(body: bytes) -> str:
    """The ``dl`` template of a config.json; ValueError when there is no usable one."""
    doc = json.loads(body)
    dl = doc.get("dl") if isinstance(doc, dict) else None
    if not isinstance(dl, str) or not dl:
        raise ValueError("config.json has no dl template")
    parts = urlsplit(dl.replace("{", "").replace("}", ""))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"config.json's dl is not an http(s) URL: {dl[:200]!r}")
    return dl


def expand_dl(template: str, name: str, version: str, cksum: str) -> str:
    """The download URL of one crate, as cargo computes it from ``template``
    (markers replaced; none at all: ``/{crate}/{version}/download`` appended)."""
    if not any(m in template for m in MARKERS):
        return f"{template}/{name}/{version}/download"
    return (template.replace("{crate}", name).replace("{version}", version)
            .replace("{prefix}", names.prefix(name)).replace("{lowerprefix}", names.prefix(name.lower()))
            .replace("{sha256-checksum}", cksum))


def rewrite_config(body: bytes, public_base: str) -> bytes:
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("config.json is not a JSON object")
    doc["dl"] = cache_dl(public_base)
    doc.pop("api", None)
    return json.dumps(doc, indent=2).encode() + b"\n"


def index_digests(body: bytes, index_path: str) -> dict[str, str]:
    """{crate path: cksum} of the versions an index file lists. Only lines of the
    crate the file is for count (a file cannot vouch for another crate), and a
    version listed twice with different sums is verified against neither."""
    rel = index_path.removeprefix("index/")
    want = rel.rsplit("/", 1)[-1]
    found: dict[str, str] = {}
    clashes: set[str] = set()
    for line in body.splitlines():
        if not line.strip():
            continue
        try:
            doc: Any = json.loads(line)
        except ValueError:
            continue  # one bad line costs only its own version
        if not isinstance(doc, dict):
            continue
        name, version, cksum = doc.get("name"), doc.get("vers"), doc.get("cksum")
        if not (isinstance(name, str) and isinstance(version, str) and names.valid_sha256(cksum)) \
                or name.lower() != want or not names.valid_name(name) or not names.valid_version(version):
            continue
        path, digest = crate_path(name, version), str(cksum)
        if found.setdefault(path, digest) != digest:
            clashes.add(path)
    for path in clashes:
        del found[path]
    return found


class CargoIndex(IndexRemote):
    content_type = "application/json"

    def is_index(self, path: str) -> bool:
        # Only config.json is rewritten; index files are served as stored.
        return path == CONFIG

    def rewrite(self, body: bytes, public_base: str) -> bytes:
        return rewrite_config(body, public_base)

    def indexes_listing(self, path: str) -> Sequence[str]:
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "crates" or not names.valid_name(parts[1]):
            return ()
        return ["index/" + names.index_path(parts[1])]

    def parse_digests(self, body: bytes, index_path: str) -> Mapping[str, str]:
        return index_digests(body, index_path)

    def classify(self, path: str) -> Freshness | None:
        if path.startswith("index/"):
            return Mutable(self.remote.cache.mutable_ttl)
        if path.startswith("crates/"):
            return Immutable(self.remote.cache.immutable_ttl or None)
        return None

    def upstream_url(self, path: str) -> str:
        """The upstream URL of an index path (config.json or a crate's file)."""
        assert self.remote.upstream is not None
        return f"{self.remote.upstream}/{path.removeprefix('index/')}"
