"""The root resource: dispatch on the first path segment to a protocol app.

A dictionary lookup instead of one more layer of route matching keeps the
hit path short; each protocol app then does its own routing. Paths no
protocol mounts go to the management app (``/``, ``/health``, ``/metrics``...).
The same map finds the body gate that decides, from a request's headers,
where its body goes.
"""

from __future__ import annotations

from typing import Any, Mapping
from urllib.parse import unquote_to_bytes

from twisted.web.resource import IResource, Resource

from sparkcache.web.bodies import BodyDecision, BodyGate


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
    def __init__(self, apps: Mapping[bytes, IResource], fallback: IResource,
                 gates: Mapping[bytes, BodyGate] | None = None) -> None:
        """``gates``: per segment, the protocol's body gate (see :mod:`sparkcache.web.bodies`)."""
        super().__init__()
        self.apps = dict(apps)
        self.fallback = fallback
        self.gates = dict(gates or {})

    def body_gate(self, request: Any) -> BodyDecision:
        """The decision of the gate of the app this request will reach (the
        segment twisted.web's traversal hands ``getChild``); None without one."""
        segment = unquote_to_bytes(request.path[1:].split(b"/", 1)[0])
        gate = self.gates.get(segment)
        return gate(request) if gate is not None else None

    def getChild(self, path: bytes, request: Any) -> IResource:
        app = self.apps.get(path)
        if app is not None:
            return app
        # Management routes see the whole path, as if mounted at the root.
        request.postpath.insert(0, request.prepath.pop())
        return self.fallback

    def render(self, request: Any) -> Any:
        return self.fallback.render(request)
