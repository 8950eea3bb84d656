"""Placeholder: the pack cache (filled in by the pack-cache work)."""

from __future__ import annotations

from typing import Any


class PackCache:
    """Serves identical full-clone upload-pack requests from one stored response."""

    def __init__(self, ctx: Any, reactor: Any) -> None:
        self.ctx, self.reactor = ctx, reactor

    async def serve(self, request: Any, mirror: Any, body: bytes, parsed: Any, git_protocol: str | None) -> bool:
        """Answer ``request`` from the cache (or by computing and storing the pack);
        return False, having written nothing, when the request is not cacheable."""
        return False
