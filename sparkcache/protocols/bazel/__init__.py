"""Bazel's HTTP remote cache (``/bazel/<remote>/``): action results (``ac/``)
and content-addressed outputs (``cas/``) on the keyed-blob store.

``app`` serves the protocol and checks an action result's outputs before it
answers a hit, ``proto`` reads the few protobuf fields that check needs,
``options`` reads a remote's keys, ``setup`` prints the ``.bazelrc`` lines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparkcache.protocols.base import Built, ProtocolSpec, RemoteKind, SetupEndpoint
from sparkcache.protocols.bazel.options import parse_bazel_options

if TYPE_CHECKING:
    from sparkcache.context import Context


def build(ctx: "Context") -> Built:
    from sparkcache.protocols.bazel import setup
    from sparkcache.protocols.bazel.app import BAZEL_TYPES, BazelApp

    if not any(r.type in BAZEL_TYPES for r in ctx.config.remotes.values()):
        return Built()
    app = BazelApp(ctx)
    return Built(resource=app.resource(), gate=app.body_gate, setup={"bazel": SetupEndpoint(setup.handler(ctx))},
                 reconfigure=app.reconfigure)


SPEC = ProtocolSpec(
    name="bazel",
    segments=(b"bazel",),
    build=build,
    remote_types=(RemoteKind("bazel", needs_upstream=False, options=parse_bazel_options, url="/bazel/{name}/"),),
)
