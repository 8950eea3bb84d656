"""Tiny turbo and Nx workspaces for the end-to-end tests, and the isolated
environments their tools run in (no network beyond 127.0.0.1, no login, no
telemetry, nothing read from the invoking user's home).

turbo runs a package's ``build`` script through npm, so npm gets a userconfig
of its own (no update check, offline). Nx needs its own modules in the
workspace: the globally installed ``nx`` package is linked in as
``node_modules/nx`` (nothing is installed from a registry), and a
``project.json`` target with the ``nx:run-commands`` executor (part of
``nx`` itself) needs no ``@nx/...`` plugin.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

# A task output that is different on every real run, so a restored output is
# told from a rebuilt one by its content.
WRITE_OUTPUT = ("node -e \"const fs=require('fs');fs.mkdirSync('dist',{recursive:true});"
                "fs.writeFileSync('dist/out.txt','built '+process.hrtime.bigint()+' '+Math.random())\"")


def base_env(home: Path) -> dict[str, str]:
    """PATH and a fresh HOME; every npm_config_*, TURBO_*, NX_* of the caller dropped."""
    home.mkdir(parents=True, exist_ok=True)
    # turbo's strict env mode hands tasks HOME but not npm_config_*: the
    # settings npm must see live in HOME's own .npmrc too.
    npmrc = home / ".npmrc"
    npmrc.write_text("update-notifier=false\nfund=false\naudit=false\noffline=true\n")
    env = {k: v for k, v in os.environ.items()
           if not k.lower().startswith(("npm_config_", "turbo_", "nx_", "vercel_")) and k not in ("CI",)}
    env.update({
        "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache"),
        "npm_config_userconfig": str(npmrc), "NO_UPDATE_NOTIFIER": "1", "DO_NOT_TRACK": "1",
        "NO_COLOR": "1", "FORCE_COLOR": "0",
    })
    return env


# -- turbo ---------------------------------------------------------------------------------


def turbo_env(home: Path) -> dict[str, str]:
    env = base_env(home)
    env.update({"TURBO_TELEMETRY_DISABLED": "1", "TURBO_NO_UPDATE_NOTIFIER": "1", "TURBO_PRINT_VERSION_DISABLED": "1",
                "TURBO_UI": "false"})
    return env


def npm_version() -> str:
    return subprocess.run(["npm", "--version"], capture_output=True, text=True, check=True,
                          stdin=subprocess.DEVNULL).stdout.strip()


def turbo_workspace(root: Path, signature: bool = False, packages: tuple[str, ...] = ("app",),
                    command: str = WRITE_OUTPUT) -> Path:
    """A monorepo with npm workspaces, one ``build`` task per package that writes
    ``dist/out.txt``, and a hand-written lockfile (turbo parses it to hash
    external dependencies; there are none)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "package.json").write_text(json.dumps({
        "name": "sc-monorepo", "version": "0.0.0", "private": True, "workspaces": ["packages/*"],
        "packageManager": f"npm@{npm_version()}",
    }, indent=2))
    lock_packages: dict[str, dict[str, object]] = {
        "": {"name": "sc-monorepo", "version": "0.0.0", "workspaces": ["packages/*"]}}
    for name in packages:
        pkg = root / "packages" / name
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "package.json").write_text(json.dumps({"name": name, "version": "1.0.0",
                                                      "scripts": {"build": command}}, indent=2))
        (pkg / "index.js").write_text(f"module.exports = {name!r};\n")
        lock_packages[f"packages/{name}"] = {"name": name, "version": "1.0.0"}
        lock_packages[f"node_modules/{name}"] = {"resolved": f"packages/{name}", "link": True}
    (root / "package-lock.json").write_text(json.dumps({
        "name": "sc-monorepo", "version": "0.0.0", "lockfileVersion": 3, "requires": True, "packages": lock_packages,
    }, indent=2))
    config: dict[str, object] = {"tasks": {"build": {"outputs": ["dist/**"]}}}
    if signature:
        config["remoteCache"] = {"signature": True}
    (root / "turbo.json").write_text(json.dumps(config, indent=2))
    # turbo hashes the files git knows; a repository makes the hashes stable.
    subprocess.run(["git", "init", "-q", str(root)], check=True, stdin=subprocess.DEVNULL)
    return root


