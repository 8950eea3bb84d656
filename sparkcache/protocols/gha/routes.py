"""The gha app: Twirp v2 calls, the signed blob URLs, and the v1 REST API.

Routes (``<r>`` a remote of type gha)::

    POST /twirp/github.actions.results.api.v1.CacheService/<call>       (the default remote)
    POST /gha/<r>/twirp/github.actions.results.api.v1.CacheService/<call>
    PUT  /gha/<r>/upload/<token>?exp&sig[&comp=block&blockid=|&comp=blocklist]   (Azure-style)
    GET  /gha/<r>/download/<entry>?exp&sig
    POST /gha/<r>/_apis/artifactcache/caches                 reserve (v1)
    GET  /gha/<r>/_apis/artifactcache/caches?key=             list (v1, diagnostics)
    PATCH/POST /gha/<r>/_apis/artifactcache/caches/<id>       chunk / commit (v1)
    GET  /gha/<r>/_apis/artifactcache/cache?keys=&version=    lookup (v1)

Who may do what: a configured token with ``write`` (uploads) or ``read`` (or
anonymous reads when allowed), writing to and reading first from the
remote's ``scope`` (or the ``X-Sparkcache-Gha-Scope`` header), then its
``restore_scopes``; or a runtime token minted by the daemon, whose ``ac``
claim names the scopes. Blob URLs carry their own signature instead.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from klein import Klein
from twisted.logger import Logger
from twisted.web.resource import IResource

from sparkcache.auth import AuthError
from sparkcache.config import RemoteConfig
from sparkcache.protocols._live import refreshed
from sparkcache.protocols._keyed import KeyedBlobs
from sparkcache.protocols.gha import wire
from sparkcache.protocols.gha.entries import (
    MAX_PARTS, Reservation, Reservations, check_key, chunk_order, entry_base, entry_id, entry_name, lookup,
)
from sparkcache.protocols.gha.signing import (
    Access, Secrets, b64url, check_signature, looks_like_jwt, sign, unb64url, verify_token,
)
from sparkcache.store import SpoolFile
from sparkcache.web.bodies import BodyDecision, InMemory, Refuse, checked, request_spool
from sparkcache.web.errors import ErrorFormat, ErrorReply, HTTPError, add_error_handling, guarded, set_headers
from sparkcache.web.serve import error_body
from sparkcache.web.urls import public_base

if TYPE_CHECKING:
    from sparkcache.config import Config
    from sparkcache.context import Context

log = Logger()
SERVICE = "github.actions.results.api.v1.CacheService"
SCOPE_HEADER = b"x-sparkcache-gha-scope"
SMALL_BODY = 1 << 16
BLOCKLIST_BODY = 4 << 20
_TWIRP_CODES = {400: "malformed", 401: "unauthenticated", 403: "permission_denied", 404: "not_found",
                409: "already_exists", 413: "resource_exhausted", 429: "resource_exhausted"}
# At most 18 digits: int() of thousands of digits is slow, then refused (a 500).
_RANGE = re.compile(r"bytes (\d{1,18})-(\d{1,18})/(\*|\d{1,18})$")
_BLOCK = re.compile(r"<(Latest|Uncommitted|Committed)>([^<]{1,100})</\1>")


def render_error(request: Any, reply: ErrorReply) -> bytes:
    """Twirp's ``{"code", "msg"}`` on Twirp paths; elsewhere the daemon's JSON
    error with a ``message`` too (what @actions/http-client reports)."""
    set_headers(request, reply.headers)
    if b"/twirp/" in bytes(request.path):
        request.setResponseCode(reply.status)
        request.setHeader(b"Content-Type", b"application/json")
        code = _TWIRP_CODES.get(reply.status, "internal" if reply.status >= 500 else "unknown")
        # Plus the daemon's own keys: Twirp clients read code and msg, and ignore the rest.
        return json.dumps({"code": code, "msg": reply.message, "error": reply.message,
                           "status": reply.status}).encode()
    body = json.loads(error_body(request, reply.status, reply.message))
    return json.dumps({**body, "message": reply.message}).encode() + b"\n"


FORMAT = ErrorFormat(render_error, not_found="no such gha endpoint")


@dataclass
class GhaRemote:
    config: RemoteConfig
    blobs: KeyedBlobs
    uploads: Reservations

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def options(self) -> Any:
        return self.config.options


def arg(request: Any, name: str) -> str | None:
    raw = (request.args or {}).get(name.encode())
    return raw[0].decode("utf-8", "replace") if raw else None


def small_body(request: Any) -> bytes:
    content = getattr(request, "content", None)
    if content is None:
        return b""
    content.seek(0)
    return bytes(content.read(BLOCKLIST_BODY + 1))


def json_body(request: Any) -> dict[str, Any]:
    try:
        doc = json.loads(small_body(request) or b"{}")
    except ValueError:
        raise HTTPError(400, "the body is not JSON") from None
    if not isinstance(doc, dict):
        raise HTTPError(400, "the body is not a JSON object")
    return doc


def check_version(version: Any) -> str:
    if not isinstance(version, str) or not version or len(version) > 512 or any(ord(c) < 32 for c in version):
        raise HTTPError(400, "a version is a string of 1 to 512 printable characters")
    return version


class GhaApp:
    app = Klein()
    add_error_handling(app, FORMAT)

    def __init__(self, ctx: "Context") -> None:
        self.ctx = ctx
        self.secrets = Secrets(ctx)
        self.remotes: dict[str, GhaRemote] = {}
        self.default: GhaRemote | None = None
        self._secret_cache: dict[str, bytes] = {}
        self.reconfigure(ctx.config)

    def reconfigure(self, config: "Config") -> None:
        """The remotes of ``config`` from now on (Built.reconfigure); an unchanged
        remote keeps its upload reservations."""
        ctx, old = self.ctx, self.remotes
        self.remotes = refreshed(
            old, (r for r in config.remotes.values() if r.type == "gha"),
            lambda r: GhaRemote(r, KeyedBlobs(ctx, r, FORMAT), Reservations(ctx, r.options.upload_ttl)),
            lambda g: g.config)
        defaults = [g for g in self.remotes.values() if g.options.default]
        if not defaults and len(self.remotes) == 1:
            defaults = list(self.remotes.values())
        self.default = defaults[0] if defaults else None
        # A changed signing_secret must not keep signing with the old one.
        self._secret_cache = {n: s for n, s in self._secret_cache.items()
                              if n in self.remotes and self.remotes[n] is old.get(n)}

    def resource(self) -> IResource:
        return guarded(self.app, FORMAT, self.ctx.config.server.max_path_length)

    # -- common ---------------------------------------------------------------------

    def remote(self, name: str | None) -> GhaRemote:
        if name is None:
            if self.default is None:
                raise HTTPError(404, "several gha remotes and none is 'default: true': use /gha/<remote>/twirp/...")
            return self.default
        g = self.remotes.get(name)
        if g is None:
            raise HTTPError(404, f"no gha remote {name!r}")
        return g

    async def secret(self, g: GhaRemote) -> bytes:
        secret = await self.secrets.get(g.options.signing_secret)
        self._secret_cache[g.name] = secret
        return secret

    async def access(self, request: Any, g: GhaRemote, need: str) -> Access:
        token = self.ctx.auth.presented(request)
        if token and looks_like_jwt(token) and self.ctx.auth.scopes(token) is None:
            acc = verify_token(await self.secret(g), token, self.ctx.clock.seconds())
            if need == "write" and acc.write is None:
                raise AuthError(403, "the token may not write to any cache scope")
            if not acc.read:
                raise AuthError(403, "the token may not read any cache scope")
            return acc
        self.ctx.auth.require(request, need)
        header = request.getHeader(SCOPE_HEADER)
        scope = header.decode("utf-8", "replace").strip() if header else g.options.scope
        if not scope:
            raise HTTPError(400, "an empty cache scope")
        return Access((scope, *[s for s in g.options.restore_scopes if s != scope]), scope)

    async def download_url(self, request: Any, g: GhaRemote, name: str) -> str:
        ident = b64url(name.encode())
        exp = str(int(self.ctx.clock.seconds() + g.options.url_ttl))
        sig = sign(await self.secret(g), "download", g.name, ident, exp)
        base = public_base(request, self.ctx.config.server.public_url)
        return f"{base}/gha/{quote(g.name, safe='')}/download/{ident}?exp={exp}&sig={sig}"

    async def upload_url(self, request: Any, g: GhaRemote, r: Reservation) -> str:
        exp = str(int(r.expires))
        sig = sign(await self.secret(g), "upload", g.name, r.token, exp)
        base = public_base(request, self.ctx.config.server.public_url)
        return f"{base}/gha/{quote(g.name, safe='')}/upload/{r.token}?exp={exp}&sig={sig}"

    async def commit(self, g: GhaRemote, r: Reservation, spool: SpoolFile) -> None:
        """Commit ``spool`` as ``r``'s entry (HTTPError 413/507 when the store will not)."""
        r.committing = True
        if r.body is spool:
            r.body = None
        try:
            if await g.blobs.get(r.name) is not None:  # another upload of the key won
                self.ctx.store.discard(spool)
                return
            await g.blobs.put_spool(spool, r.name, {"content-type": "application/octet-stream"})
        finally:
            g.uploads.drop(r)

    def check_live(self, g: GhaRemote, r: Reservation, spool: SpoolFile) -> None:
        """After a body arrived: its upload must still be open, or nobody would release the spool."""
        if g.uploads.by_id.get(r.cache_id) is not r or r.committing:
            self.ctx.store.discard(spool)
            raise HTTPError(409, "this upload ended (committed, expired or dropped) while the body arrived")

    def keep_part(self, g: GhaRemote, r: Reservation, parts: dict[Any, SpoolFile], part: Any, spool: SpoolFile) -> None:
        self.check_live(g, r, spool)
        g.uploads.keep(parts, part, spool)
        if r.stored_bytes() > g.blobs.options.max_entry_size:
            g.uploads.drop(r)
            self.ctx.metrics.form(g.name, "upload", "rejected")
            raise HTTPError(413, f"entries of {g.name!r} are at most {g.blobs.options.max_entry_size} bytes")

    # -- body gate ------------------------------------------------------------------

    def body_gate(self, request: Any) -> BodyDecision:
        return checked(FORMAT, self._gate)(request)

    def _gate(self, request: Any) -> BodyDecision:
        parts = bytes(request.path).split(b"/")
        too_large = Refuse(FORMAT, ErrorReply(413, "the request body is too large"))
        small = InMemory(SMALL_BODY, too_large)
        if parts[1] == b"twirp" or len(parts) < 4:
            return small
        g = self.remotes.get(parts[2].decode("utf-8", "replace"))
        if g is None:
            return small
        if parts[3] == b"upload" and request.method == b"PUT":
            if arg(request, "comp") == "blocklist":
                return InMemory(BLOCKLIST_BODY, too_large)
            secret = self._secret_cache.get(g.name)
            if secret is not None and len(parts) == 5:
                check_signature(secret, arg(request, "sig"), arg(request, "exp"), self.ctx.clock.seconds(),
                                "upload", g.name, parts[4].decode("utf-8", "replace"))
            return g.blobs.body_gate(request)
        if parts[3] == b"_apis" and request.method == b"PATCH":
            if self.ctx.auth.presented(request) is None:
                raise AuthError(401, "authentication required")
            return g.blobs.body_gate(request)
        return small

    # -- v2: Twirp ------------------------------------------------------------------

    @app.route(f"/twirp/{SERVICE}/<call>", methods=["POST"])
    async def twirp_root(self, request: Any, call: str) -> bytes:
        return await self.twirp(request, self.remote(None), call)

    @app.route(f"/gha/<remote>/twirp/{SERVICE}/<call>", methods=["POST"])
    async def twirp_remote(self, request: Any, remote: str, call: str) -> bytes:
        return await self.twirp(request, self.remote(remote), call)

    async def twirp(self, request: Any, g: GhaRemote, call: str) -> bytes:
        if call not in wire.REQUEST_FIELDS:
            raise HTTPError(404, f"no method {call!r} in {SERVICE}")
        raw_type = request.getHeader(b"content-type") or b"application/json"
        ctype = raw_type.split(b";")[0].strip().decode("latin-1").lower()
        if ctype not in (wire.PROTOBUF, wire.JSON_TYPE):
            raise HTTPError(400, f"unexpected Content-Type {ctype!r}: application/json or application/protobuf")
        try:
            req = wire.decode(call, ctype, small_body(request))
        except wire.WireError as e:
            raise HTTPError(400, f"a malformed {call} request: {e}") from None
        if call == "CreateCacheEntry":
            fields = await self.create_entry(request, g, req)
        elif call == "FinalizeCacheEntryUpload":
            fields = await self.finalize_entry(request, g, req)
        else:
            fields = await self.download_entry(request, g, req)
        request.setHeader(b"Content-Type", ctype.encode())
        return wire.encode(call, ctype, fields)

    async def create_entry(self, request: Any, g: GhaRemote, req: wire.CacheRequest) -> dict[str, Any]:
        acc = await self.access(request, g, "write")
        assert acc.write is not None
        key, version = check_key(req.key), check_version(req.version)
        name = entry_name(acc.write, version, key)
        if await g.blobs.get(name) is not None:
            self.ctx.metrics.form(g.name, "upload", "exists")
            return {"ok": False, "message": f"a cache entry for key {key!r} exists (entries are immutable)"}
        r = g.uploads.reserve(name, key, version, acc.write, None)
        if r is None:
            return {"ok": False, "message": f"another job is uploading key {key!r}"}
        return {"ok": True, "signed_upload_url": await self.upload_url(request, g, r)}

    async def finalize_entry(self, request: Any, g: GhaRemote, req: wire.CacheRequest) -> dict[str, Any]:
        acc = await self.access(request, g, "write")
        assert acc.write is not None
        key, version = check_key(req.key), check_version(req.version)
        name = entry_name(acc.write, version, key)
        r = g.uploads.by_name.get(name)
        if r is None or r.expires <= self.ctx.clock.seconds() or r.committing:
            return {"ok": False, "message": f"no upload of key {key!r} is in progress"}
        body = r.body
        if body is None:
            g.uploads.drop(r)
            return {"ok": False, "message": "nothing was uploaded (or its blocks were never listed)"}
        if req.size_bytes is not None and req.size_bytes != body.size:
            g.uploads.drop(r)
            self.ctx.metrics.form(g.name, "upload", "rejected")
            return {"ok": False, "message": f"{body.size} bytes were uploaded, the client says {req.size_bytes}"}
        try:
            await self.commit(g, r, body)
        except HTTPError as e:
            log.warn("{remote}: cache entry {key!r} not stored: {why}", remote=g.name, key=key, why=e.message)
            return {"ok": False, "message": f"not stored: {e.message}"}
        return {"ok": True, "entry_id": entry_id(name)}

    async def download_entry(self, request: Any, g: GhaRemote, req: wire.CacheRequest) -> dict[str, Any]:
        acc = await self.access(request, g, "read")
        key, version = check_key(req.key), check_version(req.version)
        restore = [check_key(k, "restore key") for k in req.restore_keys]
        match = await lookup(g.blobs, acc.read, version, key, restore)
        if match is None:
            self.ctx.metrics.form(g.name, "lookup", "miss")
            return {"ok": False}
        self.ctx.metrics.form(g.name, "lookup", "hit")
        return {"ok": True, "signed_download_url": await self.download_url(request, g, match.name),
                "matched_key": match.key}

    # -- signed blob URLs -----------------------------------------------------------

    @app.route("/gha/<remote>/upload/<token>", methods=["PUT"])
    async def upload(self, request: Any, remote: str, token: str) -> bytes:
        g = self.remote(remote)
        check_signature(await self.secret(g), arg(request, "sig"), arg(request, "exp"), self.ctx.clock.seconds(),
                        "upload", g.name, token)
        r = g.uploads.live(g.uploads.by_token.get(token))
        if r.committing:
            raise HTTPError(409, "this upload is being committed")
        comp = arg(request, "comp")
        if comp == "block":
            block_id = arg(request, "blockid")
            if not block_id or len(block_id) > 100:
                raise HTTPError(400, "a block needs a blockid of at most 100 characters")
            if block_id not in r.blocks and len(r.blocks) >= MAX_PARTS:
                raise HTTPError(400, f"an upload has at most {MAX_PARTS} blocks")
            self.keep_part(g, r, r.blocks, block_id, await request_spool(request, self.ctx.store))
        elif comp == "blocklist":
            ids = [m.group(2) for m in _BLOCK.finditer(small_body(request).decode("utf-8", "replace"))]
            missing = [i for i in ids if i not in r.blocks]
            if not ids or missing:
                raise HTTPError(400, f"the block list names blocks never uploaded: {missing[:3]}" if missing
                                else "an empty block list")
            assembled = await g.uploads.assemble([r.blocks[i] for i in ids])
            for spool in r.blocks.values():
                self.ctx.store.discard(spool)
            r.blocks = {}
            if r.body is not None:
                self.ctx.store.discard(r.body)
            r.body = assembled
            if assembled.size > g.blobs.options.max_entry_size:
                g.uploads.drop(r)
                raise HTTPError(413, f"entries of {g.name!r} are at most {g.blobs.options.max_entry_size} bytes")
        elif comp is None:
            blob_type = request.getHeader(b"x-ms-blob-type")
            if blob_type is not None and blob_type.lower() != b"blockblob":
                raise HTTPError(400, "only block blobs are stored (x-ms-blob-type: BlockBlob)")
            spool = await request_spool(request, self.ctx.store)
            self.check_live(g, r, spool)
            if r.body is not None:
                self.ctx.store.discard(r.body)
            r.body = spool
        else:
            raise HTTPError(400, f"unsupported comp={comp!r}")
        request.setResponseCode(201)
        request.setHeader(b"x-ms-request-server-encrypted", b"false")
        request.setHeader(b"x-ms-version", b"2024-11-04")
        return b""

    @app.route("/gha/<remote>/download/<ident>", methods=["GET", "HEAD"])
    async def download(self, request: Any, remote: str, ident: str) -> Any:
        g = self.remote(remote)
        check_signature(await self.secret(g), arg(request, "sig"), arg(request, "exp"), self.ctx.clock.seconds(),
                        "download", g.name, ident)
        try:
            name = unb64url(ident).decode("utf-8")
        except ValueError:
            raise HTTPError(404, "no such entry") from None
        return await g.blobs.serve(request, name)

    # -- v1: _apis/artifactcache ----------------------------------------------------

    @app.route("/gha/<remote>/_apis/artifactcache/caches", methods=["POST"])
    async def reserve(self, request: Any, remote: str) -> bytes:
        g = self.remote(remote)
        acc = await self.access(request, g, "write")
        assert acc.write is not None
        doc = json_body(request)
        raw_key = doc.get("key")
        key, version = check_key(raw_key if isinstance(raw_key, str) else ""), check_version(doc.get("version"))
        size = doc.get("cacheSize")
        limit = g.blobs.options.max_entry_size
        if isinstance(size, int) and not isinstance(size, bool) and size > limit:
            self.ctx.metrics.form(g.name, "upload", "rejected")
            raise HTTPError(413, f"a cache of {size} bytes is over this cache's {limit}-byte limit")
        name = entry_name(acc.write, version, key)
        if await g.blobs.get(name) is not None:
            self.ctx.metrics.form(g.name, "upload", "exists")
            raise HTTPError(409, f"a cache entry for key {key!r} exists (entries are immutable)")
        r = g.uploads.reserve(name, key, version, acc.write, size if isinstance(size, int) else None)
        if r is None:
            raise HTTPError(409, f"another job is uploading key {key!r}")
        request.setResponseCode(201)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"cacheId": r.cache_id}).encode()

    @app.route("/gha/<remote>/_apis/artifactcache/caches/<cache_id>", methods=["PATCH", "POST"])
    async def chunk_or_commit(self, request: Any, remote: str, cache_id: str) -> bytes:
        g = self.remote(remote)
        acc = await self.access(request, g, "write")
        numeric = cache_id.isascii() and cache_id.isdigit()
        r = g.uploads.live(g.uploads.by_id.get(int(cache_id)) if numeric else None)
        if r.scope != acc.write:
            raise AuthError(403, "this upload belongs to another cache scope")
        if r.committing:
            raise HTTPError(409, "this upload is being committed")
        if request.method == b"PATCH":
            m = _RANGE.match((request.getHeader(b"content-range") or b"").decode("latin-1"))
            if m is None:
                raise HTTPError(400, "a chunk needs Content-Range: bytes <first>-<last>/*")
            start, end = int(m.group(1)), int(m.group(2))
            spool = await request_spool(request, self.ctx.store)
            if end < start or spool.size != end - start + 1:
                self.ctx.store.discard(spool)
                raise HTTPError(400, f"the chunk has {spool.size} bytes, its Content-Range says {end - start + 1}")
            if len(r.chunks) >= MAX_PARTS:
                self.ctx.store.discard(spool)
                raise HTTPError(400, f"an upload has at most {MAX_PARTS} chunks")
            self.keep_part(g, r, r.chunks, (start, end), spool)
        else:
            size = json_body(request).get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise HTTPError(400, "a commit needs {\"size\": <bytes>}")
            try:
                ordered = chunk_order(r.chunks, size)
            except HTTPError:
                g.uploads.drop(r)
                raise
            r.committing = True
            try:
                assembled = await g.uploads.assemble(ordered)
            except BaseException:
                g.uploads.drop(r)
                raise
            await self.commit(g, r, assembled)
        request.setResponseCode(204)
        return b""

    @app.route("/gha/<remote>/_apis/artifactcache/cache", methods=["GET"])
    async def lookup_v1(self, request: Any, remote: str) -> bytes:
        g = self.remote(remote)
        acc = await self.access(request, g, "read")
        keys = [check_key(k) for k in (arg(request, "keys") or "").split(",")]
        version = check_version(arg(request, "version"))
        if len(keys) > 10:
            raise HTTPError(400, "at most 10 keys")
        match = await lookup(g.blobs, acc.read, version, keys[0], keys[1:])
        if match is None:
            self.ctx.metrics.form(g.name, "lookup", "miss")
            request.setResponseCode(204)
            return b""
        self.ctx.metrics.form(g.name, "lookup", "hit")
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"cacheKey": match.key, "scope": match.scope, "cacheVersion": version,
                           "creationTime": _iso(match.entry.fetched),
                           "archiveLocation": await self.download_url(request, g, match.name)}).encode()

    @app.route("/gha/<remote>/_apis/artifactcache/caches", methods=["GET"])
    async def list_v1(self, request: Any, remote: str) -> bytes:
        g = self.remote(remote)
        acc = await self.access(request, g, "read")
        key = arg(request, "key") or ""
        found = []
        for scope in acc.read:
            base = entry_base(scope, "")[:-1]  # e/<scope>/, every version
            try:
                entries = await self.ctx.store.list(g.name, base, 1000)
            except Exception:
                log.failure("{remote}: listing entries failed", remote=g.name)
                entries = []
            for e in entries:
                version, _, k = e.path[len(base):].partition("/")
                if k.startswith(key):
                    found.append({"cacheKey": k, "cacheVersion": unquote(version), "scope": scope,
                                  "creationTime": _iso(e.fetched)})
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"totalCount": len(found), "artifactCaches": found[:100]}).encode()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
