"""The git protocol of a daemon that has no git configuration, built on first use.

pygit2 (libgit2) costs every process ~40 ms and several MiB at start. A daemon
with no ``git.repos``, no ``git.allowed_hosts``, no ``git.webhooks`` and no
mirror left on disk by an earlier run serves no repository, so its git apps
are built (and pygit2 imported) only when something needs them: the first
request under one of the git segments (``/upload``, an admin's ``POST
/git/register``...), a reload that configures git, or, with worker processes,
a registration another worker made (the primary must then run the fetch loop).
Until then the segments are mounted by :class:`LazyGit`, which answers every
request exactly as the built apps would, by building them first.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource

from sparkcache.protocols.base import Built, SetupEndpoint
from sparkcache.timers import Periodic

if TYPE_CHECKING:
    from sparkcache.config import Config
    from sparkcache.context import Context
    from sparkcache.web.bodies import BodyDecision

log = Logger()
# With worker processes, how often the primary looks for a registration another worker made.
REGISTRY_POLL = 1.0


def git_dir(data_dir: str) -> str:
    return os.path.abspath(os.path.join(data_dir, "git"))


def on_disk(data_dir: str) -> bool:
    """Blocking (start-up, or a pool thread): whether an earlier run left run-time
    registrations or mirrors. (A daemon with workers creates ``git/`` for its
    shared files even without git, so the directory alone says nothing.)"""
    root = git_dir(data_dir)
    if os.path.exists(os.path.join(root, "registry.json")):
        return True
    try:
        with os.scandir(os.path.join(root, "mirrors")) as entries:
            return any(True for _ in entries)
    except OSError:
        return False


def configured(config: "Config") -> bool:
    """Whether the ``git:`` section names anything to mirror or to listen for."""
    cfg = config.section("git")
    return cfg is not None and bool(cfg.repos or cfg.allowed_hosts or cfg.webhooks)


class LazyGit:
    """Stands in for the git apps until ``activate`` builds them with ``build``."""

    def __init__(self, ctx: "Context", segments: tuple[bytes, ...], build: Callable[["Context"], Built]) -> None:
        self.ctx = ctx
        self.segments = segments
        self._build = build
        self.real: Built | None = None
        # Holds the poll until activation; the built services join the holder's parent
        # (the daemon's runtime services), where /status and bundle export look for "git".
        self.holder = MultiService()
        self.holder.setName("git-on-demand")
        if ctx.primary and ctx.config.server.workers > 1:
            Periodic("git registry poll", REGISTRY_POLL, self._poll, ctx.clock).setServiceParent(self.holder)

    def activate(self) -> Built:
        if self.real is not None:
            return self.real
        log.info("git: building the git apps (first use)")
        real = self.real = self._build(self.ctx)
        parent = self.holder.parent if self.holder.parent is not None else self.holder
        for svc in real.services:
            svc.setServiceParent(parent)  # started at once when the runtime services run
        for svc in list(self.holder):
            if isinstance(svc, Periodic):
                svc.disownServiceParent()
        return real

    async def _poll(self) -> None:
        if self.real is None and await self.ctx.store.in_io(on_disk, self.ctx.config.storage.data_dir):
            self.activate()

    def reconfigure(self, new: "Config") -> None:
        if self.real is not None:
            if self.real.reconfigure is not None:
                self.real.reconfigure(new)
        elif configured(new):
            self.activate()

    def gate(self, segment: bytes) -> Callable[[Any], "BodyDecision"]:
        def gate(request: Any) -> "BodyDecision":
            real = self.activate()
            inner = real.gates.get(segment, real.gate)
            return inner(request) if inner is not None else None

        return gate

    def drain(self) -> list[Deferred[Any]]:
        if self.real is None:
            return []
        return [d for drain in self.real.drains for d in drain()]

    def setup_handler(self, request: Any) -> Any:
        return self.activate().setup["git"].handler(request)

    def offered(self) -> bool:
        # Unbuilt: nothing is configured and nothing registered, so there is nothing to set up.
        return self.real is not None and self.real.setup["git"].is_offered()

    def built(self) -> Built:
        """What the git protocol's ``build`` returns in the meantime."""
        mount = LazyResource(self)
        return Built(
            mounts={s: mount for s in self.segments},
            gates={s: self.gate(s) for s in self.segments},
            services=[self.holder],
            drains=[self.drain],
            setup={"git": SetupEndpoint(self.setup_handler, offered=self.offered)},
            reconfigure=self.reconfigure,
        )


class LazyResource(Resource):
    """Every git segment's resource until the apps are built; the built ones are
    leaves too (Klein apps, Remount), so rendering through this one is the same."""

    isLeaf = True

    def __init__(self, lazy: LazyGit) -> None:
        super().__init__()
        self.lazy = lazy

    def render(self, request: Any) -> Any:
        real = self.lazy.activate()
        segment = request.prepath[-1]
        resource = real.mounts.get(segment, real.resource)
        return resource.render(request)  # type: ignore[union-attr]
