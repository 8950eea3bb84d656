"""Turborepo's remote cache (``/turborepo/<remote>/``, ``type: turborepo``):
the Vercel ``v8/artifacts`` API turbo speaks, on keyed blobs.

``app`` holds the routes (team namespaces, artifact tags and durations, the
batch query, events), ``setup`` the ``/setup/turborepo`` snippet
(docs/turborepo.rst).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparkcache.config import Loader, Section
from sparkcache.protocols._keyed import KeyedOptions, read_keyed_options
from sparkcache.protocols.base import Built, ProtocolSpec, RemoteKind, SetupEndpoint

if TYPE_CHECKING:
    from sparkcache.context import Context


def turborepo_options(loader: Loader, sec: Section, rtype: str) -> KeyedOptions:
    # max_entry_size, quota and ttl: the type has no keys of its own.
    return read_keyed_options(loader, sec)


def build(ctx: "Context") -> Built:
    from sparkcache.protocols.turborepo import setup
    from sparkcache.protocols.turborepo.app import TYPE, TurborepoApp

    if not any(r.type == TYPE for r in ctx.config.remotes.values()):
        return Built()
    app = TurborepoApp(ctx)
    return Built(resource=app.resource(), gate=app.body_gate,
                 setup={"turborepo": SetupEndpoint(setup.handler(ctx))}, reconfigure=app.reconfigure)


SPEC = ProtocolSpec(
    name="turborepo",
    segments=(b"turborepo",),
    build=build,
    remote_types=(RemoteKind("turborepo", needs_upstream=False, options=turborepo_options, url="/turborepo/{name}/"),),
)
