"""Work done once for many callers: the one singleflight helper.

An upstream fetch, a pack computation, an archive build, a mirror refresh and
a registry token request all run at most once per key at a time, however many
requests want them. Klein cancels a handler when its client disconnects, so
each caller waits on a Deferred of its own: cancelling it ends that caller's
wait and nothing else. The work has its own lifetime.
"""

from __future__ import annotations

from typing import Any, Callable, Coroutine, Generic, Hashable, Iterable, TypeVar, Union

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
Work = Union[Deferred[T], Coroutine[Any, Any, T]]

_PENDING: Any = object()


class Shared(Generic[T]):
    """The outcome of one piece of work, awaited by many, each on its own Deferred."""

    def __init__(self) -> None:
        self._outcome: Any = _PENDING
        self._waiters: list[Deferred[T]] = []

    @property
    def settled(self) -> bool:
        return self._outcome is not _PENDING

    def wait(self) -> Deferred[T]:
        """A Deferred of the caller's own: cancelling it cancels nothing shared."""
        if self._outcome is not _PENDING:
            return fail(self._outcome) if isinstance(self._outcome, Failure) else succeed(self._outcome)
        d: Deferred[T] = Deferred(self._forget)
        self._waiters.append(d)
        return d

    def _forget(self, d: Deferred[T]) -> None:
        if d in self._waiters:
            self._waiters.remove(d)

    def settle(self, outcome: T | Failure) -> None:
        """Give every waiter (and every later one) ``outcome``; only the first call counts."""
        if self._outcome is not _PENDING:
            return
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)


def shield(d: Deferred[T]) -> Deferred[T]:
    """A Deferred that follows ``d`` but whose cancellation leaves ``d`` running."""
    shared: Shared[T] = Shared()
    d.addBoth(shared.settle)
    return shared.wait()


def watch_ends(running: Iterable[Deferred[Any]]) -> list[Deferred[None]]:
    """A new Deferred per running one, firing (with None) when it ends: waiting
    on these (graceful stop) neither consumes nor cancels the work itself."""
    out: list[Deferred[None]] = []
    for d in running:
        w: Deferred[None] = Deferred()

        def fire(r: object, w: Deferred[None] = w) -> object:
            if not w.called:  # (a watcher may have been cancelled: a stop deadline passed)
                w.callback(None)
            return r

        d.addBoth(fire)
        out.append(w)
    return out


class Singleflight(Generic[K, T]):
    """At most one piece of work per key at a time; later callers join it.

    ``run(key, fn)`` is the whole story for work whose outcome is its result.
    Work that has an outcome long before it ends (a download whose readers tail
    it while it goes on) uses ``start`` and settles the outcome itself; the key
    stays taken until the work calls ``leave`` or ends, so it leaves before
    announcing its end and nobody joins a finished piece of work.
    """

    def __init__(self) -> None:
        self._shared: dict[K, Shared[T]] = {}
        self._running: set[Deferred[Any]] = set()

    def __contains__(self, key: object) -> bool:
        return key in self._shared

    def __len__(self) -> int:
        return len(self._shared)

    def get(self, key: K) -> Shared[T] | None:
        return self._shared.get(key)

    def run(self, key: K, fn: Callable[[], Work[T]]) -> Deferred[T]:
        """Wait for the work running under ``key``, or start ``fn()`` there."""
        shared = self._shared.get(key)
        if shared is None:
            shared = self.start(key, lambda _: fn())
        return shared.wait()

    def start(self, key: K, work: Callable[[Shared[T]], Work[T]]) -> Shared[T]:
        """Start ``work(shared)`` under ``key`` (which must be free). Its result
        settles the outcome when nothing settled it before."""
        assert key not in self._shared, f"already running: {key!r}"
        shared: Shared[T] = Shared()
        self._shared[key] = shared
        try:
            d: Deferred[T] = ensureDeferred(work(shared))
        except Exception:  # raised before it could return a Deferred
            d = fail()
        self._running.add(d)

        def end(result: T | Failure) -> None:
            self._running.discard(d)
            self.leave(key, shared)
            if not shared.settled:
                shared.settle(result)
            elif isinstance(result, Failure) and not result.check(CancelledError):
                log.failure("shared work for {key} failed after it settled", result, key=key)

        d.addBoth(end)
        return shared

    def leave(self, key: K, shared: Shared[T]) -> None:
        """Free ``key`` for new work (if ``shared`` still holds it)."""
        if self._shared.get(key) is shared:
            del self._shared[key]

    def ends(self) -> list[Deferred[None]]:
        """Deferreds that fire when the work running now ends (for a graceful stop)."""
        return watch_ends(self._running)

    def cancel(self) -> None:
        """Cancel all running work (the daemon is stopping)."""
        for d in list(self._running):
            d.cancel()
