"""A node-local sparkcache chained to a central one, for every protocol.

One module-wide chain: real upstreams (a file server that also holds npm,
cargo, Go proxy and checksum database, and Maven trees; a PEP 691 simple
index; Debian's registry behind a counting front; a git smart-HTTP server), a
central daemon on them that refuses anonymous reads, and two node daemons
configured from the central's ``/setup/node`` (their token from the
environment variable it names). The real clients (ctr, pip, uv, npm, go, git)
go through the nodes; upstream request counts show each object came from
upstream once (node miss → central miss → upstream; the second node: a hit
at the central). The last test kills the central: a node serves what it holds
(mutable entries ``X-Cache: STALE``), containerd, pip, go and git still work
from it, and what it lacks is the protocol's error.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import yaml

from tests.support.cargo_registry import Crate, CrateSpec, index_path, publish as cargo_publish
from tests.support.containerd import ctr, private_containerd
from tests.support.daemon import Daemon, daemon_env
from tests.support.git_upstream import GitUpstream, git
from tests.support.go_modules import ModuleVersion, proxy_tree
from tests.support.go_sumdb import SumDB
from tests.support.npm_packages import file_name, integrity, make_tarball, version_doc
from tests.support.npm_registry import install, installed_version, project
from tests.support.oci_images import build_image as pushed_image
from tests.support.pypi_clients import JSON_TYPE, installed, ok, pip, uv
from tests.support.pypi_packages import wheel
from tests.support.pypi_upstream import IndexUpstream
from tests.support.registry import Front, build_image, oci_remote, running_registry
from tests.support.tools import require_tool, run_checked
from tests.support.upstream import Upstream

NOWHERE = "http://127.0.0.1:9"
SUMDB_NAME = "sum.tiers.example"
GO_MOD = ModuleVersion("example.test/tierlib", "v1.0.0",
                       {"go.mod": b"module example.test/tierlib\n", "lib.go": b"package tierlib\nconst V = 1\n"})
MVN_JAR = "org/example/tier/1.0/tier-1.0.jar"
# Mutable entries go stale fast, so the last test sees the node's stale-on-error answers.
TTL = {"mutable_ttl": "1s"}
CENTRAL_TOKEN = "tiers-read-4f1c"
READ = {"Authorization": f"Bearer {CENTRAL_TOKEN}"}
PUSH_TOKEN = "tiers-push-9d3e"


def _npm_publish(up: Upstream, name: str, version: str) -> bytes:
    data = make_tarball(name, version)
    url = f"{up.base_url}/npm/{name}/-/{file_name(name, version)}"
    doc = {"_id": name, "name": name, "dist-tags": {"latest": version},
           "versions": {version: version_doc(name, version, data, url)}}
    up.add(f"/npm/{name}", json.dumps(doc).encode(), content_type="application/json")
    up.add(f"/npm/{name}/-/{file_name(name, version)}", data)
    return data


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    work = tmp_path_factory.mktemp("tiers")
    up = Upstream().start()
    index = IndexUpstream(json=True).start()
    gitup = GitUpstream(work / "git-up").start()
    daemons: list[Daemon] = []
    try:
        up.add("/files/tool.bin", os.urandom(100_000))
        up.add("/files/held.txt", b"held by the node\n")
        up.add("/files/latest.json", b'{"v": 1}', content_type="application/json")
        npm_data = {n: _npm_publish(up, n, "1.0.0") for n in ("tier-pkg", "tier-held")}
        crate = Crate(CrateSpec("tiercrate", "0.1.0"), os.urandom(3000))
        cargo_publish(up, [crate])
        for tail, data in proxy_tree([GO_MOD]).items():
            up.add(f"/goproxy/{tail}", data)
        sumdb = SumDB(SUMDB_NAME, [GO_MOD])
        for tail, data in sumdb.files().items():
            up.add(f"/sumdb/{tail}", data)
        chart = os.urandom(2000)
        up.add("/charts/index.yaml", yaml.safe_dump({"apiVersion": "v1", "entries": {"demo": [{
            "name": "demo", "version": "1.0.0", "digest": hashlib.sha256(chart).hexdigest(),
            "urls": [up.url("/charts/demo-1.0.0.tgz")]}]}}).encode())
        up.add("/charts/demo-1.0.0.tgz", chart)
        jar = os.urandom(5000)
        up.add(f"/maven2/{MVN_JAR}", jar)
        up.add(f"/maven2/{MVN_JAR}.sha1", hashlib.sha1(jar).hexdigest().encode())
        index.add("tier-wheel", wheel("tier-wheel", "1.0")).add("tier-held", wheel("tier-held", "2.0"))
        gitup.create("app", files={"README": "tiers\n"})

        central = Daemon(work / "central", {
            "files": {"type": "generic", "upstream": up.url("/files"), "mutable_patterns": [r"latest\.json$"],
                      "cache": TTL},
            "py": {"type": "pypi", "upstream": index.index_url, "cache": TTL},
            "js": {"type": "npm", "upstream": up.url("/npm"), "cache": TTL},
            "crates": {"type": "cargo", "upstream": up.url("/index"), "cache": TTL},
            "gomods": {"type": "go", "upstream": up.url("/goproxy"), "sumdb": {SUMDB_NAME: up.url("/sumdb")}},
            "mvn": {"type": "maven", "upstream": up.url("/maven2")},
            "charts": {"type": "helm", "upstream": up.url("/charts")},
            "hub": oci_remote(NOWHERE, registries=["docker.io"], tag_ttl="1s"),
            "pushed": {"type": "oci-local"},  # the front's URL is set below
            "ccache": {"type": "kv"},
        }, extra={"git": {"repos": {"app": gitup.url("app")}, "fetch_interval": "1h"}},
           # Reads need a token at the central: the nodes present theirs (the config's placeholder).
           auth={"anonymous_read": False},
           env={"SPARKCACHE_READ_TOKEN": CENTRAL_TOKEN, "SPARKCACHE_WRITE_TOKEN": PUSH_TOKEN})
        daemons.append(central)
        with running_registry(work / "registry") as registry:
            layout = work / "layout"
            image = build_image(layout, "one", {"bin/tool": os.urandom(150_000)}, arch="amd64")
            registry.push(layout, "one", "library/tiny:1.0")
            front = Front(registry.url).start()
            central.remotes["hub"]["upstream"] = front.url
            central.start()
            resp = central.get("/setup/node?data_dir=/ignored", headers=READ)
            assert resp.status == 200, resp.body
            text = resp.body.decode()
            node_cfg = yaml.safe_load(text)
            # Two nodes from the same config: the second finds everything at the central.
            node, node2 = (Daemon(work / name, node_cfg["remotes"], extra={"git": node_cfg["git"]},
                                  env={"SPARKCACHE_CENTRAL_TOKEN": CENTRAL_TOKEN})
                           for name in ("node", "node2"))
            daemons += [node, node2]
            node.start()
            node2.start()
            yield SimpleNamespace(up=up, index=index, gitup=gitup, front=front, central=central, node=node, node2=node2,
                                  text=text, cfg=node_cfg, image=image, crate=crate, npm_data=npm_data, jar=jar, chart=chart, sumdb=sumdb,
                                  work=work)
            front.stop()
    finally:
        for d in daemons:
            d.close()
        gitup.stop()
        index.stop()
        up.stop()


def test_setup_node_lists_every_remote_pointing_at_the_central(chain: SimpleNamespace) -> None:
    base = chain.central.base_url
    remotes = chain.cfg["remotes"]
    # The central refuses anonymous reads: every upstream carries the token placeholder.
    for name, r in remotes.items():
        assert r.pop("credentials") == {"token_env": "SPARKCACHE_CENTRAL_TOKEN"}, name
    ttl = {"mutable_ttl": "1s"}
    assert remotes["files"] == {"type": "generic", "upstream": f"{base}/api/files",
                                "mutable_patterns": [r"latest\.json$"], "cache": ttl}
    assert remotes["py"] == {"type": "pypi", "upstream": f"{base}/pypi/py/simple", "cache": ttl}
    assert remotes["js"] == {"type": "npm", "upstream": f"{base}/npm/js", "cache": ttl}
    assert remotes["crates"] == {"type": "cargo", "upstream": f"{base}/cargo/crates/index", "cache": ttl}
    assert remotes["gomods"] == {"type": "go", "upstream": f"{base}/go/gomods",
                                 "sumdb": {SUMDB_NAME: f"{base}/go/gomods/sumdb/{SUMDB_NAME}"}}
    assert remotes["mvn"] == {"type": "maven", "upstream": f"{base}/maven/mvn"}
    assert remotes["hub"] == {"type": "oci", "upstream": f"{base}/v2/hub", "registries": ["docker.io"],
                              "tag_ttl": "1s"}
    # A build cache written by clients has nothing to pull: left out, said so.
    assert remotes["charts"] == {"type": "helm", "upstream": f"{base}/api/charts"}
    # Images pushed to the central are pulled through the node's mirror of that repository.
    assert remotes["pushed"] == {"type": "oci", "upstream": f"{base}/v2/pushed"}
    assert set(remotes) == {"files", "py", "js", "crates", "gomods", "mvn", "charts", "hub", "pushed"}
    assert "ccache (type: kv)" in chain.text and "SPARKCACHE_CENTRAL_TOKEN in the daemon's environment" in chain.text
    host = base.split("://")[1]
    assert chain.cfg["git"] == {"repos": {"app": f"{base}/git/app"}, "credentials": {
        host: {"username": "token", "token_env": "SPARKCACHE_CENTRAL_TOKEN"}}}
    assert chain.cfg["storage"] == {"data_dir": "/ignored"}
    assert CENTRAL_TOKEN not in chain.text
    # The CLI prints the same.
    cli = subprocess.run([sys.executable, "-m", "sparkcache.cli", "--url", base, "setup", "node",
                          "--param", "data_dir=/ignored"], env=daemon_env({"SPARKCACHE_TOKEN": CENTRAL_TOKEN}),
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and cli.stdout == chain.text, cli.stderr


def test_generic_files_come_from_upstream_once(chain: SimpleNamespace) -> None:
    node, central, up = chain.node, chain.central, chain.up
    first = node.get("/api/files/tool.bin")
    assert first.status == 200 and first.body == up.files["/files/tool.bin"].data
    # Again from the node, from the second node and from the central: upstream is not asked again.
    for d in (node, chain.node2, central):
        again = d.get("/api/files/tool.bin", headers=READ if d is central else None)
        assert again.status == 200 and again.body == first.body
    assert up.count("/files/tool.bin") == 1


def ctr_pull(ctrd: SimpleNamespace, ns: str, node: Daemon, image: Any, tmp_path: Path) -> None:
    """``ctr image pull`` of docker.io/library/tiny:1.0 into namespace ``ns``, with ``node`` as docker.io's mirror."""
    ref = "docker.io/library/tiny:1.0"
    hosts = tmp_path / ns / "docker.io"
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(f'server = "{NOWHERE}"\n[host."{node.base_url}"]\n'
                                      '  capabilities = ["pull", "resolve"]\n')
    ctr(ctrd, ns, "image", "pull", "--hosts-dir", str(tmp_path / ns), ref)
    listed = [ln.split() for ln in ctr(ctrd, ns, "images", "ls").splitlines()[1:]]
    assert [cols[2] for cols in listed if cols[0] == ref] == [image.digest]


