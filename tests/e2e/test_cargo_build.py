"""The real cargo against a sparse registry through the cache: crates made by
``cargo package`` in the test, served by a local upstream that plays crates.io
(mirror mode, ``replace-with``) or a named registry; a cold fetch and build,
a warm build with a fresh CARGO_HOME and the upstream stopped, and a tampered
crate refused with nothing kept."""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.support.cargo_registry import (
    Crate, CrateSpec, Toolchain, cargo_toolchain, dl_path, index_path, mirror_config, package_crates, publish,
    registry_config, run_cargo, write_config, write_project,
)
from tests.support.daemon import Daemon
from tests.support.upstream import Upstream

SPECS = [
    CrateSpec("leafa", "0.1.0", body="pub fn a() -> u32 { 40 }\n"),
    CrateSpec("midb", "0.2.0", {"leafa": "0.1"}, body="pub fn b() -> u32 { leafa::a() + 1 }\n"),
    CrateSpec("topc", "0.3.1", {"midb": "0.2", "leafa": "0.1"},
              body="pub fn answer() -> u32 { midb::b() + leafa::a() / 40 }\n"),
]
MAIN = 'fn main() { println!("answer={}", topc::answer()); }\n'


@pytest.fixture(scope="module")
def tools() -> Toolchain:
    return cargo_toolchain()


