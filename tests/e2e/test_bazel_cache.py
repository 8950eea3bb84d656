"""Bazel (Debian ``bazel-bootstrap`` 4.2, /usr/bin/bazel) against a real daemon:
a genrule workspace built, ``bazel clean``, rebuilt from the remote cache
("remote cache hit"); a store too small for the outputs, where the build still
succeeds; and the requests Bazel made, as the daemon saw them."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.support.bazel_workspace import Bazel, write_genrules
from tests.support.daemon import Daemon
from tests.support.tools import require_tool

TOKEN = "bazel-e2e-writer"
AUTH = {"tokens": [{"name": "ci", "token": TOKEN, "scopes": ["read", "write", "admin"]}], "anonymous_read": False}
N = 6


def bazel_for(tmp_path: Path, cache_url: str | None, token: str | None = TOKEN, **kw: Any) -> Bazel:
    binary = require_tool("bazel", "Debian package bazel-bootstrap")
    ws = tmp_path / "ws"
    write_genrules(ws, N)
    return Bazel(binary, ws, tmp_path / "home", cache_url, token, **kw)


def processes_line(output: str) -> str:
    found = re.findall(r"INFO: \d+ process(?:es)?: .*", output)
    assert found, output
    return found[-1]


def test_clean_rebuild_is_served_by_the_remote_cache(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory({"bz": {"type": "bazel"}}, auth=AUTH)
    bazel = bazel_for(tmp_path, d.url("/bazel/bz/ci/linux"))
    first = bazel.run("build", "//...")
    assert "remote cache hit" not in processes_line(first.stderr)
    outputs = {i: (bazel.workspace / f"bazel-bin/out{i}.txt").read_bytes() for i in range(N)}
    bazel.run("clean")
    again = bazel.run("build", "//...")
    line = processes_line(again.stderr)
    assert f"{N} remote cache hit" in line, again.stderr
    for i, body in outputs.items():
        assert (bazel.workspace / f"bazel-bin/out{i}.txt").read_bytes() == body
    # What Bazel stored is where the protocol says: each output under cas/<its sha256>.
    for body in outputs.values():
        got = d.get(f"/bazel/bz/cas/{hashlib.sha256(body).hexdigest()}", {"Authorization": f"Bearer {TOKEN}"})
        assert got.status == 200 and got.body == body
    # The AC is per prefix: another prefix is a cold cache.
    other = bazel_for(tmp_path / "other", d.url("/bazel/bz/ci/other"))
    assert "remote cache hit" not in processes_line(other.run("build", "//...").stderr)


def test_an_action_whose_output_was_evicted_is_run_again(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory({"bz": {"type": "bazel"}}, auth=AUTH)
    bazel = bazel_for(tmp_path, d.url("/bazel/bz"))
    bazel.run("build", "//...")
    out0 = (bazel.workspace / "bazel-bin/out0.txt").read_bytes()
    # Purge one output blob, as eviction could: its action must not be a hit (Bazel
    # would fail on the missing blob: "lost inputs"), the others still are.
    resp = d.request("POST", f"/admin/purge?remote=bz&path=cas/{hashlib.sha256(out0).hexdigest()}",
                     {"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200 and b'"purged": 1' in resp.body
    bazel.run("clean")
    again = bazel.run("build", "//...")
    line = processes_line(again.stderr)
    assert f"{N - 1} remote cache hit" in line and "1 linux-sandbox" in line, again.stderr
    assert (bazel.workspace / "bazel-bin/out0.txt").read_bytes() == out0


def test_a_store_too_small_for_the_outputs_still_builds(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    # Every output is larger than max_entry_size: each CAS upload is a 413, the
    # ActionResults alone are stored, and every one of them is a miss on the
    # rebuild (its outputs are not there), so Bazel runs the actions again.
    d = daemon_factory({"bz": {"type": "bazel", "max_entry_size": 64}}, auth=AUTH)
    bazel = bazel_for(tmp_path, d.url("/bazel/bz"))
    first = bazel.run("build", "//...")
    bazel.run("clean")
    again = bazel.run("build", "//...")
    assert "remote cache hit" not in processes_line(again.stderr), again.stderr
    assert (bazel.workspace / "bazel-bin/out0.txt").read_text().startswith("source 0")
    assert "413" in first.stderr or "Request Entity Too Large" in first.stderr or "Entity" in first.stderr \
        or "WARNING" in first.stderr, first.stderr


def test_a_reader_without_write_scope_still_builds(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    auth = {"tokens": [{"name": "ci", "token": TOKEN, "scopes": ["read", "write"]},
                       {"name": "dev", "token": "dev-read", "scopes": ["read"]}], "anonymous_read": False}
    d = daemon_factory({"bz": {"type": "bazel"}}, auth=auth)
    bazel_for(tmp_path / "ci", d.url("/bazel/bz")).run("build", "//...")
    dev = bazel_for(tmp_path / "dev", d.url("/bazel/bz"), token="dev-read")
    line = processes_line(dev.run("build", "//...").stderr)
    assert f"{N} remote cache hit" in line
