"""``/go/<remote>/``: a GOPROXY (``go help goproxy``) in front of another one.

Freshness follows the protocol: ``@v/list``, ``@latest`` and the ``.info``
of a query (``@v/master.info``) change upstream, so they get the remote's
``mutable_ttl``, are revalidated when stale and served stale when the
upstream fails; the ``.info``, ``.mod`` and ``.zip`` of a canonical version
never change and are kept for good. "Not found" (404 or 410 upstream, which
``go`` reads as "try the next proxy") is passed on as a plain-text 404 and
remembered for ``negative_ttl``. Every error is plain text: ``go`` prints a
proxy's error body to its user as it is.

A ``.zip`` is checked to be a module zip for exactly the requested module
and version (sparkcache.protocols.go.modzip) before it is committed, and a
``.mod`` must equal the stored zip's go.mod (and the other way round).
"""

from __future__ import annotations

import functools
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.web.resource import IResource

from sparkcache.config import RemoteConfig
from sparkcache.context import Context
from sparkcache.fetch import CacheRequest, Failed, Hit, Live, Result
from sparkcache.fetch.flight import BodyError
from sparkcache.protocols.go import modzip, paths, sumdb
from sparkcache.protocols.go.paths import BadModulePath, ModuleRequest
from sparkcache.web.errors import ErrorFormat, ErrorReply, HTTPError, add_error_handling, guarded, set_headers
from sparkcache.web.hits import FastHits, FastRoute
from sparkcache.web.paths import split_raw_path
from sparkcache.web.respond import respond

log = Logger()
GO_TYPES = ("go",)
METHODS = ["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"]
# What each file is, when the upstream does not say.
CONTENT_TYPES = {"list": "text/plain; charset=utf-8", "latest": "application/json", "info": "application/json",
                 "mod": "text/plain; charset=utf-8", "zip": "application/zip"}
# The metric form of each request (metrics.form).
FORMS = {"list": "list", "latest": "info", "info": "info", "mod": "mod", "zip": "zip"}


