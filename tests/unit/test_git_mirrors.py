"""Mirrors against real local upstreams (bare repositories reached through file://)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pygit2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList

from sparkcache.protocols import load_config_data
from sparkcache.git.interfaces import IMirrors, MirrorUnavailable
from sparkcache.git.mirrors import Mirrors
from tests.support.git_upstream import FileUpstream, GitUpstream, git, record_git_runs


@pytest.fixture
def upstream(tmp_path: Path) -> FileUpstream:
    return FileUpstream(tmp_path / "upstream")


@pytest.fixture
def make_mirrors(tmp_path: Path):
    made: list[Mirrors] = []

    def make(repos: dict[str, str] | None = None, **git_cfg: object) -> Mirrors:
        cfg = load_config_data({"git": {"repos": repos or {}, **git_cfg}}, "cache.yaml", {}).git
        m = Mirrors(cfg, str(tmp_path / "data"), reactor)
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


def test_provides_the_interface(make_mirrors) -> None:
    assert IMirrors.providedBy(make_mirrors())


@pytest_twisted.ensureDeferred
async def test_clone_on_first_use_configured_for_serving(make_mirrors, upstream: FileUpstream, tmp_path: Path) -> None:
    ms = make_mirrors({"up": upstream.url})
    mirror = ms.lookup("up")
    assert not os.path.exists(mirror.path)
    assert await ms.ensure(mirror) == mirror
    repo = pygit2.Repository(mirror.path)
    assert repo.is_bare
    assert repo.references["HEAD"].target == "refs/heads/trunk"
    cfg = git("config", "--list", "--local", cwd=mirror.path)
    for line in ("remote.origin.fetch=+refs/*:refs/*", "remote.origin.mirror=true", "repack.writebitmaps=true",
                 "gc.auto=0", "uploadpack.allowfilter=true", "uploadpack.allowreachablesha1inwant=true",
                 "uploadpack.allowanysha1inwant=false", "core.commitgraph=true", f"remote.origin.url={upstream.url}"):
        assert line in cfg.splitlines()
    assert git("for-each-ref", "--format=%(objectname) %(refname)", cwd=mirror.path) == \
        git("for-each-ref", "--format=%(objectname) %(refname)", cwd=upstream.bare)
    await ms.maintain(mirror)
    packs = os.listdir(os.path.join(mirror.path, "objects", "pack"))
    assert any(p.endswith(".bitmap") for p in packs)
    assert os.path.exists(os.path.join(mirror.path, "objects", "info", "commit-graph"))
    assert os.listdir(ms.tmp_dir) == []
    git("fsck", "--no-dangling", cwd=mirror.path)
    st = {s["name"]: s for s in await ms.status()}["up"]
    assert st["cloned"] and st["refs"] == 2 and st["size"] > 0 and st["last_error"] is None


@pytest_twisted.ensureDeferred
async def test_refresh_fetches_prunes_and_skips_when_unchanged(make_mirrors, upstream: FileUpstream, monkeypatch) -> None:
    ms = make_mirrors({"up": upstream.url})
    mirror = await ms.ensure(ms.lookup("up"))
    fetches = []
    real_fetch = pygit2.remotes.Remote.fetch

    def counting_fetch(self: pygit2.remotes.Remote, *a: object, **kw: object) -> object:
        fetches.append(1)
        return real_fetch(self, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pygit2.remotes.Remote, "fetch", counting_fetch)
    assert await ms.refresh(mirror) == upstream.refs()
    assert fetches == []  # nothing moved: one ref advertisement, no fetch

    upstream.commit()
    git("branch", "feature", cwd=upstream.bare)
    tips = await ms.refresh(mirror)
    assert tips == upstream.refs() and "refs/heads/feature" in tips and len(fetches) == 1

    git("branch", "-D", "feature", cwd=upstream.bare)
    tips = await ms.refresh(mirror)
    assert "refs/heads/feature" not in tips and tips == upstream.refs()
    assert "refs/heads/feature" not in git("for-each-ref", cwd=mirror.path)


@pytest_twisted.ensureDeferred
async def test_concurrent_refreshes_share_one_fetch(make_mirrors, upstream: FileUpstream, monkeypatch) -> None:
    ms = make_mirrors({"up": upstream.url})
    mirror = await ms.ensure(ms.lookup("up"))
    upstream.commit()
    calls = []
    real = Mirrors._fetch_sync

    def counting(self, *args):
        calls.append(args[0].name)
        return real(self, *args)

    monkeypatch.setattr(Mirrors, "_fetch_sync", counting)
    first, second, third = ms.refresh(mirror), ms.refresh(mirror), ms.refresh(mirror)
    second.cancel()  # a departing client does not cancel the fetch the others wait for
    results = await DeferredList([first, second, third], consumeErrors=True)
    assert calls == ["up"]
    assert results[0][1] == results[2][1] == upstream.refs()
    assert not results[1][0]


@pytest_twisted.ensureDeferred
async def test_wiped_data_dir_is_recloned(make_mirrors, upstream: FileUpstream, tmp_path: Path) -> None:
    import shutil

    ms = make_mirrors({"up": upstream.url})
    mirror = await ms.ensure(ms.lookup("up"))
    await ms.maintain(mirror)
    shutil.rmtree(tmp_path / "data")
    await ms.ensure(mirror)
    assert pygit2.Repository(mirror.path).references["refs/heads/trunk"].target.__str__() == upstream.refs()["refs/heads/trunk"]


@pytest_twisted.ensureDeferred
async def test_unopenable_mirror_is_recloned(make_mirrors, upstream: FileUpstream) -> None:
    ms = make_mirrors({"up": upstream.url})
    mirror = await ms.ensure(ms.lookup("up"))
    await ms.maintain(mirror)
    with open(os.path.join(mirror.path, "config"), "w") as f:
        f.write("[core\n garbage")
    assert await ms.refresh(mirror) == upstream.refs()
    await ms.idle(mirror)  # the reclone's repack runs on after the refresh answered
    git("fsck", cwd=mirror.path)
    assert len(os.listdir(ms.trash_dir)) == 1
    await ms.run(ms.empty_trash)
    assert os.listdir(ms.trash_dir) == []


@pytest_twisted.ensureDeferred
async def test_corrupt_pack_fails_fsck_and_is_recloned(make_mirrors, upstream: FileUpstream) -> None:
    ms = make_mirrors({"up": upstream.url})
    mirror = await ms.ensure(ms.lookup("up"))
    await ms.maintain(mirror)
    pack_dir = os.path.join(mirror.path, "objects", "pack")
    pack = next(os.path.join(pack_dir, p) for p in os.listdir(pack_dir) if p.endswith(".pack"))
    size = os.path.getsize(pack)
    with open(pack, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff" * 64)
    with pytest.raises(AssertionError, match="git fsck exited"):
        git("fsck", cwd=mirror.path)
    report = await ms.maintain(mirror, fsck=True)
    assert report["recloned"] and report["repacked"]
    git("fsck", cwd=mirror.path)
    assert git("for-each-ref", "--format=%(objectname) %(refname)", cwd=mirror.path) == \
        git("for-each-ref", "--format=%(objectname) %(refname)", cwd=upstream.bare)


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_fails_with_mirror_unavailable(make_mirrors, tmp_path: Path) -> None:
    ms = make_mirrors({"gone": f"file://{tmp_path}/nowhere.git", "http": "http://127.0.0.1:9/x.git"})
    for name in ("gone", "http"):
        with pytest.raises(MirrorUnavailable):
            await ms.ensure(ms.lookup(name))
    st = {s["name"]: s for s in await ms.status()}
    assert st["gone"]["last_error"] and not st["gone"]["cloned"]
    assert not os.path.exists(ms.lookup("gone").path)
    assert os.listdir(ms.tmp_dir) == []


@pytest_twisted.ensureDeferred
async def test_upstream_down_keeps_the_mirror(make_mirrors, upstream: FileUpstream) -> None:
    ms = make_mirrors({"up": upstream.url})
    mirror = await ms.ensure(ms.lookup("up"))
    before = upstream.refs()
    os.rename(upstream.bare, str(upstream.bare) + ".away")
    with pytest.raises(MirrorUnavailable):
        await ms.refresh(mirror)
    assert await ms.ensure(mirror) == mirror
    assert len(git("for-each-ref", "--format=%(objectname) %(refname)", cwd=mirror.path).splitlines()) == len(before)


@pytest_twisted.ensureDeferred
async def test_seed_from_bundle_without_upstream(make_mirrors, upstream: FileUpstream, tmp_path: Path) -> None:
    ms = make_mirrors()
    bundle = tmp_path / "all.bundle"
    git("bundle", "create", str(bundle), "--all", cwd=upstream.bare)
    url = "http://127.0.0.1:9/team/app.git"  # nothing listens there: seeding needs no upstream
    mirror = await ms.seed(url, str(bundle))
    assert mirror.name == "127.0.0.1:9/team/app" and ms.lookup(url) == mirror
    refs = git("for-each-ref", "--format=%(objectname) %(refname)", cwd=mirror.path)
    assert upstream.refs()["refs/heads/trunk"] in refs
    assert git("config", "remote.origin.url", cwd=mirror.path).strip() == url
    assert pygit2.Repository(mirror.path).references["HEAD"].target == "refs/heads/trunk"
    # an incremental bundle on top of what the mirror has
    old = upstream.refs()["refs/heads/trunk"]
    new = upstream.commit()
    inc = tmp_path / "inc.bundle"
    git("bundle", "create", str(inc), f"{old}..trunk", cwd=upstream.bare)
    await ms.seed(url, str(inc))
    assert await ms.missing(mirror, [new, old, "0" * 40]) == ["0" * 40]
    with pytest.raises(ValueError):
        await ms.seed(url, str(tmp_path / "not-a-bundle"))


@pytest_twisted.ensureDeferred
async def test_no_pruning_repack_while_serving(make_mirrors, upstream: FileUpstream, monkeypatch) -> None:
    ms = make_mirrors({"up": upstream.url})
    mirror = await ms.ensure(ms.lookup("up"))
    await ms.maintain(mirror)
    seen = record_git_runs(monkeypatch)
    upstream.commit()
    await ms.refresh(mirror)
    with ms.serving(mirror):
        await ms.maintain(mirror)
    assert [a for a in seen if a[0] == "repack"][-1][-1] == "--keep-unreachable"
    upstream.commit()
    await ms.refresh(mirror)
    await ms.maintain(mirror)
    assert "--keep-unreachable" not in [a for a in seen if a[0] == "repack"][-1]
    # nothing new: no repack at all
    n = len(seen)
    await ms.maintain(mirror)
    assert not [a for a in seen[n:] if a[0] == "repack"]


@pytest_twisted.ensureDeferred
async def test_stale_locks_are_removed(make_mirrors, upstream: FileUpstream) -> None:
    ms = make_mirrors({"up": upstream.url}, stale_lock_age="1m")
    mirror = await ms.ensure(ms.lookup("up"))
    await ms.idle(mirror)  # the post-clone repack
    old = Path(mirror.path) / "refs" / "heads" / "trunk.lock"
    fresh = Path(mirror.path) / "packed-refs.lock"
    old.write_text("x")
    fresh.write_text("x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    report = await ms.maintain(mirror)
    assert report["locks_removed"] == 1 and not old.exists() and fresh.exists()


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        d: Deferred[None] = Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d
    raise AssertionError("condition not met in time")


@pytest_twisted.ensureDeferred
async def test_registrations_are_saved_only_once_they_work(make_mirrors, tmp_path: Path) -> None:
    up = GitUpstream(tmp_path / "http-upstream").start()
    try:
        up.create("app")
        host = f"127.0.0.1:{up.port}"
        ms = make_mirrors(allowed_hosts=[f"http://{host}", "http://127.0.0.1:9"])
        registry = tmp_path / "data" / "git" / "registry.json"
        # a repository that does not exist: not kept, not saved
        ghost = ms.lookup(f"{host}/nobody/ghost.git")
        with pytest.raises(MirrorUnavailable):
            await ms.ensure(ghost)
        assert ghost.name not in [m.name for m in ms.mirrors()]
        with pytest.raises(MirrorUnavailable):
            await ms.ensure(ms.lookup("127.0.0.1:9/org/unreachable"))
        assert [s["name"] for s in await ms.status()] == []
        # one that exists: cloned, then saved
        app = ms.lookup(f"{host}/app")
        assert app.url == up.url("app") and app.name == f"{host}/app"
        await ms.ensure(app)
        ms.register("tool", "https://git.example/org/tool.git")
        await wait_for(lambda: registry.exists() and "tool" in registry.read_text() and f"{host}/app" in registry.read_text())
        assert "ghost" not in registry.read_text() and "unreachable" not in registry.read_text()
        again = make_mirrors(allowed_hosts=[f"http://{host}"])
        assert again.lookup("tool").url == "https://git.example/org/tool.git"
        assert again.lookup(up.url("app")) == app
    finally:
        up.stop()


@pytest_twisted.ensureDeferred
async def test_a_long_repack_does_not_delay_a_fetch(make_mirrors, upstream: FileUpstream, monkeypatch) -> None:
    import threading

    ms = make_mirrors({"up": upstream.url})
    mirror = await ms.ensure(ms.lookup("up"))
    await ms.idle(mirror)
    release = threading.Event()
    real = Mirrors._repack_sync

    def slow(self: Mirrors, *args: object) -> object:
        release.wait(30)
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Mirrors, "_repack_sync", slow)
    upstream.commit()
    await ms.refresh(mirror)  # new objects: the next maintenance repacks
    upstream.commit()
    repack = ms.maintain(mirror)
    try:
        tips = await ms.refresh(mirror)  # would hang until the timeout if it queued behind the repack
        assert tips == upstream.refs() and not repack.called
    finally:
        release.set()
    assert (await repack)["repacked"]
    git("fsck", cwd=mirror.path)


@pytest_twisted.ensureDeferred
async def test_a_restart_does_not_repack_every_mirror(make_mirrors, upstream: FileUpstream) -> None:
    ms = make_mirrors({"up": upstream.url})
    mirror = await ms.ensure(ms.lookup("up"))
    await ms.idle(mirror)
    ms.stop()
    again = make_mirrors({"up": upstream.url})
    report = await again.maintain(again.lookup("up"))
    assert "repacked" not in report and report["size"] > 0


@pytest_twisted.ensureDeferred
async def test_seed_with_missing_prerequisites_is_a_value_error(make_mirrors, upstream: FileUpstream, tmp_path: Path) -> None:
    ms = make_mirrors()
    old = upstream.refs()["refs/heads/trunk"]
    upstream.commit()
    inc = tmp_path / "inc.bundle"
    git("bundle", "create", str(inc), f"{old}..trunk", cwd=upstream.bare)
    with pytest.raises(ValueError, match="cannot be applied"):
        await ms.seed("https://git.example/team/thin.git", str(inc))
    assert not os.path.exists(ms.lookup("https://git.example/team/thin.git").path)
    assert os.listdir(ms.tmp_dir) == []


@pytest_twisted.ensureDeferred
async def test_poll_checks_advertisements_without_fetching(make_mirrors, upstream: FileUpstream) -> None:
    ms = make_mirrors({"up": upstream.url})
    mirror = await ms.ensure(ms.lookup("up"))
    assert await ms.poll([mirror]) == ([], 0)
    assert ms.state(mirror).last_fetch is not None and ms.state(mirror).head == "refs/heads/trunk"
    upstream.commit()
    assert await ms.poll([mirror]) == ([mirror], 0)
    await ms.refresh(mirror)
    assert await ms.poll([mirror]) == ([], 0)
    # the upstream's default branch moves: the mirror's HEAD follows
    git("branch", "develop", cwd=upstream.bare)
    await ms.refresh(mirror)
    git("symbolic-ref", "HEAD", "refs/heads/develop", cwd=upstream.bare)
    assert await ms.poll([mirror]) == ([mirror], 0)
    await ms.refresh(mirror)
    assert git("symbolic-ref", "HEAD", cwd=mirror.path).strip() == "refs/heads/develop"
    assert await ms.poll([mirror]) == ([], 0)
    # refs not known yet (a new process): straight to a refresh
    again = make_mirrors({"up": upstream.url})
    assert await again.poll([again.lookup("up")]) == ([again.lookup("up")], 0)
    # upstream gone: recorded, not refreshed
    os.rename(upstream.bare, str(upstream.bare) + ".away")
    assert await ms.poll([mirror]) == ([], 1)
    assert ms.state(mirror).last_error


@pytest_twisted.ensureDeferred
async def test_fsck_format_complaints_about_intact_history_do_not_reclone(make_mirrors, tmp_path: Path) -> None:
    # Old history on real forges has commits git would not write today. Served over
    # http: libgit2's file:// transport refuses to parse such a commit at all.
    up = GitUpstream(tmp_path / "http-upstream").start()
    try:
        up.create("old")
        bare = up.path("old")
        parent = up.rev("refs/heads/main", "old")
        tree = git("rev-parse", f"{parent}^{{tree}}", cwd=bare)
        raw = (f"tree {tree}\nparent {parent}\nauthor nobody 1234567890 +0000\n"
               f"committer c <c@example.com> 1234567890 +0000\n\nold\n")
        odd = git("hash-object", "-t", "commit", "-w", "--literally", "--stdin", cwd=bare, input=raw.encode())
        git("update-ref", "refs/heads/main", odd, cwd=bare)
        with pytest.raises(AssertionError, match="git fsck exited"):
            git("fsck", cwd=bare)
        ms = make_mirrors({"old": up.url("old")})
        mirror = await ms.ensure(ms.lookup("old"))
        await ms.idle(mirror)
        report = await ms.maintain(mirror, fsck=True)
        assert report["fsck"] == "ok" and not report.get("recloned")
    finally:
        up.stop()


@pytest_twisted.ensureDeferred
async def test_damaged_mirror_is_recloned_once_upstream_is_back(make_mirrors, upstream: FileUpstream) -> None:
    from sparkcache.git.mirrors import DamagedMirror

    ms = make_mirrors({"up": upstream.url})
    mirror = await ms.ensure(ms.lookup("up"))
    await ms.idle(mirror)
    pack_dir = os.path.join(mirror.path, "objects", "pack")
    pack = next(os.path.join(pack_dir, p) for p in os.listdir(pack_dir) if p.endswith(".pack"))
    with open(pack, "r+b") as f:
        f.seek(os.path.getsize(pack) // 2)
        f.write(b"\xff" * 64)
    away = str(upstream.bare) + ".away"
    os.rename(upstream.bare, away)
    with pytest.raises(DamagedMirror):
        await ms.maintain(mirror, fsck=True)
    assert ms.exists(mirror) and ms.state(mirror).damaged  # still served meanwhile
    assert await ms.poll([mirror]) == ([mirror], 0)
    os.rename(away, upstream.bare)
    assert await ms.refresh(mirror, False) == upstream.refs()
    assert not ms.state(mirror).damaged
    await ms.idle(mirror)  # the reclone's repack runs on after the refresh answered
    git("fsck", cwd=mirror.path)
