"""``/nx/<remote>/v1/cache/<hash>``: Nx's self-hosted remote cache API.

Nx (``NX_SELF_HOSTED_REMOTE_CACHE_SERVER=http://cache/nx/<remote>``) asks
``GET /v1/cache/<hash>`` before running a cacheable task (200 with the
task's output tarball, or 404) and ``PUT``s the tarball after running it.
Per Nx's spec an entry is never overwritten: a PUT of a hash already stored
answers 409 and keeps the stored bytes. Uploads need the ``write`` scope;
downloads ``read``, or none when ``auth.anonymous_read`` allows it (Nx runs
without ``NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN``). A failing store is a
miss on reads. A write it cannot take (over ``max_entry_size``, refused
before the body; over quota; disk full) is a 403, not the 413/507 of the
other build caches: Nx 24 fails the *task* on any PUT status but 200, 401,
403 and 409 ("Misconfigured remote cache endpoint: Unexpected response
status: 413"), and a cache must never fail a build. The JSON body says why.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from klein import Klein
from twisted.web.resource import IResource

from sparkcache.context import Context
from sparkcache.config import Config
from sparkcache.protocols._keyed import KeyedBlobs, keyed_tables
from sparkcache.web.bodies import BodyDecision, Refuse, ToSpool, checked
from sparkcache.web.errors import JSON, HTTPError, add_error_handling, guarded
from sparkcache.web.paths import split_raw_path

TYPE = "nx"
ALL_METHODS = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"]
# Nx's hashes are decimal u64s; room for other clients of the spec.
HASH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The statuses of an upload the cache cannot take, and the one Nx builds on.
NOT_TAKEN = (413, 507)
DECLINED = 403


def declined(refusal: Refuse) -> Refuse:
    """The refusal Nx builds on in place of a 413 (see the module's doc)."""
    reply = refusal.reply
    if reply.status not in NOT_TAKEN:
        return refusal
    return replace(refusal, reply=replace(reply, status=DECLINED, message=f"not stored: {reply.message}"))


class NxApp:
    app = Klein()

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.max_path = ctx.config.server.max_path_length
        self.blobs: dict[str, KeyedBlobs] = {}
        self.reconfigure(ctx.config)

    def reconfigure(self, config: Config) -> None:
        """The remotes of ``config`` from now on (Built.reconfigure)."""
        self.blobs = keyed_tables(self.ctx, self.blobs, (r for r in config.remotes.values() if r.type == TYPE), JSON)

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
        decision = blobs.body_gate(request)
        if isinstance(decision, Refuse):
            return declined(decision)
        if isinstance(decision, ToSpool) and decision.too_large is not None:
            return replace(decision, too_large=declined(decision.too_large))
        return decision

    @app.route("/", branch=True, methods=ALL_METHODS)
    async def dispatch(self, request: Any) -> Any:
        blobs, hash_ = self.locate(request)
        if request.method in (b"GET", b"HEAD"):
            self.ctx.auth.require(request, "read")
            return await blobs.serve(request, hash_, {"Cache-Control": "no-store"})
        if request.method == b"PUT":
            self.ctx.auth.require(request, "write")
            try:
                stored = await blobs.put(request, hash_, {"content-type": "application/octet-stream"})
            except HTTPError as e:
                if e.status in NOT_TAKEN:
                    raise HTTPError(DECLINED, f"not stored: {e.message}") from None
                raise
            if not stored.created:
                raise HTTPError(409, f"task {hash_} is already stored; entries are never overwritten")
            request.setResponseCode(200)
            request.setHeader(b"Content-Length", b"0")
            return b""
        raise HTTPError(405, f"{request.method.decode('latin-1')} is not allowed here", {"Allow": "GET, HEAD, PUT"})
