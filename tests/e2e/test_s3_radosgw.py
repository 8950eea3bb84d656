"""storage.backend: s3 on Ceph's radosgw (Debian's packages): a single-node
memstore cluster (tests/support/radosgw.py) instead of SeaweedFS, twistd
daemons, a real upstream, urllib clients.

The core cases of the SeaweedFS modules run here unchanged: their module
fixture ``weed`` is the RGW below (they use only its ``endpoint``), and
``proxied`` / ``s3_daemon`` / ``two_hosts`` are theirs.

- a miss then a tier hit, then a hit from the bucket with 0 upstream
  requests; a blob fetched through daemon A is a hit on daemon B
  (test_s3_store);
- 16 concurrent first fetches over two daemons → exactly 1 upstream fetch:
  RGW honours ``If-None-Match: *`` on a plain PUT (the lease); the holder
  killed mid-fetch → the other takes the expired lease over with ``If-Match``
  (test_s3_lease);
- the bucket's sweeper (test_s3_sweep);

and two of its own:

- a large body goes up as a multipart upload and is committed whole (the
  object's bytes, no upload left open, a hit from the bucket on another host);
- two hosts that do not share their index (no lease) upload one large body
  at once: RGW ignores ``If-None-Match: *`` on the multipart completion, so
  the second completion overwrites the object with the same bytes; both
  commit, every client gets the whole body, and both serve it as a hit.

RGW 16 (Debian 12) on conditions: ``If-None-Match: *`` on PUT honoured (412
when the key exists); ``If-Match`` on PUT compared with the stored ETag
unquoted (a quoted ETag, as every ETag header gives it, never matches: the
lease retries unquoted, lease.py); ``If-Match: *`` honoured; ``If-None-Match``
and ``If-Match`` on CompleteMultipartUpload ignored; ``If-Match`` on DELETE
ignored.

Marked ``radosgw``: ``make test-radosgw`` runs this module alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.e2e.test_s3_lease import (  # noqa: F401 (fixtures and cases run here on RGW)
    herd, test_concurrent_first_fetches_over_two_hosts_make_one_upstream_fetch,
    test_holder_killed_mid_fetch_other_host_takes_over, two_hosts,
)
from tests.e2e.test_s3_store import (  # noqa: F401
    proxied, s3_daemon, test_blob_deleted_from_the_bucket_is_a_miss, test_miss_then_tier_hit_then_bucket_hit,
    test_two_daemons_one_bucket_share_entries, test_virtual_host_addressing_is_signed_right,
)
from tests.e2e.test_s3_sweep import test_two_daemons_one_sweeper  # noqa: F401
from tests.support.client import get_until_hit, sha256
from tests.support.daemon import Daemon
from tests.support.radosgw import RadosGW
from tests.support.remotes import generic_remote
from tests.support.s3 import FaultProxy, boto_client, list_keys

pytestmark = pytest.mark.radosgw

MiB = 1 << 20
MULTIPART = {"multipart_threshold": "5MiB", "part_size": "5MiB"}


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RadosGW]:
    """RGW under the name the SeaweedFS modules' cases ask for."""
    rgw = RadosGW(tmp_path_factory.mktemp("rgw")).start()
    yield rgw
    rgw.stop()


def of_body(p: str, digest: str) -> bool:
    """A request for the body's object: its name, or the ``tmp/`` object a
    streamed upload goes to while the sha256 is unknown (copied to it at the end)."""
    return digest in p or "/sc/tmp/" in p


def completions(proxy: FaultProxy, digest: str) -> int:
    return sum(1 for m, p in proxy.paths if m == "POST" and "uploadId=" in p and of_body(p, digest))


def bucket_body(endpoint: str, bucket: str, key: str) -> str:
    """The sha256 of an object's bytes, read back from the bucket."""
    body = boto_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"]
    h = hashlib.sha256()
    for chunk in iter(lambda: body.read(MiB), b""):
        h.update(chunk)
    return h.hexdigest()


