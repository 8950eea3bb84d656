"""Git mirrors at fleet scale, end to end: forge webhooks (GitHub, GitLab, Gitea,
Forgejo) with valid and invalid signatures, a push + webhook visible to ``git
fetch`` through the cache, and the check loop over 1,000 real tiny mirrors
staying under its per-host rate cap. A real daemon, a real upstream (git
http-backend), the real git client."""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import time
from pathlib import Path
from typing import Any

from tests.support.client import eventually
from tests.support.git_upstream import (  # noqa: F401 - fixture
    GitUpstream,
    git,
    git_client,
    git_daemon_config,
    git_upstream_factory,
)

SECRETS = {"github": "gh-hook-8d1f", "gitlab": "gl-hook-22aa", "gitea": "gt-hook-93b0", "forgejo": "fj-hook-4c7e"}


def ls_remote(url: str, home: Path) -> dict[str, str]:
    out = git_client("ls-remote", url, home=home).stdout
    return {line.split("\t")[1]: line.split("\t")[0] for line in out.splitlines() if "\t" in line}


def push_event(forge: str, up: GitUpstream, name: str, after: str, secret: str | None,
               tamper: bool = False) -> tuple[dict[str, str], bytes]:
    """The headers and body a forge sends for a push to ``name`` (signed with ``secret``)."""
    url = up.url(name)
    if forge == "gitlab":
        payload: dict[str, Any] = {"object_kind": "push", "ref": "refs/heads/main", "after": after,
                                   "project": {"git_http_url": url, "web_url": url[:-4]}}
    else:
        payload = {"ref": "refs/heads/main", "after": after,
                   "repository": {"clone_url": url, "html_url": url[:-4], "ssh_url": f"git@127.0.0.1:{name}.git"}}
    body = json.dumps(payload).encode()
    sig = hmac.new((secret or "").encode(), body, hashlib.sha256).hexdigest()
    if tamper:
        body = body.replace(b"refs/heads/main", b"refs/heads/evil")
    headers = {"Content-Type": "application/json"}
    if forge == "github":
        headers.update({"X-GitHub-Event": "push", "X-Hub-Signature-256": f"sha256={sig}"})
    elif forge == "gitlab":
        headers.update({"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": secret or ""})
    elif forge == "gitea":
        headers.update({"X-Gitea-Event": "push", "X-GitHub-Event": "push", "X-Gitea-Signature": sig,
                        "X-Hub-Signature-256": f"sha256={sig}"})
    else:
        headers.update({"X-Forgejo-Event": "push", "X-Gitea-Event": "push", "X-Forgejo-Signature": sig,
                        "X-Gitea-Signature": sig})
    if secret is None:
        for k in ("X-Hub-Signature-256", "X-Gitlab-Token", "X-Gitea-Signature", "X-Forgejo-Signature"):
            headers.pop(k, None)
    return headers, body


def test_webhooks_from_each_forge_refresh_at_once(git_upstream_factory: Any, daemon_factory: Any,
                                                 tmp_path: Path) -> None:
    up: GitUpstream = git_upstream_factory()
    up.create("app")
    webhooks = {f: {"secret": s} for f, s in SECRETS.items() if f != "github"}
    webhooks["github"] = {"secret_env": "GH_HOOK"}
    # An hour between checks: only a webhook (or a clone an hour later) brings a push.
    d = daemon_factory(extra=git_daemon_config({"app": up.url("app")}, webhooks=webhooks),
                       env={"GH_HOOK": SECRETS["github"]})
    home = tmp_path / "home"
    c = tmp_path / "c"
    git_client("clone", "-q", d.url("/git/app"), str(c), home=home)
    for forge, secret in SECRETS.items():
        sha = up.commit({f"{forge}.txt": f"pushed, then {forge} told us\n"}, f"via {forge}", name="app")
        bads: list[dict[str, Any]] = [dict(secret="not-the-secret"), dict(secret=None)]
        if forge != "gitlab":  # GitLab's token is the secret itself: it signs no body
            bads.append(dict(secret=secret, tamper=True))
        for bad in bads:
            headers, body = push_event(forge, up, "app", sha, **bad)
            r = d.request("POST", "/git/webhook", headers=headers, body=body)
            assert r.status == 401, (forge, bad, r.describe())
            assert r.headers["content-type"].startswith("application/json") and "signature" in r.body.decode()
        # nothing was fetched for a bad signature: the cache still shows the old tip
        assert ls_remote(d.url("/git/app"), home)["refs/heads/main"] != sha
        headers, body = push_event(forge, up, "app", sha, secret)
        r = d.request("POST", "/git/webhook", headers=headers, body=body)
        assert r.status == 202, r.describe()
        # Visible to git fetch through the cache long before the loop's next check (an
        # hour away): the webhook brought it. Within a second on a quiet machine; the
        # bound leaves room for a loaded CI box, where a fetch can take several.
        eventually(lambda: ls_remote(d.url("/git/app"), home).get("refs/heads/main") == sha, timeout=30.0,
                   interval=0.02, message=f"{forge}: the pushed commit did not reach the cache in time")
        git_client("pull", "-q", "--ff-only", cwd=c, home=home)
        assert (c / f"{forge}.txt").read_text() == f"pushed, then {forge} told us\n"


