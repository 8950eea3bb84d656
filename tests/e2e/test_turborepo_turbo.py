"""The real turbo (global npm package) against a real daemon's ``type:
turborepo`` remote: a tiny npm-workspaces monorepo built, its local cache
and outputs cleared, rebuilt from the remote cache ("FULL TURBO", a REMOTE
HIT in the run summary, the very output restored); teams kept apart; signed
artifacts verified on a hit and a tampered tag refused; a store too small
for the artifact and a read-only token leave the builds working."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon
from tests.support.tools import require_tool
from tests.support.turbo_workspaces import clear_turbo, run_turbo, turbo_env, turbo_summary, turbo_workspace

pytestmark = pytest.mark.e2e

WRITER, READER = "e2e-turbo-w-5d1", "e2e-turbo-r-8a2"
AUTH = {"anonymous_read": False, "tokens": [{"name": "ci", "token": WRITER, "scopes": ["write"]},
                                            {"name": "dev", "token": READER, "scopes": ["read"]}]}
# turbo wants at least 32 bytes of signature key.
SIGNING_KEY = "sparkcache-e2e-signing-key-0123456789abcdef"
PACKAGES = ("app", "lib")


@pytest.fixture
def daemon(tmp_path: Path) -> Any:
    require_tool("turbo")
    require_tool("npm")
    d = Daemon(tmp_path / "daemon", {"turbo": {"type": "turborepo"},
                                     "tiny": {"type": "turborepo", "max_entry_size": 64}}, auth=AUTH).start()
    try:
        yield d
    finally:
        d.close()


def outputs(ws: Path) -> dict[str, str]:
    return {p: (ws / "packages" / p / "dist" / "out.txt").read_text() for p in PACKAGES}


def tasks(ws: Path) -> dict[str, dict[str, Any]]:
    """Each task's cache status in the newest run summary, by package."""
    return {t["package"]: t["cache"] for t in turbo_summary(ws)["tasks"]}  # type: ignore[attr-defined]


def built(proc: Any) -> str:
    assert proc.returncode == 0, f"turbo exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return str(proc.stdout)


def flags(d: Daemon, remote: str = "turbo", team: str = "web", token: str = WRITER) -> list[str]:
    return [f"--api={d.url('/turborepo/' + remote)}", f"--team={team}", f"--token={token}"]


def artifact(d: Daemon, hash_: str, team: str, token: str = READER) -> Any:
    return d.get(f"/turborepo/turbo/v8/artifacts/{hash_}?slug={team}", {"Authorization": f"Bearer {token}"})


def test_a_cleared_workspace_rebuilds_from_the_remote_cache(daemon: Daemon, tmp_path: Path) -> None:
    ws = turbo_workspace(tmp_path / "ws", packages=PACKAGES)
    env = turbo_env(tmp_path / "home")
    out = built(run_turbo(ws, env, *flags(daemon)))
    assert "Remote caching enabled" in out
    first = tasks(ws)
    assert {p: c["status"] for p, c in first.items()} == {"app": "MISS", "lib": "MISS"}
    built_outputs = outputs(ws)
    hashes = {t["package"]: t["hash"] for t in turbo_summary(ws)["tasks"]}  # type: ignore[attr-defined]
    stored = artifact(daemon, hashes["app"], "web")
    assert stored.status == 200 and int(stored.header("x-artifact-duration") or "-1") >= 0

    clear_turbo(ws)
    # --preflight: an OPTIONS before each request, as for an API behind a CDN.
    out = built(run_turbo(ws, env, *flags(daemon), "--preflight"))
    assert "FULL TURBO" in out and "cache hit" in out, out
    assert all(c["status"] == "HIT" and c["source"] == "REMOTE" for c in tasks(ws).values()), tasks(ws)
    assert outputs(ws) == built_outputs  # restored, not rebuilt

    # Another team sees none of it: rebuilt, and its artifacts are its own.
    clear_turbo(ws)
    built(run_turbo(ws, env, *flags(daemon, team="mobile")))
    assert all(c["status"] == "MISS" for c in tasks(ws).values()), tasks(ws)
    assert outputs(ws) != built_outputs
    assert artifact(daemon, hashes["app"], "mobile").body != stored.body
    m = daemon.get("/metrics").body.decode()
    assert 'form="entry",remote="turbo",result="hit"' in m and 'form="upload",remote="turbo",result="stored"' in m


