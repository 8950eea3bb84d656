"""``/cargo/<remote>/``: a pull-through cache of a cargo sparse registry.

``index/`` is the sparse index clients are pointed at
(``sparse+http://cache/cargo/<remote>/index/``), ``crates/`` the downloads
its rewritten ``config.json`` names (see :mod:`sparkcache.protocols.cargo.index`).

A crate is fetched only once its version is found in the crate's index file
(fetched through the cache when the store has none that lists it): the
index line's ``cksum`` is what the body must hash to, and the upstream URL
comes from upstream's own ``config.json`` ``dl`` template, expanded with the
name and version of that line, never from anything else the client sent.
Errors are in cargo's form, ``{"errors": [{"detail": "..."}]}``.
"""

from __future__ import annotations

import json
from typing import Any, Union

from klein import Klein
from twisted.web.resource import IResource

from sparkcache.config import Config, RemoteConfig
from sparkcache.context import Context
from sparkcache.fetch import Body, Cache, CacheRequest, Failed, Hit, Live, Result, Source, Target, Upstream
from sparkcache.fetch.flight import BodyError
from sparkcache.protocols._index import DerivedCache, Runner, TooLarge
from sparkcache.protocols._live import refreshed
from sparkcache.protocols.cargo import names
from sparkcache.protocols.cargo.index import CONFIG, MAX_CONFIG, CargoIndex, crate_path, expand_dl, parse_dl
from sparkcache.store import Entry
from sparkcache.web.errors import ErrorFormat, ErrorReply, HTTPError, add_error_handling, guarded, set_headers
from sparkcache.web.paths import split_raw_path
from sparkcache.web.respond import respond
from sparkcache.web.serve import error_message
from sparkcache.web.urls import public_base

TYPE = "cargo"
ALL_METHODS = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"]


# -- cargo's error form -----------------------------------------------------------------


def cargo_error_body(request: Any, status: int, message: str) -> bytes:
    """``{"errors": [{"detail": message}]}``: what cargo prints from a registry's error."""
    body = json.dumps({"errors": [{"detail": message}]}).encode() + b"\n"
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    return b"" if request.method == b"HEAD" else body


def render_cargo(request: Any, reply: ErrorReply) -> bytes:
    body = cargo_error_body(request, reply.status, reply.message)
    set_headers(request, reply.headers)
    return body


CARGO = ErrorFormat(render_cargo, not_found="no such endpoint; cargo uses /cargo/<remote>/index/")


def as_cargo(request: Any, out: bytes | None) -> bytes | None:
    """Re-render an error body of the shared serving helpers (a failed fetch, a
    416, a vanished cached body) in cargo's form; anything else passes through."""
    code = getattr(request, "code", 200)
    if not isinstance(out, bytes) or code < 400:
        return out
    return cargo_error_body(request, code, error_message(out))


def _form_result(result: Result) -> str:
    if isinstance(result, Failed):
        return "error"
    return "miss" if isinstance(result, Live) else result.state.lower()