def test_oci_ctr_pull_through_node_and_central(chain: SimpleNamespace, tmp_path: Path) -> None:
    node, front, image = chain.node, chain.front, chain.image
    with private_containerd() as ctrd:
        # A pull through the node, then one through the second node.
        ctr_pull(ctrd, "first", node, image, tmp_path)
        ctr_pull(ctrd, "second", chain.node2, image, tmp_path)
    assert front.count("GET", "/v2/library/tiny/manifests/1.0") == 1, front.describe()
    for blob in image.blobs():
        assert front.count("GET", f"/blobs/{blob.digest}", status=200) == 1, front.describe()
    # Digests and their header survive two tiers, by tag and by digest.
    accept = {"Accept": image.media_type}
    for ref in ("1.0", image.digest):
        resp = node.get(f"/v2/library/tiny/manifests/{ref}?ns=docker.io", headers=accept)
        assert resp.status == 200 and resp.header("Docker-Content-Digest") == image.digest
        assert "sha256:" + hashlib.sha256(resp.body).hexdigest() == image.digest
        via_path = node.get(f"/v2/hub/library/tiny/manifests/{ref}", headers=accept)
        assert via_path.header("Docker-Content-Digest") == image.digest
    for blob in image.blobs():
        head = node.head(f"/v2/library/tiny/blobs/{blob.digest}?ns=docker.io")
        assert head.status == 200 and head.header("Docker-Content-Digest") == blob.digest
        assert head.header("Content-Length") == str(blob.size)


