"""Shared pieces of the git benchmarks (bench/git_*.py).

- :func:`build_repo`: a realistically sized bare repository, generated once
  with ``git fast-import`` and cached under ``bench/.cache/git/`` (git-ignored):
  tens of thousands of commits, each touching a few files whose content is
  random (compresses poorly), so the pack is a few hundred MB;
- :class:`HttpBackend`: the reference server, ``git http-backend`` behind nginx
  + fcgiwrap (a private nginx and fcgiwrap of our own on loopback);
- :class:`GitDaemon`: the sparkcache daemon with a ``git:`` section;
- :class:`CpuGroup`: CPU seconds of a server, every process it ever ran included
  (a cpuacct cgroup; :func:`tree_cpu` from /proc as the fallback);
- :class:`WanLink`: an emulated WAN link (network namespace, veth, tc tbf, delay relay);
- :func:`v2_fetch_all`: a minimal protocol-v2 client (ls-refs, then a full
  fetch with every ref as a want) that reads the whole response and discards it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from common import (LOOPBACK, REPO, Bench, BenchError, Daemon, Nginx, _descendants, _die_with_parent, clean_env,
                    free_port, tool)

CACHE_DIR = REPO / "bench" / ".cache" / "git"
HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"

GIT_ENV = {
    "HOME": "/nonexistent", "LANG": "C", "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
    "GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}


def git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = clean_env(GIT_ENV)
    env.update(extra or {})
    return env


def git(*args: str, cwd: str | os.PathLike[str] | None = None, input: bytes | None = None,
        timeout: float = 3600) -> str:
    p = subprocess.run(["git", *args], cwd=cwd, env=git_env(), input=input, capture_output=True, timeout=timeout)
    if p.returncode != 0:
        raise BenchError(f"git {' '.join(args)} exited {p.returncode}: {p.stderr.decode(errors='replace')[-2000:]}")
    return p.stdout.decode().strip()


# -- the test repository ----------------------------------------------------------------------------

BLOCK = 2048


def _fast_import_stream(commits: int, files: int, seed: int, change_blocks: int) -> Iterator[bytes]:
    """A fast-import stream: an initial tree of ``files`` files of 4-24 random blocks,
    then ``commits`` commits that each rewrite a few blocks of 1-3 files (and now
    and then add a file). Blocks are random bytes: the content compresses
    poorly, and each version is a small delta of the previous one — the shape
    of a real source tree's history, only less compressible."""
    rnd = random.Random(seed)
    urandom = os.urandom
    content: dict[str, list[bytes]] = {}
    paths: list[str] = []
    dirs = [f"src/mod{d:03d}" for d in range(max(1, files // 100))]

    def new_file() -> str:
        path = f"{rnd.choice(dirs)}/file{len(paths):05d}.dat"
        content[path] = [urandom(BLOCK) for _ in range(rnd.randint(4, 24))]
        paths.append(path)
        return path

    def change(path: str) -> None:
        blocks = content[path]
        for _ in range(change_blocks):
            j = rnd.randrange(len(blocks) + 1)
            if j == len(blocks) or rnd.random() < 0.2:
                blocks.insert(j, urandom(BLOCK))
            else:
                blocks[j] = urandom(BLOCK)
        if len(blocks) > 40:
            del blocks[rnd.randrange(len(blocks))]

    def blob_cmd(path: str) -> bytes:
        data = b"".join(content[path])
        return b"M 100644 inline %s\ndata %d\n%s\n" % (path.encode(), len(data), data)

    t0 = 1_600_000_000
    for i in range(commits + 1):
        if i == 0:
            changed = {new_file() for _ in range(files)}
        else:
            changed = set()
            for _ in range(rnd.choice((1, 1, 2, 2, 3))):
                if rnd.random() < 0.02:
                    changed.add(new_file())
                else:
                    path = rnd.choice(paths)
                    change(path)
                    changed.add(path)
        when = t0 + i * 600
        msg = f"change {i}\n\nTouches {', '.join(sorted(changed))}.\n".encode()
        out = [b"commit refs/heads/main\n",
               b"committer Bench <bench@example.invalid> %d +0000\n" % when,
               b"data %d\n%s\n" % (len(msg), msg)]
        out += [blob_cmd(p) for p in sorted(changed)]
        if i and i % 5000 == 0:
            out.append(b"\nreset refs/tags/v%d\nfrom refs/heads/main\n" % (i // 5000))
        out.append(b"\n")
        yield b"".join(out)
    yield b"checkpoint\n"


def build_repo(commits: int = 30_000, files: int = 3_000, seed: int = 1, change_blocks: int = 2,
               log: Any = print) -> Path:
    """The bare repo for these parameters, generated on first use (a few minutes) and cached.

    Packed like a forge packs its repositories: one pack with a bitmap index
    and a commit-graph (git repack -adb), so both servers start from the same
    well-kept repository."""
    name = f"bench-c{commits}-f{files}-s{seed}-b{change_blocks}.git"
    path = CACHE_DIR / name
    if (path / "bench-complete").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = CACHE_DIR / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    git("init", "-q", "--bare", "-b", "main", str(tmp))
    log(f"generating {commits:,} commits over {files:,} files with git fast-import (cached in {path})")
    t0 = time.monotonic()
    # fast-import deltas each blob only against the blob before it in the
    # stream (another file here), so store it uncompressed and let one
    # ``repack -f`` find the real deltas (versions of the same file).
    proc = subprocess.Popen(["git", "-c", "core.compression=0", "-c", "pack.compression=0", "fast-import", "--quiet"], cwd=tmp, env=git_env(),
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        for chunk in _fast_import_stream(commits, files, seed, change_blocks):
            proc.stdin.write(chunk)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    err = proc.stderr.read() if proc.stderr else b""
    if proc.wait() != 0:
        raise BenchError(f"git fast-import failed: {err.decode(errors='replace')[-2000:]}")
    log(f"fast-import done in {time.monotonic() - t0:.0f}s; repacking (delta search, bitmaps)")
    git("symbolic-ref", "HEAD", "refs/heads/main", cwd=tmp)
    git("repack", "-a", "-d", "-f", "-b", "--window=10", "--depth=50", "--quiet", cwd=tmp)
    git("commit-graph", "write", "--reachable", cwd=tmp)
    (tmp / "bench-complete").write_text(json.dumps({"commits": commits, "files": files, "seed": seed}) + "\n")
    tmp.rename(path)
    log(f"repository ready in {time.monotonic() - t0:.0f}s: {describe_repo(path)}")
    return path


def repo_args(p: argparse.ArgumentParser) -> None:
    """``--commits`` and ``--files`` of the generated repository (:func:`build_repo`)."""
    p.add_argument("--commits", type=int, default=None, help="commits in the generated repo (default 30000)")
    p.add_argument("--files", type=int, default=None, help="files in the generated repo (default 3000)")


def bench_repo(b: Bench, args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """The generated repository for ``args.commits``/``args.files``, copied to ``<root>/bench.git``.

    Returns (:func:`describe_repo` of it, ``root``: the directory to serve)."""
    src = build_repo(args.commits, args.files, log=b.log)
    repo_info = describe_repo(src)
    root = b.path("repos")
    root.mkdir()
    copy_repo(src, root / "bench.git")
    return repo_info, root


def describe_repo(path: Path) -> dict[str, Any]:
    packs = list((path / "objects" / "pack").glob("*.pack"))
    return {
        "path": str(path),
        "commits": int(git("rev-list", "--count", "--all", cwd=path)),
        "objects": int(sum(int(line.split(":")[1]) for line in git("count-objects", "-v", cwd=path).splitlines()
                           if line.startswith("in-pack:"))),
        "pack_bytes": sum(p.stat().st_size for p in packs),
        "packs": len(packs),
        "refs": len(git("for-each-ref", cwd=path).splitlines()),
    }


def copy_repo(src: Path, dst: Path) -> Path:
    """A private copy (hard-linked objects) so a benchmark may add commits or config."""
    shutil.copytree(src, dst, copy_function=os.link)
    for name in ("config", "HEAD", "packed-refs"):
        p = dst / name
        if p.exists():  # hard links would let our edits reach the cached repo
            data = p.read_bytes()
            p.unlink()
            p.write_bytes(data)
    return dst


# -- the reference server: git http-backend behind nginx + fcgiwrap ---------------------------------


class HttpBackend:
    """nginx → fcgiwrap (unix socket) → git http-backend over ``root``: the usual self-hosted setup."""

    def __init__(self, bench: Bench, root: Path, name: str = "upstream", port: int | None = None,
                 listen: str = LOOPBACK, workers: int = 2, fcgi_children: int = 16,
                 netns: str | None = None) -> None:
        self.bench, self.root, self.name = bench, root, name
        self.port = port or free_port()
        self.listen = listen
        self.netns = netns
        self.sock = bench.path(f"fcgiwrap-{name}.sock")
        self.fcgi_children = fcgi_children
        self.fcgi: subprocess.Popen[bytes] | None = None
        self.group: CpuGroup | None = None
        server = f"""
    server {{
        listen {listen}:{self.port};
        access_log {{dir}}/access.log bench;
        client_max_body_size 0;
        location / {{
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME {HTTP_BACKEND};
            fastcgi_param GIT_PROJECT_ROOT {root};
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            fastcgi_param PATH_INFO $uri;
            fastcgi_param HTTP_GIT_PROTOCOL $http_git_protocol;
            fastcgi_buffering off;
            fastcgi_request_buffering off;
            fastcgi_read_timeout 600s;
            fastcgi_pass unix:{self.sock};
        }}
    }}"""
        self.nginx = _NsNginx(bench, name, [server], workers=workers, netns=netns, port=self.port, host=listen)

    def start(self) -> "HttpBackend":
        if self.sock.exists():
            self.sock.unlink()
        cmd = [tool("fcgiwrap"), "-c", str(self.fcgi_children), "-s", f"unix:{self.sock}"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        log = open(self.bench.path(f"fcgiwrap-{self.name}.log"), "ab")
        try:
            # its own session: stopping it must also stop its preforked children
            self.fcgi = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=git_env({"GIT_HTTP_EXPORT_ALL": ""}), preexec_fn=_die_with_parent,
                                         start_new_session=True)
        finally:
            log.close()
        self.bench.on_cleanup(self.stop)
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            if self.fcgi.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"fcgiwrap did not create {self.sock}")
            time.sleep(0.05)
        os.chmod(self.sock, 0o777)  # nginx workers run as nobody
        self.nginx.start()
        self.group = CpuGroup.make(self.bench, self.name)
        if self.group is not None:
            for pid in self.pids():
                self.group.add_tree(pid)
        return self

    def url(self, repo: str) -> str:
        return f"http://{self.listen}:{self.port}/{repo}"

    def pids(self) -> list[int]:
        """Every process of this server: nginx master and workers, fcgiwrap and the CGIs it runs."""
        out = []
        for p in (self.nginx.proc, self.fcgi):
            if p is not None:
                out.append(p.pid)
        return out

    def cpu(self) -> float:
        """CPU seconds used by the whole server so far (read once it is quiet)."""
        return self.group.seconds() if self.group is not None else settle_cpu(self.pids())

    def stop(self) -> None:
        self.nginx.stop()
        if self.fcgi is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.fcgi.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.fcgi.wait(10)
                    break
                except subprocess.TimeoutExpired:
                    pass
        self.fcgi = None
        if self.group is not None:
            self.group.remove()
            self.group = None


class _NsNginx(Nginx):
    """common.Nginx, optionally started inside a network namespace, on any listen address."""

    def __init__(self, bench: Bench, name: str, servers: list[str], workers: int, netns: str | None,
                 port: int, host: str) -> None:
        super().__init__(bench, name, servers, workers=workers)
        self.netns, self.host = netns, host
        self.ports = [port]

    def start(self, timeout: float = 15.0) -> "Nginx":
        if not self.netns:
            if self.host != LOOPBACK:
                raise BenchError("nginx outside a namespace listens on loopback only")
            return super().start(timeout)
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        conf = self.dir / "nginx.conf"
        conf.write_text(self.conf())
        out = open(self.dir / "stderr.log", "ab")
        try:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, tool("nginx"), "-p", str(self.dir), "-c", str(conf),
                 "-g", "daemon off;"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
                preexec_fn=_die_with_parent)
        finally:
            out.close()
        self.bench.on_cleanup(self.stop)
        # the namespace's loopback is not ours: probe from inside it
        probe = ["ip", "netns", "exec", self.netns, "curl", "-s", "-o", "/dev/null", "--max-time", "2",
                 f"http://{self.host}:{self.ports[0]}/"]
        deadline = time.monotonic() + timeout
        while subprocess.run(probe, capture_output=True).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise BenchError(f"nginx {self.name} in {self.netns} not listening\n{self.error_log()}")
            time.sleep(0.2)
        return self

    def url(self, path: str, port: int | None = None) -> str:
        return f"http://{self.host}:{port or self.ports[0]}/{path.lstrip('/')}"


# -- sparkcache with a git section ---------------------------------------------------------------------


class GitDaemon(Daemon):
    def __init__(self, bench: Bench, git_section: dict[str, Any], name: str = "sparkcache",
                 storage: dict[str, Any] | None = None) -> None:
        super().__init__(bench, {}, name=name, storage=storage)
        self.git_section = git_section
        self.group: CpuGroup | None = None

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["git"] = self.git_section
        return cfg

    def start(self, timeout: float = 60.0) -> "GitDaemon":
        super().start(timeout)
        self.start_group()
        return self

    def start_group(self) -> None:
        self.group = CpuGroup.make(self.bench, self.dir.name)
        if self.group is not None:
            self.group.add_tree(self.pid)

    def cpu(self) -> float:
        """CPU seconds used by the daemon and its upload-pack children so far."""
        return self.group.seconds() if self.group is not None else settle_cpu([self.pid])

    def stop(self) -> None:
        super().stop()
        if self.group is not None:
            self.group.remove()
            self.group = None

    def git_url(self, name: str) -> str:
        return self.url(f"/git/{name}")


# -- CPU accounting ----------------------------------------------------------------------------------------


def _proc_times(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15])  # utime stime cutime cstime


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds used so far by these processes, their live descendants, and every
    descendant already reaped (which the kernel adds to its parent's cutime/cstime).

    A process that has exited but not yet been reaped is counted by neither:
    read this once the servers are quiet (after the responses have ended)."""
    tck = os.sysconf("SC_CLK_TCK")
    seen: set[int] = set()
    total = 0
    for root in roots:
        for pid in [root, *_descendants(root)]:
            if pid in seen:
                continue
            seen.add(pid)
            try:
                total += _proc_times(pid)
            except (OSError, IndexError, ValueError):
                pass
    return total / tck


class CpuGroup:
    """A cgroup-v1 ``cpuacct`` group: the CPU of every process ever in it, reaped or not.

    fcgiwrap lets the kernel reap its CGI children (their CPU never reaches any
    parent's cutime), so /proc accounting under-counts http-backend, upload-pack
    and pack-objects; a cgroup counts them all. Processes are moved in after
    they start; whatever they fork afterwards is born inside."""

    ROOT = Path("/sys/fs/cgroup/cpuacct")

    def __init__(self, bench: Bench, name: str) -> None:
        self.path = self.ROOT / f"sparkbench-{name}-{os.getpid()}"
        self.path.mkdir()
        # (removed by its owner once the processes inside have stopped)

    @classmethod
    def make(cls, bench: Bench, name: str) -> "CpuGroup | None":
        try:
            return cls(bench, name)
        except OSError as e:
            bench.log(f"no cpuacct cgroup ({e}); falling back to /proc accounting, which misses reaped CGI children")
            return None

    def add_tree(self, pid: int) -> None:
        for p in [pid, *_descendants(pid)]:
            try:
                (self.path / "cgroup.procs").write_text(f"{p}\n")
            except OSError:
                pass  # gone meanwhile

    def seconds(self) -> float:
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        try:
            for p in (self.path / "cgroup.procs").read_text().split():
                try:
                    (self.ROOT / "cgroup.procs").write_text(p + "\n")
                except OSError:
                    pass
            self.path.rmdir()
        except OSError:
            pass


def settle_cpu(roots: list[int], quiet: float = 0.3, timeout: float = 30.0) -> float:
    """Wait until the tree's CPU counter stops moving (children reaped), then read it."""
    last = tree_cpu(roots)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = tree_cpu(roots)
        if now == last and not any(_zombies(r) for r in roots):
            return now
        last = now
    return last


def _zombies(root: int) -> bool:
    for pid in _descendants(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            pass
    return False


# -- clients -------------------------------------------------------------------------------------------------


def pkt(line: str | bytes) -> bytes:
    data = line.encode() if isinstance(line, str) else line
    return b"%04x" % (len(data) + 4) + data


def _pkts(data: bytes) -> Iterator[bytes | None]:
    pos = 0
    while pos + 4 <= len(data):
        n = int(data[pos:pos + 4], 16)
        if n < 4:
            yield None
            pos += 4
            continue
        yield data[pos + 4:pos + n]
        pos += n


def _conn(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    return http.client.HTTPConnection(host, int(port or 80), timeout=timeout), "/" + path


def ls_refs(base: str, timeout: float = 60) -> list[tuple[str, str]]:
    """(oid, refname) of HEAD, branches and tags, as a v2 clone asks for them."""
    c, path = _conn(base, timeout)
    try:
        body = (pkt("command=ls-refs\n") + pkt("agent=git/bench\n") + pkt("object-format=sha1\n") + b"0001"
                + pkt("peel\n") + pkt("symrefs\n") + pkt("ref-prefix HEAD\n") + pkt("ref-prefix refs/heads/\n")
                + pkt("ref-prefix refs/tags/\n") + b"0000")
        c.request("POST", path + "/git-upload-pack", body=body, headers={
            "Content-Type": "application/x-git-upload-pack-request", "Git-Protocol": "version=2"})
        r = c.getresponse()
        data = r.read()
        if r.status != 200:
            raise BenchError(f"ls-refs on {base} answered {r.status}: {data[:300]!r}")
    finally:
        c.close()
    refs = []
    for p in _pkts(data):
        if p:
            oid, name = p.decode().rstrip("\n").split(" ")[:2]
            refs.append((oid, name))
    return refs


def fetch_body(wants: list[str]) -> bytes:
    """The fetch a ``git clone`` sends (no terminal: no-progress)."""
    return (pkt("command=fetch\n") + pkt("agent=git/bench\n") + pkt("object-format=sha1\n") + b"0001"
            + pkt("thin-pack\n") + pkt("no-progress\n") + pkt("ofs-delta\n")
            + b"".join(pkt(f"want {w}\n") for w in sorted(set(wants))) + pkt("done\n") + b"0000")


def v2_fetch_all(base: str, timeout: float = 900) -> dict[str, Any]:
    """ls-refs, then fetch every ref in one request; read the whole response, keep nothing.

    The response is read raw from the socket (``Connection: close``, no
    chunked decoding in Python), so the client costs the same, and little,
    whichever way the server frames its body. Returns bytes read, seconds,
    and X-Cache; fails unless the response ends with the v2 flush-pkt."""
    import socket

    t0 = time.monotonic()
    wants = [oid for oid, _ in ls_refs(base, timeout)]
    rest = base.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    body = fetch_body(wants)
    head = (f"POST /{path}/git-upload-pack HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n"
            f"Content-Type: application/x-git-upload-pack-request\r\nGit-Protocol: version=2\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    n, tail, header = 0, b"", b""
    with socket.create_connection((host, int(port or 80)), timeout=timeout) as sock:
        sock.sendall(head + body)
        while True:
            got = sock.recv_into(buf)
            if not got:
                break
            if len(header) < 65536 and b"\r\n\r\n" not in header:
                header += bytes(view[:got])
            n += got
            tail = (tail + bytes(view[max(0, got - 64):got]))[-64:]
    status_line, _, rest_headers = header.partition(b"\r\n")
    if b" 200 " not in status_line + b" ":
        raise BenchError(f"fetch from {base} answered {status_line[:100]!r}")
    headers = rest_headers.split(b"\r\n\r\n", 1)[0].lower()
    chunked = b"transfer-encoding: chunked" in headers
    if not tail.endswith(b"0000\r\n0\r\n\r\n" if chunked else b"0000"):
        raise BenchError(f"fetch from {base}: response of {n} bytes does not end with a flush-pkt")
    x_cache = None
    for line in headers.split(b"\r\n"):
        if line.startswith(b"x-cache:"):
            x_cache = line.split(b":", 1)[1].strip().decode().upper()
    return {"bytes": n, "seconds": time.monotonic() - t0, "x_cache": x_cache}


def clone(url: str, dest: Path, timeout: float = 1800, protocol: int = 2) -> dict[str, Any]:
    """A real ``git clone --bare`` (no checkout: the server side is what is measured)."""
    t0 = time.monotonic()
    p = subprocess.run(["git", "-c", f"protocol.version={protocol}", "clone", "--bare", "-q", url, str(dest)],
                       env=git_env(), capture_output=True, timeout=timeout)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise BenchError(f"git clone {url} exited {p.returncode}: {p.stderr.decode(errors='replace')[-2000:]}")
    return {"seconds": wall, "head": git("rev-parse", "HEAD", cwd=dest)}


# -- an emulated WAN link ------------------------------------------------------------------------------------

WAN_NS = "sparkbench-wan"
WAN_HOST_IP, WAN_NS_IP = "10.231.7.1", "10.231.7.2"


class WanLink:
    """A network namespace behind a veth pair, rate-limited with ``tc tbf`` both ways,
    plus ``delay`` of one-way latency added by a relay inside the namespace.

    (``tc netem`` would add the delay in the kernel, but this kernel has no
    sch_netem; the relay delays each chunk by ``delay`` per direction, which
    gives every request/response exchange the RTT, while the bandwidth limit
    stays the kernel's.)"""

    def __init__(self, bench: Bench, rate: str = "50mbit", delay: float = 0.020) -> None:
        self.bench, self.rate, self.delay = bench, rate, delay
        self.ns = WAN_NS
        self.relays: list[subprocess.Popen[bytes]] = []
        self.up = False

    def _run(self, *cmd: str) -> None:
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise BenchError(f"{' '.join(cmd)}: {p.stderr.strip()}")

    def start(self) -> "WanLink":
        self.stop()
        self.bench.on_cleanup(self.stop)
        self.up = True
        r = self._run
        r("ip", "netns", "add", self.ns)
        r("ip", "link", "add", "sbwan0", "type", "veth", "peer", "name", "sbwan1")
        r("ip", "link", "set", "sbwan1", "netns", self.ns)
        r("ip", "addr", "add", f"{WAN_HOST_IP}/30", "dev", "sbwan0")
        r("ip", "link", "set", "sbwan0", "up")
        r("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{WAN_NS_IP}/30", "dev", "sbwan1")
        r("ip", "netns", "exec", self.ns, "ip", "link", "set", "sbwan1", "up")
        r("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        # ~1 ms of burst at the rate, and up to 200 ms of queue: a plain shaped link
        tbf = ["tbf", "rate", self.rate, "burst", "16kb", "latency", "200ms"]
        r("tc", "qdisc", "add", "dev", "sbwan0", "root", *tbf)
        r("ip", "netns", "exec", self.ns, "tc", "qdisc", "add", "dev", "sbwan1", "root", *tbf)
        return self

    def relay(self, listen_port: int, target_port: int) -> None:
        """Inside the namespace: WAN_NS_IP:listen_port → 127.0.0.1:target_port, delayed."""
        cmd = ["ip", "netns", "exec", self.ns, sys.executable, str(Path(__file__).resolve()), "relay",
               WAN_NS_IP, str(listen_port), "127.0.0.1", str(target_port), str(self.delay)]
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.relays.append(p)
        import socket
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection((WAN_NS_IP, listen_port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline or p.poll() is not None:
                    raise BenchError("the WAN relay did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        for p in self.relays:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        self.relays = []
        subprocess.run(["ip", "link", "del", "sbwan0"], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        self.up = False


def _relay_main(listen_host: str, listen_port: int, host: str, port: int, delay: float) -> None:
    import asyncio

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=512)

        async def read() -> None:
            while True:
                data = await reader.read(65536)
                await q.put((loop.time() + delay, data))
                if not data:
                    return

        async def write() -> None:
            while True:
                due, data = await q.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        try:
            await asyncio.gather(read(), write())
        except (ConnectionError, OSError):
            pass

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(host, port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))
        for w in (cw, uw):
            w.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, listen_host, listen_port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "relay":
        _relay_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), float(sys.argv[6]))
    else:
        print("usage: git_common.py relay LISTEN_HOST LISTEN_PORT HOST PORT DELAY_S", file=sys.stderr)
        sys.exit(2)
