"""Upstream storms: a mirror's fetches are paced (one in flight, the next no
sooner than git.min_fetch_interval after it), and mirrors created at run time
are bounded in number (git.max_mirrors) and disk (git.max_size). Driven by
task.Clock; the fetch itself is replaced so that only the pacing is tested."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred

from sparkcache.config import ConfigError
from sparkcache.git.interfaces import MirrorLimit
from sparkcache.git.mirrors import Mirrors
from sparkcache.protocols import load_config_data

A = "a" * 40


def fleet(tmp_path: Path, clock: task.Clock, **git: Any) -> Mirrors:
    cfg = load_config_data({"git": {"repos": {"app": "https://forge.example/o/app.git"}, "jitter": 0, **git}},
                           "c", {}).git
    return Mirrors(cfg, str(tmp_path / "data"), reactor, clock=clock)


class HeldFetches:
    """Stands in for Mirrors._refresh: each fetch waits until the test ends it."""

    def __init__(self) -> None:
        self.started: list[Deferred[dict[str, str]]] = []

    def __call__(self, mirror: Any, clone: bool) -> Deferred[dict[str, str]]:
        d: Deferred[dict[str, str]] = Deferred()
        self.started.append(d)
        return d


def paced(tmp_path: Path) -> tuple[task.Clock, Mirrors, HeldFetches, Any]:
    """A fleet paced at 5 s whose fetches the test ends; and its mirror ``app``."""
    clock = task.Clock()
    ms = fleet(tmp_path, clock, min_fetch_interval="5s")
    fetches = HeldFetches()
    ms._refresh = fetches  # type: ignore[method-assign]
    return clock, ms, fetches, ms.lookup("app")


def test_a_storm_of_refreshes_costs_one_fetch_per_interval(tmp_path: Path) -> None:
    clock, ms, fetches, m = paced(tmp_path)
    first = [ms.refresh(m) for _ in range(50)]
    assert len(fetches.started) == 1  # one in flight; the other 49 joined it
    fetches.started[0].callback({"refs/heads/main": A})
    assert all(d.called for d in first)

    # Right after it: the next callers wait for the interval, together.
    clock.advance(1)
    second = [ms.refresh(m) for _ in range(50)]
    assert len(fetches.started) == 1 and not any(d.called for d in second)
    clock.advance(3.9)
    assert len(fetches.started) == 1
    clock.advance(0.1)  # 5 s after the first fetch ended
    assert len(fetches.started) == 2
    more = ms.refresh(m)  # during the fetch: joins it
    fetches.started[1].callback({"refs/heads/main": A})
    assert all(d.called for d in second) and more.called and len(fetches.started) == 2

    # Once the interval has passed, a refresh starts at once.
    clock.advance(5)
    ms.refresh(m)
    assert len(fetches.started) == 3


def test_a_failed_fetch_is_paced_too(tmp_path: Path) -> None:
    clock, ms, fetches, m = paced(tmp_path)
    d = ms.refresh(m)
    fetches.started[0].errback(RuntimeError("forge down"))
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures
    ms.refresh(m).addErrback(lambda f: None)
    assert len(fetches.started) == 1
    clock.advance(5)
    assert len(fetches.started) == 2
    fetches.started[1].callback({})


def test_webhook_pushes_are_not_paced(tmp_path: Path) -> None:
    clock, ms, fetches, m = paced(tmp_path)
    ms.refresh(m)
    fetches.started[0].callback({"refs/heads/main": A})
    ms.pushed(m, {"refs/heads/main": "b" * 40})  # signed by the forge: fetch now
    assert len(fetches.started) == 2
    fetches.started[1].callback({"refs/heads/main": "b" * 40})


def test_mirrors_created_at_run_time_are_bounded_in_number(tmp_path: Path) -> None:
    clock = task.Clock()
    ms = fleet(tmp_path, clock, allowed_hosts=["forge.example"], max_mirrors=2)
    ms.lookup("app")  # configured: not counted
    ms.lookup("forge.example/o/one")
    ms.register("two", "https://forge.example/o/two.git")
    with pytest.raises(MirrorLimit, match="max_mirrors"):
        ms.lookup("forge.example/o/three")
    with pytest.raises(MirrorLimit):
        ms.register("four", "https://forge.example/o/four.git")
    # known names are still served
    assert ms.lookup("forge.example/o/one").name == "forge.example/o/one"
    assert ms.lookup("two").name == "two"
    assert ms.registry.get("forge.example/o/three") is None


def test_mirrors_created_at_run_time_are_bounded_by_disk(tmp_path: Path) -> None:
    clock = task.Clock()
    ms = fleet(tmp_path, clock, allowed_hosts=["forge.example"], max_size="1MiB")
    app = ms.lookup("app")
    ms.lookup("forge.example/o/one")
    ms.state(app).size = 2 * 2**20  # as measured after its last fetch
    with pytest.raises(MirrorLimit, match="max_size"):
        ms.lookup("forge.example/o/two")
    ms.state(app).size = 100
    assert ms.lookup("forge.example/o/two").name == "forge.example/o/two"


def test_measure_reads_the_size_of_mirrors_on_disk(tmp_path: Path) -> None:
    import pygit2

    clock = task.Clock()
    ms = fleet(tmp_path, clock, max_size="1GiB")
    app = ms.lookup("app")
    pygit2.init_repository(app.path, bare=True)
    ms.run = lambda fn, *args: Deferred.fromCoroutine(_now(fn, *args))  # type: ignore[method-assign]
    got: list[int] = []
    ms.measure().addCallback(got.append)
    assert got and got[0] > 0 and ms.state(app).size == got[0]


async def _now(fn: Any, *args: Any) -> Any:
    return fn(*args)


@pytest.mark.parametrize("git, where", [
    ({"min_fetch_interval": "2m", "fetch_interval": "1m"}, "git.min_fetch_interval"),
    ({"max_mirrors": -1}, "git.max_mirrors"),
    ({"max_size": "lots"}, "git.max_size"),
])
def test_bad_storm_settings(git: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config_data({"git": git}, "c", {})
    assert where in str(e.value)
