"""The state worker processes share (docs/workers.rst, "Shared between workers"),
each piece over one data dir as two processes would see it.

- api.json's read-modify-write under its lock loses no change made by two
  processes at once; a change in one LiveConfig is applied by the other
  before ``put`` returns.
- The free-space state and the store's figures: what one Store notes, the
  other sees; a non-primary never evicts.
- The status history as a file; connection counts as metrics; the
  ``server.max_connections`` share of each worker; the open-file limit.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import ensureDeferred

from sparkcache.config import Config
from sparkcache.limits import raise_nofile
from sparkcache.metrics import Metrics
from sparkcache.reload import LiveConfig, Spread
from sparkcache.service import per_worker
from sparkcache.store import Store
from sparkcache.store.settings import AppliedGenerations, read_api_state, update_api_remotes
from sparkcache.store.space import SharedSpace
from sparkcache.web.status import COLUMNS, History, Totals, read_json, write_json

UPSTREAM = "http://upstream.example:8080"


def _add_many(data_dir: str, prefix: str, n: int) -> None:
    for i in range(n):
        update_api_remotes(data_dir, lambda api, i=i: {**api, f"{prefix}{i}": {"type": "generic", "upstream": UPSTREAM}})


def test_concurrent_changes_from_two_processes_are_all_kept(tmp_path: Any) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_many, args=(str(tmp_path), p, 25)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    api, generation = read_api_state(str(tmp_path))
    assert len(api) == 50 and generation == 50


def test_a_change_that_raises_writes_nothing(tmp_path: Any) -> None:
    update_api_remotes(str(tmp_path), lambda api: {"x": {"type": "generic", "upstream": UPSTREAM}})

    def refuse(api: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("no")

    with pytest.raises(ValueError):
        update_api_remotes(str(tmp_path), refuse)
    assert read_api_state(str(tmp_path)) == ({"x": {"type": "generic", "upstream": UPSTREAM}}, 1)


def test_applied_generations_skip_this_worker_and_dead_ones(tmp_path: Any) -> None:
    w0, w1 = AppliedGenerations(str(tmp_path), 0, 3), AppliedGenerations(str(tmp_path), 1, 3)
    w0.mark(4)
    assert w0.behind(4) == []  # nobody else marked yet: slots without a pid
    w1.mark(3)
    assert w0.behind(4) == [1] and w1.behind(3) == []
    w1.mark(4)
    assert w0.behind(4) == []
    # A dead worker's slot (its pid gone) is not waited for.
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=lambda: AppliedGenerations(str(tmp_path), 2, 3).mark(1))
    child.start()
    child.join(30)
    assert w0.behind(4) == []


def _now(coro: Any) -> Any:
    """The result of a coroutine that does not wait (LiveConfig without an I/O pool)."""
    out: list[Any] = []
    ensureDeferred(coro).addBoth(out.append)
    return out[0]


def _live(data_dir: str, applied: AppliedGenerations, seen: list[Config]) -> LiveConfig:
    live = LiveConfig(None, {}, data_dir, seen.append)
    live.use_file_data({"storage": {"data_dir": data_dir},
                        "remotes": {"files": {"type": "generic", "upstream": UPSTREAM}}}, "cache.yaml")
    live.spread = Spread(applied, task.Clock(), notify=lambda: None)
    return live


@pytest_twisted.ensureDeferred
async def test_a_change_in_one_worker_is_applied_by_the_other_before_the_answer(tmp_path: Any) -> None:
    d = str(tmp_path)
    seen_a: list[Config] = []
    seen_b: list[Config] = []
    a = _live(d, AppliedGenerations(d, 0, 2), seen_a)
    b = _live(d, AppliedGenerations(d, 1, 2), seen_b)
    b.spread.applied.mark(0)  # type: ignore[union-attr]
    refreshed = []
    a.spread.notify = lambda: refreshed.append(_now(b.refresh()))  # type: ignore[union-attr]
    assert await a.put("more", {"type": "generic", "upstream": UPSTREAM + "/more"}) is True
    assert refreshed == [True] and "more" in seen_b[-1].remotes and b.api == a.api
    # b changes it in turn, from the file (not from what it ran before).
    b.spread.notify = lambda: refreshed.append(_now(a.refresh()))  # type: ignore[union-attr]
    assert await b.put("other", {"type": "generic", "upstream": UPSTREAM + "/o"}) is True
    assert set(seen_a[-1].remotes) == {"files", "more", "other"} and a.generation == b.generation == 2
    await a.delete("more")
    assert set(read_api_state(d)[0]) == {"other"}
    assert await a.refresh() is False  # nothing new


def test_shared_space_state_is_every_stores(tmp_path: Any) -> None:
    clock = task.Clock()
    one, two = Store(str(tmp_path), clock, 1 << 30), Store(str(tmp_path), clock, 1 << 30)
    alone = Store(str(tmp_path / "alone"), clock, 1 << 30)
    one.share_space(evicts=True)
    two.share_space(evicts=False)
    clock.advance(1000)
    one.low_space = True
    assert two.low_space and not two.writable and not alone.low_space
    one.low_space = False
    one._write_failed_at, one.write_error = clock.seconds(), "[Errno 28] No space left on device"
    assert not two.writable and two.write_error == "[Errno 28] No space left on device"
    clock.advance(31)
    assert two.writable  # the hold is over for everyone
    one.size, one.entries = 5000, 3
    two.entries += 1
    assert (one.size, one.entries, two.size) == (5000, 4, 5000)
    one.free, one.floor = None, 7
    assert two.free is None and two.floor == 7
    one.write_error = "x" * 2000  # longer than the slot: cut, never spilling over
    assert two.write_error == "x" * one._shared.ERROR_MAX  # type: ignore[union-attr]
    assert not os.path.exists(tmp_path / "alone" / "space.state")  # one process: no file


def test_history_goes_through_its_file(tmp_path: Any) -> None:
    primary = History(interval=10, size=3)
    for n in range(5):
        primary.add(float(n), Totals(hits=n, misses=1, bytes_cache=10 * n))
    path = str(tmp_path / "status-history.json")
    write_json(path, primary.as_json())
    other = History(interval=10, size=3)
    other.load(read_json(path))
    assert other.as_json() == primary.as_json() and len(other.samples) == 3
    assert read_json(str(tmp_path / "none.json")) is None
    other.load({"samples": [[1, 2], "x"]})  # not ours: nothing taken
    assert other.samples == type(other.samples)([], maxlen=3) and len(COLUMNS) == 5


class _Site:
    connections, shedding, shed_total = 3, 1, 7


def test_connection_counts_are_metrics() -> None:
    m = Metrics(task.Clock())
    assert m.connection_counts() == {"connections": 0, "shedding": 0, "shed_total": 0}
    m.site = _Site()
    assert m.connection_counts() == {"connections": 3, "shedding": 1, "shed_total": 7}
    text = m.render().decode()
    assert "sparkcache_connections 3.0" in text and "sparkcache_connections_shedding 1.0" in text
    assert "sparkcache_connections_shed_total 7.0" in text
    _Site.shed_total = 9
    assert "sparkcache_connections_shed_total 9.0" in m.render().decode()


def test_max_connections_is_the_daemons_divided_among_workers() -> None:
    assert per_worker(None, 4) is None
    assert per_worker(1000, 1) == 1000
    assert per_worker(1000, 3) == 334
    assert per_worker(1, 2) == 1


def test_the_open_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no finite hard limit to compare")
    lower = max(64, min(soft, hard) // 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
    try:
        assert raise_nofile(quiet=True) == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest_twisted.ensureDeferred
async def test_a_worker_that_does_not_evict_asks_the_primary_for_room(tmp_path: Any, monkeypatch: Any) -> None:
    from twisted.internet import reactor

    monkeypatch.setattr("sparkcache.store.ROOM_WAIT", 0.3)  # no primary here: it waits in vain
    worker = Store(str(tmp_path), reactor, 1 << 30, min_free=1 << 60)  # a floor no disk reaches
    worker.share_space(evicts=False)
    worker.size = 1 << 61  # evicting could make that room (else it would not even ask)
    worker.io_pool.start()
    try:
        assert await worker.make_room(100) is False and worker.low_space
        assert await worker.make_room(40) is False
    finally:
        worker.io_pool.stop()
    primary = SharedSpace(os.path.join(str(tmp_path), "space.state"))
    assert primary.low_space
    assert primary.take_wanted() == 100 and primary.take_wanted() is None  # the largest need, once
