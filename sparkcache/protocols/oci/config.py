"""Settings specific to ``type: oci`` and ``type: oci-local`` remotes.

``registries`` (oci only): the registry host names this remote mirrors, as
containerd names them in ``?ns=`` (``docker.io``, ``ghcr.io``, ``quay.io:443``).
A host may be served by one remote only.
``repositories``: regular expressions on the repository name (as the client
writes it, before Docker Hub's implicit ``library/``); when given, names that
match none are refused with 403 DENIED.
``tag_ttl`` (oci only): how long a tag → digest answer (and ``tags/list``,
``_catalog``) is fresh before it is re-checked upstream with a HEAD.
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
    repositories = loader.patterns(sec, "repositories")
    tag_ttl = sec.convert("tag_ttl", parse_duration, DEFAULT_TAG_TTL)
    return OCIOptions(tuple(registries), repositories, tag_ttl)


def options_of(remote: Any) -> OCIOptions:
    """A remote's OCIOptions (defaults when the remote was built without them, as in unit tests)."""
    opts = getattr(remote, "options", None)
    return opts if isinstance(opts, OCIOptions) else OCIOptions()


OCI_TYPES = ("oci", "oci-local")
