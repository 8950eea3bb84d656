"""Store + Cache with backend s3 (moto in a thread, behind a fault proxy; the
upstream in memory): a commit uploads before the row appears, a hit fills the
tier first, a body gone from the bucket is a miss, the bucket down makes
misses pass through, and a second store on the bucket finds the first one's
entries without asking the upstream."""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from sparkcache.config import CachePolicy, RemoteConfig
from sparkcache.fetch import Cache, CacheRequest, Hit, Live, UpstreamClient
from sparkcache.fetch.flight import BodyError
from sparkcache.metrics import Metrics
from sparkcache.store import Store
from sparkcache.store.s3.client import S3Client
from sparkcache.store.s3.content import S3ContentStore
from tests.support.memory_upstream import MemoryUpstream
from tests.support.s3 import FaultProxy, boto_client, list_keys, make_bucket, moto_endpoint
from tests.unit.test_s3_client import settings

KiB = 1024


class Host:
    def __init__(self, root, endpoint: str, bucket: str, up: MemoryUpstream, clock: task.Clock) -> None:
        self.client = S3Client(settings(endpoint, bucket, attempts=2), reactor, deferToThread)
        self.content = S3ContentStore(self.client, str(root / "tier"), 10**9, clock, deferToThread)
        self.store = Store(str(root), reactor, max_size=10**9, content=self.content)
        self.store.clock = clock
        self.upstream = UpstreamClient(clock, agent=up.agent)
        self.cache = Cache(self.store, self.upstream, clock, Metrics())

    async def get(self, remote: RemoteConfig, up: MemoryUpstream, path: str):
        req = CacheRequest(remote=remote, key=f"r:{path}", path=path, url=up.url(f"/{path}"), ttl=None)
        result = await self.cache.get(req)
        if isinstance(result, Live):
            try:
                await result.flight.wait_done()
            except BodyError:
                pass  # not stored: the test looks at the store
        return result

    async def close(self) -> None:
        await self.upstream.close()
        await self.store.stop()


@pytest.fixture
def env(tmp_path):
    clock = task.Clock()
    clock.advance(1_000_000)
    up = MemoryUpstream()
    endpoint = moto_endpoint()
    bucket = make_bucket(endpoint)
    proxy = FaultProxy(endpoint)
    hosts = []

    async def host(name: str) -> Host:
        h = Host(tmp_path / name, proxy.endpoint, bucket, up, clock)
        hosts.append(h)
        await h.store.start()
        return h

    remote = RemoteConfig("r", "generic", up.base_url, cache=CachePolicy(0, 60, 30), read_timeout=5)
    yield host, remote, up, proxy, bucket, endpoint, clock
    for h in hosts:
        pytest_twisted.blockon(Deferred.fromCoroutine(h.close()))
    up.clear()
    proxy.stop()


@pytest_twisted.ensureDeferred
async def test_commit_uploads_then_hits_fill_the_tier(env):
    host, remote, up, proxy, bucket, endpoint, clock = env
    a = await host("a")
    data = os.urandom(300 * KiB)
    up.add("/files/x.bin", data)
    miss = await a.get(remote, up, "files/x.bin")
    assert isinstance(miss, Live)
    entry = await a.store.index.get("r:files/x.bin")
    assert entry is not None and list_keys(endpoint, bucket, "t/cas/") == {f"t/cas/{entry.digest}": len(data)}
    hit = await a.get(remote, up, "files/x.bin")
    assert isinstance(hit, Hit) and hit.state == "HIT"
    # Out of the tier: the next hit brings it back from the bucket, not the upstream.
    a.content.remove(entry.digest)
    assert a.store.index.peek(entry.key) is None
    hit = await a.get(remote, up, "files/x.bin")
    assert isinstance(hit, Hit) and a.content.fills == 1 and up.count("/files/x.bin") == 1
    with a.store.open_range(hit.entry) as body:
        assert body.read_all() == data
    a.content.remove(entry.digest)
    assert await a.store.read(hit.entry, 10**6) == data


@pytest_twisted.ensureDeferred
async def test_gone_from_the_bucket_is_a_miss_and_down_passes_through(env):
    host, remote, up, proxy, bucket, endpoint, clock = env
    a = await host("a")
    data = os.urandom(50 * KiB)
    up.add("/files/x.bin", data)
    up.add("/files/y.bin", data[::-1])
    await a.get(remote, up, "files/x.bin")
    entry = await a.store.index.get("r:files/x.bin")
    boto_client(endpoint).delete_object(Bucket=bucket, Key=f"t/cas/{entry.digest}")
    a.content.remove(entry.digest)
    again = await a.get(remote, up, "files/x.bin")
    assert isinstance(again, Live) and up.count("/files/x.bin") == 2
    proxy.stop()
    await a.get(remote, up, "files/y.bin")  # its upload fails: not stored, the bucket counts as down
    assert not a.store.writable and await a.store.index.get("r:files/y.bin") is None
    passed = await a.get(remote, up, "files/y.bin")
    assert isinstance(passed, Live) and passed.state == "BYPASS"
    hit = await a.get(remote, up, "files/x.bin")  # in the tier: still a hit
    assert isinstance(hit, Hit)
    clock.advance(11)  # the hold is over: the next miss tries the bucket again
    assert a.store.writable


@pytest_twisted.ensureDeferred
async def test_a_second_store_finds_the_first_ones_entries(env):
    host, remote, up, proxy, bucket, endpoint, clock = env
    a, b = await host("a"), await host("b")
    data = os.urandom(80 * KiB)
    up.add("/files/x.bin", data)
    await a.get(remote, up, "files/x.bin")
    hit = await b.get(remote, up, "files/x.bin")
    assert isinstance(hit, Hit) and up.count("/files/x.bin") == 1
    assert b.content.shared_index.found == 1
    # Mutable entries are not shared.
    up.add("/meta/m.json", b"{}")
    req = CacheRequest(remote=remote, key="r:meta/m.json", path="meta/m.json", url=up.url("/meta/m.json"), ttl=60)
    res = await a.cache.get(req)
    if isinstance(res, Live):
        await res.flight.wait_done()
    assert len(list_keys(endpoint, bucket, "t/index/")) == 1  # x.bin's only
    res = await b.cache.get(req)
    assert isinstance(res, Live) and up.count("/meta/m.json") == 2
    # A purge of everything through a: b's lookups ignore what was published before.
    await a.store.purge_all()
    c = await host("c")
    clock.advance(1)
    res = await c.get(remote, up, "files/x.bin")
    assert isinstance(res, Live) and up.count("/files/x.bin") == 2
