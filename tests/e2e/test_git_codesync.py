"""Code sync through the real daemon: uploads (full and incremental, extracted and
compared), /sync/negotiate, and seeding a mirror from a git bundle when the cache
cannot reach the upstream at all (then a real `git clone` through /git/<name>)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.client import assert_json_error, bearer
from tests.support.daemon import free_port
from tests.support.git_upstream import (  # noqa: F401 - fixture
    GitUpstream,
    git,
    git_client,
    git_daemon_config,
    git_env,
    git_upstream_factory,
)

WRITE = "wrt-codesync-5c1d"
AUTH = {"anonymous_read": True, "tokens": [{"name": "ci", "token_env": "CODESYNC_TOKEN", "scopes": ["read", "write"]}]}


def extract(data: bytes, into: Path) -> dict[str, bytes]:
    into.mkdir(parents=True)
    subprocess.run(["tar", "-xzf", "-", "-C", str(into)], input=data, check=True)
    return {str(p.relative_to(into)): p.read_bytes() for p in sorted(into.rglob("*")) if p.is_file()}


def git_archive(up: GitUpstream, rev: str) -> bytes:
    return subprocess.run(["git", "archive", "--format=tar.gz", rev], cwd=up.path("app"), capture_output=True,
                          check=True, env=git_env()).stdout


@pytest.fixture
def env(git_upstream_factory: Any, daemon_factory: Any) -> Any:
    up: GitUpstream = git_upstream_factory()
    up.create("app", files={"README": "app\n", "src/main.c": "int main(void) { return 0; }\n",
                            "data/blob.bin": os.urandom(200_000)})
    up.commit({"docs/a.txt": "second\n"}, "second", name="app")
    d = daemon_factory(extra=git_daemon_config({"app": up.url("app")}), auth=AUTH, env={"CODESYNC_TOKEN": WRITE})

    class Env:
        pass

    e = Env()
    e.up, e.d = up, d  # type: ignore[attr-defined]
    return e


def test_upload_round_trip(env: Any, tmp_path: Path) -> None:
    up, d = env.up, env.d
    main = up.rev("refs/heads/main", "app")
    tarball = git_archive(up, main)
    assert_json_error(d.request("POST", "/upload", body=tarball), 401)
    r = d.request("POST", "/upload", bearer(WRITE), tarball)
    assert r.status == 201, r.describe()
    doc = r.json()
    # The id is the git tree id of what was uploaded.
    assert doc["id"] == git("rev-parse", f"{main}^{{tree}}", cwd=up.path("app"))
    assert doc["id"] == d.get(f"/tree-hash?repo=app&branch={main}").json()["hash"]
    got = d.get(f"/uploads/{doc['id']}")
    assert got.status == 200 and hashlib.sha256(got.body).hexdigest() == doc["sha256"]
    assert got.header("ETag") == f'"{doc["id"]}"'
    ours = extract(got.body, tmp_path / "ours")
    theirs = extract(tarball, tmp_path / "theirs")
    assert ours == theirs and len(ours) == doc["files"] == 4
    # Uploading the same tree again stores nothing new.
    again = d.request("POST", "/upload", bearer(WRITE), tarball)
    assert again.status == 200 and again.json()["id"] == doc["id"] and again.json()["sha256"] == doc["sha256"]
    assert d.get(f"/uploads/{doc['id']}", {"Range": "bytes=0-99"}).body == got.body[:100]
    assert_json_error(d.get(f"/uploads/{'f' * 40}"), 404)
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        ti = tarfile.TarInfo("../../escape")
        ti.size = 1
        tar.addfile(ti, io.BytesIO(b"x"))
    assert_json_error(d.request("POST", "/upload", bearer(WRITE), evil.getvalue()), 400)


def test_incremental_upload_on_top_of_the_mirror(env: Any, tmp_path: Path) -> None:
    up, d = env.up, env.d
    base = up.rev("refs/heads/main", "app")
    delta = io.BytesIO()
    with tarfile.open(fileobj=delta, mode="w:gz") as tar:
        for name, data in (("src/main.c", b"int main(void) { return 1; }\n"), ("new/file.txt", b"new\n"),
                           (".sparkcache-deleted", b"data/blob.bin\ndocs\n")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    r = d.request("POST", f"/upload?repo=app&base={base}", bearer(WRITE), delta.getvalue())
    assert r.status == 201, r.describe()
    doc = r.json()
    assert doc["base"] == base and doc["files"] == 3
    files = extract(d.get(f"/uploads/{doc['id']}").body, tmp_path / "inc")
    assert files == {"README": b"app\n", "src/main.c": b"int main(void) { return 1; }\n", "new/file.txt": b"new\n"}
    # The same change made in a checkout of base has the upload's id as its tree.
    work = tmp_path / "work"
    git("clone", "-q", str(up.path("app")), str(work))
    (work / "src" / "main.c").write_text("int main(void) { return 1; }\n")
    (work / "new").mkdir()
    (work / "new" / "file.txt").write_text("new\n")
    git("rm", "-q", "-r", "data/blob.bin", "docs", cwd=work)
    git("add", "-A", cwd=work)
    assert git("write-tree", cwd=work) == doc["id"]
    assert_json_error(d.request("POST", f"/upload?repo=app&base={'0' * 40}", bearer(WRITE), delta.getvalue()), 404)


def test_negotiate(env: Any) -> None:
    up, d = env.up, env.d
    first = up.rev("refs/heads/main~1", "app")
    second = up.rev("refs/heads/main", "app")
    d.get("/tree-hash?repo=app")  # clone the mirror
    local = up.commit({"local.txt": "not pushed\n"}, "local only", branch="local", name="app")
    ask = {"repo": "app", "commits": [local, second, first]}
    r = d.request("POST", "/sync/negotiate", {"Content-Type": "application/json"}, json.dumps(ask).encode())
    assert r.status == 200, r.describe()
    assert r.json() == {"repo": "app", "commit": second, "index": 1}
    r = d.request("POST", "/sync/negotiate", body=json.dumps({"repo": "app", "commits": [local]}).encode())
    assert r.json()["commit"] is None
    assert_json_error(d.request("POST", "/sync/negotiate", body=b"[1, 2]"), 400)


def test_seed_from_bundle_without_upstream_access(git_upstream_factory: Any, daemon_factory: Any,
                                                  tmp_path: Path) -> None:
    up: GitUpstream = git_upstream_factory()
    up.create("app", files={"README": "seeded\n"})
    older = tmp_path / "older.bundle"
    git("bundle", "create", str(older), "--all", cwd=up.path("app"))
    sha = up.commit({"src/x.c": "x\n"}, "second", name="app")
    up.stop()
    bundle = tmp_path / "app.bundle"
    git("bundle", "create", str(bundle), "--all", cwd=up.path("app"))
    # Registered, but on a port where nothing listens: the cache cannot fetch.
    url = f"http://127.0.0.1:{free_port()}/org/app.git"
    d = daemon_factory(extra=git_daemon_config({"offline": url}), auth=AUTH, env={"CODESYNC_TOKEN": WRITE})
    assert d.get("/file?repo=offline&path=README").status in (502, 503)
    assert_json_error(d.request("POST", f"/sync/seed?repo={url}", body=bundle.read_bytes()), 401)
    assert_json_error(d.request("POST", f"/sync/seed?repo={url}", bearer(WRITE), b"not a bundle"), 400)
    r = d.request("POST", f"/sync/seed?repo={url}", bearer(WRITE), bundle.read_bytes())
    assert r.status == 200, r.describe()
    assert r.json()["name"] == "offline" and r.json()["refs"]["refs/heads/main"] == sha
    assert d.spool_files() == []
    r = d.get("/file?repo=offline&path=src/x.c")
    assert r.status == 200 and r.body == b"x\n"
    out = tmp_path / "clone"
    git_client("clone", "-q", d.url("/git/offline"), str(out), home=tmp_path / "home")
    assert git("rev-parse", "HEAD", cwd=out) == sha
    assert (out / "README").read_text() == "seeded\n"
    # An older bundle afterwards moves no branch back, and says which it left alone.
    r = d.request("POST", f"/sync/seed?repo={url}", bearer(WRITE), older.read_bytes())
    assert r.status == 200, r.describe()
    assert r.json()["refs"]["refs/heads/main"] == sha and r.json()["skipped"] == ["refs/heads/main"]


def test_code_sync_workflow_from_a_clone(env: Any, tmp_path: Path) -> None:
    """What a CI client does: clone from the cache, commit locally, negotiate the
    newest shared commit, upload only the difference; the stored tree is the
    local HEAD's tree."""
    d, home = env.d, tmp_path / "home"
    work = tmp_path / "work"
    git_client("clone", "-q", d.url("/git/app"), str(work), home=home)
    ident = ["-c", "user.name=CI", "-c", "user.email=ci@example.invalid"]
    (work / "src" / "main.c").write_text("int main(void) { return 2; }\n")
    (work / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    os.chmod(work / "tool.sh", 0o755)
    git_client("rm", "-q", "docs/a.txt", cwd=work, home=home)
    git_client("add", "-A", cwd=work, home=home)
    git_client(*ident, "commit", "-q", "-m", "local 1", cwd=work, home=home)
    (work / "README").write_text("changed locally\n")
    git_client(*ident, "commit", "-q", "-am", "local 2", cwd=work, home=home)
    recent = git_client("rev-list", "-n", "20", "HEAD", cwd=work, home=home).stdout.split()
    r = d.request("POST", "/sync/negotiate", {"Content-Type": "application/json"},
                  json.dumps({"repo": "app", "commits": recent}).encode())
    base = r.json()["commit"]
    assert base == env.up.rev("refs/heads/main", "app") and r.json()["index"] == 2, r.describe()
    changed = git_client("diff", "--name-only", "--diff-filter=d", base, "HEAD", cwd=work, home=home).stdout.split()
    deleted = git_client("diff", "--name-only", "--diff-filter=D", base, "HEAD", cwd=work, home=home).stdout
    delta = io.BytesIO()
    with tarfile.open(fileobj=delta, mode="w:gz") as tar:
        for name in changed:
            tar.add(str(work / name), arcname=name)
        listing = deleted.encode()
        ti = tarfile.TarInfo(".sparkcache-deleted")
        ti.size = len(listing)
        tar.addfile(ti, io.BytesIO(listing))
    r = d.request("POST", f"/upload?repo=app&base={base}", {**bearer(WRITE), "Content-Type": "application/gzip"},
                  delta.getvalue())
    assert r.status == 201, r.describe()
    assert r.json()["id"] == git("rev-parse", "HEAD^{tree}", cwd=work)
    files = extract(d.get(f"/uploads/{r.json()['id']}").body, tmp_path / "out")
    tracked = git("ls-files", cwd=work).splitlines()
    assert sorted(files) == sorted(tracked)
    assert all(files[name] == (work / name).read_bytes() for name in tracked)
    assert os.access(tmp_path / "out" / "tool.sh", os.X_OK)
