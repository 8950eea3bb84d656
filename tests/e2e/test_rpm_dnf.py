"""A real dnf through a ``type: rpm`` remote.

The test builds a one-package RPM repository offline (rpmbuild + createrepo_c),
serves it from the controllable upstream, and runs dnf with a private
configuration, installroot, repo directory and cache, so nothing on the system
is read or touched. A second dnf run, with an empty dnf cache and after the
metadata TTL, gets repomd.xml revalidated upstream and the package from the
sparkcache store (one upstream fetch). Then the upstream stops, the metadata
TTL lapses, and a fresh dnf still resolves and downloads from the cache
(``repodata/repomd.xml`` served ``X-Cache: STALE``).

Two plain HTTP tests pin which paths of a ``type: rpm`` remote are mutable
(repomd.xml, non-checksummed metadata) and which are immutable (checksum-named
metadata, packages), as docs/configuration.rst lists them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path


from tests.support.client import get_until_hit
from tests.support.tools import require_tool, run_checked

PACKAGE = "sparkcache-hello"
VERSION = "1.0"
RELEASE = "1"
RPM_NAME = f"{PACKAGE}-{VERSION}-{RELEASE}.noarch.rpm"
REMOTE = "rocky"

SPEC = f"""\
Name: {PACKAGE}
Version: {VERSION}
Release: {RELEASE}
Summary: test package for sparkcache
License: MIT
BuildArch: noarch

%description
A package served through the cache.

%install
mkdir -p %{{buildroot}}/usr/share/{PACKAGE}
printf 'hello from the sparkcache e2e test\\n' > %{{buildroot}}/usr/share/{PACKAGE}/hello.txt
head -c 20000 /dev/zero | tr '\\0' x >> %{{buildroot}}/usr/share/{PACKAGE}/hello.txt

%files
/usr/share/{PACKAGE}/hello.txt
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update({"LC_ALL": "C", "LANG": "C"})
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_checked(cmd, cwd, env, timeout)


def build_repo(work: Path, repo: Path) -> Path:
    """A tiny noarch RPM in a createrepo_c repository under ``repo``; returns the .rpm."""
    top = work / "rpmbuild"
    for d in ("SPECS", "SOURCES", "BUILD", "BUILDROOT", "RPMS", "SRPMS", "tmp"):
        (top / d).mkdir(parents=True, exist_ok=True)
    spec = top / "SPECS" / f"{PACKAGE}.spec"
    spec.write_text(SPEC)
    _run(
        [
            "rpmbuild", "-bb",
            "--define", f"_topdir {top}",
            "--define", f"_tmppath {top / 'tmp'}",
            "--define", "_build_id_links none",
            "--define", "debug_package %{nil}",
            str(spec),
        ],
        env=_clean_env(HOME=str(work)),
    )
    built = top / "RPMS" / "noarch" / RPM_NAME
    assert built.is_file(), f"rpmbuild made no {built}: {list(top.rglob('*.rpm'))}"
    pkgdir = repo / "Packages" / "s"
    pkgdir.mkdir(parents=True)
    rpm = pkgdir / RPM_NAME
    shutil.copyfile(built, rpm)
    _run(["createrepo_c", "--no-database", str(repo)], env=_clean_env(HOME=str(work)))
    assert (repo / "repodata" / "repomd.xml").is_file()
    return rpm


