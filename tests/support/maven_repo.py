"""A Maven repository written by a test, a project that depends on it, and a
``settings.xml`` that resolves its dependencies through the cache while Maven
plugins come from a local ``file://`` repository (so nothing reaches the internet).

The repository layout is what ``mvn deploy`` writes: a release
``group/artifact/version/artifact-version.{pom,jar}``, a timestamped snapshot
``.../2.0-SNAPSHOT/util-2.0-20260101.120000-1.jar`` with its
``maven-metadata.xml``, artifact-level ``maven-metadata.xml``, and ``.sha1`` and
``.md5`` sidecars of every file. Jars hold real classes compiled with ``javac``
(the project's code calls them), or, for the scaled-up benchmark project, only a
manifest.

Plugins: the machine's pre-filled ``~/.m2/repository`` holds the plugins
``compile`` needs (maven-resources-plugin 3.3.1, maven-compiler-plugin 3.13.0,
pinned in the project: Maven 3.8.7's defaults, 2.6 and 3.1, are there without
all their dependencies) and is used as the ``file://`` repository of the
``central`` plugin repository. Debian's ``/usr/share/maven-repo`` has only
Maven's own libraries, no plugins.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.tools import require_tool

GROUP = "org.example.sparkcache"
# The plugins ``mvn compile`` needs, pinned in the project to versions whose
# dependencies the machine's local repository holds too.
PLUGINS = {"maven-resources-plugin": "3.3.1", "maven-compiler-plugin": "3.13.0"}
PLUGIN_SOURCES = (Path.home() / ".m2" / "repository", Path("/root/.m2/repository"))
SNAPSHOT_STAMP = "20260101.120000"


def plugin_repository() -> Path:
    """The local repository holding the pinned plugins; skips (fails under CI) without one."""
    for root in PLUGIN_SOURCES:
        plugin_dir = root / "org" / "apache" / "maven" / "plugins"
        if all((plugin_dir / p / v / f"{p}-{v}.jar").is_file() for p, v in PLUGINS.items()):
            return root
    message = (f"no local Maven repository with {', '.join(f'{p} {v}' for p, v in PLUGINS.items())} "
               f"(looked in {', '.join(map(str, PLUGIN_SOURCES))})")
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_maven() -> str:
    mvn = require_tool("mvn", "Maven is installed by .ci/run (Debian's maven package)")
    require_tool("javac", "a JDK comes with Debian's maven package")
    return mvn


# -- the repository --------------------------------------------------------------------------


@dataclass
class Artifact:
    artifact: str
    version: str  # 1.0, or 2.0-SNAPSHOT (published timestamped)
    classes: dict[str, str] = field(default_factory=dict)  # Java class name → source

    @property
    def snapshot(self) -> bool:
        return self.version.endswith("-SNAPSHOT")

    @property
    def file_version(self) -> str:
        """The version in file names: timestamped for a snapshot."""
        return f"{self.version[:-len('-SNAPSHOT')]}-{SNAPSHOT_STAMP}-1" if self.snapshot else self.version

    @property
    def dir(self) -> str:
        return f"{GROUP.replace('.', '/')}/{self.artifact}/{self.version}"

    def path(self, ext: str) -> str:
        return f"{self.dir}/{self.artifact}-{self.file_version}.{ext}"


def _write(root: Path, rel: str, data: bytes) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    (root / f"{rel}.sha1").write_text(hashlib.sha1(data).hexdigest())
    (root / f"{rel}.md5").write_text(hashlib.md5(data).hexdigest())


def pom(a: Artifact) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
            f"  <modelVersion>4.0.0</modelVersion>\n  <groupId>{GROUP}</groupId>\n"
            f"  <artifactId>{a.artifact}</artifactId>\n  <version>{a.version}</version>\n"
            f"  <packaging>jar</packaging>\n</project>\n").encode()


def jar(a: Artifact, work: Path) -> bytes:
    """A jar of ``a``'s classes compiled with javac (only a manifest when it has none)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        # Fixed timestamps: the same artifact always has the same bytes.
        z.writestr(zipfile.ZipInfo("META-INF/MANIFEST.MF", (2026, 1, 1, 0, 0, 0)), "Manifest-Version: 1.0\n")
        if a.classes:
            src, out = work / f"{a.artifact}-src", work / f"{a.artifact}-classes"
            for name, text in a.classes.items():
                f = src / (name.replace(".", "/") + ".java")
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(text)
            out.mkdir(parents=True, exist_ok=True)
            subprocess.run(["javac", "--release", "8", "-nowarn", "-d", str(out),
                            *[str(p) for p in src.rglob("*.java")]], check=True, capture_output=True, timeout=120)
            for p in sorted(out.rglob("*.class")):
                z.writestr(zipfile.ZipInfo(str(p.relative_to(out)), (2026, 1, 1, 0, 0, 0)), p.read_bytes())
    return buf.getvalue()


def metadata(a: Artifact, versions: list[str]) -> bytes:
    listed = "".join(f"      <version>{v}</version>\n" for v in versions)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<metadata>\n  <groupId>{GROUP}</groupId>\n'
            f"  <artifactId>{a.artifact}</artifactId>\n  <versioning>\n    <latest>{versions[-1]}</latest>\n"
            f"    <versions>\n{listed}    </versions>\n    <lastUpdated>20260101120000</lastUpdated>\n"
            f"  </versioning>\n</metadata>\n").encode()


