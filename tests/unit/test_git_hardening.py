"""Regression tests from the git review: each failed before its fix."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.task import deferLater

from sparkcache.protocols import load_config_data
from sparkcache.git.loop import GitService
from sparkcache.git.credentials import Callbacks, Cancelled
from sparkcache.pools import PoolService
from sparkcache.git.mirrors import Mirrors
from tests.support.git_upstream import FileUpstream, GitUpstream, git, refs_of


def test_upstream_commit_can_delete_a_file(tmp_path: Path) -> None:
    up = GitUpstream(tmp_path / "up")
    up.create("r", files={"keep.txt": "k\n", "dir/gone.txt": "g\n"})
    sha = up.commit({"dir/gone.txt": None, "new.txt": "n\n"}, name="r")
    names = git("ls-tree", "-r", "--name-only", sha, cwd=up.path("r")).split()
    assert names == ["keep.txt", "new.txt"]


async def _until(predicate: Callable[[], Any], timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("condition not met")


@pytest_twisted.ensureDeferred
async def test_stop_is_bounded_while_a_fetch_hangs_on_a_silent_upstream(tmp_path: Path) -> None:
    # A listening socket that never accepts: libgit2 connects, sends its request and
    # waits for an answer up to its 120 s I/O timeout, holding a pool thread.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/org/repo.git"
    cfg = load_config_data({"git": {"repos": {"slow": url}}}, "c", {}).git
    ms = Mirrors(cfg, str(tmp_path / "data"), reactor, clock=task.Clock())
    svc = GitService(ms, stop_timeout=1.0)
    svc.startService()
    try:
        fetch = ms.refresh(ms.lookup("slow"))
        fetch.addErrback(lambda f: None)
        await _until(lambda: ms.pool._team.statistics().busyWorkerCount == 1)
        await svc.stopService()
        # Stopped without waiting for the stuck worker (the reactor was never
        # blocked joining it), which cannot keep the process alive either.
        assert [t for t in ms.pool.threads if t.is_alive()], "stop waited for the hung fetch"
        assert all(t.daemon for t in ms.pool.threads)
        assert not ms.pool.started
    finally:
        silent.close()  # resets the pending connection: the worker ends
        for t in ms.pool.threads:
            t.join(30)


def test_callbacks_abort_a_transfer_once_cancelled() -> None:
    cancel = threading.Event()
    cb = Callbacks(None, cancel)
    cb.transfer_progress(None)
    cb.sideband_progress("Counting objects")
    cancel.set()
    with pytest.raises(Cancelled):
        cb.transfer_progress(None)


@pytest_twisted.ensureDeferred
async def test_pool_service_stop_does_not_wait_past_its_timeout() -> None:
    svc = PoolService("t-pool", 1, reactor, stop_timeout=0.2)
    svc.startService()
    release = threading.Event()
    started = threading.Event()

    def busy() -> None:
        started.set()
        release.wait(30)

    svc.pool.callInThread(busy)
    assert started.wait(10)
    try:
        assert await svc.stopService() is False
        assert all(t.daemon for t in svc.pool.threads)
    finally:
        release.set()
        for t in svc.pool.threads:
            t.join(10)


@pytest_twisted.ensureDeferred
async def test_seeding_an_old_bundle_only_adds_refs_and_fast_forwards(tmp_path: Path) -> None:
    up = FileUpstream(tmp_path / "upstream")
    old_bundle, new_bundle = tmp_path / "old.bundle", tmp_path / "new.bundle"
    first = up.commit()
    git("branch", "side", cwd=up.bare)
    git("bundle", "create", str(old_bundle), "--all", cwd=up.bare)
    second = up.commit()
    git("branch", "fresh", cwd=up.bare)
    git("bundle", "create", str(new_bundle), "--all", cwd=up.bare)
    cfg = load_config_data({"git": {}}, "c", {}).git
    ms = Mirrors(cfg, str(tmp_path / "data"), reactor, clock=task.Clock())
    try:
        url = "http://127.0.0.1:9/team/app.git"
        mirror = await ms.seed(url, str(old_bundle))
        # a diverged "side" in the mirror (as if upstream force-pushed it)
        git("update-ref", "refs/heads/side", first, cwd=mirror.path)
        diverged = git("commit-tree", "-p", first, "-m", "x", f"{first}^{{tree}}", cwd=mirror.path).strip()
        git("update-ref", "refs/heads/side", diverged, cwd=mirror.path)
        await ms.seed(url, str(new_bundle))  # fast-forwards trunk, adds fresh, leaves side
        refs = refs_of(mirror.path)
        assert refs["refs/heads/trunk"] == second and refs["refs/heads/fresh"] == second
        assert refs["refs/heads/side"] == diverged
        await ms.seed(url, str(old_bundle))  # older than the mirror: moves nothing back
        assert refs_of(mirror.path) == refs
    finally:
        ms.stop()


@pytest_twisted.ensureDeferred
async def test_loop_maintenance_and_status_stat_mirrors_off_the_reactor(tmp_path: Path, monkeypatch: Any) -> None:
    import sparkcache.git.mirrors as mirrors_mod
    import sparkcache.git.repo_ops as repo_ops

    up = FileUpstream(tmp_path / "upstream")
    cfg = load_config_data({"git": {"repos": {"a": up.url}, "jitter": 0}}, "c", {}).git
    ms = Mirrors(cfg, str(tmp_path / "data"), reactor, clock=task.Clock())
    try:
        await ms.ensure(ms.lookup("a"))
        on_reactor: list[str] = []
        real = repo_ops.is_repo

        def spy(path: str) -> bool:
            if threading.current_thread() is threading.main_thread():
                on_reactor.append(path)
            return real(path)

        monkeypatch.setattr(mirrors_mod, "is_repo", spy)
        monkeypatch.setattr(repo_ops, "is_repo", spy)
        svc = GitService(ms)
        await svc.loop.tick()
        await svc.maintenance.tick()
        status = await ms.status()
        assert status[0]["cloned"] is True
        assert on_reactor == []
    finally:
        ms.stop()
