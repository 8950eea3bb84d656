"""``/setup/<kind>`` over in-memory HTTP through the daemon's real root: the snippets
protocols add (OCI: containerd, rke2, docker; apt, apk, dnf, helm; git) and the
registry token endpoint. The shell snippets are run, against private trees."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from sparkcache.protocols import load_config_data
from tests.support.client import assert_json_error, basic, bearer
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401

READ = "rd-91aa5e"
TOKENS = [{"name": "r", "token": READ, "scopes": ["read"]}]
CONFIG: dict[str, Any] = {
    "auth": {"anonymous_read": True, "tokens": TOKENS},
    "remotes": {"hub": {"type": "oci", "upstream": UPSTREAM, "registries": ["docker.io"]},
                "gh": {"type": "oci", "upstream": UPSTREAM, "registries": ["ghcr.io"]}},
}


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


@pytest_twisted.ensureDeferred
async def test_snippets_point_nodes_at_this_cache(h: Harness) -> None:
    toml = await h.get("/setup/containerd?registry=ghcr.io")
    assert toml.status == 200 and toml.header("Content-Type") == "application/toml; charset=utf-8"
    assert toml.header("X-Install-Path") == "/etc/containerd/certs.d/ghcr.io/hosts.toml"
    assert '[host."http://cache.test"]' in toml.body.decode() and 'server = "https://ghcr.io"' in toml.body.decode()
    rke2 = (await h.get("/setup/rke2")).body.decode()
    assert '"docker.io":' in rke2 and '"^(.*)$": "hub/$1"' in rke2 and '"^(.*)$": "gh/$1"' in rke2
    docker = await h.get("/setup/docker")
    assert json.loads(docker.body) == {"registry-mirrors": ["http://cache.test"], "insecure-registries": ["cache.test"]}
    head = await h.head("/setup/docker")
    assert head.status == 200 and head.body == b"" and head.header("Content-Length") == str(len(docker.body))


@pytest_twisted.ensureDeferred
async def test_snippets_use_the_public_url(harness_factory: MakeHarness) -> None:
    h = await harness_factory({**CONFIG, "server": {"public_url": "https://cache.example:8443"}})
    toml = await h.get("/setup/containerd?registry=docker.io")
    assert '[host."https://cache.example:8443"]' in toml.body.decode()
    assert 'server = "https://registry-1.docker.io"' in toml.body.decode()


@pytest_twisted.ensureDeferred
async def test_errors_are_json(h: Harness) -> None:
    kinds = assert_json_error(await h.get("/setup/"), 404)
    assert "containerd, docker, rke2" in kinds["error"]
    assert_json_error(await h.get("/setup/nothing"), 404)
    assert "choose one registry" in assert_json_error(await h.get("/setup/containerd"), 400)["error"]
    assert_json_error(await h.get("/setup/containerd?registry=quay.io"), 404)
    assert_json_error(await h.get("/setup/docker?registry=ghcr.io"), 404)
    posted = await h.post("/setup/containerd?registry=docker.io")
    assert_json_error(posted, 405)
    assert posted.header("Allow") == "GET, HEAD"


@pytest_twisted.ensureDeferred
async def test_without_oci_remotes_there_is_nothing_to_set_up(harness_factory: MakeHarness) -> None:
    h = await harness_factory({"remotes": {"files": {"type": "generic", "upstream": UPSTREAM}}})
    assert "none" in assert_json_error(await h.get("/setup/"), 404)["error"]
    assert_json_error(await h.get("/setup/containerd?registry=docker.io"), 404)
    assert_json_error(await h.get("/setup/token"), 404)


@pytest_twisted.ensureDeferred
async def test_snippets_need_the_read_scope_when_anonymous_reads_are_off(harness_factory: MakeHarness) -> None:
    h = await harness_factory({**CONFIG, "auth": {"anonymous_read": False, "tokens": TOKENS}})
    assert_json_error(await h.get("/setup/rke2"), 401)
    assert (await h.get("/setup/rke2", bearer(READ))).status == 200


@pytest_twisted.ensureDeferred
async def test_the_token_endpoint_hands_back_what_the_client_may_use(h: Harness, harness_factory: MakeHarness) -> None:
    anonymous = await h.get("/setup/token")
    assert anonymous.status == 200 and anonymous.json()["token"] == "anonymous"
    assert anonymous.header("Cache-Control") == "no-store"
    assert (await h.get("/setup/token", basic("ci", READ))).json()["token"] == READ
    form = await h.post("/setup/token", f"grant_type=password&username=ci&password={READ}".encode(),
                        {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    assert form.status == 200 and form.json()["access_token"] == READ
    wrong = await h.get("/setup/token", basic("ci", "wrong"))
    assert_json_error(wrong, 401)
    assert wrong.header("WWW-Authenticate") == 'Basic realm="sparkcache"'
    closed = await harness_factory({**CONFIG, "auth": {"anonymous_read": False, "tokens": TOKENS}})
    assert_json_error(await closed.get("/setup/token"), 401)
    assert (await closed.get("/setup/token", basic("ci", READ))).json()["token"] == READ


# -- package managers (generic remotes) and git -------------------------------------------

PACKAGES: dict[str, Any] = {
    "server": {"public_url": "http://cache.example:8090"},
    "remotes": {
        "debian": {"type": "deb", "upstream": "https://deb.mirror.example/debian"},
        "security": {"type": "deb", "upstream": ["https://sec.mirror.example/debian-security",
                                                  "https://sec2.mirror.example/debian-security"]},
        "alpine": {"type": "alpine", "upstream": "https://apk.mirror.example/alpine"},
        "fedora": {"type": "rpm", "upstream": "https://rpm.mirror.example/fedora/linux"},
        "charts": {"type": "helm", "upstream": "https://charts.example/stable"},
    },
}


def run_script(script: bytes, root: Path) -> str:
    """Runs a /setup shell script against a private tree (ROOT=), as a node would against /."""
    proc = subprocess.run(["sh", "-s"], input=script, env={"ROOT": str(root), "PATH": os.environ["PATH"]},
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest_twisted.ensureDeferred
async def test_apt_script_points_existing_sources_at_the_remotes(harness_factory: MakeHarness, tmp_path: Path) -> None:
    h = await harness_factory(PACKAGES)
    resp = await h.get("/setup/apt")
    assert resp.status == 200 and resp.header("Content-Type") == "text/x-shellscript; charset=utf-8"
    tree(tmp_path, {
        "etc/apt/sources.list": "deb https://deb.mirror.example/debian bookworm main\n"
                                "deb http://deb.mirror.example/debian-backports bookworm-backports main\n"
                                "deb http://sec2.mirror.example/debian-security bookworm-security main\n",
        "etc/apt/sources.list.d/debian.sources": "Types: deb\nURIs: https://deb.mirror.example/debian/\n"
                                                 "Suites: bookworm\nSigned-By: /usr/share/keyrings/k.gpg\n",
        "etc/apt/sources.list.d/other.list": "deb https://elsewhere.example/debian bookworm main\n",
    })
    printed = run_script(resp.body, tmp_path)
    assert (tmp_path / "etc/apt/sources.list").read_text() == (
        "deb http://cache.example:8090/api/debian bookworm main\n"
        # A longer path under another name is not the remote's upstream.
        "deb http://deb.mirror.example/debian-backports bookworm-backports main\n"
        "deb http://cache.example:8090/api/security bookworm-security main\n")
    assert "URIs: http://cache.example:8090/api/debian/\n" in (tmp_path / "etc/apt/sources.list.d/debian.sources").read_text()
    assert (tmp_path / "etc/apt/sources.list.d/other.list").read_text() == "deb https://elsewhere.example/debian bookworm main\n"
    assert "other.list" not in printed and "sources.list\n" in printed
    # A second run finds nothing left to rewrite.
    assert run_script(resp.body, tmp_path) == ""
    # ?remote= limits the script to one remote.
    only = (await h.get("/setup/apt?remote=security")).body.decode()
    assert "sec\\.mirror" in only and "deb\\.mirror" not in only
    assert_json_error(await h.get("/setup/apt?remote=alpine"), 404)


@pytest_twisted.ensureDeferred
async def test_apk_and_dnf_scripts(harness_factory: MakeHarness, tmp_path: Path) -> None:
    h = await harness_factory(PACKAGES)
    tree(tmp_path, {
        "etc/apk/repositories": "https://apk.mirror.example/alpine/v3.20/main\n@edge https://apk.mirror.example/alpine/edge/testing\n",
        "etc/yum.repos.d/fedora.repo": "[fedora]\nname=Fedora\n"
                                       "#baseurl=https://rpm.mirror.example/fedora/linux/releases/$releasever/Everything/$basearch/os/\n"
                                       "metalink=https://mirrors.example/metalink?repo=fedora-$releasever\ngpgcheck=1\n",
        "etc/yum.repos.d/other.repo": "[other]\nmetalink=https://mirrors.example/metalink?repo=other\n",
    })
    run_script((await h.get("/setup/apk")).body, tmp_path)
    assert (tmp_path / "etc/apk/repositories").read_text() == (
        "http://cache.example:8090/api/alpine/v3.20/main\n@edge http://cache.example:8090/api/alpine/edge/testing\n")
    run_script((await h.get("/setup/dnf")).body, tmp_path)
    assert (tmp_path / "etc/yum.repos.d/fedora.repo").read_text() == (
        "[fedora]\nname=Fedora\n"
        "baseurl=http://cache.example:8090/api/fedora/releases/$releasever/Everything/$basearch/os/\n"
        "#metalink=https://mirrors.example/metalink?repo=fedora-$releasever\ngpgcheck=1\n")
    assert (tmp_path / "etc/yum.repos.d/other.repo").read_text() == "[other]\nmetalink=https://mirrors.example/metalink?repo=other\n"


@pytest_twisted.ensureDeferred
async def test_helm_repo_add_lines(harness_factory: MakeHarness) -> None:
    h = await harness_factory(PACKAGES)
    text = (await h.get("/setup/helm")).body.decode()
    assert "helm repo add --force-update charts http://cache.example:8090/api/charts/\n" in text
    assert "--password" not in text
    closed = await harness_factory({**PACKAGES, "auth": {"anonymous_read": False, "tokens": TOKENS}})
    text = (await closed.get("/setup/helm", bearer(READ))).body.decode()
    assert '--username token --password "$SPARKCACHE_TOKEN"' in text and READ not in text


@pytest_twisted.ensureDeferred
async def test_only_configured_tools_are_offered(harness_factory: MakeHarness) -> None:
    h = await harness_factory({"remotes": {"alpine": PACKAGES["remotes"]["alpine"]}})
    listed = assert_json_error(await h.get("/setup/"), 404)["error"]
    assert "apk" in listed and "apt" not in listed and "git" not in listed
    assert "no type: deb remote" in assert_json_error(await h.get("/setup/apt"), 404)["error"]
    # Remotes change at runtime (reload, /admin/remotes): the tools follow.
    more = load_config_data({"remotes": PACKAGES["remotes"]}, environ={})
    h.ctx.config = replace(h.ctx.config, remotes=more.remotes)
    assert "apt, dnf, helm" in assert_json_error(await h.get("/setup/"), 404)["error"]
    assert (await h.get("/setup/apt")).status == 200


GIT: dict[str, Any] = {
    "server": {"public_url": "http://cache.example:8090"},
    "git": {"repos": {"app": "https://forge.example/org/app.git"},
            "allowed_hosts": ["forge.example", "http://127.0.0.1:8999"]},
}


@pytest_twisted.ensureDeferred
async def test_git_insteadof_and_pushinsteadof(harness_factory: MakeHarness, tmp_path: Path) -> None:
    h = await harness_factory(GIT)
    resp = await h.get("/setup/git")
    assert resp.status == 200, resp.body
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "GIT_CONFIG_NOSYSTEM": "1"}
    for _ in range(2):  # a second run changes nothing
        subprocess.run(["sh", "-s"], input=resp.body, env=env, check=True, timeout=30)
    config = subprocess.run(["git", "config", "--global", "--list"], env=env, capture_output=True, text=True,
                            check=True).stdout.splitlines()
    assert sorted(config) == sorted([
        "url.http://cache.example:8090/git/forge.example/.insteadof=https://forge.example/",
        "url.http://cache.example:8090/git/forge.example/.insteadof=git@forge.example:",
        "url.http://cache.example:8090/git/forge.example/.insteadof=ssh://git@forge.example/",
        "url.http://cache.example:8090/git/127.0.0.1:8999/.insteadof=http://127.0.0.1:8999/",
        "url.http://cache.example:8090/git/app.insteadof=https://forge.example/org/app.git",
        "url.https://forge.example/.pushinsteadof=https://forge.example/",
        "url.git@forge.example:.pushinsteadof=git@forge.example:",
        "url.ssh://git@forge.example/.pushinsteadof=ssh://git@forge.example/",
        "url.http://127.0.0.1:8999/.pushinsteadof=http://127.0.0.1:8999/",
        "url.https://forge.example/org/app.git.pushinsteadof=https://forge.example/org/app.git",
    ])

    def urls(url: str) -> tuple[str, str]:
        repo = tmp_path / "r"
        subprocess.run(["git", "init", "-q", str(repo)], env=env, check=True)
        subprocess.run(["git", "-C", str(repo), "remote", "add", "o", url], env=env, check=True)
        get = subprocess.run(["git", "-C", str(repo), "remote", "get-url", "o"], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        push = subprocess.run(["git", "-C", str(repo), "remote", "get-url", "--push", "o"], env=env,
                              capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run(["rm", "-rf", str(repo)], check=True)
        return get, push

    assert urls("https://forge.example/org/app.git") == ("http://cache.example:8090/git/app",
                                                          "https://forge.example/org/app.git")
    assert urls("git@forge.example:org/lib.git") == ("http://cache.example:8090/git/forge.example/org/lib.git",
                                                      "git@forge.example:org/lib.git")
    assert urls("https://elsewhere.example/x.git") == ("https://elsewhere.example/x.git",) * 2

    gitconfig = (await h.get("/setup/git?format=gitconfig")).body.decode()
    assert '[url "http://cache.example:8090/git/app"]\n\tinsteadOf = "https://forge.example/org/app.git"\n' in gitconfig
    assert_json_error(await h.get("/setup/git?format=xml"), 400)


@pytest_twisted.ensureDeferred
async def test_git_setup_without_repositories(harness_factory: MakeHarness) -> None:
    h = await harness_factory({"git": {"fetch_interval": "30s"}})
    assert "git" not in assert_json_error(await h.get("/setup/"), 404)["error"]
    assert_json_error(await h.get("/setup/git"), 404)