def test_an_image_pushed_to_the_central_is_pulled_through_the_node(chain: SimpleNamespace, tmp_path: Path) -> None:
    skopeo = require_tool("skopeo")
    image = pushed_image(tmp_path / "src", "v1", [50_000, 3_000], seed=11)
    run_checked([skopeo, "copy", "--preserve-digests", "--dest-tls-verify=false", "--dest-creds",
                 f"ci:{PUSH_TOKEN}", image.ref, f"docker://127.0.0.1:{chain.central.port}/pushed/team/app:v1"],
                timeout=60)
    for d in (chain.node, chain.node2):
        out = tmp_path / f"out-{d.port}"
        run_checked([skopeo, "copy", "--src-tls-verify=false", f"docker://127.0.0.1:{d.port}/pushed/team/app:v1",
                     f"dir:{out}"], timeout=60)
        assert "sha256:" + hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest() == image.manifest_digest
        for digest in (image.config_digest, *image.layer_digests):
            assert "sha256:" + hashlib.sha256((out / digest.split(":")[1]).read_bytes()).hexdigest() == digest
        head = d.head("/v2/pushed/team/app/manifests/v1")
        assert head.header("Docker-Content-Digest") == image.manifest_digest


def test_pip_installs_through_the_chain(chain: SimpleNamespace, tmp_path: Path) -> None:
    node, central, index = chain.node, chain.central, chain.index
    url = f"{node.base_url}/pypi/py/simple/"
    ok(pip(url, tmp_path / "t1", "tier-wheel==1.0", tmp=tmp_path))
    assert installed(tmp_path / "t1", "tier_wheel") == "tier-wheel==1.0"
    # uv through the second node: the central has the file.
    ok(uv(f"{chain.node2.base_url}/pypi/py/simple/", tmp_path / "t2", "tier-wheel==1.0", tmp=tmp_path))
    assert installed(tmp_path / "t2", "tier_wheel") == "tier-wheel==1.0"
    w = index.projects["tier-wheel"][0]
    assert index.count(f"/packages/{w.filename}") == 1
    # URLs are the node's, hashes the upstream's, in both forms of the page.
    page = node.get("/pypi/py/simple/tier-wheel/", headers={"Accept": JSON_TYPE}).json()
    (f,) = page["files"]
    assert f["url"].startswith(f"{node.base_url}/pypi/py/files/") and f["hashes"] == {"sha256": w.sha256}
    html = node.get("/pypi/py/simple/tier-wheel/", headers={"Accept": "text/html"}).body.decode()
    assert f"{node.base_url}/pypi/py/files/" in html and f"#sha256={w.sha256}" in html
    assert central.base_url not in html and central.base_url not in json.dumps(page)


