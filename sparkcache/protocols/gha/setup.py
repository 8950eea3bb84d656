"""``/setup/gha`` (a runner's environment) and ``/setup/gha-token`` (a
short-lived runtime token minted by the daemon, for runners that should not
hold a long-lived sparkcache token)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sparkcache.config import parse_duration
from sparkcache.protocols.gha.signing import mint_token
from sparkcache.web.errors import HTTPError
from sparkcache.web.setup import query_arg, render_snippet
from sparkcache.web.urls import public_base

if TYPE_CHECKING:
    from sparkcache.protocols.gha.routes import GhaApp

ENV_TEMPLATE = """\
# GitHub Actions cache on sparkcache (remote {remote!r}). Put these in the
# self-hosted runner's environment (its .env file), or export them in a job.
ACTIONS_CACHE_SERVICE_V2=true
# v2 (Twirp): @actions/cache keeps only this URL's host; its calls reach
# {base}/twirp/..., served by the default gha remote ({default}).
ACTIONS_RESULTS_URL={url}
# v1 (_apis/artifactcache), used when ACTIONS_CACHE_SERVICE_V2 is unset.
ACTIONS_CACHE_URL={url}
# A sparkcache token with the write scope, or a short-lived runtime token:
#   curl -X POST -H "Authorization: Bearer $SPARKCACHE_TOKEN" \\
#     '{base}/setup/gha-token?remote={remote}&scope=refs/heads/<branch>&restore=refs/heads/main'
ACTIONS_RUNTIME_TOKEN=<token>
"""


def _remote(app: "GhaApp", request: Any) -> Any:
    return app.remote(query_arg(request, "remote"))


def env_snippet(app: "GhaApp", request: Any) -> bytes:
    g = _remote(app, request)
    base = public_base(request, app.ctx.config.server.public_url)
    default = repr(app.default.name) if app.default is not None else "none: give one default: true"
    body = ENV_TEMPLATE.format(remote=g.name, base=base, default=default,
                               url=f"{base}/gha/{quote(g.name, safe='')}/")
    return render_snippet(request, "text/plain", body, ".env")


async def mint(app: "GhaApp", request: Any) -> bytes:
    """A runtime token for ``scope`` (write, and read first) and ``restore``
    (comma-separated read-only scopes), valid ``ttl`` (at most the remote's ``token_ttl``)."""
    g = _remote(app, request)
    opts = g.options
    read_only = query_arg(request, "read_only") in ("1", "true", "yes")
    scope = query_arg(request, "scope") or opts.scope
    restore = query_arg(request, "restore")
    restore_scopes = tuple(s for s in (restore.split(",") if restore is not None else opts.restore_scopes) if s)
    try:
        ttl = parse_duration(query_arg(request, "ttl") or opts.token_ttl)
    except ValueError as e:
        raise HTTPError(400, f"ttl: {e}") from None
    if ttl <= 0:
        raise HTTPError(400, "ttl must be positive")
    ttl = min(ttl, opts.token_ttl)
    now = app.ctx.clock.seconds()
    token = mint_token(await app.secret(g), now, ttl, None if read_only else scope, (scope, *restore_scopes))
    data = json.dumps({"token": token, "expires_at": int(now + ttl), "remote": g.name,
                       "write_scope": None if read_only else scope, "read_scopes": [scope, *restore_scopes]})
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return data.encode() + b"\n"
