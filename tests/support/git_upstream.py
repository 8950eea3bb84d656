"""A real git smart-HTTP upstream for end-to-end tests.

Bare repositories under a temporary root, served by ``git http-backend`` (as
a CGI) behind a tiny threaded HTTP server on 127.0.0.1. Tests add commits
with :meth:`GitUpstream.commit`, stop and restart the server on the same port,
and count the requests it saw (by repository and service).

    up = git_upstream_factory()          # fixture: started, stopped at teardown
    up.create("app")                     # bare repo app.git with an initial commit on main
    sha = up.commit({"a.txt": "hi"}, "second", name="app")
    up.url("app")                        # http://127.0.0.1:<port>/app.git
    up.count(name="app", service="git-upload-pack", method="POST")

Commits are made with plumbing inside the bare repository (no work clone and
no HTTP), so they never show up in the request counts.
"""

from __future__ import annotations

import base64
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs

import pytest

from tests.support.daemon import free_port
from tests.support.tools import require_tool

_IDENTITY = {
    "GIT_AUTHOR_NAME": "Upstream Test", "GIT_AUTHOR_EMAIL": "upstream@example.invalid",
    "GIT_COMMITTER_NAME": "Upstream Test", "GIT_COMMITTER_EMAIL": "upstream@example.invalid",
}


def git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A minimal, isolated environment for running ``git`` in tests."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", "LANG": "C",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0", **_IDENTITY}
    env.update(extra or {})
    return env


