"""A daemon without git configuration never imports pygit2 until something
needs the git apps; one with git configured builds them at start, as before.

The import check runs in a fresh interpreter (this test process has pygit2
loaded by other tests): it builds and starts the service from a config file,
as ``twistd sparkcache`` does, and reports ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
import yaml

from sparkcache.protocols.git.lazy import LazyResource
from tests.support.harness import MakeHarness, harness_factory  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]

# Starts the daemon from a config file on 127.0.0.1:0, waits until it listens,
# reports whether pygit2 is loaded, then (with "touch") makes one request to
# /repos over the socket and reports again, with that request's status.
DAEMON = r"""
import json, sys
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from sparkcache.protocols import load_config
from sparkcache.service import SparkcacheService

path, touch = sys.argv[1], sys.argv[2] == "touch"
svc = SparkcacheService(load_config(path, environ={}), reactor, config_path=path, environ={})
out = {}

async def main():
    svc.startService()
    await svc.ready
    out["ready"] = "pygit2" in sys.modules
    if touch:
        from twisted.web.client import Agent, readBody
        port = svc.listeners[0]._waitingForPort.result.getHost().port
        r = await Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/repos" % port)
        await readBody(r)
        out["status"] = r.code
        out["touched"] = "pygit2" in sys.modules
    await svc.stopService()

def done(result):
    print(json.dumps(out))
    reactor.stop()
    return result

reactor.callWhenRunning(lambda: ensureDeferred(main()).addBoth(done))
reactor.run()
"""


def run_daemon(tmp_path: Path, git: dict[str, Any] | None, touch: bool = False) -> dict[str, Any]:
    cfg = yaml.safe_load((ROOT / "etc" / "cache.yaml").read_text())
    cfg.pop("git", None)
    if git is not None:
        cfg["git"] = git
    cfg["storage"]["data_dir"] = str(tmp_path / "data")
    cfg["server"].update(listen=["tcp:0:interface=127.0.0.1"], workers=1, shutdown_timeout="2s")
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKCACHE_", "GITCACHE_"))}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", DAEMON, str(path), "touch" if touch else "-"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_daemon_without_git_does_not_import_pygit2(tmp_path: Path) -> None:
    out = run_daemon(tmp_path, None, touch=True)
    assert out["ready"] is False, "pygit2 was imported by a daemon with no git configuration"
    # The first git request builds the apps, and gets their answer.
    assert out["status"] == 200 and out["touched"] is True


def test_an_empty_git_section_is_no_git(tmp_path: Path) -> None:
    assert run_daemon(tmp_path, {"fetch_interval": "30s", "repos": {}})["ready"] is False


def test_a_daemon_with_git_imports_it_at_start(tmp_path: Path) -> None:
    assert run_daemon(tmp_path, {"allowed_hosts": ["github.com"]})["ready"] is True


def test_mirrors_left_on_disk_build_the_git_apps_at_start(tmp_path: Path) -> None:
    git_dir = tmp_path / "data" / "git"
    git_dir.mkdir(parents=True)
    (git_dir / "registry.json").write_text(json.dumps({"repos": []}))
    assert run_daemon(tmp_path, None)["ready"] is True


@pytest_twisted.ensureDeferred
async def test_the_first_request_builds_the_apps(harness_factory: MakeHarness) -> None:
    h = await harness_factory({})
    assert isinstance(h.svc.root.apps[b"git"], LazyResource)
    assert "git" not in h.svc.runtime.namedServices
    assert not h.svc.setup.endpoints["git"].is_offered()
    r = await h.get("/repos")
    assert r.status == 200 and json.loads(r.body) == []
    git = h.svc.runtime.namedServices["git"]
    assert git.running, "the git service built on first use was not started"
    r = await h.get("/git/nothing/info/refs?service=git-upload-pack")
    assert r.status == 404


@pytest_twisted.ensureDeferred
async def test_a_reload_that_configures_git_builds_the_apps(harness_factory: MakeHarness, tmp_path: Path) -> None:
    from sparkcache.protocols import load_config_data
    from tests.support.git_upstream import FileUpstream

    h = await harness_factory({})
    assert "git" not in h.svc.runtime.namedServices
    up = FileUpstream(tmp_path / "up", branch="main")
    new = load_config_data({"storage": {"data_dir": str(h.config.storage.data_dir)},
                            "git": {"repos": {"app": up.url}}}, "reload.yaml", {})
    h.svc.reconfigure(new)
    mirrors = h.svc.runtime.namedServices["git"].mirrors
    assert [m.name for m in mirrors.mirrors()] == ["app"]
    assert h.svc.setup.endpoints["git"].is_offered()
    r = await h.get("/repos")
    assert r.status == 200 and [m["name"] for m in json.loads(r.body)] == ["app"]
    for m in mirrors.mirrors():
        await mirrors.idle(m)


@pytest_twisted.ensureDeferred
async def test_with_workers_the_primary_builds_the_apps_when_another_registers(harness_factory: MakeHarness) -> None:
    """The fetch loop runs in the primary: a mirror another worker registers
    (``POST /git/register`` writes registry.json) must reach it without a request."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from sparkcache.protocols.git.lazy import REGISTRY_POLL

    h = await harness_factory({"server": {"workers": 2}})
    h.clock.advance(REGISTRY_POLL)
    await deferLater(reactor, 0.05, lambda: None)
    assert "git" not in h.svc.runtime.namedServices
    git_dir = Path(h.config.storage.data_dir) / "git"
    git_dir.mkdir(parents=True, exist_ok=True)
    (git_dir / "registry.json").write_text(json.dumps({"repos": [
        {"name": "app", "url": "https://git.example/org/app.git", "source": "runtime"}]}))
    for _ in range(50):
        h.clock.advance(REGISTRY_POLL)
        await deferLater(reactor, 0.02, lambda: None)
        if "git" in h.svc.runtime.namedServices:
            break
    git = h.svc.runtime.namedServices["git"]
    assert git.running and git.mirrors.primary
    assert [m.name for m in git.mirrors.mirrors()] == ["app"]
