"""Turn a cache Result into an HTTP response (headers, Range, HEAD, body)."""

from __future__ import annotations

import mimetypes
import posixpath
from email.utils import parsedate_to_datetime
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from sparkcache.fetch.cache import Failed, Hit, Live, Result
from sparkcache.fetch.flight import Flight
from sparkcache.metrics import Metrics
from sparkcache.store import Entry, Store
from sparkcache.web.sendfile import SendfilePool
from sparkcache.web.serve import (
    Unsatisfiable, error_body, finish_safely, header, parse_range, range_spec, send_body, send_flight,
)

log = Logger()

# Bodies up to this size are read in one pread and written at once: cheaper
# than setting up a producer, and the page cache makes the read instant.
SMALL_BODY = 128 * 1024


def relayed_headers(failed: Failed) -> dict[str, str]:
    """The upstream headers a client is told along with ``failed``: Retry-After
    (on a 429), so it backs off as long as upstream asked. Never upstream's
    WWW-Authenticate: our client cannot answer upstream's challenge."""
    retry = failed.headers.get("retry-after")
    return {"Retry-After": retry} if retry else {}


def guess_type(path: str) -> str:
    # Only the type: mimetypes' encoding guess ("gzip" for .tar.gz) must never
    # become a Content-Encoding, or clients would decompress the file.
    ctype, _enc = mimetypes.guess_type(path, strict=False)
    return ctype or "application/octet-stream"


def _set_headers(
    request: Any, state: str, from_cache: bool, headers: dict[str, str], etag: str | None, path: str,
    extra: dict[str, str] | None,
) -> None:
    set_header = request.responseHeaders.setRawHeaders
    set_header(b"X-Cache", [state.encode()])
    set_header(b"X-Artifact-Source", [b"cache" if from_cache else b"remote"])
    set_header(b"Content-Type", [(headers.get("content-type") or guess_type(path)).encode("latin-1")])
    for name in ("content-encoding", "last-modified", "content-language"):
        v = headers.get(name)
        if v:
            set_header(name.encode(), [v.encode("latin-1")])
    if etag:
        set_header(b"ETag", [etag.encode("latin-1")])
    disposition = headers.get("content-disposition")
    if not disposition:
        name = posixpath.basename(path)
        if name:
            disposition = 'attachment; filename="%s"' % name.replace('"', "")
    if disposition:
        set_header(b"Content-Disposition", [disposition.encode("utf-8")])
    if extra:
        for k, v in extra.items():
            set_header(k.encode(), [v.encode("latin-1")])


def set_hit_headers(request: Any, entry: Entry, state: str, path: str, extra: dict[str, str] | None) -> str:
    """The headers of a stored entry's response (but Range's); returns its ETag."""
    etag = entry.etag or f'"sha256:{entry.digest}"'
    _set_headers(request, state, True, entry.headers, etag, path, extra)
    return etag


def _span(request: Any, total: int | None) -> tuple[int, int | None] | bytes:
    """Apply Range: set status and length headers; (start, end) or an error body."""
    if total is not None:
        request.responseHeaders.setRawHeaders(b"Accept-Ranges", [b"bytes"])
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
        request.responseHeaders.setRawHeaders(b"Content-Length", [str(end - start).encode()])
    return start, end


def _not_modified(request: Any, etag: str, last_modified: str | None) -> bool:
    """Whether a conditional GET of a stored body may be answered 304: its ETag
    is in If-None-Match, or (without one, as RFC 9110 says) it was last modified
    no later than If-Modified-Since (cargo sends that when it got no ETag)."""
    inm = header(request, b"if-none-match")
    if inm:
        return inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]
    ims = header(request, b"if-modified-since")
    if not ims or not last_modified:
        return False
    try:
        since, modified = parsedate_to_datetime(ims), parsedate_to_datetime(last_modified)
    except (TypeError, ValueError, IndexError):
        return False
    if since.tzinfo is None or modified.tzinfo is None:
        return False
    return modified <= since


def serve_hit(
    request: Any, entry: Entry, state: str, store: Store, metrics: Metrics, remote: str, path: str,
    extra_headers: dict[str, str] | None = None, sendfile: SendfilePool | None = None,
) -> bytes | Deferred[None] | None:
    """Serve a committed entry, synchronously where it can.

    Returns a body for the caller to write, a Deferred that fires when a
    streamed body is done, or None when the response is already finished.
    """
    metrics.response(remote, state.lower())
    etag = set_hit_headers(request, entry, state, path, extra_headers)
    if _not_modified(request, etag, entry.last_modified or entry.headers.get("last-modified")):
        request.setResponseCode(304)
        return b""
    span = _span(request, entry.size)
    if isinstance(span, bytes):
        return span
    start, end = span
    assert end is not None and entry.digest is not None
    if request.method == b"HEAD":
        finish_safely(request)
        return None
    count_bytes = metrics.bytes_counter(remote, "cache")
    try:
        # Opened before any header is sent: a missing body can still be a 503.
        body = store.open_range(entry, start, end)
    except FileNotFoundError:
        if store.backed:
            # Not in the tier: a Range asked of a body left in the bucket, or one
            # evicted from the tier just now. From the bucket (store/s3/ranged.py).
            from sparkcache.store.s3.ranged import serve_from_bucket

            return serve_from_bucket(request, store, entry, start, end, count_bytes)
        # The body vanished under us (purged, or the disk was tampered
        # with): drop the row so the next request fetches afresh.
        ensureDeferred(store.purge_key(entry.key)).addErrback(lambda f: log.failure("purge failed", f))
        request.responseHeaders.removeHeader(b"Content-Length")
        request.responseHeaders.removeHeader(b"Content-Range")
        request.setResponseCode(200)
        return error_body(request, 503, "cached body missing; retry")
    if end - start <= SMALL_BODY:
        with body:
            data = body.read_all()
        count_bytes(len(data))
        return data
    d = sendfile.try_send(request, body, count_bytes) if sendfile is not None else None
    if d is None:
        d = send_body(request, body, count_bytes)
    return d


