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


def bazel_for(tmp_path: Path, cache_url: str | None, token: str | None = TOKEN, lines: int = 20, **kw: Any) -> Bazel:
    binary = require_tool("bazel", "Debian package bazel-bootstrap")
    ws = tmp_path / "ws"
    write_genrules(ws, N, lines=lines)
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
    # Every output (3 KB) is larger than max_entry_size: each of their CAS uploads
    # is a 413 (refused before the body). Bazel 4.2 then uploads no ActionResult
    # for the action (the small stdout, Action and Command blobs are stored), so
    # the rebuild misses and runs every action again; the build succeeds both times.
    d = daemon_factory({"bz": {"type": "bazel", "max_entry_size": 1024}}, auth=AUTH)
    bazel = bazel_for(tmp_path, d.url("/bazel/bz"), lines=300)
    first = bazel.run("build", "//...")
    bazel.run("clean")
    again = bazel.run("build", "//...")
    assert "remote cache hit" not in processes_line(again.stderr), again.stderr
    assert (bazel.workspace / "bazel-bin/out0.txt").read_text().startswith("source 0")
    # Bazel says the uploads failed and goes on; the daemon refused them before their bodies.
    assert "WARNING: Writing to Remote Cache" in first.stderr, first.stderr
    metrics = d.get("/metrics").body.decode()
    assert re.search(r'form="upload",remote="bz",result="rejected"\} [1-9]', metrics), metrics
    assert re.search(r'form="upload",remote="bz",result="stored"\} [1-9]', metrics), metrics


def test_a_reader_without_write_scope_still_builds(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    auth = {"tokens": [{"name": "ci", "token": TOKEN, "scopes": ["read", "write"]},
                       {"name": "dev", "token": "dev-read", "scopes": ["read"]}], "anonymous_read": False}
    d = daemon_factory({"bz": {"type": "bazel"}}, auth=auth)
    bazel_for(tmp_path / "ci", d.url("/bazel/bz")).run("build", "//...")
    dev = bazel_for(tmp_path / "dev", d.url("/bazel/bz"), token="dev-read")
    line = processes_line(dev.run("build", "//...").stderr)
    assert f"{N} remote cache hit" in line