def test_large_body_multipart_committed(upstream: Any, s3_daemon: Callable[..., Daemon],
                                        proxied: tuple[FaultProxy, str], weed: RadosGW) -> None:
    proxy, bucket = proxied
    data = os.urandom(13 * MiB)  # three parts, the last one short
    digest = sha256(data)
    upstream.add("/files/big.bin", data)
    remotes = {"r": generic_remote(upstream)}
    one = s3_daemon(proxy.endpoint, bucket, remotes, **MULTIPART)
    first = one.get("/api/r/files/big.bin", timeout=60)
    assert first.status == 200 and first.body == data and first.header("X-Cache") == "MISS", first.describe()
    get_until_hit(one, "/api/r/files/big.bin", data)
    assert completions(proxy, digest) == 1
    assert sum(1 for m, p in proxy.paths if m == "PUT" and "partNumber=" in p and of_body(p, digest)) == 3
    assert list_keys(weed.endpoint, bucket, "sc/cas/") == {f"sc/cas/{digest}": len(data)}
    assert not list_keys(weed.endpoint, bucket, "sc/tmp/")  # the streamed upload's object, copied then deleted
    assert bucket_body(weed.endpoint, bucket, f"sc/cas/{digest}") == digest
    assert not boto_client(weed.endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads")
    # Another host: a hit, its body from the bucket (verified against its sha256).
    two = s3_daemon(proxy.endpoint, bucket, remotes, **MULTIPART)
    resp = two.get("/api/r/files/big.bin", timeout=60)
    assert resp.status == 200 and resp.body == data and resp.header("X-Cache") == "HIT", resp.describe()
    assert len(upstream.requests_for("/files/big.bin")) == 1


def test_unshared_hosts_upload_one_body_at_once(upstream: Any, daemon_factory: Callable[..., Daemon],
                                                proxied: tuple[FaultProxy, str], weed: RadosGW) -> None:
    """No lease, no shared index: each host fetches and uploads the body; the
    multipart completions race, and RGW lets the second overwrite the first."""
    from tests.support.s3 import env_credentials, s3_storage

    proxy, bucket = proxied
    storage = s3_storage(proxy.endpoint, bucket, prefix="sc/", share_index=False, **MULTIPART)
    remotes = {"r": generic_remote(upstream)}
    one, two = (daemon_factory(remotes, storage=storage, server={"workers": 1}, env=env_credentials())
                for _ in range(2))
    data = os.urandom(11 * MiB)
    digest = sha256(data)
    responses = herd(upstream, one, two, data)
    assert all(r.status == 200 and r.body == data for r in responses), [r.describe() for r in responses]
    fetched = len(upstream.requests_for("/files/herd.bin"))
    assert 1 <= fetched <= 2
    for d in (one, two):
        get_until_hit(d, "/api/r/files/herd.bin", data)
    # Each host that fetched committed through the bucket; what is there is the body.
    assert 1 <= completions(proxy, digest) <= fetched
    assert list_keys(weed.endpoint, bucket, "sc/cas/") == {f"sc/cas/{digest}": len(data)}
    assert bucket_body(weed.endpoint, bucket, f"sc/cas/{digest}") == digest
    assert len(upstream.requests_for("/files/herd.bin")) == fetched


def test_conditions_as_rgw_does_them(weed: RadosGW, tmp_path: Path) -> None:
    """What the store relies on, straight on RGW: a plain ``If-None-Match: *``
    PUT is refused on an existing key (so the lease is exact); the completion
    of a multipart upload is not (the store's content-addressed objects make
    that harmless); ``If-Match`` matches the unquoted ETag only."""
    from botocore.exceptions import ClientError

    from tests.support.s3 import make_bucket

    s3 = boto_client(weed.endpoint)
    bucket = make_bucket(weed.endpoint)
    etag = s3.put_object(Bucket=bucket, Key="k", Body=b"one", IfNoneMatch="*")["ETag"]

    def refused(call: Callable[[], Any]) -> bool:
        try:
            call()
        except ClientError as e:
            return bool(e.response["ResponseMetadata"]["HTTPStatusCode"] == 412)
        return False

    assert refused(lambda: s3.put_object(Bucket=bucket, Key="k", Body=b"two", IfNoneMatch="*"))
    assert refused(lambda: s3.put_object(Bucket=bucket, Key="k", Body=b"two", IfMatch=etag))  # quoted
    assert not refused(lambda: s3.put_object(Bucket=bucket, Key="k", Body=b"two", IfMatch=etag.strip('"')))
    part = b"p" * (5 * MiB)
    for _ in range(2):  # the second completion overwrites, whatever the condition
        up = s3.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
        p = s3.upload_part(Bucket=bucket, Key="mp", UploadId=up, PartNumber=1, Body=part)
        assert not refused(lambda: s3.complete_multipart_upload(
            Bucket=bucket, Key="mp", UploadId=up, IfNoneMatch="*",
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": p["ETag"]}]}))
