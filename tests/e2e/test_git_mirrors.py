"""The mirror machinery end to end: the fetch loop, upstream credentials, and
recovery from a wiped or corrupt data dir, with the real git client through the
daemon and a real upstream (git http-backend)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

from tests.support.client import eventually
from tests.support.tools import files_containing
from tests.support.git_upstream import (  # noqa: F401 - fixture
    GitUpstream,
    git,
    git_client,
    git_daemon_config,
    git_upstream_factory,
)


def mirror_dirs(d: Any) -> list[Path]:
    base = Path(d.data_dir) / "git" / "mirrors"
    return sorted(base.glob("*.git")) if base.is_dir() else []


def repos(d: Any) -> dict[str, Any]:
    r = d.get("/repos")
    assert r.status == 200, r.describe()
    return {e["name"]: e for e in json.loads(r.body)}


def ls_remote(url: str, home: Path) -> dict[str, str]:
    out = git_client("ls-remote", url, home=home).stdout
    return {line.split("\t")[1]: line.split("\t")[0] for line in out.splitlines() if "\t" in line}


def test_fetch_loop_keeps_the_mirror_fresh(git_upstream_factory: Any, daemon_factory: Any, tmp_path: Path) -> None:
    up: GitUpstream = git_upstream_factory()
    up.create("app")
    d = daemon_factory(extra=git_daemon_config({"app": up.url("app")}, fetch_interval="1s"))
    home = tmp_path / "home"
    c = tmp_path / "c"
    git_client("clone", "-q", d.url("/git/app"), str(c), home=home)
    sha = up.commit({"loop.txt": "fetched by the loop\n"}, "by the loop", name="app")
    # No refresh call, no missing object: only the loop can bring this commit.
    eventually(lambda: ls_remote(d.url("/git/app"), home).get("refs/heads/main") == sha, timeout=30,
               message="the fetch loop did not bring the new commit")
    git_client("pull", "-q", "--ff-only", cwd=c, home=home)
    assert (c / "loop.txt").read_text() == "fetched by the loop\n"
    st = repos(d)["app"]
    assert st["cloned"] and st["last_error"] is None and st["refs"] == 1 and st["size"] > 0
    assert st["last_fetch"] and st["last_change"]
    # Idle checks cost a ref listing each (v2 ls-refs), never a pack negotiation.
    posts = up.negotiations("app")
    checks = up.ref_checks("app")
    eventually(lambda: up.ref_checks("app") >= checks + 2, timeout=30)
    assert up.negotiations("app") == posts, up.describe()


def test_one_failing_repo_does_not_stop_the_loop(git_upstream_factory: Any, daemon_factory: Any, tmp_path: Path) -> None:
    up: GitUpstream = git_upstream_factory()
    up.create("good")
    up.create("bad")
    d = daemon_factory(extra=git_daemon_config({"good": up.url("good"), "bad": up.url("bad")}, fetch_interval="1s"))
    home = tmp_path / "home"
    for name in ("good", "bad"):
        git_client("clone", "-q", d.url(f"/git/{name}"), str(tmp_path / name), home=home)
    shutil.rmtree(up.path("bad"))
    sha = up.commit({"x": "y\n"}, "later", name="good")
    eventually(lambda: repos(d)["bad"]["last_error"], timeout=30, message="bad repo's failure not recorded")
    eventually(lambda: ls_remote(d.url("/git/good"), home).get("refs/heads/main") == sha, timeout=30)
    # the failing repo is still served from its mirror
    git_client("clone", "-q", d.url("/git/bad"), str(tmp_path / "bad2"), home=home)


class ProcessWatcher(threading.Thread):
    """Scans every process's argv and every other process's environment for a secret."""

    def __init__(self, secret: bytes, daemon_pid: int) -> None:
        super().__init__(daemon=True)
        self.secret = secret
        with open(f"/proc/{daemon_pid}/cmdline", "rb") as f:
            # The daemon holds the token (its environment is where it comes from); so
            # does a child between fork and exec, still running the daemon's image.
            self.daemon_argv = f.read()
        self.hits: list[str] = []
        self.scans = 0
        self.seen_git_children = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self.stop_event.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == me:
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = f.read()
                    if self.secret in argv:
                        self.hits.append(f"argv of {pid}: {argv[:200]!r}")
                    if argv.startswith(b"git") or b"/git\0" in argv or b"upload-pack" in argv:
                        self.seen_git_children += 1
                    if argv == self.daemon_argv or argv.endswith(b"-m\0sparkcache.workers.worker\0"):
                        continue  # the daemon itself (with server.workers > 1: its worker processes)
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        if self.secret in f.read():
                            self.hits.append(f"environment of {pid}: {argv[:200]!r}")
                except OSError:
                    continue
            self.scans += 1


def test_credentials_never_in_ps_on_disk_or_in_the_mirror_config(git_upstream_factory: Any, daemon_factory: Any,
                                                                 tmp_path: Path) -> None:
    token = "tok-" + secrets.token_hex(16)
    up: GitUpstream = git_upstream_factory(auth=("ci-bot", token))
    up.create("private", files={"secret-code.c": "int x;\n"})
    host = f"127.0.0.1:{up.port}"
    cfg = git_daemon_config({"private": up.url("private")}, fetch_interval="1s", maintenance_interval="2s",
                            credentials={host: {"username": "ci-bot", "token_env": "UPSTREAM_TOKEN"}})
    d = daemon_factory(extra=cfg, env={"UPSTREAM_TOKEN": token})
    home = tmp_path / "home"
    watcher = ProcessWatcher(token.encode(), d.pid)
    watcher.start()
    try:
        git_client("clone", "-q", d.url("/git/private"), str(tmp_path / "c"), home=home)
        for i in range(3):
            up.commit({f"f{i}": f"{i}\n"}, f"change {i}", name="private")
            r = d.request("POST", "/git/refresh?name=private")
            assert r.status == 200, r.describe()
        # the loop and maintenance (repack, commit-graph children) run too
        eventually(lambda: watcher.scans > 20 and up.fetches("private") >= 6, timeout=30)
    finally:
        watcher.stop_event.set()
        watcher.join(10)
    assert watcher.hits == [], (watcher.hits, watcher.seen_git_children)
    assert git("rev-parse", "HEAD", cwd=tmp_path / "c")
    # the upstream really required the token
    assert any(r.status == 401 for r in up.seen("private")) and any(r.status == 200 for r in up.seen("private"))
    # nothing under the data dir holds it (nor its base64 in a Basic header)
    import base64

    needles = [token.encode(), base64.b64encode(f"ci-bot:{token}".encode())]
    held = files_containing(d.data_dir, needles)
    assert held == [], f"{held} hold the upstream token"
    (mirror,) = mirror_dirs(d)
    cfg_text = (mirror / "config").read_text()
    assert token not in cfg_text and "ci-bot" not in cfg_text
    assert git("config", "remote.origin.url", cwd=mirror) == up.url("private")
    assert token not in d.log()
    assert token not in json.dumps(repos(d)) and repos(d)["private"]["credentials"] == "token"


def test_wrong_token_fails_cleanly(git_upstream_factory: Any, daemon_factory: Any, tmp_path: Path) -> None:
    up: GitUpstream = git_upstream_factory(auth=("ci-bot", "right"))
    up.create("private")
    cfg = git_daemon_config({"private": up.url("private")},
                            credentials={f"127.0.0.1:{up.port}": {"username": "ci-bot", "token": "wrong"}})
    d = daemon_factory(extra=cfg)
    p = git_client("clone", "-q", d.url("/git/private"), str(tmp_path / "c"), home=tmp_path / "home", check=False)
    assert p.returncode != 0
    # libgit2 is told to give up: a bounded number of attempts, not a loop
    rejected = [r for r in up.seen("private") if r.status == 401]
    assert 1 <= len(rejected) <= 4, up.describe()
    assert repos(d)["private"]["last_error"]
    assert mirror_dirs(d) == []


def test_wiped_data_dir_is_recloned(git_upstream_factory: Any, daemon_factory: Any, tmp_path: Path) -> None:
    up: GitUpstream = git_upstream_factory()
    up.create("app")
    d = daemon_factory(extra=git_daemon_config({"app": up.url("app")}))
    home = tmp_path / "home"
    git_client("clone", "-q", d.url("/git/app"), str(tmp_path / "c1"), home=home)
    assert up.count("app", "git-upload-pack", "POST") == 1
    shutil.rmtree(Path(d.data_dir) / "git")
    sha = up.commit({"after-wipe": "x\n"}, "after wipe", name="app")
    git_client("clone", "-q", d.url("/git/app"), str(tmp_path / "c2"), home=home)
    assert git("rev-parse", "HEAD", cwd=tmp_path / "c2") == sha
    assert up.count("app", "git-upload-pack", "POST") == 2
    git("fsck", "--strict", cwd=tmp_path / "c2")


def test_corrupt_mirror_is_recloned(git_upstream_factory: Any, daemon_factory: Any, tmp_path: Path) -> None:
    up: GitUpstream = git_upstream_factory()
    up.create("app", files={f"f{i}.txt": f"{i}\n" * 200 for i in range(20)})
    d = daemon_factory(extra=git_daemon_config({"app": up.url("app")}, maintenance_interval="1s", fsck_interval="1s"))
    home = tmp_path / "home"
    git_client("clone", "-q", d.url("/git/app"), str(tmp_path / "c1"), home=home)
    (mirror,) = mirror_dirs(d)
    packs = eventually(lambda: list((mirror / "objects" / "pack").glob("*.bitmap")) and
                       list((mirror / "objects" / "pack").glob("pack-*.pack")), timeout=30)
    pack = packs[0]
    ino = pack.stat().st_ino
    with open(pack, "r+b") as f:
        f.seek(pack.stat().st_size // 2)
        f.write(b"\x00" * 256)

    def recloned() -> bool:
        try:
            return all(p.stat().st_ino != ino for p in (mirror / "objects" / "pack").glob("pack-*.pack"))
        except OSError:
            return False

    eventually(recloned, timeout=40, message="the corrupt mirror was not re-cloned")
    eventually(lambda: list((mirror / "objects" / "pack").glob("*.bitmap")), timeout=30)
    git("fsck", cwd=mirror)
    git_client("clone", "-q", d.url("/git/app"), str(tmp_path / "c2"), home=home)
    git("fsck", "--strict", cwd=tmp_path / "c2")
    assert "re-cloning" in d.log()


def test_repos_from_the_environment(git_upstream_factory: Any, daemon_factory: Any, tmp_path: Path) -> None:
    up: GitUpstream = git_upstream_factory()
    up.create("app")
    up.create("lib")
    d = daemon_factory(extra=git_daemon_config(), env={
        "GITCACHE_REPOS": f"app={up.url('app')}, lib={up.url('lib')}", "FETCH_INTERVAL": "1s"})
    home = tmp_path / "home"
    git_client("clone", "-q", d.url("/git/lib.git"), str(tmp_path / "lib"), home=home)
    assert git("rev-parse", "HEAD", cwd=tmp_path / "lib") == up.rev("refs/heads/main", "lib")
    listed = repos(d)
    assert {listed["app"]["source"], listed["lib"]["source"]} == {"env"}
    assert listed["lib"]["cloned"] and not listed["app"]["cloned"]  # mirrors are made on first use
    # FETCH_INTERVAL=1s overrides the harness's hour: the loop keeps lib fresh
    sha = up.commit({"n": "1\n"}, "n", name="lib")
    eventually(lambda: ls_remote(d.url("/git/lib"), home).get("refs/heads/main") == sha, timeout=30)


def test_stop_is_not_held_by_a_fetch_hanging_on_a_silent_upstream(daemon_factory: Any) -> None:
    # An upstream that accepts and then never answers: libgit2 would wait its
    # 120 s I/O timeout, and stopping the daemon used to wait for it.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(silent.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/org/app.git"
    d = daemon_factory(extra=git_daemon_config({"slow": url}), server={"shutdown_timeout": "2s"})

    def call() -> None:
        try:
            d.request("POST", "/git/refresh?name=slow", timeout=120)
        except OSError:
            pass  # cut off by the stop

    threading.Thread(target=call, daemon=True).start()
    try:
        eventually(lambda: held, message="the daemon never reached the upstream")
        assert d.stop(timeout=40) == 0
    finally:
        silent.close()
        for c in held:
            c.close()
