"""Nx's self-hosted remote cache (``/nx/<remote>/``, ``type: nx``): the
``/v1/cache/<hash>`` API of Nx's OpenAPI spec, on keyed blobs.

``app`` holds the routes, ``setup`` the ``/setup/nx`` snippet (docs/nx.rst).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparkcache.config import Loader, Section
from sparkcache.protocols._keyed import KeyedOptions, read_keyed_options
from sparkcache.protocols.base import Built, ProtocolSpec, RemoteKind, SetupEndpoint

if TYPE_CHECKING:
    from sparkcache.context import Context


def nx_options(loader: Loader, sec: Section, rtype: str) -> KeyedOptions:
    # max_entry_size, quota and ttl: the type has no keys of its own.
    return read_keyed_options(loader, sec)


def build(ctx: "Context") -> Built:
    from sparkcache.protocols.nx import setup
    from sparkcache.protocols.nx.app import TYPE, NxApp

    if not any(r.type == TYPE for r in ctx.config.remotes.values()):
        return Built()
    app = NxApp(ctx)
    return Built(resource=app.resource(), gate=app.body_gate, setup={"nx": SetupEndpoint(setup.handler(ctx))},
                 reconfigure=app.reconfigure)


SPEC = ProtocolSpec(
    name="nx",
    segments=(b"nx",),
    build=build,
    remote_types=(RemoteKind("nx", needs_upstream=False, options=nx_options, url="/nx/{name}/"),),
)
