"""PyPI (``/pypi/``): a pull-through cache of simple indexes (``type: pypi``),
private packages uploaded with twine (``type: pypi-local``), and groups that
serve several as one index (``type: pypi-group``), for pip and uv.

``app`` routes; ``index`` is the pull-through side (pages cached in both
forms, files verified against the page), ``pages`` parses and renders simple
pages (PEP 503, 691, 658, 714, 700), ``local`` and ``upload`` the upload
side, ``names`` PEP 503 names, ``setup`` the pip and uv snippets. See
docs/pypi.rst.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparkcache.config import UPSTREAM_KEYS
from sparkcache.protocols._group import group_kind
from sparkcache.protocols.base import Built, ProtocolSpec, RemoteKind, SetupEndpoint

if TYPE_CHECKING:
    from sparkcache.context import Context

URL = "/pypi/{name}/simple/"
REMOTE_TYPES = (
    # Pages: mutable_ttl, always revalidated; files: kept forever, verified by their #sha256.
    RemoteKind("pypi", many_upstreams=True, mutable_ttl=600, url=URL,
               shared_keys=UPSTREAM_KEYS | {"cache.mutable_ttl"}),
    RemoteKind("pypi-local", needs_upstream=False, pinned=True, url=URL),
    group_kind("pypi-group", {"pypi", "pypi-local"}, URL),
)
TYPE_NAMES = frozenset(t.name for t in REMOTE_TYPES)


def build(ctx: "Context") -> Built:
    from sparkcache.pools import PoolService
    from sparkcache.protocols.pypi import setup
    from sparkcache.protocols.pypi.app import PypiApp

    if not any(r.type in TYPE_NAMES for r in ctx.config.remotes.values()):
        return Built()
    # Page parsing and rendering, upload parsing: a pool of their own, so a
    # large page never holds up the store's spool writes and renames.
    pool = PoolService("sparkcache-pypi", 2, ctx.reactor, ctx.config.server.shutdown_timeout)
    app = PypiApp(ctx, pool.run)
    endpoints = {kind: SetupEndpoint(setup.snippet_handler(ctx, kind)) for kind in setup.KINDS}
    return Built(resource=app.resource(), gate=app.body_gate, services=[pool], setup=endpoints,
                 drains=[app.running], reconfigure=app.reconfigure)


SPEC = ProtocolSpec(name="pypi", segments=(b"pypi",), build=build, remote_types=REMOTE_TYPES)
