"""Gradle (Debian 4.4.1) with a kv remote as its HTTP build cache, configured by
``/setup/gradle-cache``: a build, ``clean``, a build again: ``compileJava`` comes
FROM-CACHE (the local build cache is off, so only the remote can answer). A
remote too small for any entry answers 413: Gradle turns the remote cache off
for the build and builds anyway."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Callable

from tests.support.daemon import Daemon
from tests.support.kv_tools import gradle_command, tool_env, write_gradle_project
from tests.support.tools import require_tool, run_checked

TOKEN = "kv-gradle-e2e-token"
AUTH = {"anonymous_read": False, "tokens": [{"name": "ci", "token": TOKEN, "scopes": ["read", "write"]}]}
# Only the remote: a local hit would prove nothing.
LOCAL_OFF = "buildCache {\n    local {\n        enabled = false\n    }\n}\n"
GRADLE_TIMEOUT = 400


def project_with_setup(d: Daemon, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    snippet = d.get("/setup/gradle-cache", {"Authorization": f"Bearer {TOKEN}"})
    assert snippet.status == 200, snippet.describe()
    project = write_gradle_project(tmp_path / "demo", snippet.body.decode() + LOCAL_OFF)
    env = tool_env(tmp_path / "home", {"GRADLE_USER_HOME": str(tmp_path / "gradle-home"), "SPARKCACHE_TOKEN": TOKEN})
    return project, env


def gradle(project: Path, env: dict[str, str], *tasks: str) -> str:
    out = run_checked(gradle_command(require_tool("gradle"), *tasks), cwd=project, env=env, timeout=GRADLE_TIMEOUT)
    return out.stdout + out.stderr


def test_a_clean_build_comes_from_the_remote_cache(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    require_tool("gradle")
    d = daemon_factory({"gr": {"type": "kv"}}, auth=AUTH)
    project, env = project_with_setup(d, tmp_path)

    first = gradle(project, env, "build")
    assert "BUILD SUCCESSFUL" in first and "FROM-CACHE" not in first, first
    assert "Could not" not in first and "remote build cache was disabled" not in first, first
    metrics = d.get("/metrics").body.decode()
    stored = re.search(r'form="upload",remote="gr",result="stored"\} (\d+)', metrics)
    assert stored is not None and int(stored.group(1)) >= 1, metrics

    second = gradle(project, env, "clean", "build")
    assert re.search(r":compileJava FROM-CACHE", second), second
    assert (project / "build" / "libs" / "demo.jar").exists()


def test_entries_are_kept_with_gradles_media_type(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    require_tool("gradle")
    d = daemon_factory({"gr": {"type": "kv"}}, auth=AUTH)
    project, env = project_with_setup(d, tmp_path)
    gradle(project, env, "compileJava")
    d.stop()

    with sqlite3.connect(d.data_dir / "index.sqlite") as db:
        rows = list(db.execute("SELECT path, content_type FROM entries WHERE remote = 'gr'"))
    assert rows and all(re.fullmatch(r"cache/[0-9a-f]{32}", p) for p, _ in rows), rows
    assert {t for _, t in rows} == {"application/vnd.gradle.build-cache-artifact.v1"}, rows


def test_a_remote_that_refuses_every_entry_never_fails_the_build(daemon_factory: Callable[..., Daemon],
                                                                 tmp_path: Path) -> None:
    require_tool("gradle")
    d = daemon_factory({"gr": {"type": "kv", "max_entry_size": 1}}, auth=AUTH)
    project, env = project_with_setup(d, tmp_path)
    first = gradle(project, env, "build")
    assert "BUILD SUCCESSFUL" in first, first
    # Refused from the headers, before the body: Gradle reads the 413, not a broken pipe.
    assert "response status 413" in first and "remote build cache was disabled" in first, first
    second = gradle(project, env, "clean", "build")
    assert "BUILD SUCCESSFUL" in second and "FROM-CACHE" not in second, second
    rejected = re.search(r'form="upload",remote="gr",result="rejected"\} (\d+)', d.get("/metrics").body.decode())
    assert rejected is not None and int(rejected.group(1)) >= 1
    assert d.spool_files() == []
