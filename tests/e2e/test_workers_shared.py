"""``server.workers: 2`` looks and acts as one daemon (docs/workers.rst, "Shared between workers").

- A remote PUT or DELETEd through ``/admin/remotes``, by many clients at once,
  is in effect in every worker by the time each answer arrives, and none of
  the concurrent changes is lost.
- ``/status.json`` and ``/health`` give the whole daemon's figures, the same
  whichever worker answers.
- A write error one worker hits makes every worker pass misses through.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from sparkcache.fetch.xlock import RANGES_NAME
from tests.e2e.test_disk_full import ADMIN as DISK_ADMIN
from tests.e2e.test_disk_full import cut_off, small_disk  # noqa: F401 (a fixture)
from tests.e2e.test_workers import _workers_seen
from tests.support.client import Fetch
from tests.support.daemon import Daemon
from tests.support.remotes import generic_remote

MiB = 1 << 20
ADMIN = "adm-shared-9c2e51"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
WORKERS = {"workers": 2}


def answers(d: Daemon, path: str, headers: dict[str, str] | None = None, tries: int = 400) -> list[Any]:
    """``path``'s JSON answers over fresh connections until both workers gave one (all of them, in order).
    Asked four at a time: one after another, a loaded machine once let the
    same worker win every accept of 400 (the other woke too late each time)."""
    every: list[Any] = []
    with ThreadPoolExecutor(4) as pool:
        for _ in range(tries // 4):
            for resp in pool.map(lambda _: d.get(path, headers), range(4)):
                assert resp.status == 200, resp.describe()
                every.append(resp.json())
            if len({a["worker"] for a in every}) == 2:
                return every
    raise AssertionError(f"only worker(s) {sorted({a['worker'] for a in every})} answered {path}\n{d.log_tail()}")


def by_worker(d: Daemon, path: str, headers: dict[str, str] | None = None) -> dict[int, Any]:
    """``path``'s first JSON answer from each of the two workers."""
    first: dict[int, Any] = {}
    for a in answers(d, path, headers):
        first.setdefault(a["worker"], a)
    return first


def in_parallel(calls: list[Callable[[], Any]]) -> list[Any]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def test_remote_changes_reach_every_worker_before_the_answer(upstream, daemon_factory):
    upstream.add("/files/x.bin", b"from the file's remote")
    names = [f"api{n}" for n in range(6)]
    for name in names:
        upstream.add(f"/{name}/files/y.bin", f"served by {name}".encode())
    d = daemon_factory({"r": generic_remote(upstream)}, server=WORKERS, env={"SPARKCACHE_ADMIN_TOKEN": ADMIN})
    _workers_seen(d)

    # Six PUTs at once over six connections: the kernel hands them to both workers.
    def put(name: str) -> Any:
        body = json.dumps(generic_remote(upstream, prefix=f"/{name}")).encode()
        return d.request("PUT", f"/admin/remotes/{name}", AS_ADMIN, body)

    for resp in in_parallel([lambda n=n: put(n) for n in names]):
        assert resp.status == 201, resp.describe()
    # No waiting: each answer came once every worker ran the change.
    for listing in answers(d, "/admin/remotes", AS_ADMIN):
        assert {r["name"] for r in listing["remotes"]} == {"r", *names}, listing
    with open(os.path.join(d.data_dir, "remotes.d", "api.json")) as f:
        assert set(json.load(f)["remotes"]) == set(names)  # no concurrent change was lost
    for n in range(12):
        name = names[n % len(names)]
        resp = d.get(f"/api/{name}/files/y.bin")
        assert resp.status == 200 and resp.body == f"served by {name}".encode(), resp.describe()

    gone, kept = names[:3], names[3:]
    for resp in in_parallel([lambda n=n: d.request("DELETE", f"/admin/remotes/{n}", AS_ADMIN) for n in gone]):
        assert resp.status == 200, resp.describe()
    for listing in answers(d, "/admin/remotes", AS_ADMIN):
        assert {r["name"] for r in listing["remotes"]} == {"r", *kept}, listing
    for n in range(8):
        assert d.get(f"/api/{gone[n % 3]}/files/y.bin").status == 404
        assert d.get(f"/api/{kept[n % 3]}/files/y.bin").status == 200

    log = d.log()
    assert "did not apply the remotes change" not in log and "Traceback" not in log
    assert d.stop() == 0
    # Each key's cross-process lock went with its release: locks/ keeps no file per key fetched
    # (its one file of byte-range locks aside, where the kernel has them: fetch/xlock.py).
    left = [f for _, _, files in os.walk(os.path.join(d.data_dir, "locks")) for f in files if f.endswith(".lock")]
    assert left in ([], [RANGES_NAME]), left


