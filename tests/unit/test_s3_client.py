"""The S3 client against moto (in a thread) through a fault-injecting proxy:
conditional and multipart uploads from a file, ranged GETs that resume after
a broken body, retries on 503 SlowDown / 500 / dropped connections, and the
content store's verification (a corrupt or missing object is a miss)."""

from __future__ import annotations

import hashlib
import os

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from sparkcache.store.s3.bodies import FileSink
from sparkcache.store.s3.client import S3Client, S3Error, S3Unavailable
from sparkcache.store.s3.content import S3ContentStore
from sparkcache.store.s3.settings import S3Credentials, S3Settings
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, FaultProxy, boto_client, make_bucket, moto_endpoint

MiB = 1 << 20


def settings(endpoint: str, bucket: str, **kw) -> S3Settings:
    kw.setdefault("attempts", 3)
    return S3Settings(endpoint=endpoint, bucket=bucket, prefix="t/", credentials=S3Credentials(ACCESS_KEY, SECRET_KEY),
                      part_size=5 * MiB, multipart_threshold=6 * MiB, backoff=0.01, timeout=10, **kw)


@pytest.fixture
def s3():
    endpoint = moto_endpoint()
    bucket = make_bucket(endpoint)
    proxy = FaultProxy(endpoint)
    client = S3Client(settings(proxy.endpoint, bucket), reactor, deferToThread)
    yield client, proxy, bucket, endpoint
    pytest_twisted.blockon(Deferred.fromCoroutine(client.close()))
    proxy.stop()


def spooled(tmp_path, data: bytes, name: str = "body") -> tuple[str, str]:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p), hashlib.sha256(data).hexdigest()


async def fetch(client: S3Client, key: str, tmp_path, size: int | None = None) -> tuple[bytes, FileSink]:
    path = tmp_path / f"got-{os.urandom(4).hex()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        sink = FileSink(fd, reactor, 10, limit=size)
        await client.get_to(key, sink)
    finally:
        os.close(fd)
    return path.read_bytes(), sink


@pytest_twisted.ensureDeferred
async def test_put_get_head_list_delete(s3, tmp_path):
    client, proxy, bucket, endpoint = s3
    data = os.urandom(300_000)
    path, digest = spooled(tmp_path, data)
    key = f"t/cas/{digest}"
    assert await client.put_file(key, path, len(data), digest) is True
    # Written once: a second conditional PUT writes nothing.
    assert await client.put_file(key, path, len(data), digest) is False
    info = await client.head(key)
    assert info is not None and info.size == len(data)
    got, sink = await fetch(client, key, tmp_path, len(data))
    assert got == data and sink.hexdigest() == digest
    listed = [o async for o in client.list("t/cas/")]
    assert [(o.key, o.size) for o in listed] == [(key, len(data))]
    await client.delete(key)
    assert await client.head(key) is None
    await client.delete(key)  # absent: not an error
    with pytest.raises(S3Error) as e:
        await fetch(client, key, tmp_path)
    assert e.value.status == 404


@pytest_twisted.ensureDeferred
async def test_multipart_upload_streams_the_file_in_parts(s3, tmp_path):
    client, proxy, bucket, endpoint = s3
    data = os.urandom(11 * MiB + 123)
    path, digest = spooled(tmp_path, data)
    key = f"t/cas/{digest}"
    assert await client.put_file(key, path, len(data), digest) is True
    puts = [p for m, p in proxy.paths if m == "PUT"]
    assert len(puts) == 3 and all("partNumber=" in p for p in puts), puts
    obj = boto_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(obj).hexdigest() == digest
    # Already there: found by a HEAD, not sent again.
    before = proxy.count("PUT")
    assert await client.put_file(key, path, len(data), digest) is False
    assert proxy.count("PUT") == before


@pytest_twisted.ensureDeferred
async def test_failed_part_aborts_the_upload(s3, tmp_path):
    client, proxy, bucket, endpoint = s3
    data = os.urandom(11 * MiB)
    path, digest = spooled(tmp_path, data)
    key = f"t/cas/{digest}"
    proxy.arm("PUT", "partNumber=2", "500", times=10)
    with pytest.raises(S3Unavailable):
        await client.put_file(key, path, len(data), digest)
    assert await client.head(key) is None
    assert any(m == "DELETE" and "uploadId=" in p for m, p in proxy.paths), "the multipart upload was not aborted"


@pytest_twisted.ensureDeferred
async def test_retries_slowdown_and_dropped_connections(s3, tmp_path):
    client, proxy, bucket, endpoint = s3
    data = b"retry me" * 1000
    path, digest = spooled(tmp_path, data)
    key = f"t/cas/{digest}"
    proxy.arm("PUT", digest, "503", times=1)
    proxy.arm("PUT", digest, "drop", times=1)
    assert await client.put_file(key, path, len(data), digest) is True
    assert proxy.count("PUT") == 3
    proxy.arm("GET", digest, "500", times=2)
    got, _ = await fetch(client, key, tmp_path)
    assert got == data


