"""A ``type: pypi`` remote: an upstream simple index, its pages cached in two forms.

Store keys (``<remote>:<path>``)::

    simple/                         the root index, as upstream sent it (HTML)
    simple/?format=json             ... asked for as JSON
    simple/<project>/               a project page, asked for as HTML
    simple/<project>/?format=json   ... asked for as JSON (upstream may answer HTML: converted)
    files/<project>/<filename>      a distribution file (immutable)
    files/<project>/<filename>.metadata   its PEP 658 metadata (immutable)

Pages are mutable (``cache.mutable_ttl``, 10 minutes by default), revalidated
conditionally and served stale when upstream fails. A page is checked before
it is kept: a body that is not a simple-index page (a captive portal, a
proxy's error page with status 200) is never stored, the stale page (if any)
is served instead, else a 502.

A file is fetched only from the URL its project's stored page names (the
file host usually differs from the index host) and is verified against the
page's sha256 while it streams; the ``.metadata`` likewise against
``core-metadata``'s. A URL a client makes up is never fetched: a file no
page lists is a 404.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, Union

from urllib.parse import quote

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from sparkcache.config import RemoteConfig
from sparkcache.fetch import CacheRequest, Failed, Hit, Live
from sparkcache.fetch.cache import KEEP_HEADERS, Body, Cache, Target, Upstream
from sparkcache.fetch.flight import BodyError, Flight
from sparkcache.protocols._index import DerivedCache, IndexRemote, TooLarge
from sparkcache.protocols.pypi import pages
from sparkcache.protocols.pypi.names import METADATA_SUFFIX
from sparkcache.store import Entry, SpoolFile
from sparkcache.web.errors import HTTPError

if TYPE_CHECKING:
    from sparkcache.context import Context

log = Logger()
FORMS = ("html", "json")
_URL_SAFE = ":/?#[]@!$&'()*+,;=%~"
# What upstream is asked for, per form: a JSON page where it has one (PEP 691),
# else its HTML (converted here).
UPSTREAM_ACCEPT = {
    "html": b"application/vnd.pypi.simple.v1+html, text/html;q=0.9",
    "json": b"application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1",
}
# Never replayed for a file: a .tar.gz sent as Content-Encoding: gzip makes pip
# decompress it and the hash fail.
FILE_HEADERS = tuple(h for h in KEEP_HEADERS if h != "content-encoding")
PageResult = Union[Hit, Failed]


def page_path(project: str | None) -> str:
    return "simple/" if project is None else f"simple/{project}/"


def page_key(remote: str, project: str | None, form: str) -> str:
    return f"{remote}:{page_path(project)}" + ("?format=json" if form == "json" else "")


def file_path(project: str, filename: str) -> str:
    return f"files/{project}/{filename}"


class CheckedPage(Upstream):
    """Upstream's page, kept only when ``check(spool, content_type)`` (a
    Deferred of a problem, or None) finds nothing wrong with the whole body."""

    def __init__(self, req: CacheRequest, check: Callable[[SpoolFile, str | None], "Deferred[str | None]"]) -> None:
        super().__init__(req)
        self.check = check

    async def open(self, cache: Cache, target: Target, stale: Entry | None) -> Union[Body, Hit, Failed]:
        opened = await super().open(cache, target, stale)
        if not isinstance(opened, Body):
            return opened
        fill = opened.fill

        async def checked_fill(flight: Flight) -> None:
            await fill(flight)
            await flight.flushed()
            problem = await self.check(flight.spool, opened.headers.get("content-type"))
            if problem is not None:
                raise BodyError(f"upstream page not kept: {problem}")

        return replace(opened, fill=checked_fill)


class PypiIndex(IndexRemote):
    """Pages and files of one ``type: pypi`` remote (see the module's doc)."""

    content_type = pages.TEXT_HTML

    def __init__(self, remote: RemoteConfig, ctx: "Context", derived: DerivedCache) -> None:
        super().__init__(remote, ctx, derived)
        # Background revalidations of the other form of a page (see page()).
        self.refreshing: set[Deferred[None]] = set()

    # -- the IndexRemote hooks ----------------------------------------------------------

    def is_index(self, path: str) -> bool:
        return path.startswith("simple/")

    def rewrite(self, body: bytes, public_base: str) -> bytes:
        raise NotImplementedError("a PyPI page depends on its project and form: see rendered()")

    def indexes_listing(self, path: str) -> Sequence[str]:
        parts = path.split("/")
        if len(parts) != 3 or parts[0] != "files":
            return ()
        return [page_path(parts[1]) + "?format=json", page_path(parts[1])]

    def parse_digests(self, body: bytes, index_path: str) -> Mapping[str, str]:
        project = index_path.split("/")[1]
        out: dict[str, str] = {}
        for link in pages.parse_page(body, None, self.page_url(project), project).links:
            if link.sha256:
                out[file_path(project, link.filename)] = link.sha256
            if link.metadata_sha256:
                out[file_path(project, link.filename) + METADATA_SUFFIX] = link.metadata_sha256
        return out

    # -- pages ------------------------------------------------------------------------------

    def page_url(self, project: str | None, upstream: str | None = None) -> str:
        """Upstream's URL of a page (relative links resolve against it)."""
        base = upstream or self.remote.upstreams[0]
        return f"{base}/" if project is None else f"{base}/{project}/"

    def page_request(self, project: str | None, form: str) -> CacheRequest:
        url, *mirrors = (self.page_url(project, u) for u in self.remote.upstreams)
        return CacheRequest(
            remote=self.remote, key=page_key(self.remote.name, project, form), path=page_path(project), url=url,
            ttl=self.remote.cache.mutable_ttl, revalidate=True, headers={b"Accept": UPSTREAM_ACCEPT[form]},
            mirrors=tuple(mirrors),
        )

    def check_page(self, project: str) -> Callable[[SpoolFile, str | None], "Deferred[str | None]"]:
        limit, page_url = self.max_body, self.page_url(project)

        def check(spool: SpoolFile, content_type: str | None) -> "Deferred[str | None]":
            def job() -> str | None:
                with spool.reader() as f:
                    body = f.read(limit + 1)
                if len(body) > limit:
                    return f"larger than {limit} bytes"
                try:
                    pages.parse_page(body, content_type, page_url, project)
                except pages.BadPage as e:
                    return str(e)
                return None

            return self.derived.run(job)  # type: ignore[no-any-return]

        return check

    async def page(self, project: str, form: str, together: bool = True) -> PageResult:
        """The stored page of ``project`` in ``form``: fresh, revalidated, fetched
        (whole and checked) or stale; Failed(404) when upstream has no such project.
        ``together``: a new body of one form has the other form's entry
        revalidated too, so HTML and JSON clients see the same files."""
        req = self.page_request(project, form)
        result = await self.ctx.cache.get(req, CheckedPage(req, self.check_page(project)))
        if isinstance(result, Live):
            try:
                entry = (await result.flight.wait_done()).entry
            except BodyError as e:
                return await self._stale_or(req.key, Failed(502, str(e)))
            if together and result.started:
                self._refresh(project, "html" if form == "json" else "json")
            return Hit(entry, "MISS")
        if isinstance(result, Failed) and result.status == 502:
            return await self._stale_or(req.key, result)
        return result

    def _refresh(self, project: str, form: str) -> None:
        """Revalidate the stored page of ``project`` in ``form`` now, in the background."""

        async def refresh() -> None:
            key = page_key(self.remote.name, project, form)
            since = self.ctx.store.epoch()
            entry = await self.ctx.store.index.get(key)
            if entry is None or entry.status != 200 or self.ctx.cache.fetching(key):
                return  # never asked for in this form, or being fetched right now
            now = self.ctx.clock.seconds()
            if entry.expires is None or entry.expires > now:
                # Not over a purge or eviction since the lookup: that row's body may be gone.
                await self.ctx.store.refresh(replace(entry, expires=now), since)
            await self.page(project, form, together=False)

        d = ensureDeferred(refresh())
        self.refreshing.add(d)

        def done(result: object) -> None:
            self.refreshing.discard(d)
            if isinstance(result, Failure):
                log.failure("{remote}: refreshing the {form} page of {project} failed", result,
                            remote=self.remote.name, form=form, project=project)

        d.addBoth(done)

    async def _stale_or(self, key: str, failed: Failed) -> PageResult:
        # The body was refused after the engine had no more say: the entry it
        # would have replaced (if any) is still there.
        stale = await self.ctx.store.index.get(key)
        if stale is not None and stale.status == 200:
            return Hit(stale, "STALE")
        return failed

    def rendered(self, entry: Entry, project: str, form: str, files_base: str) -> Deferred[tuple[bytes, str]]:
        """The stored page ``entry`` as clients get it, and its ETag (computed
        once per body, form and base, in the worker thread)."""
        page_url = self.page_url(project)
        ctype = entry.content_type

        def derive(body: bytes) -> tuple[bytes, str]:
            out = pages.convert(body, ctype, page_url, project, form, files_base)
            return out, pages.etag(out)

        return self.derived.get(f"page:{self.remote.name}:{form}", entry, f"{project}\0{files_base}",
                                self.max_body, derive, lambda v: len(v[0]) + 100)

    def links(self, entry: Entry, project: str) -> Deferred[dict[str, pages.Link]]:
        """{filename: Link} of the stored page ``entry`` (parsed once per body)."""
        page_url, ctype = self.page_url(project), entry.content_type
        return self.derived.get(
            f"links:{self.remote.name}", entry, project, self.max_body,
            lambda body: pages.parse_page(body, ctype, page_url, project).by_filename(),
            # A Link with its dicts is about a kilobyte of Python objects.
            lambda links: sum(len(k) + len(v.url) + 1000 for k, v in links.items()) + 64)

    # -- files -------------------------------------------------------------------------------

    async def link(self, project: str, filename: str) -> pages.Link | None:
        """What a stored page of ``project`` says of ``filename``; the page is
        fetched (JSON form) when no stored page lists it."""
        store = self.ctx.store
        for form in ("json", "html"):
            entry = await store.index.get(page_key(self.remote.name, project, form))
            found = await self._lookup(entry, project, filename)
            if found is not None:
                return found
        result = await self.page(project, "json")
        if isinstance(result, Failed) and result.status != 404:
            # Not "no such file": the page that would say cannot be had now.
            raise HTTPError(result.status, f"the page of {project!r} is unavailable: {result.message}")
        return await self._lookup(result.entry, project, filename) if isinstance(result, Hit) else None

    async def _lookup(self, entry: Entry | None, project: str, filename: str) -> pages.Link | None:
        if entry is None or entry.status != 200 or entry.digest is None:
            return None
        try:
            return (await self.links(entry, project)).get(filename)
        except (TooLarge, FileNotFoundError, pages.BadPage):
            return None

    def file_request(self, project: str, filename: str, link: pages.Link, metadata: bool) -> CacheRequest:
        """The fetch of ``filename`` (or its ``.metadata``) from where ``link`` says."""
        suffix = METADATA_SUFFIX if metadata else ""
        # As sent on the wire: a page may name a URL with characters HTTP wants escaped.
        url = quote(link.url, safe=_URL_SAFE) + suffix
        # The same file on the further upstreams, when the page named it on the first.
        first, *others = self.remote.upstreams
        mirrors = tuple(u + url[len(first):] for u in others) if url.startswith(first + "/") else ()
        return CacheRequest(
            remote=self.remote, key=f"{self.remote.name}:{file_path(project, filename)}{suffix}",
            path=file_path(project, filename) + suffix, url=url, ttl=None,
            expected_digest=link.metadata_sha256 if metadata else link.sha256,
            keep_headers=FILE_HEADERS, mirrors=mirrors,
        )