def test_status_and_health_are_the_whole_daemons(upstream, daemon_factory):
    size = 50_000
    upstream.add("/files/x.bin", b"x" * size)
    d = daemon_factory({"r": generic_remote(upstream)}, server=WORKERS)
    _workers_seen(d)
    served = 0
    for _ in range(20):  # fresh connections: both workers answer some
        resp = d.get("/api/r/files/x.bin")
        assert resp.status == 200 and len(resp.body) == size, resp.describe()
        served += 1

    def counted(status: dict[str, Any]) -> bool:
        row = next((r for r in status["remotes"] if r["name"] == "r"), None)
        return row is not None and row["requests"] == served and status["totals"]["requests"] == served \
            and row["bytes_cache"] + row["bytes_upstream"] == served * size

    def settled() -> dict[int, Any]:
        """Once the primary took a sample, the entry is committed (a client
        can have the whole body before the commit, and the other worker may
        tail it) and every hit is counted: each worker publishes the hits it
        batched every second (docs/workers.rst, "Metrics"), so an answer
        from one worker may lack the other's last second of hits."""
        deadline = time.monotonic() + 60
        while True:
            answers = by_worker(d, "/status.json")
            done = all(a["history"]["samples"] and a["inflight_fetches"] == 0 and counted(a)
                       for a in answers.values())
            if done or time.monotonic() > deadline:
                return answers
            time.sleep(0.1)

    answers = settled()
    for worker, status in answers.items():
        row = next(r for r in status["remotes"] if r["name"] == "r")
        assert row["requests"] == served and row["hits"] + row["misses"] == served, (worker, row)
        assert row["bytes_cache"] + row["bytes_upstream"] == served * size, (worker, row)
        assert status["totals"]["requests"] == served, (worker, status["totals"])
        assert status["inflight_fetches"] == 0 and status["workers"] == 2
        assert status["connections"]["connections"] >= 1  # this very request's
        assert status["history"]["samples"], "the primary's history is every worker's"
    h0, h1 = (answers[w]["history"]["samples"] for w in (0, 1))
    shorter, longer = sorted((h0, h1), key=len)
    assert longer[:len(shorter)] == shorter  # one history (the primary may have sampled between the two)
    ups = {w: next(u for u in s["upstreams"] if u["remotes"] == ["r"]) for w, s in answers.items()}
    assert all(u["state"] == "ok" for u in ups.values()), ups

    for worker, health in by_worker(d, "/health").items():
        assert health["inflight_fetches"] == 0 and health["connections"] >= 1 and health["shed_total"] == 0
        assert health["store_entries"] >= 1 and not health["store_low_space"], (worker, health)
    assert d.stop() == 0


def test_a_write_error_in_one_worker_holds_in_every_worker(upstream, small_disk):  # noqa: F811
    size = 100 * MiB
    upstream.add("/files/big.bin", os.urandom(size))
    others = {f"/files/o{n}.bin": os.urandom(64 << 10) for n in range(8)}
    for p, body in others.items():
        upstream.add(p, body)
    upstream.behave("/files/big.bin", chunked=True, times=1)
    d = small_disk({"r": generic_remote(upstream)}, server=WORKERS)
    _workers_seen(d)
    assert all(h["store_write_error"] is None for h in by_worker(d, "/health").values())

    # Chunked, so the spool fills the 64 MiB disk in whichever worker fetches it.
    first = Fetch(d.port, "/api/r/files/big.bin", timeout=60)
    first.start()
    assert cut_off(first, size), f"a body the disk could not hold was not cut off: {first.result!r}"
    # Both workers now know (for storage's 30 s hold): /health says so, and misses pass through.
    for worker, health in by_worker(d, "/health").items():
        assert health["store_write_error"], (worker, health)
    for p, body in others.items():
        resp = d.get("/api/r" + p)
        assert resp.status == 200 and resp.body == body, resp.describe()
        assert resp.header("X-Cache") == "BYPASS", resp.describe()
    # A purge gives the space back and clears the hold in every worker.
    assert d.request("POST", "/admin/purge", headers={"Authorization": f"Bearer {DISK_ADMIN}"}).status == 200
    stored = d.get("/api/r/files/o0.bin")
    assert stored.header("X-Cache") == "MISS", stored.describe()
