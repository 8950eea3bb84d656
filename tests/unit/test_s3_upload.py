"""Streamed multipart uploads (store/s3/upload.py) against moto through the
fault proxy: parts go up while the spool grows, straight to the digest's name
when it is known, else to a temporary object copied at the end; a mismatch,
a failed part or an abort leave nothing named by a digest and no upload open;
and the client's server-side copy (CopyObject, UploadPartCopy ranges)."""

from __future__ import annotations

import hashlib
import os

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from sparkcache.store.s3 import client as client_module
from sparkcache.store.s3.client import S3Client, S3Unavailable
from sparkcache.store.s3.upload import StreamedUpload
from tests.support.s3 import FaultProxy, boto_client
from tests.unit.test_s3_client import s3, settings  # noqa: F401 (s3: the moto client fixture)

MiB = 1 << 20


class Spool:
    """A file written in steps, telling the upload as a flight's listener would."""

    def __init__(self, path, upload: StreamedUpload | None = None) -> None:
        self.path = str(path)
        self.f = open(path, "wb")
        self.upload = upload
        self.written = 0
        self.h = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.f.flush()
        self.h.update(data)
        self.written += len(data)
        if self.upload is not None:
            self.upload.grew(self.written)

    def close(self) -> str:
        self.f.close()
        return self.h.hexdigest()


async def until(cond, what: str, n: int = 400) -> None:
    from twisted.internet.task import deferLater

    for _ in range(n):
        if cond():
            return
        await deferLater(reactor, 0.025, lambda: None)
    raise AssertionError(what)


def objects(endpoint: str, bucket: str) -> list[str]:
    return [o["Key"] for o in boto_client(endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])]


