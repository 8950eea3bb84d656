"""Remote configurations for the daemon under test."""

from __future__ import annotations

from typing import Any

from .upstream import Upstream

# Test layout: files/... is immutable, meta/... is mutable, anything else is
# outside both pattern lists (403). Both lists are always given, so no test
# depends on how a remote with only one list treats the rest.
IMMUTABLE = r"(^|/)files/"
MUTABLE = r"(^|/)meta/"


def generic_remote(
    up: Upstream | str,
    *,
    prefix: str = "",
    immutable: list[str] | None = None,
    mutable: list[str] | None = None,
    cache: dict[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    base = up if isinstance(up, str) else up.base_url
    remote: dict[str, Any] = {
        "type": "generic",
        "upstream": base + prefix,
        "immutable_patterns": [IMMUTABLE] if immutable is None else immutable,
        "mutable_patterns": [MUTABLE] if mutable is None else mutable,
    }
    if cache:
        remote["cache"] = cache
    remote.update(settings)
    return remote
