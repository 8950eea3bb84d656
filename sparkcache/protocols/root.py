"""The root resource: dispatch on the first path segment to a protocol app.

A dictionary lookup instead of one more layer of route matching keeps the
hit path short; each protocol app then does its own routing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from sparkcache.context import Context
from sparkcache.protocols.admin import AdminApp
from sparkcache.protocols.generic import GenericApp
from sparkcache.store import Entry
from sparkcache.web.paths import BadPath, split_raw_path
from sparkcache.web.respond import serve_hit
from sparkcache.web.serve import error_body

log = Logger()


class _Error(Resource):
    """A JSON error decided before any routing."""

    isLeaf = True

    def __init__(self, status: int, message: str) -> None:
        super().__init__()
        self.status, self.message = status, message

    def render(self, request: Any) -> bytes:
        return error_body(request, self.status, self.message)


class _Hit(Resource):
    """A fresh cache hit, answered without routing or coroutines."""

    isLeaf = True

    def __init__(self, ctx: Context, entry: Entry, remote: str, path: str) -> None:
        super().__init__()
        self.ctx, self.entry, self.remote, self.path = ctx, entry, remote, path

    def render(self, request: Any) -> Any:
        out = serve_hit(request, self.entry, "HIT", self.ctx.store, self.ctx.metrics, self.remote, self.path,
                        sendfile=self.ctx.sendfile)
        if isinstance(out, bytes):
            return out
        if isinstance(out, Deferred):
            out.addErrback(lambda f: log.failure("serving {path} failed", f, path=self.path))
        return NOT_DONE_YET


class Root(Resource):
    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx
        self.admin = AdminApp(ctx).resource()
        self.generic = GenericApp(ctx)
        self.apps: dict[bytes, IResource] = {b"api": self.generic.resource()}

    def mount(self, segment: bytes, resource: IResource) -> None:
        self.apps[segment] = resource

    def getChild(self, path: bytes, request: Any) -> IResource:
        if path == b"api":
            # Vet the raw path before any router decodes it (a decoded CR/LF
            # would otherwise become a router's HTML 404, not our JSON 400).
            try:
                segments = split_raw_path(request.uri, self.ctx.config.server.max_path_length)
            except BadPath as e:
                return _Error(e.status, str(e))
            hit = self.generic.fresh_hit(request, segments)
            if hit is not None:
                return _Hit(self.ctx, *hit)
        app = self.apps.get(path)
        if app is not None:
            return app
        # Management routes see the whole path, as if mounted at the root.
        request.postpath.insert(0, request.prepath.pop())
        return self.admin

    def render(self, request: Any) -> Any:
        return self.admin.render(request)
