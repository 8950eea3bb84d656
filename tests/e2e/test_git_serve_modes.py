"""Shallow and partial clones, push refusal, serving while upstream is down,
unknown repositories and malformed requests, gzip request bodies.

One daemon per module (``git_cache``); each test has its own upstream.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    git_case.up.create("app", files={"README": "v1\n", "data/blob.bin": b"\x00" * 1000 + b"one"})
    for i in range(2, 5):
        git_case.up.commit({"README": f"v{i}\n", "data/blob.bin": b"\x00" * 1000 + str(i).encode()}, f"commit {i}",
                           name="app")
    return git_case.register("app")


@pytest.mark.parametrize("version", ["0", "2"])
def test_shallow_clone(git_case: GitEnv, app: str, tmp_path: Path, version: str) -> None:
    e = git_case
    c = tmp_path / "c"
    git_client("-c", f"protocol.version={version}", "clone", "-q", "--depth", "1", e.d.url(f"/git/{app}"), str(c),
               home=e.home)
    assert git("rev-list", "--count", "HEAD", cwd=c) == "1"
    assert (c / ".git" / "shallow").read_text().strip() == e.up.rev("refs/heads/main", "app")
    assert (c / "README").read_text() == "v4\n"
    # deepen later
    git_client("-c", f"protocol.version={version}", "fetch", "-q", "--deepen", "2", cwd=c, home=e.home)
    assert git("rev-list", "--count", "HEAD", cwd=c) == "3"


def test_partial_clone_blob_none(git_case: GitEnv, app: str, tmp_path: Path) -> None:
    e = git_case
    c = tmp_path / "c"
    git_client("clone", "-q", "--filter=blob:none", "--no-checkout", e.d.url(f"/git/{app}"), str(c), home=e.home)
    assert git("config", "remote.origin.promisor", cwd=c) == "true"
    # History is there, old blobs are not.
    assert git("rev-list", "--count", "HEAD", cwd=c) == "4"
    missing = git("rev-list", "--objects", "--all", "--missing=print", cwd=c)
    assert any(line.startswith("?") for line in missing.splitlines()), missing
    # Checkout lazily fetches the blobs it needs through the cache.
    git_client("checkout", "-q", "main", cwd=c, home=e.home)
    assert (c / "README").read_text() == "v4\n"
    git("fsck", cwd=c)


def test_push_is_refused_with_the_upstream_url(git_case: GitEnv, app: str, tmp_path: Path) -> None:
    e = git_case
    c = tmp_path / "c"
    git_client("clone", "-q", e.d.url(f"/git/{app}"), str(c), home=e.home)
    (c / "local.txt").write_text("local\n")
    git("add", "local.txt", cwd=c)
    git("commit", "-q", "-m", "local change", cwd=c)
    p = git_client("push", "origin", "HEAD:main", cwd=c, home=e.home, check=False)
    assert p.returncode != 0
    assert "read-only mirror" in p.stderr and e.up.url("app") in p.stderr, p.stderr
    assert e.up.count("app", "git-receive-pack") == 0
    r = e.d.request("POST", f"/git/{app}/git-receive-pack", body=b"0000")
    assert r.status == 403 and e.up.url("app").encode() in r.body, r.describe()


def test_upstream_down_clone_still_works(git_case: GitEnv, app: str, tmp_path: Path) -> None:
    e = git_case
    git_client("clone", "-q", e.d.url(f"/git/{app}"), str(tmp_path / "warm"), home=e.home)
    head = e.up.rev("refs/heads/main", "app")
    e.up.stop()
    for version in ("0", "2"):
        c = tmp_path / f"c{version}"
        git_client("-c", f"protocol.version={version}", "clone", "-q", e.d.url(f"/git/{app}"), str(c), home=e.home)
        assert git("rev-parse", "HEAD", cwd=c) == head
    # An eager refresh reports the failure; the mirror keeps serving.
    r = e.d.request("POST", f"/git/refresh?name={app}")
    assert r.status in (502, 503), r.describe()
    assert r.header("Content-Type") == "application/json"
    git_client("fetch", "-q", "origin", cwd=tmp_path / "c2", home=e.home)
    e.up.start()
    sha = e.up.commit({"after.txt": "back\n"}, "back up", name="app")
    assert e.d.request("POST", f"/git/refresh?name={app}").status == 200
    git_client("pull", "-q", "--ff-only", cwd=tmp_path / "c2", home=e.home)
    assert git("rev-parse", "HEAD", cwd=tmp_path / "c2") == sha


def test_unknown_repo_and_bad_requests(git_case: GitEnv, app: str, tmp_path: Path) -> None:
    e = git_case
    r = e.d.get("/git/nope/info/refs?service=git-upload-pack")
    assert r.status == 404 and "error" in json.loads(r.body), r.describe()
    p = git_client("clone", "-q", e.d.url("/git/nope"), str(tmp_path / "c"), home=e.home, check=False)
    assert p.returncode != 0 and "not found" in p.stderr, p.stderr
    r = e.d.request("POST", f"/git/{app}/git-upload-pack", body=b"this is not pkt-line")
    assert r.status == 400 and json.loads(r.body)["status"] == 400, r.describe()
    r = e.d.request("POST", f"/git/{app}/git-upload-pack", body=b"\x1f\x8b garbage",
                    headers={"Content-Encoding": "gzip"})
    assert r.status == 400, r.describe()
    r = e.d.get(f"/git/{app}/git-upload-pack")
    assert r.status == 405, r.describe()
    r = e.d.get(f"/git/{app}/info/refs")  # dumb HTTP
    assert r.status == 403, r.describe()
    r = e.d.request("POST", "/git/refresh?name=nope")
    assert r.status == 404, r.describe()


def test_gzip_request_bodies(git_case: GitEnv, app: str, tmp_path: Path) -> None:
    e = git_case
    c = tmp_path / "c"
    git_client("clone", "-q", e.d.url(f"/git/{app}"), str(c), home=e.home)
    # Enough new branch tips that the request (one want line each) exceeds
    # 1 KiB: git then gzips the request body.
    for i in range(24):
        e.up.commit({f"b{i}.txt": f"{i}\n"}, f"branch {i}", branch=f"b{i}", name="app")
    assert e.d.request("POST", f"/git/refresh?name={app}").status == 200
    p = git_client("-c", "protocol.version=0", "fetch", "origin", cwd=c, home=e.home,
                   env={"GIT_TRACE_CURL": "1", "GIT_TRACE_CURL_NO_DATA": "1"})
    assert "Content-Encoding: gzip" in p.stderr, p.stderr[-3000:]
    assert git("rev-parse", "origin/b23", cwd=c) == e.up.rev("refs/heads/b23", "app")
