"""The real ``go`` builds through the cache's module proxy.

A GOPROXY tree is made in the test (tests/support/go_modules.py: modules
whose paths need ``!`` escaping, a dependency chain) and served by a local
upstream; ``go mod download`` and ``go build`` run with GOPROXY pointing at
the cache, in a private GOPATH/GOMODCACHE/GOCACHE/HOME. Checksums are
verified either not at all (GOSUMDB=off) or against a checksum database of
our own (tests/support/go_sumdb.py) that ``go`` reaches only through the
cache's ``/sumdb/`` proxy.
"""

from __future__ import annotations

import http.client
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from sparkcache.protocols.go.paths import escape
from tests.support.daemon import Daemon
from tests.support.go_modules import APP_OUTPUT, APP_REQUIRES, SAMPLE, WORDS, ModuleVersion, app_module, \
    module_zip, proxy_tree
from tests.support.go_sumdb import SumDB, go_sum_lines
from tests.support.tools import require_tool, run_checked
from tests.support.upstream import Upstream

SUMDB_NAME = "sum.test.example"
WORDS_ZIP = f"{escape(WORDS)}/@v/v0.2.0.zip"


def go_env(home: Path, proxy: str, gosumdb: str = "off") -> dict[str, str]:
    """``go`` isolated in ``home``: nothing of the machine's Go setup, no network but the proxy."""
    env = {
        "PATH": os.environ["PATH"], "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
        "GOPATH": str(home / "gopath"), "GOMODCACHE": str(home / "modcache"), "GOCACHE": str(home / "gocache"),
        "GOFLAGS": "-modcacherw -mod=mod", "GOTOOLCHAIN": "local", "GO111MODULE": "on", "CGO_ENABLED": "0",
        "GOPROXY": proxy, "GOSUMDB": gosumdb, "TMPDIR": str(home / "tmp"),
    }
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return env


