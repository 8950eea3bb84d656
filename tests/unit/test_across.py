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
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost

from sparkcache.config import CachePolicy, RemoteConfig
from sparkcache.fetch import Cache, CacheRequest, Hit, Live
from sparkcache.fetch.across import TailFlight
from sparkcache.fetch.xlock import KeyLocks, paths
from sparkcache.metrics import Metrics
from sparkcache.store import Entry, Store
from sparkcache.store.index import _COLUMNS, prepare_key_filter
from tests.unit.test_produce import BODY, FakeResponse, FakeUpstream, Reader


def _worker(data: str, i: int, clock: task.Clock, check: bool, filtered: bool = False) -> Any:
    store = Store(data, reactor, max_size=1 << 30)
    store.spool_dir = os.path.join(store.spool_dir, f"w{i}")
    pytest_twisted.blockon(Deferred.fromCoroutine(store.start(check=check)))
    os.makedirs(store.spool_dir, exist_ok=True)
    store.index.watch_changes()
    if filtered:
        if check:  # (the first: as the supervisor, then the primary)
            prepare_key_filter(data, True)
        store.index.share_keys()
        pytest_twisted.blockon(store.index.fill_shared_keys())
    up = FakeUpstream()
    cache = Cache(store, up, clock, Metrics(), KeyLocks(data, store.in_io))  # type: ignore[arg-type]
    return SimpleNamespace(store=store, cache=cache, up=up)


@pytest.fixture(params=["lookup", "filtered"])
def pair(tmp_path: Any, request: Any) -> Any:
    """Two workers; "filtered": with the shared key filter, a cold miss takes
    the key's lock on the reactor with no index lookup (Cache._claim_now)."""
    clock = task.Clock()
    clock.advance(1000)
    data = str(tmp_path / "data")
    filtered = request.param == "filtered"
    a, b = _worker(data, 0, clock, True, filtered), _worker(data, 1, clock, False, filtered)
    yield SimpleNamespace(a=a, b=b, clock=clock, data=data, filtered=filtered)
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


def _row(key: str, now: float, expires: float | None = None) -> Entry:
    return Entry(key, "r", "x", 200, "ab" * 32, 3, None, {}, now, expires, None, None, now)


@pytest_twisted.ensureDeferred
async def test_the_lookup_takes_the_lock_and_reads_the_row_again_after_it(pair: Any) -> None:
    """Index.get_or_claim: the lock is tried only when no fresh row was found,
    and a row the other worker wrote before the lock was ours is seen."""
    index, now = pair.a.store.index, pair.clock.seconds()
    tried: list[str] = []

    def claim() -> int:
        tried.append("k1")
        # The other worker commits and lets go just before we take the lock.
        other = pair.b.store.index
        other.db.execute(f"INSERT INTO entries ({_COLUMNS}) VALUES ({','.join('?' * len(_row('k1', now).as_row()))})",
                         _row("k1", now).as_row())
        return 7

    entry, got = await index.get_or_claim("k1", now, claim, lambda got: None)
    assert tried == ["k1"] and got == 7 and entry is not None and entry.digest == "ab" * 32
    tried.clear()
    entry, got = await index.get_or_claim("k1", now, claim, lambda got: None)  # fresh: no lock tried
    assert tried == [] and got is None and entry is not None
    await pair.a.store.index.put(_row("k2", now, expires=now - 1))  # stale: the lock is tried
    entry, got = await index.get_or_claim("k2", now, lambda: None, lambda got: None)
    assert entry is not None and entry.expires == now - 1 and got is None


@pytest_twisted.ensureDeferred
async def test_a_lock_taken_with_the_lookup_is_let_go_when_its_client_is_gone(pair: Any) -> None:
    if pair.filtered:
        pair.a.store.index._keys.add(["r:x"])  # (a key the filter may hold: looked up)
    d = Deferred.fromCoroutine(pair.a.cache.get(creq(REMOTE)))
    d.cancel()  # while the lookup (and the lock) is in the SQLite thread
    with pytest.raises(CancelledError):
        await d
    await pair.a.store.index.get("another key")  # (one SQLite thread: the lookup above is over)
    held = None
    for _ in range(400):
        held = await pair.b.cache.locks.acquire("r:x")
        if held is not None:
            break
        await task.deferLater(reactor, 0.005, lambda: None)
    assert held is not None, "the lock taken with the cancelled lookup was never let go"
    await held.release()
    assert pair.a.up.requests == []


async def _answered_and_stored(pair: Any, got: Deferred[Any]) -> None:
    """a's upstream answers ``got``'s request with BODY, whole; a stores it."""
    response = FakeResponse(length=len(BODY))
    pair.a.up.requests[0].callback((response, "http://up.invalid/x"))
    live = await pumped(got, pair.clock)
    assert isinstance(live, Live)
    await pumped(Deferred.fromCoroutine(_until(lambda: response.protocol is not None)), pair.clock)
    response.send(BODY)
    response.end()
    await pumped(live.flight.wait_done(), pair.clock)


@pytest_twisted.ensureDeferred
async def test_a_miss_takes_the_lock_with_its_lookup_and_the_other_worker_follows(pair: Any) -> None:
    got = Deferred.fromCoroutine(pair.a.cache.get(creq(REMOTE)))
    await pumped(Deferred.fromCoroutine(_asked(pair.a.up)), pair.clock)
    # a asks upstream holding the lock it took with its lookup: b cannot take it.
    assert await pair.b.cache.locks.acquire("r:x") is None
    await _answered_and_stored(pair, got)
    again = await pumped(Deferred.fromCoroutine(pair.b.cache.get(creq(REMOTE))), pair.clock)
    assert isinstance(again, Hit) and pair.b.up.requests == []
    held = await pair.b.cache.locks.acquire("r:x")
    assert held is not None  # released after the commit
    await held.release()


@pytest_twisted.ensureDeferred
async def test_a_cold_miss_the_shared_filter_rules_out_asks_the_index_nothing(pair: Any) -> None:
    """With the shared key filter built, a key no worker stored is claimed on
    the reactor: no SQLite round trip before the upstream request; a key the
    other worker stored since is looked up (and found)."""
    if not pair.filtered:
        assert not pair.a.store.index.surely_absent("r:x")  # (no filter: every miss asks)
        return
    asked: list[str] = []
    for name in ("get", "get_or_claim"):
        real = getattr(pair.a.store.index, name)
        setattr(pair.a.store.index, name, lambda key, *args, _real=real, _name=name: asked.append(_name) or _real(key, *args))
    got = Deferred.fromCoroutine(pair.a.cache.get(creq(REMOTE)))
    assert len(pair.a.up.requests) == 1 and asked == []  # asked upstream at once, the index never
    assert await pair.b.cache.locks.acquire("r:x") is None  # and the key's lock is a's
    await _answered_and_stored(pair, got)
    assert not pair.b.store.index.surely_absent("r:x")  # stored by a: maybe, for b too
    again = await pumped(Deferred.fromCoroutine(pair.b.cache.get(creq(REMOTE))), pair.clock)
    assert isinstance(again, Hit) and pair.b.up.requests == []
