"""Periodic work that nothing can stop but the service tree.

An exception inside a LoopingCall stops it for good (buildbot and
magic-wormhole guard every loop body for that reason); here every tick is
caught and logged, ticks never overlap (one still running makes the next a
no-op), and the clock is injectable so tests drive it with ``task.Clock``.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

log = Logger()


class Periodic(TimerService):
    """Runs ``fn()`` (a coroutine function or one returning a Deferred) every ``interval`` seconds."""

    def __init__(self, name: str, interval: float, fn: Callable[[], Awaitable[Any] | Deferred[Any] | None],
                 clock: Any) -> None:
        super().__init__(interval, self._tick)
        self.setName(name)
        self.clock = clock
        self.fn = fn
        self.running_tick: Deferred[Any] | None = None

    def _tick(self) -> None:
        if self.running_tick is not None:
            return  # the previous run is still going: skip this tick
        try:
            result = self.fn()
        except Exception:
            log.failure("{name} failed; will retry", name=self.name)
            return
        if result is None:
            return
        d: Deferred[Any] = ensureDeferred(result)  # type: ignore[arg-type]
        self.running_tick = d

        def done(_: object) -> None:
            self.running_tick = None

        d.addErrback(lambda f: log.failure("{name} failed; will retry", f, name=self.name))
        d.addBoth(done)
