"""The cross-host lease end to end: twistd daemons on one SeaweedFS bucket
(signatures and conditional writes checked), a real upstream, urllib clients.

- 16 concurrent first fetches spread over two daemons → exactly 1 upstream
  fetch (SeaweedFS honours ``If-None-Match: *``): the host that lost the
  lease serves the other's entry from the bucket;
- a server that ignores the conditions (the fault proxy answers 200 where
  SeaweedFS said 412) → at most one upstream fetch per host, every body whole;
- the lease holder killed (SIGKILL) mid-fetch → the other host takes the
  lease over once it expired and serves a whole, correct body.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest

from tests.support.client import Fetch, get_until_hit
from tests.support.daemon import Daemon
from tests.support.remotes import generic_remote
from tests.support.s3 import FaultProxy, list_keys, proxied, s3_daemon, weed  # noqa: F401 (fixtures)

MiB = 1 << 20
PATH = "/files/herd.bin"


@pytest.fixture
def two_hosts(s3_daemon: Callable[..., Daemon], upstream: Any,
              proxied: tuple[FaultProxy, str]) -> Callable[..., tuple[Daemon, Daemon]]:
    """``make(**s3_keys)``: two daemons on one bucket (through the proxy), one remote."""
    proxy, bucket = proxied

    def make(**s3: Any) -> tuple[Daemon, Daemon]:
        remotes = {"r": generic_remote(upstream)}
        return tuple(s3_daemon(proxy.endpoint, bucket, remotes, **s3) for _ in range(2))  # type: ignore[return-value]

    return make


def herd(upstream: Any, one: Daemon, two: Daemon, body: bytes, n: int = 16) -> list[Any]:
    """``n`` concurrent first fetches over both daemons, the upstream held until all were sent."""
    upstream.add(PATH, body)
    upstream.behave(PATH, pause_at=MiB, times=1)
    fetches = [Fetch((one if i % 2 else two).port, "/api/r" + PATH, timeout=60) for i in range(n)]
    for f in fetches:
        f.start()
    upstream.wait_paused(PATH)
    for f in fetches:
        assert f.sent.wait(30)
    upstream.resume(PATH)
    return [f.response() for f in fetches]


def test_concurrent_first_fetches_over_two_hosts_make_one_upstream_fetch(upstream, two_hosts, weed, proxied):
    one, two = two_hosts()
    body = os.urandom(4 * MiB)
    responses = herd(upstream, one, two, body)
    assert all(r.status == 200 and r.body == body for r in responses), [r.describe() for r in responses]
    assert len(upstream.requests_for(PATH)) == 1
    # The waiting host served the entry the other published, from the bucket.
    assert any(r.header("X-Cache") == "HIT" for r in responses)
    # Every lease was let go.
    assert not [k for k in list_keys(weed.endpoint, proxied[1], "sc/") if k.startswith("sc/leases/")]


def test_server_ignoring_conditions_one_fetch_per_host(upstream, two_hosts, proxied):
    proxy, _ = proxied
    proxy.arm("PUT", "/sc/leases/", "unconditional", times=1000)
    one, two = two_hosts()
    body = os.urandom(2 * MiB)
    responses = herd(upstream, one, two, body)
    assert all(r.status == 200 and r.body == body for r in responses), [r.describe() for r in responses]
    assert 1 <= len(upstream.requests_for(PATH)) <= 2


def test_holder_killed_mid_fetch_other_host_takes_over(upstream, two_hosts, weed, proxied):
    _, bucket = proxied
    one, two = two_hosts(lease_ttl="2s")
    body = os.urandom(3 * MiB)
    upstream.add(PATH, body)
    upstream.behave(PATH, pause_at=MiB, times=1)
    first = Fetch(one.port, "/api/r" + PATH, timeout=60)
    first.start()
    upstream.wait_paused(PATH)  # one holds the lease and is mid-fetch
    assert [k for k in list_keys(weed.endpoint, bucket, "sc/") if k.startswith("sc/leases/")]
    second = Fetch(two.port, "/api/r" + PATH, timeout=60)
    second.start()
    assert second.sent.wait(30)
    assert len(upstream.requests_for(PATH)) == 1  # two waits for one's lease
    one.kill()
    resp = second.response()
    assert resp.status == 200 and resp.body == body and resp.header("X-Cache") == "MISS", resp.describe()
    assert len(upstream.requests_for(PATH)) == 2
    assert "took over the expired lease" in two.log()
    upstream.resume(PATH)
    get_until_hit(two, "/api/r" + PATH, body)  # stored whole after the response ended
    assert len(upstream.requests_for(PATH)) == 2
