"""Maven repository paths: form and freshness from the path alone, and sidecar bodies."""

from __future__ import annotations

import pytest

from sparkcache.protocols.maven.paths import (
    ARTIFACT, CHECKSUM, METADATA, NotARepositoryPath, check_segments, classify, is_timestamped, parse_sidecar,
)

G = "org/example/lib"


@pytest.mark.parametrize("path, form, mutable", [
    (f"{G}/maven-metadata.xml", METADATA, True),
    ("org/example/maven-metadata.xml", METADATA, True),  # group level (plugin prefixes)
    (f"{G}/1.0-SNAPSHOT/maven-metadata.xml", METADATA, True),
    (f"{G}/1.0/lib-1.0.jar", ARTIFACT, False),
    (f"{G}/1.0/lib-1.0.pom", ARTIFACT, False),
    (f"{G}/1.0/lib-1.0.module", ARTIFACT, False),  # Gradle module metadata
    (f"{G}/1.0/lib-1.0-sources.jar", ARTIFACT, False),
    (f"{G}/1.0-SNAPSHOT/lib-1.0-20240101.120000-3.jar", ARTIFACT, False),
    (f"{G}/1.0-SNAPSHOT/lib-1.0-20240101.120000-3-tests.jar", ARTIFACT, False),
    (f"{G}/1.0-SNAPSHOT/lib-1.0-SNAPSHOT.jar", ARTIFACT, True),
    (f"{G}/1.0-SNAPSHOT/lib-1.0-SNAPSHOT.pom", ARTIFACT, True),
    (f"{G}/1.0-SNAPSHOT/", METADATA, True),  # a directory listing
    (".meta/prefixes.txt", METADATA, True),
    (".index/nexus-maven-repository-index.gz", METADATA, True),
    ("archetype-catalog.xml", METADATA, True),
    ("org.example/mod/1.0/ivy-1.0.xml", ARTIFACT, False),  # an Ivy layout: passed through
    ("org.example/mod/1.0/jars/mod.jar", ARTIFACT, False),
])
def test_forms_and_freshness(path: str, form: str, mutable: bool) -> None:
    rp = classify(path)
    assert (rp.form, rp.mutable) == (form, mutable)
    assert rp.verifiable == (form == ARTIFACT and not mutable)


@pytest.mark.parametrize("path, base, algorithm, mutable", [
    (f"{G}/1.0/lib-1.0.jar.sha1", f"{G}/1.0/lib-1.0.jar", "sha1", False),
    (f"{G}/1.0/lib-1.0.pom.md5", f"{G}/1.0/lib-1.0.pom", "md5", False),
    (f"{G}/1.0/lib-1.0.jar.sha512", f"{G}/1.0/lib-1.0.jar", "sha512", False),
    (f"{G}/1.0/lib-1.0.jar.asc", f"{G}/1.0/lib-1.0.jar", None, False),
    (f"{G}/1.0/lib-1.0.jar.asc.sha256", f"{G}/1.0/lib-1.0.jar.asc", "sha256", False),
    (f"{G}/maven-metadata.xml.sha1", f"{G}/maven-metadata.xml", "sha1", True),
    (f"{G}/1.0-SNAPSHOT/lib-1.0-SNAPSHOT.jar.sha1", f"{G}/1.0-SNAPSHOT/lib-1.0-SNAPSHOT.jar", "sha1", True),
])
def test_sidecars_belong_to_their_file(path: str, base: str, algorithm: str | None, mutable: bool) -> None:
    rp = classify(path)
    assert (rp.form, rp.base, rp.algorithm, rp.mutable) == (CHECKSUM, base, algorithm, mutable)
    assert not rp.verifiable


def test_timestamped_snapshots() -> None:
    assert is_timestamped("1.0-SNAPSHOT", "lib-1.0-20240101.120000-3.jar")
    assert not is_timestamped("1.0-SNAPSHOT", "lib-1.0-SNAPSHOT.jar")
    assert not is_timestamped("1.0-SNAPSHOT", "lib-1.0-2024.jar")
    # An artifact whose name holds the version's text still needs the timestamp after it.
    assert not is_timestamped("2-SNAPSHOT", "lib-2-x-2-SNAPSHOT.jar")
    assert is_timestamped("2-SNAPSHOT", "lib-2-x-2-20240101.120000-1.jar")


def test_sidecar_bodies() -> None:
    hexd = "a" * 40
    assert parse_sidecar(hexd.encode(), "sha1") == hexd
    assert parse_sidecar(f"{hexd.upper()}  lib-1.0.jar\n".encode(), "sha1") == hexd
    assert parse_sidecar(f"lib-1.0.jar: {hexd}".encode(), "sha1") == hexd
    assert parse_sidecar(b"<html>not found</html>", "sha1") is None
    assert parse_sidecar(b"\xff" * 40, "sha1") is None
    assert parse_sidecar(("b" * 64).encode(), "sha1") is None  # a sha256 in a .sha1


@pytest.mark.parametrize("segments", [["a", " b"], ["~root"], ["x" * 300], ["a", "b "]])
def test_segments_no_repository_has(segments: list[str]) -> None:
    with pytest.raises(NotARepositoryPath):
        check_segments(segments)
