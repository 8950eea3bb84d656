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
        # (Not a SimpleQueue: on CPython 3.11 its get(timeout) can wait for
        # good once another thread took the item that woke it, and an idle
        # thread then never ends. Queue's timed wait is a Condition's.)
        self._jobs: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job, not yet promised one

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in a thread of the crew's (any thread may call this)."""
        with self._lock:
            # (Put under the lock: a waiting thread that times out checks the
            # queue under it too, so a job put for it is never left unrun.)
            if self._idle > 0:
                self._idle -= 1
                self._jobs.put((fn, args))
                return
        # A new thread is handed its first job, not sent it through the queue,
        # where a waiting thread could take it and leave the new one waiting
        # uncounted (it then ended counted out: ``waiting`` drifted below zero).
        threading.Thread(target=self._work, args=((fn, args),), name=self.name, daemon=True).start()

    @property
    def waiting(self) -> int:
        """Threads waiting for a job, less the jobs put for them not yet taken."""
        return self._idle

    def _work(self, job: tuple[Callable[..., Any], tuple[Any, ...]]) -> None:
        while True:
            fn, args = job
            try:
                fn(*args)
            except BaseException:
                log.failure("in a {name} thread", name=self.name)
            with self._lock:
                self._idle += 1
            while True:
                try:
                    job = self._jobs.get(timeout=self.idle_timeout)
                    break
                except queue.Empty:
                    with self._lock:
                        if self._jobs.empty():
                            self._idle -= 1
                            return
                    # (a job was put as the wait ended: one of the waiting threads takes it)


# One for the whole process: the jobs are a body's, whichever flight it is.
streams = Crew("sparkcache-stream")
