"""Generic remotes (``/api/<remote>/<path>``): release files, Debian, RPM and
Alpine repositories, Helm charts, and ``type: local`` uploads.

Each repository layout is a remote type whose default ``mutable_patterns``
name the metadata that changes in place upstream; everything else in those
layouts is versioned or content-addressed, and so immutable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparkcache.protocols.base import Built, ProtocolSpec, RemoteKind

if TYPE_CHECKING:
    from sparkcache.context import Context

REMOTE_TYPES = (
    # local_type: remotes.yaml's ``type: local`` of any of these packages
    # stores uploaded files, which is what ``type: local`` does.
    RemoteKind("generic", many_upstreams=True, local_type="local"),
    RemoteKind("local", needs_upstream=False, pinned=True),
    RemoteKind("alpine", mutable_patterns=(r"APKINDEX\.tar\.gz$",), many_upstreams=True, local_type="local"),
    RemoteKind("rpm", many_upstreams=True, local_type="local", mutable_patterns=(
        r"repodata/repomd\.xml(\.asc|\.key)?$",
        r"repodata/(?![0-9a-f]{32,128}-)[^/]*(primary|filelists|other|comps|updateinfo|modules)[^/]*$",
    )),
    RemoteKind("deb", many_upstreams=True, local_type="local", mutable_patterns=(
        r"(^|/)dists/(?!.*/by-hash/)[^?]*(InRelease|Release|Release\.gpg|Packages[^/]*|Sources[^/]*"
        r"|Translation-[^/]*|Contents-[^/]*|Components-[^/]*|icons-[^/]*)$",
    )),
    RemoteKind("helm", mutable_patterns=(r"(^|/)index\.yaml$",), local_type="local"),
)
TYPE_NAMES = frozenset(t.name for t in REMOTE_TYPES)


def build(ctx: "Context") -> Built:
    from sparkcache.pools import PoolService
    from sparkcache.protocols.generic import setup
    from sparkcache.protocols.generic.app import INDEX_TYPES, GenericApp

    if not any(r.type in INDEX_TYPES for r in ctx.config.remotes.values()):
        # Index remotes added later (a reload) rewrite in the store's I/O pool.
        app = GenericApp(ctx)
        return Built(resource=app.resource(), gate=app.body_gate, setup=setup.endpoints(ctx),
                     reconfigure=app.reconfigure)
    # Index rewrites and YAML parsing take seconds on a large index: a pool of
    # their own, so they never hold up the store's spool writes and renames.
    pool = PoolService("sparkcache-index", 2, ctx.reactor, ctx.config.server.shutdown_timeout)
    app = GenericApp(ctx, pool.run)
    return Built(resource=app.resource(), gate=app.body_gate, services=[pool], setup=setup.endpoints(ctx),
                 reconfigure=app.reconfigure)


SPEC = ProtocolSpec(name="generic", segments=(b"api",), build=build, remote_types=REMOTE_TYPES)
