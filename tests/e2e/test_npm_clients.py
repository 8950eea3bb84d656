"""npm, pnpm and yarn install a pinned tree with a scoped package through the
cache from a real registry (Verdaccio, ``uplinks: {}``, packages published to
it with the real npm in the module's fixture): cold, then warm with the
registry stopped; a tampered tarball refused; ``npm publish`` to an
``npm-local`` remote shadowing the registry's package of the same name in an
``npm-group``."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest

from tests.support.daemon import Daemon
from tests.support.npm_packages import integrity, make_tarball
from tests.support.npm_registry import (
    Verdaccio, client_env, install, installed_version, make_package, metrics_of, npm_publish, npmrc, project,
)
from tests.support.tools import require_tool, run_checked

pytestmark = pytest.mark.e2e

TOKEN = "e2e-npm-write-7c1"
AUTH = {"anonymous_read": True, "tokens": [{"name": "ci", "token": TOKEN, "scopes": ["read", "write"]}]}
# The registry's packages: a pinned tree with a scoped package in the middle,
# and the public package an attacker published under the internal name.
PACKAGES = [
    ("sc-base", "1.0.0", {}),
    ("sc-base", "1.1.0", {}),
    ("@sc/util", "1.0.0", {"sc-base": "1.0.0"}),
    ("sc-top", "2.0.0", {"@sc/util": "1.0.0"}),
    ("@sc/internal", "5.0.0", {}),
]
TREE = {"sc-top": "2.0.0", "sc-base": "1.1.0"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    require_tool("npm")
    root = tmp_path_factory.mktemp("npm-registry")
    v = Verdaccio(root / "verdaccio").start()
    try:
        for name, version, deps in PACKAGES:
            npm_publish(make_package(root / "packages", name, version, deps), v.url + "/", root / "publisher")
        yield SimpleNamespace(verdaccio=v)
    finally:
        v.stop()


def remotes(url: str) -> dict[str, Any]:
    return {
        "npm": {"type": "npm", "upstream": url},
        "internal": {"type": "npm-local"},
        "all": {"type": "npm-group", "members": ["internal", "npm"]},
    }


def check_tree(app: Path, client: str) -> None:
    assert installed_version(app, "sc-top") == "2.0.0"
    assert installed_version(app, "sc-base") == "1.1.0"
    if client == "pnpm":  # pnpm links dependencies of dependencies out of its store
        util = (app / "node_modules" / "sc-top").resolve().parent / "@sc" / "util"
    else:
        util = app / "node_modules" / "@sc" / "util"
        nested = app / "node_modules" / "@sc" / "util" / "node_modules" / "sc-base"
        assert installed_version(nested.parent.parent, "sc-base") == "1.0.0"
    assert json.loads((util / "package.json").read_text())["version"] == "1.0.0"


@pytest.mark.parametrize("client", ["npm", "pnpm", "yarn"])
def test_cold_then_warm_with_the_registry_stopped(client: str, registry: SimpleNamespace,
                                                  daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    v = registry.verdaccio.ensure_running()
    d = daemon_factory(remotes(v.url))
    url = d.url("/npm/npm/")
    cold = project(tmp_path / "cold", TREE)
    install(client, cold, url, tmp_path / "home-cold")
    check_tree(cold, client)
    m = d.get("/metrics").body.decode()
    assert metrics_of(m, remote="npm", form="tarball", result="miss") >= 4, m
    # npm asks for full packuments, pnpm and yarn for abbreviated ones.
    form = "packument" if client == "npm" else "abbreviated"
    assert metrics_of(m, remote="npm", form=form, result="miss") >= 3, m
    # The registry goes away: a fresh client (empty cache) installs from the cache alone.
    v.stop()
    warm = project(tmp_path / "warm", TREE)
    install(client, warm, url, tmp_path / "home-warm")
    check_tree(warm, client)
    m = d.get("/metrics").body.decode()
    assert metrics_of(m, remote="npm", form="tarball", result="hit") >= 4, m
    packuments = metrics_of(m, remote="npm", form="packument", result="hit") + \
        metrics_of(m, remote="npm", form="abbreviated", result="hit")
    assert packuments >= 3, m


def test_a_tarball_that_does_not_match_its_integrity_is_refused(upstream: Any, daemon_factory: Callable[..., Daemon],
                                                               tmp_path: Path) -> None:
    real = make_tarball("sc-bad", "1.0.0")
    evil = make_tarball("sc-bad", "1.0.0", files={"postinstall.js": b"steal()"})
    tarball = "/sc-bad/-/sc-bad-1.0.0.tgz"
    doc = {"name": "sc-bad", "dist-tags": {"latest": "1.0.0"}, "versions": {"1.0.0": {
        "name": "sc-bad", "version": "1.0.0",
        "dist": {"tarball": upstream.base_url + tarball, "integrity": integrity(real),
                 "shasum": hashlib.sha1(real).hexdigest()}}}}
    upstream.add("/sc-bad", json.dumps(doc).encode(), content_type="application/json")
    upstream.add(tarball, evil, content_type="application/octet-stream")
    d = daemon_factory({"npm": {"type": "npm", "upstream": upstream.base_url}})
    app = project(tmp_path / "app", {"sc-bad": "1.0.0"})
    proc = install("npm", app, d.url("/npm/npm/"), tmp_path / "home", check=False)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert not (app / "node_modules" / "sc-bad").exists()
    # Nothing was kept: asking again goes upstream again, and fails again.
    before = upstream.count(tarball)
    resp = d.get("/npm/npm/sc-bad/-/sc-bad-1.0.0.tgz")
    assert resp.status != 200 or resp.body != evil
    assert upstream.count(tarball) == before + 1
    assert "digest mismatch" in d.log()


def test_publish_to_a_local_remote_shadows_the_registry_in_a_group(registry: SimpleNamespace,
                                                                  daemon_factory: Callable[..., Daemon],
                                                                  tmp_path: Path) -> None:
    v = registry.verdaccio.ensure_running()
    d = daemon_factory(remotes(v.url), auth=AUTH)
    npm = require_tool("npm")
    local = d.url("/npm/internal/")
    home = tmp_path / "publisher"
    npm_publish(make_package(tmp_path / "pkg", "@sc/internal", "1.0.0"), local, home, token=TOKEN)
    # Republishing the same version is refused, as on the registry.
    again = make_package(tmp_path / "again", "@sc/internal", "1.0.0")
    rc = npmrc(home / "again.npmrc", local, TOKEN)
    env = client_env(home)
    proc = subprocess.run([npm, "publish", "--userconfig", str(rc), "--registry", local],
                          cwd=again, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "previously published" in proc.stderr, proc.stderr[-1500:]
    # whoami, ping and dist-tag work against the local remote.
    who = run_checked([npm, "whoami", "--userconfig", str(rc), "--registry", local], env=env)
    assert who.stdout.strip() == "ci"
    run_checked([npm, "ping", "--userconfig", str(rc), "--registry", local], env=env)
    run_checked([npm, "dist-tag", "add", "@sc/internal@1.0.0", "stable", "--userconfig", str(rc),
                 "--registry", local], env=env)
    tags = run_checked([npm, "dist-tag", "ls", "@sc/internal", "--userconfig", str(rc), "--registry", local], env=env)
    assert "stable: 1.0.0" in tags.stdout
    # Through the group the internal package wins, though the registry has 5.0.0.
    group = d.url("/npm/all/")
    view = run_checked([npm, "view", "@sc/internal", "versions", "--json", "--userconfig", str(rc),
                        "--registry", group, "--cache", str(home / "view-cache")], env=env)
    assert json.loads(view.stdout) in (["1.0.0"], "1.0.0")
    for client in ("npm", "pnpm", "yarn"):
        app = project(tmp_path / f"app-{client}", {"@sc/internal": "*", "sc-top": "2.0.0"})
        install(client, app, group, tmp_path / f"home-{client}")
        assert installed_version(app, "@sc/internal") == "1.0.0", client
        assert installed_version(app, "sc-top") == "2.0.0", client
    # The registry itself still has (and through its own remote serves) 5.0.0.
    direct = d.get("/npm/npm/@sc%2finternal", {"Accept": "application/json"}).json()
    assert "5.0.0" in direct["versions"]


def test_npm_search_and_ping_through_the_cache(registry: SimpleNamespace, daemon_factory: Callable[..., Daemon],
                                               tmp_path: Path) -> None:
    v = registry.verdaccio.ensure_running()
    d = daemon_factory(remotes(v.url))
    npm = require_tool("npm")
    home = tmp_path / "home"
    for remote in ("npm", "all"):
        rc = npmrc(home / f"{remote}.npmrc", d.url(f"/npm/{remote}/"))
        found = run_checked([npm, "search", "sc-base", "--json", "--userconfig", str(rc),
                             "--cache", str(home / "cache")], env=client_env(home))
        assert "sc-base" in [p["name"] for p in json.loads(found.stdout)], found.stdout
        run_checked([npm, "ping", "--userconfig", str(rc)], env=client_env(home))
    m = d.get("/metrics").body.decode()
    assert 'sparkcache_requests_total{remote="npm",result="pass"} 2.0' in m, m
