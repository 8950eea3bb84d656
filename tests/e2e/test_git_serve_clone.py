"""git clone/fetch through the cache against a real upstream (git http-backend).

Protocol v0, v1 and v2 clones, eager refresh after an upstream commit, and the
push-then-fetch race (a commit the mirror has not fetched yet is fetched
upstream once, then served). One daemon per module (``git_cache``); each test
has its own upstream and registers its own repository. See docs/git.rst.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support.git_upstream import (  # noqa: F401 - fixtures
    GitEnv,
    git,
    git_cache,
    git_case,
    git_client,
    git_upstream_factory,
)


@pytest.fixture
def app(git_case: GitEnv) -> str:
    git_case.up.create("app", files={"README": "app\n", "src/main.c": "int main(void) { return 0; }\n"})
    git_case.up.commit({"docs/a.txt": "second\n"}, "second", name="app")
    return git_case.register("app")


@pytest.mark.parametrize("version", ["0", "1", "2"])
def test_clone(git_case: GitEnv, app: str, tmp_path: Path, version: str) -> None:
    e = git_case
    out = tmp_path / "c"
    p = git_client("-c", f"protocol.version={version}", "clone", e.d.url(f"/git/{app}.git"), str(out), home=e.home,
                   env={"GIT_TRACE_PACKET": "1"})
    assert git("rev-parse", "HEAD", cwd=out) == e.up.rev("refs/heads/main", "app")
    assert (out / "docs" / "a.txt").read_text() == "second\n"
    git("fsck", "--strict", cwd=out)
    # The client really spoke the version under test.
    assert ("version 2" in p.stderr) == (version == "2"), p.stderr[-2000:]
    # Later clones come from the mirror: upstream saw one fetch only.
    git_client("-c", f"protocol.version={version}", "clone", "-q", e.d.url(f"/git/{app}"), str(tmp_path / "c2"),
               home=e.home)
    assert e.up.count("app", "git-upload-pack", "POST") == 1, e.up.describe()


def test_fetch_after_upstream_commit_with_eager_refresh(git_case: GitEnv, app: str, tmp_path: Path) -> None:
    e = git_case
    c = tmp_path / "c"
    git_client("clone", "-q", e.d.url(f"/git/{app}"), str(c), home=e.home)
    sha = e.up.commit({"new.txt": "new\n"}, "third", name="app")
    r = e.d.request("POST", f"/git/refresh?name={app}")
    assert r.status == 200, r.describe()
    body = json.loads(r.body)
    assert body["name"] == app and body["refs"]["refs/heads/main"] == sha
    git_client("pull", "-q", "--ff-only", cwd=c, home=e.home)
    assert git("rev-parse", "HEAD", cwd=c) == sha
    # ?repo=URL names the same mirror
    r = e.d.request("POST", f"/git/refresh?repo={quote(e.up.url('app'), safe='')}")
    assert r.status == 200 and json.loads(r.body)["name"] == app, r.describe()


@pytest.mark.parametrize("version", ["0", "2"])
def test_push_then_fetch_race(git_case: GitEnv, app: str, tmp_path: Path, version: str) -> None:
    e = git_case
    c = tmp_path / "c"
    git_client("clone", "-q", e.d.url(f"/git/{app}"), str(c), home=e.home)
    e.up.reset_counts()
    # A CI job triggered by a push asks for the new commit before any fetch loop ran.
    sha = e.up.commit({"pushed.txt": "just pushed\n"}, "pushed", name="app")
    git_client("-c", f"protocol.version={version}", "fetch", "-q", "origin", sha, cwd=c, home=e.home)
    git_client("checkout", "-q", sha, cwd=c, home=e.home)
    assert (c / "pushed.txt").read_text() == "just pushed\n"
    # Exactly one upstream fetch (one ref discovery, one negotiation) served it.
    assert e.up.count("app", "git-upload-pack", "GET") == 1, e.up.describe()
    assert e.up.count("app", "git-upload-pack", "POST") == 1, e.up.describe()


def test_fresh_clone_of_a_just_pushed_sha(git_case: GitEnv, app: str, tmp_path: Path) -> None:
    e = git_case
    assert e.d.request("POST", f"/git/refresh?name={app}").status == 200  # the mirror exists
    sha = e.up.commit({"x.txt": "x\n"}, "pushed", name="app")
    c = tmp_path / "c"
    # A clone's advertisement still shows the mirror's refs; asking for the
    # new commit by id brings it in.
    git_client("init", "-q", str(c), home=e.home)
    git_client("fetch", "-q", "--depth=1", e.d.url(f"/git/{app}"), sha, cwd=c, home=e.home)
    git_client("checkout", "-q", sha, cwd=c, home=e.home)
    assert (c / "x.txt").read_text() == "x\n"
    assert git("rev-parse", "HEAD", cwd=c) == sha
