"""npm package names and the registry paths under ``/npm/<remote>/``.

Clients spell a scoped name three ways (``@scope%2fname``, ``@scope%2Fname``
and ``@scope/name``), so routing works on the RAW path: each segment is
percent-decoded once, by us, and a decoded ``/`` is accepted only where npm
puts one (between a scope and its name). Everything else that could steer a
path (dot segments, backslashes, control bytes, names npm itself would not
publish) is refused with a 400 before any store or upstream is asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import quote, unquote_to_bytes

from sparkcache.web.paths import BadPath

MAX_NAME = 214  # npm's own limit (validate-npm-package-name)
# What encodeURIComponent leaves alone, which is what npm allows in a name
# part; upper case only for the legacy names the registry still serves.
_PART = re.compile(r"[A-Za-z0-9\-_.!~*'()]+")
# A tarball's file name: <name>-<version>.tgz, where a version may carry +build.
_FILE = re.compile(r"[A-Za-z0-9\-_.!~*'()+]+\.tgz")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class Route:
    """What a path under a registry root asks for.

    ``kind`` is one of: ``root`` (the registry root itself), ``packument``,
    ``tarball`` (``file`` set), ``version`` (``/<name>/<version>``: ``file`` is
    the version), ``special`` (``/-/...``: ``rest`` holds the segments after
    ``-``, ``name`` set for ``/-/package/<name>/...``).
    """

    kind: str
    name: str = ""
    file: str = ""
    rest: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        """The store path of a packument or tarball (``@scope/name/-/name-1.0.0.tgz``)."""
        return f"{self.name}/-/{self.file}" if self.kind == "tarball" else self.name


def check_name(name: str) -> str:
    """``name`` when npm could have published it; BadPath otherwise."""
    if not name or len(name) > MAX_NAME:
        raise BadPath(f"invalid package name {name[:80]!r}: 1 to {MAX_NAME} characters")
    scope, slash, base = name.rpartition("/")
    parts = [scope, base] if slash else [base]
    if slash:
        if not scope.startswith("@") or "/" in scope:
            raise BadPath(f"invalid package name {name!r}: a scoped name is @scope/name")
        parts = [scope[1:], base]
    for part in parts:
        if not _PART.fullmatch(part) or part.startswith((".", "_")):
            raise BadPath(f"invalid package name {name!r}")
    return name


def url_name(name: str) -> str:
    """``name`` as it appears in a URL path (``@scope/name`` keeps its slash, as npm's tarball URLs do)."""
    return quote(name, safe="@/")


def decode_segment(seg: bytes) -> str:
    """One raw segment percent-decoded once; BadPath for what no registry path holds."""
    try:
        text = unquote_to_bytes(seg).decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("path is not valid UTF-8") from None
    if _CONTROL.search(text) or "\\" in text:
        raise BadPath("control characters, spaces and backslashes are not allowed in paths")
    if text in (".", ".."):
        raise BadPath("dot segments are not allowed in paths")
    return text


def raw_segments(raw_path: bytes, max_length: int = 4096) -> list[bytes]:
    """The raw (still percent-encoded) segments of a request path, empty ones dropped."""
    if len(raw_path) > max_length:
        raise BadPath(f"path longer than {max_length} bytes", status=414)
    path = raw_path.split(b"?", 1)[0]
    if b"\\" in path:
        raise BadPath("backslashes are not allowed in paths")
    return [s for s in path.split(b"/") if s]


def parse(segments: Sequence[bytes]) -> Route:
    """The Route of the raw segments after ``/npm/<remote>/``."""
    if not segments:
        return Route("root")
    decoded = [decode_segment(s) for s in segments]
    if decoded[0] == "-":
        rest = tuple(decoded[1:])
        if len(rest) >= 2 and rest[0] == "package":
            # /-/package/<name>/dist-tags[/<tag>]: the name may be scoped in any of its spellings.
            name, after = _take_name(decoded[1:][1:])
            return Route("special", name=name, rest=("package", *after))
        for r in rest:
            if "/" in r:
                raise BadPath("encoded path separators are not allowed here")
        return Route("special", rest=rest)
    name, after = _take_name(decoded)
    if not after:
        return Route("packument", name)
    if after[0] == "-" and len(after) == 2:
        file = after[1]
        if "/" in file or not _FILE.fullmatch(file) or file.startswith("."):
            raise BadPath(f"invalid tarball name {file[:80]!r}")
        return Route("tarball", name, file)
    if len(after) == 1 and "/" not in after[0]:
        return Route("version", name, after[0])
    raise BadPath("not a registry path: expected <name>, <name>/-/<file>.tgz or /-/...", status=404)


def _take_name(decoded: Sequence[str]) -> tuple[str, list[str]]:
    """(package name, the segments after it) of decoded segments."""
    first = decoded[0]
    if first.startswith("@"):
        if "/" in first:  # @scope%2fname
            name, rest = first, list(decoded[1:])
        else:  # @scope/name
            if len(decoded) < 2 or "/" in decoded[1]:
                raise BadPath(f"invalid package name {first!r}: a scoped name is @scope/name")
            name, rest = f"{first}/{decoded[1]}", list(decoded[2:])
    else:
        if "/" in first:
            raise BadPath("encoded path separators are only allowed in scoped names")
        name, rest = first, list(decoded[1:])
    return check_name(name), rest
