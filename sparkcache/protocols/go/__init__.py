"""The Go module proxy (``/go/<remote>/``): a pull-through GOPROXY and
checksum-database proxy for ``go mod download`` and ``go build``.

``paths`` parses and validates module paths and versions (``!``
case-encoding), ``app`` serves the proxy protocol, ``modzip`` checks module
zips before they are committed, ``sumdb`` proxies the checksum database and
reads the remote's ``sumdb:`` option, ``setup`` prints the client settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparkcache.config import UPSTREAM_KEYS
from sparkcache.protocols.base import Built, ProtocolSpec, RemoteKind, SetupEndpoint
from sparkcache.protocols.go.sumdb import parse_go_options

if TYPE_CHECKING:
    from sparkcache.context import Context

# ``@v/list`` and ``@latest`` move as modules are tagged: five minutes by default.
MUTABLE_TTL = 300.0


def build(ctx: "Context") -> Built:
    from sparkcache.protocols.go import setup
    from sparkcache.protocols.go.app import GO_TYPES, GoApp

    if not any(r.type in GO_TYPES for r in ctx.config.remotes.values()):
        return Built()
    app = GoApp(ctx)
    # The app looks its remotes up in ctx.config per request: nothing to rebuild.
    return Built(resource=app.resource(), setup={"go": SetupEndpoint(setup.handler(ctx))},
                 reconfigure=lambda config: None)


SPEC = ProtocolSpec(
    name="go",
    segments=(b"go",),
    build=build,
    remote_types=(
        # Freshness comes from the module proxy protocol's paths, not from patterns.
        RemoteKind("go", options=parse_go_options, url="/go/{name}/", mutable_ttl=MUTABLE_TTL, many_upstreams=True,
                   shared_keys=UPSTREAM_KEYS | {"cache.mutable_ttl", "cache.immutable_ttl"}),
    ),
)
