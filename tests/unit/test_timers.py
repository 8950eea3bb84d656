"""The one periodic-timer helper: a tick's error never stops it, ticks never overlap."""

from twisted.internet import task
from twisted.internet.defer import Deferred

from sparkcache.timers import Periodic


def test_periodic_survives_errors():
    clock = task.Clock()
    calls = []

    async def boom():
        calls.append(1)
        raise RuntimeError("kaboom")

    p = Periodic("t", 10, boom, clock)
    p.startService()
    clock.advance(10)
    clock.advance(10)
    p.stopService()
    assert len(calls) == 3


def test_timer_survives_errors_and_skips_overlapping_ticks() -> None:
    clock = task.Clock()
    runs: list[Deferred[None]] = []

    async def body() -> None:
        d: Deferred[None] = Deferred()
        runs.append(d)
        await d

    t = Periodic("t", 30.0, body, clock)
    t.startService()
    assert len(runs) == 1  # runs at start
    clock.advance(30)
    assert len(runs) == 1  # still running: the tick is skipped
    runs[0].errback(RuntimeError("boom"))
    clock.advance(30)
    assert len(runs) == 2  # the error did not stop the timer
    runs[1].callback(None)
    clock.advance(30)
    assert len(runs) == 3
    runs[2].callback(None)
    t.stopService()


def test_periodic_survives_a_synchronous_error():
    clock = task.Clock()
    calls = []

    def boom():
        calls.append(1)
        raise RuntimeError("kaboom")

    p = Periodic("t", 10, boom, clock)
    p.startService()
    clock.advance(10)
    p.stopService()
    assert len(calls) == 2
