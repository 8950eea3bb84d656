"""The check loop over real mirrors, maintenance, and the service, driven by task.Clock
(the scheduler's rates and intervals: test_git_fleet.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor, task

from sparkcache.protocols import load_config_data
from sparkcache.git.loop import GitService, Maintenance, Scheduler
from sparkcache.git.mirrors import Mirrors
from tests.support.fake_mirrors import FakeMirrors
from tests.support.git_upstream import FileUpstream


@pytest_twisted.ensureDeferred
async def test_loop_with_real_mirrors_fetches_the_good_ones(tmp_path: Path) -> None:
    ups = {n: FileUpstream(tmp_path / n, branch="main") for n in ("one", "two", "bad")}
    cfg = load_config_data({"git": {"repos": {n: u.url for n, u in ups.items()}, "jitter": 0,
                                    "fetch_concurrency": 2}}, "c", {}).git
    ms = Mirrors(cfg, str(tmp_path / "data"), reactor)
    try:
        for n in ups:
            await ms.ensure(ms.lookup(n))
        # "bad" loses its upstream; the others get new commits
        shutil.rmtree(ups["bad"].bare)
        tips = {n: ups[n].commit() for n in ("one", "two")}
        loop = Scheduler(ms, task.Clock())
        await loop.tick()
        assert loop.failures == 1
        st = {s["name"]: s for s in await ms.status()}
        assert st["bad"]["last_error"] and st["bad"]["cloned"]
        for n in ("one", "two"):
            assert st[n]["last_error"] is None
            assert (await ms.refresh(ms.lookup(n), False))["refs/heads/main"] == tips[n]
        # a mirror not on disk is not cloned by the loop
        shutil.rmtree(ms.lookup("one").path)
        await loop.tick()
        assert not os.path.exists(ms.lookup("one").path)
    finally:
        ms.stop()


@pytest_twisted.ensureDeferred
async def test_maintenance_runs_fsck_on_its_own_schedule(tmp_path: Path) -> None:
    fm = FakeMirrors(git_config={"fsck_interval": "1h", "maintenance_interval": "10m"})
    fm.add("a")
    fm.add("b")
    fm.maintain_fails.add("a")
    calls = fm.maintained
    clock = task.Clock()
    maint = Maintenance(fm, clock)  # type: ignore[arg-type]
    await maint.tick()
    assert calls == [("a", False), ("b", False)]  # no fsck at start-up; a's failure did not stop b
    clock.advance(600)
    await maint.tick()
    assert calls[-1] == ("b", False)
    clock.advance(3000)
    await maint.tick()
    assert calls[-2:] == [("a", True), ("b", True)]
    clock.advance(600)
    await maint.tick()
    assert calls[-1] == ("b", False)


@pytest_twisted.ensureDeferred
async def test_service_starts_and_stops_the_pool(tmp_path: Path) -> None:
    cfg = load_config_data({"git": {}}, "c", {}).git
    ms = Mirrors(cfg, str(tmp_path / "data"), reactor, clock=task.Clock())
    svc = GitService(ms)
    svc.startService()
    assert ms.pool.started
    await svc.stopService()
    assert not ms.pool.started
    # a late request does not bring the pool back (it would keep the process alive)
    from sparkcache.git.interfaces import MirrorUnavailable

    late = ms.run(lambda: 1)
    assert late.called and not ms.pool.started
    late.addErrback(lambda f: f.trap(MirrorUnavailable))
