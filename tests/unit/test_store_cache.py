"""Store and cache units: a real store in a tmp dir, an upstream in memory
(tests/support/memory_upstream.py), and a task.Clock for every TTL and timeout,
so freshness is driven, never waited for."""

from __future__ import annotations

import hashlib
import os

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, Deferred, DeferredList

from sparkcache.config import CachePolicy, RemoteConfig
from sparkcache.fetch import Cache, CacheRequest, Failed, Hit, Live, UpstreamClient
from sparkcache.metrics import Metrics
from sparkcache.store import Entry, Store
from tests.support.memory_upstream import MemoryUpstream

CONTENT_TYPE = "application/x-test"


@pytest.fixture
def env(tmp_path):
    clock = task.Clock()
    clock.advance(1_000_000)
    up = MemoryUpstream()
    store = Store(str(tmp_path / "data"), reactor, max_size=10_000)
    client = UpstreamClient(clock, agent=up.agent)
    cache = Cache(store, client, clock, Metrics())
    pytest_twisted.blockon(Deferred.fromCoroutine(store.start()))
    remote = RemoteConfig("r", "generic", up.base_url, cache=CachePolicy(0, 60, 30), read_timeout=5)
    yield cache, store, clock, remote, up
    up.clear()  # nothing held upstream may outlive the test
    pytest_twisted.blockon(client.close())
    pytest_twisted.blockon(Deferred.fromCoroutine(store.stop()))


def creq(remote, upstream, path, ttl=None, **kw):
    return CacheRequest(remote=remote, key=f"r:{path}", path=path, url=upstream.url(f"/{path}"), ttl=ttl, **kw)


async def fetch_all(cache, req):
    res = await cache.get(req)
    if isinstance(res, Live):
        flight = await res.flight.wait_done()
        return res, flight.entry
    return res, getattr(res, "entry", None)


@pytest_twisted.ensureDeferred
async def test_miss_then_hit_and_dedup(env):
    cache, store, clock, remote, up = env
    up.add("/a", b"x" * 1000, CONTENT_TYPE)
    up.add("/b", b"x" * 1000, CONTENT_TYPE)
    res, entry = await fetch_all(cache, creq(remote, up, "a"))
    assert isinstance(res, Live) and entry.size == 1000
    assert entry.digest == hashlib.sha256(b"x" * 1000).hexdigest()
    assert entry.content_type == CONTENT_TYPE
    res2 = await cache.get(creq(remote, up, "a"))
    assert isinstance(res2, Hit) and res2.state == "HIT"
    await fetch_all(cache, creq(remote, up, "b"))
    files = [f for _, _, fs in os.walk(os.path.join(store.data_dir, "cas")) for f in fs]
    assert files == [entry.digest]  # one body for two keys
    assert up.total() == 2
    assert os.listdir(store.spool_dir) == []


@pytest_twisted.ensureDeferred
async def test_singleflight(env):
    cache, store, clock, remote, up = env
    up.add("/s", b"y" * 5000)
    results = [cache.get(creq(remote, up, "s")) for _ in range(10)]
    outs = [await Deferred.fromCoroutine(r) for r in results]
    assert all(isinstance(o, Live) for o in outs)
    assert len({id(o.flight) for o in outs}) == 1
    await outs[0].flight.wait_done()
    assert up.total() == 1


@pytest_twisted.ensureDeferred
async def test_truncated_body_never_committed(env):
    cache, store, clock, remote, up = env
    up.add("/t", b"z" * 4000)
    up.behave("/t", truncate_at=1000)
    res = await cache.get(creq(remote, up, "t"))
    assert isinstance(res, Live)
    with pytest.raises(Exception):
        await res.flight.wait_done()
    await DeferredList(cache.running())  # the spool goes once no write is pending
    assert await store.index.get("r:t") is None
    assert os.listdir(store.spool_dir) == []
    up.clear("/t")
    res, entry = await fetch_all(cache, creq(remote, up, "t"))
    assert isinstance(res, Live) and entry.size == 4000


@pytest_twisted.ensureDeferred
async def test_digest_mismatch_not_committed(env):
    cache, store, clock, remote, up = env
    up.add("/d", b"data")
    res = await cache.get(creq(remote, up, "d", expected_digest="0" * 64))
    with pytest.raises(Exception, match="digest mismatch"):
        await res.flight.wait_done()
    assert await store.index.get("r:d") is None


