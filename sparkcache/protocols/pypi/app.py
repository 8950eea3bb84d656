"""``/pypi/<remote>/...``: the routes of every PyPI remote type.

``simple/`` (the root index), ``simple/<project>/`` (a project page, HTML or
JSON by ``Accept``), ``files/<project>/<filename>`` and its ``.metadata``;
``POST /pypi/<local>/`` takes uploads. A project name that is not normalized
redirects (301) to the normalized URL; errors are JSON, never HTML.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import IResource

from sparkcache.config import Config, RemoteConfig
from sparkcache.context import Context
from sparkcache.fetch import Failed, Hit, Live, Result
from sparkcache.protocols._group import first_having
from sparkcache.protocols._index import DerivedCache, Runner, TooLarge
from sparkcache.protocols._live import refreshed
from sparkcache.protocols.pypi import pages
from sparkcache.protocols.pypi.index import PypiIndex
from sparkcache.protocols.pypi.local import MAX_UPLOAD, LocalProjects
from sparkcache.protocols.pypi.names import METADATA_SUFFIX, BadName, is_valid_filename, project
from sparkcache.web.bodies import BodyDecision, Refuse, ToSpool, checked
from sparkcache.web.errors import ErrorFormat, ErrorReply, HTTPError, add_error_handling, guarded, render_json
from sparkcache.web.paths import split_raw_path
from sparkcache.web.respond import respond
from sparkcache.web.serve import error_body, header
from sparkcache.web.urls import public_base

log = Logger()

PYPI, LOCAL, GROUP = "pypi", "pypi-local", "pypi-group"
TYPES = frozenset({PYPI, LOCAL, GROUP})
# pip and twine send credentials after a Basic challenge, never a Bearer one.
CHALLENGE = 'Basic realm="sparkcache"'
ERRORS = ErrorFormat(render_json, challenge=CHALLENGE, not_found="no such endpoint; see /pypi/<remote>/simple/")
FILE_CACHE_CONTROL = {"Cache-Control": "max-age=31536000, immutable"}
# Rendered pages and parsed links kept in memory: a CI fleet's working set of
# projects fits, and the daemon stays small (the rest is rendered again).
DERIVED_BYTES = 64 << 20
_TOO_LARGE = Refuse(ERRORS, ErrorReply(413, f"upload larger than {MAX_UPLOAD} bytes"))


class PypiApp:
    app = Klein()

    def __init__(self, ctx: Context, run: Runner) -> None:
        self.ctx = ctx
        self.run = run
        self.max_path = ctx.config.server.max_path_length
        self.derived = DerivedCache(ctx.store, run, DERIVED_BYTES)
        self.remotes: dict[str, RemoteConfig] = {}
        self.indexes: dict[str, PypiIndex] = {}
        self._retired: list[PypiIndex] = []
        self.reconfigure(ctx.config)
        self.local = LocalProjects(ctx, run)
        self._gate = checked(ERRORS, self._body_checks)

    def reconfigure(self, config: Config) -> None:
        """The remotes of ``config`` from now on (Built.reconfigure)."""
        self.remotes = {r.name: r for r in config.remotes.values() if r.type in TYPES}
        old = self.indexes
        self.indexes = refreshed(old, (r for r in self.remotes.values() if r.type == PYPI),
                                 lambda r: PypiIndex(r, self.ctx, self.derived), lambda i: i.remote)
        # A graceful stop still waits for the page revalidations of replaced indexes.
        kept = set(map(id, self.indexes.values()))
        self._retired = [i for i in [*self._retired, *old.values()] if id(i) not in kept and i.refreshing]

    def running(self) -> list[Deferred[Any]]:
        """Background work a graceful stop waits for (page revalidations)."""
        return [d for index in [*self.indexes.values(), *self._retired] for d in index.refreshing]

    def resource(self) -> IResource:
        return guarded(self.app, ERRORS, self.max_path)

    add_error_handling(app, ERRORS)

    # -- dispatch -----------------------------------------------------------------------

    def locate(self, request: Any) -> tuple[RemoteConfig, list[str]]:
        """(remote, the segments after it; a trailing slash is a final "")."""
        segments = split_raw_path(request.uri, self.max_path)
        remote = self.ctx.served_remote(segments[1] if len(segments) > 1 else "", TYPES,
                                        "/pypi/<remote>/simple/")
        return remote, segments[2:]

    def body_gate(self, request: Any) -> BodyDecision:
        return self._gate(request)

    def _body_checks(self, request: Any) -> BodyDecision:
        if request.method != b"POST":
            return None
        remote, rest = self.locate(request)
        self._may_upload(request, remote, rest)
        return ToSpool(self.ctx.store, MAX_UPLOAD, _TOO_LARGE)

    def _may_upload(self, request: Any, remote: RemoteConfig, rest: list[str]) -> None:
        if [s for s in rest if s] not in ([], ["legacy"]):
            raise HTTPError(405, "uploads go to /pypi/<local remote>/", {"Allow": "GET, HEAD"})
        if remote.type != LOCAL:
            raise HTTPError(405, f"remote {remote.name!r} is a type: {remote.type} remote; uploads go to a "
                                 "type: pypi-local remote", {"Allow": "GET, HEAD"})
        self.ctx.auth.require(request, "write")

    @app.route("/", branch=True, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
    async def dispatch(self, request: Any) -> Any:
        remote, rest = self.locate(request)
        if request.method == b"POST":
            self._may_upload(request, remote, rest)
            result = await self.local.upload(request, remote)
            log.info("{remote}: uploaded {filename}", remote=remote.name, filename=result["filename"])
            return _json(request, result)
        if request.method not in (b"GET", b"HEAD"):
            raise HTTPError(405, f"{request.method.decode()} is not allowed here",
                            {"Allow": "GET, HEAD, POST" if remote.type == LOCAL else "GET, HEAD"})
        self.ctx.auth.require(request, "read")
        base = f"{public_base(request, self.ctx.config.server.public_url)}/pypi/{remote.name}"
        parts = [s for s in rest if s]
        slash = bool(rest) and rest[-1] == ""
        if parts == ["simple"]:
            if not slash:
                return _redirect(request, f"{base}/simple/")
            return await self.root(request, remote)
        if len(parts) == 2 and parts[0] == "simple":
            try:
                name = project(parts[1])
            except BadName as e:
                raise HTTPError(400, str(e)) from None
            if name != parts[1] or not slash:
                return _redirect(request, f"{base}/simple/{name}/")
            return await self.project_page(request, remote, name)
        if len(parts) == 3 and parts[0] == "files" and not slash:
            return await self.file(request, remote, parts[1], parts[2])
        raise HTTPError(404, "no such endpoint; use /pypi/<remote>/simple/<project>/")

    # -- pages --------------------------------------------------------------------------

    def _form(self, request: Any) -> tuple[str, str]:
        fmt = (request.args or {}).get(b"format")
        accept = fmt[0].decode("latin-1") if fmt else header(request, b"accept")
        chosen = pages.negotiate(accept)
        if chosen is None:
            raise HTTPError(406, f"cannot answer {accept!r}; this index serves {pages.JSON_TYPE}, "
                                 f"{pages.HTML_TYPE} and {pages.TEXT_HTML}")
        return chosen

    async def root(self, request: Any, remote: RemoteConfig) -> Any:
        form, ctype = self._form(request)
        index = self.indexes.get(remote.name)
        if index is not None:
            # Streamed as stored, never parsed (PyPI's is tens of MB): clients
            # install through project pages, which is what gets rewritten.
            result: Result = await self.ctx.cache.get(index.page_request(None, form))
            self.ctx.metrics.form(remote.name, "page", _state(result))
            request.setHeader(b"Vary", b"Accept")
            return await respond(request, result, self.ctx.store, self.ctx.metrics, remote.name, "simple/",
                                 {"Cache-Control": "no-cache"}, sendfile=self.ctx.sendfile)
        names: set[str] = set()
        for member in self._members(remote):
            if member.type == LOCAL:
                names.update(await self.local.projects(member))
        self.ctx.metrics.form(remote.name, "page", "hit")
        body = pages.render_root(names, form)
        return self._page_body(request, body, pages.etag(body), ctype, "HIT")

    async def project_page(self, request: Any, remote: RemoteConfig, name: str) -> Any:
        form, ctype = self._form(request)
        members = self._members(remote)

        async def probe(member: RemoteConfig) -> Any:
            if member.type == LOCAL:
                return await self.local.page(member, name)
            result = await self.indexes[member.name].page(name, form)
            if isinstance(result, Failed):
                if result.status == 404:
                    return None
                raise HTTPError(result.status, f"{member.name}: {result.message}")
            return result

        try:
            found = await first_having(members, probe)
        except HTTPError:
            self.ctx.metrics.form(remote.name, "page", "error")
            raise
        if found is None:
            self.ctx.metrics.form(remote.name, "page", "miss")
            raise HTTPError(404, f"no project {name!r} in {remote.name!r}")
        member, what = found
        base = f"{public_base(request, self.ctx.config.server.public_url)}/pypi/{member.name}"
        files_base = f"{base}/files/{name}"
        if isinstance(what, pages.Page):
            self.ctx.metrics.form(remote.name, "page", "hit")
            body = pages.render(what, form, files_base)  # a local project's: small
            return self._page_body(request, body, pages.etag(body), ctype, "HIT")
        assert isinstance(what, Hit)
        try:
            body, etag = await self.indexes[member.name].rendered(what.entry, name, form, files_base)
        except CancelledError:
            raise
        except TooLarge:
            self.ctx.metrics.form(remote.name, "page", "error")
            raise HTTPError(502, f"the upstream page of {name!r} is over {self.indexes[member.name].max_body} bytes")
        except FileNotFoundError:
            ensureDeferred(self.ctx.store.purge_key(what.entry.key)).addErrback(
                lambda f: log.failure("purge failed", f))
            raise HTTPError(503, "cached page missing; retry") from None
        except pages.BadPage as e:
            raise HTTPError(502, f"the stored upstream page of {name!r} is not a page: {e}") from None
        self.ctx.metrics.form(remote.name, "page", what.state.lower())
        self.ctx.metrics.response(remote.name, what.state.lower())
        return self._page_body(request, body, etag, ctype, what.state)

    def _page_body(self, request: Any, body: bytes, etag: str, ctype: str, state: str) -> bytes:
        request.setHeader(b"Vary", b"Accept")
        request.setHeader(b"X-Cache", state.encode())
        request.setHeader(b"Cache-Control", b"max-age=0, must-revalidate")
        request.setHeader(b"ETag", etag.encode())
        inm = header(request, b"if-none-match")
        if inm and etag in [t.strip() for t in inm.split(",")]:
            request.setResponseCode(304)
            return b""
        request.setHeader(b"Content-Type", f"{ctype}; charset=utf-8".encode() if "html" in ctype else ctype.encode())
        request.setHeader(b"Content-Length", str(len(body)).encode())
        self.ctx.metrics.bytes_counter(self._served_name(request), "cache")(len(body))
        return b"" if request.method == b"HEAD" else body

    def _served_name(self, request: Any) -> str:
        segments = request.uri.split(b"/")
        return segments[2].decode("latin-1") if len(segments) > 2 else ""

    def _members(self, remote: RemoteConfig) -> list[RemoteConfig]:
        if remote.type != GROUP:
            return [remote]
        return [self.ctx.config.remotes[m] for m in remote.options.members]

    # -- files -------------------------------------------------------------------------

    async def file(self, request: Any, remote: RemoteConfig, name_seg: str, filename: str) -> Any:
        try:
            name = project(name_seg)
        except BadName as e:
            raise HTTPError(400, str(e)) from None
        metadata = filename.endswith(METADATA_SUFFIX)
        dist = filename[: -len(METADATA_SUFFIX)] if metadata else filename
        if not is_valid_filename(dist):
            raise HTTPError(400, f"{filename[:100]!r} is not a valid distribution file name")
        if name != name_seg:
            base = f"{public_base(request, self.ctx.config.server.public_url)}/pypi/{remote.name}"
            return _redirect(request, f"{base}/files/{name}/{filename}")
        form = "metadata" if metadata else "file"
        path = f"files/{name}/{filename}"
        if remote.type == GROUP:
            raise HTTPError(404, f"{remote.name!r} is a group: its pages link to its members' files")
        if remote.type == LOCAL:
            entry = await self.local.file(remote, name, filename)
            if entry is None:
                self.ctx.metrics.form(remote.name, form, "miss")
                raise HTTPError(404, f"{filename!r} is not in {remote.name!r}")
            self.ctx.store.index.touch(entry, self.ctx.clock.seconds())
            self.ctx.metrics.form(remote.name, form, "hit")
            return await self._send(request, remote, Hit(entry, "HIT"), path)
        index = self.indexes[remote.name]
        stored = await self.ctx.store.index.get(f"{remote.name}:{path}")
        if stored is not None and stored.status == 200 and not self.ctx.cache.fetching(stored.key):
            self.ctx.store.index.touch(stored, self.ctx.clock.seconds())
            self.ctx.metrics.form(remote.name, form, "hit")
            return await self._send(request, remote, Hit(stored, "HIT"), path)
        link = await index.link(name, dist)
        if link is None:
            self.ctx.metrics.form(remote.name, form, "error")
            raise HTTPError(404, f"{dist!r} is not listed on the page of project {name!r} in {remote.name!r}")
        if metadata and not link.core_metadata:
            self.ctx.metrics.form(remote.name, form, "error")
            raise HTTPError(404, f"the page of {name!r} offers no metadata file for {dist!r}")
        result = await self.ctx.cache.get(index.file_request(name, dist, link, metadata))
        self.ctx.metrics.form(remote.name, form, _state(result))
        return await self._send(request, remote, result, path)

    async def _send(self, request: Any, remote: RemoteConfig, result: Result, path: str) -> Any:
        extra = dict(FILE_CACHE_CONTROL) if not isinstance(result, Failed) else None
        if path.endswith(METADATA_SUFFIX) and not isinstance(result, Failed):
            extra = {**(extra or {}), "Content-Type": "text/plain; charset=utf-8"}
        return await respond(request, result, self.ctx.store, self.ctx.metrics, remote.name, path, extra,
                             sendfile=self.ctx.sendfile)


def _state(result: Result) -> str:
    if isinstance(result, Failed):
        return "error"
    if isinstance(result, Live):
        return "miss"
    return result.state.lower()


def _redirect(request: Any, location: str) -> bytes:
    query = bytes(request.uri).partition(b"?")[2].decode("latin-1")
    if query and all(0x20 < ord(c) < 0x7f for c in query):
        location += "?" + query  # ?format= chooses the form: kept
    request.setResponseCode(301)
    request.setHeader(b"Location", location.encode())
    return error_body(request, 301, f"moved to {location}", {"Location": location})


def _json(request: Any, obj: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(obj).encode() + b"\n"

