"""/archive, /file, /tree-hash, /branch-contains through the real daemon, against a
real upstream (git http-backend); every expected value comes from the git CLI run
on the upstream's bare repository."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.support.client import assert_json_error
from tests.support.git_upstream import (  # noqa: F401 - fixture
    GitUpstream,
    git,
    git_daemon_config,
    git_env,
    git_upstream_factory,
)


@pytest.fixture
def env(git_upstream_factory: Any, daemon_factory: Any) -> Any:
    up: GitUpstream = git_upstream_factory()
    first = up.create("app", files={"README": "app\n", "src/main.c": "int main(void) { return 0; }\n"})
    up.tag("v1", first, name="app")
    git("tag", "-a", "v1-annotated", "-m", "release", first, cwd=up.path("app"))
    up.commit({"docs/a.txt": "second\n", "README": "app, again\n"}, "second", name="app")
    git("branch", "feature", first, cwd=up.path("app"))
    up.commit({"feature.txt": "feature\n"}, "feature", branch="feature", name="app")
    d = daemon_factory(extra=git_daemon_config({"app": up.url("app")}))

    class Env:
        pass

    e = Env()
    e.up, e.d, e.first = up, d, first  # type: ignore[attr-defined]
    return e


def cli(up: GitUpstream, *args: str) -> str:
    return git(*args, cwd=up.path("app"))


def blob(up: GitUpstream, spec: str) -> bytes:
    return subprocess.run(["git", "cat-file", "blob", spec], cwd=up.path("app"), capture_output=True, check=True,
                          env=git_env()).stdout


def test_file_tree_hash_branch_contains_match_git(env: Any) -> None:
    up, d = env.up, env.d
    for branch in ("main", "v1", "v1-annotated", "feature", env.first, env.first[:8]):
        for path in ("README", "src/main.c"):
            r = d.get(f"/file?repo=app&branch={branch}&path={path}")
            assert r.status == 200, r.describe()
            assert r.body == blob(up, f"{branch}:{path}")
            assert r.header("ETag") == f'"{cli(up, "rev-parse", f"{branch}:{path}")}"'
            assert r.header("X-Git-Commit") == cli(up, "rev-parse", f"{branch}^{{commit}}")
        for path in ("", "src", "README"):
            r = d.get(f"/tree-hash?repo=app&branch={branch}&path={path}")
            assert r.status == 200, r.describe()
            assert r.json()["hash"] == cli(up, "rev-parse", f"{branch}:{path}" if path else f"{branch}^{{tree}}")
    # repo= may be the upstream URL too.
    r = d.get(f"/tree-hash?repo={quote(up.url('app'), safe='')}&branch=main&path=docs", {"Accept": "text/plain"})
    assert r.status == 200 and r.body.decode().strip() == cli(up, "rev-parse", "main:docs")
    tips = {b: cli(up, "rev-parse", b) for b in ("main", "feature")}
    for branch in ("main", "feature", "v1"):
        for commit in (env.first, tips["main"], tips["feature"]):
            r = d.get(f"/branch-contains?repo=app&branch={branch}&commit={commit}")
            assert r.status == 200, r.describe()
            expected = subprocess.run(["git", "merge-base", "--is-ancestor", commit, branch], cwd=up.path("app"),
                                      env=git_env()).returncode == 0
            assert r.json()["contains"] is expected, (branch, commit)
    etag = d.get("/file?repo=app&branch=main&path=README").header("ETag")
    assert d.get("/file?repo=app&branch=main&path=README", {"If-None-Match": etag or ""}).status == 304
    for path, status in (("/file?repo=nope&path=README", 404), ("/file?repo=app&branch=nope&path=README", 404),
                         ("/file?repo=app&path=missing", 404), ("/file?repo=app&path=src", 400),
                         ("/file?repo=app&path=../README", 400), ("/tree-hash?repo=app&path=src/../..", 400),
                         (f"/branch-contains?repo=app&branch=main&commit={'d' * 40}", 404)):
        assert_json_error(d.get(path), status)


def test_archive_is_cached_per_commit(env: Any, tmp_path: Path) -> None:
    up, d = env.up, env.d
    main = cli(up, "rev-parse", "main")
    r = d.get("/archive?repo=app&branch=main")
    assert r.status == 200, r.describe()
    assert r.header("ETag") == f'"{main}"' and r.header("X-Cache") == "MISS"
    assert r.header("Content-Type") == "application/gzip"
    members = {}
    with tarfile.open(fileobj=io.BytesIO(r.body), mode="r:gz") as tar:
        for m in tar:
            if m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                members[m.name] = f.read()
        assert tar.pax_headers.get("comment") == main
    files = cli(up, "ls-tree", "-r", "--name-only", "main").splitlines()
    assert sorted(members) == sorted(files)
    for name in files:
        assert members[name] == blob(up, f"main:{name}")
    again = d.get(f"/archive?repo=app&branch={main}")
    assert again.status == 200 and again.header("X-Cache") == "HIT" and again.body == r.body
    part = d.get("/archive?repo=app&branch=main", {"Range": "bytes=5-14"})
    assert part.status == 206 and part.body == r.body[5:15]
    head = d.head("/archive?repo=app&branch=main")
    assert head.status == 200 and head.body == b"" and head.header("Content-Length") == str(len(r.body))
    assert d.get("/archive?repo=app", {"If-None-Match": f'"{main}"'}).status == 304
    # `tar` extracts it like any archive.
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xzf", "-", "-C", str(out)], input=r.body, check=True)
    assert (out / "docs" / "a.txt").read_text() == "second\n"
    assert_json_error(d.get("/archive?repo=app&branch=no-such-branch"), 404)


def test_just_pushed_commit_and_upstream_down(env: Any) -> None:
    up, d = env.up, env.d
    assert d.get("/file?repo=app&path=README").status == 200  # mirror cloned
    sha = up.commit({"pushed.txt": "just pushed\n"}, "pushed", name="app")
    # Asked by commit id before any fetch loop ran: fetched once, then served.
    r = d.get(f"/file?repo=app&branch={sha}&path=pushed.txt")
    assert r.status == 200 and r.body == b"just pushed\n", r.describe()
    r = d.get(f"/branch-contains?repo=app&branch=main&commit={sha}")
    assert r.status == 200 and r.json()["contains"] is True
    up.stop()
    # Upstream gone: everything the mirror has is still served.
    r = d.get("/file?repo=app&branch=main&path=pushed.txt")
    assert r.status == 200 and r.body == b"just pushed\n", r.describe()
    assert d.get("/archive?repo=app&branch=main").status == 200
    assert d.get("/tree-hash?repo=app&branch=v1").json()["commit"] == env.first
    assert_json_error(d.get(f"/file?repo=app&branch={'e' * 40}&path=README"), 404)
    assert json.loads(d.get("/health").body)["status"] == "ok"
