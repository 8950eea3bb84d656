"""Shallow and partial clones, push refusal, and serving while upstream is down."""

from __future__ import annotations

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
    up.create("app", files={"README": "v1\n", "data/blob.bin": b"\x00" * 1000 + b"one"})
    for i in range(2, 5):
        up.commit({"README": f"v{i}\n", "data/blob.bin": b"\x00" * 1000 + str(i).encode()}, f"commit {i}", name="app")
    d = daemon_factory(extra=git_daemon_config({"app": up.url("app")}))

    class Env:
        pass

    e = Env()
    e.up, e.d, e.home = up, d, tmp_path / "home"  # type: ignore[attr-defined]
    return e


@pytest.mark.parametrize("version", ["0", "2"])
def test_shallow_clone(env: Any, tmp_path: Path, version: str) -> None:
    c = tmp_path / "c"
    git_client("-c", f"protocol.version={version}", "clone", "-q", "--depth", "1", env.d.url("/git/app"), str(c),
               home=env.home)
    assert git("rev-list", "--count", "HEAD", cwd=c) == "1"
    assert (c / ".git" / "shallow").read_text().strip() == env.up.rev("refs/heads/main", "app")
    assert (c / "README").read_text() == "v4\n"
    # deepen later
    git_client("-c", f"protocol.version={version}", "fetch", "-q", "--deepen", "2", cwd=c, home=env.home)
    assert git("rev-list", "--count", "HEAD", cwd=c) == "3"


def test_partial_clone_blob_none(env: Any, tmp_path: Path) -> None:
    c = tmp_path / "c"
    git_client("clone", "-q", "--filter=blob:none", "--no-checkout", env.d.url("/git/app"), str(c), home=env.home)
    assert git("config", "remote.origin.promisor", cwd=c) == "true"
    # History is there, old blobs are not.
    assert git("rev-list", "--count", "HEAD", cwd=c) == "4"
    missing = git("rev-list", "--objects", "--all", "--missing=print", cwd=c)
    assert any(line.startswith("?") for line in missing.splitlines()), missing
    # Checkout lazily fetches the blobs it needs through the cache.
    git_client("checkout", "-q", "main", cwd=c, home=env.home)
    assert (c / "README").read_text() == "v4\n"
    git("fsck", cwd=c)


def test_push_is_refused_with_the_upstream_url(env: Any, tmp_path: Path) -> None:
    c = tmp_path / "c"
    git_client("clone", "-q", env.d.url("/git/app"), str(c), home=env.home)
    (c / "local.txt").write_text("local\n")
    git("add", "local.txt", cwd=c)
    git("commit", "-q", "-m", "local change", cwd=c)
    p = git_client("push", "origin", "HEAD:main", cwd=c, home=env.home, check=False)
    assert p.returncode != 0
    assert "read-only mirror" in p.stderr and env.up.url("app") in p.stderr, p.stderr
    assert env.up.count("app", "git-receive-pack") == 0
    r = env.d.request("POST", "/git/app/git-receive-pack", body=b"0000")
    assert r.status == 403 and env.up.url("app").encode() in r.body, r.describe()


def test_upstream_down_clone_still_works(env: Any, tmp_path: Path) -> None:
    git_client("clone", "-q", env.d.url("/git/app"), str(tmp_path / "warm"), home=env.home)
    head = env.up.rev("refs/heads/main", "app")
    env.up.stop()
    for version in ("0", "2"):
        c = tmp_path / f"c{version}"
        git_client("-c", f"protocol.version={version}", "clone", "-q", env.d.url("/git/app"), str(c), home=env.home)
        assert git("rev-parse", "HEAD", cwd=c) == head
    # An eager refresh reports the failure; the mirror keeps serving.
    r = env.d.request("POST", "/git/refresh?name=app")
    assert r.status in (502, 503), r.describe()
    assert r.header("Content-Type") == "application/json"
    git_client("fetch", "-q", "origin", cwd=tmp_path / "c2", home=env.home)
    env.up.start()
    sha = env.up.commit({"after.txt": "back\n"}, "back up", name="app")
    assert env.d.request("POST", "/git/refresh?name=app").status == 200
    git_client("pull", "-q", "--ff-only", cwd=tmp_path / "c2", home=env.home)
    assert git("rev-parse", "HEAD", cwd=tmp_path / "c2") == sha
