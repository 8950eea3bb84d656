"""Git mirrors with two worker processes (server.workers: 2, docs/workers.rst).

Both workers accept on one socket; each test makes sure both are part of what
it checks: while the upstream holds every pack negotiation
(``GitUpstream.hold_packs``), clients are started until each worker holds at
least one of their connections (read from /proc), so the herd really spans
the two processes. Real daemon, ``git http-backend`` upstream, real git."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from tests.support.git_upstream import (  # noqa: F401 - fixture
    GitUpstream,
    git,
    git_client,
    git_daemon_config,
    git_upstream_factory,
)
from tests.support.client import eventually
from tests.support.tools import require_tool

WORKERS = {"workers": 2, "access_log": True}


def worker_pids(d: Any) -> list[int]:
    """The daemon's worker processes (children of the supervisor)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if int(fields[1]) == d.pid and fields[0] != "Z" and b"sparkcache.workers.worker" in cmd:
            out.append(int(entry))
    return sorted(out)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        pass
    return inodes


def connections_by_worker(d: Any) -> dict[int, int]:
    """pid -> established client connections to the daemon's port that worker holds."""
    established: set[str] = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
            if local_port == d.port and parts[3] == "01":  # ESTABLISHED, accepted by the daemon
                established.add(parts[9])
    return {pid: len(_socket_inodes(pid) & established) for pid in worker_pids(d)}


def spread(d: Any, pool: ThreadPoolExecutor, client: Callable[[int], Any], most: int = 40) -> list[Future[Any]]:
    """Start clients (which hang: the upstream holds packs) until both workers hold one."""
    started: list[Future[Any]] = []
    for i in range(most):
        started.append(pool.submit(client, i))
        try:
            eventually(lambda: sum(connections_by_worker(d).values()) >= len(started), timeout=10)
        except AssertionError:
            pass  # a client that failed fast: its Future says why, later
        if len([n for n in connections_by_worker(d).values() if n]) == 2:
            return started
    raise AssertionError(f"{most} clients, and one worker held none: {connections_by_worker(d)}\n{d.log_tail()}")


def served_by(d: Any, path_part: str) -> set[str]:
    """Which workers ("[worker i") logged a request whose path contains ``path_part``."""
    out = set()
    for line in d.log().splitlines():
        if path_part in line and "[worker " in line:
            out.add(line.split("[worker ", 1)[1].split()[0])
    return out


