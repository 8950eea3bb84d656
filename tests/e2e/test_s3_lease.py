"""The cross-host lease end to end: twistd daemons on one SeaweedFS bucket
(signatures and conditional writes checked), a real upstream, urllib clients.

- 16 concurrent first fetches spread over two daemons → exactly 1 upstream
  fetch (SeaweedFS honours ``If-None-Match: *``): the host that lost the
  lease serves the other's entry from the bucket;
- a server that ignores the conditions (the fault proxy answers 200 where
  SeaweedFS said 412) → at most one upstream fetch per host, every body whole;
- the lease holder killed (SIGKILL) mid-fetch → the other host takes the
  lease over once it expired and serves a whole, correct body.

Peer streaming (``storage.s3.peer_url``: the host that lost the lease tails
the holder's flight through ``GET /_peer/flight/<sha256(key)>``):

- the 16 concurrent first fetches again: 1 upstream fetch, every body whole,
  every answer a MISS (the waiting host's clients tail the holder's flight);
- the waiting host's client gets the head of the body while the upstream
  still holds its tail back (so before the holder's download ended), the
  upstream asked once;
- the endpoint refuses a missing, malformed, stale or wrongly keyed token
  with a 403 JSON error, and answers a valid one with no flight 404;
- the holder killed mid-stream → the waiting host's client is aborted (never
  a clean short end), and its next request is served whole after the lease
  expired and was taken over.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import threading
import time
from typing import Any, Callable

import pytest

from sparkcache.fetch.peer import sign
from tests.support.client import Fetch, assert_json_error, eventually, get_until_hit
from tests.support.daemon import Daemon, free_port
from tests.support.remotes import generic_remote
from tests.support.s3 import (  # noqa: F401 (proxied, weed: fixtures)
    SECRET_KEY, FaultProxy, list_keys, proxied, s3_daemon_options, weed,
)

MiB = 1 << 20
PATH = "/files/herd.bin"


def metric(d: Daemon, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples on ``d``'s /metrics whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    got = d.get("/metrics")
    assert got.status == 200, got.describe()
    return sum(s.value for f in text_string_to_metric_families(got.body.decode()) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture
def two_hosts(daemon_factory: Callable[..., Daemon], upstream: Any,
              proxied: tuple[FaultProxy, str]) -> Callable[..., tuple[Daemon, Daemon]]:
    """``make(**s3_keys)``: two daemons on one bucket (through the proxy), one remote."""
    proxy, bucket = proxied

    def make(n: int = 2, peer: bool = False, **s3: Any) -> tuple[Daemon, Daemon]:
        """``peer``: each daemon advertises ``peer_url`` (its own address) in its leases."""
        remotes = {"r": generic_remote(upstream)}
        made = []
        for _ in range(n):
            port = free_port()
            extra = {"peer_url": f"http://127.0.0.1:{port}"} if peer else {}
            made.append(daemon_factory(remotes, port=port, **s3_daemon_options(proxy.endpoint, bucket, **s3, **extra)))
        return tuple(made)  # type: ignore[return-value]

    return make


def herd(upstream: Any, one: Daemon, two: Daemon, body: bytes, n: int = 16, joined: bool = False) -> list[Any]:
    """``n`` concurrent first fetches over both daemons, the upstream held until
    all were sent; ``joined``: until all had their headers (every client is
    part of a flight: none comes late to a body already stored)."""
    upstream.add(PATH, body)
    upstream.behave(PATH, pause_at=MiB, times=1)
    fetches = [Fetch((one if i % 2 else two).port, "/api/r" + PATH, timeout=60) for i in range(n)]
    for f in fetches:
        f.start()
    upstream.wait_paused(PATH)
    for f in fetches:
        assert f.sent.wait(30)
        if joined:
            assert f.got_headers.wait(30)
    upstream.resume(PATH)
    return [f.response() for f in fetches]


@pytest.mark.parametrize("peer", [False, True], ids=["lease", "lease+peer"])
def test_concurrent_first_fetches_over_two_hosts_make_one_upstream_fetch(upstream, two_hosts, weed, proxied, peer):
    one, two = two_hosts(peer=peer)
    body = os.urandom(4 * MiB)
    # (With peer streaming every client gets its headers while upstream is held;
    # a request sent but read by its daemon only after the commit would be a HIT.)
    responses = herd(upstream, one, two, body, joined=peer)
    assert all(r.status == 200 and r.body == body for r in responses), [r.describe() for r in responses]
    assert len(upstream.requests_for(PATH)) == 1
    if peer:  # the waiting host's clients tailed the holder's flight
        assert all(r.header("X-Cache") == "MISS" for r in responses)
        assert "while it fetches" in one.log() + two.log()
    else:  # the waiting host served the entry the other published, from the bucket
        assert any(r.header("X-Cache") == "HIT" for r in responses)
    # One lease taken (one upstream fetch), the other host's production waited for it.
    leases = {o: metric(one, "sparkcache_s3_leases_total", outcome=o) + metric(two, "sparkcache_s3_leases_total",
                                                                                   outcome=o)
              for o in ("taken", "waited", "taken_over", "lost")}
    assert leases["taken"] == 1 and leases["waited"] >= 1 and leases["taken_over"] == leases["lost"] == 0, leases
    # Every lease was let go (with peers the clients may be done before the holder's upload is).
    eventually(lambda: not [k for k in list_keys(weed.endpoint, proxied[1], "sc/") if k.startswith("sc/leases/")],
               timeout=30, message="a lease stayed")


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


# -- peer streaming ----------------------------------------------------------------------


class Stream(threading.Thread):
    """A GET that counts the body's bytes as they arrive; ``head`` is set once
    ``want`` of them did. ``complete``: the whole announced length came."""

    def __init__(self, port: int, path: str, want: int) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.want = port, path, want
        self.head = threading.Event()
        self.chunks: list[bytes] = []
        self.received = 0
        self.status: int | None = None
        self.length: int | None = None
        self.x_cache: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", self.path)
            resp = conn.getresponse()
            self.status, self.x_cache = resp.status, resp.getheader("X-Cache")
            length = resp.getheader("Content-Length")
            self.length = int(length) if length is not None else None
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                self.chunks.append(chunk)
                self.received += len(chunk)
                if self.received >= self.want:
                    self.head.set()
        except (OSError, http.client.HTTPException) as e:
            self.error = e
        finally:
            conn.close()
            self.head.set()  # (the test then looks at received)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def complete(self) -> bool:
        return self.error is None and self.length is not None and self.received == self.length

    def finish(self, timeout: float = 60) -> "Stream":
        self.join(timeout)
        assert not self.is_alive(), f"GET {self.path} did not end within {timeout}s"
        return self


def test_waiting_host_streams_the_holders_flight_before_its_download_ends(upstream, two_hosts, proxied):
    one, two = two_hosts(peer=True)
    body = os.urandom(3 * MiB)
    upstream.add(PATH, body)
    upstream.behave(PATH, pause_at=MiB, times=1)  # the tail is held until resume()
    first = Stream(one.port, "/api/r" + PATH, want=1)
    first.start()
    upstream.wait_paused(PATH)  # one holds the lease and is mid-download
    second = Stream(two.port, "/api/r" + PATH, want=512 << 10)
    second.start()
    assert second.head.wait(30)
    # two's client has the head while the upstream still holds the rest back.
    assert second.received >= 512 << 10 and second.is_alive(), (second.received, second.error)
    assert second.status == 200 and second.x_cache == "MISS" and second.length == len(body)
    assert first.is_alive() and len(upstream.requests_for(PATH)) == 1
    upstream.resume(PATH)
    for s in (first.finish(), second.finish()):
        assert s.complete and s.body == body, (s.status, s.received, s.error)
    assert len(upstream.requests_for(PATH)) == 1
    assert "streaming" in two.log() and "while it fetches" in two.log()
    get_until_hit(two, "/api/r" + PATH, body)  # the published entry reached two
    assert len(upstream.requests_for(PATH)) == 1
    eventually(lambda: not two.spool_files(), message=f"the streamed spool stayed: {two.spool_files()}")
    # one took the lease and served its flight to two, which waited and followed it to the end.
    assert metric(one, "sparkcache_s3_leases_total", outcome="taken") == 1
    assert metric(two, "sparkcache_s3_leases_total", outcome="waited") == 1
    assert metric(one, "sparkcache_peer_streams_total", direction="served", outcome="complete") == 1
    assert metric(one, "sparkcache_peer_bytes_total", direction="served") == len(body)
    assert metric(two, "sparkcache_peer_streams_total", direction="followed", outcome="complete") == 1
    assert metric(two, "sparkcache_peer_bytes_total", direction="followed") == len(body)
    assert metric(two, "sparkcache_peer_streams_total", direction="followed", outcome="error") == 0
    # two kept what it streamed and verified: the body never came from the bucket (one
    # has it in its tier from its own commit, so no GET of it at all).
    proxy, bucket = proxied
    object_path = f"/{bucket}/sc/cas/{hashlib.sha256(body).hexdigest()}"
    assert not [p for m, p in proxy.paths if m == "GET" and p.startswith(object_path)], proxy.paths


def test_peer_endpoint_refuses_requests_without_a_valid_token(two_hosts, proxied):
    _, bucket = proxied
    (one,) = two_hosts(n=1, peer=True)
    path = "/_peer/flight/" + "ab" * 32
    key = hmac.new(SECRET_KEY.encode(), f"sparkcache-peer\n{bucket}\nsc/".encode(), hashlib.sha256).digest()
    now = time.time()
    for headers in ({}, {"X-Sparkcache-Peer": "garbage"}, {"X-Sparkcache-Peer": "123:" + "0" * 64},
                    {"X-Sparkcache-Peer": sign(b"another key of 32 bytes or so...", b"GET", path.encode(), now).decode()},
                    {"X-Sparkcache-Peer": sign(key, b"GET", b"/_peer/flight/" + b"cd" * 32, now).decode()},
                    {"X-Sparkcache-Peer": sign(key, b"GET", path.encode(), now - 3600).decode()}):
        doc = assert_json_error(one.get(path, headers=headers), 403)
        assert "token" in doc["error"], doc
    # The same key every host on the bucket derives: no flight of that key here.
    assert_json_error(one.get(path, headers={"X-Sparkcache-Peer": sign(key, b"GET", path.encode(), now).decode()}), 404)
    token = sign(key, b"GET", path.encode(), now).decode()
    assert token.split(":")[1] not in one.log()  # (never logged)


def test_holder_killed_mid_stream_aborts_the_waiting_hosts_client(upstream, two_hosts):
    one, two = two_hosts(peer=True, lease_ttl="2s")
    body = os.urandom(3 * MiB)
    upstream.add(PATH, body)
    upstream.behave(PATH, pause_at=MiB, times=1)
    first = Stream(one.port, "/api/r" + PATH, want=1)
    first.start()
    upstream.wait_paused(PATH)
    second = Stream(two.port, "/api/r" + PATH, want=512 << 10)
    second.start()
    assert second.head.wait(30) and second.received >= 512 << 10, (second.received, second.error)
    one.kill()
    second.finish()
    # Aborted: never a clean end short of the announced length.
    assert second.status == 200 and not second.complete and second.received < len(body), (
        second.received, second.length, second.error)
    # The next request works: two takes the lease over once it expired, and fetches.
    resp = two.get("/api/r" + PATH, timeout=60)
    assert resp.status == 200 and resp.body == body, resp.describe()
    assert len(upstream.requests_for(PATH)) == 2
    assert "broke off" in two.log()
    assert metric(two, "sparkcache_peer_streams_total", direction="followed", outcome="error") == 1
    assert metric(two, "sparkcache_s3_leases_total", outcome="taken_over") == 1
    upstream.resume(PATH)