def open_uploads(endpoint: str, bucket: str) -> list[str]:
    return [u["Key"] for u in boto_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def part_puts(proxy: FaultProxy) -> list[str]:
    return [p for m, p in proxy.paths if m == "PUT" and "partNumber=" in p]


@pytest_twisted.ensureDeferred
async def test_parts_go_up_while_the_body_grows_then_a_copy_names_it(s3, tmp_path):
    client, proxy, bucket, endpoint = s3
    up = StreamedUpload(client, str(tmp_path / "spool"), None, "t/tmp/h/abc", None)
    spool = Spool(tmp_path / "spool", up)
    data = os.urandom(17 * MiB + 5)
    spool.write(data[:4 * MiB])
    assert not up.started  # not past the threshold (6 MiB) yet: maybe a small body
    spool.write(data[4 * MiB:12 * MiB])
    assert up.started
    # Parts 1 and 2 (5 MiB each) are whole in the spool: they go up before the end.
    await until(lambda: len(part_puts(proxy)) == 2 and up.sent == 10 * MiB, "the whole parts were not sent")
    assert all("t/tmp/h/abc" in p for p in part_puts(proxy))
    spool.write(data[12 * MiB:])
    digest = spool.close()
    name = f"t/cas/{digest}"
    assert await up.finish(name, len(data)) is True
    assert len(part_puts(proxy)) == 4  # 5 + 5 + 5 + 2 MiB
    got = boto_client(endpoint).get_object(Bucket=bucket, Key=name)["Body"].read()
    assert hashlib.sha256(got).hexdigest() == digest
    assert objects(endpoint, bucket) == [name], "the temporary object was left behind"
    assert open_uploads(endpoint, bucket) == []


@pytest_twisted.ensureDeferred
async def test_a_known_digest_is_uploaded_to_its_name_without_a_copy(s3, tmp_path):
    client, proxy, bucket, endpoint = s3
    data = os.urandom(13 * MiB)
    digest = hashlib.sha256(data).hexdigest()
    name = f"t/cas/{digest}"
    up = StreamedUpload(client, str(tmp_path / "spool"), name, "t/tmp/h/x", len(data))
    spool = Spool(tmp_path / "spool", up)
    spool.write(data[:MiB])
    assert up.started  # the announced length is past the threshold: from the first bytes
    spool.write(data[MiB:])
    spool.close()
    assert await up.finish(name, len(data)) is True
    assert not any("copy" in p or "tmp/" in p for _, p in proxy.paths), proxy.paths
    assert objects(endpoint, bucket) == [name]
    # The next fetch of the same body finds it there: nothing sent.
    before = len(part_puts(proxy))
    again = StreamedUpload(client, spool.path, name, "t/tmp/h/y", len(data))
    again.grew(len(data))
    assert await again.finish(name, len(data)) is False
    assert len(part_puts(proxy)) == before and open_uploads(endpoint, bucket) == []


@pytest_twisted.ensureDeferred
async def test_a_body_that_is_not_the_expected_one_is_never_completed(s3, tmp_path):
    client, proxy, bucket, endpoint = s3
    data = os.urandom(11 * MiB)
    wrong = "ab" * 32
    up = StreamedUpload(client, str(tmp_path / "spool"), f"t/cas/{wrong}", "t/tmp/h/z", len(data))
    spool = Spool(tmp_path / "spool", up)
    spool.write(data)
    digest = spool.close()
    await until(lambda: up.sent == 10 * MiB, "the whole parts were not sent")
    assert await up.finish(f"t/cas/{digest}", len(data)) is None  # the caller uploads it whole
    assert objects(endpoint, bucket) == [] and open_uploads(endpoint, bucket) == []


@pytest_twisted.ensureDeferred
async def test_an_announced_name_that_is_not_the_body_is_never_used(s3, tmp_path):
    client, proxy, bucket, endpoint = s3
    other = os.urandom(1000)
    guessed = f"t/cas/{hashlib.sha256(other).hexdigest()}"
    boto_client(endpoint).put_object(Bucket=bucket, Key=guessed, Body=other)
    data = os.urandom(11 * MiB)
    up = StreamedUpload(client, str(tmp_path / "spool"), guessed, "t/tmp/h/g", len(data))
    spool = Spool(tmp_path / "spool", up)
    spool.write(data)
    digest = spool.close()
    # The guessed object exists: nothing is sent to it, and it is not taken for this body.
    assert await up.finish(f"t/cas/{digest}", len(data)) is None
    assert part_puts(proxy) == [] and objects(endpoint, bucket) == [guessed]


@pytest_twisted.ensureDeferred
async def test_a_failed_part_fails_the_upload_at_once_and_aborts_it(s3, tmp_path):
    client, proxy, bucket, endpoint = s3
    proxy.arm("PUT", "partNumber=2", "500", times=10)
    up = StreamedUpload(client, str(tmp_path / "spool"), None, "t/tmp/h/f", None)
    failed: list[BaseException] = []
    up.on_error(failed.append)
    spool = Spool(tmp_path / "spool", up)
    spool.write(os.urandom(12 * MiB))
    await until(lambda: failed, "the failed part was not reported")
    assert isinstance(failed[0], S3Unavailable)
    digest = spool.close()
    with pytest.raises(S3Unavailable):
        await up.finish(f"t/cas/{digest}", 12 * MiB)
    assert objects(endpoint, bucket) == [] and open_uploads(endpoint, bucket) == []
    assert any(m == "DELETE" and "uploadId=" in p for m, p in proxy.paths)


@pytest_twisted.ensureDeferred
async def test_abort_mid_body_leaves_nothing(s3, tmp_path):
    client, proxy, bucket, endpoint = s3
    proxy.arm("PUT", "partNumber=2", "stall")  # one part still being sent when the fetch stops
    up = StreamedUpload(client, str(tmp_path / "spool"), None, "t/tmp/h/a", None)
    spool = Spool(tmp_path / "spool", up)
    spool.write(os.urandom(11 * MiB))
    await until(lambda: len(part_puts(proxy)) == 2 and up.sent == 5 * MiB, "parts not under way")
    await up.abort()
    proxy.released.set()
    spool.write(os.urandom(MiB))  # nothing more is sent after an abort
    spool.close()
    await until(lambda: open_uploads(endpoint, bucket) == [], "the multipart upload is still open")
    assert objects(endpoint, bucket) == []
    assert len(part_puts(proxy)) == 2


@pytest_twisted.ensureDeferred
async def test_copy_object_and_copy_in_ranges(s3, tmp_path, monkeypatch):
    client, proxy, bucket, endpoint = s3
    data = os.urandom(7 * MiB + 3)
    boto_client(endpoint).put_object(Bucket=bucket, Key="t/src", Body=data)
    await client.copy("t/src", "t/one", len(data))
    monkeypatch.setattr(client_module, "COPY_MAX", 4 * MiB)
    monkeypatch.setattr(client_module, "COPY_PART", 5 * MiB)
    await client.copy("t/src", "t/ranges", len(data))
    assert sum("x-amz-copy" in p or "partNumber" in p for m, p in proxy.paths if m == "PUT") >= 2
    s3c = boto_client(endpoint)
    for key in ("t/one", "t/ranges"):
        assert s3c.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert open_uploads(endpoint, bucket) == []


@pytest.mark.parametrize("mode,expected,streams,to_name", [
    ("true", None, True, False), ("true", "ab" * 32, True, True), ("known", None, False, False),
    ("known", "ab" * 32, True, True), ("false", "ab" * 32, False, False), ("true", "not-a-digest", True, False),
])
def test_which_bodies_stream_and_where_to(mode, expected, streams, to_name):
    import dataclasses

    from sparkcache.store.s3.upload import StreamedUploads

    client = S3Client(dataclasses.replace(settings("http://127.0.0.1:1", "b", host_id="cache-1"), stream_uploads=mode),
                      reactor, deferToThread)
    up = StreamedUploads(client, lambda e: None).start("/nowhere", expected, 100 * MiB)
    assert (up is not None) == streams
    if up is not None:
        assert up.key == (f"t/cas/{expected}" if to_name else up.temp)
        assert up.temp.startswith("t/tmp/cache-1/")


@pytest_twisted.ensureDeferred
async def test_a_body_of_too_many_parts_stops_streaming_and_goes_whole(s3, tmp_path, monkeypatch):
    from sparkcache.store.s3 import upload as upload_module

    client, proxy, bucket, endpoint = s3
    monkeypatch.setattr(upload_module, "MAX_PARTS", 2)
    up = StreamedUpload(client, str(tmp_path / "spool"), None, "t/tmp/h/m", None)
    spool = Spool(tmp_path / "spool", up)
    spool.write(os.urandom(7 * MiB))
    await until(lambda: up.sent == 5 * MiB, "the first part was not sent")
    spool.write(os.urandom(9 * MiB))  # 16 MiB: more than 2 parts of 5 MiB
    digest = spool.close()
    assert up.gave_up
    assert await up.finish(f"t/cas/{digest}", 16 * MiB) is None  # the caller uploads it whole
    await until(lambda: open_uploads(endpoint, bucket) == [], "the multipart upload is still open")
    assert objects(endpoint, bucket) == []