def snapshot_metadata(a: Artifact) -> bytes:
    value = a.file_version
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<metadata modelVersion="1.1.0">\n'
            f"  <groupId>{GROUP}</groupId>\n  <artifactId>{a.artifact}</artifactId>\n"
            f"  <version>{a.version}</version>\n  <versioning>\n    <snapshot>\n"
            f"      <timestamp>{SNAPSHOT_STAMP}</timestamp>\n      <buildNumber>1</buildNumber>\n"
            f"    </snapshot>\n    <lastUpdated>20260101120000</lastUpdated>\n    <snapshotVersions>\n"
            + "".join(f"      <snapshotVersion>\n        <extension>{ext}</extension>\n"
                      f"        <value>{value}</value>\n        <updated>20260101120000</updated>\n"
                      f"      </snapshotVersion>\n" for ext in ("jar", "pom"))
            + "    </snapshotVersions>\n  </versioning>\n</metadata>\n").encode()


def publish(root: Path, artifacts: list[Artifact]) -> dict[str, bytes]:
    """Write ``artifacts`` into the repository at ``root``; {repository path: jar bytes}."""
    jars: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as work:
        for a in artifacts:
            _write(root, a.path("pom"), pom(a))
            data = jar(a, Path(work))
            _write(root, a.path("jar"), data)
            jars[a.path("jar")] = data
            _write(root, f"{GROUP.replace('.', '/')}/{a.artifact}/maven-metadata.xml", metadata(a, [a.version]))
            if a.snapshot:
                _write(root, f"{a.dir}/maven-metadata.xml", snapshot_metadata(a))
    return jars


# -- the project and settings ---------------------------------------------------------------


def project(root: Path, deps: list[Artifact], main: str | None = None) -> Path:
    """A jar project depending on ``deps``, with ``main`` as its one class."""
    root.mkdir(parents=True, exist_ok=True)
    plugins = "".join(f"      <plugin><groupId>org.apache.maven.plugins</groupId><artifactId>{p}</artifactId>"
                      f"<version>{v}</version></plugin>\n" for p, v in PLUGINS.items())
    listed = "".join(f"    <dependency><groupId>{GROUP}</groupId><artifactId>{d.artifact}</artifactId>"
                     f"<version>{d.version}</version></dependency>\n" for d in deps)
    (root / "pom.xml").write_text(
        f'<?xml version="1.0" encoding="UTF-8"?>\n<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        f"  <modelVersion>4.0.0</modelVersion>\n  <groupId>{GROUP}</groupId>\n  <artifactId>app</artifactId>\n"
        f"  <version>1.0</version>\n  <properties>\n"
        f"    <maven.compiler.source>8</maven.compiler.source>\n"
        f"    <maven.compiler.target>8</maven.compiler.target>\n"
        f"    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>\n  </properties>\n"
        f"  <dependencies>\n{listed}  </dependencies>\n"
        f"  <build>\n    <plugins>\n{plugins}    </plugins>\n  </build>\n</project>\n")
    if main is not None:
        src = root / "src" / "main" / "java" / "app" / "App.java"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text(main)
    return root


def settings(mirror_xml: str, plugins: Path) -> str:
    """``mirror_xml`` (the cache's ``/setup/maven`` answer, mirrorOf ``*,!central``)
    plus a profile: dependencies from a repository ``deps`` (snapshots on) that
    the mirror sends to the cache, plugins (and the super POM's ``central``)
    from the local ``file://`` repository ``plugins``."""
    url = plugins.as_uri()
    profile = (
        "  <profiles>\n    <profile>\n      <id>sparkcache-test</id>\n      <repositories>\n"
        "        <repository><id>deps</id><url>http://deps.invalid/</url>\n"
        "          <releases><enabled>true</enabled></releases>\n"
        "          <snapshots><enabled>true</enabled><updatePolicy>always</updatePolicy></snapshots>\n"
        "        </repository>\n"
        f"        <repository><id>central</id><url>{url}</url><snapshots><enabled>false</enabled></snapshots>"
        "</repository>\n      </repositories>\n      <pluginRepositories>\n"
        f"        <pluginRepository><id>central</id><url>{url}</url>"
        "<snapshots><enabled>false</enabled></snapshots></pluginRepository>\n"
        "      </pluginRepositories>\n    </profile>\n  </profiles>\n"
        "  <activeProfiles><activeProfile>sparkcache-test</activeProfile></activeProfiles>\n"
    )
    assert "</settings>" in mirror_xml
    return mirror_xml.replace("</settings>", profile + "</settings>")


def run_mvn(project_dir: Path, settings_file: Path, local_repo: Path, *goals: str,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``mvn -B -s settings -Dmaven.repo.local=... goals``, not raising; the
    environment scrubbed of Maven and proxy settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MAVEN_", "M2_")) and k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
    env["MAVEN_OPTS"] = "-Xmx256m -XX:TieredStopAtLevel=1"
    return subprocess.run(
        [shutil.which("mvn") or "mvn", "-B", "-e", "-s", str(settings_file), f"-Dmaven.repo.local={local_repo}",
         *goals],
        cwd=project_dir, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def failed_transfers(output: str) -> list[str]:
    return re.findall(r"(?m)^.*(?:Could not transfer|Could not resolve|Checksum validation failed).*$", output)