def test_signed_artifacts_verify_on_a_hit_and_a_tampered_tag_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    ws = turbo_workspace(tmp_path / "ws", signature=True, packages=PACKAGES)
    env = turbo_env(tmp_path / "home")
    # The environment variables this time, as /setup/turborepo prints them.
    env.update({"TURBO_API": daemon.url("/turborepo/turbo"), "TURBO_TEAM": "signed", "TURBO_TOKEN": WRITER,
                "TURBO_REMOTE_CACHE_SIGNATURE_KEY": SIGNING_KEY})
    built(run_turbo(ws, env))
    first = outputs(ws)
    hashes = {t["package"]: t["hash"] for t in turbo_summary(ws)["tasks"]}  # type: ignore[attr-defined]
    stored = artifact(daemon, hashes["app"], "signed")
    tag = stored.header("x-artifact-tag") or ""
    assert stored.status == 200 and len(base64.b64decode(tag)) == 32, stored.describe()  # an HMAC-SHA256

    clear_turbo(ws)
    out = built(run_turbo(ws, env))
    assert "FULL TURBO" in out and all(c["source"] == "REMOTE" for c in tasks(ws).values()), out
    assert outputs(ws) == first

    # The same artifacts under another team with one tag tampered with (an
    # artifact is immutable: a new team is how a test gets a different tag in).
    for pkg, h in hashes.items():
        got = artifact(daemon, h, "signed")
        bad = got.header("x-artifact-tag") or ""
        if pkg == "app":
            bad = ("B" if bad[0] != "B" else "C") + bad[1:]
        put = daemon.request("PUT", f"/turborepo/turbo/v8/artifacts/{h}?slug=copied", {
            "Authorization": f"Bearer {WRITER}", "x-artifact-tag": bad,
            "x-artifact-duration": got.header("x-artifact-duration") or "0"}, got.body)
        assert put.status == 202, put.describe()
    clear_turbo(ws)
    env["TURBO_TEAM"] = "copied"
    built(run_turbo(ws, env))
    status = tasks(ws)
    assert status["app"]["status"] == "MISS", status  # the tag did not verify: rebuilt
    assert outputs(ws)["app"] != first["app"]
    # The control: lib's tag came through untouched and verifies (turbo 2's tag
    # covers the hash and the body, not the team).
    assert status["lib"]["status"] == "HIT" and outputs(ws)["lib"] == first["lib"], status

    # The right tags, the wrong key: nothing verifies.
    clear_turbo(ws)
    env.update({"TURBO_TEAM": "signed", "TURBO_REMOTE_CACHE_SIGNATURE_KEY": SIGNING_KEY[::-1]})
    built(run_turbo(ws, env))
    assert all(c["status"] == "MISS" for c in tasks(ws).values()), tasks(ws)


def test_a_store_too_small_and_a_read_only_token_leave_the_build_working(daemon: Daemon, tmp_path: Path) -> None:
    ws = turbo_workspace(tmp_path / "ws", packages=PACKAGES)
    env = turbo_env(tmp_path / "home")
    # Every artifact is over the remote's 64 bytes: each upload is a 413, refused before its body.
    for _ in range(2):
        built(run_turbo(ws, env, *flags(daemon, remote="tiny")))
        assert all(c["status"] == "MISS" for c in tasks(ws).values()), tasks(ws)
        clear_turbo(ws)
    m = daemon.get("/metrics").body.decode()
    assert 'form="upload",remote="tiny",result="rejected"' in m
    assert 'remote="tiny",result="stored"' not in m

    # A read-only token downloads but never uploads.
    built(run_turbo(ws, env, *flags(daemon, team="ro", token=READER)))
    clear_turbo(ws)
    built(run_turbo(ws, env, *flags(daemon, team="ro", token=READER)))
    assert all(c["status"] == "MISS" for c in tasks(ws).values()), tasks(ws)
