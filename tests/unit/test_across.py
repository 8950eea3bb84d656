"""The engine's cross-process singleflight (fetch/across.py): two Caches over
one data directory stand for two workers (their lock files are separate open
files, so flock keeps them apart as it keeps processes apart). The second
never asks upstream while the first produces: its clients tail the first's
spool to the commit, or are cut off when the first's body breaks off."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost

from sparkcache.config import CachePolicy, RemoteConfig
from sparkcache.fetch import Cache, CacheRequest, Hit, Live
from sparkcache.fetch.across import TailFlight
from sparkcache.fetch.xlock import KeyLocks, paths
from sparkcache.metrics import Metrics
from sparkcache.store import Store
from tests.unit.test_produce import BODY, FakeResponse, FakeUpstream, Reader


def _worker(data: str, i: int, clock: task.Clock, check: bool) -> Any:
    store = Store(data, reactor, max_size=1 << 30)
    store.spool_dir = os.path.join(store.spool_dir, f"w{i}")
    pytest_twisted.blockon(Deferred.fromCoroutine(store.start(check=check)))
    os.makedirs(store.spool_dir, exist_ok=True)
    store.index.watch_changes()
    up = FakeUpstream()
    cache = Cache(store, up, clock, Metrics(), KeyLocks(data, store.in_io))  # type: ignore[arg-type]
    return SimpleNamespace(store=store, cache=cache, up=up)


@pytest.fixture
def pair(tmp_path: Any) -> Any:
    clock = task.Clock()
    clock.advance(1000)
    data = str(tmp_path / "data")
    a, b = _worker(data, 0, clock, True), _worker(data, 1, clock, False)
    yield SimpleNamespace(a=a, b=b, clock=clock, data=data)
    for w in (a, b):
        pytest_twisted.blockon(Deferred.fromCoroutine(w.store.stop()))


def creq(remote: RemoteConfig) -> CacheRequest:
    return CacheRequest(remote=remote, key="r:x", path="x", url="http://up.invalid/x", ttl=None)


REMOTE = RemoteConfig("r", "generic", "http://up.invalid", cache=CachePolicy(0, 60, 30), read_timeout=5)


async def pumped(d: Deferred[Any], clock: task.Clock) -> Any:
    """Wait for ``d``, moving the fake clock on (the follower polls on it)."""
    for _ in range(2000):
        if d.called:
            return await d
        clock.advance(0.05)
        await task.deferLater(reactor, 0.005, lambda: None)
    raise AssertionError("never fired")


async def _two_clients(pair: Any) -> tuple[FakeResponse, Reader, Deferred[None], Reader, Deferred[None]]:
    """Worker a fetches (half the body sent), worker b's client tails it."""
    got = Deferred.fromCoroutine(pair.a.cache.get(creq(REMOTE)))
    await pumped(Deferred.fromCoroutine(_asked(pair.a.up)), pair.clock)
    response = FakeResponse(length=len(BODY))
    pair.a.up.requests[0].callback((response, "http://up.invalid/x"))
    live_a = await pumped(got, pair.clock)
    assert isinstance(live_a, Live)
    await pumped(Deferred.fromCoroutine(_until(lambda: response.protocol is not None)), pair.clock)
    response.send(BODY[: len(BODY) // 2])
    await pumped(Deferred.fromCoroutine(_until(lambda: os.path.exists(paths(os.path.join(pair.data, "locks"), "r:x")[1]))),
                 pair.clock)
    live_b = await pumped(Deferred.fromCoroutine(pair.b.cache.get(creq(REMOTE))), pair.clock)
    assert isinstance(live_b, Live) and isinstance(live_b.flight, TailFlight)
    assert pair.b.up.requests == []  # b asked nobody
    # b follows: that is no fetch of its own (/health, the in-flight gauge).
    assert pair.a.cache.inflight == 1 and pair.b.cache.inflight == 0
    assert pair.a.cache.metrics.inflight._value.get() == 1 and pair.b.cache.metrics.inflight._value.get() == 0
    pair.followed = live_b.flight
    ra, rb = Reader(), Reader()
    return response, ra, ra.tail(live_a.flight), rb, rb.tail(live_b.flight)


async def _asked(up: FakeUpstream) -> None:
    await _until(lambda: len(up.requests) >= 1)


async def _until(cond: Any) -> None:
    while not cond():
        await task.deferLater(reactor, 0.005, lambda: None)


@pytest_twisted.ensureDeferred
async def test_the_other_worker_tails_the_owner_to_its_commit(pair: Any) -> None:
    response, ra, da, rb, db = await _two_clients(pair)
    response.send(BODY[len(BODY) // 2:])
    response.end()
    await pumped(da, pair.clock)
    await pumped(db, pair.clock)
    assert ra.served_whole(BODY) and rb.served_whole(BODY)
    assert pair.b.up.requests == []
    again = await pumped(Deferred.fromCoroutine(pair.b.cache.get(creq(REMOTE))), pair.clock)
    assert isinstance(again, Hit) and again.entry.size == len(BODY)
    # The owner let go: no marker left, the lock free.
    assert not os.path.exists(paths(os.path.join(pair.data, "locks"), "r:x")[1])


@pytest_twisted.ensureDeferred
async def test_the_other_workers_clients_are_cut_off_when_the_owner_breaks_off(pair: Any) -> None:
    response, ra, da, rb, db = await _two_clients(pair)
    response.end(ConnectionLost())
    await pumped(da, pair.clock)
    await pumped(db, pair.clock)
    assert ra.cut_off() and rb.cut_off()
    assert "failed: upstream body ended early" in str(pair.followed.error)  # the owner's reason, from its marker
    assert await pair.b.store.index.get("r:x") is None
    # The key is free again: whoever asks next owns it.
    held = await pumped(pair.b.cache.locks.acquire("r:x"), pair.clock)
    assert held is not None
    await held.release()