def go(args: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    if check:
        return run_checked([require_tool("go"), *args], cwd=cwd, env=env, timeout=300)
    return subprocess.run([require_tool("go"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def serve_tree(up: Upstream, prefix: str, tree: dict[str, bytes]) -> None:
    for tail, data in tree.items():
        up.add(f"{prefix}/{tail}", data)


def build_app(tmp: Path, name: str, env: dict[str, str]) -> str:
    """``go mod download`` then ``go build`` of the sample app; what the program prints."""
    app = tmp / name
    app_module(app, APP_REQUIRES)
    go(["mod", "download"], app, env)
    go(["build", "-o", "app", "."], app, env)
    return run_checked([str(app / "app")], cwd=app, env=env).stdout.strip()


def go_remote(up: Upstream, **extra: Any) -> dict[str, Any]:
    return {"type": "go", "upstream": up.url("/goproxy"), **extra}


def test_go_builds_through_the_cache_and_again_with_the_upstream_down(
        tmp_path: Path, upstream: Upstream, daemon_factory: Callable[..., Daemon]) -> None:
    require_tool("go")
    serve_tree(upstream, "/goproxy", proxy_tree(SAMPLE))
    d = daemon_factory({"golang": go_remote(upstream, sumdb=False)})
    proxy = d.url("/go/golang")
    assert build_app(tmp_path, "cold", go_env(tmp_path / "cold-home", proxy)) == APP_OUTPUT
    fetched = {r.path for r in upstream.requests}
    assert f"/goproxy/{WORDS_ZIP}" in fetched and "/goproxy/example.com/greet/@v/v1.1.0.zip" in fetched
    assert all(r.path.startswith("/goproxy/") for r in upstream.requests)
    assert d.get(f"/go/golang/{WORDS_ZIP}").header("X-Cache") == "HIT"

    # A second machine (empty module and build caches) while the upstream is down.
    before = len(upstream.requests)
    upstream.stop()
    assert build_app(tmp_path, "warm", go_env(tmp_path / "warm-home", proxy)) == APP_OUTPUT
    assert len(upstream.requests) == before
    # What go could not get is a plain-text 404 it understands, not a hang or an HTML page.
    missing = d.get("/go/golang/example.com/missing/@v/list")
    assert missing.status in (502, 504) and missing.header("Content-Type").startswith("text/plain")


def test_go_verifies_modules_against_a_checksum_database_through_the_cache(
        tmp_path: Path, upstream: Upstream, daemon_factory: Callable[..., Daemon]) -> None:
    require_tool("go")
    serve_tree(upstream, "/goproxy", proxy_tree(SAMPLE))
    db = SumDB(SUMDB_NAME, SAMPLE)
    serve_tree(upstream, "/sumdb-good", db.files())
    # The same name and key, but the records of other bytes than the upstream serves.
    forged = [ModuleVersion(mv.module, mv.version, {**mv.files, "extra.go": b"package words\n"})
              if mv.module == WORDS else mv for mv in SAMPLE]
    bad = SumDB(SUMDB_NAME, forged)
    bad._key, bad._hash, bad.gosumdb = db._key, db._hash, db.gosumdb
    serve_tree(upstream, "/sumdb-bad", bad.files())
    d = daemon_factory({
        "golang": go_remote(upstream, sumdb={SUMDB_NAME: upstream.url("/sumdb-good")}),
        "forged": go_remote(upstream, sumdb={SUMDB_NAME: upstream.url("/sumdb-bad")}),
    })
    env = go_env(tmp_path / "home", d.url("/go/golang"), db.gosumdb)
    assert build_app(tmp_path, "app", env) == APP_OUTPUT
    # go checked every module it downloaded against the database, through the cache.
    looked_up = {r.path for r in upstream.requests if r.path.startswith("/sumdb-good/")}
    assert "/sumdb-good/lookup/example.com/!upper/words@v0.2.0" in looked_up, looked_up
    assert "/sumdb-good/lookup/example.com/greet@v1.1.0" in looked_up
    assert any(p.startswith("/sumdb-good/tile/") for p in looked_up)
    go_sum = (tmp_path / "app" / "go.sum").read_text()
    assert go_sum_lines(SAMPLE[1]) in go_sum and go_sum_lines(SAMPLE[3]) in go_sum

    # A database that vouches for other bytes: go refuses the module.
    env = go_env(tmp_path / "home2", d.url("/go/forged"), db.gosumdb)
    app = tmp_path / "refused"
    app_module(app, APP_REQUIRES)
    out = go(["mod", "download", "all"], app, env, check=False)
    assert out.returncode != 0 and "SECURITY ERROR" in out.stderr, out.stderr
    assert any(r.path.startswith("/sumdb-bad/lookup/") for r in upstream.requests)


def test_a_tampered_zip_is_refused_and_never_stored(
        tmp_path: Path, upstream: Upstream, daemon_factory: Callable[..., Daemon]) -> None:
    require_tool("go")
    tree = proxy_tree(SAMPLE)
    words = SAMPLE[1]
    # The right bytes, but filed under another module's prefix.
    tree[WORDS_ZIP] = module_zip(words, prefix="example.com/evil@v0.2.0/")
    serve_tree(upstream, "/goproxy", tree)
    d = daemon_factory({"golang": go_remote(upstream, sumdb=False)})
    env = go_env(tmp_path / "home", d.url("/go/golang"))
    app = tmp_path / "app"
    app_module(app, APP_REQUIRES)
    out = go(["mod", "download", "all"], app, env, check=False)
    assert out.returncode != 0 and "example.com/Upper/words@v0.2.0" in out.stderr, out.stderr
    assert "not caching" in d.log() and "is not under" in d.log()
    assert d.spool_files() == []
    asked = upstream.count(f"/goproxy/{WORDS_ZIP}")
    try:
        resp = d.get(f"/go/golang/{WORDS_ZIP}")
        assert resp.status != 200, resp.describe()
    except (ConnectionError, http.client.IncompleteRead):
        pass  # cut off before the last byte: never a whole bad body
    assert upstream.count(f"/goproxy/{WORDS_ZIP}") == asked + 1  # nothing was kept: asked again
    # Once the upstream serves a real module zip, the same build works.
    upstream.add(f"/goproxy/{WORDS_ZIP}", module_zip(words))
    assert build_app(tmp_path, "fixed", env) == APP_OUTPUT


@pytest.mark.parametrize("path", ["/go/golang/Example.com/x/@v/list", "/go/golang/example.com/x/@v/..%2fx.info",
                                  "/go/golang/example.com/x/@v/master.zip", "/go/golang/sumdb/other.db/supported",
                                  "/go/golang/" + "a." * 300 + "com/@v/list"])
def test_bad_input_is_a_plain_text_4xx_and_reaches_no_upstream(
        path: str, upstream: Upstream, daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory({"golang": go_remote(upstream)})
    resp = d.get(path)
    assert 400 <= resp.status < 500 and resp.header("Content-Type") == "text/plain; charset=utf-8", resp.describe()
    assert upstream.requests == []


def test_go_get_resolves_versions_latest_and_branch_queries_through_the_cache(
        tmp_path: Path, upstream: Upstream, daemon_factory: Callable[..., Daemon]) -> None:
    require_tool("go")
    tree = proxy_tree(SAMPLE)
    tree["example.com/greet/@v/master.info"] = tree["example.com/greet/@v/v1.1.0.info"]
    serve_tree(upstream, "/goproxy", tree)
    d = daemon_factory({"golang": go_remote(upstream, sumdb=False)})
    for n in range(2):  # the second time on a fresh machine: answered from the cache, probes included
        env = go_env(tmp_path / f"home{n}", d.url("/go/golang"))
        app = tmp_path / f"app{n}"
        app_module(app, {})
        versions = go(["list", "-m", "-versions", "example.com/greet"], app, env).stdout.split()
        assert versions == ["example.com/greet", "v1.0.0", "v1.1.0"], versions
        go(["get", "example.com/greet@latest"], app, env)
        assert "example.com/greet v1.1.0" in (app / "go.mod").read_text()
        go(["get", "example.com/greet@master"], app, env)
        assert "example.com/greet v1.1.0" in (app / "go.mod").read_text()
        go(["get", "example.com/greet@v1.0.0"], app, env)
        assert "example.com/greet v1.0.0" in (app / "go.mod").read_text()
    # go probed the parent path of the module it looked for: 404s it took, remembered.
    probes = [r.path for r in upstream.requests if r.path.startswith("/goproxy/example.com/@")]
    assert "/goproxy/example.com/@v/list" in probes and len(probes) == len(set(probes)), upstream.describe()
    assert all(r.status == 404 for r in upstream.requests if r.path in probes)
    for tail in ("example.com/greet/@v/list", "example.com/greet/@v/master.info"):
        assert upstream.count(f"/goproxy/{tail}") == 1, upstream.describe()
