"""The git apps over in-memory HTTP through the daemon's real root, with a fake IMirrors:
which segment reaches which app, auth (anonymous reads, tokens, the Basic challenge
git's credential helpers answer), errors in JSON, and pushes refused. Clones with
the git client are in test_git_app.py, the read API's contents in test_git_reads_http.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted

from tests.support.client import assert_json_error, basic, bearer
from tests.support.fake_mirrors import FakeMirrors
from tests.support.git_upstream import GitUpstream
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401
from tests.support.tools import require_tool

READ, WRITE = "rd-2d61", "wr-f30c"
TOKENS = [{"name": "r", "token": READ, "scopes": ["read"]}, {"name": "w", "token": WRITE, "scopes": ["read", "write"]}]
UPLOAD_PACK = "/git/app/info/refs?service=git-upload-pack"


def mirrors_of_one_repo(tmp: Path) -> FakeMirrors:
    require_tool("git")
    up = GitUpstream(tmp / "up")
    up.create("app", files={"README": "hello\n"})
    mirrors = FakeMirrors(tmp)
    mirrors.add("app", path=up.path("app"))
    return mirrors


def start(make: MakeHarness, tmp: Path, anonymous_read: bool) -> Harness:
    config = {"auth": {"anonymous_read": anonymous_read, "tokens": TOKENS}}
    mirrors = mirrors_of_one_repo(tmp / ("open" if anonymous_read else "closed"))
    return pytest_twisted.blockon(make(config, mirrors=mirrors))


@pytest.fixture
def h(harness_factory: MakeHarness, tmp_path: Path) -> Harness:
    return start(harness_factory, tmp_path, anonymous_read=True)


@pytest.fixture
def closed(harness_factory: MakeHarness, tmp_path: Path) -> Harness:
    return start(harness_factory, tmp_path, anonymous_read=False)


@pytest_twisted.ensureDeferred
async def test_each_segment_reaches_its_app(h: Harness) -> None:
    repos = await h.get("/repos")
    assert repos.status == 200 and repos.json() == [{"name": "app", "url": "https://forge.example/app.git"}]
    refs = await h.get(UPLOAD_PACK)
    assert refs.status == 200 and refs.header("Content-Type") == "application/x-git-upload-pack-advertisement"
    assert refs.body.startswith(b"001e# service=git-upload-pack\n0000")
    # The read API answers at the root, one segment per endpoint.
    readme = await h.get("/file?repo=app&path=README")
    assert readme.status == 200 and readme.body == b"hello\n"
    assert (await h.get("/tree-hash?repo=app&path=")).status == 200
    assert (await h.get("/archive?repo=app")).header("Content-Type") == "application/gzip"
    assert (await h.get("/branch-contains?repo=app&branch=main&commit=main")).json()["contains"] is True
    assert_json_error(await h.get(f"/uploads/{'0' * 40}"), 404)
    assert_json_error(await h.post("/sync/negotiate", b"{"), 400)
    assert_json_error(await h.post("/upload", b"x"), 401)  # it exists, and wants a writer


@pytest_twisted.ensureDeferred
async def test_errors_are_json(h: Harness) -> None:
    unknown = assert_json_error(await h.get("/git/nope/info/refs?service=git-upload-pack"), 404)
    assert "nope" in unknown["error"]
    assert_json_error(await h.get("/file?repo=nope&path=README"), 404)
    assert_json_error(await h.get("/git/app/info/refs"), 403)  # the dumb protocol is not served
    assert_json_error(await h.get("/git/app/nothing"), 404)
    assert_json_error(await h.get("/repos/app"), 404)
    bad = await h.delete("/repos")
    assert_json_error(bad, 405)
    assert bad.header("Allow") == "GET, HEAD"
    assert_json_error(await h.get("/upload"), 405)
    assert_json_error(await h.get("/sync/nothing"), 404)
    assert_json_error(await h.post("/git/app/git-upload-pack", b"zzzz"), 400)


@pytest_twisted.ensureDeferred
async def test_pushes_are_refused_naming_the_upstream(h: Harness) -> None:
    for method, path in (("GET", "/git/app/info/refs?service=git-receive-pack"),
                         ("POST", "/git/app.git/git-receive-pack")):
        refused = await h.request(method, path, b"0000" if method == "POST" else None)
        assert refused.status == 403 and refused.header("Content-Type") == "text/plain; charset=utf-8"
        assert b"read-only mirror of https://forge.example/app.git" in refused.body
    assert h.mirrors.refreshes == 0


@pytest_twisted.ensureDeferred
async def test_anonymous_reads_on_and_off(h: Harness, closed: Harness) -> None:
    assert (await h.get(UPLOAD_PACK)).status == 200
    assert (await h.get("/file?repo=app&path=README")).status == 200
    challenged = await closed.get(UPLOAD_PACK)
    assert_json_error(challenged, 401)
    # git asks its credential helper only after a Basic challenge.
    assert (challenged.header("WWW-Authenticate") or "").startswith("Basic")
    assert_json_error(await closed.get("/repos"), 401)
    assert_json_error(await closed.get("/file?repo=app&path=README"), 401)
    assert_json_error(await closed.get(UPLOAD_PACK, basic("ci", "wrong")), 401)
    # The token as the Basic password (what git sends), or as a Bearer token.
    assert (await closed.get(UPLOAD_PACK, basic("ci", READ))).status == 200
    assert (await closed.get("/file?repo=app&path=README", bearer(READ))).body == b"hello\n"


@pytest_twisted.ensureDeferred
async def test_writes_need_the_write_scope(h: Harness) -> None:
    assert_json_error(await h.post("/git/register?name=x&repo=https://forge.example/x.git"), 401)
    assert_json_error(await h.post("/git/register?name=x&repo=https://forge.example/x.git", None, bearer(READ)), 403)
    # A write token may not point the cache at a host nobody allowed (only admin may).
    refused = assert_json_error(await h.post("/git/register?name=x&repo=https://forge.example/x.git", None,
                                             bearer(WRITE)), 403)
    assert "admin" in refused["error"]
    assert_json_error(await h.post("/sync/seed?repo=https://forge.example/x.git", b"bundle", bearer(WRITE)), 403)
    assert_json_error(await h.post("/sync/seed?repo=https://forge.example/x.git", b"bundle", bearer(READ)), 403)
    assert_json_error(await h.post("/upload", b"tarball", bearer(READ)), 403)
    assert h.mirrors.seeded == []
    # A refresh is a read (clients ask for one after a push), by anyone who may read.
    refreshed = await h.post("/git/refresh?name=app")
    assert refreshed.status == 200 and "refs/heads/main" in refreshed.json()["refs"]
    assert h.mirrors.refreshes == 1
