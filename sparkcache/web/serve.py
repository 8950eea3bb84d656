"""Sending bodies: stored files and in-flight spools, with Range and HEAD.

Both are push producers paused by the transport's backpressure, so a slow
client holds about one chunk in memory, never the body.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.web.iweb import IRequest
from zope.interface import implementer

from sparkcache.fetch.flight import Flight
from sparkcache.store import BodyRange

CHUNK = 256 * 1024
_RANGE = re.compile(r"^\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*$")
# A position with more digits than this is past the end of anything stored
# (int() of thousands of digits is slow, and past 4300 it raises).
_MAX_DIGITS = 18
_HUGE = 10**_MAX_DIGITS


class Unsatisfiable(Exception):
    pass


def _position(digits: str) -> int:
    return _HUGE if len(digits) > _MAX_DIGITS else int(digits)


def range_spec(header: bytes | None) -> tuple[int | None, int | None] | None:
    """A single ``bytes=first-last`` range as (first, last), either (not both)
    None when omitted (``bytes=5-``, ``bytes=-5``); None for no Range, several
    ranges, or a malformed one (RFC 9110 allows ignoring them). Absurdly long
    positions count as huge: a range starting there is unsatisfiable, one
    ending there runs to the end."""
    if header is None:
        return None
    m = _RANGE.match(header.decode("latin-1"))
    if not m:
        return None
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        return None
    return (_position(first) if first else None, _position(last) if last else None)


def resolve_range(spec: tuple[int | None, int | None] | None, total: int) -> tuple[int, int] | None:
    """The bytes (start, end inclusive) of a body of ``total`` bytes that
    ``spec`` asks for; None to send everything; Unsatisfiable when it asks
    only for bytes past the end."""
    if spec is None:
        return None
    first, last = spec
    if first is None:
        assert last is not None
        if last == 0:
            raise Unsatisfiable()
        return (max(0, total - last), total - 1)
    if first >= total:
        raise Unsatisfiable()
    end = total - 1 if last is None else last
    if end < first:
        return None
    return (first, min(end, total - 1))


def parse_range(header: bytes | None, total: int | None) -> tuple[int, int] | None:
    """A single byte range of a body of ``total`` bytes as (start, end inclusive);
    None to send everything (no Range, several, malformed, or an unknown total).
    A well-formed range beyond the end raises Unsatisfiable."""
    if total is None:
        return None
    return resolve_range(range_spec(header), total)


def error_body(request: IRequest, status: int, message: str, headers: dict[str, str] | None = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    for k, v in (headers or {}).items():
        request.setHeader(k.encode(), v.encode())
    return json.dumps({"error": message, "status": status}).encode() + b"\n"


def error_message(body: bytes) -> str:
    """The message of an :func:`error_body` (or the text of any other body), for
    an app that re-renders a shared helper's error in its protocol's form."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip() or "error"


def header(request: Any, name: bytes) -> str | None:
    """A request header as text (latin-1, as HTTP defines), or None."""
    v = request.getHeader(name)
    return v.decode("latin-1") if isinstance(v, bytes) else v


def finish_safely(request: Any) -> None:
    if not getattr(request, "_disconnected", False) and not getattr(request, "finished", False):
        request.finish()


