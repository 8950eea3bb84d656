"""``/setup/<kind>``: node configuration snippets and login endpoints.

Each protocol adds its own kinds (``Built.setup``): OCI adds ``containerd``,
``rke2``, ``docker`` and the registry ``token`` endpoint; the package
registries add ``pip``, ``npm``, ``go``... A snippet points a client at this
daemon's public URL; ``render_snippet`` gives every one the same headers.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from klein import Klein
from twisted.web.resource import IResource

from sparkcache.config import RemoteConfig
from sparkcache.context import Context
from sparkcache.protocols.base import SetupEndpoint
from sparkcache.web.errors import JSON, HTTPError, add_error_handling, guarded

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


def render_snippet(request: Any, content_type: str, body: str, install_path: str) -> bytes:
    """A snippet response: the file's text, its type, and where it is installed (``X-Install-Path``)."""
    data = body.encode()
    request.setHeader(b"Content-Type", f"{content_type}; charset=utf-8".encode())
    request.setHeader(b"X-Install-Path", install_path.encode())
    request.setHeader(b"Content-Length", str(len(data)).encode())
    return b"" if request.method == b"HEAD" else data


def query_arg(request: Any, name: str) -> str | None:
    raw = (request.args or {}).get(name.encode())
    return raw[0].decode("utf-8", "replace") if raw else None


def setup_remote(ctx: Context, request: Any, types: Sequence[str], defaults: Sequence[str] | None = None) -> RemoteConfig:
    """The remote a snippet points at: the one ``?remote=<name>`` names (of one of
    ``types``), else the first configured remote of the first of ``defaults``
    (``types`` when not given) that has one; a JSON 404 naming the choices otherwise."""
    remotes = ctx.config.remotes
    wanted = query_arg(request, "remote")
    if wanted is not None:
        r = remotes.get(wanted)
        if r is None or r.type not in types:
            names = ", ".join(n for n, r in remotes.items() if r.type in types) or "none"
            raise HTTPError(404, f"no type: {' or '.join(types)} remote named {wanted[:80]!r}; configured: {names}")
        return r
    for rtype in defaults if defaults is not None else types:
        for r in remotes.values():
            if r.type == rtype:
                return r
    raise HTTPError(404, f"no type: {' or '.join(defaults or types)} remote is configured")


def setup_remotes(ctx: Context, request: Any, types: Sequence[str]) -> list[RemoteConfig]:
    """Every remote of ``types`` a snippet covers, or only the one ``?remote=<name>`` names."""
    if query_arg(request, "remote") is not None:
        return [setup_remote(ctx, request, types)]
    found = [r for r in ctx.config.remotes.values() if r.type in types]
    if not found:
        raise HTTPError(404, f"no type: {' or '.join(types)} remote is configured")
    return found


class SetupApp:
    app = Klein()

    def __init__(self, ctx: Context, endpoints: Mapping[str, SetupEndpoint]) -> None:
        from sparkcache.web import setup_node

        self.ctx = ctx
        # ``node``: the config of a node-local daemon chained to this one (docs/tiers.rst).
        self.endpoints = {"node": SetupEndpoint(setup_node.handler(ctx)), **endpoints}

    def resource(self) -> IResource:
        return guarded(self.app, JSON, self.ctx.config.server.max_path_length)

    add_error_handling(app, JSON)

    @app.route("/<kind>", methods=ALL_METHODS)
    async def endpoint(self, request: Any, kind: str) -> bytes:
        ep = self.endpoints.get(kind)
        if ep is None:
            raise HTTPError(404, f"unknown setup kind {kind!r}; one of {self._kinds()}")
        method = request.method.decode("latin-1")
        if method not in ep.methods:
            raise HTTPError(405, f"{method} is not allowed on /setup/{kind}", {"Allow": ", ".join(ep.methods)})
        if ep.scope is not None:
            self.ctx.auth.require(request, ep.scope)
        result: Any = ep.handler(request)
        if not isinstance(result, bytes):
            result = await result
        return result

    @app.route("/", methods=ALL_METHODS)
    def index(self, request: Any) -> bytes:
        raise HTTPError(404, f"use /setup/<kind> with kind one of {self._kinds()}; /setup/node: the config of a "
                             "node-local sparkcache chained to this one")

    def _kinds(self) -> str:
        """The client tools offered (not the token endpoint, nor ``node``: a daemon's config, not a client's)."""
        kinds = (k for k, ep in sorted(self.endpoints.items()) if k not in ("token", "node") and ep.is_offered())
        return ", ".join(kinds) or "none (no protocol offers one)"