def lock_holders(path: Path) -> set[int]:
    """The pids holding a flock on ``path`` (from /proc/locks)."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "FLOCK" in parts and parts[-3] == key:
                holders.add(int(parts[-4]))
    return holders


def test_concurrent_first_clones_across_both_workers_clone_upstream_once(git_upstream_factory: Any,
                                                                         daemon_factory: Any, tmp_path: Path) -> None:
    require_tool("git")
    up: GitUpstream = git_upstream_factory()
    sha = up.create("app", files={"a.txt": "a\n"})
    host = f"127.0.0.1:{up.port}"
    d = daemon_factory(server=WORKERS, extra=git_daemon_config(allowed_hosts=[f"http://{host}"]))
    url = d.url(f"/git/{host}/app.git")
    home = tmp_path / "home"
    up.hold_packs()  # the first clone stays in flight while the others arrive

    def clone(i: int) -> subprocess.CompletedProcess[str]:
        return git_client("clone", "-q", "--bare", url, str(tmp_path / f"c{i}"), home=home, check=False)

    with ThreadPoolExecutor(40) as pool:
        clients = spread(d, pool, clone)
        eventually(lambda: up.holding >= 1, timeout=60, message="the upstream clone")
        up.release_packs()
        results = [f.result(timeout=120) for f in clients]
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    assert up.negotiations("app") == 1, up.describe()  # one upstream clone for the whole herd
    for i in range(len(results)):
        assert git("rev-parse", "refs/heads/main", cwd=tmp_path / f"c{i}") == sha
    assert served_by(d, f"/git/{host}/app.git/info/refs") == {"0", "1"}
    # One registration, listed by whichever worker answers.
    for _ in range(4):
        repos = json.loads(d.get("/repos").body)
        assert [r["name"] for r in repos] == [f"{host}/app"], repos


def test_a_refresh_storm_across_both_workers_is_one_upstream_fetch(git_upstream_factory: Any, daemon_factory: Any,
                                                                   tmp_path: Path) -> None:
    require_tool("git")
    up: GitUpstream = git_upstream_factory()
    up.create("app", files={"a.txt": "a\n"})
    d = daemon_factory(server=WORKERS, extra=git_daemon_config({"app": up.url("app")}, min_fetch_interval="3s"))
    home = tmp_path / "home"
    git_client("clone", "-q", "--bare", d.url("/git/app"), str(tmp_path / "c"), home=home)
    sha = up.commit({"b.txt": "b\n"}, "second", name="app")
    # Each upstream fetch (and each ref listing before one) starts with a GET info/refs.
    before = up.fetches("app")
    up.hold_packs()

    def refresh(i: int) -> tuple[int, Any]:
        r = d.request("POST", "/git/refresh?name=app", timeout=120)
        return r.status, json.loads(r.body)

    interval = 3.0
    with ThreadPoolExecutor(40) as pool:
        clients = spread(d, pool, refresh)
        clients += [pool.submit(refresh, 100 + i) for i in range(8)]
        eventually(lambda: up.holding >= 1, timeout=60, message="the upstream fetch")
        released = time.monotonic()
        up.release_packs()
        answers = [f.result(timeout=120) for f in clients]
        elapsed = time.monotonic() - released
    assert [s for s, _ in answers] == [200] * len(answers), answers
    assert all(body["refs"]["refs/heads/main"] == sha for _, body in answers)
    # Refreshes asked before the fetch ended joined it, in both workers, without a
    # word to the upstream; one that reached its worker after it ended waited out
    # min_fetch_interval first.
    assert 1 <= up.fetches("app") - before <= 1 + int(elapsed // interval), (elapsed, up.describe())
    assert up.negotiations("app") == 2  # the first clone and this one fetch
    assert served_by(d, "/git/refresh") == {"0", "1"}
    # Right after it, the next storm waits out min_fetch_interval and is one fetch again.
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        again = list(pool.map(refresh, range(8)))
    elapsed = time.monotonic() - t0
    assert [s for s, _ in again] == [200] * 8
    assert up.fetches("app") - before <= 2 + int(elapsed // interval), up.describe()


def test_a_registration_and_a_refresh_in_one_worker_are_served_by_the_other(
        git_upstream_factory: Any, daemon_factory: Any, tmp_path: Path) -> None:
    require_tool("git")
    up: GitUpstream = git_upstream_factory()
    up.create("app", files={"a.txt": "a\n"})
    token = "git-workers-write-7d1f"
    d = daemon_factory(server=WORKERS, extra=git_daemon_config(allowed_hosts=[f"http://127.0.0.1:{up.port}"]),
                       auth={"anonymous_read": True, "tokens": [{"name": "ci", "token": token,
                                                                  "scopes": ["read", "write"]}]})
    r = d.request("POST", f"/git/register?name=app&repo={up.url('app')}",
                  headers={"Authorization": f"Bearer {token}"})
    assert r.status == 201, r.describe()
    home = tmp_path / "home"

    def tips(i: int) -> str:
        out = git_client("ls-remote", d.url("/git/app"), "refs/heads/main", home=home).stdout
        return out.split()[0]

    first = up.rev("main", name="app")
    # Fresh connections until both workers served the mirror registered in one of them.
    eventually(lambda: tips(0) == first and served_by(d, "/git/app/info/refs") == {"0", "1"},
               timeout=60, message="both workers serving app")

    # A refresh in one worker: every clone, through either worker, sees the new tip
    # (fetch_interval is an hour: no worker would have looked upstream by itself).
    sha = up.commit({"b.txt": "b\n"}, "second", name="app")
    assert json.loads(d.request("POST", "/git/refresh?name=app").body)["refs"]["refs/heads/main"] == sha
    n = len(d.log().splitlines())
    seen: set[str] = set()
    for i in range(40):
        assert tips(i) == sha
        git_client("clone", "-q", "--bare", d.url("/git/app"), str(tmp_path / f"c{i}"), home=home)
        assert git("rev-parse", "refs/heads/main", cwd=tmp_path / f"c{i}") == sha
        seen = {line.split("[worker ", 1)[1].split()[0] for line in d.log().splitlines()[n:]
                if "/git/app/git-upload-pack" in line and "[worker " in line}
        if seen == {"0", "1"}:
            break
    assert seen == {"0", "1"}, d.log_tail()


def test_the_primary_killed_mid_fetch_leaves_a_sound_mirror(git_upstream_factory: Any, daemon_factory: Any,
                                                            tmp_path: Path) -> None:
    require_tool("git")
    up: GitUpstream = git_upstream_factory()
    up.create("app", files={"a.txt": "a\n"})
    # The check loop (primary only) looks every second.
    d = daemon_factory(server=WORKERS,
                       extra=git_daemon_config({"app": up.url("app")}, fetch_interval="1s", max_interval="1s",
                                               min_fetch_interval="0s"))
    home = tmp_path / "home"
    git_client("clone", "-q", "--bare", d.url("/git/app"), str(tmp_path / "c0"), home=home)
    mirrors = list((d.data_dir / "git" / "mirrors").iterdir())
    assert len(mirrors) == 1
    lock = d.data_dir / "git" / "locks" / f"{mirrors[0].name}.lock"
    workers = worker_pids(d)
    assert len(workers) == 2

    up.hold_packs()
    sha = up.commit({"big.bin": os.urandom(1 << 20).hex()}, "second", name="app")
    eventually(lambda: up.holding >= 1, timeout=60, message="the loop's fetch")
    holders = eventually(lambda: lock_holders(lock) & set(workers), timeout=60, message="the fetching worker's lock")
    assert len(holders) == 1
    (victim,) = holders
    os.kill(victim, signal.SIGKILL)
    eventually(lambda: victim not in worker_pids(d) and len(worker_pids(d)) == 2, timeout=60, message="the restart")
    up.release_packs()

    # The next fetch succeeds (the kernel dropped the dead worker's lock), through either worker.
    r = d.request("POST", "/git/refresh?name=app", timeout=120)
    assert r.status == 200 and json.loads(r.body)["refs"]["refs/heads/main"] == sha, r.describe()
    fsck = subprocess.run(["git", "fsck", "--no-dangling"], cwd=mirrors[0], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for i in range(1, 5):
        git_client("clone", "-q", "--bare", d.url("/git/app"), str(tmp_path / f"c{i}"), home=home)
        assert git("rev-parse", "refs/heads/main", cwd=tmp_path / f"c{i}") == sha


def on_worker(d: Any, worker: int, method: str, path: str) -> tuple[int, bytes]:
    """``method path`` answered by worker ``worker``: fresh connections until /health on
    one says that worker, then the request on that same (kept-alive) connection."""
    for _ in range(200):
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
        try:
            conn.request("GET", "/health")
            r = conn.getresponse()
            if json.loads(r.read()).get("worker") != worker:
                continue
            conn.request(method, path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()
    raise AssertionError(f"200 connections, none to worker {worker}")


def until_holds(check: Callable[[], Any], timeout: float, message: str) -> Any:
    """``check()``'s value once it stops failing its assertions; its last failure after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{message}: {e}") from None
        time.sleep(0.2)