async def respond(
    request: Any,
    result: Result,
    store: Store,
    metrics: Metrics,
    remote: str,
    path: str,
    extra_headers: dict[str, str] | None = None,
    sendfile: SendfilePool | None = None,
) -> bytes | None:
    """Write ``result`` to ``request``; returns a body for Klein, or None when streamed."""
    if isinstance(result, Failed):
        metrics.response(remote, "error")
        return error_body(request, result.status, result.message, relayed_headers(result))
    if isinstance(result, Hit):
        out = serve_hit(request, result.entry, result.state, store, metrics, remote, path, extra_headers, sendfile)
        if isinstance(out, Deferred):
            await out
            return None
        return out

    assert isinstance(result, Live)
    flight = result.flight
    metrics.response(remote, "miss")
    _set_headers(request, result.state, False, flight.headers, flight.headers.get("etag"), path, extra_headers)
    spec = range_spec(request.getHeader(b"range")) if flight.total is None and request.method == b"GET" else None
    if spec is not None:
        # A range of a body of unknown length (chunked upstream): answered
        # once it can be answered truthfully, from the spool.
        flight.acquire()  # the spool stays readable even if the fetch ends meanwhile
        try:
            return await _respond_unknown_length(request, flight, spec, metrics, remote)
        finally:
            flight.release()
    span = _span(request, flight.total)
    if isinstance(span, bytes):
        return span
    start, end = span
    if request.method == b"HEAD":
        finish_safely(request)
        return None
    count_bytes = metrics.bytes_counter(remote, "upstream")
    d = None
    # sendfile tails whatever is on disk; a body to verify must hold its last byte.
    if sendfile is not None and end is not None and end - start > SMALL_BODY and not flight.finished \
            and not flight.hold_last:
        d = sendfile.try_tail(request, flight, start, end, count_bytes)
    if d is None:
        d = send_flight(request, flight, start, end, count_bytes)
    await d
    return None


def _range_decidable(flight: Flight, spec: tuple[int | None, int | None]) -> bool:
    """Whether the range can be answered: the body is complete (its length is
    known: 206 or 416), or a closed range's last byte is in the spool (and,
    for a body still to be verified, a byte after it, as ``hold_last`` wants)."""
    if flight.finished:
        return True
    first, last = spec
    if first is None or last is None:
        return False  # an open or suffix range needs the length
    return flight.written >= last + 1 + (1 if flight.hold_last else 0)


async def _respond_unknown_length(
    request: Any, flight: Flight, spec: tuple[int | None, int | None], metrics: Metrics, remote: str,
) -> bytes | None:
    """Answer a Range on a live fetch whose length is unknown.

    A 206 is never sent for bytes the body might not have: a closed range
    ``a-b`` waits until byte ``b`` is in the spool, then goes out as
    ``bytes a-b/*`` (RFC 9110 14.4 allows an unknown complete length); an
    open or suffix range, or a closed one past the end, waits for the end of
    the body, whose length then makes it an ordinary 206 (or 416).
    """
    first, last = spec
    if first is not None and last is not None and last < first:
        spec = (None, None)  # invalid: ignored, the whole body is sent
    if spec != (None, None) and not _range_decidable(flight, spec):
        ready: Deferred[None] = Deferred()

        def check() -> None:
            if not ready.called and _range_decidable(flight, spec):
                ready.callback(None)

        flight.listen(check)
        try:
            await ready  # Klein cancels it if the client goes away
        finally:
            flight.unlisten(check)
    if flight.error is not None:
        return error_body(request, 502, f"upstream body failed: {flight.error}")
    count_bytes = metrics.bytes_counter(remote, "upstream")
    if spec == (None, None):
        start, end = 0, None
    elif flight.finished:
        span = _span(request, flight.written)
        if isinstance(span, bytes):
            return span
        start, end = span
    else:
        assert first is not None and last is not None
        start, end = first, last + 1
        request.setResponseCode(206)
        request.setHeader(b"Content-Range", f"bytes {first}-{last}/*".encode())
        request.setHeader(b"Content-Length", str(end - start).encode())
    await send_flight(request, flight, start, end, count_bytes)
    return None
