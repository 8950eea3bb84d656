"""``/nx/<remote>/v1/cache/<hash>``: Nx's self-hosted remote cache API.

Nx (``NX_SELF_HOSTED_REMOTE_CACHE_SERVER=http://cache/nx/<remote>``) asks
``GET /v1/cache/<hash>`` before running a cacheable task (200 with the
task's output tarball, or 404) and ``PUT``s the tarball after running it.
Per Nx's spec an entry is never overwritten: a PUT of a hash already stored
answers 409 and keeps the stored bytes. Uploads need the ``write`` scope;
downloads ``read``, or none when ``auth.anonymous_read`` allows it (Nx runs
without ``NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN``). A failing store is a
miss on reads and a clean 413/507 on writes, which Nx reports and builds on.
"""

from __future__ import annotations

import re
from typing import Any

from klein import Klein
from twisted.web.resource import IResource

from sparkcache.context import Context
from sparkcache.protocols._keyed import KeyedBlobs
from sparkcache.web.bodies import BodyDecision, checked
from sparkcache.web.errors import JSON, HTTPError, add_error_handling, guarded
from sparkcache.web.paths import split_raw_path

TYPE = "nx"
ALL_METHODS = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"]
# Nx's hashes are decimal u64s; room for other clients of the spec.
HASH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class NxApp:
    app = Klein()

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.max_path = ctx.config.server.max_path_length
        self.blobs = {n: KeyedBlobs(ctx, r, JSON) for n, r in ctx.config.remotes.items() if r.type == TYPE}

    def resource(self) -> IResource:
        return guarded(self.app, JSON, self.max_path)

    add_error_handling(app, JSON)

    def locate(self, request: Any) -> tuple[KeyedBlobs, str]:
        """The remote's blobs and the hash of ``/nx/<remote>/v1/cache/<hash>``."""
        segments = split_raw_path(request.uri, self.max_path)[1:]  # [0] is "nx"
        if not segments or segments[0] == "":
            raise HTTPError(404, "no remote named; Nx uses NX_SELF_HOSTED_REMOTE_CACHE_SERVER=<cache>/nx/<remote>")
        blobs = self.blobs.get(segments[0])
        if blobs is None:
            raise HTTPError(404, f"no type: nx remote named {segments[0][:80]!r}")
        if len(segments) != 4 or segments[1:3] != ["v1", "cache"]:
            raise HTTPError(404, "the cache API is at v1/cache/<hash>")
        if not HASH.fullmatch(segments[3]):
            raise HTTPError(400, "a task hash is 1-128 letters, digits, '.', '_' or '-'")
        return blobs, segments[3]

    def body_gate(self, request: Any) -> BodyDecision:
        return checked(JSON, self._gate)(request)

    def _gate(self, request: Any) -> BodyDecision:
        if request.method != b"PUT":
            return None
        blobs, _hash = self.locate(request)
        self.ctx.auth.require(request, "write")
        return blobs.body_gate(request)

    @app.route("/", branch=True, methods=ALL_METHODS)
    async def dispatch(self, request: Any) -> Any:
        blobs, hash_ = self.locate(request)
        if request.method in (b"GET", b"HEAD"):
            self.ctx.auth.require(request, "read")
            return await blobs.serve(request, hash_, {"Cache-Control": "no-store"})
        if request.method == b"PUT":
            self.ctx.auth.require(request, "write")
            stored = await blobs.put(request, hash_, {"content-type": "application/octet-stream"})
            if not stored.created:
                raise HTTPError(409, f"task {hash_} is already stored; entries are never overwritten")
            request.setResponseCode(200)
            request.setHeader(b"Content-Length", b"0")
            return b""
        raise HTTPError(405, f"{request.method.decode('latin-1')} is not allowed here", {"Allow": "GET, HEAD, PUT"})
