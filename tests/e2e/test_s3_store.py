"""storage.backend: s3 end to end: a real daemon (twistd) on a real SeaweedFS
(`weed server -s3`, signatures checked) with a fault proxy in between, a real
upstream, urllib clients.

- a miss is uploaded to ``<prefix>cas/<sha256>`` and the next request is a
  hit from the local tier; with the tier too small for both bodies, the one
  pushed out is a hit again from the bucket, with 0 upstream requests;
- a body deleted from the bucket behind the daemon's back is a miss (fetched
  from upstream again and re-uploaded), never a 5xx;
- the bucket unreachable: what the tier holds stays a HIT, new misses pass
  through (X-Cache: BYPASS) with their whole body;
- SeaweedFS killed mid-upload: nothing committed, the (chunked) client's
  response is cut off, and the next request passes through;
- ``server.workers: 2``: a miss through one worker is a tier hit through
  both; a herd over both workers is one upstream fetch, and on a second host
  one fill from the bucket; the tier stays under ``tier.max_size``; a Range
  of a body evicted from the tier is a ranged GET from the bucket (then the
  tier has it again);
- the credentials appear neither in the log nor in /config.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.support.client import Fetch, eventually, get_until_hit, sha256
from tests.support.daemon import Daemon
from tests.support.remotes import generic_remote
from tests.support.s3 import (  # noqa: F401 (weed, proxied, s3_daemon: fixtures)
    ACCESS_KEY, ADMIN, SECRET_KEY, FaultProxy, SeaweedFS, boto_client, list_keys, make_bucket, proxied, s3_daemon,
    weed,
)

MiB = 1 << 20


def upstream_gets(upstream: Any, path: str) -> int:
    return len(upstream.requests_for(path))


def test_miss_then_tier_hit_then_bucket_hit(upstream, s3_daemon, proxied, weed):
    proxy, bucket = proxied
    a, b = os.urandom(3 * MiB), os.urandom(3 * MiB)
    upstream.add("/files/a.bin", a)
    upstream.add("/files/b.bin", b)
    d = s3_daemon(proxy.endpoint, bucket, {"r": generic_remote(upstream)}, tier="4MiB")
    first = d.get("/api/r/files/a.bin")
    assert first.status == 200 and first.body == a and first.header("X-Cache") == "MISS"
    # Uploaded before the index row, which may come just after the client's last byte.
    eventually(lambda: list_keys(weed.endpoint, bucket, "sc/cas/") == {f"sc/cas/{sha256(a)}": len(a)})
    gets = proxy.count("GET")
    hit = get_until_hit(d, "/api/r/files/a.bin", a)
    assert hit.header("X-Cache") == "HIT"
    assert proxy.count("GET") == gets, "a hit in the tier asked the bucket"
    # b pushes a out of the 4 MiB tier; a is then a hit again, from the bucket.
    assert d.get("/api/r/files/b.bin").body == b
    get_until_hit(d, "/api/r/files/b.bin", b)
    eventually(lambda: not any((d.data_dir / "tier" / "sha256" / sha256(a)[:2]).glob(sha256(a))),
               message="a was not evicted from the tier")
    again = d.get("/api/r/files/a.bin")
    assert again.status == 200 and again.body == a and again.header("X-Cache") == "HIT", again.describe()
    assert upstream_gets(upstream, "/files/a.bin") == 1
    assert any(m == "GET" and sha256(a) in p for m, p in proxy.paths), "a did not come from the bucket"
    # Range requests on a body that came from the bucket.
    part = d.get("/api/r/files/a.bin", headers={"Range": "bytes=100-199"})
    assert part.status == 206 and part.body == a[100:200]
    # No secret in the log or in /config.
    cfg = d.get("/config", headers={"Authorization": f"Bearer {ADMIN}"})
    assert cfg.status == 200, cfg.describe()
    assert cfg.json()["storage"]["backend"] == "s3" and cfg.json()["storage"]["s3"]["credentials"] == "***"
    for blob in (cfg.body, d.log().encode()):
        assert SECRET_KEY.encode() not in blob and ACCESS_KEY.encode() not in blob


def test_blob_deleted_from_the_bucket_is_a_miss(upstream, s3_daemon, proxied, weed):
    proxy, bucket = proxied
    a = os.urandom(2 * MiB)
    upstream.add("/files/a.bin", a)
    d = s3_daemon(proxy.endpoint, bucket, {"r": generic_remote(upstream)})
    assert d.get("/api/r/files/a.bin").body == a
    get_until_hit(d, "/api/r/files/a.bin", a)
    # Behind the daemon's back: gone from the bucket, and from the tier.
    boto_client(weed.endpoint).delete_object(Bucket=bucket, Key=f"sc/cas/{sha256(a)}")
    d.stop()
    for p in (d.data_dir / "tier").rglob(sha256(a)):
        p.unlink()
    d.start()
    resp = d.get("/api/r/files/a.bin")
    assert resp.status == 200 and resp.body == a, resp.describe()
    assert resp.header("X-Cache") == "MISS"
    assert upstream_gets(upstream, "/files/a.bin") == 2
    # Stored again: in the bucket, and a hit.
    get_until_hit(d, "/api/r/files/a.bin", a)
    assert f"sc/cas/{sha256(a)}" in list_keys(weed.endpoint, bucket, "sc/cas/")


def test_bucket_down_tier_serves_and_misses_pass_through(upstream, s3_daemon, proxied):
    proxy, bucket = proxied
    a, b, c = os.urandom(MiB), os.urandom(MiB), os.urandom(MiB)
    for name, data in (("a", a), ("b", b), ("c", c)):
        upstream.add(f"/files/{name}.bin", data)
    d = s3_daemon(proxy.endpoint, bucket, {"r": generic_remote(upstream)})
    assert d.get("/api/r/files/a.bin").body == a
    get_until_hit(d, "/api/r/files/a.bin", a)
    proxy.stop()  # the bucket is unreachable from now on
    # The first miss finds out (its client still gets the whole body) ...
    first = d.get("/api/r/files/b.bin")
    assert first.status == 200 and first.body == b, first.describe()
    eventually(lambda: "S3 bucket is unreachable" in d.log(), timeout=30)
    # ... then misses pass through uncached, and tier hits keep serving.
    second = d.get("/api/r/files/c.bin")
    assert second.status == 200 and second.body == c and second.header("X-Cache") == "BYPASS", second.describe()
    hit = d.get("/api/r/files/a.bin")
    assert hit.status == 200 and hit.body == a and hit.header("X-Cache") == "HIT"
    again = d.get("/api/r/files/b.bin")
    assert again.status == 200 and again.body == b and again.header("X-Cache") == "BYPASS", again.describe()
    assert upstream_gets(upstream, "/files/a.bin") == 1


def test_s3_killed_mid_upload_commits_nothing(upstream, s3_daemon, tmp_path: Path):
    own = SeaweedFS(tmp_path / "weed").start()  # this one is killed
    try:
        bucket = make_bucket(own.endpoint)
        proxy = FaultProxy(own.endpoint)
        size = 40 * MiB
        data = os.urandom(size)
        upstream.add("/files/big.bin", data)
        # Chunked: the client's response ends only when the fetch does.
        upstream.behave("/files/big.bin", chunked=True, times=1)
        d = s3_daemon(proxy.endpoint, bucket, {"r": generic_remote(upstream)},
                      multipart_threshold="5MiB", part_size="5MiB")
        proxy.arm("PUT", "partNumber=3", "stall")  # held until SeaweedFS is gone
        f = Fetch(d.port, "/api/r/files/big.bin", timeout=60)
        f.start()
        eventually(lambda: any("partNumber=3" in p for _, p in proxy.paths), timeout=60,
                   message="the upload never reached its third part")
        own.kill()
        proxy.released.set()
        f.join(60)
        assert not f.is_alive(), "the client hung"
        cut = isinstance(f.result, BaseException) or f.result is None or len(f.result.body) < size
        assert cut, f"the response was not cut off: {f.result!r}"
        eventually(lambda: not d.spool_files(), message="a spool file was left behind")
        # Nothing committed: the next request passes through (the bucket is down).
        resp = d.get("/api/r/files/big.bin", timeout=60)
        assert resp.status == 200 and sha256(resp.body) == sha256(data)
        assert resp.header("X-Cache") == "BYPASS", resp.describe()
        assert "storing" in d.log() or "S3" in d.log()
        proxy.stop()
    finally:
        own.kill()



def test_two_daemons_one_bucket_share_entries(upstream, s3_daemon, proxied, weed):
    proxy, bucket = proxied
    a = os.urandom(2 * MiB)
    upstream.add("/files/a.bin", a)
    remotes = {"r": generic_remote(upstream)}
    one = s3_daemon(proxy.endpoint, bucket, remotes)
    two = s3_daemon(proxy.endpoint, bucket, remotes)
    assert one.get("/api/r/files/a.bin").body == a
    get_until_hit(one, "/api/r/files/a.bin", a)
    # Fetched through one: a hit on two, its body from the bucket, upstream not asked.
    resp = two.get("/api/r/files/a.bin")
    assert resp.status == 200 and resp.body == a and resp.header("X-Cache") == "HIT", resp.describe()
    assert upstream_gets(upstream, "/files/a.bin") == 1
    assert any(k.startswith("sc/index/") for k in list_keys(weed.endpoint, bucket, "sc/"))
    # A purge through one reaches two: it fetches afresh.
    purge = one.request("POST", "/admin/purge", headers={"Authorization": f"Bearer {ADMIN}"})
    assert purge.status == 200, purge.describe()
    three = s3_daemon(proxy.endpoint, bucket, remotes)  # no row of its own: asks the bucket's index
    again = three.get("/api/r/files/a.bin")
    assert again.status == 200 and again.body == a and again.header("X-Cache") == "MISS", again.describe()


def test_concurrent_first_fetches_on_two_daemons(upstream, s3_daemon, proxied):
    proxy, bucket = proxied
    a = os.urandom(4 * MiB)
    upstream.add("/files/herd.bin", a)
    upstream.behave("/files/herd.bin", pause_at=MiB, times=1)
    remotes = {"r": generic_remote(upstream)}
    one = s3_daemon(proxy.endpoint, bucket, remotes)
    two = s3_daemon(proxy.endpoint, bucket, remotes)
    _paused_herd(upstream, [one, two], "/files/herd.bin", a)
    # No cross-host lease yet: at most one upstream fetch per host.
    assert upstream_gets(upstream, "/files/herd.bin") <= 2


@pytest_twisted.ensureDeferred
async def test_virtual_host_addressing_is_signed_right(weed, tmp_path: Path):
    """``addressing: virtual`` against SeaweedFS (``-s3.domainName=localhost``),
    which checks each signature, with <bucket>.localhost connected to 127.0.0.1."""
    import hashlib

    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.threads import deferToThread
    from twisted.web.client import Agent
    from zope.interface import implementer
    from twisted.web.iweb import IAgentEndpointFactory

    from sparkcache.store.s3.bodies import FileSink
    from sparkcache.store.s3.client import S3Client
    from sparkcache.store.s3.settings import S3Credentials, S3Settings
    from tests.support.s3 import ACCESS_KEY as AK, SECRET_KEY as SK

    @implementer(IAgentEndpointFactory)
    class Loopback:
        def endpointForURI(self, uri: Any) -> Any:
            return TCP4ClientEndpoint(reactor, "127.0.0.1", uri.port)

    bucket = make_bucket(weed.endpoint)
    settings = S3Settings(endpoint=f"http://localhost:{weed.port}", bucket=bucket, addressing="virtual", prefix="v/",
                          credentials=S3Credentials(AK, SK), attempts=1, timeout=30)
    client = S3Client(settings, reactor, deferToThread, agent=Agent.usingEndpointFactory(reactor, Loopback()))
    data = os.urandom(100_000)
    src = tmp_path / "body"
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()

    assert client.url("v/cas/x").startswith(f"http://{bucket}.localhost:{weed.port}/")
    out = tmp_path / "out"
    try:
        assert await client.put_file(f"v/cas/{digest}", str(src), len(data), digest)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            await client.get_to(f"v/cas/{digest}", FileSink(fd, reactor, 30, limit=len(data)))
        finally:
            os.close(fd)
    finally:
        await client.close()
    assert out.read_bytes() == data
    assert list_keys(weed.endpoint, bucket, "v/") == {f"v/cas/{digest}": len(data)}


# -- server.workers: 2 -----------------------------------------------------------------------


def _per_worker(d: Daemon, timeout: float = 60) -> dict[int, http.client.HTTPConnection]:
    """A keep-alive connection to each worker (worker index -> connection)."""
    conns: dict[int, http.client.HTTPConnection] = {}
    deadline = time.monotonic() + timeout
    while len(conns) < 2 and time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
        conn.request("GET", "/health")
        worker = json.loads(conn.getresponse().read())["worker"]
        if worker in conns:
            conn.close()
        else:
            conns[worker] = conn
    assert len(conns) == 2, f"only workers {sorted(conns)} answered"
    return conns


def _get(conn: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, resp.getheader("X-Cache") or "", resp.read()


def _tier_bytes(d: Daemon) -> int:
    return sum(p.stat().st_size for p in (d.data_dir / "tier" / "sha256").rglob("*") if p.is_file())


def _cas_gets(proxy: FaultProxy, digest: str) -> int:
    """Whole-body GETs of the object (fills), not ranged ones."""
    whole = sum(1 for m, p in proxy.paths if m == "GET" and p.endswith(f"/sc/cas/{digest}"))
    return whole - sum(1 for p, _ in proxy.ranges if p.endswith(f"/sc/cas/{digest}"))


def _herd(daemons: list[Daemon], path: str, n: int = 16) -> list[Fetch]:
    fetches = [Fetch(daemons[i % len(daemons)].port, path, timeout=60) for i in range(n)]
    for f in fetches:
        f.start()
    return fetches


def _paused_herd(upstream: Any, daemons: list[Daemon], path: str, body: bytes) -> None:
    """16 GETs of ``path`` over ``daemons``, all sent while the upstream holds
    the body (``behave(pause_at=...)``), then released: each gets it whole."""
    fetches = _herd(daemons, f"/api/r{path}")
    upstream.wait_paused(path)
    for f in fetches:
        assert f.sent.wait(30)
    upstream.resume(path)
    for f in fetches:
        assert f.response().body == body


def test_two_workers_share_one_tier(upstream, s3_daemon, proxied, weed):
    proxy, bucket = proxied
    bodies = {name: os.urandom(MiB) for name in "abc"}
    for name, data in bodies.items():
        upstream.add(f"/files/{name}.bin", data)
    herd = os.urandom(4 * MiB)
    upstream.add("/files/herd.bin", herd)
    upstream.behave("/files/herd.bin", pause_at=MiB, times=1)
    d = s3_daemon(proxy.endpoint, bucket, {"r": generic_remote(upstream)}, tier="2560KiB", workers=2)
    conns = _per_worker(d)
    a = bodies["a"]
    # A miss through worker 1, then a hit through both, from the one tier (no bucket GET).
    status, state, body = _get(conns[1], "/api/r/files/a.bin")
    assert status == 200 and body == a and state == "MISS"
    get_until_hit(d, "/api/r/files/a.bin", a)
    gets = proxy.count("GET")
    for i in (0, 1):
        # (A worker that tailed the other's production may still be finishing
        # that flight for a moment: its joiners get MISS, the same bytes.)
        deadline = time.monotonic() + 60
        while True:
            status, state, body = _get(conns[i], "/api/r/files/a.bin")
            assert status == 200 and body == a, f"worker {i}: {status} {state}"
            if state == "HIT" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert state == "HIT", f"worker {i}: {state}"
    assert proxy.count("GET") == gets, "a tier hit asked the bucket"
    assert upstream_gets(upstream, "/files/a.bin") == 1

    # A herd over both workers: one upstream fetch, committed into the tier (no fill from the bucket).
    _paused_herd(upstream, [d], "/files/herd.bin", herd)
    assert upstream_gets(upstream, "/files/herd.bin") == 1
    assert _cas_gets(proxy, sha256(herd)) == 0
    # The herd's clients can have every byte before the body is committed (its
    # upload to the bucket comes first): wait for the commit, or on a loaded
    # machine it lands after b's and c's and is the most recently used body,
    # which the tier keeps even above its bound (seen: 4 MiB held for good).
    get_until_hit(d, "/api/r/files/herd.bin", herd)
    assert _cas_gets(proxy, sha256(herd)) == 0

    # b and c through either worker: the tier (2.5 MiB) keeps under its bound, the primary evicting.
    for i, name in ((1, "b"), (0, "c"), (1, "c"), (0, "b")):
        status, _, body = _get(conns[i], f"/api/r/files/{name}.bin")
        assert status == 200 and body == bodies[name]
    get_until_hit(d, "/api/r/files/c.bin", bodies["c"])
    eventually(lambda: _tier_bytes(d) <= 2560 * 1024, timeout=30,
               message=f"the tier holds more than its bound: {_tier_bytes(d)} bytes")
    assert not (d.data_dir / "tier" / "sha256" / sha256(a)[:2] / sha256(a)).exists()

    # A Range of a, evicted from the tier: a ranged GET from the bucket, through the other worker.
    ranges = len(proxy.ranges)
    status, state, body = _get(conns[1], "/api/r/files/a.bin", {"Range": "bytes=1000-4999"})
    assert status == 206 and body == a[1000:5000] and state == "HIT", (status, state, len(body))
    assert (f"/{bucket}/sc/cas/{sha256(a)}", "bytes=1000-4999") in proxy.ranges[ranges:], proxy.ranges[ranges:]
    # The tier was filled (verified) meanwhile: the next request is a tier hit, no bucket GET.
    eventually(lambda: (d.data_dir / "tier" / "sha256" / sha256(a)[:2] / sha256(a)).exists(),
               message="a did not come back into the tier")
    gets = proxy.count("GET")
    status, state, body = _get(conns[0], "/api/r/files/a.bin", {"Range": "bytes=-100"})
    assert status == 206 and body == a[-100:]
    assert proxy.count("GET") == gets
    assert upstream_gets(upstream, "/files/a.bin") == 1
    for c in conns.values():
        c.close()


def test_two_hosts_of_two_workers(upstream, s3_daemon, proxied):
    """A cold herd over two hosts of two workers each is one upstream fetch
    (the cross-process lock makes one worker per host ask for the lease);
    a herd on a host whose tier lacks a body is one fill from the bucket."""
    proxy, bucket = proxied
    cold, warm = os.urandom(4 * MiB), os.urandom(2 * MiB)
    upstream.add("/files/cold.bin", cold)
    upstream.add("/files/warm.bin", warm)
    upstream.behave("/files/cold.bin", pause_at=MiB, times=1)
    remotes = {"r": generic_remote(upstream)}
    one = s3_daemon(proxy.endpoint, bucket, remotes, workers=2)
    two = s3_daemon(proxy.endpoint, bucket, remotes, workers=2)
    _paused_herd(upstream, [one, two], "/files/cold.bin", cold)
    assert upstream_gets(upstream, "/files/cold.bin") == 1
    # warm: into the bucket through one; a herd on two's workers fills its tier once.
    assert one.get("/api/r/files/warm.bin").body == warm
    get_until_hit(one, "/api/r/files/warm.bin", warm)
    for f in _herd([two], "/api/r/files/warm.bin"):
        resp = f.response()
        assert resp.body == warm and resp.header("X-Cache") == "HIT", resp.describe()
    assert upstream_gets(upstream, "/files/warm.bin") == 1
    assert _cas_gets(proxy, sha256(warm)) == 1