def render_text(request: Any, reply: ErrorReply) -> bytes:
    """Go's error convention: the status, and a plain-text line ``go`` shows its user."""
    request.setResponseCode(reply.status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    set_headers(request, reply.headers)
    return reply.message.encode("utf-8") + b"\n"


TEXT = ErrorFormat(render_text, rules=(
    (BadModulePath, lambda e, request: ErrorReply(404, f"not found: {e}")),
))


class GoApp:
    app = Klein()

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.max_path = ctx.config.server.max_path_length

    def resource(self) -> IResource:
        return FastHits(self.ctx, self.fast_route, guarded(self.app, TEXT, self.max_path), TEXT, self.max_path)

    def fast_route(self, request: Any, segments: list[str]) -> FastRoute | None:
        """Where a GET/HEAD of this module file would be found in the index;
        None for anything else (dispatch answers it). From the URL and the
        configuration alone (FastHits keeps the answer)."""
        if len(segments) < 4 or b"?" in request.uri:
            return None
        remote = self.ctx.config.remotes.get(segments[1])
        if remote is None or remote.type not in GO_TYPES or segments[2] == "sumdb":
            return None
        try:
            mreq = paths.parse([s for s in segments[2:] if s != ""])
        except BadModulePath:
            return None
        return FastRoute(_key(remote, mreq.tail), remote.name, mreq.tail, CONTENT_TYPES[mreq.form], FORMS[mreq.form])

    add_error_handling(app, TEXT)

    @app.route("/", branch=True, methods=METHODS)
    async def dispatch(self, request: Any) -> Any:
        segments = split_raw_path(request.uri, self.max_path)  # segments[0] is "go"
        if len(segments) < 2 or segments[1] == "":
            raise HTTPError(404, "not found: use /go/<remote>/<module>/@v/...")
        remote = self.ctx.config.remotes.get(segments[1])
        if remote is None:
            raise HTTPError(404, f"not found: no remote named {segments[1]!r}")
        if remote.type not in GO_TYPES:
            raise HTTPError(404, f"not found: remote {remote.name!r} is a type: {remote.type} remote, served at "
                                 f"{self.ctx.remote_url(remote.name)}")
        if request.method not in (b"GET", b"HEAD"):
            raise HTTPError(405, f"{request.method.decode('latin-1')} is not allowed: a module proxy is read-only",
                            {"Allow": "GET, HEAD"})
        self.ctx.auth.require(request, "read")
        rest = [s for s in segments[2:] if s != ""]
        if request.uri.partition(b"?")[2]:
            raise HTTPError(400, "bad request: a module proxy takes no query string")
        if rest and rest[0] == "sumdb":
            return await self.serve_sumdb(request, remote, rest[1:])
        return await self.serve_module(request, remote, paths.parse(rest))

    # -- module files ----------------------------------------------------------------

    async def serve_module(self, request: Any, remote: RemoteConfig, mreq: ModuleRequest) -> Any:
        url, *mirrors = (f"{u}/{mreq.tail}" for u in remote.upstreams)
        key = _key(remote, mreq.tail)
        immutable = mreq.canonical
        req = CacheRequest(
            remote=remote, key=key, path=mreq.tail, url=url, mirrors=tuple(mirrors),
            ttl=(remote.cache.immutable_ttl or None) if immutable else remote.cache.mutable_ttl,
            revalidate=not immutable, validate=await self._validator(remote, mreq, key),
        )
        result = await self.ctx.cache.get(req)
        what = f"{mreq.module}@{mreq.version}" if mreq.version else mreq.module
        return await self._answer(request, remote, result, mreq.tail, FORMS[mreq.form], what,
                                  CONTENT_TYPES[mreq.form])

    async def _validator(self, remote: RemoteConfig, mreq: ModuleRequest, key: str) -> Any:
        """The check a ``.zip`` or ``.mod`` passes before commit, given what the store has
        of the same version (read only when this file is not already stored and fresh)."""
        if mreq.form not in ("zip", "mod"):
            return None
        assert mreq.version is not None
        store, now = self.ctx.store, self.ctx.clock.seconds()
        mine = await store.index.get(key)
        if mine is not None and mine.status == 200 and mine.fresh(now):
            return None  # a hit: nothing will be committed
        if mreq.form == "zip":
            mod = await store.index.get(_key(remote, mreq.tail[:-len("zip")] + "mod"))
            stored_mod = None
            if mod is not None and mod.status == 200:
                try:
                    stored_mod = await store.read(mod, modzip.MAX_GO_MOD)
                except FileNotFoundError:
                    pass
            return functools.partial(modzip.check_zip, module=mreq.module, version=mreq.version, stored_mod=stored_mod)
        zipped = await store.index.get(_key(remote, mreq.tail[:-len("mod")] + "zip"))
        zip_gomod = None
        if zipped is not None and zipped.status == 200:
            try:
                body = store.open_range(zipped)
            except FileNotFoundError:
                body = None
            if body is not None:
                try:
                    zip_gomod = await store.in_io(modzip.stored_gomod, body, mreq.module, mreq.version)
                except BodyError as e:
                    log.warn("stored zip {key} no longer reads as a module zip: {e}", key=zipped.key, e=e)
                finally:
                    body.close()
        return functools.partial(modzip.check_mod, module=mreq.module, version=mreq.version, zip_gomod=zip_gomod)

    # -- the checksum database ------------------------------------------------------------

    async def serve_sumdb(self, request: Any, remote: RemoteConfig, rest: list[str]) -> Any:
        sreq = sumdb.parse(rest)
        url = sumdb.options_of(remote).sumdb_url(sreq.name)
        if url is None:
            # The protocol's "not proxied here": go then asks the database itself.
            raise HTTPError(404, f"not found: remote {remote.name!r} does not proxy checksum database {sreq.name!r}")
        if sreq.kind == "supported":
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.setHeader(b"Content-Length", b"0")
            self.ctx.metrics.form(remote.name, "sumdb", "hit")
            return b""
        result = await self.ctx.cache.get(sumdb.cache_request(remote, sreq, url))
        return await self._answer(request, remote, result, f"sumdb/{sreq.name}/{sreq.tail}", "sumdb",
                                  f"{sreq.name} {sreq.tail}", "text/plain; charset=utf-8")

    # -- answers ----------------------------------------------------------------------------

    async def _answer(self, request: Any, remote: RemoteConfig, result: Result, path: str, form: str, what: str,
                      content_type: str) -> Any:
        metrics = self.ctx.metrics
        if isinstance(result, Failed):
            metrics.form(remote.name, form, "error")
            metrics.response(remote.name, "error")
            if result.status in (404, 410):
                raise HTTPError(result.status, f"not found: {what}: {result.message}")
            raise HTTPError(result.status, f"{what}: {result.message}", result.headers)
        state = result.state if isinstance(result, (Hit, Live)) else "error"
        metrics.form(remote.name, form, state.lower())
        headers = result.entry.headers if isinstance(result, Hit) else result.flight.headers
        extra = None if headers.get("content-type") else {"Content-Type": content_type}
        return await respond(request, result, self.ctx.store, metrics, remote.name, path, extra,
                             sendfile=self.ctx.sendfile)


def _key(remote: RemoteConfig, tail: str) -> str:
    return f"{remote.name}:{tail}"
