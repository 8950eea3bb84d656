"""A fake IMirrors: bare repositories handled with the git CLI, no pygit2, no network.

What the git apps (clones, the read API, code sync) and the fetch loop ask of
``sparkcache.git.mirrors.Mirrors``, over repositories a test makes::

    fm = FakeMirrors(tmp_path)
    fm.add("app", upstream=bare)        # a --mirror clone; refresh() fetches from ``bare``
    fm.add("ro", path=other_bare)       # serve that repository itself; refresh() runs on_refresh
    fm.add("x")                         # a name only (loop tests): not on disk unless on_disk says so

It counts what the apps do (``refreshes``, ``acquired``/``released``,
``max_busy``, ``seeded``, ``maintained``), and with ``hold_refreshes`` each
refresh waits in ``pending[name]`` until the test fires it. Mirrors are
reported at ``https://forge.example/<name>.git``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from sparkcache.git.interfaces import IMirrors, Mirror, UnknownRepo
from sparkcache.protocols import load_config_data
from tests.support.git_upstream import git, refs_of


@dataclass
class _Repo:
    mirror: Mirror
    upstream: str | None  # fetched from on refresh, when set


@implementer(IMirrors)
class FakeMirrors:
    def __init__(self, root: str | Path | None = None, git_config: Mapping[str, Any] | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self.config = load_config_data({"git": dict(git_config or {})}, "fake-mirrors.yaml", {}).git
        self.repos: dict[str, _Repo] = {}
        self.on_disk: set[str] = set()
        self.on_refresh: Callable[[], object] | None = None  # runs before each refresh's fetch
        self.hold_refreshes = False
        self.pending: dict[str, Deferred[dict[str, str]]] = {}
        self.refreshed: list[tuple[str, bool]] = []  # (name, clone) per refresh
        self.seeded: list[tuple[str, str]] = []
        self.maintained: list[tuple[str, bool]] = []  # (name, fsck)
        self.maintain_fails: set[str] = set()
        # Not "serving": apps use a serving() context manager when the mirrors have one.
        self.acquired = self.released = self.busy = self.max_busy = 0

    # -- set-up ---------------------------------------------------------------

    def add(self, name: str, upstream: str | Path | None = None, path: str | Path | None = None) -> Mirror:
        if path is None and upstream is not None:
            assert self.root is not None, "a mirror clone needs FakeMirrors(root)"
            path = self.root / "mirrors" / f"{name.replace('/', '_')}.git"
            git("clone", "-q", "--mirror", str(upstream), str(path))
        mirror = Mirror(name, f"https://forge.example/{name}.git", str(path or f"/nonexistent/{name}"))
        self.repos[name] = _Repo(mirror, str(upstream) if upstream is not None else None)
        self.on_disk.add(name)
        return mirror

    @property
    def refreshes(self) -> int:
        return len(self.refreshed)

    @property
    def calls(self) -> list[str]:
        """The names refreshed, in order."""
        return [name for name, _ in self.refreshed]

    # -- IMirrors -------------------------------------------------------------

    def lookup(self, name_or_url: str) -> Mirror:
        repo = self.repos.get(name_or_url)
        if repo is None:
            raise UnknownRepo(f"no repository named {name_or_url!r}")
        return repo.mirror

    def ensure(self, mirror: Mirror) -> Deferred[Mirror]:
        return succeed(mirror)

    def refresh(self, mirror: Mirror, clone: bool = True) -> Deferred[dict[str, str]]:
        self.refreshed.append((mirror.name, clone))
        if self.hold_refreshes:
            d: Deferred[dict[str, str]] = Deferred()
            self.pending[mirror.name] = d
            return d
        if self.on_refresh is not None:
            self.on_refresh()
        upstream = self.repos[mirror.name].upstream

        def fetch() -> dict[str, str]:
            if upstream is not None:
                git("fetch", "-q", "--prune", upstream, "+refs/*:refs/*", cwd=mirror.path)
            return refs_of(mirror.path)

        return deferToThread(fetch)

    def seed(self, url: str, bundle_path: str, name: str | None = None) -> Deferred[Mirror]:
        assert self.root is not None, "seeding needs FakeMirrors(root)"
        self.seeded.append((url, name or ""))
        path = str(self.root / f"seeded-{len(self.seeded)}.git")

        def clone() -> Mirror:
            git("clone", "-q", "--mirror", bundle_path, path)
            mirror = Mirror(url, url, path)
            self.repos[url] = _Repo(mirror, None)
            return mirror

        return deferToThread(clone)

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThread(fn, *args)

    def status(self) -> list[dict[str, Any]]:
        return [{"name": n, "url": r.mirror.url} for n, r in self.repos.items()]

    def acquire(self, mirror: Mirror) -> None:
        self.acquired += 1
        self.busy += 1
        self.max_busy = max(self.max_busy, self.busy)

    def release(self, mirror: Mirror) -> None:
        self.released += 1
        self.busy -= 1

    # -- what the fetch loop and maintenance ask ------------------------------

    def mirrors(self) -> list[Mirror]:
        return [r.mirror for r in self.repos.values()]

    def exists(self, mirror: Mirror) -> bool:
        return mirror.name in self.on_disk

    def present(self, mirrors: list[Mirror]) -> Deferred[list[Mirror]]:
        return succeed([m for m in mirrors if m.name in self.on_disk])

    def poll(self, batch: list[Mirror]) -> Deferred[tuple[list[Mirror], int]]:
        return succeed((list(batch), 0))  # everything needs a refresh

    def maintain(self, mirror: Mirror, fsck: bool = False) -> Deferred[dict[str, Any]]:
        self.maintained.append((mirror.name, fsck))
        if mirror.name in self.maintain_fails:
            return fail(RuntimeError("repack failed"))
        return succeed({})

    def empty_trash(self) -> None:
        pass
