"""git clone/fetch through the cache against a real upstream (git http-backend).

Protocol v0 and v2 clones, eager refresh after an upstream commit, and the
push-then-fetch race (a commit the mirror has not fetched yet is fetched
upstream once, then served). See docs/git.rst.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.git_upstream import (  # noqa: F401 - fixture
    GitUpstream,
    git,
    git_client,
    git_daemon_config,
    git_upstream_factory,
)


@pytest.fixture
def env(git_upstream_factory: Any, daemon_factory: Any, tmp_path: Path) -> Any:
    up: GitUpstream = git_upstream_factory()
    up.create("app", files={"README": "app\n", "src/main.c": "int main(void) { return 0; }\n"})
    up.commit({"docs/a.txt": "second\n"}, "second", name="app")
    d = daemon_factory(extra=git_daemon_config({"app": up.url("app")}))

    class Env:
        pass

    e = Env()
    e.up, e.d, e.home = up, d, tmp_path / "home"  # type: ignore[attr-defined]
    return e


@pytest.mark.parametrize("version", ["0", "1", "2"])
def test_clone(env: Any, tmp_path: Path, version: str) -> None:
    out = tmp_path / "c"
    p = git_client("-c", f"protocol.version={version}", "clone", env.d.url("/git/app.git"), str(out), home=env.home,
                   env={"GIT_TRACE_PACKET": "1"})
    assert git("rev-parse", "HEAD", cwd=out) == env.up.rev("refs/heads/main", "app")
    assert (out / "docs" / "a.txt").read_text() == "second\n"
    git("fsck", "--strict", cwd=out)
    # The client really spoke the version under test.
    assert ("version 2" in p.stderr) == (version == "2"), p.stderr[-2000:]
    # Later clones come from the mirror: upstream saw the first clone's fetch only.
    git_client("-c", f"protocol.version={version}", "clone", "-q", env.d.url("/git/app"), str(tmp_path / "c2"),
               home=env.home)
    assert env.up.count("app", "git-upload-pack", "POST") == 1, env.up.describe()


def test_fetch_after_upstream_commit_with_eager_refresh(env: Any, tmp_path: Path) -> None:
    c = tmp_path / "c"
    git_client("clone", "-q", env.d.url("/git/app"), str(c), home=env.home)
    sha = env.up.commit({"new.txt": "new\n"}, "third", name="app")
    r = env.d.request("POST", "/git/refresh?name=app")
    assert r.status == 200, r.describe()
    body = json.loads(r.body)
    assert body["name"] == "app" and body["refs"]["refs/heads/main"] == sha
    git_client("pull", "-q", "--ff-only", cwd=c, home=env.home)
    assert git("rev-parse", "HEAD", cwd=c) == sha
    # ?repo=URL names the same mirror
    r = env.d.request("POST", f"/git/refresh?repo={env.up.url('app')}")
    assert r.status == 200 and json.loads(r.body)["name"] == "app", r.describe()


@pytest.mark.parametrize("version", ["0", "2"])
def test_push_then_fetch_race(env: Any, tmp_path: Path, version: str) -> None:
    c = tmp_path / "c"
    git_client("clone", "-q", env.d.url("/git/app"), str(c), home=env.home)
    env.up.reset_counts()
    # A CI job triggered by a push asks for the new commit before any fetch loop ran.
    sha = env.up.commit({"pushed.txt": "just pushed\n"}, "pushed", name="app")
    git_client("-c", f"protocol.version={version}", "fetch", "-q", "origin", sha, cwd=c, home=env.home)
    git_client("checkout", "-q", sha, cwd=c, home=env.home)
    assert (c / "pushed.txt").read_text() == "just pushed\n"
    # Exactly one upstream fetch (one ref discovery, one negotiation) served it.
    assert env.up.count("app", "git-upload-pack", "GET") == 1, env.up.describe()
    assert env.up.count("app", "git-upload-pack", "POST") == 1, env.up.describe()


def test_fresh_clone_of_a_just_pushed_sha(env: Any, tmp_path: Path) -> None:
    assert env.d.request("POST", "/git/refresh?name=app").status == 200  # the mirror exists
    sha = env.up.commit({"x.txt": "x\n"}, "pushed", name="app")
    c = tmp_path / "c"
    # A clone's advertisement still shows the mirror's refs; asking for the
    # new commit by id brings it in.
    git_client("init", "-q", str(c), home=env.home)
    git_client("fetch", "-q", "--depth=1", env.d.url("/git/app"), sha, cwd=c, home=env.home)
    git_client("checkout", "-q", sha, cwd=c, home=env.home)
    assert (c / "x.txt").read_text() == "x\n"
    assert git("rev-parse", "HEAD", cwd=c) == sha
