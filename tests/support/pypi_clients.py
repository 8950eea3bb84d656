"""Running pip, uv and twine against the daemon in the PyPI end-to-end tests,
with nothing of this machine's configuration (PIP_*/UV_*/TWINE_* variables,
proxies, user config files) reaching them; and the ``index`` fixture, a
JSON-capable simple-index upstream (tests/support/pypi_upstream.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.pypi_upstream import IndexUpstream
from tests.support.tools import require_tool

BIN = Path(sys.executable).parent
JSON_TYPE = "application/vnd.pypi.simple.v1+json"


def tool(name: str) -> str:
    """A client from this virtualenv (where setup.cfg installs it), else from PATH."""
    local = BIN / name
    return str(local) if local.exists() else require_tool(name)


def client_env(tmp: Path) -> dict[str, str]:
    """No PIP_*/UV_* settings, proxies or user config of this machine reach the clients."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "UV_", "PYTHON")) and k.lower() not in ("http_proxy", "https_proxy",
                                                                               "all_proxy", "no_proxy")}
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), PYTHONNOUSERSITE="1")
    return env


def pip(index_url: str, target: Path, *args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "--no-cache-dir",
           "--no-input", "--index-url", index_url, "--target", str(target), *args]
    return subprocess.run(cmd, env=client_env(tmp), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def uv(index_url: str, target: Path, *args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    cmd = [tool("uv"), "pip", "install", "--no-config", "--no-cache", "--python", sys.executable,
           "--index-url", index_url, "--target", str(target), *args]
    return subprocess.run(cmd, env=client_env(tmp), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"{proc.args}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def installed(target: Path, module: str) -> str:
    text = (target / module / "__init__.py").read_text()
    return text.split("=", 1)[1].strip().strip("'\"")


@pytest.fixture
def index() -> Iterator[IndexUpstream]:
    """A running JSON-capable simple-index upstream (import it into a test module)."""
    up = IndexUpstream(json=True).start()
    yield up
    up.stop()


def twine(url: str, token: str, files: list[Path], tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in client_env(tmp).items() if not k.startswith("TWINE_")}
    env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.null.Keyring"
    cmd = [tool("twine"), "upload", "--repository-url", url, "-u", "__token__", "-p", token, "--non-interactive",
           "--disable-progress-bar", *map(str, files)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