def test_webhook_answers_leak_nothing(git_upstream_factory: Any, daemon_factory: Any) -> None:
    up: GitUpstream = git_upstream_factory()
    up.create("app")
    d = daemon_factory(extra=git_daemon_config({"app": up.url("app")}, webhooks={"github": {"secret": "s"}}))
    headers, body = push_event("github", up, "app", "1" * 40, "s")
    known = d.request("POST", "/git/webhook", headers=headers, body=body)
    headers, body = push_event("github", up, "not-mirrored", "1" * 40, "s")
    unknown = d.request("POST", "/git/webhook", headers=headers, body=body)
    assert known.status == unknown.status == 202 and known.body == unknown.body
    # other events are acknowledged and ignored; other forges are not configured here
    ping = b'{"zen": "hi"}'
    sig = hmac.new(b"s", ping, hashlib.sha256).hexdigest()
    r = d.request("POST", "/git/webhook", headers={"X-GitHub-Event": "ping", "X-Hub-Signature-256": f"sha256={sig}"},
                  body=ping)
    assert r.status == 202 and json.loads(r.body)["action"] == "ignored"
    headers, body = push_event("gitlab", up, "app", "1" * 40, "s")
    assert d.request("POST", "/git/webhook", headers=headers, body=body).status == 401
    r = d.request("POST", "/git/webhook", body=b"{}")
    assert r.status == 400 and r.headers["content-type"].startswith("application/json")
    assert d.request("GET", "/git/webhook").status == 405
    sig = hmac.new(b"s", b"not json", hashlib.sha256).hexdigest()
    r = d.request("POST", "/git/webhook", headers={"X-GitHub-Event": "push", "X-Hub-Signature-256": f"sha256={sig}"},
                  body=b"not json")
    assert r.status == 400 and "JSON" in r.body.decode()


def seed_mirrors(data_dir: Path, template: Path, repos: dict[str, str]) -> None:
    """Mirrors left by an earlier run: a copy of one mirror clone per registered repo, where
    the daemon keeps them (they all hold the same tiny history as their upstreams)."""
    from sparkcache.git.config import GitConfig
    from sparkcache.git.registry import Registration, Registry

    reg = Registry(GitConfig(), str(data_dir / "git"))
    for name, url in repos.items():
        shutil.copytree(template, reg.path_for(Registration(name, url, "config")))


def test_the_loop_over_1000_mirrors_stays_under_its_cap(git_upstream_factory: Any, daemon_factory: Any,
                                                         tmp_path: Path) -> None:
    up: GitUpstream = git_upstream_factory()
    up.create("template")
    names = [f"r{i:04d}" for i in range(1000)]
    for n in names:
        shutil.copytree(up.path("template"), up.path(n))
    mirror = tmp_path / "mirror.git"
    git("clone", "-q", "--mirror", str(up.path("template")), str(mirror))
    repos = {n: up.url(n) for n in names}
    cap = 20
    d = daemon_factory(extra=git_daemon_config(repos, fetch_interval="2s", max_upstream_rate=cap), start=False)
    seed_mirrors(d.data_dir, mirror, repos)
    d.start()
    t0 = time.monotonic()
    eventually(lambda: len(_checks(up)) > 5, timeout=30)
    first = len(_checks(up))
    w0 = time.monotonic()
    time.sleep(4)
    n = len(_checks(up)) - first
    window = time.monotonic() - w0
    # 1,000 mirrors due every 2 s want 500 checks a second; the forge sees at most the cap
    # (plus one for the bucket's burst and the checks in flight at either edge).
    assert 0 < n <= cap * window + 2, (n, window)
    total = len(_checks(up))
    assert total <= cap * (time.monotonic() - t0) + 2
    hosts = json.loads(d.get("/repos/hosts").body)
    assert len(hosts) == 1 and hosts[0]["mirrors"] == 1000 and hosts[0]["max_upstream_rate"] == cap
    assert 0 < hosts[0]["checks_per_second"] <= cap
    # the mirrors were compared, not fetched: nothing changed upstream
    assert up.count(service="git-upload-pack", method="POST") == sum(
        1 for r in up.seen(service="git-upload-pack", method="POST") if r.command == "ls-refs")
    entries = {e["name"]: e for e in json.loads(d.get("/repos").body)}
    checked = [e for e in entries.values() if e["last_check"]]
    assert checked and all(e["last_error"] is None and e["interval"] for e in checked)
    metrics = d.get("/metrics").body.decode()
    assert "sparkcache_git_ref_check_rate" in metrics and 'sparkcache_git_mirrors{host="127.0.0.1:' in metrics


def _checks(up: GitUpstream) -> list[Any]:
    return [r for r in up.seen(service="git-upload-pack") if r.agent == "git/sparkcache"]
