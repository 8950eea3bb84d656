"""Turn a cache Result into an HTTP response (headers, Range, HEAD, body)."""

from __future__ import annotations

import mimetypes
import posixpath
from typing import Any

from twisted.internet.defer import Deferred

from sparkcache.fetch.cache import Failed, Hit, Live, Result
from sparkcache.metrics import Metrics
from sparkcache.store import Store
from sparkcache.web.serve import Unsatisfiable, error_body, finish_safely, parse_range, send_file, send_flight


def guess_type(path: str) -> str:
    # Only the type: mimetypes' encoding guess ("gzip" for .tar.gz) must never
    # become a Content-Encoding, or clients would decompress the file.
    ctype, _enc = mimetypes.guess_type(path, strict=False)
    return ctype or "application/octet-stream"


async def respond(
    request: Any,
    result: Result,
    store: Store,
    metrics: Metrics,
    remote: str,
    path: str,
    extra_headers: dict[str, str] | None = None,
) -> bytes | None:
    """Write ``result`` to ``request``; returns a body for Klein, or None when streamed."""
    if isinstance(result, Failed):
        metrics.requests.labels(remote, "error").inc()
        return error_body(request, result.status, result.message)

    if isinstance(result, Hit):
        entry = result.entry
        headers = entry.headers
        total: int | None = entry.size
        etag = entry.etag or f'"sha256:{entry.digest}"'
        source = "cache"
    else:
        assert isinstance(result, Live)
        flight = result.flight
        headers = flight.headers
        total = flight.total
        etag = headers.get("etag") or ""
        source = "upstream"
    metrics.requests.labels(remote, result.state.lower()).inc()

    request.setHeader(b"X-Cache", result.state.encode())
    request.setHeader(b"X-Artifact-Source", b"cache" if source == "cache" else b"remote")
    request.setHeader(b"Content-Type", (headers.get("content-type") or guess_type(path)).encode("latin-1"))
    for name in ("content-encoding", "last-modified", "content-language"):
        if headers.get(name):
            request.setHeader(name.encode(), headers[name].encode("latin-1"))
    if etag:
        request.setHeader(b"ETag", etag.encode("latin-1"))
    disposition = headers.get("content-disposition")
    name = posixpath.basename(path)
    if not disposition and name:
        disposition = 'attachment; filename="%s"' % name.replace('"', "")
    if disposition:
        request.setHeader(b"Content-Disposition", disposition.encode("utf-8"))
    for k, v in (extra_headers or {}).items():
        request.setHeader(k.encode(), v.encode("latin-1"))

    if etag and source == "cache":
        inm = request.getHeader(b"if-none-match")
        if inm and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
            request.setResponseCode(304)
            return b""

    if total is not None:
        request.setHeader(b"Accept-Ranges", b"bytes")
    try:
        rng = parse_range(request.getHeader(b"range"), total)
    except Unsatisfiable:
        request.setHeader(b"Content-Range", f"bytes */{total}".encode())
        return error_body(request, 416, "range not satisfiable")
    if rng is not None and total is not None:
        start, end = rng[0], rng[1] + 1
        request.setResponseCode(206)
        request.setHeader(b"Content-Range", f"bytes {rng[0]}-{rng[1]}/{total}".encode())
    else:
        start, end = 0, total  # type: ignore[assignment]
    if end is not None:
        request.setHeader(b"Content-Length", str(end - start).encode())

    if request.method == b"HEAD":
        finish_safely(request)
        return None

    counter = metrics.served_bytes.labels(remote, source)

    if isinstance(result, Hit):
        assert result.entry.digest is not None and end is not None
        digest = result.entry.digest
        store.pin(digest)
        try:
            d: Deferred[None] = send_file(request, store.path(result.entry), start, end, counter.inc)
        except FileNotFoundError:
            store.unpin(digest)
            # The body vanished under us (purged, or the disk was tampered
            # with): drop the row so the next request fetches afresh.
            await store.purge_key(result.entry.key)
            return error_body(request, 503, "cached body missing; retry")
        try:
            await d
        finally:
            store.unpin(digest)
    else:
        await send_flight(request, result.flight, start, end, counter.inc)
    return None