def test_npm_installs_through_the_chain(chain: SimpleNamespace, tmp_path: Path) -> None:
    node, central, up = chain.node, chain.central, chain.up
    registry = f"{node.base_url}/npm/js/"
    app = project(tmp_path / "app", {"tier-pkg": "1.0.0"})
    install("npm", app, registry, tmp_path / "home")
    assert installed_version(app, "tier-pkg") == "1.0.0"
    app2 = project(tmp_path / "app2", {"tier-pkg": "1.0.0"})
    install("npm", app2, f"{chain.node2.base_url}/npm/js/", tmp_path / "home2")
    assert installed_version(app2, "tier-pkg") == "1.0.0"
    doc = node.get("/npm/js/tier-pkg", headers={"Accept": "application/json"}).json()
    dist = doc["versions"]["1.0.0"]["dist"]
    assert dist["tarball"] == f"{node.base_url}/npm/js/tier-pkg/-/tier-pkg-1.0.0.tgz"
    assert dist["integrity"] == integrity(chain.npm_data["tier-pkg"])
    assert central.base_url not in json.dumps(doc)
    assert up.count("/npm/tier-pkg/-/tier-pkg-1.0.0.tgz") == 1


def test_cargo_index_and_crate_through_the_chain(chain: SimpleNamespace) -> None:
    node, up, crate = chain.node, chain.up, chain.crate
    config = node.get("/cargo/crates/index/config.json").json()
    assert config["dl"].startswith(f"{node.base_url}/cargo/crates/") and "api" not in config
    line = node.get(f"/cargo/crates/index/{index_path('tiercrate')}")
    assert line.status == 200 and crate.cksum in line.body.decode()
    for _ in range(2):
        got = node.get("/cargo/crates/crates/tiercrate/0.1.0/download")
        assert got.status == 200 and got.body == crate.data
    assert up.count("/dl/ti/er/tiercrate/tiercrate-0.1.0.crate") == 1


