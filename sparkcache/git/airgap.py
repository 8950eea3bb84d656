"""Git mirrors in air-gap bundles: ``git bundle create --all`` out, seeding in.

Making a bundle runs git with ``spawnProcess`` (the reactor never waits on
it) into a file the caller gives (a scratch spool of the store). Loading one
goes through the mirror machinery's own seeding (:meth:`Mirrors.seed`: under
the mirror's lock, new refs and fast-forwards only, a new mirror built aside
and renamed into place). Only the public functions of :mod:`sparkcache.git`
are used here.
"""

from __future__ import annotations

import shutil
from typing import Any

from twisted.internet.utils import getProcessOutputAndValue

from sparkcache.git.interfaces import Mirror, MirrorLimit, UnknownRepo
from sparkcache.git.registry import RegistrationError
from sparkcache.git.repo_ops import git_env


class GitBundleError(Exception):
    """git could not make or read a bundle (the message is git's own, shortened)."""


async def _git(reactor: Any, args: list[str], cwd: str | None = None) -> bytes:
    exe = shutil.which("git", path=git_env()["PATH"])
    if exe is None:
        raise GitBundleError("git is not installed")
    out, err, code = await getProcessOutputAndValue(exe, args, env=git_env(), path=cwd, reactor=reactor)
    if code != 0:
        msg = err.decode("utf-8", "replace").strip()[-500:]
        raise GitBundleError(f"git {args[0]} {args[1] if len(args) > 1 else ''} exited {code}: {msg}")
    return bytes(out)


async def create_bundle(reactor: Any, mirror: Mirror, dest: str) -> tuple[dict[str, str], str | None]:
    """Write a bundle of every ref of ``mirror`` to ``dest`` (overwritten);
    returns its refs {name: sha} and the branch HEAD points at."""
    await _git(reactor, ["bundle", "create", "--quiet", dest, "--all"], cwd=mirror.path)
    listed = (await _git(reactor, ["bundle", "list-heads", dest])).decode("utf-8", "replace")
    refs = {}
    for line in listed.splitlines():
        sha, _, name = line.strip().partition(" ")
        if name.startswith("refs/"):
            refs[name] = sha
    try:
        head: str | None = (await _git(reactor, ["symbolic-ref", "-q", "HEAD"], cwd=mirror.path)).decode().strip()
    except GitBundleError:
        head = None  # a detached HEAD: the importing side picks main/master
    return refs, head or None


def target_mirror(mirrors: Any, name: str, url: str) -> Mirror | None:
    """The importing side's mirror for a bundle's ``url``: one configured or
    registered for that URL, or a new one on an allow-listed host; None when
    neither (the bundle's mirror is then skipped)."""
    reg = mirrors.registry.by_url(url)
    if reg is not None:
        return mirrors.registry.mirror(reg)  # type: ignore[no-any-return]
    try:
        return mirrors.lookup(url)  # type: ignore[no-any-return]
    except (UnknownRepo, MirrorLimit, RegistrationError):
        return None


async def load_bundle(mirrors: Any, mirror: Mirror, path: str) -> None:
    """Fetch the bundle at ``path`` into ``mirror`` (created when absent)."""
    try:
        await mirrors.seed(mirror.url, path, mirror.name)
    except (ValueError, RegistrationError) as e:
        raise GitBundleError(str(e)) from None
