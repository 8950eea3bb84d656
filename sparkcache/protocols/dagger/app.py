"""The routes of ``/dagger/<remote>/``: the cache-service API of dagger engines
up to v0.18.14 (``engine/cache/cachemanager/service.go``) and the signed blob
URLs it hands out.

API calls carry the token as Basic user (empty password) and JSON bodies, on
GET requests too; answers are PascalCase JSON with Go's field names and
durations in nanoseconds. Blob URLs (``/dagger/<remote>/blobs/<hex>``) carry no
token: their HMAC signature and expiry are their authority.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from klein import Klein
from twisted.logger import Logger

from sparkcache.protocols._live import refreshed
from sparkcache.protocols._keyed import KeyedBlobs
from sparkcache.protocols.dagger.graph import DIGEST, GraphError
from sparkcache.protocols.dagger.options import DaggerOptions
from sparkcache.protocols.dagger.state import RemoteState
from sparkcache.web.signed import check_signature, sign
from sparkcache.web.bodies import BodyDecision, InMemory, Refuse, checked
from sparkcache.web.errors import JSON, ErrorReply, HTTPError, add_error_handling, guarded
from sparkcache.web.setup import query_arg
from sparkcache.web.urls import public_base

if TYPE_CHECKING:
    from twisted.web.resource import IResource

    from sparkcache.config import Config
    from sparkcache.context import Context

log = Logger()
NS = 1_000_000_000
# JSON request bodies are kept in memory up to these sizes: an engine's whole
# key store for /records, a few descriptors elsewhere.
MAX_RECORDS_BODY = 32 << 20
MAX_SMALL_BODY = 1 << 20
# What an engine writes to a cache-mount upload URL: a zstd-compressed tar.
CACHE_MOUNT_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"
API = frozenset({"config", "records", "layers", "import", "layerDownloadURL", "layerUploadURL",
                 "cacheMountConfig", "cacheMountUploadURL"})


class Remote:
    """One ``type: dagger`` remote: its blobs and its state."""

    def __init__(self, ctx: "Context", remote: Any) -> None:
        self.name = remote.name
        self.blobs = KeyedBlobs(ctx, remote, JSON)
        opts = remote.options
        self.options = opts if isinstance(opts, DaggerOptions) else DaggerOptions(keyed=self.blobs.options)
        self.state = RemoteState(ctx, remote, self.options.signing_secret, self.options.max_keys)


class DaggerApp:
    app = Klein()
    add_error_handling(app, JSON)

    def __init__(self, ctx: "Context") -> None:
        self.ctx = ctx
        self.remotes: dict[str, Remote] = {}
        self.reconfigure(ctx.config)

    def reconfigure(self, config: "Config") -> None:
        """The remotes of ``config`` from now on (Built.reconfigure)."""
        self.remotes = refreshed(self.remotes, (r for r in config.remotes.values() if r.type == "dagger"),
                                 lambda r: Remote(self.ctx, r), lambda x: x.blobs.remote)

    def resource(self) -> "IResource":
        return guarded(self.app, JSON, self.ctx.config.server.max_path_length)

    # -- plumbing -----------------------------------------------------------------------

    def body_gate(self, request: Any) -> BodyDecision:
        return checked(JSON, self._gate)(request)

    def _gate(self, request: Any) -> BodyDecision:
        parts = request.path.split(b"/")
        if len(parts) < 4 or parts[2].decode("utf-8", "replace") not in self.remotes:
            return None
        remote = self.remotes[parts[2].decode()]
        if parts[3] == b"blobs":
            if request.method != b"PUT":
                return None
            if remote.state.loaded and len(parts) == 5:
                # An unsigned or expired upload is refused before a byte is spooled.
                self.check_url(request, remote, parts[4].decode("utf-8", "replace"), "put")
            return remote.blobs.body_gate(request)
        limit = MAX_RECORDS_BODY if parts[3] == b"records" else MAX_SMALL_BODY
        return InMemory(limit, Refuse(JSON, ErrorReply(413, f"request bodies of /{parts[3].decode()} are at most "
                                                            f"{limit} bytes")))

    def remote(self, name: str) -> Remote:
        r = self.remotes.get(name)
        if r is None:
            raise HTTPError(404, f"no type: dagger remote named {name!r}")
        return r

    async def body(self, request: Any, empty_ok: bool = True) -> Any:
        """The request's JSON body (streamed by the engine even on GET; bounded by the gate)."""
        content = getattr(request, "content", None)
        raw = b""
        if content is not None:
            content.seek(0)
            raw = content.read(MAX_RECORDS_BODY + 1)
        if len(raw) > MAX_RECORDS_BODY:
            raise HTTPError(413, "request body too large")
        if not raw.strip():
            if empty_ok:
                return {}
            raise HTTPError(400, "a JSON body is required")
        try:
            # A whole key store can be megabytes: parsed off the reactor.
            return await self.ctx.store.in_io(json.loads, raw)
        except ValueError as e:
            raise HTTPError(400, f"the body is not JSON: {e}") from None

    async def enter(self, request: Any, remote: str, scope: str, empty_ok: bool = True) -> tuple[Remote, Any]:
        """An API call: its remote (404), its scope (401/403), its JSON body,
        and the remote's state loaded (the engine's first call, /config, loads
        it, so the signing secret is ready before any blob URL is used)."""
        r = self.remote(remote)
        self.ctx.auth.require(request, scope)
        body = await self.body(request, empty_ok)
        await r.state.load()
        return r, body

    def reply(self, request: Any, value: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(value, separators=(",", ":")).encode() + b"\n"

    def digest_of(self, body: Any, field: str = "Digest") -> str:
        d = body.get(field) if isinstance(body, dict) else None
        if not isinstance(d, str) or not DIGEST.match(d):
            raise HTTPError(400, f"{field} must be a sha256:<64 hex> digest")
        return d

    def signed_url(self, request: Any, r: Remote, op: str, digest: str, mount: str = "", size: int = -1) -> str:
        hexd = digest.split(":", 1)[1]
        exp = str(int(self.ctx.clock.seconds() + r.options.url_ttl))
        query: dict[str, str] = {"op": op}
        if mount:
            query["mount"] = mount
            query["size"] = str(size)
        query["exp"] = exp
        query["sig"] = sign(r.state.secret, r.name, op, hexd, mount, str(size), exp)
        base = public_base(request, self.ctx.config.server.public_url)
        return f"{base}/dagger/{r.name}/blobs/{hexd}?{urlencode(query)}"

    async def stored(self, r: Remote, digests: set[str]) -> set[str]:
        have = set()
        for d in digests:
            if await r.blobs.get(blob_name(d)) is not None:
                have.add(d)
        return have

    # -- the engine's API ---------------------------------------------------------------

    @app.route("/<remote>/config", methods=["GET"])
    async def config(self, request: Any, remote: str) -> bytes:
        r, _ = await self.enter(request, remote, "read")
        o = r.options
        return self.reply(request, {"ImportPeriod": int(o.import_period * NS), "ExportPeriod": int(o.export_period * NS),
                                    "ExportTimeout": int(o.export_timeout * NS)})

    @app.route("/<remote>/records", methods=["POST"])
    async def records(self, request: Any, remote: str) -> bytes:
        r, body = await self.enter(request, remote, "write", empty_ok=False)
        try:
            named = r.state.graph.update_records(body)
        except GraphError as e:
            raise HTTPError(400, str(e)) from None
        have = await self.stored(r, {x.digest for rd, _ in named for x in r.state.graph.layers.get(rd, ())})
        wanted = r.state.graph.wanted(named, have.__contains__)
        await r.state.save()
        self.ctx.metrics.form(r.name, "records", "reported")
        return self.reply(request, {"ExportRecords": wanted})

    @app.route("/<remote>/layers", methods=["POST"])
    async def layers(self, request: Any, remote: str) -> bytes:
        r, body = await self.enter(request, remote, "write", empty_ok=False)
        try:
            r.state.graph.update_layers(body)
        except GraphError as e:
            raise HTTPError(400, str(e)) from None
        await r.state.save()
        self.ctx.metrics.form(r.name, "layers", "updated")
        return self.reply(request, {})

    @app.route("/<remote>/import", methods=["GET"])
    async def import_(self, request: Any, remote: str) -> bytes:
        r, _ = await self.enter(request, remote, "read")
        have = await self.stored(r, r.state.graph.layer_digests())
        config = r.state.graph.cache_config(have.__contains__)
        self.ctx.metrics.form(r.name, "import", "records" if config else "empty")
        return self.reply(request, config)

    @app.route("/<remote>/layerDownloadURL", methods=["GET"])
    async def layer_download_url(self, request: Any, remote: str) -> bytes:
        r, body = await self.enter(request, remote, "read")
        digest = self.digest_of(body)
        if await r.blobs.get(blob_name(digest)) is None:
            # A URL to nothing would hand the engine an error body as the layer.
            self.ctx.metrics.form(r.name, "entry", "miss")
            raise HTTPError(404, f"layer {digest} is not stored")
        return self.reply(request, {"URL": self.signed_url(request, r, "get", digest)})

    @app.route("/<remote>/layerUploadURL", methods=["GET"])
    async def layer_upload_url(self, request: Any, remote: str) -> bytes:
        r, body = await self.enter(request, remote, "write")
        digest = self.digest_of(body)
        if await r.blobs.get(blob_name(digest)) is not None:
            self.ctx.metrics.form(r.name, "upload", "exists")
            return self.reply(request, {"URL": "", "Headers": {}, "Skip": True})
        return self.reply(request, {"URL": self.signed_url(request, r, "put", digest),
                                    "Headers": {"Content-Type": "application/octet-stream"}, "Skip": False})

    @app.route("/<remote>/cacheMountConfig", methods=["GET"])
    async def cache_mount_config(self, request: Any, remote: str) -> bytes:
        r, _ = await self.enter(request, remote, "read")
        have = await self.stored(r, {d for d, _ in r.state.mounts.values()})
        mounts = [{"Name": name, "Digest": d, "Size": size, "MediaType": CACHE_MOUNT_MEDIA_TYPE,
                   "URL": self.signed_url(request, r, "get", d)}
                  for name, (d, size) in sorted(r.state.mounts.items()) if d in have]
        return self.reply(request, {"SyncedCacheMounts": mounts})

    @app.route("/<remote>/cacheMountUploadURL", methods=["GET"])
    async def cache_mount_upload_url(self, request: Any, remote: str) -> bytes:
        r, body = await self.enter(request, remote, "write", empty_ok=False)
        digest = self.digest_of(body)
        name, size = body.get("CacheName"), body.get("Size")
        if not isinstance(name, str) or not name or len(name) > 256 or not name.isprintable():
            raise HTTPError(400, "CacheName must be a printable string of at most 256 characters")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise HTTPError(400, "Size must be a non-negative integer")
        if size > r.blobs.options.max_entry_size:
            self.ctx.metrics.form(r.name, "upload", "rejected")
            raise HTTPError(413, f"entries of {r.name!r} are at most {r.blobs.options.max_entry_size} bytes")
        if r.state.mounts.get(name) == (digest, size) and await r.blobs.get(blob_name(digest)) is not None:
            return self.reply(request, {"URL": "", "Headers": {}, "Skip": True})
        return self.reply(request, {"URL": self.signed_url(request, r, "put", digest, name, size),
                                    "Headers": {"Content-Type": "application/octet-stream"}, "Skip": False})

    # -- signed blob URLs ---------------------------------------------------------------

    def check_url(self, request: Any, r: Remote, hexd: str, op: str) -> str:
        """Raise AuthError(403) unless the request's URL is signed for ``op`` on
        ``hexd`` and not expired; the cache-mount name it uploads ("" for none)."""
        if query_arg(request, "op") != op:
            raise HTTPError(403, "this URL does not allow this method")
        mount = query_arg(request, "mount") or ""
        check_signature(r.state.secret, query_arg(request, "sig"), query_arg(request, "exp"),
                        self.ctx.clock.seconds(), r.name, op, hexd, mount, query_arg(request, "size") or "-1")
        return mount

    @app.route("/<remote>/blobs/<hexd>", methods=["GET", "HEAD", "PUT"])
    async def blob(self, request: Any, remote: str, hexd: str) -> Any:
        r = self.remote(remote)
        digest = f"sha256:{hexd}"
        if not DIGEST.match(digest):
            raise HTTPError(404, "not a blob")
        await r.state.load()
        writing = request.method == b"PUT"
        mount = self.check_url(request, r, hexd, "put" if writing else "get")
        if not writing:
            return await r.blobs.serve(request, blob_name(digest),
                                       {"content-type": "application/octet-stream"})
        stored = await r.blobs.put(request, blob_name(digest), {"content-type": "application/octet-stream"},
                                   expected_sha256=hexd)
        if mount:
            await r.state.set_mount(mount, digest, stored.entry.size)
        # Cache-mount uploads need exactly 200 (engine/cache/cachemanager/mountsync.go).
        request.setResponseCode(200)
        return b""


def blob_name(digest: str) -> str:
    return f"blobs/{digest.split(':', 1)[1]}"