def go_download(node: Daemon, sumdb: SumDB, home: Path) -> None:
    """``go mod download`` of GO_MOD through ``node``, in a fresh module cache, checked against ``sumdb``."""
    (home / "tmp").mkdir(parents=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "GOPATH": str(home / "gopath"),
           "GOMODCACHE": str(home / "modcache"), "GOCACHE": str(home / "gocache"), "GOFLAGS": "-modcacherw",
           "GOTOOLCHAIN": "local", "GOPROXY": f"{node.base_url}/go/gomods", "GOSUMDB": sumdb.gosumdb,
           "TMPDIR": str(home / "tmp")}
    out = run_checked([require_tool("go"), "mod", "download", "-json", f"{GO_MOD.module}@{GO_MOD.version}"],
                      cwd=home, env=env)
    assert json.loads(out.stdout)["Version"] == GO_MOD.version


def test_go_mod_download_through_the_chain(chain: SimpleNamespace, tmp_path: Path) -> None:
    go_download(chain.node, chain.sumdb, tmp_path / "a")
    go_download(chain.node2, chain.sumdb, tmp_path / "b")
    assert chain.up.count("/goproxy/example.test/tierlib/@v/v1.0.0.zip") == 1
    # The module was checked against the checksum database, reached through both tiers only.
    assert chain.up.count("/sumdb/lookup/example.test/tierlib@v1.0.0") == 1


def test_maven_artifact_and_checksum_through_the_chain(chain: SimpleNamespace) -> None:
    node, up = chain.node, chain.up
    for _ in range(2):
        got = node.get(f"/maven/mvn/{MVN_JAR}")
        assert got.status == 200 and got.body == chain.jar
    assert node.get(f"/maven/mvn/{MVN_JAR}.sha1").body.decode().strip() == hashlib.sha1(chain.jar).hexdigest()
    assert up.count(f"/maven2/{MVN_JAR}") == 1


def test_helm_index_and_chart_through_the_chain(chain: SimpleNamespace) -> None:
    node, up = chain.node, chain.up
    index = yaml.safe_load(node.get("/api/charts/index.yaml").body)
    (entry,) = index["entries"]["demo"]
    assert entry["urls"] == [f"{node.base_url}/api/charts/demo-1.0.0.tgz"]
    assert entry["digest"] == hashlib.sha256(chain.chart).hexdigest()
    for d in (node, chain.node2):
        got = d.get("/api/charts/demo-1.0.0.tgz")
        assert got.status == 200 and got.body == chain.chart
    assert up.count("/charts/demo-1.0.0.tgz") == 1


