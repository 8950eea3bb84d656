"""``/npm/<remote>/``: one registry root per remote.

Routing works on the raw path (:mod:`sparkcache.protocols.npm.names`). A
packument comes in two forms, each its own store entry fetched from upstream
in that form: full (``Accept: application/json``, npm) and abbreviated
(``application/vnd.npm.install-v1+json``, pnpm and yarn). What clients get is
rendered once per stored body in the protocol's worker threads (tarball URLs
pointed here, gzipped) and shared by every request until the body changes.

A tarball is fetched from the URL its package's stored packument names and
verified while it streams against that packument's ``dist.integrity``
(sha512; ``shasum`` when there is none): a file no packument lists is a 404,
so no client can make the cache fetch from a URL of its own.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.resource import IResource

from sparkcache.config import RemoteConfig
from sparkcache.context import Context
from sparkcache.fetch import CacheRequest, Failed, Hit, Live, Result
from sparkcache.fetch.cache import Body, Cache, Target, Upstream
from sparkcache.fetch.flight import BodyError
from sparkcache.fetch.produce import watch_ends
from sparkcache.protocols._group import first_having
from sparkcache.protocols._index import DerivedCache, Runner, TooLarge, mapping_size
from sparkcache.protocols.npm import NPM_TYPES, options_of
from sparkcache.protocols.npm import names
from sparkcache.protocols.npm.names import Route
from sparkcache.protocols.npm.packument import (
    ABBREVIATED_TYPE, FULL_TYPE, NotJSON, Rendered, Tarball, abbreviate, check_json, check_json_file, decoded, render,
    tarballs,
)
from sparkcache.protocols.npm.publish import MAX_PUBLISH, MAX_TAG_BODY, Publisher, local_key
from sparkcache.store import Entry
from sparkcache.web.bodies import BodyDecision, InMemory, Refuse, ToSpool, checked
from sparkcache.web.errors import JSON, ErrorReply, HTTPError, add_error_handling
from sparkcache.web.hits import FastHits, FastRoute
from sparkcache.web.paths import BadPath, vet_host
from sparkcache.web.proxy import pass_through
from sparkcache.web.respond import respond
from sparkcache.web.serve import error_body, header, send_generated
from sparkcache.web.urls import public_base

log = Logger()

# Packuments over this are refused rather than read into memory to render
# (the largest on the public registry are around 40 MB).
MAX_PACKUMENT = 96 << 20
# Rendered packuments (gzipped) and tarball lists kept in memory.
DERIVED_BYTES = 48 << 20
# An audit request names every package of a lockfile: a few MB at most.
MAX_AUDIT_BODY = 16 << 20
FULL, ABBREVIATED = "full", "abbreviated"
# The metrics form of each.
FORM_NAMES = {FULL: "packument", ABBREVIATED: "abbreviated"}
ACCEPTS = {FULL: b"application/json", ABBREVIATED: ABBREVIATED_TYPE.encode() + b", application/json;q=0.8"}


def wanted_form(accept: str | None) -> str:
    """The packument form an Accept header asks for: abbreviated when it names install-v1 (unless q=0)."""
    for item in (accept or "").split(","):
        mtype, *params = (p.strip() for p in item.split(";"))
        if mtype.lower() == ABBREVIATED_TYPE:
            q = next((p[2:] for p in params if p.lower().startswith("q=")), "1")
            try:
                return ABBREVIATED if float(q) > 0 else FULL
            except ValueError:
                return ABBREVIATED
    return FULL


def accepts_gzip(accept_encoding: str | None) -> bool:
    for item in (accept_encoding or "").split(","):
        coding, *params = (p.strip() for p in item.split(";"))
        if coding.lower() in ("gzip", "x-gzip", "*"):
            return not any(p.replace(" ", "").lower() in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params)
    return False


def packument_key(remote: str, name: str, form: str) -> str:
    return f"{remote}:{name}" + ("" if form == FULL else "?install-v1")


class _CheckedPackument(Upstream):
    """An upstream packument that must be a JSON object before it is kept:
    anything else fails the production (never stored; the caller serves the
    stale entry or a 502)."""

    def __init__(self, req: CacheRequest, run: Runner) -> None:
        super().__init__(req)
        self.run = run

    async def open(self, cache: Cache, target: Target, stale: Entry | None) -> Body | Hit | Failed:
        opened = await super().open(cache, target, stale)
        if not isinstance(opened, Body):
            return opened
        fill, headers = opened.fill, opened.headers

        async def checked_fill(flight: Any) -> Any:
            await fill(flight)
            await flight.flushed()
            if flight.written > MAX_PACKUMENT:
                raise BodyError(f"the packument is over {MAX_PACKUMENT} bytes")
            spool, size = flight.spool, flight.written

            def check() -> None:
                with spool.reader() as f:
                    if headers.get("content-encoding"):
                        check_json(decoded(f.read(MAX_PACKUMENT + 1), headers, MAX_PACKUMENT))
                    else:
                        check_json_file(f, size)

            try:
                await self.run(check)
            except NotJSON as e:
                raise BodyError(str(e)) from None

        opened.fill = checked_fill
        return opened


class NpmApp:
    app = Klein()

    def __init__(self, ctx: Context, run: Runner | None = None) -> None:
        """``run`` runs renders and scans in a worker thread (a pool of the
        protocol's own in the daemon; the store's I/O pool by default)."""
        self.ctx = ctx
        self.run = run or ctx.store.in_io
        self.derived = DerivedCache(ctx.store, self.run, DERIVED_BYTES)
        self.max_path = ctx.config.server.max_path_length
        self.publisher = Publisher(ctx, self.run)
        self._gate = checked(JSON, self._body_checks)
        self._busy: set[Deferred[Any]] = set()

    def resource(self) -> IResource:
        return FastHits(self.ctx, self.fast_route, self.app.resource(), JSON, self.max_path, self._vet)

    def _vet(self, request: Any) -> list[str]:
        """The raw path parsed before Klein decodes it (``%2f`` must reach us as
        written): BadPath for a path that is no registry path (answered in
        JSON); anything else is dispatch()'s to answer."""
        try:
            self.locate(request)
        except HTTPError:
            pass
        return []

    def fast_route(self, request: Any, segments: list[str]) -> FastRoute | None:
        """Where a tarball of an npm remote is found in the index (the hot path
        of every warm install); None for anything else, which dispatch() answers."""
        try:
            remote, route = self.locate(request)
        except (BadPath, HTTPError):
            return None
        if route.kind != "tarball" or remote.type != "npm":
            return None
        return FastRoute(f"{remote.name}:{route.path}", remote.name, route.path, None, "tarball")

    def running(self) -> list[Deferred[Any]]:
        return watch_ends([*self._busy, *self.publisher.running])

    add_error_handling(app, JSON)

    # -- locating ----------------------------------------------------------------------

    def locate(self, request: Any) -> tuple[RemoteConfig, Route]:
        vet_host(request)
        segments = names.raw_segments(request.uri, self.max_path)
        if len(segments) < 2:
            raise HTTPError(404, "no remote named; use /npm/<remote>/")
        # Vetted whole before anything is looked up: Klein would answer a bad one in HTML.
        remote_name, *_ = [names.decode_segment(s) for s in segments[1:]]
        if "/" in remote_name:
            raise BadPath("encoded path separators are not allowed in a remote's name")
        remote = self.ctx.served_remote(remote_name[:80], NPM_TYPES, "/npm/<remote>/")
        return remote, names.parse(segments[2:])

    def body_gate(self, request: Any) -> BodyDecision:
        return self._gate(request)

    def _body_checks(self, request: Any) -> BodyDecision:
        remote, route = self.locate(request)
        method = request.method
        if method == b"PUT" and route.kind == "packument":
            self.publisher.may_publish(request, remote)
            return ToSpool(self.ctx.store, MAX_PUBLISH, Refuse(JSON, ErrorReply(
                413, f"the publish body is over {MAX_PUBLISH} bytes")))
        if method in (b"PUT", b"POST", b"DELETE") and route.kind == "special":
            if route.rest[:1] == ("package",):
                self.publisher.may_publish(request, remote)
                return InMemory(MAX_TAG_BODY, Refuse(JSON, ErrorReply(413, "a dist-tag body is a JSON string")))
            if route.rest[:3] == ("npm", "v1", "security"):
                self.ctx.auth.require(request, "read")
                return InMemory(MAX_AUDIT_BODY, Refuse(JSON, ErrorReply(
                    413, f"an audit body is at most {MAX_AUDIT_BODY} bytes")))
        return None

    # -- dispatch ------------------------------------------------------------------------

    @app.route("/", branch=True, methods=["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"])
    async def dispatch(self, request: Any) -> Any:
        remote, route = self.locate(request)
        method = request.method
        read = method in (b"GET", b"HEAD")
        if route.kind == "special":
            return await self.special(request, remote, route)
        if route.kind == "root":
            if not read:
                raise HTTPError(405, f"{method.decode()} is not allowed here", {"Allow": "GET, HEAD"})
            self.ctx.auth.require(request, "read")
            return _json(request, {"db_name": "registry", "remote": remote.name, "type": remote.type})
        if route.kind == "packument" and method == b"PUT":
            self.publisher.may_publish(request, remote)
            return _json(request, await self.publisher.publish(request, remote, route.name), 201)
        if not read:
            allow = "GET, HEAD, PUT" if remote.type == "npm-local" and route.kind == "packument" else "GET, HEAD"
            raise HTTPError(405, f"{method.decode()} is not allowed here", {"Allow": allow})
        self.ctx.auth.require(request, "read")
        if route.kind == "packument":
            return await self.packument(request, remote, route.name)
        if route.kind == "tarball":
            return await self.tarball(request, remote, route)
        raise HTTPError(404, "version documents are not served; ask for the packument")

    async def special(self, request: Any, remote: RemoteConfig, route: Route) -> Any:
        rest, method = route.rest, request.method
        if rest == ("ping",):
            return _json(request, {})
        if rest == ("whoami",):
            name = self.ctx.auth.identify(request)
            if name is None:
                raise HTTPError(401, "log in with a token (//host/npm/<remote>/:_authToken in .npmrc)")
            return _json(request, {"username": name})
        if rest[:1] == ("package",) and len(rest) in (2, 3) and rest[1] == "dist-tags":
            tag = rest[2] if len(rest) == 3 else None
            if method in (b"GET", b"HEAD") and tag is None:
                self.ctx.auth.require(request, "read")
                return _json(request, await self.dist_tags(remote, route.name))
            if method in (b"PUT", b"POST", b"DELETE") and tag is not None:
                self.publisher.may_publish(request, remote)
                return _json(request, await self.publisher.set_tag(request, remote, route.name, tag, method))
            raise HTTPError(405, f"{method.decode()} is not allowed here")
        if rest == ("v1", "search"):
            self.ctx.auth.require(request, "read")
            return await self.search(request, remote)
        if rest[:3] == ("npm", "v1", "security") and len(rest) > 3:
            self.ctx.auth.require(request, "read")
            return await self.audit(request, remote, rest)
        if rest[:1] == ("user",):
            raise HTTPError(401, "this registry takes tokens, not logins: put "
                                 "//<host>/npm/<remote>/:_authToken=<token> in .npmrc")
        raise HTTPError(404, f"no such endpoint /-/{'/'.join(rest)[:100]}")

    # -- packuments ------------------------------------------------------------------------

    async def packument(self, request: Any, remote: RemoteConfig, name: str) -> Any:
        form = wanted_form(header(request, b"accept"))
        found = await self.find_packument(remote, name, form)
        if isinstance(found, Failed):
            self.ctx.metrics.form(remote.name, FORM_NAMES[form], "error")
            self.ctx.metrics.response(remote.name, "error")
            return error_body(request, found.status, "Not found" if found.status == 404 else found.message)
        member, hit = found
        return await self.send_packument(request, member, name, form, hit, remote)

    async def find_packument(self, remote: RemoteConfig, name: str, form: str) -> tuple[RemoteConfig, Hit] | Failed:
        """The remote (a group's member, or ``remote`` itself) that has ``name``, and its stored packument."""
        if remote.type != "npm-group":
            got = await self.member_packument(remote, name, form)
            return (remote, got) if isinstance(got, Hit) else got
        members = [self.ctx.config.remotes[m] for m in remote.options.members]

        async def probe(member: RemoteConfig) -> Hit | Failed | None:
            got = await self.member_packument(member, name, form)
            # Only "not here" moves on: any other failure ends the search, so a
            # later member never stands in for one that cannot be asked.
            return None if isinstance(got, Failed) and got.status == 404 else got

        first: tuple[RemoteConfig, Hit | Failed] | None = await first_having(members, probe)
        if first is None:
            return Failed(404, f"{name} is in none of {remote.name}'s members")
        member, had = first
        return had if isinstance(had, Failed) else (member, had)

    async def member_packument(self, remote: RemoteConfig, name: str, form: str) -> Hit | Failed:
        """The stored packument of ``name`` in a (non-group) remote, fetched when missing or stale."""
        if remote.type == "npm-local":
            entry = await self.ctx.store.index.get(local_key(remote.name, name))
            if entry is None or entry.status != 200:
                return Failed(404, "not found")
            return Hit(entry, "HIT")
        key = packument_key(remote.name, name, form)
        tail = quote(name, safe="@")
        url, *mirrors = (f"{u}/{tail}" for u in remote.upstreams)
        req = CacheRequest(remote=remote, key=key, path=name, url=url, ttl=remote.cache.mutable_ttl,
                           revalidate=True, headers={b"Accept": ACCEPTS[form]}, mirrors=tuple(mirrors))
        return await self.resolved(await self.ctx.cache.get(req, _CheckedPackument(req, self.run)), key, name)

    async def resolved(self, result: Result, key: str, name: str) -> Hit | Failed:
        """A packument result whole: a miss waited for; one that failed its checks replaced by the stale entry."""
        if not isinstance(result, Live):
            return result
        try:
            flight = await result.flight.wait_done()
        except BodyError as e:
            stale = await self.ctx.store.index.get(key)
            if stale is not None and stale.status == 200:
                log.info("serving the stale packument of {name}: {why}", name=name, why=str(e))
                return Hit(stale, "STALE")
            return Failed(502, f"upstream sent no usable packument for {name}: {e}")
        return Hit(flight.entry, "MISS")

    def rendered(self, member: RemoteConfig, name: str, form: str, entry: Entry, base: str) -> Deferred[Rendered]:
        tarball_base = f"{base}/npm/{member.name}/{names.url_name(name)}"
        headers = entry.headers
        if member.type == "npm-local":
            def fn(body: bytes) -> Rendered:
                doc = json.loads(body)
                if form == ABBREVIATED:
                    body = json.dumps(abbreviate(doc), separators=(",", ":")).encode()
                return render(body, tarball_base)
        else:
            def fn(body: bytes) -> Rendered:
                return render(decoded(body, headers, MAX_PACKUMENT), tarball_base)
        return self.derived.get(f"render:{member.name}:{form}", entry, tarball_base, MAX_PACKUMENT, fn,
                                lambda r: r.weight)

    async def send_packument(self, request: Any, member: RemoteConfig, name: str, form: str, hit: Hit,
                             asked: RemoteConfig) -> bytes | None:
        entry, state = hit.entry, hit.state
        metrics = self.ctx.metrics
        base = public_base(request, self.ctx.config.server.public_url)
        try:
            out = await self.rendered(member, name, form, entry, base)
        except CancelledError:
            raise
        except TooLarge:
            raise HTTPError(502, f"the packument of {name} is over {MAX_PACKUMENT} bytes") from None
        except FileNotFoundError:
            await self.ctx.store.purge_key(entry.key)
            raise HTTPError(503, "cached packument missing; retry") from None
        except (ValueError, NotJSON) as e:
            raise HTTPError(502, f"the stored packument of {name} cannot be read: {str(e)[:200]}") from None
        metrics.form(asked.name, FORM_NAMES[form], state.lower())
        metrics.response(asked.name, state.lower())
        ctype = entry.content_type or FULL_TYPE
        if member.type == "npm-local" or ctype.split(";")[0].strip().lower() not in (FULL_TYPE, ABBREVIATED_TYPE):
            ctype = ABBREVIATED_TYPE if form == ABBREVIATED else FULL_TYPE
        etag = f'W/"{entry.digest[:32] if entry.digest else "0"}-{form[0]}"'
        request.setHeader(b"Content-Type", ctype.encode("latin-1"))
        request.setHeader(b"Vary", b"Accept, Accept-Encoding")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"ETag", etag.encode())
        request.setHeader(b"X-Cache", state.encode())
        request.setHeader(b"X-Artifact-Source", b"remote" if state == "MISS" else b"cache")
        if member is not asked:
            request.setHeader(b"X-Npm-Member", member.name.encode())
        inm = header(request, b"if-none-match")
        if inm and etag in [t.strip() for t in inm.split(",")]:
            request.setResponseCode(304)
            return b""
        count = metrics.bytes_counter(asked.name, "cache")
        if accepts_gzip(header(request, b"accept-encoding")):
            request.setHeader(b"Content-Encoding", b"gzip")
            body = out.gz
        elif out.identity is not None:
            body = out.identity
        else:
            # Inflated as it is sent, with backpressure: never the whole document in memory again.
            request.setHeader(b"Content-Length", str(out.size).encode())
            if request.method == b"HEAD":
                return b""
            await send_generated(request, out.inflater(), out.size, count)
            return None
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if request.method == b"HEAD":
            return b""
        count(len(body))
        return body

    async def dist_tags(self, remote: RemoteConfig, name: str) -> Any:
        found = await self.find_packument(remote, name, ABBREVIATED)
        if isinstance(found, Failed):
            raise HTTPError(found.status, "Not found" if found.status == 404 else found.message)
        member, hit = found

        def tags(body: bytes) -> Any:
            doc = json.loads(decoded(body, hit.entry.headers, MAX_PACKUMENT))
            return doc.get("dist-tags") or {}

        return await self.derived.get("dist-tags", hit.entry, "", MAX_PACKUMENT, tags, lambda t: 64 * len(t) + 64)

    # -- tarballs -----------------------------------------------------------------------------

    async def tarball(self, request: Any, remote: RemoteConfig, route: Route) -> Any:
        metrics, store = self.ctx.metrics, self.ctx.store
        member = remote
        if remote.type == "npm-group":
            found = await self.find_packument(remote, route.name, ABBREVIATED)
            if isinstance(found, Failed):
                metrics.form(remote.name, "tarball", "error")
                return error_body(request, found.status, "Not found" if found.status == 404 else found.message)
            member = found[0]
        key = f"{member.name}:{route.path}"
        entry = await store.index.get(key)
        now = self.ctx.clock.seconds()
        if entry is not None and entry.status == 200 and (entry.fresh(now) or member.type == "npm-local"):
            # Stored: no packument needs reading (the hot path of every warm install).
            store.index.touch(entry, now)
            result: Result = Hit(entry, "HIT")
        elif member.type == "npm-local":
            result = Failed(404, f"{route.file} is not published in {member.name}")
        else:
            listed = await self.listed(member, route.name, route.file)
            if isinstance(listed, Failed):
                result = listed
            else:
                url, *mirrors = tarball_urls(listed.url, member.upstreams)
                req = CacheRequest(remote=member, key=key, path=route.path, url=url,
                                   ttl=member.cache.immutable_ttl or None, checks=listed.checks,
                                   mirrors=tuple(mirrors))
                result = await self.ctx.cache.get(req)
        state = "error" if isinstance(result, Failed) else result.state.lower()
        metrics.form(remote.name, "tarball", state)
        if isinstance(result, Failed) and result.status == 404:
            metrics.response(remote.name, "error")
            return error_body(request, 404, result.message)
        return await respond(request, result, store, metrics, remote.name, route.path, sendfile=self.ctx.sendfile)

    async def listed(self, remote: RemoteConfig, name: str, file: str) -> Tarball | Failed:
        """What the stored packument of ``name`` says of ``file`` (fetching the
        abbreviated packument when none is stored)."""
        for form in (FULL, ABBREVIATED):
            entry = await self.ctx.store.index.get(packument_key(remote.name, name, form))
            if entry is not None and entry.status == 200:
                t = await self._tarballs(entry, file)
                if t is not None:
                    return t
        got = await self.member_packument(remote, name, ABBREVIATED)
        if isinstance(got, Failed):
            return got
        t = await self._tarballs(got.entry, file)
        if t is None:
            return Failed(404, f"{file} is not listed in the packument of {name}")
        return t

    async def _tarballs(self, entry: Entry, file: str) -> Tarball | None:
        headers = entry.headers
        try:
            listing = await self.derived.get(
                "tarballs", entry, "", MAX_PACKUMENT, lambda body: tarballs(decoded(body, headers, MAX_PACKUMENT)),
                lambda found: mapping_size({k: v.url for k, v in found.items()}) + 200 * len(found))
        except (TooLarge, FileNotFoundError, NotJSON):
            return None
        return listing.get(file)

    # -- pass-through -----------------------------------------------------------------------------

    def _passing(self, remote: RemoteConfig, what: str) -> RemoteConfig:
        """The ``type: npm`` remote that answers ``what`` for ``remote`` (a group's first such member)."""
        candidates = [remote] if remote.type != "npm-group" else \
            [self.ctx.config.remotes[m] for m in remote.options.members]
        for r in candidates:
            if r.type == "npm" and getattr(options_of(r), what):
                return r
        raise HTTPError(404, f"{what} is not offered by remote {remote.name!r}")

    async def search(self, request: Any, remote: RemoteConfig) -> Any:
        if remote.type == "npm-local":
            return _json(request, {"objects": [], "total": 0, "time": ""})
        up = self._passing(remote, "search")
        query = request.uri.partition(b"?")[2].decode("latin-1")
        if any(ord(c) < 0x21 or c == "\x7f" for c in query):
            raise HTTPError(400, "control characters are not allowed in the query string")
        urls = [f"{u}/-/v1/search" + (f"?{query}" if query else "") for u in up.upstreams]
        return await self._pass(request, up, urls, None)

    async def audit(self, request: Any, remote: RemoteConfig, rest: tuple[str, ...]) -> Any:
        up = self._passing(remote, "audit")
        body = request.content.read() if request.method == b"POST" and request.content is not None else None
        tail = "/".join(quote(s, safe="") for s in rest)
        return await self._pass(request, up, [f"{u}/-/{tail}" for u in up.upstreams], body)

    async def _pass(self, request: Any, remote: RemoteConfig, urls: list[str], body: bytes | None) -> Any:
        d = Deferred.fromCoroutine(pass_through(self.ctx.upstream, self.ctx.metrics, remote, request, urls, body))
        self._busy.add(d)
        try:
            return await d
        finally:
            self._busy.discard(d)


def _json(request: Any, obj: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(obj).encode() + b"\n"


def tarball_urls(url: str, upstreams: tuple[str, ...]) -> list[str]:
    """The URL a packument names for a tarball, then the same path on the
    remote's other upstreams when it is on one of them."""
    for home in upstreams:
        if url.startswith(home + "/"):
            tail = url[len(home):]
            return [url] + [u + tail for u in upstreams if u != home]
    return [url]
