"""A cargo sparse registry built in a test: crates made by the real
``cargo package``, index lines with their ``cksum``, a ``config.json``,
served by tests/support's upstream on 127.0.0.1; and cargo itself, isolated
(its own CARGO_HOME and HOME in a tmp dir, nothing read from ``~/.cargo``).

::

    tools = cargo_toolchain()                       # skips (fails on CI) without cargo
    crates = package_crates(tools, tmp / "src", CRATES)
    publish(upstream, crates)                       # /index/... and /dl/... on the upstream
    project = write_project(tmp / "app", {"topc": "0.3"})
    run_cargo(tools, ["fetch"], project, home)      # with home/config.toml written by the test
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.tools import require_tool, run_checked
from tests.support.upstream import Upstream

# Sparse registries are stable since 1.68; Debian's cargo is older.
MIN_CARGO = (1, 68)
INDEX = "/index"
# Upstream's dl template: markers in it, so the cache must expand them as cargo would.
DL = "/dl/{prefix}/{crate}/{crate}-{version}.crate"


@dataclass(frozen=True)
class Toolchain:
    cargo: str
    bin_dir: str
    version: tuple[int, int]


@dataclass(frozen=True)
class CrateSpec:
    name: str
    version: str
    deps: dict[str, str] = field(default_factory=dict)  # name -> version requirement
    body: str = ""


@dataclass(frozen=True)
class Crate:
    spec: CrateSpec
    data: bytes

    @property
    def cksum(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def cargo_toolchain() -> Toolchain:
    """The real toolchain's bin directory (not rustup's proxies, which would need
    ~/.rustup and read ~/.cargo): cargo and rustc run from there directly."""
    require_tool("cargo", "the e2e tests drive the real cargo")
    rustc = require_tool("rustc", "cargo build needs rustc")
    sysroot = subprocess.run([rustc, "--print", "sysroot"], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL).stdout.strip()
    bin_dir = os.path.join(sysroot, "bin") if sysroot else os.path.dirname(rustc)
    cargo = os.path.join(bin_dir, "cargo")
    out = subprocess.run([cargo, "--version"], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL, env=clean_env(bin_dir)).stdout
    m = re.search(r"cargo (\d+)\.(\d+)", out)
    version = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if version < MIN_CARGO:
        require_tool("cargo-with-sparse-registries",
                     f"cargo {out.strip() or '?'} is older than {MIN_CARGO}: no sparse registries")
    return Toolchain(cargo, bin_dir, version)


def clean_env(bin_dir: str, cargo_home: Path | None = None, home: Path | None = None) -> dict[str, str]:
    """An environment that reaches nothing but what the test configures."""
    env = {
        "PATH": os.pathsep.join([bin_dir, "/usr/bin", "/bin"]),
        "LANG": "C.UTF-8",
        "CARGO_TERM_COLOR": "never",
        "CARGO_TERM_PROGRESS_WHEN": "never",
        "CARGO_REGISTRIES_CRATES_IO_PROTOCOL": "sparse",
        "CARGO_NET_RETRY": "0",
        "CARGO_HTTP_TIMEOUT": "60",
        "CARGO_INCREMENTAL": "0",
    }
    if cargo_home is not None:
        env["CARGO_HOME"] = str(cargo_home)
    if home is not None:
        env["HOME"] = str(home)
    return env


def run_cargo(tools: Toolchain, args: list[str], project: Path, cargo_home: Path, check: bool = True,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``cargo <args>`` in ``project`` with its own CARGO_HOME (and a HOME beside it)."""
    home = cargo_home.parent / (cargo_home.name + "-user")
    home.mkdir(parents=True, exist_ok=True)
    env = clean_env(tools.bin_dir, cargo_home, home)
    cmd = [tools.cargo, *args]
    if check:
        return run_checked(cmd, cwd=project, env=env, timeout=timeout)
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def write_config(cargo_home: Path, text: str) -> Path:
    cargo_home.mkdir(parents=True, exist_ok=True)
    path = cargo_home / "config.toml"
    path.write_text(text)
    return path


def mirror_config(index_url: str) -> str:
    """crates.io replaced by ``index_url`` (the test's index plays crates.io)."""
    return ('[source.crates-io]\nreplace-with = "sparkcache"\n\n'
            f'[source.sparkcache]\nregistry = "sparse+{index_url}"\n')


def registry_config(name: str, index_url: str) -> str:
    return f'[registries.{name}]\nindex = "sparse+{index_url}"\n'


