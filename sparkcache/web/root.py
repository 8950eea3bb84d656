"""The root resource: dispatch on the first path segment to a protocol app.

A dictionary lookup instead of one more layer of route matching keeps the
hit path short; each protocol app then does its own routing. Paths no
protocol mounts go to the management app (``/``, ``/health``, ``/metrics``...).
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.web.resource import IResource, Resource


class Remount(Resource):
    """Hand a Klein app the whole path (``/archive``, ``/sync/seed``...), so one
    app can serve several top-level segments with routes that name them."""

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self.inner = inner

    def render(self, request: Any) -> Any:
        request.postpath = request.prepath[-1:] + request.postpath
        request.prepath = request.prepath[:-1]
        return self.inner.render(request)


class Root(Resource):
    def __init__(self, apps: Mapping[bytes, IResource], fallback: IResource) -> None:
        super().__init__()
        self.apps = dict(apps)
        self.fallback = fallback

    def getChild(self, path: bytes, request: Any) -> IResource:
        app = self.apps.get(path)
        if app is not None:
            return app
        # Management routes see the whole path, as if mounted at the root.
        request.postpath.insert(0, request.prepath.pop())
        return self.fallback

    def render(self, request: Any) -> Any:
        return self.fallback.render(request)
