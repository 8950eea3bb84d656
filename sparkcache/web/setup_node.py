"""``/setup/node``: the configuration of a node-local sparkcache chained to this one.

A node-local daemon (one per Kubernetes node, for containerd and the builds
that run there) keeps what the node uses on the node's disk and asks this
daemon, the central one, for the rest. Its config has one remote per remote
of this daemon, of the type that speaks the same wire protocol, whose
upstream is that remote's URL here (``RemoteKind.url`` under the public URL):

- a pull-through remote keeps its type (``pypi`` → ``pypi``) and the keys that
  decide freshness (``mutable_patterns``, ``cache``...), so the node revalidates
  what this daemon revalidates; ``type: oci`` keeps its ``registries`` (the
  node's containerd names registries in ``?ns=``), ``type: go`` its checksum
  databases, proxied here under ``/go/<remote>/sumdb/<db>``;
- a remote of content that lives here (``pypi-local``, ``npm-local``,
  ``oci-local``, ``local``) or a group becomes the pull-through type served
  at the same URL (the first type with an upstream whose ``url`` is the same);
  ``local`` files may be replaced by uploads, so the node revalidates them all;
- types with nothing to pull (kv, bazel, turborepo, nx, gha, dagger: build
  caches written by clients) are listed in a comment and left out;
- ``git.repos`` become node mirrors of this daemon's smart HTTP
  ``/git/<name>``; ``git.allowed_hosts`` cannot be chained (a node mirror's
  URL is its forge's) and are listed in a comment.

When this daemon refuses anonymous reads, every upstream carries
``token_env: SPARKCACHE_CENTRAL_TOKEN`` (a read token of this daemon). The
YAML is generated from the running configuration: fetch it again after
remotes change.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import yaml

from sparkcache.config import RemoteConfig
from sparkcache.context import Context
from sparkcache.protocols.base import RemoteKind
from sparkcache.web.setup import query_arg, render_snippet
from sparkcache.web.urls import public_base

TOKEN_ENV = "SPARKCACHE_CENTRAL_TOKEN"
# Types whose every file may be replaced here: the node revalidates all of them.
_REPLACEABLE = ("local",)


def node_type(rtype: str, types: Mapping[str, RemoteKind]) -> str | None:
    """The pull-through type a node uses for a remote of ``rtype`` here: itself
    when it has an upstream, else the first type with one served at the same
    URL (same wire protocol); None when there is none (nothing to pull)."""
    kind = types.get(rtype)
    if kind is None:
        return None
    if kind.needs_upstream:
        return rtype
    for other in types.values():
        if other.needs_upstream and other.url == kind.url:
            return other.name
    return None


def remote_url(base: str, kind: RemoteKind, name: str) -> str:
    """Where a remote is served here, as an upstream URL (no trailing slash)."""
    return base + kind.url.format(name=name).rstrip("/")


def node_remote(remote: RemoteConfig, rtype: str, url: str, types: Mapping[str, RemoteKind],
                token: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"type": rtype, "upstream": url}
    if remote.description:
        out["description"] = remote.description
    kind = types[rtype]
    same = rtype == remote.type
    if same and "mutable_patterns" in kind.honours:
        patterns = [p.pattern for p in remote.mutable_patterns]
        if tuple(patterns) != kind.mutable_patterns:
            out["mutable_patterns"] = patterns
    elif remote.type in _REPLACEABLE and "mutable_patterns" in kind.honours:
        out["mutable_patterns"] = ["."]
    if same and "immutable_patterns" in kind.honours and remote.immutable_patterns:
        out["immutable_patterns"] = [p.pattern for p in remote.immutable_patterns]
    if same and "check_mutable_updates" in kind.honours and remote.check_mutable_updates:
        out["check_mutable_updates"] = True
    options = _type_options(remote, rtype, url)
    if same:
        cache = {key: getattr(remote.cache, key) for key in ("immutable_ttl", "mutable_ttl", "negative_ttl")
                 if f"cache.{key}" in kind.honours and getattr(remote.cache, key) != _default_cache(kind, key)
                 and not (key == "mutable_ttl" and "tag_ttl" in options)}
        if cache:
            out["cache"] = {k: _duration(v) for k, v in cache.items()}
    out.update(options)
    if token:
        out["credentials"] = {"token_env": TOKEN_ENV}
    return out


def _duration(seconds: float) -> str:
    """Seconds as the config writes them (``{:g}`` would give ``2.592e+06s`` for 30 days)."""
    return f"{int(seconds)}s" if seconds == int(seconds) else f"{seconds!r}s"


def _default_cache(kind: RemoteKind, key: str) -> float:
    return {"immutable_ttl": 0.0, "mutable_ttl": kind.mutable_ttl, "negative_ttl": 60.0}[key]


def _type_options(remote: RemoteConfig, rtype: str, url: str) -> dict[str, Any]:
    """The type's own keys a node needs to speak for this remote."""
    if rtype == "oci" and remote.type == "oci":
        from sparkcache.protocols.oci.config import DEFAULT_TAG_TTL, options_of as oci_options

        opts = oci_options(remote)
        out: dict[str, Any] = {"registries": list(opts.registries)} if opts.registries else {}
        if opts.tag_ttl != DEFAULT_TAG_TTL:
            out["tag_ttl"] = _duration(opts.tag_ttl)
        return out
    if rtype == "go":
        from sparkcache.protocols.go.sumdb import options_of as go_options

        dbs = [name for name, _ in go_options(remote).sumdb]
        # The central proxies each database at <remote>/sumdb/<name>: so does the node, through it.
        return {"sumdb": {name: f"{url}/sumdb/{name}" for name in dbs} if dbs else False}
    return {}


