"""Request paths → safe, normalised relative paths.

Works on the raw request path (before anything percent-decodes it), decodes
each segment once, and refuses anything that could change the meaning of a
path: dot segments, encoded separators, backslashes, NUL and control bytes.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, unquote_to_bytes

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadPath(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def split_raw_path(raw: bytes, max_length: int = 4096) -> list[str]:
    """Split a raw (still percent-encoded) path into decoded, vetted segments.

    Empty segments from doubled slashes are dropped; a trailing slash is kept
    as a final empty segment so that ``/api/r/`` and ``/api/r`` differ.
    """
    if len(raw) > max_length:
        raise BadPath(f"path longer than {max_length} bytes", status=414)
    path = raw.split(b"?", 1)[0]
    if b"\\" in path:
        raise BadPath("backslashes are not allowed in paths")
    trailing = path.endswith(b"/")
    out: list[str] = []
    for seg in path.split(b"/"):
        if not seg:
            continue
        decoded = unquote_to_bytes(seg)
        if b"/" in decoded or b"\\" in decoded:
            raise BadPath("encoded path separators are not allowed")
        try:
            text = decoded.decode("utf-8")
        except UnicodeDecodeError:
            raise BadPath("path is not valid UTF-8") from None
        if _CONTROL.search(text):
            raise BadPath("control characters are not allowed in paths")
        if text in (".", ".."):
            raise BadPath("dot segments are not allowed in paths")
        out.append(text)
    if trailing:
        out.append("")
    return out


def vet_request(request: Any, max_length: int = 4096) -> list[str]:
    """The vetted segments of a request's raw path (:func:`split_raw_path`).

    Raises BadPath too for a Host header that is not UTF-8: routers decode it
    (werkzeug binds the URL map to it) and fail as they would on the path.
    """
    vet_host(request)
    return split_raw_path(request.uri, max_length)


def vet_host(request: Any) -> None:
    """BadPath for a Host header that is not UTF-8 (routers decode it)."""
    host = request.getHeader(b"host")
    if isinstance(host, bytes):
        try:
            host.decode("utf-8")
        except UnicodeDecodeError:
            raise BadPath("the Host header is not valid UTF-8") from None


def quote_segments(segments: list[str]) -> str:
    """Re-encode vetted segments for an upstream URL."""
    return "/".join(quote(s, safe="!$&'()*+,;=:@~-._") for s in segments)
