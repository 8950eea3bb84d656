"""Serving a blob that is still being fetched, without ever ending it unverified.

A tail reader of an in-flight body would otherwise send the last byte and end
the response cleanly as soon as the bytes are there — before the digest has
been checked. With the Content-Length known, a client that does not verify
digests itself would then keep a corrupt layer. Here the last byte of any
response that reaches the end of the blob is held back until the fetch is
complete and its sha256 verified; on a mismatch the connection is aborted.
Ranges that stop short of the end are sent as they arrive (a part cannot be
verified on its own).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from sparkcache.fetch.cache import Live
from sparkcache.metrics import Metrics
from sparkcache.web.respond import _set_headers, _span
from sparkcache.web.serve import _Producer, finish_safely


def send_verified(request: Any, flight: Any, start: int, end: int | None, on_bytes: Any) -> Deferred[None]:
    """Tail ``flight`` for bytes [start, end); the final byte waits for verification."""
    flight.acquire()
    total = flight.total

    def available() -> int:
        if flight.finished and flight.error is None:
            return int(flight.written)
        if total is not None:
            return int(min(flight.written, total - 1))
        return int(flight.written)

    p = _Producer(request, flight.read, start, end, available=available,
                  failed=lambda: flight.error is not None,
                  ended=lambda: flight.finished and flight.error is None, on_bytes=on_bytes)
    flight.listen(p.wake)

    def release(r: object) -> object:
        flight.unlisten(p.wake)
        flight.release()
        return r

    return p.start().addBoth(release)


async def serve_live_blob(request: Any, result: Live, metrics: Metrics, remote: str, path: str,
                          extra_headers: dict[str, str]) -> bytes | None:
    flight = result.flight
    metrics.response(remote, "miss")
    _set_headers(request, result.state, False, flight.headers, None, path, extra_headers)
    span = _span(request, flight.total)
    if isinstance(span, bytes):
        return span
    start, end = span
    if request.method == b"HEAD":
        finish_safely(request)
        return None
    await send_verified(request, flight, start, end, metrics.bytes_counter(remote, "upstream"))
    return None