def node_config(ctx: Context, base: str, listen: str, data_dir: str) -> str:
    """The node-local YAML (with its header comments) chained to the daemon at ``base``."""
    config = ctx.config
    types = ctx.remote_types
    token = not config.auth.anonymous_read
    remotes: dict[str, Any] = {}
    skipped: list[str] = []
    for name, remote in config.remotes.items():
        rtype = node_type(remote.type, types)
        if rtype is None:
            skipped.append(f"{name} (type: {remote.type})")
            continue
        remotes[name] = node_remote(remote, rtype, remote_url(base, types[remote.type], name), types, token)
    doc: dict[str, Any] = {
        "server": {"listen": [listen]},
        "storage": {"data_dir": data_dir},
        "remotes": remotes,
    }
    git = _git_section(config.section("git"), base, token)
    if git:
        doc["git"] = git
    lines = [
        "# sparkcache node-local configuration (generated by sparkcache /setup/node).",
        f"# Every remote is served by the central cache at {base}; this node keeps what it uses",
        "# and keeps serving it while the central cache is unreachable.",
        "# Clients on the node: curl -fsS http://127.0.0.1:8090/setup/<tool> (containerd, pip, npm, ...).",
    ]
    if token:
        lines.append(f"# The central cache needs a read token: set {TOKEN_ENV} in the daemon's environment.")
    if skipped:
        lines.append("# Left out (build caches written by clients, nothing to pull): " + ", ".join(skipped) + ".")
    hosts = [h.host for h in getattr(config.section("git"), "allowed_hosts", ())]
    if hosts:
        lines.append("# git.allowed_hosts of the central cache are not chained (" + ", ".join(hosts) +
                     "): register those repositories by name there to mirror them here.")
    return "\n".join(lines) + "\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def _git_section(git: Any, base: str, token: bool) -> dict[str, Any]:
    repos = getattr(git, "repos", None) or {}
    if not repos:
        return {}
    out: dict[str, Any] = {"repos": {name: f"{base}/git/{name}" for name in repos}}
    if token:
        host = base.split("://", 1)[1].split("/", 1)[0]
        out["credentials"] = {host: {"username": "token", "token_env": TOKEN_ENV}}
    return out


def handler(ctx: Context) -> Callable[[Any], bytes]:
    def snippet(request: Any) -> bytes:
        base = public_base(request, ctx.config.server.public_url)
        listen = query_arg(request, "listen") or "tcp:8090"
        data_dir = query_arg(request, "data_dir") or "/var/lib/sparkcache"
        return render_snippet(request, "application/yaml", node_config(ctx, base, listen, data_dir),
                              "/etc/sparkcache/cache.yaml")

    return snippet
