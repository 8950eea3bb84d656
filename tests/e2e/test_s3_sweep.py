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
    for path, data in bodies.items():
        got = a.get(f"/api/r{path}")
        assert got.status == 200 and got.body == data, got.describe()

    def swept() -> dict[str, int] | None:
        # Every body committed (so uploaded: a client's last byte comes before that), then swept.
        listed = a.get("/api/r/")
        if listed.status != 200 or len(listed.json()["entries"]) < len(bodies):
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
