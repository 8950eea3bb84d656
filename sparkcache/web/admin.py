"""Management endpoints: /, /health, /ready, /status.json, /metrics, /config,
/admin/purge, /admin/local, /admin/remotes, /admin/export, /admin/import."""

from __future__ import annotations

import json
import os
from typing import Any

from klein import Klein
from twisted.web.resource import IResource

import sparkcache
from sparkcache.context import Context
from sparkcache.web import purge as purges
from sparkcache.web import status_page
from sparkcache.web.admin_bundle import AdminBundle
from sparkcache.web.admin_remotes import AdminRemotes
from sparkcache.web.errors import JSON, HTTPError, add_error_handling, guarded
from sparkcache.metrics import multiprocess_dir
from sparkcache.web.status import WORKER, Status, inflight


class AdminApp:
    app = Klein()

    def __init__(self, ctx: Context, status: Status | None = None) -> None:
        self.ctx = ctx
        self.status = status or Status(ctx)
        self.bundles = AdminBundle(ctx, self.status.services)

    def resource(self) -> IResource:
        return guarded(self.app, JSON, self.ctx.config.server.max_path_length)

    add_error_handling(app, JSON)

    @app.route("/", methods=["GET", "HEAD"])
    async def index(self, request: Any) -> bytes:
        # A browser gets the status page; API clients keep getting this JSON.
        request.setHeader(b"Vary", b"Accept")
        if status_page.wants_html(request):
            self.ctx.auth.require(request, "read")
            return status_page.respond(request, await self.status.snapshot())
        return _json(request, {
            "name": "sparkcache",
            "version": sparkcache.__version__,
            "remotes": [
                {"name": r.name, "type": r.type, "upstream": r.upstream,
                 "url": self.ctx.remote_url(r.name), "description": r.description}
                for r in self.ctx.config.remotes.values()
            ],
            # Stored under by protocols without a remotes: entry (purgeable by name).
            "internal_remotes": [
                {"name": name, "type": rtype, "url": url} for name, (rtype, url) in self.ctx.internal_remotes.items()
            ],
        })

    @app.route("/health", methods=["GET", "HEAD"])
    async def health(self, request: Any) -> bytes:
        store, metrics = self.ctx.store, self.ctx.metrics
        # With worker processes, the whole daemon's figures: every worker's metric files, read off the reactor.
        families = await metrics.collected(store.in_io) if multiprocess_dir() else ()
        return _json(request, {
            "status": "ok",
            "store_bytes": store.size,
            "store_entries": store.entries,
            "inflight_fetches": inflight(self.ctx, families),
            **metrics.connection_counts(families),
            # Liveness stays 200 on a full disk (a restart would not help); these say why misses pass through.
            "store_free_bytes": store.free,
            "store_low_space": store.low_space,
            "store_write_error": store.write_error,
            # Which process answered (server.workers > 1: several share the socket).
            "pid": os.getpid(),
            "worker": WORKER,
        })

    @app.route("/ready", methods=["GET", "HEAD"])
    def ready(self, request: Any) -> bytes:
        """200 once the store is open and the listeners are up; 503 saying why
        before, while stopping, and while the disk is below its free-space floor."""
        reasons = self.status.readiness()
        if reasons:
            request.setResponseCode(503)
        return _json(request, {"status": "not ready" if reasons else "ready", "ready": not reasons, "reasons": reasons})

    @app.route("/status.json", methods=["GET", "HEAD"])
    async def status_json(self, request: Any) -> bytes:
        """What the status page shows (it polls this; so can scripts and the CLI)."""
        self.ctx.auth.require(request, "read")
        request.setHeader(b"Cache-Control", b"no-store")
        return _json(request, await self.status.snapshot())

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: Any) -> bytes:
        m = self.ctx.metrics
        m.store_bytes.set(self.ctx.store.size)
        m.store_entries.set(self.ctx.store.entries)
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return m.render()

    @app.route("/config", methods=["GET"])
    def config(self, request: Any) -> bytes:
        self.ctx.auth.require(request, "read")
        return _json(request, self.ctx.config.redacted())

    @app.route("/admin/purge", methods=["POST"])
    async def purge(self, request: Any) -> bytes:
        """Purge the cache: everything, one remote, or one entry. Uploads and
        pushes (they exist nowhere else) are never purged: /admin/local deletes them."""
        return _json(request, await purges.purge(self.ctx, request))

    @app.route("/admin/local", methods=["GET", "HEAD"])
    async def local(self, request: Any) -> bytes:
        return _json(request, await purges.list_local(self.ctx, request))

    @app.route("/admin/local", methods=["DELETE"])
    async def delete_local(self, request: Any) -> bytes:
        return _json(request, await purges.delete_local(self.ctx, request))

    @app.route("/admin/remotes", branch=True)
    def remotes(self, request: Any) -> IResource:
        return AdminRemotes(self.ctx).resource()

    @app.route("/admin/export", methods=["GET"])
    async def export(self, request: Any) -> None:
        await self.bundles.export(request)

    @app.route("/admin/import", methods=["POST"])
    async def import_bundle(self, request: Any) -> bytes:
        return await self.bundles.import_(request)

    @app.route("/<path:rest>", branch=True)
    def not_found(self, request: Any, rest: str) -> bytes:
        raise HTTPError(404, "no such endpoint")


def _json(request: Any, obj: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(obj, indent=None).encode() + b"\n"
