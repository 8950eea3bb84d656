"""Settings specific to ``type: oci`` and ``type: oci-local`` remotes.

``registries`` (oci only): the registry host names this remote mirrors, as
containerd names them in ``?ns=`` (``docker.io``, ``ghcr.io``, ``quay.io:443``).
A host may be served by one remote only.
``repositories``: regular expressions on the repository name (as the client
writes it, before Docker Hub's implicit ``library/``); when given, names that
match none are refused with 403 DENIED. ``immutable_patterns`` is the same
allow-list in the FastAPI artifact cache's ``remotes.yaml`` (give one of the two).
``tag_ttl`` (oci only): how long a tag → digest answer (and ``tags/list``,
``_catalog``) is fresh before it is re-checked upstream with a HEAD; the
shared ``cache.mutable_ttl`` is the same setting (both given must agree).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sparkcache.config import Loader, Section, parse_duration

DEFAULT_TAG_TTL = 300.0
# A registry host as containerd puts it in ?ns=: lower-case DNS name or IP, optional port.
_HOST = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*(?::[0-9]{1,5})?$")
# Key in the loader's scratch space that remembers which remote claimed a
# host, so a second claim is reported against the second remote's key.
_CLAIMS = "oci.registry_claims"


@dataclass(frozen=True)
class OCIOptions:
    registries: tuple[str, ...] = ()
    repositories: tuple[re.Pattern[str], ...] = ()
    tag_ttl: float = DEFAULT_TAG_TTL

    @property
    def docker_hub(self) -> bool:
        """Whether single-component names get Docker Hub's implicit ``library/``."""
        return "docker.io" in self.registries

    def allows(self, repo: str) -> bool:
        return not self.repositories or any(p.search(repo) for p in self.repositories)

    def permits(self, name: str) -> bool:
        """Whether a client may pull ``name``: allowed as written or, on Docker
        Hub, under the ``library/`` name it stands for (``^library/nginx`` lets
        ``nginx`` through, as the catalog filter does)."""
        return self.allows(name) or (self.docker_hub and "/" not in name and self.allows(f"library/{name}"))

    def redacted(self) -> dict[str, Any]:
        return {
            "registries": list(self.registries),
            "repositories": [p.pattern for p in self.repositories],
            "tag_ttl": self.tag_ttl,
        }


def parse_oci_options(loader: Loader, sec: Section, rtype: str) -> OCIOptions:
    """Read the OCI-only keys of a remote section (``sec`` is a config.Section).

    Raise ``loader.error(sec.key(name), problem)`` for bad values; every key
    read goes through ``sec`` so that unknown keys are still rejected.
    """
    registries: list[str] = []
    if rtype == "oci":
        claims: dict[str, str] = loader.scratch.setdefault(_CLAIMS, {})
        for i, host in enumerate(sec.str_list("registries")):
            path = f"{sec.key('registries')}[{i}]"
            h = host.strip().lower()
            if not _HOST.match(h):
                raise loader.error(path, f"expected a registry host name such as docker.io or ghcr.io, got {host!r}")
            if h in registries:
                raise loader.error(path, f"{h} is listed twice")
            owner = claims.get(h)
            if owner is not None and owner != sec.path:
                raise loader.error(path, f"{h} is already served by {owner}")
            claims[h] = sec.path
            registries.append(h)
    elif sec.has("registries"):
        raise loader.error(sec.key("registries"), "registries applies to type: oci remotes only")
    elif sec.has("tag_ttl"):
        raise loader.error(sec.key("tag_ttl"), "tag_ttl applies to type: oci remotes only (pushed tags are never stale)")
    if sec.has("repositories") and sec.has("immutable_patterns"):
        raise loader.error(sec.key("immutable_patterns"), "immutable_patterns is the remotes.yaml spelling of "
                                                          "repositories (the allowed image names); give only one")
    # The loader has read (and checked) immutable_patterns already; reading it again is free.
    repositories = loader.patterns(sec, "repositories") or loader.patterns(sec, "immutable_patterns")
    return OCIOptions(tuple(registries), repositories, _tag_ttl(loader, sec) if rtype == "oci" else DEFAULT_TAG_TTL)


def _tag_ttl(loader: Loader, sec: Section) -> float:
    """``tag_ttl``, or else ``cache.mutable_ttl`` (remotes.yaml's name for it), or the default."""
    tag_ttl = sec.convert("tag_ttl", parse_duration, None)
    cache = sec.data.get("cache")
    given = cache.get("mutable_ttl") if isinstance(cache, dict) else None
    # Already validated by the loader (cache.* is read before a type's options).
    mutable_ttl = parse_duration(given) if given is not None else None
    if tag_ttl is not None and mutable_ttl is not None and tag_ttl != mutable_ttl:
        raise loader.error(sec.key("tag_ttl"), f"tag_ttl ({tag_ttl:g}s) and cache.mutable_ttl ({mutable_ttl:g}s) are "
                                               "the same setting, the tag TTL, and disagree; give one")
    for ttl in (tag_ttl, mutable_ttl):
        if ttl is not None:
            return ttl
    return DEFAULT_TAG_TTL


def options_of(remote: Any) -> OCIOptions:
    """A remote's OCIOptions (defaults when the remote was built without them, as in unit tests)."""
    opts = getattr(remote, "options", None)
    return opts if isinstance(opts, OCIOptions) else OCIOptions()


OCI_TYPES = ("oci", "oci-local")
