"""A test client making exactly the requests a dagger engine (up to v0.18.14)
makes to its cache service, in the order it makes them.

No dagger binary exists on this machine (and an engine needs a privileged
container runtime), so this client replays the engine's side from its
source: dagger/dagger at v0.18.14 (commit 5175b4adf3cc762e6f019dc4746e774d15a6cefb),
``engine/cache/cachemanager/service.go`` (the HTTP client: every call sends
its JSON request body with ``Content-Type: application/json``, GETs too, except
``GET /import`` which has none; Basic auth with the token as user and an
empty password; any 2xx is success), ``manager.go`` (the sequence),
``provider.go`` (layer reads) and ``mountsync.go`` (cache mounts). Request
bodies are written by a goroutine into an ``io.Pipe``, so Go sends them
chunked, without a Content-Length; blob PUTs set ``ContentLength``:

1. engine start: ``GET /config`` {EngineID}; periods must be non-zero;
2. ``GET /import`` (at start, then every ImportPeriod);
3. ``GET /cacheMountConfig`` {}; each mount with a URL is read like a layer;
4. export (every ExportPeriod, and at shutdown): ``POST /records`` with the
   whole key store; for each ExportRecord, for each layer of its ref not yet
   pushed in this export: ``GET /layerUploadURL`` {Digest}, then unless Skip a
   ``PUT`` of the blob to URL with Content-Length and the returned Headers
   (any 2xx); then one ``POST /layers`` {UpdatedRecords}. A failed push ends
   the export before ``/layers``;
5. a layer is needed: ``GET /layerDownloadURL`` {Digest}, then ``GET URL``
   with ``Range: bytes=<offset>-`` (a fresh request at each non-sequential
   offset; the status is not checked, the body is read as the blob);
6. shutdown: per cache mount ``GET /cacheMountUploadURL`` {CacheName, Digest,
   Size}; unless Skip a ``PUT`` with Content-Length and Headers that must
   answer exactly 200.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"


class EngineError(AssertionError):
    """What the engine would log as a failed cache call."""

    def __init__(self, what: str, status: int, body: bytes) -> None:
        super().__init__(f"{what}: unexpected status code: {status}: {body[:300]!r}")
        self.status = status


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Blob:
    """A layer as the engine's content store has it: compressed bytes and the diffID."""

    data: bytes
    diff_id: str = ""
    created_at: str = "2025-01-02T03:04:05Z"

    @property
    def digest(self) -> str:
        return sha256(self.data)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": LAYER_MEDIA_TYPE, "digest": self.digest, "size": len(self.data),
                "annotations": {"containerd.io/uncompressed": self.diff_id or sha256(b"diff:" + self.data),
                                "buildkit/createdat": self.created_at}}