class CargoApp:
    app = Klein()

    def __init__(self, ctx: Context, run: Runner | None = None) -> None:
        """``run`` parses index files and config.json in a worker thread (a pool of
        the protocol's own in the daemon; the store's I/O pool by default)."""
        self.ctx = ctx
        self.max_path = ctx.config.server.max_path_length
        self.derived = DerivedCache(ctx.store, run or ctx.store.in_io)
        self.indexes: dict[str, CargoIndex] = {}
        self.reconfigure(ctx.config)

    def reconfigure(self, config: Config) -> None:
        """The remotes of ``config`` from now on (Built.reconfigure)."""
        self.indexes = refreshed(self.indexes, (r for r in config.remotes.values() if r.type == TYPE),
                                 lambda r: CargoIndex(r, self.ctx, self.derived), lambda i: i.remote)

    def resource(self) -> IResource:
        return guarded(self.app, CARGO, self.max_path)

    add_error_handling(app, CARGO)

    @app.route("/", branch=True, methods=ALL_METHODS)
    async def dispatch(self, request: Any) -> Any:
        segments = split_raw_path(request.uri, self.max_path)[1:]  # [0] is "cargo"
        if request.method not in (b"GET", b"HEAD"):
            raise HTTPError(405, "the cache serves a read-only registry: GET and HEAD only", {"Allow": "GET, HEAD"})
        if not segments or segments[0] == "":
            raise HTTPError(404, "no remote named; cargo uses sparse+http://<cache>/cargo/<remote>/index/")
        index = self.indexes.get(segments[0])
        if index is None:
            raise HTTPError(404, f"no type: cargo remote named {segments[0][:80]!r}")
        self.ctx.auth.require(request, "read")
        kind, rest = (segments[1], segments[2:]) if len(segments) > 1 else ("", [])
        if kind == "index":
            if rest == ["config.json"]:
                return await self.config(request, index)
            name = names.name_of_index_path(rest)
            return await self.index_file(request, index, name)
        if kind == "crates":
            if len(rest) != 3 or rest[2] != "download":
                raise HTTPError(404, "crates are at crates/<name>/<version>/download")
            name, version = names.check_name(rest[0]), names.check_version(rest[1])
            return await self.crate(request, index, name, version)
        raise HTTPError(404, f"no such path; the index is at /cargo/{index.remote.name}/index/")

    # -- requests through the cache -----------------------------------------------

    def index_request(self, index: CargoIndex, path: str) -> CacheRequest:
        """The CacheRequest of ``index/...`` (config.json or a crate's index file)."""
        remote = index.remote
        return CacheRequest(remote=remote, key=index.key(path), path=path, url=index.upstream_url(path),
                            ttl=remote.cache.mutable_ttl, revalidate=True)

    async def stored(self, result: Result, what: str) -> Entry:
        """The committed entry of ``result`` (waiting for a miss to finish); an HTTPError when there is none."""
        if isinstance(result, Failed):
            status = result.status if result.status in (404, 410, 451) else 502
            raise HTTPError(status, f"{what}: {result.message}")
        if isinstance(result, Live):
            try:
                return (await result.flight.wait_done()).entry  # type: ignore[no-any-return]
            except BodyError as e:
                raise HTTPError(502, f"{what}: {e}") from None
        return result.entry

    async def upstream_dl(self, index: CargoIndex) -> str:
        """Upstream's ``dl`` template, from its config.json: the stored one, stale
        or not (cargo asks for config.json on every run, which keeps it revalidated
        at the remote's TTL), else fetched through the cache."""
        entry = await self.ctx.store.index.get(index.key(CONFIG))
        if entry is None or entry.status != 200 or entry.digest is None:
            result = await self.ctx.cache.get(self.index_request(index, CONFIG))
            entry = await self.stored(result, "upstream config.json")
        return await self.dl_of(index, entry)

    async def dl_of(self, index: CargoIndex, entry: Entry) -> str:
        """The ``dl`` template of the stored config.json ``entry`` (parsed once per body)."""
        try:
            return await self.derived.get(f"dl:{index.remote.name}", entry, "", MAX_CONFIG, parse_dl, len)
        except (TooLarge, ValueError) as e:
            raise HTTPError(502, f"upstream config.json is unusable: {e}") from None
        except FileNotFoundError:
            raise HTTPError(503, "cached config.json missing; retry") from None

    async def cksum(self, index: CargoIndex, name: str, version: str) -> str:
        """The ``cksum`` the crate's index line gives; fetches the index file when
        no stored one lists the version. A 404 when the index does not list it."""
        path = crate_path(name, version)
        digest = await index.expected_digest(path)
        if digest is None:
            result = await self.ctx.cache.get(self.index_request(index, "index/" + names.index_path(name)))
            await self.stored(result, f"index file of {name}")
            digest = await index.expected_digest(path)
        if digest is None:
            raise HTTPError(404, f"{name} {version} is not in the index of remote {index.remote.name!r} "
                                 "(names are case-sensitive here, as in the index)")
        return digest

    # -- the three kinds of path ------------------------------------------------------

    async def config(self, request: Any, index: CargoIndex) -> Any:
        name = index.remote.name
        result = await self.ctx.cache.get(self.index_request(index, CONFIG))
        self.ctx.metrics.form(name, "config", _form_result(result))
        if not isinstance(result, Failed):
            # Never hand cargo upstream's dl (it would bypass the cache): a config
            # without a usable one is a 502, not served as stored.
            entry = await self.stored(result, "upstream config.json")
            await self.dl_of(index, entry)
            result = Hit(entry, result.state)
        base = f"{public_base(request, self.ctx.config.server.public_url)}/cargo/{name}"
        return as_cargo(request, await index.serve(request, result, CONFIG, base))

    async def index_file(self, request: Any, index: CargoIndex, crate: str) -> Any:
        path = "index/" + names.index_path(crate)
        result = await self.ctx.cache.get(self.index_request(index, path))
        self.ctx.metrics.form(index.remote.name, "index", _form_result(result))
        out = await respond(request, result, self.ctx.store, self.ctx.metrics, index.remote.name, path,
                            sendfile=self.ctx.sendfile)
        return as_cargo(request, out)

    async def crate(self, request: Any, index: CargoIndex, name: str, version: str) -> Any:
        remote: RemoteConfig = index.remote
        cksum = await self.cksum(index, name, version)
        path = crate_path(name, version)
        fresh = index.classify(path)
        # The sum is in the key: a registry that republishes a version
        # (crates.io never does) gets a new entry, not the old bytes.
        target = Target(f"{remote.name}:{path}#{cksum}", remote.name, path,
                        fresh.ttl if fresh is not None else None, expected_digest=cksum)
        result = await self.ctx.cache.get(target, _CrateDownload(self, index, name, version, cksum))
        self.ctx.metrics.form(remote.name, "crate", _form_result(result))
        out = await respond(request, result, self.ctx.store, self.ctx.metrics, remote.name, path,
                            extra_headers={"Content-Disposition": f'attachment; filename="{name}-{version}.crate"'},
                            sendfile=self.ctx.sendfile)
        return as_cargo(request, out)


class _CrateDownload(Source):
    """A crate from upstream, at the URL its ``dl`` template gives: worked out only
    when the crate is fetched, so a stored crate is served without config.json."""

    def __init__(self, app: CargoApp, index: CargoIndex, name: str, version: str, cksum: str) -> None:
        self.app, self.index, self.name, self.version, self.cksum = app, index, name, version, cksum

    async def open(self, cache: Cache, target: Target, stale: Entry | None) -> Union[Body, Hit, Failed]:
        try:
            url = expand_dl(await self.app.upstream_dl(self.index), self.name, self.version, self.cksum)
        except HTTPError as e:
            return Failed(e.status, e.message)
        req = CacheRequest(remote=self.index.remote, key=target.key, path=target.path, url=url, ttl=target.ttl,
                           expected_digest=self.cksum)
        return await Upstream(req).open(cache, target, stale)
