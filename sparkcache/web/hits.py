"""Fresh hits answered without routing: the hot path of a CI fleet.

A protocol app that can tell from the URL alone that a GET/HEAD is a fresh
entry already in memory (``fresh_hit(request, segments) -> FreshHit``) mounts
:class:`FastHits` in front of its Klein resource. It answers such a request at
two levels, and hands everything else (every error case included) to the app:

- **the connection** (:meth:`FastHits.answer`, called by the site's channel,
  :mod:`sparkcache.web.site`): a plain HTTP/1.1 GET/HEAD whose head arrived
  whole, with no Range, no conditional, no body, on an idle keep-alive
  connection, of a body up to ``BLOCK_BODY_MAX``, is answered with one write of
  a response block kept per entry (status line, headers, body). No Request
  object, no resource traversal, no body read: what twisted.web would have
  sent, byte for byte but the Date;
- **the resource** (:meth:`FastHits.render`): any other fresh hit (Range,
  conditional, HTTP/1.0, larger bodies) is served by ``serve_hit`` without
  route matching or coroutines.

The block is kept for the very Entry object the index holds: a purge, a
replacement or a refresh gives a new object (the index's change counters make
another worker's do that too), so a block can never outlive its entry's truth.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, version

from sparkcache.auth import AuthError
from sparkcache.context import Context
from sparkcache.metrics import HitBatch
from sparkcache.store import Entry
from sparkcache.web.errors import ErrorFormat, refuse_path
from sparkcache.web.paths import BadPath, split_raw_path, vet_request
from sparkcache.web.respond import serve_hit, set_hit_headers

log = Logger()
# Bodies up to this size are answered from a kept block; larger ones go
# through serve_hit (sendfile), where the copy is not the cost.
BLOCK_BODY_MAX = 64 * 1024
# Bytes of blocks kept per store, so per process (bodies and headers), oldest
# dropped first.
BLOCKS_MAX_BYTES = 32 * 1024 * 1024
# URLs whose route is kept per app (all forgotten at once past this), and
# the longest kept: at most a few MiB however many URLs clients make up.
ROUTES_MAX = 8192
ROUTE_URI_MAX = 512


class FastRoute(NamedTuple):
    """Where an app finds a URL's entry (``fast_route(request, segments)``,
    from the URL and the configuration alone): its index key, the remote and
    path it is served as (metrics, Content-Disposition), the Content-Type when
    the stored headers have none, and the registry form counted in
    ``metrics.form`` (None: not a registry)."""

    key: str
    remote: str
    path: str
    default_type: str | None = None
    form: str | None = None


class FreshHit(NamedTuple):
    """A fresh entry found for a request: the entry, the remote and path it is
    served as, headers the protocol adds, the registry form (see FastRoute)."""

    entry: Entry
    remote: str
    path: str
    extra: dict[str, str] | None = None
    form: str | None = None


class Head:
    """A request head the connection vetted (:func:`sparkcache.web.site.parse_head`):
    what ``fast_route``, the path checks and auth read of a request. Headers
    are looked up as twisted.web's ``getHeader`` does: by name in any case,
    the last one of a name. Shared by every request with the same head bytes
    (the connection keeps them), so never changed once made."""

    __slots__ = ("method", "uri", "fields", "mount", "anonymous")

    def __init__(self, method: bytes, uri: bytes, fields: dict[bytes, bytes]) -> None:
        """``fields``: the header values by lowercased name."""
        self.method, self.uri, self.fields = method, uri, fields
        # The path's first segment: where the app that answers it is mounted.
        self.mount = uri[1:].partition(b"/")[0]
        # No credentials: what Authorizer.presented reads as none presented.
        self.anonymous = not fields.get(b"authorization")

    def getHeader(self, name: bytes) -> bytes | None:  # noqa: N802 - twisted.web's request API
        return self.fields.get(name.lower())


class _Recorder:
    """Collects the headers ``set_hit_headers`` sets, in twisted.web's form."""

    def __init__(self) -> None:
        self.responseHeaders = Headers()


class _Dates:
    """The Date header's value, formatted once a second."""

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def now(self) -> bytes:
        t = int(time.time())
        if t != self.second:
            self.second, self.value = t, datetimeToString(t)
        return self.value


_dates = _Dates()
_STATUS = b"HTTP/1.1 200 OK\r\nServer: " + version + b"\r\nDate: "


