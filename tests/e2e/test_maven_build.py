"""The real ``mvn`` (and Debian's Gradle) through a ``type: maven`` remote.

A repository is written by the test (a release and a timestamped snapshot,
with checksums, as ``mvn deploy`` lays them out) and served over HTTP on
127.0.0.1; the project compiles against both through the cache, using the
cache's own ``/setup/maven`` mirror. Plugins resolve from the machine's local
repository (tests/support/maven_repo.py says which and why).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.support.maven_repo import (
    GROUP, Artifact, failed_transfers, plugin_repository, project, publish, require_maven, run_mvn, settings,
)
from tests.support.tools import require_tool
from tests.support.upstream import Upstream

GREETING = Artifact("greeting", "1.0", {"org.example.greeting.Greeting": (
    "package org.example.greeting;\n"
    "public class Greeting { public static String hello(String who) { return \"hello \" + who; } }\n")})
UTIL = Artifact("util", "2.0-SNAPSHOT", {"org.example.util.Shout": (
    "package org.example.util;\n"
    "public class Shout { public static String loud(String s) { return s.toUpperCase(); } }\n")})
MAIN = (
    "package app;\n"
    "import org.example.greeting.Greeting;\nimport org.example.util.Shout;\n"
    "public class App { public static void main(String[] a) { System.out.println(Shout.loud(Greeting.hello(\"ci\"))); } }\n"
)


@pytest.fixture
def repo(tmp_path: Path, upstream_factory: Callable[..., Upstream]) -> Any:
    require_maven()
    root = tmp_path / "upstream-repo"
    jars = publish(root, [GREETING, UTIL])
    up = upstream_factory(root)
    return root, up, jars


def setup_settings(d: Any, tmp_path: Path, name: str = "settings.xml") -> Path:
    mirror = d.get("/setup/maven?mirrorOf=*,!central")
    assert mirror.status == 200, mirror.describe()
    f = tmp_path / name
    f.write_text(settings(mirror.body.decode(), plugin_repository()))
    return f


def mvn_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"mvn exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


def test_compile_through_the_cache_then_with_the_upstream_stopped(repo: Any, daemon_factory: Any,
                                                                  tmp_path: Path) -> None:
    root, up, jars = repo
    d = daemon_factory({"central": {"type": "maven", "upstream": up.base_url}})
    s = setup_settings(d, tmp_path)
    app = project(tmp_path / "app", [GREETING, UTIL], MAIN)

    mvn_ok(run_mvn(app, s, tmp_path / "m2-cold", "compile"))
    assert (app / "target" / "classes" / "app" / "App.class").is_file()
    # Every dependency file came through the cache: the upstream saw them.
    for a in (GREETING, UTIL):
        assert up.count("/" + a.path("jar")) == 1, up.describe()
        assert up.count("/" + a.path("pom")) == 1, up.describe()
    assert up.count(f"/{UTIL.dir}/maven-metadata.xml") == 1
    # The cache serves upstream's exact bytes, and sidecars of those bytes.
    for path, data in jars.items():
        resp = d.get(f"/maven/central/{path}")
        assert resp.status == 200 and resp.header("X-Cache") == "HIT" and resp.body == data
        assert d.get(f"/maven/central/{path}.sha1").body.decode() == hashlib.sha1(data).hexdigest()

    # Upstream gone: a fresh local repository still builds, from the cache alone.
    up.stop()
    shutil.rmtree(app / "target")
    mvn_ok(run_mvn(app, s, tmp_path / "m2-warm", "compile"))
    assert (app / "target" / "classes" / "app" / "App.class").is_file()


def test_a_tampered_jar_fails_the_build_and_is_not_stored(repo: Any, daemon_factory: Any, tmp_path: Path) -> None:
    root, up, jars = repo
    jar = root / GREETING.path("jar")
    # The jar is replaced upstream; its .sha1 still names the published bytes.
    jar.write_bytes(jar.read_bytes().replace(b"META-INF", b"META-INX"))
    d = daemon_factory({"central": {"type": "maven", "upstream": up.base_url}})
    s = setup_settings(d, tmp_path)
    app = project(tmp_path / "app", [GREETING, UTIL], MAIN)

    proc = run_mvn(app, s, tmp_path / "m2", "compile")
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert failed_transfers(proc.stdout), proc.stdout[-6000:]
    assert not (tmp_path / "m2" / GREETING.path("jar")).exists()
    # Nothing kept: the cache asks upstream again, and refuses again.
    before = up.count("/" + GREETING.path("jar"))
    assert before >= 1
    resp = d.get(f"/maven/central/{GREETING.path('jar')}")
    assert resp.status != 200 or resp.body != jar.read_bytes()
    assert up.count("/" + GREETING.path("jar")) == before + 1
    assert "digest mismatch" in d.log()


def test_several_upstreams_and_a_missing_artifact(repo: Any, daemon_factory: Any, tmp_path: Path,
                                                  upstream_factory: Callable[..., Upstream]) -> None:
    """The release is only in the second upstream: a 404 from the first falls through."""
    root, up, jars = repo
    empty = upstream_factory(tmp_path / "empty-repo")
    (tmp_path / "empty-repo").mkdir()
    # A negative TTL no slow machine outlasts between the two builds.
    d = daemon_factory({"central": {"type": "maven", "upstream": [empty.base_url, up.base_url],
                                    "cache": {"negative_ttl": 3600}}})
    s = setup_settings(d, tmp_path)
    missing = Artifact("missing", "1.0")
    app = project(tmp_path / "app", [GREETING, UTIL], MAIN)
    mvn_ok(run_mvn(app, s, tmp_path / "m2", "compile"))
    assert empty.count("/" + GREETING.path("jar")) == 1 and up.count("/" + GREETING.path("jar")) == 1

    broken = project(tmp_path / "broken", [missing])
    for i in range(2):
        proc = run_mvn(broken, s, tmp_path / f"m2-broken{i}", "compile")
        assert proc.returncode != 0 and "missing" in proc.stdout
    # Both builds asked the cache; upstreams were asked once (the 404 is cached briefly).
    assert empty.count("/" + missing.path("pom")) == 1 and up.count("/" + missing.path("pom")) == 1


GRADLE_BUILD = """
apply plugin: 'java'
repositories { maven { url 'http://127.0.0.1:9/not-the-cache/' } }
dependencies { compile '%s:greeting:1.0' }
task resolveDeps {
    doLast {
        configurations.compileClasspath.resolve().each { println "RESOLVED " + it.name }
    }
}
"""


def test_gradle_resolves_a_dependency_through_the_setup_init_script(repo: Any, daemon_factory: Any,
                                                                   tmp_path: Path) -> None:
    gradle = require_tool("gradle", "Gradle is installed by .ci/run (Debian's gradle package)")
    root, up, jars = repo
    d = daemon_factory({"central": {"type": "maven", "upstream": up.base_url}})
    init = tmp_path / "sparkcache.gradle"
    resp = d.get("/setup/gradle")
    assert resp.status == 200, resp.describe()
    init.write_text(resp.body.decode())
    app = tmp_path / "gradle-app"
    app.mkdir()
    (app / "build.gradle").write_text(GRADLE_BUILD % GROUP)
    (app / "settings.gradle").write_text("rootProject.name = 'app'\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GRADLE_USER_HOME": str(tmp_path / "gradle-home"),
           "JAVA_OPTS": "-Xmx256m"}
    proc = subprocess.run([gradle, "--no-daemon", "-q", "-I", str(init), "resolveDeps"], cwd=app, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "RESOLVED greeting-1.0.jar" in proc.stdout
    assert up.count("/" + GREETING.path("jar")) == 1
    # Gradle asks for the pom and jar (HEAD and GET) through the cache, which answered them.
    resp = d.head(f"/maven/central/{GREETING.path('jar')}")
    assert resp.status == 200 and resp.header("X-Cache") == "HIT"