def _manifest(name: str, version: str, deps: dict[str, str], registry: str | None = None,
              paths: bool = False) -> str:
    lines = ["[package]", f'name = "{name}"', f'version = "{version}"', 'edition = "2021"',
             'description = "a crate made by the sparkcache tests"', 'license = "MIT"', "", "[dependencies]"]
    for dep, req in deps.items():
        extra = f', path = "../{dep}"' if paths else ""
        extra += f', registry = "{registry}"' if registry else ""
        lines.append(f'{dep} = {{ version = "{req}"{extra} }}')
    return "\n".join(lines) + "\n"


def package_crates(tools: Toolchain, workdir: Path, specs: list[CrateSpec]) -> list[Crate]:
    """``.crate`` files of ``specs`` made by ``cargo package`` offline: one
    workspace, dependencies as path dependencies with versions (cargo packages
    them in order, each resolved against the others, and writes them as
    registry dependencies)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "Cargo.toml").write_text(
        "[workspace]\nresolver = \"2\"\nmembers = [" + ", ".join(f'"{s.name}"' for s in specs) + "]\n")
    for s in specs:
        src = workdir / s.name / "src"
        src.mkdir(parents=True, exist_ok=True)
        (workdir / s.name / "Cargo.toml").write_text(_manifest(s.name, s.version, s.deps, paths=True))
        (src / "lib.rs").write_text(s.body or f"pub fn version() -> &'static str {{ \"{s.version}\" }}\n")
    home = workdir / ".cargo-home"
    run_cargo(tools, ["package", "--workspace", "--no-verify", "--allow-dirty", "--offline"], workdir, home)
    return [Crate(s, (workdir / "target" / "package" / f"{s.name}-{s.version}.crate").read_bytes())
            for s in specs]


def index_path(name: str) -> str:
    n = name.lower()
    return {1: "1", 2: "2", 3: f"3/{n[0]}"}.get(len(n), f"{n[0:2]}/{n[2:4]}") + "/" + n


def prefix(name: str) -> str:
    return {1: "1", 2: "2", 3: f"3/{name[0]}"}.get(len(name), f"{name[0:2]}/{name[2:4]}")


def index_line(crate: Crate) -> bytes:
    s = crate.spec
    deps = [{"name": d, "req": req, "features": [], "optional": False, "default_features": True,
             "target": None, "kind": "normal"} for d, req in s.deps.items()]
    return json.dumps({"name": s.name, "vers": s.version, "deps": deps, "cksum": crate.cksum, "features": {},
                       "yanked": False}).encode()


def dl_path(crate: Crate) -> str:
    s = crate.spec
    return DL.replace("{prefix}", prefix(s.name)).replace("{crate}", s.name).replace("{version}", s.version)


def registry_files(crates: list[Crate], base_url: str, tamper: str | None = None) -> dict[str, tuple[bytes, str]]:
    """{path: (body, content type)} of a sparse registry served at ``base_url``:
    ``/index/config.json``, the index files and the crate files (``tamper``: the
    name of a crate whose file has one byte changed)."""
    files = {f"{INDEX}/config.json": (json.dumps({"dl": base_url + DL, "api": base_url}).encode(), "application/json")}
    by_name: dict[str, list[Crate]] = {}
    for c in crates:
        by_name.setdefault(c.spec.name, []).append(c)
    for name, versions in by_name.items():
        files[f"{INDEX}/{index_path(name)}"] = (b"".join(index_line(c) + b"\n" for c in versions), "text/plain")
    for c in crates:
        data = c.data if c.spec.name != tamper else c.data[:-1] + bytes([c.data[-1] ^ 0xFF])
        files[dl_path(c)] = (data, "application/x-tar")
    return files


def publish(upstream: Upstream, crates: list[Crate], tamper: str | None = None) -> None:
    """The sparse index and the crate files on ``upstream`` (see :func:`registry_files`)."""
    for path, (data, ctype) in registry_files(crates, upstream.base_url, tamper).items():
        upstream.add(path, data, content_type=ctype)


def write_registry(root: Path, crates: list[Crate], base_url: str) -> None:
    """The same files under ``root``, for a static web server serving it at ``base_url``."""
    for path, (data, _ctype) in registry_files(crates, base_url).items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def write_project(path: Path, deps: dict[str, str], registry: str | None = None, body: str | None = None) -> Path:
    """A binary crate depending on ``deps`` (from ``registry`` when given, else crates.io)."""
    (path / "src").mkdir(parents=True, exist_ok=True)
    manifest = _manifest("sparkcache-cargo-app", "0.1.0", deps, registry).replace("[package]", "[package]\npublish = false", 1)
    (path / "Cargo.toml").write_text(manifest)
    (path / "src" / "main.rs").write_text(body or "fn main() {}\n")
    return path