def git(*args: str, cwd: str | os.PathLike[str] | None = None, input: bytes | None = None,
        env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run git; return stripped stdout; fail with stderr on a non-zero exit."""
    proc = subprocess.run(["git", *args], cwd=cwd, env=env or git_env(), input=input, capture_output=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} exited {proc.returncode}\n"
                             f"{proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode().strip()


def refs_of(repo: str | os.PathLike[str]) -> dict[str, str]:
    """Every ref of a repository: {refname: object id}."""
    out = git("for-each-ref", "--format=%(refname) %(objectname)", cwd=repo)
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def http_backend_path() -> str:
    out = subprocess.run(["git", "--exec-path"], capture_output=True, text=True, check=True).stdout.strip()
    return os.path.join(out, "git-http-backend")


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str      # without the query string
    query: str
    repo: str      # "app" for /app.git/..., "" when not under a repository
    service: str   # git-upload-pack / git-receive-pack / "" (dumb or other)
    status: int
    git_protocol: str
    content_encoding: str
    command: str = ""  # POST: the v2 command (ls-refs, fetch), or "fetch" for a v0 negotiation
    agent: str = ""


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    # HTTP/1.1 with chunked responses (libgit2 will not read a body delimited by
    # the connection's close), but one request per connection, so that stop()
    # really cuts every client off.
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._cgi()

    def do_POST(self) -> None:
        self._cgi()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _record(self, status: int, path: str, query: str, body: bytes = b"") -> None:
        up = self.server.owner
        rel = path.lstrip("/")
        repo = rel.split(".git/", 1)[0] if ".git/" in rel else ""
        service = parse_qs(query).get("service", [""])[0]
        if not service and rel.rsplit("/", 1)[-1] in ("git-upload-pack", "git-receive-pack"):
            service = rel.rsplit("/", 1)[-1]
        with up.lock:
            up.requests.append(SeenRequest(self.command, path, query, repo, service, status,
                                           self.headers.get("Git-Protocol", ""),
                                           self.headers.get("Content-Encoding", ""),
                                           _command(body) if self.command == "POST" else "",
                                           self.headers.get("User-Agent", "")))

    def _cgi(self) -> None:
        up = self.server.owner
        path, _, query = self.path.partition("?")
        body = self._read_body() if self.command == "POST" else b""
        if self.command == "POST" and up.held is not None and _command(body) not in ("ls-refs", "receive-pack"):
            # hold_packs(): the negotiation waits (a fetch in progress, for a test to act on).
            with up.lock:
                up.holding += 1
            up.held.wait(120)
        if up.auth is not None:
            expected = "Basic " + base64.b64encode(f"{up.auth[0]}:{up.auth[1]}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                self._record(401, path, query, body)
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git upstream"')
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                return
        env = git_env({
            "GIT_PROJECT_ROOT": str(up.root), "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command, "PATH_INFO": path, "QUERY_STRING": query,
            "REMOTE_ADDR": self.client_address[0], "SERVER_PROTOCOL": "HTTP/1.1",
            "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
        })
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        if self.headers.get("Content-Encoding"):
            # http-backend inflates gzip bodies itself.
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if up.auth is not None:
            env["REMOTE_USER"] = up.auth[0]
        with tempfile.TemporaryFile() as stdin:
            stdin.write(body)
            stdin.seek(0)
            proc = subprocess.Popen([http_backend_path()], stdin=stdin, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, env=env)
            assert proc.stdout is not None
            status, headers = 200, []
            while True:
                line = proc.stdout.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                k, _, v = line.decode("latin-1").rstrip("\r\n").partition(":")
                if k.lower() == "status":
                    status = int(v.strip().split()[0])
                else:
                    headers.append((k, v.strip()))
            self._record(status, path, query, body)
            try:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                while True:
                    chunk = proc.stdout.read1(64 * 1024)  # type: ignore[attr-defined]
                    if not chunk:
                        break
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                proc.kill()
            finally:
                proc.stdout.close()
                proc.wait()


def _command(body: bytes) -> str:
    if body[:2] == b"\x1f\x8b":
        import gzip

        try:
            body = gzip.decompress(body)
        except (OSError, EOFError):
            return "?"
    if body[4:12] == b"command=":
        return body[12:int(body[:4], 16)].decode("latin-1").strip()
    return "fetch"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, owner: "GitUpstream") -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", port), _Handler)
        # serve_forever() accepts once select() says a connection waits; a client
        # that resets first leaves a blocking accept() hanging, and stop() (which
        # waits for serve_forever) with it. Non-blocking, that accept just fails.
        self.socket.setblocking(False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A handler that raised closes its connection without an answer, which
        # libgit2 reports as "unexpected EOF": keep the reason for describe(),
        # which a failing test prints, instead of only on stderr.
        import traceback

        with self.owner.lock:
            self.owner.errors.append(traceback.format_exc())


class GitUpstream:
    """Bare repositories under ``root`` behind ``git http-backend`` on 127.0.0.1."""

    def __init__(self, root: str | os.PathLike[str], auth: tuple[str, str] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.port = 0
        self.lock = threading.Lock()
        self.requests: list[SeenRequest] = []
        self.errors: list[str] = []  # tracebacks of handlers that failed
        self.held: threading.Event | None = None  # set by release_packs()
        self.holding = 0  # pack negotiations that waited on hold_packs()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- server --------------------------------------------------------------------

    def start(self) -> "GitUpstream":
        """Start serving; after a stop(), on the same port as before."""
        if self._server is not None:
            return self
        for attempt in range(5):
            port = self.port or free_port()
            try:
                self._server = _Server(port, self)
                break
            except OSError:
                if self.port or attempt == 4:
                    raise
        assert self._server is not None
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"git-upstream-{self.port}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (connections are then refused) until start() again."""
        self.release_packs()
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str = "repo") -> str:
        return f"{self.base_url}/{name}.git"

    # -- repositories ---------------------------------------------------------------

    def path(self, name: str = "repo") -> Path:
        return self.root / f"{name}.git"

    def create(self, name: str = "repo", branch: str = "main", files: dict[str, bytes | str | None] | None = None) -> str:
        """A bare repository with one commit on ``branch``; returns that commit's id."""
        p = self.path(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        git("init", "-q", "--bare", "-b", branch, str(p))
        return self.commit(files or {"README": f"{name}\n"}, "initial commit", branch=branch, name=name)

    def commit(self, files: dict[str, bytes | str | None], message: str = "change", branch: str = "main",
               name: str = "repo") -> str:
        """Commit ``files`` (path → content; None deletes) on top of ``branch``; return the id."""
        repo = self.path(name)
        ref = f"refs/heads/{branch}"
        parent = self.rev(ref, name)
        with tempfile.TemporaryDirectory() as tmp:
            env = git_env({"GIT_INDEX_FILE": os.path.join(tmp, "index")})
            if parent:
                git("read-tree", parent, cwd=repo, env=env)
            for rel, content in files.items():
                if content is None:
                    # --force-remove wants a work tree; a mode-0 --index-info line
                    # removes the entry in a bare repository too.
                    git("update-index", "--index-info", cwd=repo, input=f"0 {'0' * 40}\t{rel}\n".encode(), env=env)
                    continue
                data = content.encode() if isinstance(content, str) else content
                blob = git("hash-object", "-w", "--stdin", cwd=repo, input=data, env=env)
                git("update-index", "--add", "--cacheinfo", f"100644,{blob},{rel}", cwd=repo, env=env)
            tree = git("write-tree", cwd=repo, env=env)
            args = ["commit-tree", tree, "-m", message] + (["-p", parent] if parent else [])
            sha = git(*args, cwd=repo, env=env)
            git("update-ref", ref, sha, *([parent] if parent else []), cwd=repo)
        return sha

    def tag(self, tag: str, target: str, name: str = "repo") -> None:
        git("tag", tag, target, cwd=self.path(name))

    def rev(self, ref: str, name: str = "repo") -> str:
        """The object id ``ref`` resolves to, or "" when it does not exist."""
        proc = subprocess.run(["git", "rev-parse", "-q", "--verify", f"{ref}^{{commit}}"], cwd=self.path(name),
                              env=git_env(), capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def refs(self, name: str = "repo") -> dict[str, str]:
        return refs_of(self.path(name))

    # -- observations ---------------------------------------------------------------

    def seen(self, name: str | None = None, service: str | None = None, method: str | None = None) -> list[SeenRequest]:
        with self.lock:
            reqs = list(self.requests)
        return [r for r in reqs if (name is None or r.repo == name) and (service is None or r.service == service)
                and (method is None or r.method == method)]

    def count(self, name: str | None = None, service: str | None = None, method: str | None = None) -> int:
        return len(self.seen(name, service, method))

    def negotiations(self, name: str = "repo") -> int:
        """upload-pack POSTs that ask for objects (not a v2 ls-refs ref listing)."""
        return sum(1 for r in self.seen(name, "git-upload-pack", "POST") if r.command != "ls-refs")

    def ref_checks(self, name: str = "repo") -> int:
        """Ref listings the cache's check loop sent (info/refs or ls-refs with its user agent)."""
        return sum(1 for r in self.seen(name, "git-upload-pack") if r.agent == "git/sparkcache"
                   and (r.method == "GET" or r.command == "ls-refs"))

    def fetches(self, name: str = "repo") -> int:
        """Ref discoveries for upload-pack: one per clone/fetch by any client."""
        return self.count(name, "git-upload-pack", "GET")

    def hold_packs(self) -> None:
        """From now on, every pack negotiation (a POST other than ``ls-refs``) waits
        for ``release_packs()``: a fetch or clone held in flight."""
        self.held = threading.Event()

    def release_packs(self) -> None:
        held, self.held = self.held, None
        if held is not None:
            held.set()

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()

    def describe(self) -> str:
        lines = [f"git upstream on port {self.port} ({'running' if self.running else 'stopped'}), root {self.root}"]
        for r in self.seen():
            lines.append(f"  {r.method} {r.path}{'?' + r.query if r.query else ''} -> {r.status}"
                         f" proto={r.git_protocol or '-'} enc={r.content_encoding or '-'} cmd={r.command or '-'}"
                         f" agent={r.agent or '-'}")
        with self.lock:
            lines += [f"  handler failed (its connection closed without an answer):\n{e}" for e in self.errors]
        return "\n".join(lines)


class FileUpstream:
    """One bare repository that mirrors reach through ``file://``, with no server:
    what the unit tests of the mirror machinery clone and fetch. It starts with
    one commit and an annotated tag ``v1``; each :meth:`commit` adds a file on
    top of a branch of the bare repository itself (as a push would)."""

    def __init__(self, root: str | os.PathLike[str], branch: str = "trunk") -> None:
        self.repos = GitUpstream(root)
        self.branch = branch
        self.bare = self.repos.path("up")
        self.n = 1
        self.repos.create("up", branch, files=self._files())
        git("tag", "-a", "-m", "v1", "v1", cwd=self.bare)

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def _files(self) -> dict[str, bytes | str | None]:
        return {f"f{self.n}.txt": f"content {self.n}\n" * 50}

    def commit(self, branch: str | None = None) -> str:
        """A new commit (one more file) on ``branch`` (the first one by default); its id."""
        self.n += 1
        return self.repos.commit(self._files(), f"commit {self.n}", branch=branch or self.branch, name="up")

    def refs(self) -> dict[str, str]:
        return self.repos.refs("up")


@pytest.fixture
def git_upstream_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., GitUpstream]]:
    """``make(auth=None) -> GitUpstream`` (started); stopped at teardown. Import it into a test module:
    ``from tests.support.git_upstream import git_upstream_factory  # noqa: F401``."""
    require_tool("git")
    made: list[GitUpstream] = []
    try:
        # Failure reports and the e2e watchdog cover these upstreams too.
        from tests.conftest import _UPSTREAMS
        stash: list[Any] = request.node.stash.setdefault(_UPSTREAMS, [])
    except ImportError:  # pragma: no cover
        stash = []

    def make(auth: tuple[str, str] | None = None) -> GitUpstream:
        up = GitUpstream(tmp_path / f"git-upstream{len(made)}", auth=auth).start()
        made.append(up)
        stash.append(up)
        return up

    yield make
    for up in made:
        up.stop()


