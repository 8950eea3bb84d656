"""The bucket's sweeper end to end: two twistd daemons on one SeaweedFS bucket
with ``storage.s3.max_size`` smaller than what they fetch. One of them (the
lease holder) sweeps the bucket under the limit, least recently used first;
a swept body asked for again is a MISS (from upstream, never a 5xx) and then
a HIT, on the host that never had it and on the one whose row named it; a
pinned upload stays in the bucket and is still served."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import pytest_twisted

from tests.support.client import eventually, get_until_hit, sha256
from tests.support.daemon import Daemon
from tests.support.remotes import generic_remote
from tests.support.s3 import SeaweedFS, boto_client, list_keys, make_bucket, s3_daemon, weed  # noqa: F401 (fixtures)

KiB, MiB = 1 << 10, 1 << 20
LIMIT = 2 * MiB + 512 * KiB
WRITE = "wrt-sweep-5d1c"


def test_two_daemons_one_sweeper(upstream: Any, s3_daemon: Callable[..., Daemon], weed: SeaweedFS) -> None:
    bucket = make_bucket(weed.endpoint)
    bodies = {f"/files/f{n}.bin": os.urandom(MiB) for n in range(4)}
    for path, data in bodies.items():
        upstream.add(path, data)
    remotes = {"r": generic_remote(upstream), "uploads": {"type": "local"}}

    def make(host: str) -> Daemon:
        # A 1 MiB tier holds the latest body only: the others come from the bucket.
        return s3_daemon(weed.endpoint, bucket, remotes, tier="1MiB", env={"SPARKCACHE_WRITE_TOKEN": WRITE},
                         max_size=LIMIT, sweep_interval="300ms", sweep_grace="2s", host_id=host)

    def holder() -> str | None:
        keys = list_keys(weed.endpoint, bucket, "sc/sweeper")
        if "sc/sweeper" not in keys:
            return None
        return str(json.loads(boto_client(weed.endpoint).get_object(Bucket=bucket, Key="sc/sweeper")["Body"].read())["host"])

    # A first, so that A holds the lease (for a minute: renewed every round) and
    # ranks with its own hints, flushed before each round: which bodies go is known.
    a = make("host-a")
    assert eventually(holder) == "host-a"
    b = make("host-b")
    pinned = os.urandom(256 * KiB)
    put = a.request("PUT", "/api/uploads/dir/pinned.bin", body=pinned,
                    headers={"Authorization": f"Bearer {WRITE}"})
    assert put.status == 201, put.describe()
    eventually(lambda: f"sc/pinned/{sha256(pinned)}" in list_keys(weed.endpoint, bucket, "sc/pinned/"))
    def committed() -> int:
        listed = a.get("/api/r/")
        return len(listed.json()["entries"]) if listed.status == 200 else 0

    for n, (path, data) in enumerate(bodies.items()):
        got = a.get(f"/api/r{path}")
        assert got.status == 200 and got.body == data, got.describe()
        # Committed (and so noted as used) before the next one is asked for:
        # commits run side by side in the I/O pool, and on a loaded machine
        # f1's once finished after f2's, which made f2 the older.
        eventually(lambda: committed() > n, message=f"{path} was never committed")

    def swept() -> dict[str, int] | None:
        # Every body committed (so uploaded: a client's last byte comes before that), then swept.
        if committed() < len(bodies):
            return None
        cas = list_keys(weed.endpoint, bucket, "sc/cas/")
        return cas if sum(cas.values()) <= LIMIT else None

    cas = eventually(swept, timeout=30, message="the bucket was never swept under storage.s3.max_size")
    assert f"sc/cas/{sha256(pinned)}" in cas  # pinned: never swept
    gone = [p for p, d in bodies.items() if f"sc/cas/{sha256(d)}" not in cas]
    assert len(gone) >= 2, cas
    assert sorted(gone) == ["/files/f0.bin", "/files/f1.bin"]  # least recently used first
    assert holder() == "host-a"  # B, running the same timer, never took it
    # The index documents of swept bodies went with them: B does not find them.
    before = len(upstream.requests_for(gone[0]))
    first = b.get(f"/api/r{gone[0]}")
    assert first.status == 200 and first.body == bodies[gone[0]], first.describe()
    assert first.header("X-Cache") == "MISS"
    assert len(upstream.requests_for(gone[0])) == before + 1
    get_until_hit(b, f"/api/r{gone[0]}", bodies[gone[0]])
    # A's row still names the other swept body: the fill finds it gone, a miss, not a 5xx.
    again = a.get(f"/api/r{gone[1]}")
    assert again.status == 200 and again.body == bodies[gone[1]], again.describe()
    assert again.header("X-Cache") == "MISS"
    get_until_hit(a, f"/api/r{gone[1]}", bodies[gone[1]])
    # The upload, long out of A's 1 MiB tier, still comes back from the bucket.
    up = a.get("/api/uploads/dir/pinned.bin")
    assert up.status == 200 and up.body == pinned, up.describe()


@pytest_twisted.ensureDeferred
async def test_sweeper_clears_old_leftovers_on_seaweedfs(weed: SeaweedFS) -> None:
    """The sweeper's leftovers round on a real server: an incomplete multipart
    upload under the prefix older than the age is aborted, a younger one is
    kept, one outside the prefix is never touched; an old ``tmp/`` object goes.
    The age and the clock are the sweeper's (injected); the uploads' times are
    SeaweedFS's own, read back from ListMultipartUploads."""
    from twisted.internet import reactor, task
    from twisted.internet.threads import deferToThread

    from sparkcache.store.s3.client import S3Client
    from sparkcache.store.s3.settings import S3Credentials, S3Settings
    from sparkcache.store.s3.sweep import Sweeper
    from tests.support.s3 import ACCESS_KEY, SECRET_KEY

    bucket = make_bucket(weed.endpoint)
    boto = boto_client(weed.endpoint)

    def start(key: str) -> str:
        uid = str(boto.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"])
        boto.upload_part(Bucket=bucket, Key=key, UploadId=uid, PartNumber=1, Body=b"x" * 1024)
        return uid

    def initiated() -> dict[str, float]:
        listed = boto.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return {str(u["UploadId"]): u["Initiated"].timestamp() for u in listed}

    boto.put_object(Bucket=bucket, Key="sc/tmp/host-a/4567", Body=b"staged")  # first: as old as ``old``
    old = start("sc/tmp/host-a/0123")
    theirs = start("elsewhere/tmp/0123")
    boto.put_object(Bucket=bucket, Key="sc/pinned/" + "ab" * 32, Body=b"")
    # A younger upload: SeaweedFS dates uploads to the second, so until its date differs.
    fresh = start("sc/cas/" + "cd" * 32)
    while initiated()[fresh] <= initiated()[old]:
        boto.abort_multipart_upload(Bucket=bucket, Key="sc/cas/" + "cd" * 32, UploadId=fresh)
        await task.deferLater(reactor, 0.25, lambda: None)
        fresh = start("sc/cas/" + "cd" * 32)
    dates = initiated()
    assert {old, theirs, fresh} <= set(dates)
    clock = task.Clock()
    # Dates are to the second (the sweeper counts the end of it): at the end of the
    # fresh one's second, an age the old one is past and the fresh one not.
    clock.advance(dates[fresh] + 1.0)
    age = (dates[fresh] - dates[old]) / 2
    settings = S3Settings(endpoint=weed.endpoint, bucket=bucket, prefix="sc/",
                          credentials=S3Credentials(ACCESS_KEY, SECRET_KEY), attempts=2, backoff=0.01, timeout=30)
    client = S3Client(settings, reactor, deferToThread)
    try:
        sweeper = Sweeper(client, "sc/", "host-a", max_size=2**40, clock=clock, lease_duration=300, settle=0,
                          leftover_age=age)
        report = await sweeper.tick()
    finally:
        await client.close()
    assert report is not None and report.uploads_aborted == 1, report
    left = initiated()
    assert old not in left and fresh in left and theirs in left
    keys = list_keys(weed.endpoint, bucket)
    assert "sc/tmp/host-a/4567" not in keys and report.leftovers_deleted == 1
    assert "sc/pinned/" + "ab" * 32 in keys