@pytest_twisted.ensureDeferred
async def test_revalidate_304_stale_on_503_and_404_evicts(env):
    cache, store, clock, remote, up = env
    up.add("/m", b"meta-v1")
    req = creq(remote, up, "m", ttl=60, revalidate=True)
    await fetch_all(cache, req)
    clock.advance(61)
    res = await cache.get(req)
    assert isinstance(res, Hit) and res.state == "REVALIDATED"
    assert up.requests_for("/m")[-1].header("If-None-Match")
    assert (await cache.get(req)).state == "HIT"
    clock.advance(61)
    up.behave("/m", status=503)
    res = await cache.get(req)
    assert isinstance(res, Hit) and res.state == "STALE"
    up.behave("/m", status=404)
    res = await cache.get(req)
    assert isinstance(res, Failed) and res.status == 404
    assert (await store.index.get("r:m")).status == 404  # negative entry replaced it
    n = up.total()
    assert isinstance(await cache.get(req), Failed) and up.total() == n  # negatively cached
    clock.advance(31)
    up.clear("/m")
    res, entry = await fetch_all(cache, req)
    assert isinstance(res, Live) and entry.size == 7


@pytest_twisted.ensureDeferred
async def test_unreachable_is_stale_or_502(env):
    cache, store, clock, remote, up = env
    up.add("/u", b"u")
    await fetch_all(cache, creq(remote, up, "u", ttl=10))
    clock.advance(11)
    # The connection resets before any answer: as unreachable as a refused connect.
    up.behave("/u", reset=True)
    up.behave("/other", reset=True)
    res = await cache.get(creq(remote, up, "u", ttl=10))
    assert isinstance(res, Hit) and res.state == "STALE"
    res = await cache.get(creq(remote, up, "other", ttl=10))
    assert isinstance(res, Failed) and res.status == 502


@pytest_twisted.ensureDeferred
async def test_eviction_lru_skips_pinned(env):
    cache, store, clock, remote, up = env
    for i in range(5):
        up.add(f"/e{i}", bytes([i]) * 3000)
    for i in range(5):
        clock.advance(1)
        await fetch_all(cache, creq(remote, up, f"e{i}"))
    e0 = await store.index.get("r:e0")
    sending = store.open_range(e0)  # being served: must survive
    store.index.touch(await store.index.get("r:e1"), clock.seconds() + 10)  # recently used
    assert store.size == 15000
    evicted = await store.evict()  # down to 95% of max_size: 2 bodies are enough
    assert evicted == 2
    left = {e.path for e in await store.index.list_remote("r")}
    assert left == {"e0", "e1", "e4"}  # e2, e3 were least recently used and not pinned
    assert store.size == 9000
    assert store.exists(e0)
    sending.close()


@pytest_twisted.ensureDeferred
async def test_startup_reconcile(tmp_path):
    store = Store(str(tmp_path / "d"), reactor, max_size=10**9)
    await store.start()
    spool = store.new_spool()
    spool.write(b"hello")
    e = Entry("r:x", "r", "x", 200, spool.hexdigest(), 5, None, {}, 1.0, None, None, None, 1.0)
    await store.commit(spool, e)
    spool2 = store.new_spool()
    spool2.write(b"orphan")
    await store.in_io(spool2.sync_and_close)
    store.cas.commit(spool2.path, spool2.hexdigest())  # body without a row
    leftover = store.new_spool()
    leftover.write(b"partial")  # a download interrupted by a crash
    await store.index.put(Entry("r:gone", "r", "gone", 200, "f" * 64, 3, None, {}, 1.0, None, None, None, 1.0))
    await store.index.stop()
    store.io_pool.stop()

    again = Store(str(tmp_path / "d"), reactor, max_size=10**9)
    await again.start()
    try:
        assert os.listdir(again.spool_dir) == []
        assert await again.index.get("r:gone") is None
        assert (await again.index.get("r:x")).size == 5
        assert not again.cas.contains(spool2.hexdigest())
        assert again.size == 5
    finally:
        await again.stop()


@pytest_twisted.ensureDeferred
async def test_expiry_drops_negative_entries_and_long_stale_bodies(env):
    cache, store, clock, remote, up = env
    up.add("/k", b"k")
    await fetch_all(cache, creq(remote, up, "k", ttl=10))
    assert isinstance(await cache.get(creq(remote, up, "missing")), Failed)  # negative, 30 s
    clock.advance(31)
    assert await store.expire(clock.seconds(), retention=100) == 1  # the negative entry
    assert await store.index.get("r:k") is not None  # stale, kept for stale-on-error
    clock.advance(100)
    assert await store.expire(clock.seconds(), retention=100) == 1
    assert await store.index.get("r:k") is None
    assert store.cas.iter_digests is not None and list(store.cas.iter_digests()) == []