def record_git_runs(monkeypatch: Any) -> list[list[str]]:
    """The argv of every ``git`` the mirrors run (repack, commit-graph...), from now on."""
    from sparkcache.git import mirrors as mirrors_mod

    seen: list[list[str]] = []
    real = mirrors_mod.run_git

    def recording(args: list[str], **kw: Any) -> Any:
        seen.append(args)
        return real(args, **kw)

    monkeypatch.setattr(mirrors_mod, "run_git", recording)
    return seen


# -- client side -------------------------------------------------------------------


def client_env(home: str | os.PathLike[str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a git client in a test: a private HOME, no system config, no prompts."""
    Path(home).mkdir(parents=True, exist_ok=True)
    return git_env({"HOME": str(home), **(extra or {})})


def git_client(*args: str, home: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None,
               check: bool = True, timeout: float = 120,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the git client; with ``check``, fail with its stderr on a non-zero exit."""
    proc = subprocess.run(["git", *args], cwd=cwd, env=client_env(home, env), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                             f"stderr:\n{proc.stderr}")
    return proc


def git_daemon_config(repos: dict[str, str] | None = None, **git: Any) -> dict[str, Any]:
    """The ``extra`` for a Daemon with a ``git:`` section; the fetch loop is slowed to
    an hour unless given, so that tests count only the upstream fetches they cause."""
    return {"git": {"fetch_interval": "1h", "jitter": "0s", **({"repos": repos} if repos else {}), **git}}


# -- one daemon per test module -------------------------------------------------------

WRITE_TOKEN = "git-test-write-5f0c2a"


class GitEnv:
    """What a test gets from ``git_case``: its own upstream, the module's daemon, a client HOME."""

    def __init__(self, up: GitUpstream, d: Any, home: Path) -> None:
        self.up, self.d, self.home = up, d, home

    def register(self, repo: str = "app") -> str:
        """Register the upstream's ``repo`` with the daemon under a fresh name and return
        that name. The daemon clones it right away: make the upstream commits the test
        expects in the mirror first."""
        import json
        import uuid
        from urllib.parse import quote

        name = f"{repo}-{uuid.uuid4().hex[:10]}"
        r = self.d.request("POST", f"/git/register?name={name}&repo={quote(self.up.url(repo), safe='')}",
                           headers={"Authorization": f"Bearer {WRITE_TOKEN}"})
        assert r.status == 201, r.describe()
        assert json.loads(r.body)["name"] == name
        return name


@pytest.fixture(scope="module")
def git_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One daemon with a git section for a whole test module (a daemon start costs
    seconds on a loaded machine); tests register their own repositories on it."""
    from tests.support.daemon import Daemon

    require_tool("git")
    d = Daemon(tmp_path_factory.mktemp("git-cache"),
               auth={"tokens": [{"name": "ops", "token_env": "GIT_TEST_WRITE", "scopes": ["admin"]}]},
               env={"GIT_TEST_WRITE": WRITE_TOKEN}, extra=git_daemon_config()).start()
    yield d
    d.close()


@pytest.fixture
def git_case(request: pytest.FixtureRequest, git_cache: Any, git_upstream_factory: Callable[..., GitUpstream],
            tmp_path: Path) -> GitEnv:
    """A fresh upstream per test plus the module's daemon (whose log a failing test's report shows)."""
    try:
        from tests.conftest import _DAEMONS
        request.node.stash.setdefault(_DAEMONS, []).append(git_cache)
    except ImportError:  # pragma: no cover
        pass
    if not git_cache.running:
        git_cache.start()
    return GitEnv(git_upstream_factory(), git_cache, tmp_path / "home")
