"""Threads kept for reuse by the work a body brings: its siphon (fetch/siphon.py),
its write and hash lanes (fetch/flight.py), the close of its last descriptor.

``threading.Thread.start`` waits until the new thread runs: on a busy 2-core
machine that held the reactor 0.3-0.6 ms per cold miss (measured with
cProfile on a running daemon), on the way to the first byte. A thread that
finished its job waits ``IDLE`` seconds for another, so a steady stream of
misses starts none; ``run`` only starts one when none is waiting. Unlike a
thread pool, the crew has no size: each job is a body that streams for as long
as it streams (the callers bound how many run: siphon.MAX_RUNNING).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from twisted.logger import Logger

log = Logger()

IDLE = 60.0  # seconds a finished thread waits for another job before it ends


class Crew:
    def __init__(self, name: str, idle: float = IDLE) -> None:
        self.name = name
        self.idle_timeout = idle
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job, not yet promised one

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in a thread of the crew's (any thread may call this)."""
        with self._lock:
            # (Put under the lock: a waiting thread that times out checks the
            # queue under it too, so a promised job is never left unrun.)
            self._jobs.put((fn, args))
            if self._idle > 0:
                self._idle -= 1
                return
        threading.Thread(target=self._work, name=self.name, daemon=True).start()

    @property
    def waiting(self) -> int:
        """Threads waiting for a job."""
        return self._idle

    def _work(self) -> None:
        while True:
            try:
                fn, args = self._jobs.get(timeout=self.idle_timeout)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._idle -= 1  # (counted when it last finished a job)
                        return
                continue  # (a job was put as the wait ended: it is this thread's)
            try:
                fn(*args)
            except BaseException:
                log.failure("in a {name} thread", name=self.name)
            with self._lock:
                self._idle += 1


# One for the whole process: the jobs are a body's, whichever flight it is.
streams = Crew("sparkcache-stream")
