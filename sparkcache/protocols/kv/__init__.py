"""The generic key-value remote (``type: kv``, ``/kv/<remote>/<key>``): the
remote build cache of ccache (HTTP storage, every layout), Gradle (HTTP build
cache) and sccache (WebDAV), all on the keyed blobs of ``_keyed``.

``keys`` vets keys and reads the remote's options, ``app`` serves the
requests of the three tools, ``setup`` prints their client settings
(``/setup/ccache``, ``/setup/sccache``, ``/setup/gradle-cache``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparkcache.protocols.base import Built, ProtocolSpec, RemoteKind
from sparkcache.protocols.kv.keys import parse_kv_options

if TYPE_CHECKING:
    from sparkcache.context import Context


def build(ctx: "Context") -> Built:
    from sparkcache.protocols.kv import setup
    from sparkcache.protocols.kv.app import KvApp

    if not any(r.type == "kv" for r in ctx.config.remotes.values()):
        return Built()
    app = KvApp(ctx)
    return Built(resource=app.resource(), gate=app.body_gate, setup=setup.endpoints(ctx), reconfigure=app.reconfigure)


SPEC = ProtocolSpec(
    name="kv",
    segments=(b"kv",),
    build=build,
    remote_types=(RemoteKind("kv", needs_upstream=False, options=parse_kv_options, url="/kv/{name}/"),),
)
