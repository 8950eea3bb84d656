"""The GitHub Actions cache service (``type: gha``, mounted at ``/gha/<remote>/``).

Both generations of the protocol ``@actions/cache``, BuildKit's ``type=gha``
and sccache speak: v2, the Twirp ``github.actions.results.api.v1.CacheService``
(JSON or protobuf, also answered at the daemon's root ``/twirp/...`` because
``@actions/cache`` drops the path of ``ACTIONS_RESULTS_URL``) with
daemon-signed Azure-style upload and download URLs, and v1,
``/_apis/artifactcache/...`` (reserve, PATCH chunks, commit, lookup).

``wire`` is the Twirp messages' codec, ``signing`` the signed URLs and the
minted runtime tokens, ``entries`` the entries' names, lookup and uploads in
progress, ``routes`` the app, ``setup`` the runner snippets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from sparkcache.config import Loader, Section, parse_duration
from sparkcache.protocols._keyed import KeyedOptions, read_keyed_options
from sparkcache.protocols.base import Built, ProtocolSpec, RemoteKind, SetupEndpoint

if TYPE_CHECKING:
    from sparkcache.context import Context

GHA = "gha"


@dataclass(frozen=True)
class GhaOptions:
    keyed: KeyedOptions
    # Serves the root ``/twirp/...`` (needed only when there are several gha remotes).
    default: bool = False
    # Where a caller with a configured token writes and reads first (GitHub: the run's
    # branch, ``refs/heads/<name>``), and further scopes it may restore from (the default branch).
    scope: str = "refs/heads/main"
    restore_scopes: tuple[str, ...] = ()
    # HMAC secret for signed URLs and minted tokens; None: the daemon's own, stored.
    signing_secret: str | None = None
    # How long a signed download URL stays valid, and an upload may take.
    url_ttl: float = 3600.0
    upload_ttl: float = 6 * 3600.0
    # Lifetime of a runtime token minted by /setup/gha-token (unless asked for less).
    token_ttl: float = 6 * 3600.0

    def redacted(self) -> dict[str, Any]:
        return {**self.keyed.redacted(), "default": self.default, "scope": self.scope,
                "restore_scopes": list(self.restore_scopes), "signing_secret": "<redacted>" if self.signing_secret
                else None, "url_ttl": self.url_ttl, "upload_ttl": self.upload_ttl, "token_ttl": self.token_ttl}


def parse_gha_options(loader: Loader, sec: Section, rtype: str) -> GhaOptions:
    keyed = read_keyed_options(loader, sec)
    scope = sec.get("scope", str, "refs/heads/main")
    if not scope:
        raise loader.error(sec.key("scope"), "a scope is a non-empty string")
    return GhaOptions(
        keyed=keyed,
        default=sec.get("default", bool, False),
        scope=scope,
        restore_scopes=tuple(sec.str_list("restore_scopes")),
        signing_secret=loader.secret(sec, "signing_secret"),
        url_ttl=sec.convert("url_ttl", parse_duration, 3600.0),
        upload_ttl=sec.convert("upload_ttl", parse_duration, 6 * 3600.0),
        token_ttl=sec.convert("token_ttl", parse_duration, 6 * 3600.0),
    )


def check_default(loader: Loader, remote: Any, remotes: Mapping[str, Any]) -> None:
    defaults = sorted(n for n, r in remotes.items() if r.type == GHA and r.options.default)
    if len(defaults) > 1 and remote.name == defaults[1]:
        raise loader.error(f"remotes.{remote.name}.default",
                           f"only one gha remote may be the default (also {defaults[0]!r})")


def build(ctx: "Context") -> Built:
    from sparkcache.protocols.gha import setup
    from sparkcache.protocols.gha.routes import GhaApp
    from sparkcache.web.root import Remount

    if not any(r.type == GHA for r in ctx.config.remotes.values()):
        return Built()
    app = GhaApp(ctx)
    resource = Remount(app.resource())
    return Built(
        mounts={b"gha": resource, b"twirp": resource},
        gates={b"gha": app.body_gate, b"twirp": app.body_gate},
        setup={
            "gha": SetupEndpoint(lambda request: setup.env_snippet(app, request)),
            "gha-token": SetupEndpoint(lambda request: setup.mint(app, request), ("POST",), scope="write"),
        },
        reconfigure=app.reconfigure,
    )


SPEC = ProtocolSpec(
    name="gha",
    segments=(b"gha", b"twirp"),
    build=build,
    remote_types=(RemoteKind(GHA, needs_upstream=False, options=parse_gha_options, url="/gha/{name}/",
                             check=check_default),),
)
