"""A real apt-get through a ``type: deb`` remote.

The test builds a one-package Debian repository (dpkg-deb + apt-ftparchive),
serves it from the controllable upstream, and runs apt-get with a private
configuration and state directory (``APT_CONFIG``), so nothing on the system
is read or touched. Then it stops the upstream, lets the metadata TTL lapse,
and checks that a fresh apt client still updates and downloads from the cache.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.tools import require_tool, run_checked

PACKAGE = "sparkcache-hello"
VERSION = "1.0-1"




def build_repo(root: Path, arch: str) -> Path:
    """A tiny Debian-layout repository under ``root``; returns the .deb."""
    pkg = root.parent / "pkgroot"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/share/doc" / PACKAGE).mkdir(parents=True)
    (pkg / "usr/share/doc" / PACKAGE / "hello.txt").write_text("hello from the sparkcache e2e test\n" + "x" * 4000)
    (pkg / "DEBIAN/control").write_text(
        f"Package: {PACKAGE}\nVersion: {VERSION}\nArchitecture: all\nMaintainer: sparkcache tests <tests@example.invalid>\n"
        "Section: misc\nPriority: optional\nDescription: test package for sparkcache\n a package served through the cache\n"
    )
    pool = root / "pool/main/s" / PACKAGE
    pool.mkdir(parents=True)
    deb = pool / f"{PACKAGE}_{VERSION}_all.deb"
    run_checked(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(pkg), str(deb)])

    binary = root / "dists/stable/main" / f"binary-{arch}"
    binary.mkdir(parents=True)
    packages = run_checked(["apt-ftparchive", "packages", "pool"], cwd=root).stdout
    assert f"Package: {PACKAGE}" in packages, packages
    (binary / "Packages").write_text(packages)
    with gzip.open(binary / "Packages.gz", "wt") as f:
        f.write(packages)
    release = run_checked(
        [
            "apt-ftparchive",
            "-o", "APT::FTPArchive::Release::Origin=sparkcache-tests",
            "-o", "APT::FTPArchive::Release::Suite=stable",
            "-o", "APT::FTPArchive::Release::Codename=stable",
            "-o", f"APT::FTPArchive::Release::Architectures={arch}",
            "-o", "APT::FTPArchive::Release::Components=main",
            "release", "dists/stable",
        ],
        cwd=root,
    ).stdout
    (root / "dists/stable/Release").write_text(release)
    return deb


class Apt:
    """apt-get with a private configuration, state and cache under ``base``."""

    def __init__(self, base: Path, source_url: str, arch: str) -> None:
        self.base = base
        for d in ("etc/apt.conf.d", "etc/sources.list.d", "etc/preferences.d", "etc/trusted.gpg.d",
                  "state/lists/partial", "cache/archives/partial", "log", "download"):
            (base / d).mkdir(parents=True, exist_ok=True)
        (base / "state/status").write_text("")
        (base / "etc/sources.list").write_text(f"deb [trusted=yes] {source_url} stable main\n")
        conf = {
            "Dir": "/",
            "Dir::Etc": str(base / "etc"),
            "Dir::Etc::Main": str(base / "etc/apt.conf"),
            "Dir::Etc::Parts": str(base / "etc/apt.conf.d"),
            "Dir::Etc::SourceList": str(base / "etc/sources.list"),
            "Dir::Etc::SourceParts": str(base / "etc/sources.list.d"),
            "Dir::Etc::Preferences": str(base / "etc/preferences"),
            "Dir::Etc::PreferencesParts": str(base / "etc/preferences.d"),
            "Dir::Etc::Trusted": str(base / "etc/trusted.gpg"),
            "Dir::Etc::TrustedParts": str(base / "etc/trusted.gpg.d"),
            "Dir::State": str(base / "state"),
            "Dir::State::Lists": str(base / "state/lists"),
            "Dir::State::status": str(base / "state/status"),
            "Dir::Cache": str(base / "cache"),
            "Dir::Log": str(base / "log"),
            "Debug::NoLocking": "1",
            "APT::Sandbox::User": "root",
            "APT::Architecture": arch,
            "APT::Architectures": arch,
            "Acquire::Languages": "none",
            "Acquire::Retries": "0",
            "Acquire::http::Timeout": "20",
            "Acquire::http::Proxy": "DIRECT",
            "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled": "false",
            "APT::Update::Post-Invoke-Success": "",
            "APT::Update::Post-Invoke": "",
        }
        (base / "etc/apt.conf").write_text("".join(f'{k} "{v}";\n' for k, v in conf.items()))
        (base / "etc/apt.conf.d/00-private").write_text("")
        self.env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.env.update({"APT_CONFIG": str(base / "etc/apt.conf"), "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"})

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run_checked(["apt-get", "-q", *args], cwd=cwd or self.base, env=self.env)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def served_repo(tmp_path, upstream_factory):
    """(the .deb, an upstream serving its repository, the architecture), after checking the tools."""
    require_tool("apt-get", "apt-get is the client under test")
    require_tool("dpkg-deb", "dpkg-deb builds the test package")
    require_tool("apt-ftparchive", "apt-ftparchive (Debian package apt-utils) builds the repository index")
    arch = run_checked(["dpkg", "--print-architecture"]).stdout.strip()
    repo = tmp_path / "repo"
    repo.mkdir()
    deb = build_repo(repo, arch)
    return deb, upstream_factory(repo), arch


def test_apt_get_through_deb_remote(tmp_path, upstream_factory, daemon_factory):
    deb, upstream, arch = served_repo(tmp_path, upstream_factory)
    remote = {
        "type": "deb",
        "upstream": upstream.base_url,
        "check_mutable_updates": True,
        "cache": {"mutable_ttl": "1s", "negative_ttl": "1h"},
        "connect_timeout": "2s",
        "read_timeout": "5s",
    }
    d = daemon_factory({"debian": remote})
    source = d.url("/api/debian/")

    first = Apt(tmp_path / "apt1", source, arch)
    out = first.run("update").stdout
    assert "Err:" not in out, out
    got = first.run("download", PACKAGE, cwd=first.base / "download")
    downloaded = first.base / "download" / deb.name
    assert downloaded.exists(), f"{got.stdout}\n{got.stderr}"
    assert _sha(downloaded) == _sha(deb), "the .deb did not arrive byte-identical"
    assert upstream.count(f"/pool/main/s/{PACKAGE}/{deb.name}") == 1, upstream.describe()
    assert upstream.count("/dists/stable/Release") >= 1, upstream.describe()

    # Upstream goes away; the metadata TTL lapses. A fresh client (empty lists)
    # still gets the stale metadata and the cached package.
    time.sleep(1.5)
    upstream.stop()
    second = Apt(tmp_path / "apt2", source, arch)
    upd = second.run("update")
    assert "Err:" not in upd.stdout, f"{upd.stdout}\n{upd.stderr}"
    lists = list((second.base / "state/lists").glob("*Packages*"))
    assert lists, f"apt-get update fetched no Packages index:\n{upd.stdout}\n{upd.stderr}"
    second.run("download", PACKAGE, cwd=second.base / "download")
    again = second.base / "download" / deb.name
    assert _sha(again) == _sha(deb)

    # The client that already has the lists updates fine too.
    out = first.run("update").stdout
    assert "Err:" not in out, out


@pytest.mark.parametrize("path", ["dists/stable/Release", "dists/stable/main/binary-amd64/Packages.gz"])
def test_deb_metadata_is_mutable(tmp_path, upstream, daemon_factory, path):
    """Release/Packages are mutable by default in a deb remote: they expire and revalidate."""
    upstream.add("/" + path, b"metadata v1")
    d = daemon_factory({"debian": {"type": "deb", "upstream": upstream.base_url, "check_mutable_updates": True, "cache": {"mutable_ttl": "1s"}}})
    assert d.get("/api/debian/" + path).body == b"metadata v1"
    upstream.add("/" + path, b"metadata v2")
    time.sleep(1.3)
    assert d.get("/api/debian/" + path).body == b"metadata v2"
