"""ccache (Debian) with a kv remote as its HTTP remote storage, every layout:
a build, the local cache wiped, the same build again: every compilation a
remote hit. A remote whose entries are too small for ccache's results still
builds: the 413 only makes ccache skip the remote."""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.support.daemon import Daemon
from tests.support.kv_tools import C_UNITS, build_c, ccache_stats, tool_env, write_c_project
from tests.support.tools import require_tool

TOKEN = "kv-ccache-e2e-token"
AUTH = {"anonymous_read": False, "tokens": [{"name": "ci", "token": TOKEN, "scopes": ["read", "write"]}]}


def ccache_env(tmp_path: Path, storage: str) -> dict[str, str]:
    conf = tmp_path / "ccache.conf"
    conf.write_text("")
    return tool_env(tmp_path / "home", {
        "CCACHE_DIR": str(tmp_path / "ccache"), "CCACHE_CONFIGPATH": str(conf),
        "CCACHE_REMOTE_STORAGE": storage, "CCACHE_NOHASHDIR": "1",
    })


def storage_url(d: Daemon, layout: str, auth: str) -> str:
    if auth == "basic":
        return f"http://ccache:{TOKEN}@127.0.0.1:{d.port}/kv/cc|layout={layout}"
    return f"{d.base_url}/kv/cc|layout={layout}|bearer-token={TOKEN}"


@pytest.mark.parametrize("layout, auth", [("subdirs", "bearer"), ("flat", "basic"), ("bazel", "bearer")])
def test_second_build_is_a_remote_hit(daemon_factory: Callable[..., Daemon], tmp_path: Path, layout: str,
                                      auth: str) -> None:
    require_tool("ccache")
    require_tool("gcc")
    d = daemon_factory({"cc": {"type": "kv"}}, auth=AUTH)
    project = write_c_project(tmp_path / "src")
    env = ccache_env(tmp_path, storage_url(d, layout, auth))

    build_c(project, ["ccache"], env)
    first = ccache_stats(env)
    n = len(C_UNITS)
    assert first["remote_storage_miss"] == n and first["remote_storage_error"] == 0, first
    assert first["remote_storage_write"] >= n, first

    shutil.rmtree(env["CCACHE_DIR"])  # the local cache is gone: only the remote can answer
    build_c(project, ["ccache"], env)
    second = ccache_stats(env)
    assert second["remote_storage_hit"] == n and second["remote_storage_miss"] == 0, second
    assert second["local_storage_hit"] == 0 and second["cache_miss"] == 0, second
    assert second["remote_storage_error"] == 0 and second["remote_storage_timeout"] == 0, second
    metrics = d.get("/metrics").body.decode()
    # Direct mode reads two entries per compilation: the manifest, then the result.
    hits = re.search(r'sparkcache_registry_requests_total\{form="entry",remote="cc",result="hit"\} (\d+)', metrics)
    assert hits is not None and int(hits.group(1)) >= n, metrics


LAYOUT_KEYS = {
    "subdirs": re.compile(r"[0-9a-z]{2}/[0-9a-z]{20,}"),
    "flat": re.compile(r"[0-9a-z]{22,}"),
    "bazel": re.compile(r"ac/[0-9a-f]{64}"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUT_KEYS))
def test_each_layout_stores_its_own_keys(daemon_factory: Callable[..., Daemon], tmp_path: Path, layout: str) -> None:
    """The keys ccache PUT, as the daemon's index holds them (read after it stopped)."""
    require_tool("ccache")
    require_tool("gcc")
    d = daemon_factory({"cc": {"type": "kv"}}, auth=AUTH)
    project = write_c_project(tmp_path / "src")
    env = ccache_env(tmp_path, storage_url(d, layout, "bearer"))
    build_c(project, ["ccache"], env)
    d.stop()
    with sqlite3.connect(d.data_dir / "index.sqlite") as db:
        paths = [p for (p,) in db.execute("SELECT path FROM entries WHERE remote = 'cc'")]
    assert len(paths) >= len(C_UNITS)
    assert all(LAYOUT_KEYS[layout].fullmatch(p) for p in paths), paths


def test_a_remote_that_refuses_every_entry_never_fails_the_build(daemon_factory: Callable[..., Daemon],
                                                                 tmp_path: Path) -> None:
    require_tool("ccache")
    require_tool("gcc")
    d = daemon_factory({"cc": {"type": "kv", "max_entry_size": 1}}, auth=AUTH)
    project = write_c_project(tmp_path / "src")
    env = ccache_env(tmp_path, storage_url(d, "subdirs", "bearer"))
    build_c(project, ["ccache"], env)
    shutil.rmtree(env["CCACHE_DIR"])
    build_c(project, ["ccache"], env)  # still builds: nothing was stored, every lookup a miss
    stats: dict[str, Any] = ccache_stats(env)
    assert stats["remote_storage_hit"] == 0 and stats["cache_miss"] == len(C_UNITS), stats
    assert d.spool_files() == []
    rejected = re.search(r'form="upload",remote="cc",result="rejected"\} (\d+)', d.get("/metrics").body.decode())
    assert rejected is not None and int(rejected.group(1)) >= 1  # ccache's PUTs were answered 413