class Dnf:
    """dnf with a private config, installroot, repo directory and cache under ``base``."""

    def __init__(self, base: Path, baseurl: str) -> None:
        self.base = base
        self.root = base / "installroot"
        self.reposdir = base / "repos.d"
        self.cachedir = base / "cache"
        self.out = base / "out"
        for d in (self.root, self.reposdir, self.cachedir, self.out, base / "log", base / "persist"):
            d.mkdir(parents=True, exist_ok=True)
        self.conf = base / "dnf.conf"
        self.conf.write_text(
            "[main]\n"
            "gpgcheck=0\n"
            "repo_gpgcheck=0\n"
            "skip_if_unavailable=False\n"
            "plugins=0\n"
            "install_weak_deps=0\n"
            f"reposdir={self.reposdir}\n"
            f"cachedir={self.cachedir}\n"
            f"logdir={base / 'log'}\n"
            f"persistdir={base / 'persist'}\n"
            "keepcache=0\n"
            "retries=1\n"
            "timeout=20\n"
            "minrate=0\n"
            "countme=0\n"
            "fastestmirror=0\n"
            "zchunk=0\n"
            "proxy=\n"
        )
        (self.reposdir / "local.repo").write_text(
            "[local]\n"
            "name=sparkcache local\n"
            f"baseurl={baseurl}\n"
            "enabled=1\n"
            "gpgcheck=0\n"
            "metadata_expire=0\n"
            "skip_if_unavailable=False\n"
        )
        self.env = _clean_env(HOME=str(base))

    def wipe_cache(self) -> None:
        shutil.rmtree(self.cachedir)
        self.cachedir.mkdir()
        shutil.rmtree(self.out)
        self.out.mkdir()

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run(
            [
                "dnf", "-y",
                f"--config={self.conf}",
                f"--installroot={self.root}",
                f"--setopt=reposdir={self.reposdir}",
                f"--setopt=cachedir={self.cachedir}",
                "--releasever=1",
                "--disablerepo=*",
                "--enablerepo=local",
                "--nogpgcheck",
                *args,
            ],
            cwd=self.base,
            env=self.env,
        )

    def download(self, package: str) -> Path:
        """Resolve ``package`` from the repo and download it (core dnf, no plugins)."""
        got = self.run("install", "--downloadonly", f"--destdir={self.out}", package)
        path = self.out / RPM_NAME
        assert path.is_file(), f"dnf downloaded no {RPM_NAME}: {sorted(os.listdir(self.out))}\n{got.stdout}\n{got.stderr}"
        return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dnf_through_rpm_remote(tmp_path, upstream_factory, daemon_factory):
    require_tool("dnf", "dnf is the client under test")
    require_tool("createrepo_c", "createrepo_c (Debian package createrepo-c) builds the repository metadata")
    require_tool("rpmbuild", "rpmbuild (Debian package rpm) builds the test package")

    repo = tmp_path / "repo"
    repo.mkdir()
    rpm = build_repo(tmp_path, repo)
    repomd = (repo / "repodata" / "repomd.xml").read_bytes()
    checksummed = sorted(p.name for p in (repo / "repodata").iterdir() if p.name != "repomd.xml")
    assert checksummed, "createrepo_c wrote no metadata files"

    upstream = upstream_factory(repo)
    remote = {
        "type": "rpm",
        "upstream": upstream.base_url,
        "check_mutable_updates": True,
        "cache": {"mutable_ttl": "1s"},
        "connect_timeout": "2s",
        "read_timeout": "5s",
    }
    d = daemon_factory({REMOTE: remote})
    baseurl = d.url(f"/api/{REMOTE}/")
    rpm_path = f"/Packages/s/{RPM_NAME}"

    # First run: everything comes through the cache from upstream.
    dnf = Dnf(tmp_path / "dnf1", baseurl)
    got = dnf.download(PACKAGE)
    assert _sha(got) == _sha(rpm), "the .rpm did not arrive byte-identical"
    assert upstream.count("/repodata/repomd.xml") == 1, upstream.describe()
    assert upstream.count(rpm_path) == 1, upstream.describe()
    assert any(upstream.count(f"/repodata/{name}") for name in checksummed), (
        f"dnf fetched none of {checksummed} through the cache:\n{upstream.describe()}"
    )

    # Second run, dnf's own cache wiped, after the 1 s metadata TTL: the
    # cache revalidates repomd.xml with upstream (check_mutable_updates) and
    # serves the package from its store.
    time.sleep(1.3)
    dnf.wipe_cache()
    got = dnf.download(PACKAGE)
    assert _sha(got) == _sha(rpm)
    assert upstream.count(rpm_path) == 1, f"the .rpm was fetched upstream again:\n{upstream.describe()}"
    repomd_requests = upstream.requests_for("/repodata/repomd.xml")
    assert len(repomd_requests) == 2, f"expired repomd.xml not revalidated exactly once:\n{upstream.describe()}"
    again = repomd_requests[1]
    assert again.header("If-None-Match") or again.header("If-Modified-Since"), (
        f"repomd.xml revalidation was not conditional: {again.headers}"
    )
    assert again.status == 304, upstream.describe()
    hit = d.get(f"/api/{REMOTE}{rpm_path}")
    assert hit.status == 200 and hit.header("X-Cache") == "HIT", hit.describe()

    # Upstream goes away; the metadata TTL lapses again. A dnf with an empty
    # cache still resolves (stale repomd.xml) and downloads from the store,
    # and so does the first client once its cache is wiped.
    upstream.stop()
    time.sleep(1.3)
    fresh = Dnf(tmp_path / "dnf2", baseurl)
    got = fresh.download(PACKAGE)
    assert _sha(got) == _sha(rpm)
    dnf.wipe_cache()
    got = dnf.download(PACKAGE)
    assert _sha(got) == _sha(rpm)

    stale = d.get(f"/api/{REMOTE}/repodata/repomd.xml")
    assert stale.status == 200, stale.describe()
    assert stale.header("X-Cache") == "STALE", stale.describe()
    assert stale.body == repomd


