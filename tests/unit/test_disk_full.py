"""Disk full, in the engine and the store: write errors injected into the
spool, the fsync and the index commit end a fetch cleanly; while the store
cannot write, misses pass through uncached; the free-space floor evicts; a
purge works when SQLite has no room for its log. A real store in a tmp dir,
an upstream in memory, a task.Clock; free space is faked where a test needs
a small filesystem (tests/e2e/test_disk_full.py uses a real one)."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList

from sparkcache.config import CachePolicy, ConfigError, RemoteConfig
from sparkcache.fetch import Cache, CacheRequest, Failed, Live, UpstreamClient
from sparkcache.fetch.flight import BodyError, PassFlight
from sparkcache.metrics import Metrics
from sparkcache.protocols import load_config_data
from sparkcache.store import Entry, SpoolFile, Store, space
from tests.support.memory_upstream import MemoryUpstream

KiB = 1024


@pytest.fixture
def env(tmp_path):
    clock = task.Clock()
    clock.advance(1_000_000)
    up = MemoryUpstream()
    store = Store(str(tmp_path / "data"), reactor, max_size=10**9)
    store.clock = clock
    client = UpstreamClient(clock, agent=up.agent)
    cache = Cache(store, client, clock, Metrics())
    pytest_twisted.blockon(Deferred.fromCoroutine(store.start()))
    remote = RemoteConfig("r", "generic", up.base_url, cache=CachePolicy(0, 60, 30), read_timeout=5)
    yield cache, store, clock, remote, up
    up.clear()
    pytest_twisted.blockon(client.close())
    pytest_twisted.blockon(Deferred.fromCoroutine(store.stop()))


def creq(remote, upstream, path, **kw):
    return CacheRequest(remote=remote, key=f"r:{path}", path=path, url=upstream.url(f"/{path}"), ttl=None, **kw)


@pytest.fixture
def below_floor(monkeypatch):
    """``below(store)``: the store below its floor, as every measurement says
    from now on (a miss passed through measures again: Store.recheck_space)."""
    def below(store: Store) -> None:
        monkeypatch.setattr(space, "measure", lambda path: space.Space(0, 1 << 30))
        store.low_space = True

    return below


@pytest.fixture
def full_after(monkeypatch):
    """``full_after(n)``: spool writes fail with ENOSPC once ``n`` bytes are written."""

    def arm(limit: int) -> None:
        real = SpoolFile.write

        def write(self: SpoolFile, data: bytes) -> None:
            if self.size + len(data) > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(self, data)

        monkeypatch.setattr(SpoolFile, "write", write)

    return arm


def drain(flight: PassFlight) -> bytes:
    """Read a passed-through body as its one client would (all that has arrived)."""
    flight.acquire()
    out = b""
    while flight.written > len(out):
        chunk = flight.read(len(out), flight.written - len(out))
        assert chunk, f"the passed-through body lost its bytes after {len(out)}"
        out += chunk
    return out


async def read_all(flight: PassFlight) -> bytes:
    """Read a passed-through body to its end, as its client's producer would."""
    flight.acquire()
    got = b""
    while True:
        done = flight.finished
        got += flight.read(len(got), flight.written - len(got))
        if done:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    flight.release()
    return got


async def settle(cache: Cache) -> None:
    await DeferredList(cache.running())


# -- write errors end the fetch cleanly -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_spool_write_error_ends_the_fetch_and_the_next_miss_passes_through(env, full_after):
    cache, store, clock, remote, up = env
    body = os.urandom(600 * KiB)
    up.add("/big", body)
    up.behave("/big", chunked=True, pause_at=64 * KiB)  # no length: the disk fills mid-body
    full_after(200 * KiB)
    first = await cache.get(creq(remote, up, "big"))
    joiner = await cache.get(creq(remote, up, "big"))
    assert isinstance(first, Live) and isinstance(joiner, Live) and joiner.flight is first.flight
    waits = [first.flight.wait_done(), joiner.flight.wait_done()]
    up.resume("/big")
    for d in waits:
        with pytest.raises(BodyError, match="No space left"):
            await d
    await settle(cache)
    assert first.flight.error is not None  # every tail reader's producer aborts on this
    assert cache.inflight == 0
    assert os.listdir(store.spool_dir) == []
    assert await store.index.get("r:big") is None
    assert not store.writable and "No space left" in (store.write_error or "")

    # The next miss of the same object neither hangs nor joins anything: it is
    # passed through whole, and nothing is stored.
    up.clear("/big")
    res = await cache.get(creq(remote, up, "big"))
    assert isinstance(res, Live) and isinstance(res.flight, PassFlight) and res.state == "BYPASS"
    got = await read_all(res.flight)
    assert res.flight.error is None and got == body
    await settle(cache)
    assert cache.inflight == 0 and await store.index.get("r:big") is None