@dataclass
class Engine:
    """One engine's view: where its cache service is, and every request it made."""

    base_url: str
    token: str = ""
    engine_id: str = "engine-1"
    log: list[str] = field(default_factory=list)

    def _send(self, method: str, url: str, body: bytes | None, headers: dict[str, str],
              chunked: bool = False) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=60)
        try:
            path = parts.path + ("?" + parts.query if parts.query else "")
            if chunked:
                # Go sends an io.Pipe body with an unknown length: Transfer-Encoding: chunked.
                conn.request(method, path, body=iter([body or b""]), headers=headers, encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def call(self, method: str, path: str, req: Any = None) -> Any:
        """One service call as service.go makes it (``req`` None: no body, as ImportCache)."""
        headers: dict[str, str] = {}
        if self.token:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{self.token}:".encode()).decode()
        body = None
        if req is not None:
            body = (json.dumps(req) + "\n").encode()  # json.Encoder.Encode ends with a newline
            headers["Content-Type"] = "application/json"
        self.log.append(f"{method} {path}")
        status, _h, data = self._send(method, self.base_url + path, body, headers, chunked=body is not None)
        if not 200 <= status < 300:
            raise EngineError(f"{method} {path}", status, data)
        return json.loads(data) if data.strip() else None

    # -- the engine's calls ---------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        cfg = self.call("GET", "/config", {"EngineID": self.engine_id})
        if not (cfg["ImportPeriod"] and cfg["ExportPeriod"] and cfg["ExportTimeout"]):
            raise AssertionError("invalid cache config: import/export periods must be non-zero")
        return dict(cfg)

    def import_cache(self) -> dict[str, Any]:
        cfg = self.call("GET", "/import")
        # descriptorProviderPair: every layer needs annotations with a diffID.
        for layer in cfg.get("layers") or []:
            if not (layer.get("annotations") or {}).get("diffID"):
                raise AssertionError(f"missing diffID for layer {layer.get('blob')}")
        return dict(cfg)

    def export(self, cache_keys: list[dict[str, Any]], links: list[dict[str, Any]],
               refs: dict[str, list[Blob]]) -> list[dict[str, Any]]:
        """Manager.Export: ``refs`` maps a result (cache ref) ID to its layers. Returns the ExportRecords."""
        resp = self.call("POST", "/records", {"CacheKeys": cache_keys, "Links": links})
        records = resp.get("ExportRecords") or []
        if not records:
            return []
        updated, pushed = [], set()
        for record in records:
            layers = refs.get(record["CacheRefID"])
            if not layers:
                continue  # the ref may be lazy or pruned: skipped
            for layer in layers:
                if layer.digest in pushed:
                    continue
                self.push_layer(layer)
                pushed.add(layer.digest)
            updated.append({"RecordDigest": record["Digest"], "Layers": [x.descriptor() for x in layers]})
        self.call("POST", "/layers", {"UpdatedRecords": updated})
        return list(records)

    def push_layer(self, layer: Blob) -> bool:
        """pushLayer: False when the service said Skip."""
        got = self.call("GET", "/layerUploadURL", {"Digest": layer.digest})
        if got["Skip"]:
            return False
        headers = {"Content-Length": str(len(layer.data)), **(got.get("Headers") or {})}
        self.log.append("PUT <layer URL>")
        status, _h, data = self._send("PUT", got["URL"], layer.data, headers)
        if not 200 <= status < 300:
            raise EngineError("PUT layer", status, data)
        return True

    def read_layer(self, digest: str, size: int, chunk: int = 7) -> bytes:
        """layerProvider.ReaderAt + urlReaderAt: ranged GETs, re-opened at a
        non-sequential offset (read here as: first ``chunk`` bytes, then the rest
        from a fresh request at that offset)."""
        url = self.call("GET", "/layerDownloadURL", {"Digest": digest})["URL"]
        return self._read_url(url, size, chunk)

    def _read_url(self, url: str, size: int, chunk: int) -> bytes:
        self.log.append("GET <blob URL> Range: bytes=0-")
        _s, _h, first = self._send("GET", url, None, {"Range": "bytes=0-"})
        out = first[:chunk]
        if size > len(out):
            self.log.append(f"GET <blob URL> Range: bytes={len(out)}-")
            _s, _h, rest = self._send("GET", url, None, {"Range": f"bytes={len(out)}-"})
            out += rest
        return out[:size]

    def sync_cache_mounts_in(self) -> dict[str, bytes]:
        """StartCacheMountSynchronization: each synced mount's tarball, by name."""
        resp = self.call("GET", "/cacheMountConfig", {})
        out = {}
        for m in resp.get("SyncedCacheMounts") or []:
            if not m["URL"]:
                continue
            out[m["Name"]] = self._read_url(m["URL"], m["Size"], 1 << 30)
        return out

    def sync_cache_mount_out(self, name: str, data: bytes) -> bool:
        """The shutdown sync of one cache mount; False when Skip."""
        got = self.call("GET", "/cacheMountUploadURL", {"CacheName": name, "Digest": sha256(data), "Size": len(data)})
        if got["Skip"]:
            return False
        headers = {"Content-Length": str(len(data)), **(got.get("Headers") or {})}
        self.log.append("PUT <cache mount URL>")
        status, _h, body = self._send("PUT", got["URL"], data, headers)
        if status != 200:
            raise EngineError("failed to upload cache mount", status, body)
        return True


def root_key(digest: str, output: int = 0) -> str:
    """BuildKit's rootKey: the ID of a cache key without inputs."""
    return sha256(f"{digest}@{output}".encode())


def two_step_graph(tag: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, list[Blob]]]:
    """A key store as an engine exports it: a root key (an image pull) and a key
    depending on it (an exec), each with one result; the exec's ref has two layers."""
    op1, op2 = sha256(f"op1-{tag}".encode()), sha256(f"op2-{tag}".encode())
    k1, k2 = root_key(op1), f"key-{tag}-exec"
    base = Blob(f"base layer {tag} ".encode() * 40)
    top = Blob(f"exec layer {tag} ".encode() * 25)
    keys = [{"ID": k1, "Results": [{"ID": f"ref-{tag}-1", "CreatedAt": "2025-01-02T03:04:05Z",
                                    "Description": "pull alpine"}]},
            {"ID": k2, "Results": [{"ID": f"ref-{tag}-2", "CreatedAt": "2025-01-02T03:04:06Z",
                                    "Description": "exec make"}]}]
    links = [{"ID": k2, "LinkedID": k1, "Input": 0, "Digest": op2, "Selector": ""}]
    return keys, links, {f"ref-{tag}-1": [base], f"ref-{tag}-2": [base, top]}