def clear_turbo(root: Path) -> None:
    """Forget every local trace of earlier runs: turbo's caches and the outputs."""
    for d in (root / ".turbo", root / "node_modules" / ".cache" / "turbo"):
        shutil.rmtree(d, ignore_errors=True)
    for dist in (root / "packages").glob("*/dist"):
        shutil.rmtree(dist)
    for logs in (root / "packages").glob("*/.turbo"):
        shutil.rmtree(logs)


def run_turbo(root: Path, env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    cmd = ["turbo", "run", "build", "--summarize", *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def turbo_summary(root: Path) -> dict[str, object]:
    """The newest run summary (``--summarize``) of ``root``."""
    runs = sorted((root / ".turbo" / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    assert runs, "turbo wrote no run summary"
    return json.loads(runs[-1].read_text())  # type: ignore[no-any-return]


# -- Nx ------------------------------------------------------------------------------------


def nx_env(home: Path) -> dict[str, str]:
    env = base_env(home)
    env.update({"NX_DAEMON": "false", "NX_NO_CLOUD": "true", "NX_TUI": "false", "NX_SKIP_NX_CACHE": "false",
                "NX_VERBOSE_LOGGING": "false", "NX_INTERACTIVE": "false"})
    return env


def nx_package_dir() -> Path | None:
    """The globally installed ``nx`` package (where the ``nx`` on PATH points), or None."""
    nx = shutil.which("nx")
    if nx is None:
        return None
    d = Path(os.path.realpath(nx)).parent
    while d != d.parent:
        if (d / "package.json").is_file() and json.loads((d / "package.json").read_text()).get("name") == "nx":
            return d
        d = d.parent
    return None


def nx_workspace(root: Path, projects: tuple[str, ...] = ("lib",), command: str = WRITE_OUTPUT) -> Path:
    """A workspace made by hand: nx.json, a project.json per project whose
    cacheable ``build`` target writes ``dist/out.txt``, the global nx linked in."""
    package = nx_package_dir()
    assert package is not None, "the nx package was not found"
    root.mkdir(parents=True, exist_ok=True)
    (root / "package.json").write_text(json.dumps({"name": "sc-nx", "version": "0.0.0", "private": True}))
    (root / "nx.json").write_text(json.dumps({
        "targetDefaults": {"build": {"cache": True, "outputs": ["{projectRoot}/dist"]}},
        "useDaemonProcess": False,
    }, indent=2))
    for name in projects:
        proj = root / "libs" / name
        proj.mkdir(parents=True, exist_ok=True)
        (proj / "index.js").write_text(f"module.exports = {name!r};\n")
        (proj / "project.json").write_text(json.dumps({
            "name": name, "root": f"libs/{name}",
            "targets": {"build": {"executor": "nx:run-commands", "cache": True, "outputs": ["{projectRoot}/dist"],
                                  "options": {"command": command, "cwd": f"libs/{name}"}}},
        }, indent=2))
    (root / "node_modules").mkdir(exist_ok=True)
    os.symlink(package, root / "node_modules" / "nx")
    subprocess.run(["git", "init", "-q", str(root)], check=True, stdin=subprocess.DEVNULL)
    return root


def clear_nx(root: Path, env: dict[str, str]) -> None:
    """``nx reset`` (the local cache and workspace data), and the outputs."""
    subprocess.run(["nx", "reset"], cwd=root, env=env, capture_output=True, text=True, timeout=120,
                   stdin=subprocess.DEVNULL)
    for d in (root / ".nx", root / "node_modules" / ".cache" / "nx"):
        shutil.rmtree(d, ignore_errors=True)
    for dist in (root / "libs").glob("*/dist"):
        shutil.rmtree(dist)


def run_nx(root: Path, env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    cmd = ["nx", "run-many", "-t", "build", "--outputStyle=stream", *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
