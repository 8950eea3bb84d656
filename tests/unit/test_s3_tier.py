"""The tier shared by worker processes (store/s3/tier.py) against moto behind
the fault proxy: two content stores over one data directory stand for two
workers (flock separates open files as it separates processes).

- one LRU per host: the non-evicting worker's fills take the tier over its
  bound until the evicting one's tick, which evicts by the uses both noted;
- one fill per host: both asking for a body at once is one GET;
- a worker's hits count for the LRU once flushed;
- the start-up check reconciles the ledger with the files;
- a body another worker is filling (its fill lock held) is not evicted;
- a ranged answer is checked: Content-Range and length.
"""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.web.http_headers import Headers

from sparkcache.store.s3.client import Mismatch, S3Client
from sparkcache.store.s3.content import S3ContentStore
from sparkcache.store.s3.ranged import ToClient
from sparkcache.store.s3.tier import Tier, fill_lock_path, release_lock, try_lock
from tests.support.s3 import FaultProxy, make_bucket, moto_endpoint
from tests.unit.test_s3_client import settings, spooled

KiB = 1024
BODY = 400 * KiB


@pytest.fixture
def host(tmp_path):
    """(primary, other, proxy, bodies): two workers' content stores over one data dir, bodies in the bucket."""
    endpoint = moto_endpoint()
    bucket = make_bucket(endpoint)
    proxy = FaultProxy(endpoint)
    stores = []

    def store(evicts: bool) -> S3ContentStore:
        client = S3Client(settings(proxy.endpoint, bucket), reactor, deferToThread)
        s = S3ContentStore(client, str(tmp_path / "data" / "tier"), 1000 * KiB, reactor, deferToThread,
                           shared=True, evicts=evicts)
        stores.append(s)
        return s

    async def setup():
        # The parent's start-up check, then the workers.
        Tier(str(tmp_path / "data" / "tier"), 1000 * KiB, reactor).check()
        primary, other = store(True), store(False)
        for s in (primary, other):
            await s.start()
        bodies = []
        for i in range(4):
            data = os.urandom(BODY)
            path, digest = spooled(tmp_path, data, f"b{i}")
            await primary.upload(path, digest, len(data))
            bodies.append((digest, data))
        return primary, other, bodies

    primary, other, bodies = pytest_twisted.blockon(Deferred.fromCoroutine(setup()))
    yield primary, other, proxy, bodies
    for s in stores:
        pytest_twisted.blockon(Deferred.fromCoroutine(s.stop()))
    proxy.stop()


def read(store: S3ContentStore, digest: str) -> bytes:
    fd = store.open(digest)
    try:
        return os.read(fd, 10 * BODY)
    finally:
        os.close(fd)


@pytest_twisted.ensureDeferred
async def test_one_lru_per_host_the_primary_evicts(host):
    primary, other, proxy, bodies = host
    (d0, b0), (d1, _), (d2, _), (d3, _) = bodies
    # The other worker fills three bodies: 1200 KiB in a 1000 KiB tier, until the primary's tick.
    for d, _ in bodies[:3]:
        assert await other.ensure(d, BODY)
    assert await deferToThread(other.tier.ledger.total) == 3 * BODY
    assert all(primary.contains(d) for d, _ in bodies[:3])
    # Hits on d0 through the other worker; written to the ledger at its tick.
    assert read(other, d0) == b0
    await deferToThread(other.tier.tick)
    await deferToThread(primary.tier.tick)
    # d1 was the least recently used (d0 hit since): it went, not d0.
    assert primary.tier_size == 2 * BODY <= 1000 * KiB
    assert not primary.contains(d1) and primary.contains(d0) and primary.contains(d2)
    # A fill by the primary evicts at once (and keeps what it just brought).
    assert await primary.ensure(d3, BODY)
    assert primary.contains(d3) and primary.tier_size <= 1000 * KiB
    assert await deferToThread(other.tier.ledger.total) == primary.tier_size


@pytest_twisted.ensureDeferred
async def test_one_fill_per_host(host):
    primary, other, proxy, bodies = host
    digest, data = bodies[0]
    gets = proxy.count("GET")
    got = await gatherResults([s.ensure(digest, BODY) for s in (primary, other, primary, other)])
    assert got == [True] * 4
    assert proxy.count("GET") == gets + 1, "both workers fetched the body"
    assert primary.fills + other.fills == 1
    assert read(other, digest) == data
    # No temporary file left behind.
    assert not [n for n in os.listdir(primary.tier.root) if n.startswith(".fill-")]


