"""The real Nx (global npm package) against a real daemon's ``type: nx``
remote: a workspace made by hand (nx.json, project.json targets with the
``nx:run-commands`` executor, the global ``nx`` linked in as its
node_modules/nx: nothing installed from a registry) built, ``nx reset`` and
its outputs removed, rebuilt from the remote cache ("[remote cache]", the
very output restored); a store too small for the outputs and a read-only
token leave the builds working."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon
from tests.support.tools import require_tool
from tests.support.turbo_workspaces import clear_nx, nx_env, nx_package_dir, nx_workspace, run_nx

pytestmark = pytest.mark.e2e

WRITER, READER = "e2e-nx-w-41c", "e2e-nx-r-93e"
AUTH = {"anonymous_read": False, "tokens": [{"name": "ci", "token": WRITER, "scopes": ["write"]},
                                            {"name": "dev", "token": READER, "scopes": ["read"]}]}
PROJECTS = ("lib", "util")


@pytest.fixture
def daemon(tmp_path: Path) -> Any:
    require_tool("nx")
    require_tool("node")
    if nx_package_dir() is None:
        require_tool("nx-package", "the nx on PATH is not an npm package's bin (a workspace links that package in)")
    d = Daemon(tmp_path / "daemon", {"nx": {"type": "nx"}, "tiny": {"type": "nx", "max_entry_size": 64}},
               auth=AUTH).start()
    try:
        yield d
    finally:
        d.close()


def env_for(d: Daemon, tmp_path: Path, remote: str = "nx", token: str = WRITER) -> dict[str, str]:
    env = nx_env(tmp_path / "home")
    env.update({"NX_SELF_HOSTED_REMOTE_CACHE_SERVER": d.url(f"/nx/{remote}"),
                "NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN": token})
    return env


def outputs(ws: Path) -> dict[str, str]:
    return {p: (ws / "libs" / p / "dist" / "out.txt").read_text() for p in PROJECTS}


def built(proc: Any) -> str:
    assert proc.returncode == 0, f"nx exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return str(proc.stdout) + str(proc.stderr)


def test_a_reset_workspace_rebuilds_from_the_remote_cache(daemon: Daemon, tmp_path: Path) -> None:
    ws = nx_workspace(tmp_path / "ws", PROJECTS)
    env = env_for(daemon, tmp_path)
    out = built(run_nx(ws, env))
    assert "[remote cache]" not in out and "0/2 hit" in out, out
    first = outputs(ws)
    m = daemon.get("/metrics").body.decode()
    assert 'form="upload",remote="nx",result="stored"} 2.0' in m, m

    clear_nx(ws, env)
    out = built(run_nx(ws, env))
    assert out.count("[remote cache]") == 2 and "2/2 hit" in out, out
    assert outputs(ws) == first  # restored, not rebuilt
    m = daemon.get("/metrics").body.decode()
    assert 'form="entry",remote="nx",result="hit"} 2.0' in m, m


def test_a_store_too_small_and_a_read_only_token_leave_the_build_working(daemon: Daemon, tmp_path: Path) -> None:
    ws = nx_workspace(tmp_path / "ws", PROJECTS)
    # Every output is over the remote's 64 bytes: each upload is declined (403, the refusal Nx
    # builds on; it fails the task on a 413) before its body.
    env = env_for(daemon, tmp_path, "tiny")
    for _ in range(2):
        out = built(run_nx(ws, env))
        assert "[remote cache]" not in out, out
        clear_nx(ws, env)
    m = daemon.get("/metrics").body.decode()
    assert 'form="upload",remote="tiny",result="rejected"' in m
    assert 'remote="tiny",result="stored"' not in m

    # A read-only token: Nx's uploads get a 403, the build goes on, nothing is stored.
    env = env_for(daemon, tmp_path, "nx", READER)
    built(run_nx(ws, env))
    clear_nx(ws, env)
    out = built(run_nx(ws, env))
    assert "[remote cache]" not in out, out
    assert 'remote="nx",result="stored"' not in daemon.get("/metrics").body.decode()