@pytest_twisted.ensureDeferred
async def test_fsync_error_at_commit_leaves_nothing_behind(env, monkeypatch):
    cache, store, clock, remote, up = env
    up.add("/f", b"f" * 5000)

    def broken(self: SpoolFile) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(SpoolFile, "sync_and_close", broken)
    res = await cache.get(creq(remote, up, "f"))
    with pytest.raises(BodyError, match="Input/output error"):
        await res.flight.wait_done()
    await settle(cache)
    assert cache.inflight == 0 and os.listdir(store.spool_dir) == []
    assert list(store.cas.iter_digests()) == []
    assert not store.writable
    clock.advance(31)  # the hold after a write error lapses: storing is tried again
    assert store.writable


@pytest_twisted.ensureDeferred
async def test_index_full_at_commit_removes_the_body_it_renamed(env, monkeypatch):
    cache, store, clock, remote, up = env
    up.add("/i", b"i" * 5000)

    def full(entry: Entry, *args: object) -> Deferred[Entry]:
        return Deferred.fromCoroutine(_raise(sqlite3.OperationalError("database or disk is full")))

    monkeypatch.setattr(store.index, "put", full)
    monkeypatch.setattr(store.index, "put_unless", full)  # the insert a purge-aware commit uses
    res = await cache.get(creq(remote, up, "i"))
    with pytest.raises(BodyError, match="disk is full"):
        await res.flight.wait_done()
    await settle(cache)
    assert list(store.cas.iter_digests()) == [], "a body no row names stayed behind"
    assert os.listdir(store.spool_dir) == [] and cache.inflight == 0
    assert not store.writable


async def _raise(e: Exception) -> Entry:
    raise e


# -- passing through -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pass_through_checks_the_digest_before_the_end(env, below_floor):
    cache, store, clock, remote, up = env
    good, bad = b"g" * 3000, b"b" * 3000
    up.add("/ok", good)
    up.add("/bad", bad)
    below_floor(store)
    ok = await cache.get(creq(remote, up, "ok", expected_digest=hashlib.sha256(good).hexdigest()))
    wrong = await cache.get(creq(remote, up, "bad", expected_digest=hashlib.sha256(good).hexdigest()))
    assert isinstance(ok.flight, PassFlight) and isinstance(wrong.flight, PassFlight)
    got_ok, got_bad = drain(ok.flight), drain(wrong.flight)
    await settle(cache)
    assert ok.flight.finished and ok.flight.error is None and got_ok == good
    # The client of a body that does not verify never sees its clean end.
    assert wrong.flight.finished and "digest mismatch" in str(wrong.flight.error)
    ok.flight.release()
    wrong.flight.release()
    assert list(store.cas.iter_digests()) == [] and cache.inflight == 0


@pytest_twisted.ensureDeferred
async def test_pass_through_ends_when_its_client_never_reads_or_only_waits(env, below_floor):
    cache, store, clock, remote, up = env
    up.add("/w", b"w" * 4000)
    up.add("/n", b"n" * 4000)
    below_floor(store)
    waited = await cache.get(creq(remote, up, "w"))
    # A caller that needs a stored entry hears at once that there is none.
    with pytest.raises(BodyError, match="not stored"):
        await waited.flight.wait_done()
    unread = await cache.get(creq(remote, up, "n"))  # a HEAD: nobody ever reads
    assert cache.inflight >= 1
    clock.advance(PassFlight.ATTACH_TIMEOUT + 1)
    await settle(cache)
    assert cache.inflight == 0 and unread.flight.finished


