"""GitApp in the daemon's tree (tests/support/harness.py), with a fake IMirrors over
local bare repositories: requests in memory, and the real git client on a port.

The daemon-level tests (real Mirrors, http upstream) are in tests/e2e/test_git_serve*.py.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from sparkcache.git.pktline import DELIM, FLUSH, pkt_line
from sparkcache.protocols.git.smart_http import BodyTooLarge, decode_body
from tests.support.fake_mirrors import FakeMirrors
from tests.support.git_upstream import GitUpstream, git, git_env
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401
from tests.support.tools import require_tool

# The pack cache has its own tests (test_git_packcache.py); here every fetch runs upload-pack.
GIT = {"git": {"max_upload_pack_body": 1 << 20, "pack_cache": False}}


class Server:
    """The daemon with one mirror, "app", of a local upstream repository."""

    def __init__(self, h: Harness, mirrors: FakeMirrors, up: GitUpstream) -> None:
        self.h, self.mirrors, self.up = h, mirrors, up
        self.upstream = up.path("app")
        self.url = h.listen()  # for the git client

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Any:
        return self.h.request(method, path, body, headers)

    def commit(self, files: dict[str, bytes | str | None], msg: str = "c") -> str:
        return self.up.commit(files, msg, name="app")


async def start_server(tmp: Path, make: MakeHarness, auth: dict[str, Any] | None = None,
                       files: dict[str, bytes | str | None] | None = None) -> Server:
    require_tool("git")
    up = GitUpstream(tmp / "up")
    up.create("app", files=files or {"README": "hello\n", "big.bin": os.urandom(300_000)})
    mirrors = FakeMirrors(tmp)
    mirrors.add("app", upstream=up.path("app"))
    h = await make({**GIT, **({"auth": auth} if auth else {})}, mirrors=mirrors)
    return Server(h, mirrors, up)


def run_git(*args: str, cwd: Path | None = None) -> Deferred[subprocess.CompletedProcess[str]]:
    env = git_env({"GIT_TERMINAL_PROMPT": "0"})
    return deferToThread(subprocess.run, ["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def server(tmp_path: Path, harness_factory: MakeHarness) -> Server:
    return pytest_twisted.blockon(Deferred.fromCoroutine(start_server(tmp_path, harness_factory)))


@pytest.mark.parametrize("version", ["0", "2"])
@pytest_twisted.ensureDeferred
async def test_clone(server: Any, tmp_path: Path, version: str) -> None:
    p = await run_git("-c", f"protocol.version={version}", "clone", "-q", f"{server.url}/git/app.git", str(tmp_path / "c"))
    assert p.returncode == 0, p.stderr
    head = git("rev-parse", "HEAD", cwd=tmp_path / "c")
    assert head == git("rev-parse", "main", cwd=server.upstream)
    assert server.mirrors.acquired == server.mirrors.released >= 2
    assert server.mirrors.refreshes == 0


@pytest_twisted.ensureDeferred
async def test_fetch_by_sha_after_push_refreshes_once(server: Any, tmp_path: Path) -> None:
    c = tmp_path / "c"
    assert (await run_git("clone", "-q", f"{server.url}/git/app", str(c))).returncode == 0
    sha = server.commit({"new.txt": "pushed just now\n"}, "second")
    p = await run_git("fetch", "-q", "origin", sha, cwd=c)
    assert p.returncode == 0, p.stderr
    assert git("cat-file", "-t", sha, cwd=c) == "commit"
    assert server.mirrors.refreshes == 1
    # Objects the mirror already has never trigger a fetch.
    assert (await run_git("fetch", "-q", "origin", sha, cwd=c)).returncode == 0
    assert server.mirrors.refreshes == 1


@pytest_twisted.ensureDeferred
async def test_unknown_object_is_a_remote_error(server: Any, tmp_path: Path) -> None:
    c = tmp_path / "c"
    assert (await run_git("clone", "-q", f"{server.url}/git/app", str(c))).returncode == 0
    p = await run_git("fetch", "-q", "origin", "e" * 40, cwd=c)
    assert p.returncode != 0
    assert "remote error" in p.stderr and "not our ref" in p.stderr, p.stderr
    assert server.mirrors.refreshes == 1
    # Asking again right away does not send another fetch upstream.
    p = await run_git("fetch", "-q", "origin", "e" * 40, cwd=c)
    assert p.returncode != 0 and "not our ref" in p.stderr
    assert server.mirrors.refreshes == 1


@pytest_twisted.ensureDeferred
async def test_push_refused_with_message(server: Any, tmp_path: Path) -> None:
    c = tmp_path / "c"
    assert (await run_git("clone", "-q", f"{server.url}/git/app", str(c))).returncode == 0
    git("commit", "-q", "--allow-empty", "-m", "local", cwd=c)
    p = await run_git("push", "origin", "HEAD:main", cwd=c)
    assert p.returncode != 0
    assert "https://forge.example/app.git" in p.stderr, p.stderr
    status, headers, body = await server.request("POST", "/git/app/git-receive-pack", b"0000")
    assert status == 403 and b"read-only mirror" in body


@pytest_twisted.ensureDeferred
async def test_unknown_repo_404_json(server: Any, tmp_path: Path) -> None:
    status, headers, body = await server.request("GET", "/git/nope.git/info/refs?service=git-upload-pack")
    assert status == 404 and headers["content-type"] == "application/json"
    assert "nope" in json.loads(body)["error"]
    p = await run_git("clone", "-q", f"{server.url}/git/nope", str(tmp_path / "c"))
    assert p.returncode != 0


@pytest_twisted.ensureDeferred
async def test_discovery_headers(server: Any) -> None:
    status, headers, body = await server.request("GET", "/git/app/info/refs?service=git-upload-pack")
    assert status == 200, body
    assert headers["content-type"] == "application/x-git-upload-pack-advertisement"
    assert headers["cache-control"] == "no-cache"
    assert body.startswith(b"001e# service=git-upload-pack\n0000")
    status, headers, body = await server.request("GET", "/git/app/info/refs?service=git-upload-pack",
                                                 headers={"Git-Protocol": "version=2"})
    assert status == 200 and body.startswith(b"000eversion 2\n")
    status, _, _ = await server.request("GET", "/git/app/info/refs")
    assert status == 403


def _ls_refs() -> bytes:
    return pkt_line("command=ls-refs\n") + DELIM + pkt_line("ref-prefix refs/heads/\n") + FLUSH


@pytest_twisted.ensureDeferred
async def test_gzip_body_and_caps(server: Any) -> None:
    h = {"Git-Protocol": "version=2", "Content-Type": "application/x-git-upload-pack-request"}
    status, headers, body = await server.request("POST", "/git/app/git-upload-pack", gzip.compress(_ls_refs()),
                                                 {**h, "Content-Encoding": "gzip"})
    assert status == 200, body
    assert headers["content-type"] == "application/x-git-upload-pack-result"
    assert b"refs/heads/main" in body
    # A small gzip that inflates past the cap
    bomb = gzip.compress(_ls_refs() + b"0" * (2 << 20))
    status, _, body = await server.request("POST", "/git/app/git-upload-pack", bomb, {**h, "Content-Encoding": "gzip"})
    assert status == 413, body
    status, _, body = await server.request("POST", "/git/app/git-upload-pack", b"not gzip at all",
                                           {**h, "Content-Encoding": "gzip"})
    assert status == 400, body
    status, _, body = await server.request("POST", "/git/app/git-upload-pack", b"zzzz", h)
    assert status == 400 and b"malformed" in body
    status, _, body = await server.request("POST", "/git/app/git-upload-pack", _ls_refs(), {**h, "Content-Encoding": "br"})
    assert status == 415


@pytest_twisted.ensureDeferred
async def test_repos_and_refresh(server: Any) -> None:
    status, _, body = await server.request("GET", "/repos")
    assert status == 200 and json.loads(body)[0]["name"] == "app"
    sha = server.commit({"x": "y"}, "third")
    status, _, body = await server.request("POST", "/git/refresh?name=app")
    assert status == 200, body
    assert json.loads(body)["refs"]["refs/heads/main"] == sha


@pytest_twisted.ensureDeferred
async def test_auth_basic_challenge(tmp_path: Path, harness_factory: MakeHarness) -> None:
    auth = {"anonymous_read": False, "tokens": [{"name": "ci", "token": "s3cret", "scopes": ["read"]}]}
    s = await start_server(tmp_path, harness_factory, auth, files={"a": "b"})
    status, headers, _ = await s.request("GET", "/git/app/info/refs?service=git-upload-pack")
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    p = await run_git("clone", "-q", s.url.replace("http://", "http://ci:wrong@") + "/git/app", str(tmp_path / "c0"))
    assert p.returncode != 0
    p = await run_git("clone", "-q", s.url.replace("http://", "http://ci:s3cret@") + "/git/app", str(tmp_path / "c"))
    assert p.returncode == 0, p.stderr
    status, _, _ = await s.request("POST", "/git/refresh?name=app")
    assert status == 401


def test_decode_body_limits(tmp_path: Path) -> None:
    import io

    assert decode_body(io.BytesIO(gzip.compress(b"x" * 100)), "gzip", 100) == b"x" * 100
    with pytest.raises(BodyTooLarge):
        decode_body(io.BytesIO(gzip.compress(b"x" * 101)), "gzip", 100)
    with pytest.raises(BodyTooLarge):
        decode_body(io.BytesIO(b"x" * 101), "", 100)
    with pytest.raises(ValueError):
        decode_body(io.BytesIO(gzip.compress(b"x" * 100)[:-10]), "gzip", 1000)


@pytest_twisted.ensureDeferred
async def test_client_disconnect_kills_upload_pack(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import sparkcache.protocols.git.smart_http as gitmod

    server.commit({"huge.bin": os.urandom(8 << 20)}, "huge")
    await server.mirrors.refresh(server.mirrors.lookup("app"))
    codes: list[int] = []
    real = gitmod.spawn_upload_pack

    def spy(*a: Any, **kw: Any) -> Deferred[int]:
        d = real(*a, **kw)

        def record(code: int) -> int:
            codes.append(code)
            return code

        return d.addCallback(record)

    monkeypatch.setattr(gitmod, "spawn_upload_pack", spy)
    want = git("rev-parse", "main", cwd=server.upstream)
    body = (pkt_line("command=fetch\n") + DELIM + pkt_line("no-progress\n") + pkt_line(f"want {want}\n")
            + pkt_line("done\n") + FLUSH)
    first = await server.h.open("POST", "/git/app/git-upload-pack", body, {"Git-Protocol": "version=2"})
    assert first.code == 200
    # Reset, rather than a polite FIN, the way a killed CI job goes away.
    server.h.client.agent.connections[-1].reset()
    for _ in range(1200):  # (a loaded machine may take seconds to reap it)
        if codes:
            break
        await deferLater(reactor, 0.05)
    # The child was killed (a signal), not left to compute 8 MiB nobody reads.
    assert codes and codes[0] < 0, codes
    assert server.mirrors.acquired == server.mirrors.released


@pytest_twisted.ensureDeferred
async def test_broken_mirror_is_a_remote_error_without_server_paths(server: Any, tmp_path: Path) -> None:
    broken = tmp_path / "broken.git"
    broken.mkdir()
    server.mirrors.add("broken", path=broken)
    for version in ("0", "2"):
        p = await run_git("-c", f"protocol.version={version}", "clone", f"{server.url}/git/broken",
                          str(tmp_path / f"c{version}"))
        assert p.returncode != 0
        assert "remote error: 'broken' does not appear to be a git repository" in p.stderr, p.stderr
        assert str(tmp_path) not in p.stderr.replace(str(tmp_path / f"c{version}"), "")


@pytest_twisted.ensureDeferred
async def test_want_ref_of_a_branch_the_mirror_lacks_refreshes(server: Any) -> None:
    # v2 clients send want-ref (not an id) when the server allows ref-in-want: a
    # branch pushed a moment ago must be fetched from upstream, as a missing id is.
    mirror_path = server.mirrors.lookup("app").path
    git("config", "uploadpack.allowRefInWant", "true", cwd=mirror_path)
    git("branch", "feature", "main", cwd=server.upstream)
    sha = git("rev-parse", "feature", cwd=server.upstream)
    body = (pkt_line("command=fetch\n") + DELIM + pkt_line("no-progress\n")
            + pkt_line("want-ref refs/heads/feature\n") + pkt_line("done\n") + FLUSH)
    h = {"Git-Protocol": "version=2", "Content-Type": "application/x-git-upload-pack-request"}
    status, _, out = await server.request("POST", "/git/app/git-upload-pack", body, h)
    assert status == 200, out
    assert server.mirrors.refreshes == 1
    assert b"wanted-refs" in out and f"{sha} refs/heads/feature".encode() in out, out[:300]
    # A ref upstream does not have either: one fetch, then git's own error, and
    # the same request right after does not go upstream again.
    gone = (pkt_line("command=fetch\n") + DELIM + pkt_line("want-ref refs/heads/nope\n") + pkt_line("done\n")
            + FLUSH)
    for _ in range(2):
        status, _, out = await server.request("POST", "/git/app/git-upload-pack", gone, h)
        assert b"ERR" in out or status >= 400, out[:300]
    assert server.mirrors.refreshes == 2
    # A want-ref outside refs/ is a ref name too, never looked up as an object id.
    odd = pkt_line("command=fetch\n") + DELIM + pkt_line("want-ref main\n") + pkt_line("done\n") + FLUSH
    status, _, out = await server.request("POST", "/git/app/git-upload-pack", odd, h)
    assert status == 200 and b"ERR" in out, (status, out[:300])
    assert server.mirrors.refreshes == 3


@pytest_twisted.ensureDeferred
async def test_unexpected_error_is_a_json_500(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Any:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(server.mirrors, "status", broken)
    status, headers, body = await server.request("GET", "/repos")
    assert status == 500 and headers["content-type"] == "application/json", body
    assert json.loads(body)["status"] == 500 and "RuntimeError" in json.loads(body)["error"]
