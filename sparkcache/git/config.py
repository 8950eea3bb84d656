"""The ``git:`` section of the configuration."""

from __future__ import annotations

from typing import Any


def parse_git_section(loader: Any, sec: Any) -> Any:
    """Read the ``git:`` section (``sec`` is a config._Section; ``loader.environ``
    holds the environment, for GITCACHE_REPOS and FETCH_INTERVAL)."""
    sec.seen.update(sec.data)
    return dict(sec.data)
