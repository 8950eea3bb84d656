"""Per-remote objects of a protocol app, kept in step with the running configuration.

An app that builds an object per remote (keyed blobs, an index remote, GHA
reservations) rebuilds its table with :func:`refreshed` when the
configuration changes (``Built.reconfigure``): an unchanged remote keeps its
object and its in-memory state, a new or changed remote gets a new one, and
a removed one is dropped from the table, while requests that already hold
it finish with it.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, TypeVar

from sparkcache.config import RemoteConfig

T = TypeVar("T")


def refreshed(old: Mapping[str, T], remotes: Iterable[RemoteConfig], make: Callable[[RemoteConfig], T],
              config_of: Callable[[T], RemoteConfig]) -> dict[str, T]:
    out: dict[str, T] = {}
    for r in remotes:
        prev = old.get(r.name)
        out[r.name] = prev if prev is not None and config_of(prev) == r else make(r)
    return out
