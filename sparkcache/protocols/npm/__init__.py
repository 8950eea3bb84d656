"""npm registries (``/npm/<remote>/``): a pull-through cache (``type: npm``),
published packages (``type: npm-local``) and groups of both (``type: npm-group``)
for npm, pnpm and yarn.

``names`` parses registry paths (raw, so ``@scope%2fname`` routes), ``packument``
derives what clients get from the stored upstream bytes, ``app`` serves,
``publish`` takes ``npm publish`` and ``npm dist-tag``, ``setup`` writes the
clients' configuration. docs/npm.rst is the operator's guide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sparkcache.config import UPSTREAM_KEYS, Loader, Section
from sparkcache.protocols._group import group_kind
from sparkcache.protocols.base import Built, ProtocolSpec, RemoteKind, SetupEndpoint

if TYPE_CHECKING:
    from sparkcache.context import Context

NPM_TYPES = ("npm", "npm-local", "npm-group")
URL = "/npm/{name}/"
PACKUMENT_TTL = 300.0


@dataclass(frozen=True)
class NpmOptions:
    """``search`` and ``audit``: whether ``/-/v1/search`` and
    ``/-/npm/v1/security/*`` are passed through to the upstream (a JSON 404 when off)."""

    search: bool = True
    audit: bool = True

    def redacted(self) -> dict[str, Any]:
        return {"search": self.search, "audit": self.audit}


def parse_npm_options(loader: Loader, sec: Section, rtype: str) -> NpmOptions:
    return NpmOptions(sec.get("search", bool, True), sec.get("audit", bool, True))


def options_of(remote: Any) -> NpmOptions:
    opts = getattr(remote, "options", None)
    return opts if isinstance(opts, NpmOptions) else NpmOptions()


def build(ctx: "Context") -> Built:
    from sparkcache.pools import PoolService
    from sparkcache.protocols.npm import setup
    from sparkcache.protocols.npm.app import NpmApp

    if not any(r.type in NPM_TYPES for r in ctx.config.remotes.values()):
        return Built()
    # Packument rewrites and digest scans: CPU work of their own, off the reactor and the store's I/O pool.
    pool = PoolService("npm-derive", 2, ctx.reactor)
    app = NpmApp(ctx, pool.run)
    endpoints = {kind: SetupEndpoint(setup.snippet_handler(ctx, kind)) for kind in setup.KINDS}
    # The app looks its remotes up in ctx.config per request: nothing to rebuild.
    return Built(resource=app.resource(), gate=app.body_gate, services=[pool], drains=[app.running],
                 setup=endpoints, reconfigure=lambda config: None)


SPEC = ProtocolSpec(
    name="npm",
    segments=(b"npm",),
    build=build,
    remote_types=(
        # Packuments: mutable_ttl, always revalidated; tarballs: immutable_ttl.
        RemoteKind("npm", options=parse_npm_options, url=URL, mutable_ttl=PACKUMENT_TTL, many_upstreams=True,
                   shared_keys=UPSTREAM_KEYS | {"cache.mutable_ttl", "cache.immutable_ttl"}),
        RemoteKind("npm-local", needs_upstream=False, pinned=True, url=URL),
        group_kind("npm-group", {"npm", "npm-local"}, URL),
    ),
)
