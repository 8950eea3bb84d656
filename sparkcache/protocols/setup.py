"""``/setup/...``: node configuration snippets and the registry token endpoint.

``GET /setup/containerd?registry=docker.io`` → a containerd ``hosts.toml``;
``GET /setup/rke2[?registry=...]`` → an RKE2/k3s ``registries.yaml``;
``GET /setup/docker`` → a dockerd ``daemon.json``; each points at this
daemon's public URL (see :mod:`sparkcache.oci.setup`). ``/setup/token`` is
where the ``GET /v2/`` challenge sends registry clients to log in.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.resource import IResource

from sparkcache.context import Context
from sparkcache.oci import setup
from sparkcache.web.errors import HTTPError, json_errors


class SetupApp:
    app = Klein()

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def resource(self) -> IResource:
        return self.app.resource()

    json_errors(app)

    @app.route("/token", methods=["GET", "POST"])
    def token(self, request: Any) -> bytes:
        return setup.issue_token(self.ctx, request)

    @app.route("/<kind>", methods=["GET", "HEAD"])
    def snippet(self, request: Any, kind: str) -> bytes:
        self.ctx.auth.require(request, "read")
        args = request.args or {}
        raw = args.get(b"registry")
        registry = raw[0].decode("utf-8", "replace") if raw else None
        ctype, body, path = setup.snippet(self.ctx, request, kind, registry)
        data = body.encode()
        request.setHeader(b"Content-Type", f"{ctype}; charset=utf-8".encode())
        request.setHeader(b"X-Install-Path", path.encode())
        request.setHeader(b"Content-Length", str(len(data)).encode())
        return b"" if request.method == b"HEAD" else data

    @app.route("/", methods=["GET", "HEAD"])
    def index(self, request: Any) -> bytes:
        raise HTTPError(404, f"use /setup/<kind> with kind one of {', '.join(setup.KINDS)}")


def install(svc: Any) -> None:
    """Mount ``/setup/``."""
    svc.root.mount(b"setup", SetupApp(svc.ctx).resource())
