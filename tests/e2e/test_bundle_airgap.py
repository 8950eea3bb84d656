"""Air gap end to end: ``sparkcache export`` from daemon A, ``sparkcache import``
into daemon B whose upstreams are unreachable (closed ports), with the real
CLI, skopeo and git.

A caches generic files, an OCI image pulled with skopeo from a real registry,
a PyPI project installed with pip, and a git mirror. B refuses a tampered and a truncated bundle first, with
nothing made visible, then imports the good one: every entry A held is a HIT
on B with the very same bytes, skopeo copies the image from B, and ``git
clone`` from B gives A's commits.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Callable

from tests.support.client import get_until_hit
from tests.support.daemon import REPO_ROOT, Daemon, daemon_env, free_port
from tests.support.git_upstream import (  # noqa: F401 - fixture
    GitUpstream,
    git,
    git_client,
    git_daemon_config,
    git_upstream_factory,
)
from tests.support.pypi_clients import index, installed, ok, pip  # noqa: F401 - fixture
from tests.support.pypi_packages import wheel
from tests.support.pypi_upstream import IndexUpstream
from tests.support.registry import build_image, oci_remote, running_registry, skopeo
from tests.support.upstream import Upstream

ADMIN = "bundle-admin-7d1f0a"
AUTH = {"tokens": [{"name": "ops", "token_env": "BUNDLE_TEST_ADMIN", "scopes": ["admin"]}]}


def cli(d: Daemon, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = daemon_env({"SPARKCACHE_URL": d.base_url, "SPARKCACHE_ADMIN_TOKEN": ADMIN})
    proc = subprocess.run([sys.executable, "-m", "sparkcache.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT)
    if check:
        assert proc.returncode == 0, f"sparkcache {' '.join(args)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def entries(d: Daemon) -> int:
    return int(d.get("/health").json()["store_entries"])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_export_import_serves_everything_with_the_upstreams_unreachable(
        upstream: Upstream, daemon_factory: Callable[..., Daemon],
        git_upstream_factory: Callable[..., GitUpstream],  # noqa: F811
        index: IndexUpstream, tmp_path: Path) -> None:  # noqa: F811
    index.add("demo-app", wheel("demo-app", "1.0", requires=("demo-helper>=1",))).add(
        "demo-helper", wheel("demo-helper", "1.2"))
    files = {"/a.bin": os.urandom(300_000), "/b.bin": b"b" * 3000, "/dir/same.bin": b"b" * 3000}
    for path, body in files.items():
        upstream.add(path, body)
    gitup = git_upstream_factory()
    gitup.create("app", files={"README": "air gap\n"})
    head = gitup.commit({"NEW": "second\n"}, "second", name="app")
    home = tmp_path / "home"
    home.mkdir()

    with running_registry(tmp_path / "oci") as registry:
        layout = tmp_path / "oci" / "layout"
        build_image(layout, "img", {"bin/tool": os.urandom(200_000)}, arch="amd64",
                    extra_layers=[{"etc/conf": b"conf"}])
        registry.push(layout, "img", "team/app:1.0")
        a = daemon_factory(
            {"files": {"type": "generic", "upstream": upstream.base_url},
             "hub": oci_remote(registry.url, repositories=[r"^team/"]),
             "py": {"type": "pypi", "upstream": index.index_url}},
            auth=AUTH, env={"BUNDLE_TEST_ADMIN": ADMIN}, extra=git_daemon_config({"app": gitup.url("app")}))
        served = {path: get_until_hit(a, f"/api/files{path}", body).body for path, body in files.items()}
        skopeo("copy", "--src-tls-verify=false", f"docker://127.0.0.1:{a.port}/hub/team/app:1.0",
               f"oci:{tmp_path / 'from-a'}:x")
    git_client("clone", "-q", "--bare", a.url("/git/app"), str(tmp_path / "warm.git"), home=home)
    ok(pip(a.url("/pypi/py/simple/"), tmp_path / "pip-a", "demo-app==1.0", tmp=tmp_path))
    gitup.stop()
    index.stop()  # B names the same index, now a closed port

    bundle = tmp_path / "cache.tar"
    out = cli(a, "export", "-o", str(bundle), "--git")
    assert out.stdout.startswith(f"wrote {bundle}: "), out.stdout
    assert not Path(str(bundle) + ".part").exists()
    with tarfile.open(bundle) as tf:
        names = tf.getnames()
        manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert names[0] == "manifest.json" and names[-1] == "trailer.json" and "git/0.bundle" in names
    assert manifest["format"] == 1 and {r["name"] for r in manifest["remotes"]} >= {"files", "hub"}
    assert manifest["git"][0]["url"] == gitup.url("app") and manifest["git"][0]["refs"]["refs/heads/main"] == head
    keys = {e["key"]: e for e in manifest["entries"]}
    assert keys["files:a.bin"]["digest"] == sha(files["/a.bin"])
    # The same body under two keys travels once.
    assert sum(1 for n in names if n == f"blobs/sha256/{sha(b'b' * 3000)}") == 1
    blob_names = {n for n in names if n.startswith("blobs/")}
    assert blob_names == {f"blobs/sha256/{d}" for d in manifest["blobs"]}

    closed = f"http://127.0.0.1:{free_port()}"
    b = daemon_factory(
        {"files": {"type": "generic", "upstream": closed}, "hub": oci_remote(closed, repositories=[r"^team/"]),
         "py": {"type": "pypi", "upstream": index.index_url}},
        auth=AUTH, env={"BUNDLE_TEST_ADMIN": ADMIN}, extra=git_daemon_config({"app": gitup.url("app")}))

    # A tampered bundle: one byte of a body changed. Refused whole, nothing visible.
    tampered = tmp_path / "tampered.tar"
    data = bytearray(bundle.read_bytes())
    with tarfile.open(bundle) as tf:
        member = tf.getmember(f"blobs/sha256/{sha(files['/a.bin'])}")
    data[member.offset_data + 1000] ^= 0xFF
    tampered.write_bytes(bytes(data))
    bad = cli(b, "import", str(tampered), check=False)
    assert bad.returncode == 1 and "bad bundle" in bad.stderr and "sha256" in bad.stderr, bad.stderr
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(bytes(data[:member.offset_data + 5000]))
    cut = cli(b, "import", str(truncated), check=False)
    assert cut.returncode == 1 and "truncated" in cut.stderr, cut.stderr
    assert entries(b) == 0 and b.get("/api/files/b.bin").status == 502
    assert b.spool_files() == []

    report = json.loads(cli(b, "import", str(bundle), "--json").stdout)
    ours = [e for e in manifest["entries"] if e["remote"] in ("files", "hub", "py")]
    # The git pack cache's entries (an internal remote B does not declare) are reported skipped.
    assert report["imported"] == len(ours) and set(report["skipped_remotes"]) <= {"git-packs"}, report
    assert [(g["name"], g["status"]) for g in report["git"]] == [("app", "imported")], report
    assert b.spool_files() == []

    # Every entry: a HIT with the bytes A served.
    for path, body in served.items():
        resp = b.get(f"/api/files{path}")
        assert resp.status == 200 and resp.header("X-Cache") == "HIT", resp.describe()
        assert sha(resp.body) == sha(body)
    a_resp = a.get("/api/files/a.bin")
    b_resp = b.get("/api/files/a.bin")
    for h in ("Content-Type", "ETag", "Last-Modified"):
        assert a_resp.header(h) == b_resp.header(h), h
    skopeo("copy", "--src-tls-verify=false", f"docker://127.0.0.1:{b.port}/hub/team/app:1.0",
           f"oci:{tmp_path / 'from-b'}:x")
    index_a = json.loads((tmp_path / "from-a" / "index.json").read_text())
    index_b = json.loads((tmp_path / "from-b" / "index.json").read_text())
    assert index_a["manifests"][0]["digest"] == index_b["manifests"][0]["digest"]
    oci_keys = [e for e in manifest["entries"] if e["remote"] == "hub"]
    assert oci_keys
    for e in oci_keys:
        if "/blobs/" in e["path"]:
            resp = b.get(f"/v2/hub/{e['path']}")
            assert resp.header("X-Cache") == "HIT" and sha(resp.body) == e["digest"], resp.describe()

    ok(pip(b.url("/pypi/py/simple/"), tmp_path / "pip-b", "demo-app==1.0", tmp=tmp_path))
    assert installed(tmp_path / "pip-b", "demo_helper") == "demo-helper==1.2"

    clone = tmp_path / "clone"
    git_client("clone", "-q", b.url("/git/app"), str(clone), home=home)
    assert git("rev-parse", "HEAD", cwd=clone) == head
    assert (clone / "NEW").read_text() == "second\n"

    # Again: everything is already there; nothing changes.
    again = json.loads(cli(b, "import", str(bundle), "--json").stdout)
    assert again["imported"] == 0 and again["present"] == len(ours), again


def test_export_of_one_remote_and_a_mapped_import(upstream: Upstream, daemon_factory: Callable[..., Daemon],
                                                  tmp_path: Path) -> None:
    upstream.add("/one.bin", b"one" * 1000)
    upstream.add("/two.bin", b"two" * 1000)
    a = daemon_factory({"files": {"type": "generic", "upstream": upstream.base_url},
                        "more": {"type": "generic", "upstream": upstream.base_url}},
                       auth=AUTH, env={"BUNDLE_TEST_ADMIN": ADMIN})
    get_until_hit(a, "/api/files/one.bin", b"one" * 1000)
    get_until_hit(a, "/api/more/two.bin", b"two" * 1000)
    bundle = tmp_path / "files.tar"
    cli(a, "export", "-o", str(bundle), "--remote", "files")
    with tarfile.open(bundle) as tf:
        doc: Any = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert [e["key"] for e in doc["entries"]] == ["files:one.bin"]

    closed = f"http://127.0.0.1:{free_port()}"
    b = daemon_factory({"mirror": {"type": "generic", "upstream": closed}}, auth=AUTH,
                       env={"BUNDLE_TEST_ADMIN": ADMIN})
    skipped = json.loads(cli(b, "import", str(bundle), "--json").stdout)
    assert skipped["imported"] == 0 and "files" in skipped["skipped_remotes"], skipped
    mapped = json.loads(cli(b, "import", str(bundle), "--map", "files=mirror", "--json").stdout)
    assert mapped["imported"] == 1, mapped
    resp = b.get("/api/mirror/one.bin")
    assert resp.status == 200 and resp.header("X-Cache") == "HIT" and resp.body == b"one" * 1000

    # Without the admin token: refused before any byte of the body is stored.
    env = daemon_env({"SPARKCACHE_URL": b.base_url})
    denied = subprocess.run([sys.executable, "-m", "sparkcache.cli", "import", str(bundle)], env=env,
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert denied.returncode in (1, 3) and ("401" in denied.stderr or "cannot reach" in denied.stderr), denied.stderr
    assert b.spool_files() == []