@pytest_twisted.ensureDeferred
async def test_a_body_being_filled_is_not_evicted(host):
    primary, other, proxy, bodies = host
    for d, _ in bodies[:3]:
        assert await other.ensure(d, BODY)
    oldest = bodies[0][0]
    lock_path = fill_lock_path(primary.tier.locks_dir, oldest)
    fd = try_lock(lock_path)  # as if a worker were filling it again
    assert fd is not None
    try:
        await deferToThread(primary.tier.tick)
    finally:
        release_lock(fd, lock_path)
    assert primary.contains(oldest) and not primary.contains(bodies[1][0])
    # The evictions took and let go of the others' fill locks: no file left for any.
    assert not [n for _, _, files in os.walk(primary.tier.locks_dir) for n in files]


def test_start_up_check_reconciles_the_ledger(tmp_path):
    root = tmp_path / "data" / "tier"
    tier = Tier(str(root), 10 * KiB, reactor)
    files = tier.files
    kept = tmp_path / "kept"
    kept.write_bytes(b"k" * 3000)
    digest = "a" * 64
    tier.commit(str(kept), digest)
    tier.ledger.add("b" * 64, 5000, 1.0)  # a row whose file is gone
    os.makedirs(os.path.dirname(files.local_path("c" * 64)), exist_ok=True)
    with open(files.local_path("c" * 64), "wb") as f:  # a file the ledger never heard of
        f.write(b"c" * 4000)
    (root / (".fill-" + "d" * 64 + ".123")).write_bytes(b"half")
    tier.close()
    again = Tier(str(root), 10 * KiB, reactor)
    again.check()
    assert again.size == 7000 and again.ledger.total() == 7000
    assert not [n for n in os.listdir(root) if n.startswith(".fill-")]
    again.close()


class _Response:
    def __init__(self, code: int, length: int, content_range: str | None) -> None:
        self.code = code
        self.length = length
        self.headers = Headers({b"content-range": [content_range.encode()]} if content_range else {})


def test_a_range_from_the_bucket_is_checked():
    out = ToClient(object(), 100, 200, 1000, reactor, 10, lambda n: None)
    out._check(_Response(206, 100, "bytes 100-199/1000"))  # what was asked
    for bad in (_Response(206, 100, "bytes 0-99/1000"), _Response(206, 100, "bytes 100-199/999"),
                _Response(206, 50, "bytes 100-199/1000"), _Response(206, 100, None),
                _Response(200, 1000, None)):
        with pytest.raises(Mismatch):
            out._check(bad)
    whole = ToClient(object(), 0, 1000, 1000, reactor, 10, lambda n: None)
    whole._check(_Response(200, 1000, None))
    assert whole.sha256 is not None and out.sha256 is None


@pytest_twisted.ensureDeferred
async def test_a_streamed_body_kept_only_if_it_is_the_one_named(host, tmp_path):
    """keep_streamed (fetch/peer.py, after the holder's entry matched): the
    spool into the tier, so the entry's fill GETs nothing; other bytes never."""
    from sparkcache.store.spool import SpoolFile

    primary, other, proxy, bodies = host
    (d0, b0), (d1, b1) = bodies[:2]
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    wrong = SpoolFile(str(spool_dir), "peer-")
    wrong.write(b1)  # another body than the one named
    with pytest.raises(ValueError):
        await other.keep_streamed(wrong, d0, BODY)
    assert not primary.contains(d0) and os.path.exists(wrong.path)
    short = SpoolFile(str(spool_dir), "peer-")
    short.write(b0[:-1])
    with pytest.raises(ValueError):
        await other.keep_streamed(short, d0, BODY)
    assert not primary.contains(d0)
    right = SpoolFile(str(spool_dir), "peer-")
    right.write(b0)
    gets = proxy.count("GET")
    assert await other.keep_streamed(right, d0, BODY) is True
    assert primary.contains(d0) and read(primary, d0) == b0 and not os.path.exists(right.path)
    assert await other.ensure(d0, BODY) and await primary.ensure(d0, BODY)
    assert proxy.count("GET") == gets and primary.fills + other.fills == 0 and other.kept == 1
    assert await deferToThread(other.tier.ledger.total) == BODY  # in the host's LRU like a fill
    for s in (wrong, short):
        s.discard()
