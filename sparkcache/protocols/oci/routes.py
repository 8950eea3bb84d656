"""``/v2/``: the OCI Distribution endpoint for ``type: oci`` and ``type: oci-local`` remotes.

One endpoint, several ways to name the remote (first match wins):

1. ``?ns=<registry-host>`` (containerd mirrors send it on every request): the
   ``type: oci`` remote whose ``registries`` lists that host; the response
   carries ``OCI-Namespace``. A path that also starts with that remote's name
   (an RKE2/K3s ``rewrite`` on top of a mirror) has the prefix dropped.
2. ``/v2/<remote>/<name>/...``: the first path component names a remote
   (path routing, for rewrites and plain clients); ``/v2/<registry-host>/<name>``
   works too, for any host a remote lists in ``registries``.
3. Otherwise the remote serving ``docker.io``, if any (dockerd's
   ``registry-mirrors`` sends no ``ns`` and only mirrors Docker Hub).

``type: oci`` remotes are answered by :class:`sparkcache.protocols.oci.mirror.Mirror`;
everything under a ``type: oci-local`` repository is delegated to
:class:`sparkcache.protocols.oci.local.LocalRegistry` (which checks its own scopes).
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.resource import IResource

from sparkcache.config import Config, RemoteConfig
from sparkcache.protocols.oci.config import OCI_TYPES
from sparkcache.context import Context
from sparkcache.protocols.oci import setup as oci_setup
from sparkcache.protocols.oci.config import options_of
from sparkcache.protocols.oci.errors import OCI, OCIError, oci_errors
from sparkcache.protocols.oci.mirror import Mirror
from sparkcache.protocols.oci.names import split_path, validate_name
from sparkcache.web.bodies import BodyDecision, checked
from sparkcache.web.errors import guarded
from sparkcache.web.paths import split_raw_path, vet_request

ALL_METHODS = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"]


class OCIApp:
    app = Klein()

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.remotes: dict[str, RemoteConfig] = {}
        self.mirror = Mirror(ctx)
        self.reconfigure(ctx.config)
        self._local: Any = None
        self._gate = checked(OCI, self._body_checks)

    def reconfigure(self, config: Config) -> None:
        """The remotes of ``config`` from now on (Built.reconfigure); a changed or
        removed remote's upstream tokens and challenge are forgotten."""
        remotes = {n: r for n, r in config.remotes.items() if r.type in OCI_TYPES}
        for name, old in self.remotes.items():
            if remotes.get(name) != old:
                self.mirror.forget(name)
        by_host: dict[str, RemoteConfig] = {}
        for r in remotes.values():
            if r.type == "oci":
                for h in options_of(r).registries:
                    by_host.setdefault(h, r)
        self.remotes, self.by_host, self.default = remotes, by_host, by_host.get("docker.io")

    def resource(self) -> IResource:
        return guarded(self.app, OCI, self.ctx.config.server.max_path_length)

    oci_errors(app)

    @property
    def local(self) -> Any:
        if self._local is None:
            from sparkcache.protocols.oci.local import LocalRegistry

            self._local = LocalRegistry(self.ctx)
        return self._local

    def route(self, request: Any, segments: list[str]) -> tuple[RemoteConfig, list[str]]:
        """(remote, name segments) for the segments before the tail."""
        ns = (request.args or {}).get(b"ns")
        host = ns[0].decode("latin-1").strip().lower() if ns else None
        first = segments[0] if segments else None
        if host:
            remote = self.by_host.get(host)
            if remote is not None:
                request.setHeader(b"OCI-Namespace", host.encode())
                if first == remote.name:
                    segments = segments[1:]
                return remote, segments
        if first is not None:
            by_name = self.remotes.get(first) or self.by_host.get(first.lower())
            if by_name is not None:
                return by_name, segments[1:]
        if host:
            raise OCIError("NAME_UNKNOWN", f"no remote mirrors registry {host}", 404)
        if self.default is not None:
            return self.default, segments
        raise OCIError("NAME_UNKNOWN", "no remote named: use /v2/<remote>/<name>/..., or ?ns=<registry host> for a "
                                       "registry listed in some remote's registries", 404)

    def locate(self, request: Any) -> tuple[RemoteConfig | None, str | None, list[str]]:
        """Where a request goes, checked as far as its headers allow: (None, None,
        []) for ``/v2/`` itself, (remote, None, ["_catalog"]) for a catalog, else
        (remote, repository name, tail) once the name is valid, a mirror's read
        scope granted and the remote's allow-list passed. Raises OCIError."""
        request.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
        segments = split_raw_path(request.uri, self.ctx.config.server.max_path_length)
        rest = segments[1:]  # segments[0] is "v2"
        if rest in ([], [""]):
            return None, None, []
        before, tail = split_path(rest)
        remote, name_segments = self.route(request, before)
        if tail == ["_catalog"]:
            if name_segments:
                raise OCIError("NAME_UNKNOWN", "_catalog is per remote: /v2/_catalog?ns=<host> or /v2/<remote>/_catalog",
                               404)
            return remote, None, tail
        name = validate_name(name_segments)
        if remote.type == "oci":
            # Authenticate before policy, so anonymous probes learn nothing of the allow-list.
            self._read_only(request, f"repository:{name}:pull")
        if not options_of(remote).permits(name):
            raise OCIError("DENIED", f"repository {name!r} is not allowed by remote {remote.name!r}", 403)
        return remote, name, tail

    def body_gate(self, request: Any) -> BodyDecision:
        """Where a request's body goes, by the checks ``dispatch`` makes before reading it."""
        return self._gate(request)

    def _body_checks(self, request: Any) -> BodyDecision:
        vet_request(request, self.ctx.config.server.max_path_length)
        remote, name, tail = self.locate(request)
        if remote is None:
            _base_method(request)
            return None
        if name is None or remote.type != "oci-local":
            return None
        return self.local.body_decision(request, remote, name, tail)

    @app.route("/", branch=True, methods=ALL_METHODS)
    async def dispatch(self, request: Any) -> Any:
        remote, name, tail = self.locate(request)
        if remote is None:
            return self.base(request)
        if name is None:  # the catalog
            if remote.type == "oci-local":
                return await self.local.catalog(request, remote)
            self._read_only(request, "registry:catalog:*")
            return await self.mirror.catalog(request, remote)
        if remote.type == "oci-local":
            return await self.local.dispatch(request, remote, name, tail)
        if tail[0] == "manifests":
            return await self.mirror.manifest(request, remote, name, tail[1])
        if tail[0] == "blobs" and len(tail) == 2:
            return await self.mirror.blob(request, remote, name, tail[1])
        if tail == ["tags", "list"]:
            return await self.mirror.tags(request, remote, name)
        raise OCIError("UNSUPPORTED", f"remote {remote.name!r} is a pull-through mirror: pushes go to a type: "
                                      "oci-local remote", 405, headers={"Allow": "GET, HEAD"})

    def _read_only(self, request: Any, scope: str) -> None:
        if request.method not in (b"GET", b"HEAD"):
            raise OCIError("UNSUPPORTED", f"{request.method.decode('latin-1')} is not allowed on a pull-through mirror",
                           405, headers={"Allow": "GET, HEAD"})
        # The read scope, with a 401 challenge that points at /setup/token.
        oci_setup.authorize(self.ctx, request, "read", scope)

    def base(self, request: Any) -> bytes:
        """``GET /v2/``: the API version check clients start with (and where they learn to authenticate)."""
        _base_method(request)
        ns = (request.args or {}).get(b"ns")
        if ns and ns[0].decode("latin-1").strip().lower() in self.by_host:
            request.setHeader(b"OCI-Namespace", ns[0].strip().lower())
        # 401 with a token-endpoint challenge to clients that have not logged
        # in while tokens exist: pushers only send credentials after one.
        oci_setup.ping(self.ctx, request)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"3")
        return b"" if request.method == b"HEAD" else b"{}\n"


def _base_method(request: Any) -> None:
    if request.method not in (b"GET", b"HEAD"):
        raise OCIError("UNSUPPORTED", "only GET and HEAD on /v2/", 405, headers={"Allow": "GET, HEAD"})
