"""The seed endpoints: sparkwing-cache's API at its unchanged paths.

- ``PUT/GET/HEAD /bin/<name>``: compiled pipeline binaries;
- ``PUT/GET/HEAD /cache/<key>``: dependency archives (keys may contain ``/``);
- ``POST /artifacts/<job>?path=X`` uploads one job artifact,
  ``GET /artifacts/<job>`` lists them, ``GET /artifacts/<job>?glob=X``
  downloads the matching ones (one as itself, several as a tar stream).

They need no ``remotes:`` entry: entries live under fixed internal remote
names (``seed/bin``, ``seed/cache``, ``seed/artifacts``: a ``/`` no configured
remote name may hold, so their store keys never meet a remote's), which
``GET /`` lists and ``POST /admin/purge?remote=`` accepts. The top-level
``seed:`` section tunes them (docs/seed.rst). ``app`` serves the routes,
``tarstream`` builds the tar stream of several artifacts as it is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sparkcache.config import Loader, Section, parse_duration, parse_size
from sparkcache.protocols.base import Built, ProtocolSpec

if TYPE_CHECKING:
    from sparkcache.context import Context

SECTION = "seed"
BIN, CACHE, ARTIFACTS = "seed/bin", "seed/cache", "seed/artifacts"


@dataclass(frozen=True)
class SeedConfig:
    """The ``seed:`` section."""

    # Off: /bin, /cache and /artifacts are not mounted (404 like any unknown path).
    enabled: bool = True
    # Larger bodies are refused with a 413 before they are read.
    max_entry_size: int = 2 << 30
    # Each of bin, cache and artifacts is kept to this many bytes, least recently used evicted.
    quota: int | None = None
    # Artifacts are gone this long after their upload.
    artifact_retention: float = 7 * 86400.0

    def redacted(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "max_entry_size": self.max_entry_size, "quota": self.quota,
                "artifact_retention": self.artifact_retention}


def parse_section(loader: Loader, sec: Section) -> SeedConfig:
    retention = sec.convert("artifact_retention", parse_duration, SeedConfig.artifact_retention)
    if retention <= 0:
        raise loader.error(sec.key("artifact_retention"), "must be longer than 0")
    cfg = SeedConfig(
        enabled=sec.get("enabled", bool, True),
        max_entry_size=sec.convert("max_entry_size", parse_size, SeedConfig.max_entry_size),
        quota=sec.convert("quota", parse_size, None),
        artifact_retention=retention,
    )
    sec.done()
    return cfg


def build(ctx: "Context") -> Built:
    from sparkcache.protocols.seed.app import SeedApp

    cfg = ctx.config.section(SECTION) or SeedConfig()
    if not cfg.enabled:
        return Built()
    app = SeedApp(ctx, cfg)
    return Built(resource=app.resource(), gate=app.body_gate, services=[app.expiry_service()] if ctx.primary else [])


SPEC = ProtocolSpec(name="seed", segments=(b"bin", b"cache", b"artifacts"), build=build,
                    section=SECTION, parse_section=parse_section)
