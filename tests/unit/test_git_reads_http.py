"""The code-sync app (the git read API) in the daemon's tree over in-memory HTTP,
with a real store and a fake IMirrors (tests/support): mirrors are bare repos
built with the git CLI; refresh and seed are plain git commands. The
daemon-level tests are in tests/e2e."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pygit2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource

from sparkcache.fetch.produce import Singleflight
from sparkcache.git import reads
from sparkcache.git.uploads import Limits
from sparkcache.protocols.git import READ_SEGMENTS, codesync
from sparkcache.web.root import Remount
from tests.support.client import Response
from tests.support.fake_mirrors import FakeMirrors
from tests.support.git_upstream import git, git_env
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401
from tests.support.memory import MemoryClient, read_body
from tests.support.tools import require_tool

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = {"auth": {"anonymous_read": True, "tokens": [{"name": "ci", "token": TOKEN, "scopes": ["read", "write", "admin"]}]}}


class Server:
    def __init__(self, h: Harness, mirrors: FakeMirrors, client: MemoryClient | None = None) -> None:
        self.h, self.mirrors, self.store = h, mirrors, h.store
        self.client = client or h.client

    async def req(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Response:
        return await self.client.request(method, path, body, {k.replace("_", "-"): v for k, v in headers.items()})

    @property
    def app(self) -> codesync.CodeSyncApp:
        return self.h.app(b"archive")


@pytest.fixture
def server(tmp_path: Path, harness_factory: MakeHarness) -> Server:
    mirrors = FakeMirrors(tmp_path)
    h = pytest_twisted.blockon(harness_factory(CONFIG, mirrors=mirrors))
    return Server(h, mirrors)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    require_tool("git")
    root = tmp_path_factory.mktemp("http")
    work = root / "work"
    git("init", "-q", "-b", "main", str(work))
    (work / "README.md").write_text("# hello\n")
    (work / "src").mkdir()
    (work / "src" / "main.py").write_text("print('hi')\n")
    (work / "big.bin").write_bytes(os.urandom(1_500_000))
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "one", cwd=work)
    first = git("rev-parse", "HEAD", cwd=work)
    (work / "README.md").write_text("# hello again\n")
    git("commit", "-q", "-am", "two", cwd=work)
    second = git("rev-parse", "HEAD", cwd=work)
    git("tag", "-a", "v2", "-m", "v2", cwd=work)
    # A commit the mirror does not have yet (as if just pushed upstream).
    (work / "late.txt").write_text("late\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "late", cwd=work)
    late = git("rev-parse", "HEAD", cwd=work)
    git("reset", "-q", "--hard", second, cwd=work)
    bare = root / "app.git"
    git("clone", "-q", "--mirror", "--no-local", str(work), str(bare))
    return {"path": str(bare), "work": str(work), "first": first, "second": second, "late": late}


def _add(server: Server, repo: dict[str, str], name: str = "app") -> None:
    server.mirrors.add(name, path=repo["path"])


def _rev(repo: dict[str, str], spec: str) -> str:
    return git("rev-parse", spec, cwd=repo["path"])


def _blob(repo: dict[str, str], spec: str) -> bytes:
    return subprocess.run(["git", "cat-file", "blob", spec], cwd=repo["path"], capture_output=True, check=True,
                          env=git_env()).stdout


@pytest_twisted.ensureDeferred
async def test_file_etag_and_errors(server: Server, repo: dict[str, str]) -> None:
    _add(server, repo)
    code, h, body = await server.req("GET", "/file?repo=app&branch=main&path=src/main.py")
    assert code == 200 and body == _blob(repo, "main:src/main.py")
    etag = f'"{_rev(repo, "main:src/main.py")}"'
    assert h["etag"] == etag
    assert h["x-git-commit"] == repo["second"]
    code, _, body = await server.req("GET", "/file?repo=app&branch=main&path=src/main.py", If_None_Match=etag)
    assert code == 304 and body == b""
    code, _, body = await server.req("GET", f"/file?repo=app&branch={repo['first']}&path=README.md")
    assert code == 200 and body == b"# hello\n"
    code, _, body = await server.req("GET", "/file?repo=app&branch=v2&path=/README.md")
    assert code == 200 and body == b"# hello again\n"
    for query, status in (("repo=app&branch=main&path=src", 400), ("repo=app&branch=main&path=nope", 404),
                          ("repo=nope&branch=main&path=README.md", 404), ("repo=app&branch=nope&path=README.md", 404),
                          ("repo=app&branch=main&path=../README.md", 400), ("branch=main&path=README.md", 400),
                          ("repo=app&branch=main~1&path=README.md", 404)):
        code, h, body = await server.req("GET", f"/file?{query}")
        assert code == status, query
        assert h["content-type"] == "application/json"
        assert json.loads(body)["status"] == status


@pytest_twisted.ensureDeferred
async def test_large_file_goes_through_the_store_with_range(server: Server, repo: dict[str, str]) -> None:
    _add(server, repo)
    data = _blob(repo, "main:big.bin")
    assert len(data) > codesync.INLINE_MAX
    code, h, body = await server.req("GET", "/file?repo=app&path=big.bin")
    assert code == 200 and body == data and h["x-cache"] == "MISS"
    code, h, body = await server.req("GET", "/file?repo=app&path=big.bin", Range="bytes=100-199")
    assert code == 206 and body == data[100:200] and h["x-cache"] == "HIT"
    assert h["etag"] == f'"{_rev(repo, "main:big.bin")}"'


@pytest_twisted.ensureDeferred
async def test_tree_hash(server: Server, repo: dict[str, str]) -> None:
    _add(server, repo)
    for path, spec in (("", "main^{tree}"), ("/", "main^{tree}"), ("src", "main:src"), ("src/main.py", "main:src/main.py")):
        code, h, body = await server.req("GET", f"/tree-hash?repo=app&branch=main&path={path}")
        assert code == 200, path
        doc = json.loads(body)
        assert doc["hash"] == _rev(repo, spec) and doc["commit"] == repo["second"]
        assert doc["type"] == ("blob" if path.endswith(".py") else "tree")
        assert h["etag"] == f'"{doc["hash"]}"'
    code, _, body = await server.req("GET", "/tree-hash?repo=app&branch=v2&path=src", Accept="text/plain")
    assert code == 200 and body == _rev(repo, "v2:src").encode() + b"\n"
    code, _, _ = await server.req("GET", "/tree-hash?repo=app&path=src", If_None_Match=f'"{_rev(repo, "main:src")}"')
    assert code == 304
    code, _, _ = await server.req("GET", "/tree-hash?repo=app&path=missing")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_branch_contains_and_the_just_pushed_race(server: Server, repo: dict[str, str], tmp_path: Path) -> None:
    mirror = tmp_path / "race.git"
    git("clone", "-q", "--mirror", "--no-local", repo["path"], str(mirror))
    server.mirrors.add("race", path=mirror)
    code, _, body = await server.req("GET", f"/branch-contains?repo=race&branch=main&commit={repo['first']}")
    assert code == 200 and json.loads(body)["contains"] is True
    code, _, body = await server.req("GET", f"/branch-contains?repo=race&branch={repo['first']}&commit={repo['second']}")
    assert code == 200 and json.loads(body) == {"repo": "race", "branch": repo["first"], "branch_commit": repo["first"],
                                                "commit": repo["second"], "contains": False}
    # Unknown commit: one refresh, still unknown → 404.
    code, _, body = await server.req("GET", f"/branch-contains?repo=race&branch=main&commit={'a' * 40}")
    assert code == 404 and server.mirrors.refreshes == 1
    # Asked again at once: no second fetch for the same unknown id.
    code, _, body = await server.req("GET", f"/file?repo=race&branch={'a' * 40}&path=README.md")
    assert code == 404 and server.mirrors.refreshes == 1
    # A commit pushed upstream a moment ago: the refresh brings it in, and it answers.
    server.mirrors.on_refresh = lambda: git("fetch", "-q", repo["work"], f"{repo['late']}:refs/heads/late",
                                            cwd=str(mirror))
    code, _, body = await server.req("GET", f"/branch-contains?repo=race&branch={repo['late']}&commit={repo['first']}")
    assert code == 200 and json.loads(body)["contains"] is True and server.mirrors.refreshes == 2
    # A name (not a commit id) that does not exist does not make the cache fetch.
    code, _, _ = await server.req("GET", "/branch-contains?repo=race&branch=no-such-branch&commit=main")
    assert code == 404 and server.mirrors.refreshes == 2
    code, _, _ = await server.req("GET", "/branch-contains?repo=race&branch=main")
    assert code == 400


def _members(data: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar:
            if m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
    return out


@pytest_twisted.ensureDeferred
async def test_archive_built_once_then_served_from_the_store(server: Server, repo: dict[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _add(server, repo)
    builds = []
    real = reads.write_archive

    def counting(*args: Any) -> Any:
        builds.append(args[1])
        return real(*args)

    monkeypatch.setattr(reads, "write_archive", counting)
    results = await DeferredList([Deferred.fromCoroutine(server.req("GET", "/archive?repo=app&branch=main"))
                                  for _ in range(3)], consumeErrors=True)
    bodies = set()
    for ok, (code, h, body) in results:
        assert ok and code == 200
        assert h["etag"] == f'"{repo["second"]}"'
        assert h["content-type"] == "application/gzip"
        bodies.add(body)
    assert len(builds) == 1 and len(bodies) == 1
    assert server.mirrors.busy == 0 and server.mirrors.max_busy >= 1
    body = bodies.pop()
    files = git("ls-tree", "-r", "--name-only", "main", cwd=repo["path"]).splitlines()
    members = _members(body)
    assert sorted(members) == sorted(files)
    assert all(members[f] == _blob(repo, f"main:{f}") for f in files)
    code, h, again = await server.req("GET", f"/archive?repo=app&branch={repo['second']}")
    assert code == 200 and again == body and h["x-cache"] == "HIT" and len(builds) == 1
    code, _, part = await server.req("GET", "/archive?repo=app&branch=v2", Range="bytes=0-9")
    assert code == 206 and part == body[:10]
    code, _, _ = await server.req("GET", "/archive?repo=app&branch=main", If_None_Match=f'"{repo["second"]}"')
    assert code == 304
    code, _, old = await server.req("GET", f"/archive?repo=app&branch={repo['first']}")
    assert code == 200 and _members(old)["README.md"] == b"# hello\n" and len(builds) == 2
    code, _, _ = await server.req("GET", "/archive?repo=app&branch=nope")
    assert code == 404
    # A subdirectory: its own entry, ETag commit:tree, contents at the root.
    code, h, sub = await server.req("GET", "/archive?repo=app&branch=main&path=src/")
    assert code == 200 and _members(sub) == {"main.py": _blob(repo, "main:src/main.py")}
    assert h["etag"] == f'"{repo["second"]}:{_rev(repo, "main:src")}"' and len(builds) == 3
    code, _, _ = await server.req("GET", "/archive?repo=app&branch=main&path=README.md")
    assert code == 400
    code, _, _ = await server.req("GET", "/archive?repo=app&branch=main&path=nope")
    assert code == 404


def _tgz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest_twisted.ensureDeferred
async def test_upload_round_trip_and_dedupe(server: Server, repo: dict[str, str]) -> None:
    _add(server, repo)
    # A tarball of commit `first` (from git archive) has that commit's tree id.
    tarball = subprocess.run(["git", "archive", "--format=tar.gz", repo["first"]], cwd=repo["path"],
                             capture_output=True, check=True, env=git_env()).stdout
    code, _, body = await server.req("POST", "/upload", tarball)
    assert code == 401
    code, _, body = await server.req("POST", "/upload", tarball, **AUTH)
    assert code == 201, body
    doc = json.loads(body)
    assert doc["id"] == _rev(repo, f"{repo['first']}^{{tree}}") and doc["files"] == 3 and doc["created"] is True
    code, h, stored = await server.req("GET", doc["url"])
    assert code == 200 and hashlib.sha256(stored).hexdigest() == doc["sha256"] and len(stored) == doc["size"]
    assert h["etag"] == f'"{doc["id"]}"'
    assert _members(stored)["big.bin"] == _blob(repo, f"{repo['first']}:big.bin")
    # The same tree again, plain tar this time: same id, nothing new stored.
    code, _, body = await server.req("POST", "/upload", gzip.decompress(tarball), **AUTH)
    assert code == 200 and json.loads(body)["id"] == doc["id"] and json.loads(body)["created"] is False
    code, _, _ = await server.req("GET", f"/uploads/{'0' * 40}")
    assert code == 404
    code, _, _ = await server.req("GET", "/uploads/..%2fetc")
    assert code == 400  # an encoded separator is refused before routing
    code, _, body = await server.req("POST", "/upload", b"garbage" * 1000, **AUTH)
    assert code == 400 and "tar" in json.loads(body)["error"]
    # Parameters come from the URL, never from a form-encoded body.
    code, _, body = await server.req("POST", "/upload", b"repo=nope&base=main", Content_Type="application/x-www-form-urlencoded",
                                     **AUTH)
    assert code == 400 and "tar" in json.loads(body)["error"], body
    code, _, _ = await server.req("POST", "/upload?repo=app", tarball, **AUTH)
    assert code == 400
    assert os.listdir(server.store.spool_dir) == []


@pytest_twisted.ensureDeferred
async def test_incremental_upload(server: Server, repo: dict[str, str]) -> None:
    _add(server, repo)
    delta = _tgz({"src/main.py": b"print('changed')\n", "docs/new.md": b"new\n", ".sparkcache-deleted": b"big.bin\n"})
    code, _, body = await server.req("POST", f"/upload?repo=app&base={repo['second'][:10]}", delta, **AUTH)
    assert code == 201, body
    doc = json.loads(body)
    assert doc["base"] == repo["second"] and doc["files"] == 3
    code, _, stored = await server.req("GET", f"/uploads/{doc['id']}")
    assert _members(stored) == {"README.md": b"# hello again\n", "src/main.py": b"print('changed')\n",
                                "docs/new.md": b"new\n"}
    code, _, body = await server.req("POST", f"/upload?repo=app&base={'b' * 40}", delta, **AUTH)
    assert code == 404
    code, _, body = await server.req("POST", "/upload?repo=nope&base=main", delta, **AUTH)
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_upload_limits(server: Server) -> None:
    # Limits are not in the config: this app is built by hand on the daemon's context.
    pool = ThreadPool(minthreads=0, maxthreads=2, name="test-upload")
    pool.start()
    try:
        app = Remount(codesync.CodeSyncApp(server.h.ctx, server.mirrors, reactor, pool, Limits(body=1000)).resource())
        root = Resource()
        for seg in READ_SEGMENTS:
            root.putChild(seg, app)
        s = Server(server.h, server.mirrors, server.h.serve(root))
        code, _, body = await s.req("POST", "/upload", _tgz({"a": os.urandom(5000)}), **AUTH)
        assert code == 413
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_negotiate(server: Server, repo: dict[str, str]) -> None:
    _add(server, repo)
    ask = {"repo": "app", "commits": [repo["late"], "c" * 40, repo["first"]]}
    code, _, body = await server.req("POST", "/sync/negotiate", json.dumps(ask).encode())
    assert code == 200 and json.loads(body) == {"repo": "app", "commit": repo["first"], "index": 2}
    ask = {"repo": "app", "commits": [repo["late"]]}
    code, _, body = await server.req("POST", "/sync/negotiate", json.dumps(ask).encode())
    assert code == 200 and json.loads(body)["commit"] is None
    for bad in (b"{", b'{"repo": "app"}', json.dumps({"repo": "app", "commits": ["main"]}).encode()):
        code, _, _ = await server.req("POST", "/sync/negotiate", bad)
        assert code == 400
    code, _, _ = await server.req("POST", "/sync/negotiate", json.dumps({"repo": "x", "commits": []}).encode())
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_seed_from_bundle(server: Server, repo: dict[str, str], tmp_path: Path) -> None:
    bundle = tmp_path / "app.bundle"
    git("bundle", "create", str(bundle), "--all", cwd=repo["path"])
    url = "https://example.invalid/org/app.git"
    code, _, _ = await server.req("POST", f"/sync/seed?repo={url}", bundle.read_bytes())
    assert code == 401
    code, _, _ = await server.req("POST", f"/sync/seed?repo={url}", b"not a bundle", **AUTH)
    assert code == 400 and server.mirrors.seeded == []
    code, _, body = await server.req("POST", f"/sync/seed?repo={url}&name=app2", bundle.read_bytes(), **AUTH)
    assert code == 200, body
    doc = json.loads(body)
    assert doc["refs"]["refs/heads/main"] == repo["second"] and doc["refs"]["refs/tags/v2"] == _rev(repo, "v2")
    assert server.mirrors.seeded == [(url, "app2")]
    assert os.listdir(server.store.spool_dir) == []  # the bundle's spool file is gone too
    code, _, body = await server.req("GET", f"/file?repo={url}&path=README.md")
    assert code == 200 and body == b"# hello again\n"


@pytest_twisted.ensureDeferred
async def test_unknown_endpoint_and_method(server: Server) -> None:
    code, h, body = await server.req("GET", "/sync/nothing")
    assert code == 404 and h["content-type"] == "application/json"
    code, h, body = await server.req("GET", "/upload")
    assert code == 405 and json.loads(body)["status"] == 405


def test_a_cancelled_waiter_does_not_cancel_shared_work() -> None:
    from twisted.internet.defer import CancelledError

    work: Deferred[int] = Deferred()
    flights: Singleflight[str, int] = Singleflight()
    started = []

    async def build() -> int:
        started.append(1)
        return await work if len(started) == 1 else 8

    first = flights.run("k", build)
    second = flights.run("k", build)
    first.cancel()
    errors: list[Any] = []
    first.addErrback(lambda f: errors.append(f.check(CancelledError)))
    assert errors == [CancelledError] and not work.called
    results: list[int] = []
    second.addCallback(results.append)
    work.callback(7)
    assert results == [7] and started == [1] and "k" not in flights
    late: list[int] = []
    flights.run("k", build).addCallback(late.append)  # a new build once the first is over
    assert started == [1, 1] and late == [8]


@pytest_twisted.ensureDeferred
async def test_archive_streams_while_it_is_built_and_a_failed_build_is_not_kept(
        server: Server, repo: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    _add(server, repo)
    release = threading.Event()
    fail_next = [True]

    def slow(path: str, spec: str, out: Any, subdir: str = "") -> Any:
        if fail_next[0]:
            fail_next[0] = False
            raise RuntimeError("disk on fire")
        out.write(b"A" * 300_000)
        assert release.wait(30)
        out.write(b"B" * 1000)
        return spec, 2

    monkeypatch.setattr(reads, "write_archive", slow)
    # A build that fails before any byte: a JSON 502, and nothing stored.
    code, _, body = await server.req("GET", "/archive?repo=app&branch=main")
    assert code == 502, body
    assert await server.store.index.get(f"archive/app/{repo['second']}.tar.gz") is None
    # The next request builds again, and gets its first bytes before the build ends.
    resp = await server.h.open("GET", "/archive?repo=app&branch=main")
    assert resp.code == 200 and not release.is_set()
    assert resp.headers.getRawHeaders("x-cache") == ["MISS"]
    release.set()
    body = await read_body(resp)
    assert body == b"A" * 300_000 + b"B" * 1000
    code, h, again = await server.req("GET", "/archive?repo=app&branch=main")
    assert code == 200 and again == body and h["x-cache"] == "HIT"
    assert server.h.ctx.cache.inflight == 0


@pytest_twisted.ensureDeferred
async def test_unexpected_read_error_is_a_json_500(server: Server, repo: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise pygit2.GitError("object file is corrupt")

    _add(server, repo)
    monkeypatch.setattr(reads, "tree_hash", broken)
    code, headers, body = await server.req("GET", "/tree-hash?repo=app&path=src")
    assert code == 500 and headers["content-type"] == "application/json", body
    assert "GitError" in json.loads(body)["error"]
