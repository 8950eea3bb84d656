"""This cache's own base URL, as clients see it, for rewritten metadata."""

from __future__ import annotations

from typing import Any


def public_base(request: Any, configured: str | None) -> str:
    """``server.public_url`` if set, else scheme and Host of the request
    (honouring ``X-Forwarded-Proto`` / ``X-Forwarded-Host`` from a TLS proxy)."""
    if configured:
        return configured.rstrip("/")
    proto = request.getHeader(b"x-forwarded-proto")
    host = request.getHeader(b"x-forwarded-host") or request.getHeader(b"host")
    scheme = (proto.split(b",")[0].strip() if proto else (b"https" if request.isSecure() else b"http")).decode("latin-1")
    if scheme not in ("http", "https"):
        scheme = "http"
    if not host:
        h = request.getHost()
        host = f"{getattr(h, 'host', 'localhost')}:{getattr(h, 'port', 80)}".encode()
    return f"{scheme}://{host.split(b',')[0].strip().decode('latin-1')}"