@pytest_twisted.ensureDeferred
async def test_known_length_without_room_passes_through_and_evicts_nothing(env, monkeypatch):
    cache, store, clock, remote, up = env
    fs = FakeFilesystem(store, total=100 * KiB, floor=10 * KiB)
    monkeypatch.setattr(space, "measure", fs.measure)
    up.add("/small", b"s" * 30 * KiB)
    up.add("/huge", b"h" * 200 * KiB)
    res = await cache.get(creq(remote, up, "small"))
    await res.flight.wait_done()
    res = await cache.get(creq(remote, up, "huge"))
    assert isinstance(res.flight, PassFlight), "a body larger than the disk was spooled"
    assert drain(res.flight) == b"h" * 200 * KiB
    await settle(cache)
    assert await store.index.get("r:small") is not None, "room was made for a body that could never fit"


# -- the free-space floor ----------------------------------------------------------


class FakeFilesystem:
    """A filesystem of ``total`` bytes holding the store's bodies plus ``other`` bytes."""

    def __init__(self, store: Store, total: int, floor: int, other: int = 0) -> None:
        self.store, self.total, self.other = store, total, other
        store.min_free = floor

    def used(self) -> int:
        return sum(size for _, size in self.store.cas.iter_digests()) + self.other

    def measure(self, path: str) -> space.Space:
        return space.Space(max(0, self.total - self.used()), self.total)


@pytest_twisted.ensureDeferred
async def test_floor_evicts_lru_before_the_disk_is_full_and_sets_low_space(env, monkeypatch):
    cache, store, clock, remote, up = env
    fs = FakeFilesystem(store, total=100 * KiB, floor=30 * KiB)
    monkeypatch.setattr(space, "measure", fs.measure)
    for n in range(5):
        up.add(f"/o{n}", bytes([n]) * 20 * KiB)
        clock.advance(1)
        res = await cache.get(creq(remote, up, f"o{n}"))
        await res.flight.wait_done()
    # 5 x 20 KiB on 100 KiB with a 30 KiB floor: the oldest made room for the newest.
    assert await store.index.get("r:o0") is None and await store.index.get("r:o4") is not None
    assert fs.total - fs.used() >= 30 * KiB - 20 * KiB
    assert not store.low_space

    fs.other = 90 * KiB  # something else fills the disk
    await store.evict()
    assert store.low_space and not store.writable
    fs.other = 0
    await store.evict()
    assert not store.low_space and store.writable


@pytest_twisted.ensureDeferred
async def test_purge_on_a_full_index_releases_the_reserve_and_retries(env, monkeypatch):
    cache, store, clock, remote, up = env
    up.add("/p", b"p" * 3000)
    res = await cache.get(creq(remote, up, "p"))
    await res.flight.wait_done()
    assert os.path.exists(store.reserve_path)
    real = store.index.delete_all
    calls = []

    def delete_all() -> Deferred:
        calls.append(os.path.exists(store.reserve_path))
        if len(calls) == 1:
            return Deferred.fromCoroutine(_raise(sqlite3.OperationalError("database or disk is full")))
        return real()

    monkeypatch.setattr(store.index, "delete_all", delete_all)
    monkeypatch.setattr(store, "check_space", _no_check)  # keep the reserve released
    assert await store.purge_all() == 1
    assert calls == [True, False], "not retried once the reserve was released"
    assert list(store.cas.iter_digests()) == []


async def _no_check() -> int:
    return 1 << 40


@pytest_twisted.ensureDeferred
async def test_joiner_of_a_pass_through_gets_its_own(env, below_floor):
    cache, store, clock, remote, up = env
    up.add("/j", b"j" * 5000)
    below_floor(store)
    a = await cache.get(creq(remote, up, "j"))
    b = await cache.get(creq(remote, up, "j"))
    assert a.flight is not b.flight
    assert await read_all(a.flight) == await read_all(b.flight) == b"j" * 5000
    await settle(cache)
    assert up.count("/j") == 2 and cache.inflight == 0


# -- config ------------------------------------------------------------------------