def git_clone(node: Daemon, gitup: GitUpstream, dest: Path) -> None:
    git("clone", "-q", f"{node.base_url}/git/app", str(dest))
    assert (dest / "README").read_text() == "tiers\n"
    head = subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert head == gitup.rev("main", "app")


def test_git_clone_from_a_node_mirror_of_the_central(chain: SimpleNamespace, tmp_path: Path) -> None:
    git_clone(chain.node, chain.gitup, tmp_path / "clone")


def test_node_serves_stale_while_the_central_is_down(chain: SimpleNamespace, tmp_path: Path) -> None:
    with private_containerd() as ctrd:
        node_serves_stale(chain, tmp_path, ctrd)


def node_serves_stale(chain: SimpleNamespace, tmp_path: Path, ctrd: SimpleNamespace) -> None:
    node, central = chain.node, chain.central
    # path → (request headers, whether the entry is mutable: served STALE once its 1 s TTL is over)
    held = {
        "/api/files/held.txt": (None, False),
        "/api/files/latest.json": (None, True),
        "/pypi/py/simple/tier-held/": ({"Accept": JSON_TYPE}, True),
        "/npm/js/tier-held": ({"Accept": "application/json"}, True),
        "/maven/mvn/" + MVN_JAR: (None, False),
        f"/cargo/crates/index/{index_path('tiercrate')}": (None, True),
        "/v2/hub/library/tiny/manifests/1.0": ({"Accept": chain.image.media_type}, True),
    }
    ok(pip(f"{node.base_url}/pypi/py/simple/", tmp_path / "warm", "tier-held==2.0", tmp=tmp_path))
    go_download(node, chain.sumdb, tmp_path / "go-warm")
    ctr_pull(ctrd, "warm", node, chain.image, tmp_path)
    before = {}
    for path, (headers, _) in held.items():
        resp = node.get(path, headers=headers)
        assert resp.status == 200, (path, resp.status, resp.body[:300])
        before[path] = resp.body
    time.sleep(1.2)  # the mutable entries' TTL (1 s) runs out: the node must ask the central again
    central.kill()  # down hard, as a crashed or unreachable central is
    try:
        for path, (headers, mutable) in held.items():
            resp = node.get(path, headers=headers)
            assert resp.status == 200 and resp.body == before[path], (path, resp.status, resp.body[:300])
            assert resp.header("X-Cache") == ("STALE" if mutable else "HIT"), (path, resp.header("X-Cache"))
        # What the node lacks: each protocol's own error, never a hang or HTML.
        lacking = {
            "/api/files/never.bin": None,
            "/pypi/py/simple/never-fetched/": {"Accept": JSON_TYPE},
            "/npm/js/never-fetched": {"Accept": "application/json"},
            "/maven/mvn/org/example/never/1.0/never-1.0.jar": None,
            "/cargo/crates/index/ne/ve/never": None,
            "/go/gomods/example.test/never/@v/list": None,
            "/v2/hub/library/never/manifests/1.0": None,
        }
        for path, headers in lacking.items():
            resp = node.get(path, headers=headers)
            assert resp.status in (404, 502, 503, 504), (path, resp.status, resp.body[:300])
            assert not resp.body.lstrip().startswith(b"<"), (path, resp.body[:300])
        # pip still installs what the node holds.
        ok(pip(f"{node.base_url}/pypi/py/simple/", tmp_path / "stale", "tier-held==2.0", tmp=tmp_path))
        assert installed(tmp_path / "stale", "tier_held") == "tier-held==2.0"
        # containerd pulls the image it has not got, go downloads into an empty module cache
        # (checked against the checksum database's answers the node holds), git clones the node's mirror.
        ctr_pull(ctrd, "stale", node, chain.image, tmp_path)
        go_download(node, chain.sumdb, tmp_path / "go-stale")
        git_clone(node, chain.gitup, tmp_path / "clone")
    finally:
        central.start()
