"""The fetch loop and maintenance, driven by task.Clock."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred

from sparkcache.protocols import load_config_data
from sparkcache.git.loop import FetchLoop, GitService, Maintenance
from sparkcache.git.mirrors import Mirrors
from tests.support.fake_mirrors import FakeMirrors
from tests.support.git_upstream import FileUpstream


def held(names: list[str], concurrency: int = 2, jitter: float = 0.0) -> FakeMirrors:
    """Mirrors that exist only by name; each refresh waits in ``pending`` for the test."""
    fm = FakeMirrors(git_config={"fetch_concurrency": concurrency, "jitter": jitter})
    for n in names:
        fm.add(n)
    fm.hold_refreshes = True
    return fm


def test_bounded_concurrency_and_failures_do_not_stop_the_round() -> None:
    fm = held(["a", "b", "c", "d", "gone"], concurrency=2)
    fm.on_disk.discard("gone")
    loop = FetchLoop(fm, task.Clock())  # type: ignore[arg-type]
    done = Deferred.fromCoroutine(loop.tick())

    def running() -> list[str]:
        return [n for n, d in fm.pending.items() if not d.called]

    assert len(running()) == 2  # two at a time
    first, second = running()
    fm.pending[first].errback(RuntimeError("upstream says no"))
    assert len(running()) == 2 and len(fm.calls) == 3
    for _ in range(3):
        fm.pending[running()[0]].callback({})
    assert sorted(fm.calls) == ["a", "b", "c", "d"] and running() == []
    assert {clone for _, clone in fm.refreshed} == {False}  # the loop never clones what nobody asked for
    assert done.called and loop.failures == 1 and loop.rounds == 1


def test_batches_amortize_thread_hand_offs() -> None:
    from sparkcache.git.loop import MAX_BATCH, batch_size

    assert batch_size(3, 4) == 1  # few mirrors: all in parallel
    assert batch_size(1000, 4) == MAX_BATCH
    assert batch_size(100, 4) == 7


def test_jitter_spreads_starts_on_the_clock() -> None:
    fm = held(["a", "b", "c"], concurrency=10, jitter=10.0)
    clock = task.Clock()
    loop = FetchLoop(fm, clock, rng=random.Random(7))  # type: ignore[arg-type]
    Deferred.fromCoroutine(loop.tick())
    assert fm.calls == []
    clock.advance(10.0)
    assert sorted(fm.calls) == ["a", "b", "c"]


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
        loop = FetchLoop(ms, task.Clock())
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
