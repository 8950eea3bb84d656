"""Work done once for many requests: shared builds and build flights.

Klein cancels a handler when its client disconnects; everything here makes sure
that cancellation stops only that client's wait, never the work others share.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.python.failure import Failure

from sparkcache.fetch.flight import Flight
from sparkcache.store import SpoolFile

T = TypeVar("T")
# Readers of a build in progress hear about new bytes in steps of this size.
PROGRESS_STEP = 256 << 10


class Shared:
    """One piece of work, many waiters: each gets its own Deferred, so a client
    that disconnects (Klein cancels its handler) cancels only its own wait."""

    _PENDING = object()

    def __init__(self, d: Deferred[Any]) -> None:
        self.result: Any = self._PENDING
        self.waiters: list[Deferred[Any]] = []
        d.addBoth(self._done)

    def _done(self, r: Any) -> None:
        self.result = r
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            fire(w, r)

    def wait(self) -> Deferred[Any]:
        out: Deferred[Any] = Deferred()
        if self.result is self._PENDING:
            self.waiters.append(out)
        else:
            fire(out, self.result)
        return out


def fire(d: Deferred[Any], r: Any) -> None:
    if d.called:
        return
    if isinstance(r, Failure):
        d.errback(r)
    else:
        d.callback(r)


def shield(d: Deferred[T]) -> Deferred[T]:
    return Shared(d).wait()


class Flights:
    """At most one build per store key at a time; later callers join it."""

    def __init__(self) -> None:
        self.running: dict[str, Shared] = {}

    def run(self, key: str, fn: Callable[[], Awaitable[T]]) -> Deferred[T]:
        shared = self.running.get(key)
        if shared is None:
            d: Deferred[T] = ensureDeferred(fn())  # type: ignore[arg-type]
            shared = self.running[key] = Shared(d)
            d.addBoth(lambda r: self.running.pop(key, None))
        return shared.wait()


class Waiters:
    """One running operation and the callers waiting for it: each gets its own
    Deferred, so a cancelled caller never cancels the operation."""

    def __init__(self) -> None:
        self.waiters: list[Deferred[Any]] = []

    def join(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiters.append(d)
        return d

    def fire(self, result: Any) -> None:
        for d in self.waiters:
            if d.called:
                continue  # cancelled by its caller
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


class BuildFlight(Flight):
    """A flight fed by a build in a worker thread that writes the spool itself;
    requests tail it exactly as they tail an upstream body."""

    def advance(self, n: int) -> None:
        self.written += n
        self._notify()


class Progress:
    """The build's output (used in the worker thread): bytes go straight to the
    spool; the reactor hears about them every PROGRESS_STEP bytes."""

    def __init__(self, spool: SpoolFile, flight: BuildFlight, reactor: Any) -> None:
        self.spool, self.flight, self.reactor = spool, flight, reactor
        self.pending = 0

    def write(self, data: bytes) -> None:
        self.spool.write(data)
        self.pending += len(data)
        if self.pending >= PROGRESS_STEP:
            self.flush()

    def flush(self) -> None:
        n, self.pending = self.pending, 0
        if n:
            self.reactor.callFromThread(self.flight.advance, n)


def run_build(path: str, build: Callable[[str, Any], Any], out: Progress) -> None:
    build(path, out)
    # Delivered before the thread's result (callFromThread keeps order), so the
    # flight has counted every byte when the build is seen to end.
    out.flush()
