"""Generic remotes: ``/api/<remote>/<path>`` for release files, OS package
repositories (deb, rpm, alpine) and Helm charts, plus ``type: local`` uploads.

Semantics follow the FastAPI artifact cache this replaces: ``immutable_patterns``
gate what may be fetched (403 outside them unless a mutable pattern matches),
mutable paths get a TTL, conditional revalidation and stale-on-error.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any

from klein import Klein
from twisted.web.resource import IResource

from sparkcache.auth import AuthError
from sparkcache.config import Config, RemoteConfig
from sparkcache.context import Context
from sparkcache.fetch import CacheRequest, Failed, Hit, Live, Target
from sparkcache.fetch.flight import BodyError
from sparkcache.protocols._index import DerivedCache, Freshness, IndexRemote, Runner, classify_by_patterns
from sparkcache.protocols._live import refreshed
from sparkcache.protocols.generic import TYPE_NAMES
from sparkcache.protocols.generic.helm import HelmIndex
from sparkcache.store.ranges import serving_range
from sparkcache.web.bodies import BodyDecision, ToSpool, checked, request_spool
from sparkcache.web.errors import JSON, HTTPError, add_error_handling
from sparkcache.web.hits import FastHits, FastRoute
from sparkcache.web.paths import BadPath, quote_segments, split_raw_path, vet_request
from sparkcache.web.purge import refuse_local_purge
from sparkcache.web.respond import guess_type, respond
from sparkcache.web.serve import error_body, header
from sparkcache.web.urls import public_base

MAX_PREFETCH = 1000
# Remote types whose metadata is rewritten at serve time (sparkcache.protocols._index).
INDEX_TYPES: dict[str, type[IndexRemote]] = {"helm": HelmIndex}


class GenericApp:
    app = Klein()

    def __init__(self, ctx: Context, run: Runner | None = None) -> None:
        """``run`` runs index rewrites and parsing in a worker thread (a pool
        of their own in the daemon; the store's I/O pool by default)."""
        self.ctx = ctx
        self.max_path = ctx.config.server.max_path_length
        self.derived = DerivedCache(ctx.store, run or ctx.store.in_io)
        self.indexes: dict[str, IndexRemote] = {}
        self.reconfigure(ctx.config)
        self._gate = checked(JSON, self._body_checks)

    def reconfigure(self, config: Config) -> None:
        """The index remotes of ``config`` from now on (Built.reconfigure); the
        others are looked up in ``ctx.config`` per request."""
        self.indexes = refreshed(self.indexes, (r for r in config.remotes.values() if r.type in INDEX_TYPES),
                                 lambda r: INDEX_TYPES[r.type](r, self.ctx, self.derived), lambda i: i.remote)

    def resource(self) -> IResource:
        return FastHits(self.ctx, self.fast_route, self.app.resource(), JSON, self.max_path, miss=self.start_miss)

    add_error_handling(app, JSON)

    # -- the hit path -----------------------------------------------------------------

    def fast_route(self, request: Any, segments: list[str]) -> FastRoute | None:
        """Where a GET/HEAD of this URL would be found in the index when it is
        a plain cached file (no local upload, no rewritten index, within the
        patterns); None for anything else, every error case included, which
        dispatch() answers. From the URL and the configuration alone: FastHits
        keeps the answer until the configuration changes."""
        if len(segments) < 3:
            return None
        remote = self.ctx.config.remotes.get(segments[1])
        if remote is None or remote.type == "local" or remote.type not in TYPE_NAMES:
            return None
        rest = [s for s in segments[2:] if s != ""]
        if not rest:
            return None
        path = "/".join(rest)
        if self.classify(remote, path) is None or self.rewrites(remote, path):
            return None
        query = request.uri.partition(b"?")[2].decode("latin-1")
        return FastRoute(_key(remote, path, query), remote.name, path)

    def start_miss(self, request: Any, route: FastRoute, segments: list[str]) -> None:
        """(FastHits, before Klein routes ``request``.) Start the fetch that
        ``dispatch`` would start for this GET/HEAD of a plain file, when it
        may and nothing about it needs a thread (``Cache.start_now``), so the
        upstream request is out before the router and the handler run;
        ``dispatch``'s ``get`` then joins it. Anything dispatch would refuse
        starts nothing here."""
        ctx = self.ctx
        remote = ctx.config.remotes.get(route.remote)
        if remote is None or remote.name in self.indexes:
            return  # (an index remote may know the file's digest: dispatch asks it)
        try:
            ctx.auth.require(request, "read")
        except AuthError:
            return
        query = request.uri.partition(b"?")[2].decode("latin-1")
        if _bad_query(query):
            return
        rest = [s for s in segments[2:] if s != ""]
        path = "/".join(rest)
        kind = self.classify(remote, path)
        if kind is None:
            return
        req = _cache_request(remote, rest, path, query, kind, None)
        if req.key == route.key:
            ctx.cache.start_now(req)

    # -- dispatch ------------------------------------------------------------------

    def locate(self, request: Any) -> tuple[RemoteConfig, list[str], str]:
        """(remote, path segments, query) of ``/api/<remote>/<path>?<query>``; HTTPError when there is none."""
        segments = split_raw_path(request.uri, self.max_path)
        query = request.uri.partition(b"?")[2].decode("latin-1")
        if _bad_query(query):
            raise HTTPError(400, "control characters are not allowed in the query string")
        # segments[0] is "api"
        remote = self.ctx.served_remote(segments[1] if len(segments) > 1 else "", TYPE_NAMES,
                                        "/api/<remote>/<path>")
        return remote, [s for s in segments[2:] if s != ""], query

    def may_upload(self, request: Any, remote: RemoteConfig) -> None:
        """A PUT of a file: only to a ``type: local`` remote, with the write scope."""
        if remote.type != "local":
            raise HTTPError(405, f"remote {remote.name!r} is a read-through cache; uploads go to a type: local remote",
                            {"Allow": "GET, HEAD, DELETE"})
        self.ctx.auth.require(request, "write")

    def body_gate(self, request: Any) -> BodyDecision:
        """Where a request's body goes, by the checks ``dispatch`` makes before reading it."""
        return self._gate(request)

    def _body_checks(self, request: Any) -> BodyDecision:
        vet_request(request, self.max_path)
        remote, rest, _query = self.locate(request)
        if rest and request.method == b"PUT":
            self.may_upload(request, remote)
            return ToSpool(self.ctx.store)
        if not rest and request.method == b"POST":
            self.ctx.auth.require(request, "write")  # a prefetch list: small, parsed by the handler
        return None

    @app.route("/", branch=True, methods=["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"])
    async def dispatch(self, request: Any) -> Any:
        remote, rest, query = self.locate(request)
        path = "/".join(rest)
        method = request.method
        if not rest:
            if method in (b"GET", b"HEAD"):
                self.ctx.auth.require(request, "read")
                return await self.listing(request, remote)
            if method == b"POST":
                self.ctx.auth.require(request, "write")
                return await self.prefetch(request, remote)
            if method == b"DELETE":
                self.ctx.auth.require(request, "admin")
                refuse_local_purge(self.ctx, remote.name)  # uploads: DELETE them one by one
                return _json(request, {"purged": await self.ctx.store.purge_remote(remote.name)})
            raise HTTPError(405, f"{method.decode()} is not allowed on a remote", {"Allow": "GET, HEAD, POST, DELETE"})
        key = _key(remote, path, query)
        if method in (b"GET", b"HEAD"):
            self.ctx.auth.require(request, "read")
            if remote.type == "local":
                return await self.serve_local(request, remote, key, path)
            req = await self.cache_request(remote, rest, query)
            with serving_range(request, req.key):  # backend s3: a Range may come from the bucket
                result = await self.ctx.cache.get(req)
            index = self.indexes.get(remote.name)
            if index is not None and index.is_index(path):
                base = f"{public_base(request, self.ctx.config.server.public_url)}/api/{remote.name}"
                return await index.serve(request, result, path, base)
            return await respond(request, result, self.ctx.store, self.ctx.metrics, remote.name, path, sendfile=self.ctx.sendfile)
        if method == b"PUT":
            self.may_upload(request, remote)
            return await self.upload(request, remote, key, path)
        if method == b"DELETE":
            self.ctx.auth.require(request, "admin")
            # On a local remote, deleting the upload itself (explicit, one path);
            # on a cache, a purge that a fetch of the key in progress respects.
            store = self.ctx.store
            return _json(request, {"purged": await (store.purge_key(key) if remote.type == "local"
                                                    else store.purge_cached_key(key))})
        allow = "GET, HEAD, PUT, DELETE" if remote.type == "local" else "GET, HEAD, DELETE"
        raise HTTPError(405, f"{method.decode()} is not allowed here", {"Allow": allow})

    # -- reads -------------------------------------------------------------------------

    def classify(self, remote: RemoteConfig, path: str) -> Freshness | None:
        """Freshness of ``path`` (sparkcache.protocols._index); None when policy forbids it."""
        index = self.indexes.get(remote.name)
        return index.classify(path) if index is not None else classify_by_patterns(remote, path)

    def rewrites(self, remote: RemoteConfig, path: str) -> bool:
        """Whether responses for this path are rewritten metadata."""
        index = self.indexes.get(remote.name)
        return index is not None and index.is_index(path)

    async def cache_request(self, remote: RemoteConfig, rest: list[str], query: str) -> CacheRequest:
        path = "/".join(rest)
        kind = self.classify(remote, path)
        if kind is None:
            raise HTTPError(403, f"path {path!r} is outside the immutable_patterns of remote {remote.name!r}")
        index = self.indexes.get(remote.name)
        # What the stored index says this file hashes to (never for a query: other bytes, perhaps).
        expected = await index.expected_digest(path) if index is not None and not query else None
        return _cache_request(remote, rest, path, query, kind, expected)

    async def serve_local(self, request: Any, remote: RemoteConfig, key: str, path: str) -> Any:
        entry = await self.ctx.store.index.get(key)
        if entry is None or entry.status != 200:
            raise HTTPError(404, f"{path!r} not found in local remote {remote.name!r}")
        self.ctx.store.index.touch(entry, self.ctx.clock.seconds())
        return await respond(request, Hit(entry, "HIT"), self.ctx.store, self.ctx.metrics, remote.name, path,
                             sendfile=self.ctx.sendfile)

    async def listing(self, request: Any, remote: RemoteConfig) -> bytes:
        entries = await self.ctx.store.list(remote.name)
        return _json(request, {
            "remote": remote.name,
            "entries": [
                {"path": e.path, "size": e.size, "digest": e.digest, "content_type": e.content_type,
                 "fetched": e.fetched, "expires": e.expires, "last_access": e.last_access}
                for e in entries
            ],
        })

    async def prefetch(self, request: Any, remote: RemoteConfig) -> bytes:
        if remote.type == "local":
            raise HTTPError(400, "a local remote has no upstream to prefetch from")
        try:
            body = json.loads(request.content.read(1 << 20) or b"{}")
            paths = body["paths"]
            assert isinstance(paths, list) and all(isinstance(p, str) for p in paths)
        except Exception:
            raise HTTPError(400, 'expected a JSON body {"paths": ["path", ...]}') from None
        if len(paths) > MAX_PREFETCH:
            raise HTTPError(400, f"at most {MAX_PREFETCH} paths per prefetch")
        results = []
        for p in paths:
            results.append(await self._prefetch_one(remote, p))
        return _json(request, {"results": results})

    async def _prefetch_one(self, remote: RemoteConfig, raw: str) -> dict[str, Any]:
        try:
            rest = [s for s in split_raw_path(raw.lstrip("/").encode("utf-8"), self.max_path) if s]
            if not rest:
                raise BadPath("empty path")
            req = await self.cache_request(remote, rest, "")
        except (BadPath, HTTPError) as e:
            return {"path": raw, "status": "error", "code": getattr(e, "status", 400), "message": str(e)}
        result = await self.ctx.cache.get(req)
        if isinstance(result, Live):
            try:
                flight = await result.flight.wait_done()
            except BodyError as e:
                return {"path": req.path, "status": "error", "code": 502, "message": str(e)}
            return {"path": req.path, "status": "cached", "code": 200, "size": flight.written}
        if isinstance(result, Hit):
            return {"path": req.path, "status": "cached", "code": 200, "size": result.entry.size}
        assert isinstance(result, Failed)
        return {"path": req.path, "status": "error", "code": result.status, "message": result.message}

    # -- uploads to local remotes --------------------------------------------------------

    async def upload(self, request: Any, remote: RemoteConfig, key: str, path: str) -> bytes:
        expected = _expected_sha256(request)
        store = self.ctx.store
        # The very file the body was written to as it arrived: committed, not copied.
        spool = await request_spool(request, store)
        digest = spool.hexdigest()
        if expected is not None and expected != digest:
            store.discard(spool)
            raise HTTPError(400, f"checksum mismatch: body has sha256 {digest}, header says {expected}")
        now = self.ctx.clock.seconds()
        ctype = header(request, b"content-type") or guess_type(path)
        headers = {"content-type": ctype, "etag": f'"sha256:{digest}"',
                   "last-modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))}
        # Pinned: an upload exists nowhere else, so no eviction or cache purge removes it.
        try:
            entry = await self.ctx.cache.adopt(Target(key, remote.name, path, pinned=True), spool, headers)
        except BodyError as e:
            raise HTTPError(500, f"upload not stored: {e}") from None
        request.setResponseCode(201)
        return _json(request, {"path": path, "size": entry.size, "digest": f"sha256:{digest}"})


def _key(remote: RemoteConfig, path: str, query: str) -> str:
    return f"{remote.name}:{path}" + (f"?{query}" if query else "")


def _bad_query(query: str) -> bool:
    return any(ord(c) < 0x20 or c in " \x7f" for c in query)


def _cache_request(remote: RemoteConfig, rest: list[str], path: str, query: str, kind: Freshness,
                   expected: str | None) -> CacheRequest:
    tail = quote_segments(rest) + (f"?{query}" if query else "")
    url, *mirrors = (f"{u}/{tail}" for u in remote.upstreams)
    return CacheRequest(
        remote=remote, key=_key(remote, path, query), path=path, url=url, ttl=kind.ttl,
        revalidate=remote.check_mutable_updates, expected_digest=expected, mirrors=tuple(mirrors),
    )


def _expected_sha256(request: Any) -> str | None:
    v = header(request, b"x-checksum-sha256")
    if v:
        return v.strip().lower().removeprefix("sha256:")
    digest = header(request, b"digest")
    if digest:
        for part in digest.split(","):
            algo, _, value = part.strip().partition("=")
            if algo.lower() == "sha-256":
                try:
                    return binascii.hexlify(base64.b64decode(value)).decode()
                except binascii.Error:
                    raise HTTPError(400, "malformed Digest header") from None
    return None


def _json(request: Any, obj: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(obj).encode() + b"\n"

