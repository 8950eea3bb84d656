"""Helm chart repositories (``type: helm``): an index remote.

A repository is a directory with an ``index.yaml`` listing every chart
version with its archive URLs and the archive's sha256 ``digest``. Clients get
the index with absolute URLs on the upstream's host pointed at this cache, so
``helm pull`` comes through it; relative URLs already resolve against the
cache and stay as they are. A chart fetched through the cache whose stored
index names a digest is verified against it: bytes that do not match are
never cached.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Mapping, Sequence
from urllib.parse import unquote, urljoin, urlsplit

import yaml

from sparkcache.protocols._index import IndexRemote
from sparkcache.web.paths import quote_segments

try:
    _SafeLoader: Any = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    _SafeLoader = yaml.SafeLoader


class _IndexLoader(_SafeLoader):  # type: ignore[misc,valid-type]
    """Safe YAML that leaves timestamps as text: the digests need none of
    them, and one malformed ``created:`` must not cost the index its digests."""


_IndexLoader.add_constructor("tag:yaml.org,2002:timestamp", _IndexLoader.construct_yaml_str)

_SHA256 = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")
INDEX_NAME = "index.yaml"


def _sha256(value: Any) -> str | None:
    m = _SHA256.fullmatch(value) if isinstance(value, str) else None
    return m.group(1).lower() if m else None


class HelmIndex(IndexRemote):
    content_type = "application/x-yaml"
    # How many enclosing directories' index.yaml are asked about a chart (the
    # repository root's always is): each is a store lookup.
    search_depth = 8

    def is_index(self, path: str) -> bool:
        return posixpath.basename(path) == INDEX_NAME

    def rewrite(self, body: bytes, public_base: str) -> bytes:
        assert self.remote.upstream is not None
        return body.replace(self.remote.upstream.encode() + b"/", public_base.encode() + b"/")

    def indexes_listing(self, path: str) -> Sequence[str]:
        if self.is_index(path):
            return ()
        dirs = path.split("/")[:-1]
        nearest = [dirs[:n] for n in range(len(dirs), 0, -1)][: self.search_depth]
        return ["/".join(d + [INDEX_NAME]) for d in nearest] + [INDEX_NAME]

    def parse_digests(self, body: bytes, index_path: str) -> Mapping[str, str]:
        doc = yaml.load(body, Loader=_IndexLoader)  # noqa: S506 - a safe loader
        entries = doc.get("entries") if isinstance(doc, dict) else None
        if not isinstance(entries, dict):
            return {}
        base = self._repository_url(index_path)
        # YAML aliases can make a small document walk like a huge one; an
        # honest index spends at least a byte on every item it lists.
        budget = len(body)
        found: dict[str, str] = {}
        clashes: set[str] = set()
        for versions in entries.values():
            if not isinstance(versions, list):
                continue
            budget -= len(versions)
            if budget < 0:
                raise ValueError("the index lists more than its size allows (YAML aliases?)")
            for version in versions:
                if not isinstance(version, dict):
                    continue
                digest, urls = _sha256(version.get("digest")), version.get("urls")
                if digest is None or not isinstance(urls, list):
                    continue
                budget -= len(urls)
                if budget < 0:
                    raise ValueError("the index lists more than its size allows (YAML aliases?)")
                for url in urls:
                    path = self._remote_path(url, base)
                    if path is not None and found.setdefault(path, digest) != digest:
                        clashes.add(path)
        # Two digests for one archive: upstream contradicts itself; verify neither.
        for path in clashes:
            del found[path]
        return found

    def _repository_url(self, index_path: str) -> str:
        """What relative chart URLs resolve against (helm adds the trailing slash)."""
        assert self.remote.upstream is not None
        d = posixpath.dirname(index_path)
        return self.remote.upstream + "/" + (quote_segments(d.split("/")) + "/" if d else "")

    def _remote_path(self, url: Any, base: str) -> str | None:
        """The path of this remote that chart ``url`` names; None when it is
        elsewhere (another host, a query string: not something we verify)."""
        if not isinstance(url, str):
            return None
        assert self.remote.upstream is not None
        try:
            full = urlsplit(urljoin(base, url))
            up = urlsplit(self.remote.upstream + "/")
        except ValueError:
            return None
        if (full.scheme.lower(), full.netloc.lower()) != (up.scheme.lower(), up.netloc.lower()) \
                or full.query or not full.path.startswith(up.path):
            return None
        segments = [unquote(s) for s in full.path[len(up.path):].split("/") if s]
        if not segments or any(s in (".", "..") or "/" in s for s in segments):
            return None
        return "/".join(segments)
