"""Who may make the cache contact a new git host.

A runtime registration (``POST /git/register``, ``POST /sync/seed``) names an
upstream the cache will then fetch from, on its loop, for good. A write token
(what CI jobs carry, for uploads) may do that for repositories already
registered and for hosts the operator listed in ``git.allowed_hosts``; any
other host needs the admin scope, or a write token would be a way to make the
cache connect to anything its network reaches.
"""

from __future__ import annotations

from typing import Any

from sparkcache.git.config import GitConfig, check_url, url_host


def require_registration(ctx: Any, request: Any, mirrors: Any, url: str) -> None:
    """Raise AuthError unless the request may register ``url`` as an upstream.
    A URL the registry would refuse anyway passes here (it answers 400)."""
    ctx.auth.require(request, "write")
    try:
        check_url(url)
    except ValueError:
        return
    registry = getattr(mirrors, "registry", None)
    if registry is not None and registry.by_url(url) is not None:
        return
    cfg = ctx.config.section("git") or GitConfig()
    host = url_host(url)
    if host is None or cfg.allowed_host(host) is None:
        ctx.auth.require(request, "admin")
