"""Upstream storms, end to end: anonymous clients cannot make the cache fetch
from the forge back-to-back (refreshes and unknown SHAs are coalesced into one
fetch per git.min_fetch_interval), and mirrors created on first use are
bounded (git.max_mirrors). A real daemon, git http-backend upstream, real git."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.support.git_upstream import (  # noqa: F401 - fixture
    GitUpstream,
    git_client,
    git_daemon_config,
    git_upstream_factory,
)
from tests.support.tools import require_tool


def test_a_storm_of_anonymous_refreshes_and_unknown_shas_is_paced(git_upstream_factory: Any, daemon_factory: Any,
                                                                   tmp_path: Path) -> None:
    require_tool("git")
    up: GitUpstream = git_upstream_factory()
    up.create("app", files={"a.txt": "a\n"})
    interval = 3.0
    d = daemon_factory(extra=git_daemon_config({"app": up.url("app")}, min_fetch_interval=f"{interval}s"))
    home = tmp_path / "home"
    git_client("clone", "-q", "--bare", d.url("/git/app"), str(tmp_path / "c"), home=home)
    before = up.count("app", "git-upload-pack", "GET")  # each upstream fetch starts with one

    def refresh(i: int) -> int:
        return d.request("POST", "/git/refresh?name=app", timeout=60).status

    def unknown_sha(i: int) -> int:
        # An id the mirror lacks makes the cache ask upstream (the push-then-clone race).
        r = git_client("fetch", "-q", d.url("/git/app"), f"{i + 1:040x}", cwd=tmp_path / "c", home=home,
                       check=False)
        return r.returncode

    started = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        refreshes = pool.map(refresh, range(24))
        fetches = pool.map(unknown_sha, range(12))
        statuses, codes = list(refreshes), list(fetches)
    elapsed = time.monotonic() - started
    assert statuses == [200] * 24
    assert all(c != 0 for c in codes)  # those ids exist nowhere
    # Unpaced, that was 36 upstream fetches; paced, one per interval at most.
    upstream = up.count("app", "git-upload-pack", "GET") - before
    assert 1 <= upstream <= 1 + math.ceil(elapsed / interval), (upstream, elapsed, up.describe())
    r = git_client("ls-remote", d.url("/git/app"), home=home)
    assert "refs/heads/main" in r.stdout


def test_mirrors_on_first_use_are_bounded(git_upstream_factory: Any, daemon_factory: Any, tmp_path: Path) -> None:
    require_tool("git")
    up: GitUpstream = git_upstream_factory()
    for name in ("one", "two"):
        up.create(name, files={"f": name})
    host = f"127.0.0.1:{up.port}"
    d = daemon_factory(extra=git_daemon_config(allowed_hosts=[f"http://{host}"], max_mirrors=1))
    home = tmp_path / "home"
    git_client("clone", "-q", d.url(f"/git/{host}/one.git"), str(tmp_path / "one"), home=home)
    r = git_client("clone", "-q", d.url(f"/git/{host}/two.git"), str(tmp_path / "two"), home=home, check=False)
    assert r.returncode != 0 and "max_mirrors" in r.stderr, r.stderr
    assert up.count("two", "git-upload-pack") == 0, "a refused mirror must not reach the forge"
    resp = d.get(f"/git/{host}/two.git/info/refs?service=git-upload-pack")
    assert resp.status == 507 and resp.header("Content-Type") == "application/json", resp.describe()
    assert "max_mirrors" in json.loads(resp.body)["error"]
    # the existing one is still served
    git_client("clone", "-q", d.url(f"/git/{host}/one.git"), str(tmp_path / "one-again"), home=home)
