"""The root resource: dispatch on the first path segment to a protocol app.

A dictionary lookup instead of one more layer of route matching keeps the
hit path short; each protocol app then does its own routing.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import IResource, Resource

from sparkcache.context import Context
from sparkcache.protocols.admin import AdminApp
from sparkcache.protocols.generic import GenericApp


class Root(Resource):
    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx
        self.admin = AdminApp(ctx).resource()
        self.apps: dict[bytes, IResource] = {b"api": GenericApp(ctx).resource()}

    def mount(self, segment: bytes, resource: IResource) -> None:
        self.apps[segment] = resource

    def getChild(self, path: bytes, request: Any) -> IResource:
        app = self.apps.get(path)
        if app is not None:
            return app
        # Management routes see the whole path, as if mounted at the root.
        request.postpath.insert(0, request.prepath.pop())
        return self.admin

    def render(self, request: Any) -> Any:
        return self.admin.render(request)
