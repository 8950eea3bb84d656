"""Checks for external tools the end-to-end tests drive."""

from __future__ import annotations

import os
import shutil

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
