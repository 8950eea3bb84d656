"""The git machinery follows a new ``git:`` section (a reload): new repos are
scheduled, removed ones are no longer fetched nor served and keep their mirror
on disk, and one that comes back with the same URL serves that mirror again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor, task

from sparkcache.git.interfaces import UnknownRepo
from sparkcache.git.loop import Scheduler
from sparkcache.git.mirrors import Mirrors
from sparkcache.protocols import load_config_data
from tests.support.git_upstream import FileUpstream
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401


def git_config(repos: dict[str, str], **extra: object) -> object:
    return load_config_data({"git": {"repos": repos, "jitter": 0, **extra}}, "c", {}).git


@pytest_twisted.ensureDeferred
async def test_added_repos_are_scheduled_and_removed_ones_kept_on_disk(tmp_path: Path) -> None:
    ups = {n: FileUpstream(tmp_path / n, branch="main") for n in ("one", "two", "three")}
    ms = Mirrors(git_config({"one": ups["one"].url, "two": ups["two"].url}), str(tmp_path / "data"), reactor)
    loop = Scheduler(ms, task.Clock())
    loop.startService()
    try:
        for n in ("one", "two"):
            await ms.ensure(ms.lookup(n))
        two = ms.lookup("two")
        fetched = ms.state(two).last_fetch
        ms.reconfigure(git_config({"one": ups["one"].url, "three": ups["three"].url}, fetch_interval="10m"))
        with pytest.raises(UnknownRepo):
            ms.lookup("two")
        assert os.path.isdir(two.path), "a repo removed from the config lost its mirror"
        three = ms.lookup("three")
        assert three.path in loop.entries, "the loop does not know the new repo"
        assert ms.config.fetch_interval == 600
        await loop.tick()
        assert ms.state(two).last_fetch == fetched, "a removed repo was fetched"
        assert {s["name"] for s in await ms.status()} == {"one", "three"}
        # Back with the same URL: the same mirror, with its objects.
        ms.reconfigure(git_config({"one": ups["one"].url, "two": ups["two"].url}))
        assert ms.lookup("two").path == two.path and ms.exists(ms.lookup("two"))
        for m in ms.mirrors():
            await ms.idle(m)  # background repacks end before the pool stops
    finally:
        loop.stopService()
        ms.stop()


@pytest_twisted.ensureDeferred
async def test_a_reload_reaches_the_served_repos(harness_factory: MakeHarness, tmp_path: Path) -> None:
    ups = {n: FileUpstream(tmp_path / n, branch="main") for n in ("one", "two")}
    config = {"git": {"repos": {"one": ups["one"].url}}}
    h: Harness = await harness_factory(config)
    path = tmp_path / "cache.yaml"
    data = {**config, "storage": {"data_dir": h.store.data_dir}}
    h.svc.live.use_file_data(data, str(path))
    names = {r["name"] for r in (await h.get("/repos")).json()}
    assert names == {"one"}
    data["git"] = {"repos": {"two": ups["two"].url}}
    path.write_text(yaml.safe_dump(data))
    assert await h.svc.live.reload()
    names = {r["name"] for r in (await h.get("/repos")).json()}
    assert names == {"two"}