@pytest_twisted.ensureDeferred
async def test_a_broken_off_body_resumes_with_a_range(s3, tmp_path):
    client, proxy, bucket, endpoint = s3
    data = os.urandom(2 * MiB)
    path, digest = spooled(tmp_path, data)
    key = f"t/cas/{digest}"
    await client.put_file(key, path, len(data), digest)
    proxy.arm("GET", digest, "truncate", times=1)
    got, sink = await fetch(client, key, tmp_path, len(data))
    assert got == data and sink.hexdigest() == digest
    assert proxy.count("GET") == 2


@pytest_twisted.ensureDeferred
async def test_unreachable_endpoint_is_unavailable_after_the_attempts(tmp_path):
    port = FaultProxy("http://127.0.0.1:9")  # a free port, then closed
    endpoint = port.endpoint
    port.stop()
    client = S3Client(settings(endpoint, "nobucket", attempts=2), reactor, deferToThread)
    try:
        with pytest.raises(S3Unavailable) as e:
            await client.head("t/cas/x")
        assert SECRET_KEY not in str(e.value) and ACCESS_KEY not in str(e.value)
    finally:
        await client.close()


def test_addressing_and_signature():
    s = settings("https://s3.store.example:9000", "my-bucket")
    client = S3Client(s, reactor, deferToThread)
    assert client.url("t/cas/ab") == "https://s3.store.example:9000/my-bucket/t/cas/ab"
    v = S3Client(settings("https://s3.store.example", "my-bucket", addressing="virtual"), reactor, deferToThread)
    assert v.url("t/cas/ab", "uploads=") == "https://my-bucket.s3.store.example/t/cas/ab?uploads="
    h = client.sign("PUT", client.url("t/cas/ab"), {"If-None-Match": "*"}, "UNSIGNED-PAYLOAD")
    assert h["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
    assert h["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/")
    assert "if-none-match" in h["Authorization"] and SECRET_KEY not in str(h)
    d = hashlib.sha256(b"x").hexdigest()
    assert client.sign("PUT", client.url("t/cas/ab"), {}, d)["X-Amz-Content-SHA256"] == d
    assert SECRET_KEY not in repr(s) and SECRET_KEY not in str(s.redacted())


# -- the content store ------------------------------------------------------------------


@pytest.fixture
def content(s3, tmp_path):
    client, proxy, bucket, endpoint = s3
    from twisted.internet import task  # noqa: F401  (the real reactor times the down hold)

    store = S3ContentStore(client, str(tmp_path / "tier"), 1 * MiB, reactor, deferToThread)
    pytest_twisted.blockon(Deferred.fromCoroutine(store.start()))
    return store, proxy, bucket, endpoint


@pytest_twisted.ensureDeferred
async def test_tier_fill_once_and_lru(content, tmp_path):
    store, proxy, bucket, endpoint = content
    bodies = []
    for i in range(3):
        data = os.urandom(400_000)
        path, digest = spooled(tmp_path, data, f"b{i}")
        await store.upload(path, digest, len(data))
        bodies.append((digest, data))
    assert store.uploads == 3
    digest, data = bodies[0]
    gets = proxy.count("GET")
    # Five at once: one GET (singleflight).
    from twisted.internet.defer import gatherResults
    assert await gatherResults([store.ensure(digest, len(data)) for _ in range(5)]) == [True] * 5
    assert proxy.count("GET") == gets + 1 and store.fills == 1
    fd = store.open(digest)
    try:
        assert os.read(fd, len(data) + 1) == data
    finally:
        os.close(fd)
    # The tier holds 1 MiB: the third body pushes the least recently used out.
    assert await store.ensure(bodies[1][0], 400_000)
    assert await store.ensure(bodies[2][0], 400_000)
    assert store.tier_size <= 1 * MiB
    assert not store.contains(digest) and store.contains(bodies[2][0])


@pytest_twisted.ensureDeferred
async def test_corrupt_or_missing_objects_are_misses(content, tmp_path):
    store, proxy, bucket, endpoint = content
    data = os.urandom(100_000)
    path, digest = spooled(tmp_path, data)
    await store.upload(path, digest, len(data))
    proxy.arm("GET", digest, "corrupt", times=1)
    assert await store.ensure(digest, len(data)) is False
    assert not store.contains(digest)
    # The corrupt object was taken away, so the next upload puts it right.
    assert await store.client.head(store.object_name(digest)) is None
    await store.upload(path, digest, len(data))
    assert await store.ensure(digest, len(data)) is True
    boto_client(endpoint).delete_object(Bucket=bucket, Key=store.object_name(digest))
    store.remove(digest)
    assert await store.ensure(digest, len(data)) is False
    assert store.writable


@pytest_twisted.ensureDeferred
async def test_bucket_down_marks_the_store_unwritable(content, tmp_path):
    store, proxy, bucket, endpoint = content
    data = os.urandom(1000)
    path, digest = spooled(tmp_path, data)
    proxy.arm("PUT", digest, "503", times=10)
    with pytest.raises(S3Unavailable):
        await store.upload(path, digest, len(data))
    assert not store.writable
