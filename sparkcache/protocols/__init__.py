"""The protocol registry: every protocol the daemon serves, one descriptor each.

A protocol is a package ``sparkcache/protocols/<name>/`` exporting ``SPEC``, a
:class:`~sparkcache.protocols.base.ProtocolSpec`; adding one is adding its
package and one line to ``PROTOCOLS``. The config loader, the service tree
and the root resource loop over this list and name no protocol
(docs/architecture.rst walks through an example).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from sparkcache import config
from sparkcache.protocols import bazel, cargo, dagger, generic, gha, git, go, kv, maven, npm, nx, oci, pypi, seed, turborepo
from sparkcache.protocols.base import ProtocolSpec, RemoteKind

PROTOCOLS: tuple[ProtocolSpec, ...] = (
    bazel.SPEC,
    cargo.SPEC,
    dagger.SPEC,
    generic.SPEC,
    gha.SPEC,
    git.SPEC,
    go.SPEC,
    kv.SPEC,
    maven.SPEC,
    npm.SPEC,
    nx.SPEC,
    oci.SPEC,
    pypi.SPEC,
    seed.SPEC,
    turborepo.SPEC,
)


def remote_types(protocols: Sequence[ProtocolSpec] = PROTOCOLS) -> dict[str, RemoteKind]:
    """Every remote ``type`` by name; a type is owned by one protocol."""
    out: dict[str, RemoteKind] = {}
    for p in protocols:
        for t in p.remote_types:
            if t.name in out:
                raise ValueError(f"remote type {t.name!r} is claimed by two protocols")
            out[t.name] = t
    return out


# First path segments the daemon itself answers (/setup/ and the management app).
RESERVED_SEGMENTS = frozenset({b"", b"setup", b"health", b"metrics", b"config", b"admin"})


def check_segments(protocols: Sequence[ProtocolSpec] = PROTOCOLS) -> None:
    """Each first path segment is answered by one protocol, and none shadows the daemon's own."""
    owner: dict[bytes, str] = {}
    for p in protocols:
        for segment in p.segments:
            if segment in RESERVED_SEGMENTS:
                raise ValueError(f"protocol {p.name!r} mounts /{segment.decode()}/, which the daemon answers itself")
            if segment in owner:
                raise ValueError(f"/{segment.decode()}/ is mounted by protocols {owner[segment]!r} and {p.name!r}")
            owner[segment] = p.name


def load_config_data(data: Any, source: str = "<config>", environ: Mapping[str, str] | None = None,
                     protocols: Sequence[ProtocolSpec] = PROTOCOLS) -> config.Config:
    """Validate parsed YAML with every protocol's remote types and sections."""
    sections = {p.section: p.parse_section for p in protocols if p.section and p.parse_section}
    return config.load(data, source, os.environ if environ is None else environ,
                       remote_types(protocols).values(), sections)


def load_config(path: str, environ: Mapping[str, str] | None = None,
                protocols: Sequence[ProtocolSpec] = PROTOCOLS) -> config.Config:
    """Read and validate ``path`` and its drop-ins (``config.dropin_dir``); raise
    ConfigError with an operator-facing message naming the file at fault."""
    data, origins = config.read_config_files(path)
    try:
        return load_config_data(data, path, environ, protocols)
    except config.ConfigError as e:
        raise config.attribute(e, origins) from None
