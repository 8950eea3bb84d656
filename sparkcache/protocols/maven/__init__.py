"""Maven (and Gradle, Ivy) repositories (``/maven/<remote>/``): a pull-through
cache of one or more upstream repositories (``type: maven``).

``paths`` classifies repository paths (metadata, releases, snapshots,
sidecars), ``app`` serves them, ``setup`` writes ``/setup/maven`` (a
``settings.xml`` mirror) and ``/setup/gradle`` (an init script).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparkcache.config import UPSTREAM_KEYS
from sparkcache.protocols.base import Built, ProtocolSpec, RemoteKind, SetupEndpoint

if TYPE_CHECKING:
    from sparkcache.context import Context

# maven-metadata.xml and -SNAPSHOT files change in place: re-checked after 10
# minutes (a conditional request) as most repository managers do.
# Metadata and snapshots are mutable by path, or by mutable_patterns; there is no allow-list.
REMOTE_TYPES = (RemoteKind("maven", many_upstreams=True, mutable_ttl=600.0, url="/maven/{name}/",
                           shared_keys=UPSTREAM_KEYS | {"mutable_patterns", "cache.mutable_ttl",
                                                        "cache.immutable_ttl"}),)


def build(ctx: "Context") -> Built:
    from sparkcache.pools import PoolService
    from sparkcache.protocols.maven import setup
    from sparkcache.protocols.maven.app import MavenApp

    if not any(r.type == "maven" for r in ctx.config.remotes.values()):
        return Built()
    # Sidecar digests of large stored files are computed off the reactor, in a
    # pool of their own so they never hold up the store's spool writes.
    pool = PoolService("sparkcache-maven", 2, ctx.reactor, ctx.config.server.shutdown_timeout)
    app = MavenApp(ctx, pool.run)
    return Built(resource=app.resource(), services=[pool],
                 setup={kind: SetupEndpoint(setup.snippet_handler(ctx, kind)) for kind in setup.KINDS},
                 reconfigure=app.reconfigure)


SPEC = ProtocolSpec(name="maven", segments=(b"maven",), build=build, remote_types=REMOTE_TYPES)
