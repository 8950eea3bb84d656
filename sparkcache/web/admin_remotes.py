"""``/admin/remotes``: the remotes at runtime, and those added through the API.

``GET /admin/remotes`` lists every running remote with its origin (``file``
or ``api``); ``GET/PUT/DELETE /admin/remotes/<name>`` read, add or replace,
and delete one. A PUT body is the remote's mapping as JSON, with the keys of
a ``remotes:`` entry of the YAML file; it is validated, persisted and
applied by :class:`sparkcache.reload.LiveConfig`. Everything needs the
admin scope: a remote names upstreams the daemon will contact.
"""

from __future__ import annotations

import json
import os
from typing import Any

from klein import Klein
from twisted.web.resource import IResource

from sparkcache.context import Context
from sparkcache.reload import RemoteChangeError
from sparkcache.web.errors import JSON, HTTPError, add_error_handling
from sparkcache.web.status import WORKER

# A remote's mapping is a few hundred bytes; anything near this is not one.
MAX_BODY = 64 * 1024


class AdminRemotes:
    app = Klein()
    add_error_handling(app, JSON)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def resource(self) -> IResource:
        return self.app.resource()

    # Mounted at /admin/remotes (a branch of the admin app): answer it without a redirect to /admin/remotes/.
    @app.route("/", methods=["GET", "HEAD"], strict_slashes=False)
    def list_remotes(self, request: Any) -> bytes:
        self.ctx.auth.require(request, "admin")
        return _json(request, {"remotes": [self._describe(name) for name in sorted(self.ctx.config.remotes)],
                               "not_in_effect": self._skipped(),
                               # Which process answered (server.workers > 1: each must list the same).
                               "pid": os.getpid(), "worker": WORKER})

    @app.route("/<name>", methods=["GET", "HEAD"])
    def get_remote(self, request: Any, name: str) -> bytes:
        self.ctx.auth.require(request, "admin")
        if name not in self.ctx.config.remotes:
            live = self.ctx.live
            if live is not None and name in live.skipped:
                raise HTTPError(404, f"remote {name!r} is not in effect: {live.skipped[name]}")
            raise HTTPError(404, f"unknown remote {name!r}")
        return _json(request, self._describe(name))

    @app.route("/<name>", methods=["PUT"])
    async def put_remote(self, request: Any, name: str) -> bytes:
        self.ctx.auth.require(request, "admin")
        body = _read_json(request)
        try:
            created = await self._live().put(name, body)
        except RemoteChangeError as e:
            raise HTTPError(e.status, e.message) from None
        request.setResponseCode(201 if created else 200)
        return _json(request, self._describe(name))

    @app.route("/<name>", methods=["DELETE"])
    async def delete_remote(self, request: Any, name: str) -> bytes:
        self.ctx.auth.require(request, "admin")
        try:
            await self._live().delete(name)
        except RemoteChangeError as e:
            raise HTTPError(e.status, e.message) from None
        return _json(request, {"deleted": name})

    # -------------------------------------------------------------------------

    def _live(self) -> Any:
        if self.ctx.live is None:
            raise HTTPError(409, "remotes cannot be changed through the API on this daemon")
        return self.ctx.live

    def _describe(self, name: str) -> dict[str, Any]:
        remote = self.ctx.config.remotes[name]
        live = self.ctx.live
        origin = live.origin(name) if live is not None else None
        return {"name": name, "origin": origin or "file", "url": self.ctx.remote_url(name), **remote.redacted()}

    def _skipped(self) -> dict[str, str]:
        live = self.ctx.live
        return dict(live.skipped) if live is not None else {}


def _read_json(request: Any) -> Any:
    content = request.content
    raw = content.read(MAX_BODY + 1) if content is not None else b""
    if len(raw) > MAX_BODY:
        raise HTTPError(413, f"a remote's settings are at most {MAX_BODY} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HTTPError(400, f"the body must be the remote's settings as a JSON object: {e}") from None


def _json(request: Any, obj: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(obj).encode() + b"\n"