@implementer(IPushProducer)
class _Producer:
    """Send bytes [offset, end) obtained from ``read(offset, n)``.

    A push producer: it writes while the transport accepts data and stops
    when the transport pauses it (its buffer is full), so memory per client
    is bounded by one chunk plus the transport buffer. twisted.web would wrap
    a pull producer in a cooperator that polls it, which spins while a tail
    reader waits for upstream bytes; a push producer simply parks instead.

    ``available()`` says how many bytes exist so far; when the producer has
    caught up with it, it parks until ``wake()`` (more bytes, or the end).
    """

    def __init__(
        self,
        request: Any,
        read: Callable[[int, int], bytes],
        start: int,
        end: int | None,
        available: Callable[[], int],
        failed: Callable[[], bool] = lambda: False,
        ended: Callable[[], bool] = lambda: True,
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.request = request
        self.read = read
        self.offset = start
        self.end = end
        self.available = available
        self.failed = failed
        self.ended = ended
        self.on_bytes = on_bytes
        self.done: Deferred[None] = Deferred()
        self._paused = False
        self._stopped = False
        self._pumping = False

    def start(self) -> Deferred[None]:
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.request.registerProducer(self, True)
        self._pump()
        return self.done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def wake(self) -> None:
        self._pump()

    def _pump(self) -> None:
        if self._pumping:
            return  # a write() re-entered us; the outer loop carries on
        self._pumping = True
        try:
            while not self._paused and not self._stopped:
                if self.failed():
                    self._abort()
                    return
                limit = self.available() if self.end is None else min(self.end, self.available())
                if self.offset < limit:
                    data = self.read(self.offset, min(CHUNK, limit - self.offset))
                    if not data:
                        self._abort()
                        return
                    self.offset += len(data)
                    self.on_bytes(len(data))
                    self.request.write(data)
                    continue
                if (self.end is not None and self.offset >= self.end) or (self.end is None and self.ended()):
                    self._finish()
                return  # caught up with upstream: wake() resumes
        finally:
            self._pumping = False

    def stopProducing(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._unregister()
            if not self.done.called:
                self.done.callback(None)

    def _unregister(self) -> None:
        if getattr(self.request, "producer", None) is self:
            try:
                self.request.unregisterProducer()
            except Exception:
                pass  # the channel is already gone

    def _finish(self) -> None:
        self._stopped = True
        self._unregister()
        finish_safely(self.request)
        if not self.done.called:
            self.done.callback(None)

    def _abort(self) -> None:
        """Never end a body cleanly when it is incomplete: drop the connection.

        If not even the headers have gone out, the client can still be told
        properly: a 502, not a 200 that breaks off."""
        self._stopped = True
        channel = getattr(self.request, "channel", None)
        transport = getattr(channel, "transport", None)
        self._unregister()
        if not getattr(self.request, "startedWriting", True) and not getattr(self.request, "_disconnected", False):
            for name in (b"content-length", b"content-range", b"content-disposition", b"etag", b"last-modified"):
                self.request.responseHeaders.removeHeader(name)
            self.request.write(error_body(self.request, 502, "upstream body broke off before any byte was sent"))
            finish_safely(self.request)
        elif transport is not None:
            transport.abortConnection()
        if not self.done.called:
            self.done.callback(None)


def send_body(request: Any, body: BodyRange, on_bytes: Callable[[int], None]) -> Deferred[None]:
    """Send a stored body range; it is closed when done."""
    end = body.end
    p = _Producer(request, body.read, body.start, end, lambda: end, on_bytes=on_bytes)

    def close(r: object) -> object:
        body.close()
        return r

    return p.start().addBoth(close)


def send_generated(request: Any, read: Callable[[int, int], bytes], size: int,
                   on_bytes: Callable[[int], None]) -> Deferred[None]:
    """Send ``size`` bytes made as they are sent: ``read(offset, n)`` returns the
    next at most ``n`` (an inflated body), called in order of offset."""
    return _Producer(request, read, 0, size, lambda: size, on_bytes=on_bytes).start()


def send_flight(request: Any, flight: Flight, start: int, end: int | None, on_bytes: Callable[[int], None]) -> Deferred[None]:
    """Tail an in-flight spool: send bytes as they arrive, abort if the fetch fails."""
    flight.acquire()

    def available() -> int:
        if flight.hold_last and flight.total is not None and not (flight.finished and flight.error is None):
            return min(flight.written, flight.total - 1)
        return flight.written

    p = _Producer(
        request,
        flight.read,
        start,
        end,
        available=available,
        failed=lambda: flight.error is not None,
        ended=lambda: flight.finished,
        on_bytes=on_bytes,
    )
    flight.listen(p.wake)

    def release(r: object) -> object:
        flight.unlisten(p.wake)
        flight.release()
        return r

    return p.start().addBoth(release)