@pytest.fixture(scope="module")
def crates(tools: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> list[Crate]:
    return package_crates(tools, tmp_path_factory.mktemp("crates-src"), SPECS)


def cache_index(d: Daemon, remote: str = "crates") -> str:
    return f"{d.base_url}/cargo/{remote}/index/"


def start(daemon_factory: Callable[..., Daemon], upstream: Upstream, **cache: Any) -> Daemon:
    remote: dict[str, Any] = {"type": "cargo", "upstream": upstream.base_url + "/index"}
    if cache:
        remote["cache"] = cache
    return daemon_factory({"crates": remote})


def lock_checksums(project: Path) -> dict[str, str]:
    lock = tomllib.loads((project / "Cargo.lock").read_text())
    return {p["name"]: p["checksum"] for p in lock["package"] if "checksum" in p}


def crate_requests(upstream: Upstream, crates: list[Crate]) -> dict[str, int]:
    return {c.spec.name: upstream.count(dl_path(c)) for c in crates}


def stored_digests(d: Daemon) -> set[str]:
    return {f for _dir, _dirs, files in os.walk(d.data_dir) for f in files if re.fullmatch(r"[0-9a-f]{64}", f)}


def test_mirror_mode_fetch_build_and_warm_build_with_upstream_stopped(
        tools: Toolchain, crates: list[Crate], upstream: Upstream, daemon_factory: Callable[..., Daemon],
        tmp_path: Path) -> None:
    publish(upstream, crates)
    # Index files expire at once: every cargo question is revalidated upstream,
    # and with the upstream gone the stored index is what answers.
    d = start(daemon_factory, upstream, mutable_ttl="0s")
    project = write_project(tmp_path / "app", {"topc": "0.3"}, body=MAIN)
    home = tmp_path / "cargo-home"
    write_config(home, mirror_config(cache_index(d)))

    run_cargo(tools, ["fetch"], project, home)
    assert crate_requests(upstream, crates) == {"leafa": 1, "midb": 1, "topc": 1}
    # the lock file keeps crates.io as the source, with the cache's bytes' sums: the index's
    assert lock_checksums(project) == {c.spec.name: c.cksum for c in crates}
    built = run_cargo(tools, ["run", "--quiet"], project, home)
    assert built.stdout.strip() == "answer=42"
    # cargo asked for config.json and the index files through the cache, never elsewhere
    for c in crates:
        assert upstream.count(f"/index/{index_path(c.spec.name)}") >= 1
    assert {r.path for r in upstream.requests} <= (
        {"/index/config.json"} | {f"/index/{index_path(c.spec.name)}" for c in crates}
        | {dl_path(c) for c in crates})

    # a second run from the same CARGO_HOME: cargo revalidates its index copy (304s), downloads nothing
    run_cargo(tools, ["fetch"], project, home)
    assert crate_requests(upstream, crates) == {"leafa": 1, "midb": 1, "topc": 1}

    # warm: upstream stopped, a fresh CARGO_HOME (nothing downloaded), no lock file
    upstream.stop()
    (project / "Cargo.lock").unlink()
    fresh = tmp_path / "cargo-home-2"
    write_config(fresh, mirror_config(cache_index(d)))
    run_cargo(tools, ["fetch"], project, fresh)
    rebuilt = run_cargo(tools, ["run", "--quiet"], project, fresh, timeout=180)
    assert rebuilt.stdout.strip() == "answer=42"
    assert lock_checksums(project) == {c.spec.name: c.cksum for c in crates}


def test_named_registry_mode(tools: Toolchain, crates: list[Crate], upstream: Upstream,
                             daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    publish(upstream, crates)
    d = start(daemon_factory, upstream)
    project = write_project(tmp_path / "app", {"topc": "0.3"}, registry="sparkreg", body=MAIN)
    home = tmp_path / "cargo-home"
    # no crates.io replacement: a dependency of a registry crate must come from the same registry
    write_config(home, registry_config("sparkreg", cache_index(d)))
    run_cargo(tools, ["fetch"], project, home)
    built = run_cargo(tools, ["run", "--quiet"], project, home, timeout=180)
    assert built.stdout.strip() == "answer=42"
    assert crate_requests(upstream, crates) == {"leafa": 1, "midb": 1, "topc": 1}
    lock = (project / "Cargo.lock").read_text()
    assert f'source = "sparse+{cache_index(d)}"' in lock

    # the /setup snippet is a config cargo accepts as it is
    snippet = d.get("/setup/cargo?mode=registry")
    assert snippet.status == 200, snippet.describe()
    other = tmp_path / "cargo-home-setup"
    write_config(other, snippet.body.decode())
    project2 = write_project(tmp_path / "app2", {"topc": "0.3"}, registry="crates", body=MAIN)
    run_cargo(tools, ["fetch"], project2, other)
    assert crate_requests(upstream, crates) == {"leafa": 1, "midb": 1, "topc": 1}


def test_setup_mirror_snippet_is_what_cargo_uses(tools: Toolchain, crates: list[Crate], upstream: Upstream,
                                                 daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    publish(upstream, crates)
    d = start(daemon_factory, upstream)
    snippet = d.get("/setup/cargo")
    assert snippet.status == 200 and snippet.header("X-Install-Path") == "~/.cargo/config.toml"
    home = tmp_path / "cargo-home"
    write_config(home, snippet.body.decode())
    project = write_project(tmp_path / "app", {"midb": "0.2"})
    run_cargo(tools, ["fetch"], project, home)
    assert crate_requests(upstream, crates) == {"leafa": 1, "midb": 1, "topc": 0}


def test_tampered_crate_is_refused_and_nothing_is_kept(tools: Toolchain, crates: list[Crate], upstream: Upstream,
                                                       daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    publish(upstream, crates, tamper="midb")
    d = start(daemon_factory, upstream)
    project = write_project(tmp_path / "app", {"midb": "0.2"})
    home = tmp_path / "cargo-home"
    write_config(home, mirror_config(cache_index(d)))
    failed = run_cargo(tools, ["fetch"], project, home, check=False)
    assert failed.returncode != 0, failed.stdout + failed.stderr
    assert "midb" in failed.stderr
    midb = next(c for c in crates if c.spec.name == "midb")
    bad = midb.data[:-1] + bytes([midb.data[-1] ^ 0xFF])
    assert hashlib.sha256(bad).hexdigest() not in stored_digests(d)
    assert not (home / "registry" / "cache").exists() or not any(
        f.name.startswith("midb") for f in (home / "registry" / "cache").rglob("*.crate"))
    # asked again, the cache goes upstream again (nothing was kept); fixed upstream, it works
    tries = upstream.count(dl_path(midb))
    publish(upstream, crates)
    run_cargo(tools, ["fetch"], project, home)
    assert upstream.count(dl_path(midb)) == tries + 1
    assert midb.cksum in stored_digests(d)
