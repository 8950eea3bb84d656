"""Cargo sparse registries (``/cargo/<remote>/``, RFC 2789): ``type: cargo``
remotes cache a sparse index and its crates for ``sparse+http://`` clients.

``names`` holds the crate-name rules and index paths, ``index`` the
config.json rewrite and the ``cksum`` digests of index files, ``app`` the
routes, ``setup`` the ``~/.cargo/config.toml`` snippets (docs/cargo.rst).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparkcache.config import UPSTREAM_KEYS
from sparkcache.protocols.base import Built, ProtocolSpec, RemoteKind, SetupEndpoint

if TYPE_CHECKING:
    from sparkcache.context import Context

# Index files change whenever a version is published or yanked; cargo
# revalidates them on every build, so five minutes bounds how late a new
# release shows without sending each build's questions upstream.
# index/ is mutable, crates/ immutable, by path: patterns have no say.
REMOTE_TYPES = (RemoteKind("cargo", url="/cargo/{name}/index/", mutable_ttl=300.0,
                           shared_keys=UPSTREAM_KEYS | {"cache.mutable_ttl", "cache.immutable_ttl"}),)


def build(ctx: "Context") -> Built:
    from sparkcache.pools import PoolService
    from sparkcache.protocols.cargo import setup
    from sparkcache.protocols.cargo.app import TYPE, CargoApp

    if not any(r.type == TYPE for r in ctx.config.remotes.values()):
        return Built()
    # Index files of popular crates are hundreds of KiB of JSON lines: parsed
    # in a pool of their own, never in the store's I/O threads.
    pool = PoolService("sparkcache-cargo", 2, ctx.reactor, ctx.config.server.shutdown_timeout)
    app = CargoApp(ctx, pool.run)
    return Built(resource=app.resource(), services=[pool], setup={"cargo": SetupEndpoint(setup.handler(ctx))},
                 reconfigure=app.reconfigure)


SPEC = ProtocolSpec(name="cargo", segments=(b"cargo",), build=build, remote_types=REMOTE_TYPES)
