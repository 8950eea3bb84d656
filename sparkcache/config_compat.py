"""What the configuration loader accepts so that the files and environments
of the services sparkcache replaces work unchanged (docs/configuration.rst):

- the FastAPI artifact cache's ``remotes.yaml``, where a remote has ``type:
  remote|local`` and a ``package`` (:func:`remote_type`; its ``base_url``,
  ``username``/``password`` and ``description`` are read by the loader);
- the sparkwing-cache environment, whose variables are aliases of
  ``SPARKCACHE_*`` names (:data:`ENV_ALIASES`, :func:`env_names`, and
  :func:`sparkwing_listen` for ``PORT``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from sparkcache.config import Loader, Section

# The FastAPI artifact cache's ``package:`` names that are not sparkcache type names.
FASTAPI_PACKAGES = {"docker": "oci"}

# The sparkwing-cache environment: alias → the SPARKCACHE_* name it stands for,
# which wins when both are set. ``PORT`` is not one: see :func:`sparkwing_listen`.
ENV_ALIASES = {
    "DATA_DIR": "SPARKCACHE_DATA_DIR",
    "FETCH_INTERVAL": "SPARKCACHE_FETCH_INTERVAL",
    "GITCACHE_REPOS": "SPARKCACHE_GIT_REPOS",
    "SPARKWING_API_TOKEN": "SPARKCACHE_WRITE_TOKEN",
}


def env_names(environ: Mapping[str, str]) -> dict[str, str]:
    """SPARKCACHE_* name → the variable that sets it (itself or its alias), for
    the names that have an alias and are set (empty counts as unset)."""
    out = {canonical: canonical for canonical in ENV_ALIASES.values() if environ.get(canonical)}
    for alias, canonical in ENV_ALIASES.items():
        if environ.get(alias) and canonical not in out:
            out[canonical] = alias
    return out


def sparkwing_listen(loader: "Loader") -> list[str] | None:
    """``server.listen`` from sparkwing-cache's ``PORT``, or None when unset.

    sparkwing-cache served a fleet, so ``PORT`` listens on every interface
    (``SPARKCACHE_INTERFACE`` narrows it), where ``SPARKCACHE_PORT`` keeps the
    loopback default; the loader asks only when neither SPARKCACHE_LISTEN nor
    SPARKCACHE_PORT is set."""
    port = (loader.environ.get("PORT") or "").strip()
    if not port:
        return None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise loader.error("PORT", f"expected a port number, got {port!r}")
    interface = loader.environ.get("SPARKCACHE_INTERFACE")
    return [f"tcp:{port}:interface={interface}" if interface else f"tcp:{port}"]


def remote_type(loader: "Loader", sec: "Section") -> str:
    """A remote's type: ``type:``, or remotes.yaml's ``package:`` alone, or its
    ``type: remote|local`` with ``package:`` (generic when not given):
    ``remote`` is the pull-through type of the package (``docker`` → oci),
    ``local`` the type that stores uploads of it (its ``local_type``, else
    ``<type>-local``)."""
    types = loader.types
    rtype = sec.get("type", str, None)
    package = sec.get("package", str, None)
    if rtype in ("remote", "local") and not (rtype == "local" and package is None):
        native = FASTAPI_PACKAGES.get(package or "generic", package or "generic")
        kind = types.get(native)
        if kind is None:
            raise loader.error(sec.key("package"), f"unknown package {package!r}; expected one of "
                                                   f"{', '.join(sorted({*types, *FASTAPI_PACKAGES}))}")
        if rtype == "remote":
            if not kind.needs_upstream:
                raise loader.error(sec.key("package"), f"package: {package} has no pull-through type; "
                                                       f"write type: {native} instead of type: remote")
            return native
        local = kind.local_type or (f"{native}-local" if f"{native}-local" in types else None)
        if local is None or local not in types:
            raise loader.error(sec.key("package"), f"package: {package} has no type: local counterpart "
                                                   "(uploads are served by type: local, oci-local, pypi-local or npm-local)")
        return local
    if rtype is None:
        rtype = FASTAPI_PACKAGES.get(package, package) if package is not None else "generic"
    elif package is not None and FASTAPI_PACKAGES.get(package, package) != rtype:
        raise loader.error(sec.key("package"), f"package: {package} disagrees with type: {rtype}; "
                                               "with a sparkcache type name, give type alone")
    if rtype not in types:
        where = "type" if sec.has("type") else "package"
        raise loader.error(sec.key(where), f"unknown remote type {rtype!r}; expected one of "
                                           f"{', '.join(types)} (or remotes.yaml's remote/local with package:)")
    return rtype
