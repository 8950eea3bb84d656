"""Work done once for many requests: shared builds, build flights, a thread pool service.

Klein cancels a handler when its client disconnects; everything here makes sure
that cancellation stops only that client's wait, never the work others share.
"""

from __future__ import annotations

import threading
from typing import Any, Awaitable, Callable, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

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


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    t = threading.Thread(*args, **kwargs)
    t.daemon = True
    return t


class DaemonThreadPool(ThreadPool):
    """A ThreadPool of daemon threads: a worker stuck in a libgit2 call on a
    silent upstream (up to its I/O timeout) or in a long build must not keep a
    stopping daemon alive past its shutdown deadline."""

    threadFactory = staticmethod(_daemon_thread)  # type: ignore[assignment]


def stop_pool(pool: ThreadPool, reactor: Any, timeout: float) -> Deferred[bool]:
    """Stop ``pool`` without blocking the reactor (ThreadPool.stop joins every
    worker): the join runs in a helper thread. Fires True once the workers are
    gone, or False after ``timeout`` seconds; daemon stragglers then end with the
    process."""
    d: Deferred[bool] = Deferred()

    def finish(result: bool) -> None:
        if not d.called:
            d.callback(result)

    def join() -> None:
        pool.stop()
        reactor.callFromThread(finish, True)

    if not pool.started and not pool.threads:
        pool.joined = True
        return succeed(True)
    threading.Thread(target=join, name=f"{pool.name}-stop", daemon=True).start()
    timer = reactor.callLater(max(0.0, timeout), finish, False)

    def cancel_timer(result: bool) -> bool:
        if timer.active():
            timer.cancel()
        return result

    return d.addCallback(cancel_timer)


class PoolService(Service):
    """A thread pool started and stopped with the service tree; stopping waits at
    most ``stop_timeout`` seconds for running jobs."""

    def __init__(self, name: str, threads: int, reactor: Any = None, stop_timeout: float = 30.0) -> None:
        self.pool = DaemonThreadPool(minthreads=0, maxthreads=threads, name=name)
        self.reactor = reactor
        self.stop_timeout = stop_timeout
        self.setName(name)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> Deferred[bool]:
        super().stopService()
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        return stop_pool(self.pool, self.reactor, self.stop_timeout)
