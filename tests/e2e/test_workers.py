"""``server.workers: 2``: one parent holding the socket, two worker processes
answering on it; a worker killed with SIGKILL is restarted while the other
keeps serving; SIGTERM stops all of them cleanly (docs/workers.rst)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import time

from tests.support.daemon import daemon_env, twistd_command
from tests.support.remotes import generic_remote


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _requests_counted(d) -> float:
    text = d.get("/metrics").body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sparkcache_requests_total{") and 'remote="r"' in line)


def _workers_seen(d, stale: frozenset[int] = frozenset(), timeout: float = 60) -> dict[int, int]:
    """worker index -> pid, from /health over fresh connections, until both
    workers answered; answers from a pid in ``stale`` (a killed worker) are ignored."""
    seen: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            h = d.get("/health").json()
        except OSError:
            continue  # a connection accepted by the killed worker, reset
        if h["pid"] in stale:
            continue
        seen[h["worker"]] = h["pid"]
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only workers {seen} answered\n{d.log_tail()}")


def test_two_workers_share_the_socket_and_survive_a_kill(upstream, daemon_factory):
    upstream.add("/files/x.bin", b"x" * 100_000)
    d = daemon_factory({"r": generic_remote(upstream)}, server={"workers": 2})
    workers = _workers_seen(d)
    assert set(workers) == {0, 1}
    for pid in workers.values():
        assert pid != d.pid and _ppid(pid) == d.pid  # children of the one service process
    # A client can have the whole body before its entry is committed; a request
    # the other worker gets in that window tails the first one's spool (the
    # cross-process singleflight, fetch/across.py) instead of fetching again.
    # Once committed, whichever worker answers, one store behind both serves it.
    served = 0
    for _ in range(100):
        r = d.get("/api/r/files/x.bin")
        served += 1
        assert r.status == 200 and r.body == b"x" * 100_000
        if r.header("X-Cache") == "HIT":
            break
    fetched = upstream.count("/files/x.bin")
    assert fetched == 1
    for _ in range(6):
        r = d.get("/api/r/files/x.bin")
        assert r.status == 200 and r.body == b"x" * 100_000
        served += 1
    assert upstream.count("/files/x.bin") == fetched

    # /metrics, from whichever worker answers, counts the requests both served.
    for _ in range(4):
        assert _requests_counted(d) == served

    os.kill(workers[1], signal.SIGKILL)
    # Worker 1 comes back under a new pid; worker 0 never stopped.
    again = _workers_seen(d, stale=frozenset({workers[1]}))
    assert again[0] == workers[0]
    assert again[1] != workers[1] and _ppid(again[1]) == d.pid
    assert d.get("/api/r/files/x.bin").body == b"x" * 100_000
    assert upstream.count("/files/x.bin") == fetched
    assert "worker 1 (pid %d) died (signal 9)" % workers[1] in d.log()

    assert d.stop() == 0
    for pid in again.values():
        assert not _alive(pid)
    assert "Traceback" not in d.log()


def test_workers_stop_when_the_parent_is_killed(daemon_factory):
    d = daemon_factory({}, server={"workers": 2})
    pids = _workers_seen(d).values()
    d.kill()  # SIGKILL: the parent cannot forward anything
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), "a worker outlived its supervisor"


def test_sighup_reloads_every_worker_and_kills_none(daemon_factory):
    d = daemon_factory({}, server={"workers": 2})
    before = _workers_seen(d)
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while d.log().count("SIGHUP: reloading") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.log().count("SIGHUP: reloading") == 2  # each worker re-reads the file
    assert _workers_seen(d) == before  # the same two processes still answer
    assert d.stop() == 0


def test_a_listener_that_cannot_bind_fails_the_start(tmp_path, upstream):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        cfg = tmp_path / "cache.yaml"
        cfg.write_text(
            f"server: {{workers: 2, listen: ['tcp:{taken.getsockname()[1]}:interface=127.0.0.1']}}\n"
            f"storage: {{data_dir: {tmp_path / 'data'}}}\n"
        )
        proc = subprocess.run(twistd_command(cfg, tmp_path / "log"),
                              env=daemon_env(), cwd=tmp_path,
                              capture_output=True, timeout=60)
        assert proc.returncode == 1
        log = (tmp_path / "log").read_text()
        assert "could not start" in log and "started worker" not in log
    finally:
        taken.close()


def _on_a_worker(d, avoid: int | None = None, timeout: float = 60) -> tuple[http.client.HTTPConnection, int]:
    """A keep-alive connection and the pid of the worker that accepted it (its
    requests all go there), not ``avoid``'s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
        conn.request("GET", "/health")
        resp = conn.getresponse()
        pid = json.loads(resp.read())["pid"]
        if pid != avoid:
            return conn, pid
        conn.close()
    raise AssertionError(f"no connection reached a worker other than {avoid}")


