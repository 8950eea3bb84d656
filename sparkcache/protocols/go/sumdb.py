"""The checksum-database proxy (``<GOPROXY>/sumdb/<name>/...``, ``go help goproxy``).

With the default ``GOSUMDB``, ``go`` first asks its proxy for
``/sumdb/sum.golang.org/supported``: a 200 makes it send every checksum
database request through the proxy, a 404 or 410 makes it contact the
database itself (which fails on a machine that can reach only the cache).
A remote proxies the databases it allow-lists (``sumdb:``), each to its own
upstream URL, without the remote's credentials (they belong to the GOPROXY
upstream). Freshness, from the protocol: ``lookup/<module>@<version>`` and
``tile/...`` never change (a tile's path names its size: a partial tile is
``.p/<width>``), ``latest`` is the signed tree head, which moves: it is asked
for every time and served from the store only when the database cannot be
reached (``go`` accepts an older tree head; it checks every head's signature
and consistency itself).

Options of a ``type: go`` remote::

    sumdb: false                        # no checksum database through this remote
    sumdb: [sum.golang.org]             # allow-listed names, each at https://<name>
    sumdb: {sum.golang.org: ${SUMDB}}   # names and their upstream URLs
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from sparkcache.config import Loader, RemoteConfig, Section, _expand
from sparkcache.fetch import CacheRequest
from sparkcache.protocols.go.paths import BadModulePath, check_module_path, is_canonical, unescape

DEFAULT_SUMDB = "sum.golang.org"
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?$")
# tile/<height>/<level or "data">/<index as x123/x456/789>[.p/<width>]
_TILE = re.compile(r"^tile/[1-9][0-9]?/(?:[0-9]{1,2}|data)/(?:x[0-9]{3}/){0,6}[0-9]{3}(?:\.p/[1-9][0-9]{0,2})?$")


@dataclass(frozen=True)
class GoOptions:
    """The checksum databases a remote proxies: name → upstream URL (empty: none)."""

    sumdb: tuple[tuple[str, str], ...] = ((DEFAULT_SUMDB, f"https://{DEFAULT_SUMDB}"),)

    def sumdb_url(self, name: str) -> str | None:
        return dict(self.sumdb).get(name)

    def redacted(self) -> dict[str, Any]:
        return {"sumdb": dict(self.sumdb) if self.sumdb else False}


def parse_go_options(loader: Loader, sec: Section, rtype: str) -> GoOptions:
    where = sec.key("sumdb")
    raw = sec.raw("sumdb", True)
    if raw is True or raw is None:
        return GoOptions()
    if raw is False:
        return GoOptions(())
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list):
        raw = {name: None for name in raw}
    if not isinstance(raw, dict) or not raw:
        raise loader.error(where, "expected true, false, a list of checksum database names, "
                                  "or a mapping of names to upstream URLs")
    out: list[tuple[str, str]] = []
    for name, url in raw.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise loader.error(where, f"expected a checksum database name such as {DEFAULT_SUMDB}, got {name!r}")
        if url is None:
            url = f"https://{name}"
        elif not isinstance(url, str):
            raise loader.error(f"{where}.{name}", "expected the database's URL")
        else:
            url = loader.url(f"{where}.{name}", _expand(url, loader, f"{where}.{name}"))
        out.append((name, url.rstrip("/")))
    return GoOptions(tuple(out))


def options_of(remote: RemoteConfig) -> GoOptions:
    return remote.options if isinstance(remote.options, GoOptions) else GoOptions()


@dataclass(frozen=True)
class SumdbRequest:
    """``/sumdb/<name>/<tail>``: ``kind`` is supported, lookup, tile or latest."""

    name: str
    kind: str
    tail: str


def parse(rest: list[str]) -> SumdbRequest:
    """The request after ``/sumdb/``; BadModulePath when it is none the protocol defines."""
    if len(rest) < 2 or not _NAME.match(rest[0]):
        raise BadModulePath("expected /sumdb/<name>/supported, /lookup/<module>@<version>, /tile/... or /latest")
    name, tail = rest[0], "/".join(rest[1:])
    if tail in ("supported", "latest"):
        return SumdbRequest(name, tail, tail)
    if rest[1] == "lookup" and len(rest) >= 3:
        escaped_module, at, escaped_version = "/".join(rest[2:]).rpartition("@")
        if not at:
            raise BadModulePath("expected lookup/<module>@<version>")
        check_module_path(unescape(escaped_module))
        if not is_canonical(unescape(escaped_version)):
            raise BadModulePath("a checksum database lookup names a canonical version")
        return SumdbRequest(name, "lookup", tail)
    if _TILE.match(tail):
        return SumdbRequest(name, "tile", tail)
    raise BadModulePath(f"no checksum database endpoint {tail!r}")


def cache_request(remote: RemoteConfig, req: SumdbRequest, url: str) -> CacheRequest:
    """What ``req`` fetches from the database at ``url``, as the remote's entry."""
    # The database is not the GOPROXY upstream: the remote's credentials stay
    # home, unless the same server proxies both (another sparkcache: a node-local tier).
    same = any(_origin(url) == _origin(u) for u in remote.upstreams)
    db = replace(remote, upstream=url, upstreams=(url,), credentials=remote.credentials if same else None)
    immutable = remote.cache.immutable_ttl or None
    ttl = 0.0 if req.kind == "latest" else immutable
    return CacheRequest(remote=db, key=f"{remote.name}:sumdb/{req.name}/{req.tail}",
                        path=f"sumdb/{req.name}/{req.tail}", url=f"{url}/{req.tail}", ttl=ttl,
                        revalidate=req.kind == "latest")


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()