# Paths of a type: rpm remote (docs/configuration.rst): repomd.xml (and its
# .asc/.key) and non-checksummed metadata change upstream; checksum-named
# metadata (createrepo_c's default, unique-md-filenames) and packages never do.
SHA = "580d748b7d44b3913be69ba2b4e883de14e4570191f67fb048c6f3ca39a61d96"
RPM_MUTABLE = ["repodata/repomd.xml", "repodata/repomd.xml.asc", "repodata/primary.xml.gz", "repodata/comps.xml"]
RPM_IMMUTABLE = [
    f"repodata/{SHA}-primary.xml.gz",
    f"repodata/{SHA}-filelists.xml.gz",
    f"repodata/{SHA}-other.sqlite.bz2",
    f"repodata/{SHA}-comps.xml",
    f"repodata/{SHA}-updateinfo.xml.zck",
    f"Packages/s/{RPM_NAME}",
]


def _rpm_remote(upstream) -> dict:
    return {"type": "rpm", "upstream": upstream.base_url, "check_mutable_updates": True, "cache": {"mutable_ttl": "1s"}}


def test_rpm_mutable_metadata_expires(upstream, daemon_factory):
    for path in RPM_MUTABLE:
        upstream.add("/" + path, b"metadata v1")
    d = daemon_factory({REMOTE: _rpm_remote(upstream)})
    for path in RPM_MUTABLE:
        resp = d.get(f"/api/{REMOTE}/{path}")
        assert resp.status == 200 and resp.body == b"metadata v1", f"{path}: {resp.describe()}"
        upstream.add("/" + path, b"metadata v2")
    time.sleep(1.3)
    wrong = {}
    for path in RPM_MUTABLE:
        resp = d.get(f"/api/{REMOTE}/{path}")
        if resp.status != 200 or resp.body != b"metadata v2":
            wrong[path] = resp.describe()
    assert not wrong, "mutable rpm metadata did not expire after mutable_ttl:\n" + "\n".join(f"{p}: {r}" for p, r in wrong.items())


def test_rpm_checksummed_files_are_immutable(upstream, daemon_factory):
    for path in RPM_IMMUTABLE:
        upstream.add("/" + path, b"content v1")
    d = daemon_factory({REMOTE: _rpm_remote(upstream)})
    for path in RPM_IMMUTABLE:
        assert d.get(f"/api/{REMOTE}/{path}").body == b"content v1", path
        get_until_hit(d, f"/api/{REMOTE}/{path}", b"content v1")
        upstream.add("/" + path, b"content v2")
    time.sleep(1.3)  # past mutable_ttl; an immutable entry is still fresh (immutable_ttl 0 = forever)
    wrong = {}
    for path in RPM_IMMUTABLE:
        resp = d.get(f"/api/{REMOTE}/{path}")
        if resp.status != 200 or resp.body != b"content v1" or resp.header("X-Cache") != "HIT" or upstream.count("/" + path) != 1:
            wrong[path] = f"{resp.describe()}\n  upstream GETs: {upstream.count('/' + path)}"
    assert not wrong, (
        "checksum-named rpm files are immutable (docs/configuration.rst) but these expired after mutable_ttl:\n"
        + "\n".join(f"{p}: {r}" for p, r in wrong.items())
    )
