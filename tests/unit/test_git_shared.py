"""Git mirrors shared by worker processes (sparkcache/git/shared.py).

Two ``Mirrors(shared=True)`` over one data directory stand for two workers:
flock separates open files as it separates processes, and every shared
decision goes through the files (fetch record, registry.json and its
counter), never through memory. The lock module itself is tested with a
holder in another process killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList, succeed

from sparkcache.fetch.xlock import try_lock, unlock
from sparkcache.git.config import GitConfig
from sparkcache.git.interfaces import MirrorLimit
from sparkcache.git.mirrors import Mirrors
from sparkcache.git.registry import Registration, Registry
from sparkcache.git.shared import (
    FetchRecord, MirrorLocks, RegistryChanges, is_locked, read_record, record_path, write_record,
)
from sparkcache.protocols import load_config_data
from tests.support.git_upstream import FileUpstream, record_git_runs


def in_place(fn: Any, *args: Any) -> Deferred[Any]:
    return succeed(fn(*args))


# -- the lock module -------------------------------------------------------------------


def test_a_second_locker_waits_on_the_clock_until_the_first_releases(tmp_path: Path) -> None:
    clock = task.Clock()
    a, b = MirrorLocks(str(tmp_path), in_place, clock), MirrorLocks(str(tmp_path), in_place, clock)
    first = Deferred.fromCoroutine(a.acquire("/x/m.git"))
    fd = first.result
    second = Deferred.fromCoroutine(b.acquire("/x/m.git"))
    clock.advance(0.02)
    clock.advance(0.04)
    assert not second.called and b.waits == 3
    assert is_locked(a.path("/x/m.git"))
    unlock(fd)
    clock.advance(1)
    assert second.called
    # The maintenance lock is another lock: it never waits for a fetch.
    maint = Deferred.fromCoroutine(a.acquire("/x/m.git", kind="maint"))
    assert maint.called
    unlock(maint.result)
    unlock(second.result)
    assert not is_locked(a.path("/x/m.git"))


def test_a_killed_holder_leaves_no_lock(tmp_path: Path) -> None:
    locks = MirrorLocks(str(tmp_path), in_place, task.Clock())
    path = locks.path("/x/m.git")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({path!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        assert is_locked(path) and try_lock(path) is None
        # A tmp clone of that mirror is "being built" while the lock is held.
        assert locks.building("m.git.abc123")
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert not is_locked(path) and not locks.building("m.git.abc123")
    d = Deferred.fromCoroutine(locks.acquire("/x/m.git"))
    assert d.called
    unlock(d.result)


def test_fetch_records_round_trip_and_unreadable_ones_are_none(tmp_path: Path) -> None:
    path = record_path(str(tmp_path), "/x/m.git")
    assert read_record(path) is None
    write_record(path, FetchRecord(1.0, 2.5, "forge down", 42))
    assert read_record(path) == FetchRecord(1.0, 2.5, "forge down", 42)
    Path(path).write_text("{not json")
    assert read_record(path) is None


def test_registry_changes_are_seen_by_the_other_mapping(tmp_path: Path) -> None:
    a, b = RegistryChanges(str(tmp_path)), RegistryChanges(str(tmp_path))
    assert not b.stale()
    a.bump()
    assert b.stale() and b.value() == 1
    a.close()
    b.close()


# -- the registry file shared by workers ----------------------------------------------------


def shared_registry(tmp_path: Path, **git: Any) -> Registry:
    cfg = load_config_data({"git": {"allowed_hosts": ["forge.example"], **git}}, "c", {}).git
    reg = Registry(cfg, str(tmp_path / "git"))
    reg.changes = RegistryChanges(str(tmp_path / "git"))
    return reg


def test_saves_of_two_workers_merge_and_forgotten_names_leave_the_file(tmp_path: Path) -> None:
    a, b = shared_registry(tmp_path), shared_registry(tmp_path)
    a.register("one", "https://forge.example/o/one.git")
    b.register("two", "https://forge.example/o/two.git")
    a.save(a.snapshot())
    b.save(b.snapshot())  # written after a's: a's entry must survive
    value, entries = a.read_shared()
    assert value == 2 and {e["name"] for e in entries} == {"one", "two"}
    added, problems = a.merge(entries, shared=True)
    assert [r.name for r in added] == ["two"] and not problems and not a.dirty()

    # A first use on an allowed host reserved in the file, then its clone failed.
    reg, created = b.resolve("forge.example/o/ghost")
    assert created
    b.reserve(reg, max_mirrors=10)
    a.merge(a.read_shared()[1], shared=True)
    assert a.get("forge.example/o/ghost") is not None
    assert b.forget_unused_host("forge.example/o/ghost")
    b.save(b.snapshot())
    a.merge(a.read_shared()[1], shared=True)
    assert a.get("forge.example/o/ghost") is None
    assert {e["name"] for e in a.read_shared()[1]} == {"one", "two"}


def test_reserve_holds_max_mirrors_across_workers(tmp_path: Path) -> None:
    a, b = shared_registry(tmp_path), shared_registry(tmp_path)
    ra, _ = a.resolve("forge.example/o/a")
    rb, _ = b.resolve("forge.example/o/b")
    a.reserve(ra, max_mirrors=1)
    a.reserve(ra, max_mirrors=1)  # already there: fine
    with pytest.raises(MirrorLimit):
        b.reserve(rb, max_mirrors=1)
    b.reserve(Registration("cfg", "https://forge.example/o/cfg.git", "config"), max_mirrors=1)  # not counted


# -- two Mirrors over one data directory ------------------------------------------------------


@pytest.fixture
def upstream(tmp_path: Path) -> FileUpstream:
    return FileUpstream(tmp_path / "upstream")


@pytest.fixture
def workers(tmp_path: Path):
    made: list[Mirrors] = []

    def make(repos: dict[str, str], clock: Any = None, **git_cfg: object) -> Mirrors:
        cfg: GitConfig = load_config_data({"git": {"repos": repos, **git_cfg}}, "cache.yaml", {}).git
        m = Mirrors(cfg, str(tmp_path / "data"), reactor, clock=clock, shared=True)
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


def count_fetches(monkeypatch: Any) -> list[str]:
    calls: list[str] = []
    real = Mirrors._fetch_sync

    def counting(self: Mirrors, *args: Any) -> Any:
        calls.append(args[0].name)
        return real(self, *args)

    monkeypatch.setattr(Mirrors, "_fetch_sync", counting)
    return calls


@pytest_twisted.ensureDeferred
async def test_a_first_clone_asked_of_both_workers_runs_once(workers, upstream: FileUpstream, monkeypatch) -> None:
    a, b = workers({"up": upstream.url}), workers({"up": upstream.url})
    calls = count_fetches(monkeypatch)
    ma, mb = a.lookup("up"), b.lookup("up")
    assert ma.path == mb.path
    results = await DeferredList([a.ensure(ma), b.ensure(mb)], consumeErrors=True)
    assert all(ok for ok, _ in results), results
    assert calls == ["up"]  # the second waited for the lock and joined the first's clone
    assert b.state(mb).refs == a.state(ma).refs == upstream.refs()

    # A fetch by a: b's refresh asked before it ended joins it; b's refs follow.
    sha = upstream.commit()
    refreshed = await DeferredList([a.refresh(ma), b.refresh(mb)], consumeErrors=True)
    assert all(ok for ok, _ in refreshed), refreshed
    assert calls == ["up", "up"]
    assert refreshed[0][1] == refreshed[1][1] == upstream.refs()
    assert sha in b.state(mb).refs.values() and b.state(mb).last_change is not None


@pytest_twisted.ensureDeferred
async def test_min_fetch_interval_counts_from_the_other_workers_fetch(workers, upstream: FileUpstream,
                                                                      monkeypatch) -> None:
    clock = task.Clock()
    clock.advance(1000)
    a = workers({"up": upstream.url}, clock=clock, min_fetch_interval="5s")
    b = workers({"up": upstream.url}, clock=clock, min_fetch_interval="5s")
    ma, mb = a.lookup("up"), b.lookup("up")
    await a.ensure(ma)  # ended at t=1000
    calls = count_fetches(monkeypatch)
    clock.advance(1)
    upstream.commit()
    timers = len(clock.getDelayedCalls())
    d = b.refresh(mb)
    # b reads the record in the pool, then waits on the clock: advancing the
    # clock before that wait is scheduled would leave it waiting for ever.
    for _ in range(3000):
        if len(clock.getDelayedCalls()) > timers or d.called:
            break
        await task.deferLater(reactor, 0.01)
    assert not d.called and calls == []
    clock.advance(4)  # 5 s after a's fetch ended
    refs = await d
    assert calls == ["up"] and refs == upstream.refs()


@pytest_twisted.ensureDeferred
async def test_a_registration_in_one_worker_is_known_to_the_other(workers, upstream: FileUpstream,
                                                                  tmp_path: Path) -> None:
    a, b = workers({}, allowed_hosts=["forge.example"]), workers({}, allowed_hosts=["forge.example"])
    a.registry.config.repos  # noqa: B018 - both start from the same (empty) configuration
    # seed() registers the URL (a run-time registration) and saves it.
    bundle = tmp_path / "up.bundle"
    subprocess.run(["git", "bundle", "create", str(bundle), "--all"], cwd=upstream.bare, check=True,
                   capture_output=True)
    mirror = await a.seed("https://forge.example/o/seeded.git", str(bundle), name="seeded")
    for _ in range(100):
        if not b.registry.changes.stale():  # type: ignore[union-attr]
            await task.deferLater(reactor, 0.01)
            continue
        break
    assert b.registry.get("seeded") is None
    await b.synced()
    assert b.lookup("seeded").path == mirror.path
    assert [s["name"] for s in await b.status()] == ["seeded"]


@pytest_twisted.ensureDeferred
async def test_no_pruning_repack_while_another_worker_serves(workers, upstream: FileUpstream, monkeypatch) -> None:
    a, b = workers({"up": upstream.url}), workers({"up": upstream.url})
    ma, mb = a.lookup("up"), b.lookup("up")
    await a.ensure(ma)
    seen = record_git_runs(monkeypatch)
    upstream.commit()
    await a.refresh(ma)
    b.acquire(mb)  # b's upload-pack reads the mirror
    for _ in range(200):  # its shared lock is taken in the pool
        if b.xlocks is not None and b.xlocks._serving[mb.path].called:
            break
        await task.deferLater(reactor, 0.01)
    await a.maintain(ma)
    assert [x for x in seen if x[0] == "repack"][-1][-1] == "--keep-unreachable"
    b.release(mb)
    upstream.commit()
    await a.refresh(ma)
    for _ in range(100):
        if a.xlocks is not None and not is_locked(a.xlocks.path(ma.path, "serve")):
            break
        await task.deferLater(reactor, 0.01)
    await a.maintain(ma)
    assert "--keep-unreachable" not in [x for x in seen if x[0] == "repack"][-1]