async def _spool_files(store, n):
    """The files made ahead once there are ``n`` (the I/O pool's thread makes them)."""
    for _ in range(500):
        if os.path.isdir(store.spool_dir) and len(os.listdir(store.spool_dir)) == n:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    return sorted(os.listdir(store.spool_dir))


@pytest.mark.spare_spools
@pytest_twisted.ensureDeferred
async def test_spool_files_are_made_ahead_and_a_miss_takes_one(env, monkeypatch):
    """A miss's spool file was made ahead, in the I/O pool (Store.spool): the
    body goes into one, made before anything was asked, and another is made;
    a miss that stores nothing (a 404, an unreachable upstream) takes none."""
    from sparkcache.store import SPARE_SPOOLS

    cache, store, clock, remote, up = env
    spare = await _spool_files(store, SPARE_SPOOLS)
    assert len(spare) == SPARE_SPOOLS
    monkeypatch.setattr(store, "new_spool", lambda *a, **k: pytest.fail("a spool made on the way to the first byte"))
    up.add("/slow", b"s" * 5000)
    up.behave("/slow", stall=True)
    fetch = Deferred.fromCoroutine(fetch_all(cache, creq(remote, up, "slow")))
    await up.until_paused("/slow")
    assert await _spool_files(store, SPARE_SPOOLS) == spare  # (taken once upstream answered)
    up.resume("/slow")
    res, entry = await fetch
    assert isinstance(res, Live) and entry.size == 5000
    after = await _spool_files(store, SPARE_SPOOLS)
    assert len(after) == SPARE_SPOOLS and len(set(after) & set(spare)) == SPARE_SPOOLS - 1
    up.behave("/gone", status=404)
    up.behave("/down", reset=True)
    assert (await cache.get(creq(remote, up, "gone"))).status == 404
    assert (await cache.get(creq(remote, up, "down"))).status == 502
    assert await _spool_files(store, SPARE_SPOOLS) == after  # (and nothing left over)


@pytest.mark.spare_spools
@pytest_twisted.ensureDeferred
async def test_misses_with_no_spool_made_yet_wait_for_one_each(tmp_path):
    """A burst of misses beyond the spare spools: each waits for a file of
    its own (made in the I/O pool, never on the reactor); a waiter that goes
    away takes none; a stopping store fails the rest."""
    from sparkcache.store import SPARE_SPOOLS

    store = Store(str(tmp_path / "data"), reactor, max_size=10_000)
    await store.start()
    await _spool_files(store, SPARE_SPOOLS)
    spools = [store.spool() for _ in range(SPARE_SPOOLS + 3)]
    gone = spools.pop()
    gone.cancel()
    with pytest.raises(CancelledError):
        await gone
    got = [await d for d in spools]
    assert len({s.path for s in got}) == len(got) and all(os.path.exists(s.path) for s in got)
    for s in got:
        store.discard(s)
    await _spool_files(store, SPARE_SPOOLS)
    waiting = [store.spool() for _ in range(SPARE_SPOOLS + 1)]
    await store.stop()
    outcomes = []
    for d in waiting:
        try:
            store.discard(await d)
            outcomes.append("a spool")
        except OSError:
            outcomes.append("stopped")
    assert outcomes[-1] == "stopped" and os.listdir(store.spool_dir) == []
    with pytest.raises(OSError):  # (a miss reaching a stopped store fails, never hangs)
        await store.spool()


@pytest_twisted.ensureDeferred
async def test_start_now_fetches_a_surely_absent_key_and_the_get_that_follows_joins_it(env, monkeypatch):
    cache, store, clock, remote, up = env
    up.add("/a", b"x" * 1000, CONTENT_TYPE)
    up.add("/b", b"y" * 1000, CONTENT_TYPE)
    req = creq(remote, up, "a")
    assert not cache.start_now(req)  # (no key filter yet: only the index can tell)
    await store.index.filter_keys()
    assert cache.start_now(req)
    assert cache.fetching(req.key)
    assert not cache.start_now(req)  # (one production per key)
    res, entry = await fetch_all(cache, req)
    assert isinstance(res, Live) and entry.size == 1000
    assert up.count("/a") == 1
    # Stored: the key may have a row now, which only the index can tell.
    assert not cache.start_now(req)
    res, _ = await fetch_all(cache, req)
    assert isinstance(res, Hit) and up.count("/a") == 1
    # A store that should not write now: the get passes the body through, for its caller only.
    monkeypatch.setattr(Store, "writable", property(lambda self: False))
    b = creq(remote, up, "b")
    assert not cache.start_now(b) and not cache.fetching(b.key)
    assert up.total() == 1