class Blocks:
    """Response blocks (headers after Date, and the body) per entry key, kept
    while the index holds the same Entry object; FIFO within a byte budget."""

    def __init__(self, max_bytes: int = BLOCKS_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._blocks: dict[str, tuple[Entry, bytes, int]] = {}

    def kept(self, entry: Entry) -> tuple[bytes, int] | None:
        """The block kept for this very ``entry`` object, if any (see ``get``)."""
        kept = self._blocks.get(entry.key)
        if kept is not None and kept[0] is entry:
            return kept[1], kept[2]
        return None

    def get(self, hit: FreshHit, read: Callable[[Entry], bytes]) -> tuple[bytes, int] | None:
        """(headers and body, where the body starts) of ``hit``; None when its
        body vanished (serve_hit then answers, and drops the row)."""
        entry = hit.entry
        kept = self._blocks.get(entry.key)
        if kept is not None and kept[0] is entry:
            return kept[1], kept[2]
        try:
            body = read(entry)
        except FileNotFoundError:
            return None
        rec = _Recorder()
        set_hit_headers(rec, entry, "HIT", hit.path, hit.extra)
        rec.responseHeaders.setRawHeaders(b"Accept-Ranges", [b"bytes"])
        rec.responseHeaders.setRawHeaders(b"Content-Length", [str(len(body)).encode()])
        lines = [b""]
        for name, values in rec.responseHeaders.getAllRawHeaders():
            lines.extend(name + b": " + v for v in values)
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        block = head + body
        if kept is not None:
            self._drop(entry.key)
        if len(block) <= self.max_bytes:
            while self._blocks and self.size + len(block) > self.max_bytes:
                self._drop(next(iter(self._blocks)))
            self._blocks[entry.key] = (entry, block, len(head))
            self.size += len(block)
        return block, len(head)

    def _drop(self, key: str) -> None:
        _e, block, _h = self._blocks.pop(key)
        self.size -= len(block)


_blocks: "weakref.WeakKeyDictionary[Any, Blocks]" = weakref.WeakKeyDictionary()


def blocks_of(store: Any) -> Blocks:
    """The blocks of every app over ``store`` (entry keys name their remote):
    one budget per process, however many apps answer hits."""
    blocks = _blocks.get(store)
    if blocks is None:
        blocks = _blocks[store] = Blocks()
    return blocks


class FastHits(Resource):
    """An app's fresh hits (see the module docstring); everything else goes to ``routed``."""

    isLeaf = True

    def __init__(self, ctx: Context, route: Callable[[Any, list[str]], FastRoute | None], routed: IResource,
                 fmt: ErrorFormat, max_path: int, vet: Callable[[Any], list[str]] | None = None,
                 miss: Callable[[Any, FastRoute, list[str]], None] | None = None) -> None:
        """``vet``: the app's check of a request's raw path before any router
        decodes it (BadPath: refused in ``fmt``); its path segments for
        ``route`` (default: :func:`vet_request`'s). ``miss(request, route,
        segments)``: called for a GET/HEAD of a routed URL that is not a fresh
        hit, before ``routed`` renders it (an app starts its fetch there)."""
        super().__init__()
        self.ctx, self.route, self.routed, self.fmt, self.max_path = ctx, route, routed, fmt, max_path
        self.miss = miss
        self.vet = vet or (lambda request: vet_request(request, max_path))
        # The app whose method ``route`` is (tests look at its state through it).
        self.app = getattr(route, "__self__", None)
        self.blocks = blocks_of(ctx.store)
        # The route of each URL seen (None: not one the app finds in the index,
        # or no valid path), for the configuration it was made with.
        self._routes: dict[bytes, FastRoute | None] = {}
        self._routes_of: Any = None
        # Per remote: its hits counted in a batch (Metrics.hit_batch), in
        # one process and with workers alike.
        self._batches: dict[str, HitBatch] = {}

    def find(self, request: Any, segments: list[str] | None = None) -> FreshHit | None:
        """The fresh entry a GET/HEAD of ``request`` is answered with, when its
        caller may read it; None for anything the app must answer. ``segments``:
        the vetted path, when the caller has it."""
        if request.method not in (b"GET", b"HEAD"):
            return None
        ctx = self.ctx
        if self._routes_of is not ctx.config:
            self._routes, self._routes_of = {}, ctx.config
        uri = request.uri
        try:
            route = self._routes[uri]
        except KeyError:
            if segments is None:
                try:
                    segments = split_raw_path(uri, self.max_path)
                except BadPath:
                    segments = []
            route = self.route(request, segments)
            if len(uri) <= ROUTE_URI_MAX:
                if len(self._routes) >= ROUTES_MAX:
                    self._routes.clear()
                self._routes[uri] = route
        if route is None:
            return None
        index = ctx.store.index
        entry = index.peek(route.key)
        if entry is None or entry.status != 200:
            return None
        now = ctx.clock.seconds()
        if not entry.fresh(now):
            return None
        try:
            ctx.auth.require(request, "read")
        except AuthError:
            return None
        index.touch(entry, now)
        extra = None
        if route.default_type is not None and not entry.headers.get("content-type"):
            extra = {"Content-Type": route.default_type}
        return FreshHit(entry, route.remote, route.path, extra, route.form)

    def render(self, request: Any) -> Any:
        # Vet the raw path before any router decodes it (a decoded CR/LF
        # would otherwise become a router's HTML 404, not our JSON 400).
        try:
            segments = self.vet(request)
        except BadPath as e:
            return refuse_path(request, e, self.fmt)
        hit = self.find(request, segments)
        if hit is None:
            if self.miss is not None and request.method in (b"GET", b"HEAD"):
                route = self._routes.get(request.uri)
                if route is not None:
                    self.miss(request, route, segments)
            return self.routed.render(request)
        ctx = self.ctx
        if hit.form is not None:
            ctx.metrics.form(hit.remote, hit.form, "hit")
        out = serve_hit(request, hit.entry, "HIT", ctx.store, ctx.metrics, hit.remote, hit.path, hit.extra,
                        sendfile=ctx.sendfile)
        if isinstance(out, bytes):
            return out
        if isinstance(out, Deferred):
            out.addErrback(lambda f: log.failure("serving {path} failed", f, path=hit.path))
        return NOT_DONE_YET

    def answer(self, head: Head) -> tuple[bytes, int] | None:
        """The whole response to ``head`` (a GET or HEAD the connection vetted:
        :func:`sparkcache.web.site.parse_head`) and its body's length, when it
        is a fresh hit of a body up to BLOCK_BODY_MAX; None for anything else.

        ``find``'s checks, in line once the URL's route is kept: Python calls
        are much of what a hit costs."""
        ctx = self.ctx
        if self._routes_of is not ctx.config:
            self._routes, self._routes_of = {}, ctx.config
        try:
            route = self._routes[head.uri]
        except KeyError:
            return self._answer_found(head, self.find(head))
        if route is None:
            return None
        index = ctx.store.index
        entry = index.peek(route.key)
        if entry is None or entry.status != 200 or entry.size > BLOCK_BODY_MAX:
            return None
        now = ctx.clock.seconds()
        if entry.expires is not None and now >= entry.expires:
            return None
        auth = ctx.auth
        if not (head.anonymous and auth.anonymous_read):
            try:
                auth.require(head, "read")
            except AuthError:
                return None
        index.touch(entry, now)
        kept = self.blocks.kept(entry)
        if kept is None or route.form is not None:
            extra = None
            if route.default_type is not None and not entry.headers.get("content-type"):
                extra = {"Content-Type": route.default_type}
            return self._answer_found(head, FreshHit(entry, route.remote, route.path, extra, route.form))
        block, body_at = kept
        return self._answered(head, route.remote, block, body_at)

    def _answer_found(self, head: Head, hit: FreshHit | None) -> tuple[bytes, int] | None:
        if hit is None or hit.entry.size > BLOCK_BODY_MAX:
            return None
        store = self.ctx.store
        got = self.blocks.get(hit, lambda e: _read(store, e))
        if got is None:
            return None
        if hit.form is not None:
            self.ctx.metrics.form(hit.remote, hit.form, "hit")
        return self._answered(head, hit.remote, *got)

    def _answered(self, head: Head, remote: str, block: bytes, body_at: int) -> tuple[bytes, int]:
        """The response of a hit of ``remote``, counted."""
        size = 0 if head.method == b"HEAD" else len(block) - body_at
        try:
            batch = self._batches[remote]
        except KeyError:
            batch = self._batches[remote] = self.ctx.metrics.hit_batch(remote)
        batch.hits += 1
        batch.bytes += size
        if size:
            return _STATUS + _dates.now() + block, size
        return _STATUS + _dates.now() + block[:body_at], 0


def _read(store: Any, entry: Entry) -> bytes:
    with store.open_range(entry) as body:
        return bytes(body.read_all())