def _inflight(d) -> float:
    """The whole daemon's in-flight fetches (/metrics aggregates the workers)."""
    text = d.get("/metrics").body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sparkcache_inflight_fetches"))


def _cut_off_or_whole(resp: http.client.HTTPResponse, got: bytes, body: bytes) -> str:
    """A client's end: "cut off", or "whole" (every byte, the right sha256);
    never a clean end of a partial body."""
    try:
        got += resp.read()
    except (http.client.IncompleteRead, ConnectionError):
        return "cut off"
    assert len(got) == len(body) and hashlib.sha256(got).digest() == hashlib.sha256(body).digest(), \
        f"a body ended cleanly after {len(got)} of {len(body)} bytes, or with other bytes"
    return "whole"


def test_a_worker_killed_mid_download(upstream, daemon_factory):
    body = os.urandom(2 << 20)
    upstream.add("/files/big.bin", body)
    upstream.behave("/files/big.bin", pause_at=256 << 10, times=1)
    d = daemon_factory({"r": generic_remote(upstream)}, server={"workers": 2})
    _workers_seen(d)
    first, producer = _on_a_worker(d)
    other, follower = _on_a_worker(d, avoid=producer)
    try:
        first.request("GET", "/api/r/files/big.bin")
        a = first.getresponse()
        assert a.status == 200 and a.read(64 << 10) == body[:64 << 10]
        upstream.wait_paused("/files/big.bin")
        # A client of the other worker tails the same spool (no fetch of its own).
        other.request("GET", "/api/r/files/big.bin")
        b = other.getresponse()
        assert b.status == 200 and b.read(64 << 10) == body[:64 << 10]
        assert upstream.count("/files/big.bin") == 1
        assert _inflight(d) == 1  # the follower is not counted as a fetch

        os.kill(producer, signal.SIGKILL)
        # Its client is cut off, never handed a clean end of a partial body.
        assert _cut_off_or_whole(a, body[:64 << 10], body) == "cut off"
        upstream.clear("/files/big.bin")
        # The follower's client: the whole body or cut off (here the owner died
        # mid-body: cut off), never a clean truncated end.
        _cut_off_or_whole(b, body[:64 << 10], body)
    finally:
        first.close()
        other.close()
    # The surviving worker and the restarted one keep serving; the body is stored whole.
    workers = _workers_seen(d, stale=frozenset({producer}))
    assert producer not in workers.values() and follower in workers.values()
    for _ in range(4):
        r = d.get("/api/r/files/big.bin")
        assert r.status == 200 and hashlib.sha256(r.body).digest() == hashlib.sha256(body).digest()
    # The killed fetch, then exactly one more for the whole daemon.
    assert upstream.count("/files/big.bin") == 2
    # The dead worker's half-written spool file went with its restart.
    deadline = time.monotonic() + 30
    while d.spool_files() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.spool_files() == []
    assert _inflight(d) == 0
    assert d.stop() == 0
    assert "Traceback" not in d.log()
