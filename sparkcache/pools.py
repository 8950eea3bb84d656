"""Thread pools as services: each kind of blocking work (SQLite, file I/O,
sendfile, pygit2, uploads) gets a pool of its own, started and stopped by the
service tree (as tahoe's ``cputhreadpool`` and synapse's media pool are), so
one kind can never starve another and the default pool stays free for DNS.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


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

    def __init__(self, name: str, threads: int, reactor: Any = None, stop_timeout: float = 30.0,
                 min_threads: int = 0) -> None:
        self.pool = DaemonThreadPool(minthreads=min_threads, maxthreads=threads, name=name)
        self.reactor = reactor
        self.stop_timeout = stop_timeout
        self.setName(name)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``fn(*args)`` in this pool; the result comes back on the reactor."""
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    def stopService(self) -> Deferred[bool]:
        super().stopService()
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        return stop_pool(self.pool, self.reactor, self.stop_timeout)
