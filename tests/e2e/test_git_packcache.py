"""The pack cache end to end: real ``git clone`` through the daemon, real upstream.

Identical full clones are computed once (one ``git upload-pack`` run) and
served to everyone from the store; refs moving upstream (after a refresh)
make the next clone compute a new pack; shallow clones bypass the cache.
The daemon's metrics count the computations: result "miss" starts one,
"joined" tails one in progress, "hit" is served from the store.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.git_upstream import git, git_env, git_upstream_factory  # noqa: F401
from tests.support.tools import require_tool

CLONE_TIMEOUT = 60


def clone(url: str, dest: Path, *args: str, protocol: int = 2) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-c", f"protocol.version={protocol}", "clone", "-q", *args, url, str(dest)],
                          env=git_env(), capture_output=True, text=True, timeout=CLONE_TIMEOUT)


def pack_metrics(daemon) -> dict[str, float]:
    resp = daemon.get("/metrics")
    assert resp.status == 200, resp.describe()
    out: dict[str, float] = {}
    for m in re.finditer(r'^sparkcache_requests_total\{remote="git-packs",result="(\w+)"\} ([0-9.e+]+)$',
                         resp.body.decode(), re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def computed(daemon) -> int:
    return daemon.log().count("pack cache: computing a pack")


def make_upstream(git_upstream_factory):  # noqa: F811
    up = git_upstream_factory()
    up.create("app", files={"README": "app\n"})
    # a few MB of incompressible content, so a pack takes a moment to compute
    for i in range(3):
        up.commit({f"data/blob{i}.bin": os.urandom(1 << 20), "README": f"rev {i}\n"}, f"change {i}", name="app")
    up.tag("v1", up.rev("refs/heads/main", "app"), name="app")
    return up


def test_parallel_clones_compute_one_pack(git_upstream_factory, daemon_factory, tmp_path):  # noqa: F811
    require_tool("git")
    up = make_upstream(git_upstream_factory)
    d = daemon_factory(extra={"git": {"repos": {"app": up.url("app")}, "fetch_interval": "1h"}})
    url = f"http://127.0.0.1:{d.port}/git/app"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: clone(url, tmp_path / f"c{i}", "--bare"), range(8)))
    for r in results:
        assert r.returncode == 0, r.stderr
    tips = {git("for-each-ref", "--format=%(objectname) %(refname)", cwd=tmp_path / f"c{i}") for i in range(8)}
    assert len(tips) == 1, tips
    assert up.rev("refs/heads/main", "app") in tips.pop()
    for i in range(8):
        git("fsck", "--strict", cwd=tmp_path / f"c{i}")

    m = pack_metrics(d)
    assert m.get("miss") == 1, m
    assert m.get("miss", 0) + m.get("joined", 0) + m.get("hit", 0) == 8, m
    assert computed(d) == 1, d.log_tail(200)

    # one more, checked out: served from the store, byte for byte the same pack
    r = clone(url, tmp_path / "work")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "work" / "data" / "blob2.bin").stat().st_size == 1 << 20
    assert pack_metrics(d).get("hit", 0) >= 1 and computed(d) == 1


def test_refs_move_then_new_pack_and_bypasses(git_upstream_factory, daemon_factory, tmp_path):  # noqa: F811
    require_tool("git")
    up = make_upstream(git_upstream_factory)
    d = daemon_factory(extra={"git": {"repos": {"app": up.url("app")}, "fetch_interval": "1h"}})
    url = f"http://127.0.0.1:{d.port}/git/app"

    assert clone(url, tmp_path / "a", "--bare").returncode == 0
    assert clone(url, tmp_path / "b", "--bare").returncode == 0
    # a response ends only once its pack is committed: the second clone is a hit
    assert pack_metrics(d) == {"miss": 1, "hit": 1}

    new = up.commit({"NEW": "after the first clones\n"}, "moved", name="app")
    resp = d.request("POST", "/git/refresh?name=app")
    assert resp.status == 200, resp.describe()
    r = clone(url, tmp_path / "c", "--bare")
    assert r.returncode == 0, r.stderr
    assert git("rev-parse", "refs/heads/main", cwd=tmp_path / "c") == new
    git("fsck", "--strict", cwd=tmp_path / "c")
    assert pack_metrics(d).get("miss") == 2, "moved refs must not be answered with the old pack"
    assert computed(d) == 2

    # protocol v0 asks differently: its own pack, also cached
    for name in ("v0a", "v0b"):
        r = clone(url, tmp_path / name, "--bare", protocol=0)
        assert r.returncode == 0, r.stderr
        assert git("rev-parse", "refs/heads/main", cwd=tmp_path / name) == new
    assert computed(d) == 3

    # shallow and partial clones go straight to upload-pack
    before = pack_metrics(d)
    for name, args in (("shallow", ("--depth", "1")), ("partial", ("--filter=blob:none",))):
        r = clone(url, tmp_path / name, "--bare", *args)
        assert r.returncode == 0, r.stderr
    assert pack_metrics(d) == before
    assert git("rev-parse", "HEAD", cwd=tmp_path / "shallow") == new


def test_packs_respect_max_size(git_upstream_factory, daemon_factory, tmp_path):  # noqa: F811
    require_tool("git")
    up = make_upstream(git_upstream_factory)  # a pack of about 3 MiB
    d = daemon_factory(storage={"max_size": "1MiB", "eviction_interval": "1s"},
                       extra={"git": {"repos": {"app": up.url("app")}, "fetch_interval": "1h"}})
    url = f"http://127.0.0.1:{d.port}/git/app"

    assert clone(url, tmp_path / "a", "--bare").returncode == 0
    assert pack_metrics(d) == {"miss": 1}
    deadline = time.monotonic() + 30
    while not re.search(r"^sparkcache_evicted_total [1-9]", d.get("/metrics").body.decode(), re.M):
        assert time.monotonic() < deadline, "the pack was never evicted from a store over max_size"
        time.sleep(0.2)
    r = clone(url, tmp_path / "b", "--bare")
    assert r.returncode == 0, r.stderr
    git("fsck", "--strict", cwd=tmp_path / "b")
    assert pack_metrics(d).get("miss") == 2, "an evicted pack is computed again"
