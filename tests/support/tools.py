"""Checks for external tools the end-to-end tests drive."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def require_tool(name: str, reason: str | None = None) -> str:
    """Return the path of ``name``; skip the test when it is missing.

    On CI (``CI=true``) a missing tool is a failure instead: CI must have
    every tool, or the tests it cannot run would silently pass as skips.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    why = reason or f"{name} is not installed"
    message = f"required tool {name!r} not found on PATH: {why}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_installed(path: Path, what: str) -> Path:
    """Return ``path`` (something .ci/run installs); skip the test when it is
    missing, fail under ``CI=true`` (as :func:`require_tool`)."""
    if path.exists():
        return path
    message = f"{what} is not installed at {path} (see .ci/run)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def run_checked(
    cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a tool; on a non-zero exit fail with its command line, stdout and stderr."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def files_containing(root: str | os.PathLike[str], needles: list[bytes]) -> list[str]:
    """Files under ``root`` whose bytes contain any of ``needles`` (secrets-on-disk checks)."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                data = Path(p).read_bytes()
            except OSError:
                continue
            if any(n in data for n in needles):
                found.append(p)
    return found