def test_a_mirror_served_only_through_the_other_worker_is_checked_at_fetch_interval(
        git_upstream_factory: Any, daemon_factory: Any) -> None:
    require_tool("git")
    up: GitUpstream = git_upstream_factory()
    for name in ("hot", "cold", "fresh"):
        up.create(name, files={"a.txt": f"{name}\n"})
    # The loop (in the primary, worker 0) checks mirrors served or changed within the
    # hour every second, others hourly.
    d = daemon_factory(server=WORKERS, extra=git_daemon_config({n: up.url(n) for n in ("hot", "cold", "fresh")},
                                                               fetch_interval="1s", max_interval="1h"))
    adv = "/git/{}/info/refs?service=git-upload-pack"
    assert on_worker(d, 1, "GET", adv.format("hot"))[0] == 200  # cloned and served by worker 1
    assert on_worker(d, 1, "POST", "/git/refresh?name=fresh")[0] == 200  # cloned by worker 1: a change

    def repos(worker: int) -> dict[str, Any]:
        status, body = on_worker(d, worker, "GET", "/repos")
        assert status == 200, body
        return {r["name"]: r for r in json.loads(body)}

    def settled() -> dict[str, Any]:
        seen = [repos(0), repos(1)]
        for r in seen:  # both workers show the loop's times (the primary's)
            assert r["hot"]["interval"] == 1 and r["hot"]["last_served"] is not None, r["hot"]
            assert r["fresh"]["interval"] == 1 and r["fresh"]["last_served"] is None, r["fresh"]
            # "cold": in git.repos, never asked for (not cloned): looked at hourly.
            assert r["cold"]["interval"] == 3600 and r["cold"]["last_served"] is None, r["cold"]
            assert r["cold"]["next_check"] > r["hot"]["last_check"] + 3000, (r["cold"], r["hot"])
        return seen[1]

    first = until_holds(settled, 60, "hot and fresh at fetch_interval, cold backed off")
    # The primary's loop keeps checking "hot" (only worker 1 serves it) every second.
    until_holds(lambda: assert_at_least(repos(0)["hot"]["last_check"], first["hot"]["last_check"] + 3), 60,
                "hot checked by the loop")
    assert settled()["cold"]["next_check"] == first["cold"]["next_check"]  # cold: not checked again
    assert served_by(d, "/git/hot/") == {"1"}, d.log_tail()

    # A clone of "cold" through worker 1: the primary brings it back to fetch_interval.
    assert on_worker(d, 1, "GET", adv.format("cold"))[0] == 200
    served = repos(1)["cold"]["last_served"]
    assert served is not None

    def active() -> None:
        for worker in (0, 1):
            cold = repos(worker)["cold"]
            # Stamps are written once per fetch_interval: the other worker may show the
            # serve's first instant (its advertisement) rather than its last.
            assert cold["interval"] == 1 and served - 1 <= cold["last_served"] <= served, cold
            assert cold["last_check"] >= served + 2, cold  # the loop's checks since, not the serve's
    until_holds(active, 60, "cold back at fetch_interval")
    assert served_by(d, "/git/cold/") == {"1"}, d.log_tail()


def assert_at_least(value: float, floor: float) -> None:
    assert value >= floor, (value, floor)