def test_min_free_accepts_sizes_and_percentages():
    cfg = load_config_data({"storage": {"min_free": "2GiB"}}, "cache.yaml", {})
    assert cfg.storage.min_free == 2 << 30 and cfg.storage.min_free_percent is None
    cfg = load_config_data({"storage": {"min_free": "5%"}}, "cache.yaml", {})
    assert cfg.storage.min_free is None and cfg.storage.min_free_percent == 5.0
    cfg = load_config_data({}, "cache.yaml", {})
    assert cfg.storage.min_free is None and cfg.storage.min_free_percent is None
    assert space.floor_of(100 << 30, None, None) == 1 << 30  # 5 % is more: 1 GiB
    assert space.floor_of(10 << 30, None, None) == (10 << 30) // 20  # 5 % is less
    for bad in ("lots%", "150%", "lots", -1):
        with pytest.raises(ConfigError) as e:
            load_config_data({"storage": {"min_free": bad}}, "cache.yaml", {})
        assert "storage.min_free" in str(e.value) and "cache.yaml" in str(e.value)


def test_write_errors_are_told_from_bad_bodies():
    assert space.is_write_error(OSError(errno.ENOSPC, "full"))
    assert space.is_write_error(OSError(errno.EDQUOT, "quota"))
    assert space.is_write_error(sqlite3.OperationalError("database or disk is full"))
    assert not space.is_write_error(OSError(errno.ENOENT, "gone"))
    assert not space.is_write_error(BodyError("digest mismatch"))
    wrapped = BodyError("storing failed")
    wrapped.__cause__ = OSError(errno.EIO, "io")
    assert space.is_write_error(wrapped)
    assert isinstance(Failed(503, "x"), Failed)


@pytest_twisted.ensureDeferred
async def test_a_miss_measures_the_free_space_again_only_near_the_floor(env, monkeypatch):
    """Store.roomy: the last measurement (each spool file made brings one)
    decides, so a miss far above the floor stores without a thread round trip
    to measure; one that brings the store near the floor is measured (and
    evicted for) again, from the next miss on."""
    from sparkcache.store import ROOM_SPARE

    cache, store, clock, remote, up = env
    fs = FakeFilesystem(store, total=100 << 30, floor=1 << 30)
    monkeypatch.setattr(space, "measure", fs.measure)
    await store.check_space()
    checks = []
    real = store.check_space

    async def counting() -> int:
        checks.append(1)
        return await real()

    monkeypatch.setattr(store, "check_space", counting)

    async def miss(name: str) -> None:
        up.add(f"/{name}", name.encode() * 1000)
        res = await cache.get(creq(remote, up, name))
        await res.flight.wait_done()

    for n in range(3):
        await miss(f"far{n}")
    assert checks == []  # room to spare: no new measurement first
    fs.other = fs.total - (1 << 30) - ROOM_SPARE // 2  # something else fills the disk
    await miss("stale")  # (decided on the measurement its predecessor brought)
    assert checks == []
    await miss("near")
    assert checks and await store.index.get("r:near") is not None


@pytest_twisted.ensureDeferred
async def test_a_miss_passed_through_below_the_floor_measures_again(env, monkeypatch):
    """Space given back after the last measurement (a failed download's spool
    closed late, files deleted by something else) makes the store writable
    at the next miss, not at the next eviction tick; at most one measurement
    per RECHECK_INTERVAL."""
    from sparkcache.store import RECHECK_INTERVAL

    cache, store, clock, remote, up = env
    fs = FakeFilesystem(store, total=100 * KiB, floor=30 * KiB, other=90 * KiB)
    monkeypatch.setattr(space, "measure", fs.measure)
    await store.check_space()
    assert store.low_space and not store.writable
    fs.other = 0  # the space comes back, unmeasured
    measured = []
    real = store.check_space

    async def counting() -> int:
        measured.append(1)
        return await real()

    monkeypatch.setattr(store, "check_space", counting)
    up.add("/b", b"b" * 3000)
    res = await cache.get(creq(remote, up, "b"))
    assert res.state == "BYPASS" and await read_all(res.flight) == b"b" * 3000
    for _ in range(100):
        if not store.low_space:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert measured == [1] and not store.low_space and store.writable
    store.low_space = True
    store.recheck_space()  # (within RECHECK_INTERVAL of the last: not again)
    assert measured == [1]
    clock.advance(RECHECK_INTERVAL)
    store.recheck_space()
    await settle(cache)
    assert len(measured) == 2
