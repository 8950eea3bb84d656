"""The real ``@actions/cache`` (what actions/cache runs on a self-hosted
runner) saving and restoring through the daemon, over v2 (Twirp, Azure-style
signed uploads, the root ``/twirp/`` it builds from ACTIONS_RESULTS_URL) and
v1 (``_apis/artifactcache``, parallel PATCH chunks), with restore-key prefix
matching, a minted runtime token, and a cache too small for the archive:
the save fails with a warning and the restore is a miss, never a failed step."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon
from tests.support.gha_client import ActionsCache, require_actions_cache

WRITER = "gha-writer"
AUTH = {"anonymous_read": False, "tokens": [{"name": "w", "token": WRITER, "scopes": ["write"]}]}


@pytest.fixture(autouse=True)
def _needs_actions_cache() -> None:
    require_actions_cache()


def runner(tmp: Path, d: Daemon, version: str, token: str = WRITER, **env: str) -> ActionsCache:
    base = d.url("/gha/ci/")
    extra = {"ACTIONS_CACHE_URL": base, "ACTIONS_RESULTS_URL": base, "ACTIONS_RUNTIME_TOKEN": token, **env}
    if version == "v2":
        extra["ACTIONS_CACHE_SERVICE_V2"] = "true"
    return ActionsCache(tmp, extra)


def fill(workspace: Path, seed: str, size: int = 200_000) -> dict[str, bytes]:
    """A directory of files, partly incompressible (so archives have a real size)."""
    out = workspace / "deps"
    shutil.rmtree(out, ignore_errors=True)
    (out / "sub").mkdir(parents=True)
    files = {"deps/a.txt": f"dependency {seed}\n".encode() * 100, "deps/sub/b.bin": os.urandom(size)}
    for name, data in files.items():
        (workspace / name).write_bytes(data)
    return files


def contents(workspace: Path, files: dict[str, Any]) -> dict[str, bytes | None]:
    return {n: (workspace / n).read_bytes() if (workspace / n).exists() else None for n in files}


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_save_and_restore_with_restore_key_prefixes(version: str, daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory({"ci": {"type": "gha"}}, auth=AUTH)
    ac = runner(tmp_path, d, version, SPARKCACHE_UPLOAD_CHUNK=str(64 * 1024))
    old = fill(ac.workspace, "old")
    saved = ac.save("deps-linux-1111", ["deps"])
    assert saved.result["id"] not in (-1, None) and not saved.warnings, saved.stdout
    new = fill(ac.workspace, "new")
    assert ac.save("deps-linux-2222", ["deps"]).result["id"] not in (-1, None)

    shutil.rmtree(ac.workspace / "deps")
    # The exact key.
    hit = ac.restore("deps-linux-1111", ["deps"], ["deps-linux-"])
    assert hit.result["matched"] == "deps-linux-1111" and contents(ac.workspace, old) == old
    shutil.rmtree(ac.workspace / "deps")
    # No exact match: the newest entry the restore key begins.
    hit = ac.restore("deps-linux-3333", ["deps"], ["deps-windows-", "deps-linux-"])
    assert hit.result["matched"] == "deps-linux-2222" and contents(ac.workspace, new) == new
    assert "Cache hit for restore-key" in hit.stdout or version == "v1"
    # Nothing matches: a miss, not a failure.
    assert ac.restore("other-1", ["deps"], ["other-"]).result["matched"] is None
    # An entry is immutable: saving its key again is refused, cleanly.
    fill(ac.workspace, "third")
    again = ac.save("deps-linux-2222", ["deps"])
    assert again.result["id"] == -1 and "Failed to save" in again.stdout
    shutil.rmtree(ac.workspace / "deps")
    assert ac.restore("deps-linux-2222", ["deps"]).result["matched"] == "deps-linux-2222"
    assert contents(ac.workspace, new) == new
    assert d.spool_files() == []


def test_a_minted_runtime_token_and_branch_scopes(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory({"ci": {"type": "gha"}}, auth=AUTH)

    def mint(query: str) -> str:
        resp = d.request("POST", f"/setup/gha-token?{query}", {"Authorization": f"Bearer {WRITER}"}, b"")
        assert resp.status == 200, resp.describe()
        return str(resp.json()["token"])

    main = runner(tmp_path / "main", d, "v2", mint("scope=refs/heads/main"))
    files = fill(main.workspace, "main")
    assert main.save("build-1", ["deps"]).result["id"] not in (-1, None)
    feature = runner(tmp_path / "feature", d, "v2", mint("scope=refs/heads/feature&restore=refs/heads/main"))
    assert feature.restore("build-2", ["deps"], ["build-"]).result["matched"] == "build-1"
    assert contents(feature.workspace, files) == files
    other = runner(tmp_path / "other", d, "v2", mint("scope=refs/heads/other"))
    assert other.restore("build-2", ["deps"], ["build-"]).result["matched"] is None
    bogus = runner(tmp_path / "bogus", d, "v2", "not-a-token")
    out = bogus.restore("build-1", ["deps"])
    assert out.result["matched"] is None and out.warnings


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_a_cache_too_small_never_fails_the_step(version: str, daemon_factory: Any, tmp_path: Path) -> None:
    # The archive (≥ 200 kB of random bytes) is over the remote's limit: the
    # upload is refused (413) before it is stored.
    d = daemon_factory({"ci": {"type": "gha", "max_entry_size": "50KiB"}}, auth=AUTH)
    ac = runner(tmp_path, d, version)
    fill(ac.workspace, "big")
    saved = ac.save("too-big-1", ["deps"])
    assert saved.result["id"] == -1 and "Failed to save" in saved.stdout, saved.stdout
    shutil.rmtree(ac.workspace / "deps")
    restored = ac.restore("too-big-1", ["deps"], ["too-big-"])
    assert restored.result["matched"] is None and not (ac.workspace / "deps").exists()
    assert d.spool_files() == []
