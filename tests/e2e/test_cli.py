"""Every ``sparkcache`` command against a running daemon (``twistd sparkcache``)
with real upstreams: a file server for a generic remote and ``git
http-backend`` for a git mirror. The CLI runs as operators run it, a separate
process (``python -m sparkcache.cli``, what the console script calls).

The git snippet is consumed by a real git: after ``sparkcache setup git``,
cloning the forge's URL is served by the cache (the forge is stopped), and the
push URL is still the forge's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from tests.support.client import get_until_hit
from tests.support.daemon import REPO_ROOT, Daemon, daemon_env, free_port, twistd_command
from tests.support.git_upstream import (  # noqa: F401 - fixture
    GitUpstream,
    git,
    git_client,
    git_daemon_config,
    git_upstream_factory,
)
from tests.support.upstream import Upstream

ADMIN = "cli-admin-0c4d7e"


def cli(d: Daemon, *args: str, token: str | None = ADMIN, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = daemon_env({"SPARKCACHE_URL": d.base_url, **({"SPARKCACHE_ADMIN_TOKEN": token} if token else {}),
                          **(env or {})})
    proc = subprocess.run([sys.executable, "-m", "sparkcache.cli", *args], env=environ, capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)
    if check:
        assert proc.returncode == 0, f"sparkcache {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def start(upstream: Upstream, gitup: GitUpstream, daemon_factory: Callable[..., Daemon]) -> Daemon:
    gitup.create("app", files={"README": "through the cache\n"})
    upstream.add("/a.bin", b"a" * 5000)
    upstream.add("/b.bin", b"b" * 3000)
    return daemon_factory(
        {"files": {"type": "generic", "upstream": upstream.base_url}},
        auth={"tokens": [{"name": "ops", "token_env": "CLI_TEST_ADMIN", "scopes": ["admin"]}]},
        env={"CLI_TEST_ADMIN": ADMIN},
        extra=git_daemon_config({"app": gitup.url("app")}, allowed_hosts=[gitup.base_url]),
    )


def test_every_command_against_a_running_daemon(upstream: Upstream, daemon_factory: Callable[..., Daemon],
                                                git_upstream_factory: Callable[..., GitUpstream],  # noqa: F811
                                                tmp_path: Path) -> None:
    gitup = git_upstream_factory()
    d = start(upstream, gitup, daemon_factory)

    # prefetch: the files are fetched once, now; a path upstream lacks fails the command.
    out = cli(d, "prefetch", "files", "a.bin", "b.bin").stdout
    assert "2 cached, 0 failed" in out, out
    assert upstream.count("/a.bin") == 1 and upstream.count("/b.bin") == 1, upstream.describe()
    missing = cli(d, "prefetch", "--json", "files", "nope.bin", check=False)
    assert missing.returncode == 1 and json.loads(missing.stdout)["results"][0]["code"] == 404
    get_until_hit(d, "/api/files/a.bin", b"a" * 5000)
    assert upstream.count("/a.bin") == 1

    # status: health and the counts of the requests above.
    status = json.loads(cli(d, "status", "--json").stdout)
    assert status["health"]["status"] == "ok" and status["health"]["store_entries"] >= 2
    files = next(r for r in status["remotes"] if r["remote"] == "files")
    assert files["results"].get("hit", 0) >= 1 and files["bytes_from_cache"] >= 5000
    table = cli(d, "status").stdout
    assert "status:" in table and "files" in table and "HIT RATIO" in table

    # remotes
    rows = [ln.split() for ln in cli(d, "remotes").stdout.splitlines()]
    assert rows[0][:2] == ["NAME", "TYPE"] and ["files", "generic", upstream.base_url] == rows[1][:3]
    assert [r["name"] for r in json.loads(cli(d, "remotes", "--json").stdout)["remotes"]] == ["files"]

    # purge: one entry, with the admin token; without it, the daemon's message and exit 1.
    denied = cli(d, "purge", "--remote", "files", "--path", "a.bin", token=None, check=False)
    assert denied.returncode == 1 and denied.stdout == ""
    assert denied.stderr.startswith("sparkcache purge: POST /admin/purge: 401 ") and ADMIN not in denied.stderr
    assert cli(d, "purge", "--remote", "files", "--path", "a.bin").stdout == "purged 1 entries from files:a.bin\n"
    assert d.get("/api/files/a.bin").header("X-Cache") == "MISS"
    assert upstream.count("/a.bin") == 2
    assert json.loads(cli(d, "purge", "--all", "--json").stdout)["purged"] >= 2

    # git: the mirror, a refresh that brings a new commit.
    assert d.request("POST", "/git/refresh?name=app").status == 200
    repos = json.loads(cli(d, "repos", "--json").stdout)["repos"]
    assert [(r["name"], r["cloned"]) for r in repos] == [("app", True)]
    assert "app" in cli(d, "repos").stdout
    sha = gitup.commit({"NEW": "new\n"}, "second", name="app")
    refreshed = json.loads(cli(d, "refresh", "app", "--json").stdout)
    assert refreshed["refs"]["refs/heads/main"] == sha
    assert cli(d, "refresh", gitup.url("app")).stdout.startswith("refreshed app from ")

    # setup git: a real clone of the forge's URL is served by the cache.
    script = cli(d, "setup", "git").stdout
    home = tmp_path / "home"
    home.mkdir()
    subprocess.run(["sh", "-s"], input=script, text=True, check=True, timeout=60,
                   env={"HOME": str(home), "PATH": os.environ["PATH"], "GIT_CONFIG_NOSYSTEM": "1"})
    gitup.stop()
    clone = tmp_path / "clone"
    git_client("clone", "-q", gitup.url("app"), str(clone), home=home)
    assert git("rev-parse", "HEAD", cwd=clone) == sha
    assert (clone / "NEW").read_text() == "new\n"
    # origin is still the forge's URL, and pushes go there (stopped: refused on its port).
    assert git("config", "remote.origin.url", cwd=clone) == gitup.url("app")
    pushed = git_client("push", "origin", "HEAD:refs/heads/other", cwd=clone, home=home, check=False)
    assert pushed.returncode != 0 and f"127.0.0.1 port {gitup.port}" in pushed.stderr, pushed.stderr
    assert "read-only mirror" not in pushed.stderr

    # setup: errors are the daemon's; the snippet's kinds include git.
    bad = cli(d, "setup", "podman", check=False)
    assert bad.returncode == 1 and "unknown setup kind 'podman'" in bad.stderr and "git" in bad.stderr


def test_unreachable_daemon_and_config_check(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = daemon_factory({"files": {"type": "generic", "upstream": "http://127.0.0.1:9/"}}, start=False)
    d.write_config()
    gone = cli(d, "status", "--url", f"http://127.0.0.1:{free_port()}", check=False)
    assert gone.returncode == 3 and gone.stdout == "" and "cannot reach the daemon" in gone.stderr

    ok = cli(d, "config", "check", str(d.config_path))
    assert ok.stdout.startswith(f"{d.config_path}: OK: 1 remotes (1 generic)")

    bad = tmp_path / "bad.yaml"
    bad.write_text("remotes:\n  files: {type: generic, upstream: 'http://127.0.0.1:9/', colour: blue}\n")
    checked = cli(d, "config", "check", str(bad), check=False)
    assert checked.returncode == 1 and checked.stdout == ""
    line = checked.stderr.strip()
    assert line.startswith("configuration error: ") and "remotes.files.colour" in line
    # The line twistd prints when it refuses to start on the same file.
    twistd = subprocess.run(twistd_command(bad, tmp_path / "twistd.log"), env=daemon_env(), capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert twistd.returncode != 0 and line in twistd.stdout + twistd.stderr, twistd.stdout + twistd.stderr


def test_setup_apt_rewrites_sources_a_real_apt_uses(tmp_path: Path, upstream_factory: Callable[..., Upstream],
                                                    daemon_factory: Callable[..., Daemon]) -> None:
    from tests.e2e.test_apt import PACKAGE, Apt, served_repo

    deb, up, arch = served_repo(tmp_path, upstream_factory)
    d = daemon_factory({"debian": {"type": "deb", "upstream": up.base_url}})

    # A node whose sources name the upstream; /etc/apt of the script's ROOT is the node's apt config.
    apt = Apt(tmp_path / "node", up.base_url, arch)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/apt").symlink_to(apt.base / "etc")
    script = cli(d, "setup", "apt", token=None).stdout
    done = subprocess.run(["sh", "-s"], input=script, text=True, capture_output=True, timeout=60,
                          env={"ROOT": str(root), "PATH": os.environ["PATH"]})
    assert done.returncode == 0 and "rewrote" in done.stdout, done.stderr
    assert (apt.base / "etc/sources.list").read_text() == f"deb [trusted=yes] {d.base_url}/api/debian stable main\n"

    out = apt.run("update").stdout
    assert "Err:" not in out, out
    apt.run("download", PACKAGE, cwd=apt.base / "download")
    assert (apt.base / "download" / deb.name).read_bytes() == deb.read_bytes()
    path = f"/api/debian/pool/main/s/{PACKAGE}/{deb.name}"
    get_until_hit(d, path, deb.read_bytes())
    assert up.count(f"/pool/main/s/{PACKAGE}/{deb.name}") == 1, up.describe()
