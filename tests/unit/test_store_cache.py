"""Store and cache units: a real store in a tmp dir, an in-process upstream,
and a task.Clock for every TTL, so freshness is driven, never waited for."""

from __future__ import annotations

import hashlib
import os

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from sparkcache.config import CachePolicy, RemoteConfig
from sparkcache.fetch import Cache, CacheRequest, Failed, Hit, Live, UpstreamClient
from sparkcache.metrics import Metrics
from sparkcache.store import Entry, Store


class Upstream(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.files: dict[bytes, bytes] = {}
        self.status: dict[bytes, int] = {}
        self.truncate: dict[bytes, int] = {}
        self.hits: list[tuple[bytes, dict]] = []

    def render_GET(self, request):
        path = request.path
        self.hits.append((path, {k: v for k, v in request.requestHeaders.getAllRawHeaders()}))
        if path in self.status:
            request.setResponseCode(self.status[path])
            return b"nope"
        body = self.files.get(path)
        if body is None:
            request.setResponseCode(404)
            return b"missing"
        etag = b'"%s"' % hashlib.md5(body).hexdigest().encode()
        request.setHeader(b"ETag", etag)
        if request.getHeader(b"if-none-match") == etag:
            request.setResponseCode(304)
            return b""
        request.setHeader(b"Content-Type", b"application/x-test")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if path in self.truncate:
            request.write(body[: self.truncate[path]])
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        return body


@pytest.fixture
def upstream():
    res = Upstream()
    port = reactor.listenTCP(0, Site(res), interface="127.0.0.1")
    res.url = f"http://127.0.0.1:{port.getHost().port}"
    yield res
    port.stopListening()


@pytest.fixture
def env(tmp_path, upstream):
    clock = task.Clock()
    clock.advance(1_000_000)
    store = Store(str(tmp_path / "data"), reactor, max_size=10_000)
    client = UpstreamClient(reactor)
    cache = Cache(store, client, clock, Metrics())
    pytest_twisted.blockon(Deferred.fromCoroutine(store.start()))
    remote = RemoteConfig("r", "generic", upstream.url, cache=CachePolicy(0, 60, 30), read_timeout=5)
    yield cache, store, clock, remote, upstream
    pytest_twisted.blockon(client.close())
    pytest_twisted.blockon(Deferred.fromCoroutine(store.stop()))


def creq(remote, upstream, path, ttl=None, **kw):
    return CacheRequest(remote=remote, key=f"r:{path}", path=path, url=f"{upstream.url}/{path}", ttl=ttl, **kw)


async def fetch_all(cache, req):
    res = await cache.get(req)
    if isinstance(res, Live):
        flight = await res.flight.wait_done()
        return res, flight.entry
    return res, getattr(res, "entry", None)


@pytest_twisted.ensureDeferred
async def test_miss_then_hit_and_dedup(env):
    cache, store, clock, remote, up = env
    up.files[b"/a"] = up.files[b"/b"] = b"x" * 1000
    res, entry = await fetch_all(cache, creq(remote, up, "a"))
    assert isinstance(res, Live) and entry.size == 1000
    assert entry.digest == hashlib.sha256(b"x" * 1000).hexdigest()
    assert entry.content_type == "application/x-test"
    res2 = await cache.get(creq(remote, up, "a"))
    assert isinstance(res2, Hit) and res2.state == "HIT"
    await fetch_all(cache, creq(remote, up, "b"))
    files = [f for _, _, fs in os.walk(os.path.join(store.data_dir, "cas")) for f in fs]
    assert files == [entry.digest]  # one body for two keys
    assert len(up.hits) == 2
    assert os.listdir(store.spool_dir) == []


@pytest_twisted.ensureDeferred
async def test_singleflight(env):
    cache, store, clock, remote, up = env
    up.files[b"/s"] = b"y" * 5000
    results = [cache.get(creq(remote, up, "s")) for _ in range(10)]
    outs = [await Deferred.fromCoroutine(r) for r in results]
    assert all(isinstance(o, Live) for o in outs)
    assert len({id(o.flight) for o in outs}) == 1
    await outs[0].flight.wait_done()
    assert len(up.hits) == 1


@pytest_twisted.ensureDeferred
async def test_truncated_body_never_committed(env):
    cache, store, clock, remote, up = env
    up.files[b"/t"] = b"z" * 4000
    up.truncate[b"/t"] = 1000
    res = await cache.get(creq(remote, up, "t"))
    assert isinstance(res, Live)
    with pytest.raises(Exception):
        await res.flight.wait_done()
    await DeferredList(cache.running())  # the spool goes once no write is pending
    assert await store.index.get("r:t") is None
    assert os.listdir(store.spool_dir) == []
    del up.truncate[b"/t"]
    res, entry = await fetch_all(cache, creq(remote, up, "t"))
    assert isinstance(res, Live) and entry.size == 4000


@pytest_twisted.ensureDeferred
async def test_digest_mismatch_not_committed(env):
    cache, store, clock, remote, up = env
    up.files[b"/d"] = b"data"
    res = await cache.get(creq(remote, up, "d", expected_digest="0" * 64))
    with pytest.raises(Exception, match="digest mismatch"):
        await res.flight.wait_done()
    assert await store.index.get("r:d") is None


@pytest_twisted.ensureDeferred
async def test_revalidate_304_stale_on_503_and_404_evicts(env):
    cache, store, clock, remote, up = env
    up.files[b"/m"] = b"meta-v1"
    req = creq(remote, up, "m", ttl=60, revalidate=True)
    await fetch_all(cache, req)
    clock.advance(61)
    res = await cache.get(req)
    assert isinstance(res, Hit) and res.state == "REVALIDATED"
    assert up.hits[-1][1].get(b"If-None-Match")
    assert (await cache.get(req)).state == "HIT"
    clock.advance(61)
    up.status[b"/m"] = 503
    res = await cache.get(req)
    assert isinstance(res, Hit) and res.state == "STALE"
    up.status[b"/m"] = 404
    res = await cache.get(req)
    assert isinstance(res, Failed) and res.status == 404
    assert (await store.index.get("r:m")).status == 404  # negative entry replaced it
    n = len(up.hits)
    assert isinstance(await cache.get(req), Failed) and len(up.hits) == n  # negatively cached
    clock.advance(31)
    del up.status[b"/m"]
    res, entry = await fetch_all(cache, req)
    assert isinstance(res, Live) and entry.size == 7


@pytest_twisted.ensureDeferred
async def test_unreachable_is_stale_or_502(env, tmp_path):
    cache, store, clock, remote, up = env
    up.files[b"/u"] = b"u"
    await fetch_all(cache, creq(remote, up, "u", ttl=10))
    clock.advance(11)
    dead = RemoteConfig("r", "generic", "http://127.0.0.1:9", read_timeout=2, connect_timeout=2)
    req = CacheRequest(remote=dead, key="r:u", path="u", url="http://127.0.0.1:9/u", ttl=10)
    res = await cache.get(req)
    assert isinstance(res, Hit) and res.state == "STALE"
    res = await cache.get(CacheRequest(remote=dead, key="r:other", path="other", url="http://127.0.0.1:9/other", ttl=10))
    assert isinstance(res, Failed) and res.status == 502


@pytest_twisted.ensureDeferred
async def test_eviction_lru_skips_pinned(env):
    cache, store, clock, remote, up = env
    for i in range(5):
        up.files[b"/e%d" % i] = bytes([i]) * 3000
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
    assert os.path.exists(store.path(e0))
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
    up.files[b"/k"] = b"k"
    await fetch_all(cache, creq(remote, up, "k", ttl=10))
    assert isinstance(await cache.get(creq(remote, up, "missing")), Failed)  # negative, 30 s
    clock.advance(31)
    assert await store.expire(clock.seconds(), retention=100) == 1  # the negative entry
    assert await store.index.get("r:k") is not None  # stale, kept for stale-on-error
    clock.advance(100)
    assert await store.expire(clock.seconds(), retention=100) == 1
    assert await store.index.get("r:k") is None
    assert store.cas.iter_digests is not None and list(store.cas.iter_digests()) == []
