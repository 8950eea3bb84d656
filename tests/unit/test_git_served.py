"""Serves in other worker processes reach the primary's check loop (sparkcache/git/served.py).

Two ``Mirrors(shared=True)`` over one data directory stand for two workers, as in
test_git_shared.py: the primary runs a ``Scheduler``, the other only serves. They
share nothing but files (the served stamps, their change counters, the loop's
``.next`` records); pool jobs run in place so that ``task.Clock`` drives it all."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, succeed

from sparkcache.git.loop import Scheduler
from sparkcache.git.mirrors import Mirrors
from sparkcache.git.served import ServedStamps
from sparkcache.protocols import load_config_data
from tests.support.git_upstream import FileUpstream
from tests.unit.test_git_fleet import Checks

HOT, COLD = "https://forge.example/o/hot.git", "https://forge.example/o/cold.git"


def in_place(fn: Any, *args: Any) -> Deferred[Any]:
    return succeed(fn(*args))


def worker(tmp_path: Path, clock: task.Clock, repos: dict[str, str] | None = None) -> Mirrors:
    cfg = load_config_data({"git": {"repos": repos or {"hot": HOT, "cold": COLD}, "fetch_interval": "30s",
                                    "max_interval": "1h"}}, "c", {}).git
    ms = Mirrors(cfg, str(tmp_path / "data"), reactor, clock=clock, shared=True)
    # Pool jobs run at once: the clock alone says when things happen.
    ms.run = in_place  # type: ignore[method-assign]
    assert ms.stamps is not None and ms.xlocks is not None
    ms.stamps.run = ms.xlocks.run = in_place
    return ms


class Primary:
    """The primary worker: mirrors, its loop (checks stubbed) and its once-a-second look at the stamps."""

    def __init__(self, tmp_path: Path, clock: task.Clock, seed: int, repos: dict[str, str] | None = None) -> None:
        self.clock = clock
        self.ms = worker(tmp_path, clock, repos)
        self.checks = Checks(self.ms, clock)
        self.ms.check = self.checks  # type: ignore[method-assign]
        self.loop = Scheduler(self.ms, clock, rng=random.Random(seed))
        self.loop.startService()

    def advance(self, seconds: int) -> None:
        for _ in range(seconds):
            self.clock.advance(1)
            self.ms.sync_served()  # GitService's "git served sync" timer

    def count(self, name: str) -> int:
        return sum(1 for _, _, n in self.checks.calls if n == name)

    def interval(self, name: str) -> float:
        return self.loop.entries[self.ms.lookup(name).path].interval


def serve(ms: Mirrors, name: str) -> None:
    m = ms.lookup(name)
    ms.acquire(m)
    ms.release(m)


def test_stamps_are_written_once_per_interval_and_read_by_the_other_mapping(tmp_path: Path) -> None:
    git_dir = str(tmp_path / "git")
    every = [30.0]
    a = ServedStamps(git_dir, in_place, lambda: every[0])
    b = ServedStamps(git_dir, in_place, lambda: every[0])
    paths = ["/m/one.git", "/m/two.git"]
    assert b.changed() and b.collect(paths).result == {}  # nothing served yet
    assert not b.changed()
    for t in range(100):  # a clone storm: one stamp
        a.note("/m/one.git", 1000 + t * 0.25)
    assert a.stamps == 1
    assert b.changed() and b.collect(paths).result == {"/m/one.git": (1000, None)}
    assert not b.changed() and b.collect(paths).result == {}
    a.note("/m/one.git", 1030)  # fetch_interval later: stamped again
    assert b.collect(paths).result == {"/m/one.git": (1030, None)}
    # Another worker's later stamp is never overwritten by an older one.
    b.note("/m/two.git", 1050)
    a.note("/m/two.git", 1040)
    assert a.stamps == 2 and b.stamps == 1
    # A mirror served before b knew it (its slot already read) is read once b learns it.
    a.note("/m/three.git", 1060)
    assert b.collect(paths).result == {"/m/two.git": (1050, None)}
    assert not b.changed()
    b.learn("/m/three.git")
    assert b.changed() and b.collect(paths + ["/m/three.git"]).result == {"/m/three.git": (1060, None)}
    assert not b.changed()
    a.close()
    b.close()


def test_a_mirror_served_only_in_another_worker_stays_at_fetch_interval(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(1000)
    primary = Primary(tmp_path, clock, seed=1)
    other = worker(tmp_path, clock)
    assert other.scheduler is None  # no loop there
    for _ in range(40):  # 20 minutes; "hot" is cloned all along, through the other worker only
        serve(other, "hot")
        primary.advance(30)
    assert primary.count("hot") >= 30  # about every 30 s (with jitter)
    assert primary.count("cold") == 1  # its first check, then nothing for an hour
    assert primary.interval("hot") == 30 and primary.interval("cold") == 3600
    assert other.stamps is not None and other.stamps.stamps == 40  # one per serve 30 s apart
    # "hot" goes idle: after an hour without clients its interval grows again.
    primary.advance(150 * 60)
    assert primary.interval("hot") > 30

    # A clone of "cold" through the other worker: its next check comes within
    # fetch_interval (plus the second the primary takes to see the stamp), not an hour.
    before = primary.count("cold")
    for _ in range(50):
        serve(other, "cold")  # one stamp for the lot
    primary.advance(1)
    entry = primary.loop.entries[primary.ms.lookup("cold").path]
    assert entry.interval == 30 and entry.due <= clock.seconds() + 33
    primary.advance(34)
    assert primary.count("cold") == before + 1 and primary.interval("cold") == 30
    primary.loop.stopService()


def test_get_repos_in_the_other_worker_shows_the_loops_times_and_the_last_serve(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(1000)
    primary = Primary(tmp_path, clock, seed=2)
    other = worker(tmp_path, clock)
    serve(other, "hot")
    primary.advance(100)
    serve(primary.ms, "cold")  # served in the primary: the other worker sees it too
    primary.advance(5)
    for ms in (primary.ms, other):
        rows = {r["name"]: r for r in ms.status().result}  # type: ignore[attr-defined]
        for name in ("hot", "cold"):
            e = primary.loop.entries[primary.ms.lookup(name).path]
            assert (rows[name]["interval"], rows[name]["next_check"]) == (e.interval, e.due), (ms, name)
        assert rows["hot"]["last_served"] == 1000 and rows["cold"]["last_served"] == 1100
    primary.loop.stopService()


def test_a_restarted_primary_reads_the_stamps_written_before(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(1000)
    other = worker(tmp_path, clock)
    serve(other, "hot")
    clock.advance(600)  # ten minutes later the primary (re)starts: "hot" is still active
    primary = Primary(tmp_path, clock, seed=3)
    primary.advance(1)
    assert primary.ms.state(primary.ms.lookup("hot")).last_served == 1000
    primary.advance(3 * 60)
    calls = Counter(n for _, _, n in primary.checks.calls)
    assert calls["hot"] >= 5 and calls["cold"] == 1
    assert primary.interval("hot") == 30 and primary.interval("cold") == 3600
    primary.loop.stopService()


def test_a_clone_in_another_worker_is_a_change_the_primary_sees(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(1000)
    upstream = FileUpstream(tmp_path / "up")
    repos = {"app": upstream.url}
    primary = Primary(tmp_path, clock, seed=4, repos=repos)
    other = worker(tmp_path, clock, repos)
    primary.advance(31)
    assert primary.count("app") == 1 and primary.interval("app") == 3600  # nobody asked for it
    # A refresh through the other worker clones it (a change, no serve): as a clone in
    # the primary would, it brings the next check within fetch_interval.
    refs = other.refresh(other.lookup("app")).result
    assert refs == upstream.refs()
    primary.advance(1)
    st = primary.ms.state(primary.ms.lookup("app"))
    assert st.last_change == 1031 and st.last_served is None
    primary.advance(34)
    assert primary.count("app") == 2 and primary.interval("app") == 30  # changed within the hour
    primary.loop.stopService()
