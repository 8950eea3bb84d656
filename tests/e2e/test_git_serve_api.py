"""Registration with tokens, GET /repos, allow-listed hosts (each with its own daemon config)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.support.git_upstream import (  # noqa: F401 - fixture
    GitUpstream,
    git,
    git_client,
    git_daemon_config,
    git_upstream_factory,
)

WRITE = "w-7d1c0f5e"
READ = "r-42b9a3c1"
ADMIN = "a-0e77b2d4"
AUTH = {"anonymous_read": False, "tokens": [{"name": "ci", "token_env": "T_READ", "scopes": ["read"]},
                                           {"name": "ops", "token_env": "T_WRITE", "scopes": ["write"]},
                                           {"name": "root", "token_env": "T_ADMIN", "scopes": ["admin"]}]}
TOKENS = {"T_READ": READ, "T_WRITE": WRITE, "T_ADMIN": ADMIN}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def up(git_upstream_factory: Any) -> GitUpstream:
    u: GitUpstream = git_upstream_factory()
    u.create("tool", files={"tool.py": "print('hi')\n"})
    return u


def test_register_then_clone(up: GitUpstream, daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(auth=AUTH, env=TOKENS, extra=git_daemon_config())
    url = quote(up.url("tool"), safe="")
    path = f"/git/register?name=tool&repo={url}"
    assert d.request("POST", path).status == 401
    r = d.request("POST", path, headers=bearer(READ))
    assert r.status == 403, r.describe()
    # 127.0.0.1:<port> is not in git.allowed_hosts: a write token may not add it.
    r = d.request("POST", path, headers=bearer(WRITE))
    assert r.status == 403 and "admin" in json.loads(r.body)["error"], r.describe()
    r = d.request("POST", path, headers=bearer(ADMIN))
    assert r.status == 201, r.describe()
    assert json.loads(r.body) == {"name": "tool", "url": up.url("tool"), "created": True}
    # Same registration again (now known, so write will do): fine, not created.
    r = d.request("POST", path, headers=bearer(WRITE))
    assert r.status == 200 and json.loads(r.body)["created"] is False, r.describe()
    # The name is taken by another URL.
    r = d.request("POST", f"/git/register?name=tool&repo={quote(up.url('other'), safe='')}", headers=bearer(ADMIN))
    assert r.status == 409 and r.header("Content-Type") == "application/json", r.describe()
    r = d.request("POST", "/git/register?name=x&repo=ftp%3A%2F%2Fh%2Fr", headers=bearer(WRITE))
    assert r.status == 400, r.describe()

    home = tmp_path / "home"
    base = d.url("/git/tool").replace("http://", f"http://ci:{READ}@")
    git_client("clone", "-q", base, str(tmp_path / "c"), home=home)
    assert git("rev-parse", "HEAD", cwd=tmp_path / "c") == up.rev("refs/heads/main", "tool")
    # Without credentials git gets a Basic challenge and (no prompt here) fails.
    p = git_client("clone", "-q", d.url("/git/tool"), str(tmp_path / "c2"), home=home, check=False)
    assert p.returncode != 0
    r = d.get("/git/tool/info/refs?service=git-upload-pack")
    assert r.status == 401 and "Basic" in (r.header("WWW-Authenticate") or ""), r.describe()

    r = d.get("/repos", headers=bearer(READ))
    assert r.status == 200, r.describe()
    repos = {x["name"]: x for x in json.loads(r.body)}
    assert repos["tool"]["url"] == up.url("tool") and repos["tool"]["cloned"] is True
    # The registration survives a restart.
    d.restart()
    git_client("clone", "-q", base, str(tmp_path / "c3"), home=home)


def test_allowed_host_mirrors_on_first_use(up: GitUpstream, daemon_factory: Any, tmp_path: Path) -> None:
    host = f"127.0.0.1:{up.port}"
    d = daemon_factory(extra=git_daemon_config(allowed_hosts=[f"http://{host}"]))
    c = tmp_path / "c"
    git_client("clone", "-q", d.url(f"/git/{host}/tool.git"), str(c), home=tmp_path / "home")
    assert git("rev-parse", "HEAD", cwd=c) == up.rev("refs/heads/main", "tool")
    assert f"{host}/tool" in {x["name"] for x in json.loads(d.get("/repos").body)}
    # The insteadOf recipe from docs/git.rst
    home = tmp_path / "home2"
    git_client("config", "--global", f"url.{d.url('/git/' + host + '/')}.insteadOf", f"http://{host}/", home=home)
    git_client("clone", "-q", up.url("tool"), str(tmp_path / "c2"), home=home)
    assert up.count("tool", "git-upload-pack", "POST") == 1, up.describe()
    # Hosts not on the list are unknown, and never contacted.
    r = d.get("/git/example.org/org/repo.git/info/refs?service=git-upload-pack")
    assert r.status == 404 and r.header("Content-Type") == "application/json", r.describe()


def test_fetch_loop_brings_upstream_commits(up: GitUpstream, daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(extra=git_daemon_config({"tool": up.url("tool")}, fetch_interval="1s"))
    home = tmp_path / "home"
    c = tmp_path / "c"
    git_client("clone", "-q", d.url("/git/tool"), str(c), home=home)
    sha = up.commit({"later.txt": "later\n"}, "later", name="tool")
    # No refresh call, no fetch by id: the background loop picks the commit up.
    deadline = time.monotonic() + 60
    while True:
        out = git_client("ls-remote", d.url("/git/tool"), "refs/heads/main", home=home).stdout
        if out.startswith(sha):
            break
        assert time.monotonic() < deadline, f"the fetch loop never brought {sha}: {out}\n{up.describe()}"
        time.sleep(0.2)
    git_client("pull", "-q", "--ff-only", cwd=c, home=home)
    assert git("rev-parse", "HEAD", cwd=c) == sha
