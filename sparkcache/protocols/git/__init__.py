"""Git: read-only smart HTTP over bare mirrors, the read API and code sync.

``smart_http`` serves ``/git/<name>`` (clones and fetches, via ``git
upload-pack``) and ``/repos``; ``codesync`` serves ``/archive``, ``/file``,
``/tree-hash``, ``/branch-contains``, ``/upload(s)`` and ``/sync``. The
mirrors themselves (pygit2, the fetch loop, the pack cache) are the git
machinery in :mod:`sparkcache.git`; its ``git:`` section is parsed by
:func:`sparkcache.git.config.parse_git_section`. A daemon without git
configuration builds them on first use (:mod:`.lazy`): pygit2 is imported
only by a daemon that mirrors something.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparkcache.git.config import parse_git_section
from sparkcache.protocols.base import Built, ProtocolSpec

if TYPE_CHECKING:
    from sparkcache.config import Config
    from sparkcache.context import Context
    from sparkcache.git.interfaces import IMirrors

READ_SEGMENTS = (b"archive", b"file", b"tree-hash", b"branch-contains", b"upload", b"uploads", b"sync")


def build(ctx: "Context") -> Built:
    """The git apps now when git is configured or mirrors are on disk, else on first use."""
    from sparkcache.protocols.git import lazy

    if lazy.configured(ctx.config) or lazy.on_disk(ctx.config.storage.data_dir):
        return build_now(ctx)
    return lazy.LazyGit(ctx, SPEC.segments, build_now).built()


def build_now(ctx: "Context") -> Built:
    """The mirrors of the ``git:`` section, kept fresh by the GitService, served by the apps."""
    from sparkcache.git.config import GitConfig
    from sparkcache.git.loop import GitService
    from sparkcache.git.mirrors import Mirrors

    config = ctx.config
    git_cfg = config.section("git") or GitConfig()
    mirrors = Mirrors(git_cfg, config.storage.data_dir, ctx.reactor, clock=ctx.clock, metrics=ctx.metrics,
                      shared=config.server.workers > 1)
    built = serve(ctx, mirrors)
    built.services = [GitService(mirrors, config.server.shutdown_timeout, primary=ctx.primary), *built.services]
    serve_reconfigure = built.reconfigure

    def reconfigure(new: "Config") -> None:
        mirrors.reconfigure(new.section("git") or GitConfig())
        if serve_reconfigure is not None:
            serve_reconfigure(new)

    built.reconfigure = reconfigure
    return built


def serve(ctx: "Context", mirrors: "IMirrors") -> Built:
    """The git apps over any IMirrors (tests hand in a fake one)."""
    from sparkcache.git.packcache import PackCache
    from sparkcache.pools import PoolService
    from sparkcache.protocols.base import SetupEndpoint
    from sparkcache.protocols.git import setup
    from sparkcache.protocols.git.codesync import CodeSyncApp
    from sparkcache.protocols.git.smart_http import GitApp
    from sparkcache.web.root import Remount

    # Packs and archives are produced by ctx.cache, whose running productions a
    # graceful stop already waits for: a complete pack is kept even after its
    # clients left.
    packcache = PackCache(ctx, mirrors, ctx.reactor)
    smart_http = GitApp(ctx, mirrors, ctx.reactor, packcache)
    upload_pool = PoolService("sparkcache-upload", 2, ctx.reactor, ctx.config.server.shutdown_timeout)
    codesync = CodeSyncApp(ctx, mirrors, ctx.reactor, upload_pool.pool)
    clones, reads = smart_http.resource(), Remount(codesync.resource())

    def reconfigure(new: "Config") -> None:
        smart_http.reconfigure(new)
        packcache.reconfigure(new)

    return Built(
        mounts={b"git": clones, b"repos": clones, **{s: reads for s in READ_SEGMENTS}},
        gates={b"git": smart_http.body_gate, b"repos": smart_http.body_gate,
               **{s: codesync.body_gate for s in READ_SEGMENTS}},
        services=[upload_pool],
        setup={"git": SetupEndpoint(setup.handler(ctx, mirrors), offered=lambda: setup.offered(ctx, mirrors))},
        reconfigure=reconfigure,
    )


SPEC = ProtocolSpec(
    name="git",
    segments=(b"git", b"repos", *READ_SEGMENTS),
    build=build,
    section="git",
    parse_section=parse_git_section,
)
