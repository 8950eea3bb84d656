"""OCI Distribution (``/v2/``): a pull-through mirror (``type: oci``) and push
repositories (``type: oci-local``) for containerd, dockerd, skopeo and BuildKit.

``routes`` picks the remote and dispatches; ``mirror`` is the pull-through
side, ``local`` the push side, ``tokens`` upstream registry auth, ``setup``
node snippets and the registry login endpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparkcache.config import UPSTREAM_KEYS
from sparkcache.protocols.base import Built, ProtocolSpec, RemoteKind, SetupEndpoint
from sparkcache.protocols.oci.config import DEFAULT_TAG_TTL, OCI_TYPES, parse_oci_options

if TYPE_CHECKING:
    from sparkcache.context import Context


def build(ctx: "Context") -> Built:
    from sparkcache.protocols.oci import setup
    from sparkcache.protocols.oci.routes import OCIApp

    if not any(r.type in OCI_TYPES for r in ctx.config.remotes.values()):
        return Built()
    endpoints = {kind: SetupEndpoint(setup.snippet_handler(ctx, kind)) for kind in setup.KINDS}
    # Where the GET /v2/ challenge sends registry clients to log in; it checks credentials itself.
    endpoints["token"] = SetupEndpoint(lambda request: setup.issue_token(ctx, request), ("GET", "POST"), scope=None)
    app = OCIApp(ctx)
    return Built(resource=app.resource(), gate=app.body_gate, setup=endpoints, reconfigure=app.reconfigure)


SPEC = ProtocolSpec(
    name="oci",
    segments=(b"v2",),
    build=build,
    remote_types=(
        # immutable_patterns: the allowed image names (as ``repositories``);
        # cache.mutable_ttl: the tag TTL (as ``tag_ttl``). Manifests by digest
        # and blobs are verified and kept forever: no immutable_ttl, no mutable_patterns.
        RemoteKind("oci", options=parse_oci_options, url="/v2/{name}/", mutable_ttl=DEFAULT_TAG_TTL,
                   local_type="oci-local", shared_keys=UPSTREAM_KEYS | {"immutable_patterns", "cache.mutable_ttl"}),
        RemoteKind("oci-local", needs_upstream=False, pinned=True, options=parse_oci_options, url="/v2/{name}/",
                   shared_keys=frozenset({"immutable_patterns"})),
    ),
)
