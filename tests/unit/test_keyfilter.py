"""The index's key filter (store/keyfilter.py): a key with a row is never
"surely absent", however and whenever its row was written; a cold miss with
the filter built asks the index nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred

from sparkcache.config import CachePolicy, RemoteConfig
from sparkcache.fetch import Cache, CacheRequest, Hit, Live, UpstreamClient
from sparkcache.metrics import Metrics
from sparkcache.store import Store, index as index_module, keyfilter
from sparkcache.store.index import Entry, Index
from sparkcache.store.keyfilter import KeyFilter
from tests.support.memory_upstream import MemoryUpstream


def _entry(key: str) -> Entry:
    return Entry(key=key, remote="r", path=key, status=200, digest=None, size=1, content_type=None, headers={},
                 fetched=0.0, expires=None, etag=None, last_modified=None, last_access=0.0)


def test_no_key_added_is_ever_surely_absent_and_few_others_maybe_are() -> None:
    f = KeyFilter(20_000)
    added = [f"remote:path/{n}/file-{n * 7}.tar.gz" for n in range(20_000)]
    for k in added:
        f.add(k)
    assert all(f.may_hold(k) for k in added)
    others = sum(f.may_hold(f"remote:other/{n}") for n in range(20_000))
    assert others < 200  # ~0.2 % at the design size (1 % would be a broken filter)
    assert not f.full


@pytest_twisted.ensureDeferred
async def test_rows_written_before_during_and_after_the_build_are_never_surely_absent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "FILTER_BATCH", 7)  # many batches, with writes between them
    idx = Index(str(tmp_path / "index.sqlite"), reactor)
    await idx.start()
    try:
        for n in range(50):
            await idx.put(_entry(f"before/{n}"))
        assert not idx.surely_absent("never")  # (no filter yet: every lookup asks)
        building = idx.filter_keys()
        during = [idx.put(_entry(f"during/{n}")) for n in range(30)]
        for d in during:
            await d
        await building
        for n in range(20):
            await idx.put(_entry(f"after/{n}"))
        for key in [f"before/{n}" for n in range(50)] + [f"during/{n}" for n in range(30)] + \
                [f"after/{n}" for n in range(20)]:
            assert not idx.surely_absent(key), key
        assert sum(idx.surely_absent(f"never/{n}") for n in range(1000)) > 990
    finally:
        await idx.stop()


@pytest_twisted.ensureDeferred
async def test_a_full_filter_is_rebuilt_larger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyfilter, "MIN_KEYS", 8)
    idx = Index(str(tmp_path / "index.sqlite"), reactor)
    await idx.start()
    try:
        await idx.filter_keys()
        first = idx._keys
        assert first is not None
        for n in range(first.capacity * 3):
            await idx.put(_entry(f"k/{n}"))
        for _ in range(200):
            if idx._keys is not first and idx._keys_pending is None:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert idx._keys is not None and idx._keys.capacity > first.capacity
        assert not any(idx.surely_absent(f"k/{n}") for n in range(first.capacity * 3))
    finally:
        await idx.stop()


@pytest_twisted.ensureDeferred
async def test_a_cold_miss_skips_the_lookup_and_a_stored_key_is_still_found(tmp_path: Path) -> None:
    up = MemoryUpstream()
    store = Store(str(tmp_path / "data"), reactor, max_size=1_000_000)
    client = UpstreamClient(reactor, agent=up.agent)
    cache = Cache(store, client, reactor, Metrics())
    await store.start()
    remote = RemoteConfig("r", "generic", up.base_url, cache=CachePolicy(0, 60, 30), read_timeout=5)

    def req(path: str) -> CacheRequest:
        return CacheRequest(remote=remote, key=f"r:{path}", path=path, url=up.url(f"/{path}"), ttl=None)

    try:
        up.add("/stored", b"s" * 100)
        up.add("/new", b"n" * 100)
        got = await cache.get(req("stored"))
        assert isinstance(got, Live)
        await got.flight.wait_done()
        store.index._forget(["r:stored"])  # on disk, not in memory (as after a restart)
        await store.index.filter_keys()
        asked: list[str] = []
        real = store.index.get

        def get(key: str) -> Deferred[Any]:
            asked.append(key)
            return real(key)

        store.index.get = get  # type: ignore[method-assign]
        got = await cache.get(req("new"))
        assert isinstance(got, Live)
        await got.flight.wait_done()
        assert asked == []  # surely absent: no lookup
        n = up.total()
        hit = await cache.get(req("stored"))
        assert isinstance(hit, Hit) and up.total() == n  # a row on disk is still found
        assert asked == ["r:stored"]
        assert not store.index.surely_absent("r:new")  # what was stored since
    finally:
        up.clear()
        await client.close()
        await store.stop()


# -- shared by worker processes ------------------------------------------------------


def test_the_shared_filter_is_one_set_of_bits_for_every_worker_and_trusted_once_built(tmp_path: Path) -> None:
    path = str(tmp_path / "index.keys")
    keyfilter.prepare_shared(path, rows=10)
    a, b = keyfilter.SharedKeyFilter(path), keyfilter.SharedKeyFilter(path)  # two workers' mappings
    try:
        assert a.capacity >= keyfilter.MIN_SHARED_KEYS and a.building and not a.usable
        a.add(["k/1", "k/2"])
        assert b.may_hold("k/1") and b.may_hold("k/2") and not b.may_hold("k/3")
        b.built()
        assert a.usable and b.usable
        # A new run's filter is a new file: a worker still on the old one keeps its own.
        keyfilter.prepare_shared(path, rows=0)
        c = keyfilter.SharedKeyFilter(path)
        assert not c.usable and not c.may_hold("k/1") and a.may_hold("k/1")
        c.close()
    finally:
        a.close()
        b.close()
    (tmp_path / "junk").write_bytes(b"x" * 10_000)
    with pytest.raises(ValueError):
        keyfilter.SharedKeyFilter(str(tmp_path / "junk"))


def test_a_shared_filter_past_twice_its_size_is_no_longer_trusted(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyfilter, "MIN_SHARED_KEYS", 8)
    monkeypatch.setattr(keyfilter, "MIN_KEYS", 8)
    path = str(tmp_path / "index.keys")
    keyfilter.prepare_shared(path, rows=0)
    f = keyfilter.SharedKeyFilter(path)
    try:
        f.built()
        f.add([f"k/{n}" for n in range(2 * f.capacity)])
        assert f.usable
        f.add(["one more"])
        assert not f.usable  # its false positives would climb: every miss asks the index again
        f.built()
        assert not f.usable  # (until the next start makes a larger one)
    finally:
        f.close()


@pytest_twisted.ensureDeferred
async def test_rows_of_any_worker_before_and_during_the_shared_build_are_never_surely_absent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "FILTER_BATCH", 7)
    data = str(tmp_path)
    first = Index(str(tmp_path / "index.sqlite"), reactor)  # a previous run, or workers: 1
    await first.start()
    for n in range(50):
        await first.put(_entry(f"before/{n}"))
    await first.stop()
    index_module.prepare_key_filter(data, True)  # the supervisor
    assert keyfilter.SharedKeyFilter(str(tmp_path / "index.keys")).capacity >= 4 * 50
    primary, other = Index(str(tmp_path / "index.sqlite"), reactor), Index(str(tmp_path / "index.sqlite"), reactor)
    for idx in (primary, other):
        await idx.start()
        idx.share_keys()
    try:
        assert not other.surely_absent("never")  # (not built yet: every lookup asks)
        building = primary.fill_shared_keys()
        during = [other.put(_entry(f"during/{n}")) for n in range(30)]
        for d in during:
            await d
        await building
        for n in range(20):
            await other.put(_entry(f"after/{n}"))
        keys = [f"before/{n}" for n in range(50)] + [f"during/{n}" for n in range(30)] + [f"after/{n}" for n in range(20)]
        for idx in (primary, other):
            for key in keys:
                assert not idx.surely_absent(key), key
            assert sum(idx.surely_absent(f"never/{n}") for n in range(1000)) > 990
    finally:
        await primary.stop()
        await other.stop()
    index_module.prepare_key_filter(data, False)  # one process again: no shared filter left behind
    assert not (tmp_path / "index.keys").exists()
