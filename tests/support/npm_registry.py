"""A real npm registry for end-to-end tests (Verdaccio with no uplinks, its
storage in a tmp dir), packages made and published to it with the real npm,
and the npm, pnpm and yarn clients run in isolation: each with its own
userconfig, cache and HOME in tmp, and no ``npm_config_*`` from the
environment running the tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.daemon import free_port
from tests.support.tools import require_tool, run_checked

STARTUP_TIMEOUT = 60.0


def client_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a node client: its own HOME, no npm/yarn/pnpm settings or proxies inherited."""
    drop = ("npm_config_", "NPM_CONFIG_", "YARN_", "PNPM_", "yarn_", "pnpm_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)
           and k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
    home.mkdir(parents=True, exist_ok=True)
    env.update({"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache"),
                "XDG_DATA_HOME": str(home / ".local"), "npm_config_update_notifier": "false", "CI": "true"})
    env.update(extra or {})
    return env


class Verdaccio:
    """A Verdaccio on 127.0.0.1 with ``uplinks: {}``: a registry that knows only what the test published."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = root / "config.yaml"
        self.config.write_text(
            f"storage: {root / 'storage'}\n"
            f"auth:\n  htpasswd:\n    file: {root / 'htpasswd'}\n"
            "uplinks: {}\n"
            "packages:\n"
            "  '@*/*':\n    access: $all\n    publish: $all\n"
            "  '**':\n    access: $all\n    publish: $all\n"
            "log: {type: stdout, format: pretty, level: warn}\n"
            "web: {enable: false}\n"
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Verdaccio":
        exe = require_tool("verdaccio")
        log = open(self.root / "verdaccio.log", "ab")
        self.proc = subprocess.Popen([exe, "--config", str(self.config), "--listen", f"127.0.0.1:{self.port}"],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=client_env(self.root / "home"), start_new_session=True)
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"verdaccio exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ping", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"verdaccio did not answer within {STARTUP_TIMEOUT}s:\n{self.log()}")

    def ensure_running(self) -> "Verdaccio":
        """Start it again when a test stopped it (its storage, and so its packages, survive)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)

    def log(self) -> str:
        p = self.root / "verdaccio.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""


def make_package(root: Path, name: str, version: str, dependencies: dict[str, str] | None = None) -> Path:
    """A package directory (package.json and index.js) ready to ``npm publish``."""
    d = root / f"{name.replace('/', '+')}-{version}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "package.json").write_text(json.dumps({
        "name": name, "version": version, "main": "index.js", "license": "MIT",
        "dependencies": dependencies or {},
    }, indent=2))
    (d / "index.js").write_text(f"module.exports = {json.dumps(name + '@' + version)};\n")
    return d


def npmrc(path: Path, registry: str, token: str | None = None) -> Path:
    """A userconfig naming ``registry`` (and a token for it, to publish)."""
    lines = [f"registry={registry}"]
    if token is not None:
        lines.append(f"//{registry.split('://', 1)[1]}:_authToken={token}")
    lines += ["audit=false", "fund=false", "update-notifier=false", "fetch-retries=0"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def npm_publish(package: Path, registry: str, home: Path, token: str = "e2e-token") -> None:
    """``npm publish`` of a package directory to ``registry`` (a root URL ending in /)."""
    npm = require_tool("npm")
    rc = npmrc(home / "publish.npmrc", registry, token)
    run_checked([npm, "publish", "--userconfig", str(rc), "--registry", registry, "--cache", str(home / "npm-cache")],
                cwd=package, env=client_env(home))


def project(root: Path, dependencies: dict[str, str]) -> Path:
    """An application directory whose package.json depends on ``dependencies``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "package.json").write_text(json.dumps({"name": "app", "version": "0.0.0", "private": True,
                                                   "dependencies": dependencies}, indent=2))
    return root


def installed_version(app: Path, name: str) -> str:
    """The version of ``name`` installed in ``app``'s node_modules."""
    return str(json.loads((app / "node_modules" / name / "package.json").read_text())["version"])


def install(client: str, app: Path, registry: str, home: Path, check: bool = True,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Install ``app``'s dependencies with ``client`` (npm, pnpm or yarn) through ``registry`` only."""
    exe = require_tool(client)
    rc = npmrc(home / f"{client}.npmrc", registry)
    env = client_env(home)
    if client == "npm":
        cmd = [exe, "install", "--userconfig", str(rc), "--registry", registry, "--cache", str(home / "npm-cache"),
               "--no-audit", "--no-fund", "--no-package-lock", "--loglevel=http"]
    elif client == "pnpm":
        # pnpm reads the project's .npmrc and the user's (~/.npmrc, HOME is ours).
        (home / ".npmrc").write_text(rc.read_text())
        cmd = [exe, "install", "--registry", registry, "--store-dir", str(home / "pnpm-store"),
               "--config.cache-dir=" + str(home / "pnpm-cache"), "--no-frozen-lockfile", "--reporter=append-only"]
    elif client == "yarn":
        (home / ".yarnrc").write_text(f'registry "{registry}"\n')
        cmd = [exe, "install", "--registry", registry, "--cache-folder", str(home / "yarn-cache"),
               "--no-lockfile", "--non-interactive", "--network-timeout", "60000",
               "--use-yarnrc", str(home / ".yarnrc")]
    else:
        raise ValueError(client)
    if not check:
        return subprocess.run(cmd, cwd=app, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    return run_checked(cmd, cwd=app, env=env, timeout=timeout)


def metrics_of(text: str, **labels: Any) -> float:
    """The sum of sparkcache_registry_requests_total samples matching ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("sparkcache_registry_requests_total{") and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
