"""The ``git:`` section of the configuration.

```yaml
git:
  fetch_interval: 30s          # env SPARKCACHE_FETCH_INTERVAL (or FETCH_INTERVAL) overrides
  fetch_concurrency: 4
  jitter: 5s                   # each repo's fetch starts up to this much after the tick
  threads: 4                   # git pool threads besides the fetch_concurrency ones
  repos:
    app: https://github.com/org/app.git
    gitops: {url: "git@github.com:org/gitops.git", credentials: {ssh_key: /etc/sparkcache/deploy_key}}
  allowed_hosts: [github.com]  # /git/github.com/<owner>/<repo>.git mirrors on first use
  credentials:                 # per host (or per repo name)
    github.com: {username: x-access-token, token_env: GITHUB_TOKEN}
  maintenance_interval: 6h     # repack (bitmaps, commit-graph), stale lock cleanup
  fsck_interval: 7d            # a damaged mirror is re-cloned
  stale_lock_age: 30m          # *.lock files older than this are left-overs of a crash
  max_upload_pack_body: 64MiB
  pack_cache: true
  max_interval: 1h             # idle mirrors are checked this rarely (served ones every fetch_interval)
  max_upstream_rate: 20        # ref checks per second per forge host, whatever the number of repos
  webhooks:                    # POST /git/webhook; one secret per forge kind
    github: {secret_env: GITHUB_WEBHOOK_SECRET}
    gitlab: {secret: "..."}    # also gitea, forgejo
```
``SPARKCACHE_GIT_REPOS`` (or sparkwing-cache's ``GITCACHE_REPOS``) adds repos
from the environment: ``name=url`` items or bare URLs, comma or space separated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from sparkcache.config import parse_duration, parse_size

NAME = re.compile(r"^[A-Za-z0-9._-]+$")
# scp-like ssh: [user@]host:path, where path does not start with '/' followed by '/' (that is a URL)
SCP_LIKE = re.compile(r"^(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>[A-Za-z0-9.-]+):(?P<path>(?!/)[^\s]+)$")
_HOST = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?(?::[0-9]{1,5})?$")
URL_SCHEMES = ("https", "http", "ssh", "git+ssh", "ssh+git")


@dataclass(frozen=True)
class GitCredentials:
    """How to authenticate to an upstream: an HTTPS token or an SSH key file."""

    username: str | None = None
    # repr=False: a config object printed in a log or traceback shows no secret
    token: str | None = field(default=None, repr=False)
    ssh_key: str | None = None
    ssh_public_key: str | None = None
    ssh_key_passphrase: str | None = field(default=None, repr=False)

    def redacted(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "token": "***" if self.token else None,
            "ssh_key": self.ssh_key,
            "ssh_public_key": self.ssh_public_key,
            "ssh_key_passphrase": "***" if self.ssh_key_passphrase else None,
        }


@dataclass(frozen=True)
class RepoConfig:
    name: str
    url: str
    credentials: GitCredentials | None = None
    source: str = "config"  # config | env

    def redacted(self) -> dict[str, Any]:
        return {"url": self.url, "source": self.source,
                "credentials": self.credentials.redacted() if self.credentials else None}


@dataclass(frozen=True)
class AllowedHost:
    host: str           # lower-case, with :port when given
    scheme: str = "https"


@dataclass(frozen=True)
class GitConfig:
    fetch_interval: float = 30.0
    fetch_concurrency: int = 4
    jitter: float = 5.0
    threads: int = 4
    repos: Mapping[str, RepoConfig] = field(default_factory=dict)
    allowed_hosts: tuple[AllowedHost, ...] = ()
    credentials: Mapping[str, GitCredentials] = field(default_factory=dict)
    maintenance_interval: float = 6 * 3600.0
    fsck_interval: float = 7 * 86400.0
    stale_lock_age: float = 30 * 60.0
    max_upload_pack_body: int = 64 * 2**20
    pack_cache: bool = True
    max_interval: float = 3600.0
    max_upstream_rate: float = 20.0
    # Upstream fetches of one mirror: one in flight, and the next starts at least
    # this long after the last ended (anonymous clients asking for unknown SHAs or
    # refreshes must not drive the forge back-to-back; callers in between join).
    min_fetch_interval: float = 2.0
    # Mirrors created at run time (first use on an allowed host, POST /git/register):
    # at most this many, and none while the mirrors on disk take max_size or more.
    max_mirrors: int = 1000
    max_size: int | None = None
    # forge kind (github, gitlab, gitea, forgejo) -> webhook secret
    webhooks: Mapping[str, str] = field(default_factory=dict, repr=False)

    def allowed_host(self, host: str) -> AllowedHost | None:
        host = host.lower()
        for h in self.allowed_hosts:
            if h.host == host:
                return h
        return None

    def credentials_for(self, name: str, url: str) -> GitCredentials | None:
        """The repo's own credentials, else ``credentials[<name>]``, else ``credentials[<host>]``."""
        repo = self.repos.get(name)
        if repo is not None and repo.credentials is not None:
            return repo.credentials
        if name in self.credentials:
            return self.credentials[name]
        host = url_host(url)
        if host is not None:
            by_host = {k.lower(): c for k, c in self.credentials.items()}
            return by_host.get(host) or by_host.get(host.split(":", 1)[0])
        return None

    def redacted(self) -> dict[str, Any]:
        return {
            "fetch_interval": self.fetch_interval,
            "fetch_concurrency": self.fetch_concurrency,
            "jitter": self.jitter,
            "threads": self.threads,
            "repos": {n: r.redacted() for n, r in self.repos.items()},
            "allowed_hosts": [h.host if h.scheme == "https" else f"{h.scheme}://{h.host}" for h in self.allowed_hosts],
            "credentials": {k: c.redacted() for k, c in self.credentials.items()},
            "maintenance_interval": self.maintenance_interval,
            "fsck_interval": self.fsck_interval,
            "stale_lock_age": self.stale_lock_age,
            "max_upload_pack_body": self.max_upload_pack_body,
            "min_fetch_interval": self.min_fetch_interval,
            "max_mirrors": self.max_mirrors,
            "max_size": self.max_size,
            "pack_cache": self.pack_cache,
            "max_interval": self.max_interval,
            "max_upstream_rate": self.max_upstream_rate,
            "webhooks": {k: {"secret": "***"} for k in self.webhooks},
        }


def url_host(url: str) -> str | None:
    """Lower-case ``host[:port]`` of an upstream URL (scp-like included), or None."""
    m = SCP_LIKE.match(url)
    if m and "://" not in url:
        return m.group("host").lower()
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if not host:
        return None
    return f"{host}:{port}" if port else host


def check_url(url: str, *, allow_file: bool = False) -> str:
    """Validate an upstream URL; return it unchanged or raise ValueError with the problem.

    Credentials in the URL are refused: they would end up in the mirror's
    config, in ``GET /repos`` and in logs.
    """
    if not isinstance(url, str) or not url or any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError("expected a repository URL without spaces")
    if "://" not in url:
        m = SCP_LIKE.match(url)
        if not m:
            raise ValueError(f"expected an https://, http://, ssh:// or user@host:path URL, got {url!r}")
        if ".." in m.group("path").split("/"):
            raise ValueError("the repository path may not contain '..'")
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ValueError(f"bad URL {url!r}: {e}") from None
    if parts.scheme == "file":
        if not allow_file:
            raise ValueError("file:// URLs are accepted only in the configuration")
        if not parts.path.startswith("/"):
            raise ValueError("a file:// URL needs an absolute path")
        return url
    if parts.scheme not in URL_SCHEMES:
        raise ValueError(f"unsupported scheme {parts.scheme!r}; expected https, http or ssh")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    if parts.password is not None or (parts.username and parts.scheme in ("http", "https")):
        raise ValueError("put credentials under git.credentials, not in the URL")
    if parts.query or parts.fragment:
        raise ValueError("a repository URL has no query or fragment")
    if ".." in parts.path.split("/"):
        raise ValueError("the repository path may not contain '..'")
    return url


def check_name(name: str) -> str:
    if not NAME.match(name) or set(name) == {"."}:
        raise ValueError("a repository name may hold only letters, digits, '.', '_' and '-'")
    return name


def _credentials(loader: Any, sec: Any) -> GitCredentials:
    username = loader.secret(sec, "username")
    token = loader.secret(sec, "token")
    if token is None:
        # a password is a token as far as git over HTTPS is concerned
        token = loader.secret(sec, "password")
    ssh_key = sec.get("ssh_key", str, None)
    ssh_public_key = sec.get("ssh_public_key", str, None)
    passphrase = loader.secret(sec, "ssh_key_passphrase")
    if token is not None and ssh_key is not None:
        raise loader.error(sec.key("ssh_key"), "give either a token (HTTPS) or an ssh_key, not both")
    if token is None and ssh_key is None:
        raise loader.error(sec.path, "credentials need token/token_env (HTTPS) or ssh_key (SSH)")
    if ssh_key is not None and not ssh_key.startswith("/"):
        raise loader.error(sec.key("ssh_key"), "expected an absolute path to a private key file")
    if ssh_public_key is not None and not ssh_public_key.startswith("/"):
        raise loader.error(sec.key("ssh_public_key"), "expected an absolute path to a public key file")
    sec.done()
    return GitCredentials(username, token, ssh_key, ssh_public_key, passphrase)


def _repo(loader: Any, sec: Any, name: str) -> RepoConfig:
    path = sec.key(name)
    try:
        check_name(name)
    except ValueError as e:
        raise loader.error(path, str(e)) from None
    body = sec.data[name]
    creds = None
    if isinstance(body, str):
        url = body
    else:
        from sparkcache.config import Section

        rs = Section(loader, path, body)
        rs.alias("url", "upstream")
        url = rs.get("url", str, None)
        if url is None:
            raise loader.error(rs.key("url"), "missing: a repository needs a url")
        if rs.has("credentials"):
            creds = _credentials(loader, rs.sub("credentials"))
        rs.done()
        path = rs.key("url")
    try:
        check_url(url, allow_file=True)
    except ValueError as e:
        raise loader.error(path, str(e)) from None
    return RepoConfig(name, url, creds)


def _allowed_host(loader: Any, path: str, value: str) -> AllowedHost:
    scheme = "https"
    host = value.strip().lower()
    if "://" in host:
        parts = urlsplit(host)
        if parts.scheme not in ("https", "http") or parts.path not in ("", "/"):
            raise loader.error(path, f"expected a host name (github.com) or http(s)://host[:port], got {value!r}")
        scheme, host = parts.scheme, parts.netloc
    if not _HOST.match(host) or ".." in host:
        raise loader.error(path, f"expected a host name such as github.com, got {value!r}")
    return AllowedHost(host, scheme)


def parse_env_repos(value: str) -> list[tuple[str, str]]:
    """``name=url`` items, or bare URLs named by their last path component
    without ``.git`` (sparkwing-cache's list), separated by commas and/or
    whitespace → [(name, url)]; raise ValueError naming the bad item."""
    out: list[tuple[str, str]] = []
    for item in re.split(r"[,\s]+", value):
        if not item:
            continue
        name, sep, url = item.partition("=")
        if not sep or not NAME.match(name):
            # A bare URL (a name never holds ':' or '/', a URL always does).
            url = item
            name = re.sub(r"\.git$", "", url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1])
            if not ("://" in url or SCP_LIKE.match(url)) or not NAME.match(name):
                raise ValueError(f"expected name=url or a repository URL, got {item!r}")
        check_name(name)
        check_url(url, allow_file=True)
        if any(n == name for n, _ in out):
            raise ValueError(f"two repositories named {name!r}; write name=url for one of them")
        out.append((name, url))
    return out


def parse_git_section(loader: Any, sec: Any) -> GitConfig:
    """Read the ``git:`` section (``sec`` is a config.Section; ``loader.environ``
    holds the environment, for GITCACHE_REPOS and FETCH_INTERVAL)."""
    d = GitConfig()
    fetch_interval = sec.convert("fetch_interval", parse_duration, d.fetch_interval)
    # SPARKCACHE_FETCH_INTERVAL, or sparkwing-cache's FETCH_INTERVAL (config_compat.ENV_ALIASES).
    found = loader.setting("SPARKCACHE_FETCH_INTERVAL")
    if found:
        try:
            fetch_interval = parse_duration(found[1].strip())
        except ValueError as e:
            raise loader.error(found[0], str(e)) from None
    if fetch_interval < 1.0:
        raise loader.error(sec.key("fetch_interval"), "must be at least 1s")
    concurrency = sec.get("fetch_concurrency", int, d.fetch_concurrency)
    if concurrency < 1:
        raise loader.error(sec.key("fetch_concurrency"), "must be at least 1")
    threads = sec.get("threads", int, d.threads)
    if threads < 1:
        raise loader.error(sec.key("threads"), "must be at least 1")
    jitter = sec.convert("jitter", parse_duration, min(d.jitter, fetch_interval / 4))
    if jitter >= fetch_interval:
        raise loader.error(sec.key("jitter"), "must be shorter than fetch_interval")

    repos: dict[str, RepoConfig] = {}
    raw = sec.raw("repos", {}) or {}
    if not isinstance(raw, dict):
        raise loader.error(sec.key("repos"), "expected a mapping of repository name to URL")
    from sparkcache.config import Section

    rsec = Section(loader, sec.key("repos"), raw)
    for name in raw:
        repos[str(name)] = _repo(loader, rsec, str(name))
    # SPARKCACHE_GIT_REPOS, or sparkwing-cache's GITCACHE_REPOS (config_compat.ENV_ALIASES).
    found = loader.setting("SPARKCACHE_GIT_REPOS")
    if found:
        var, env_repos = found
        try:
            pairs = parse_env_repos(env_repos)
        except ValueError as e:
            raise loader.error(var, str(e)) from None
        for name, url in pairs:
            if name in repos and repos[name].url != url:
                raise loader.error(var, f"{name} is also in {sec.key('repos')} with another URL")
            repos.setdefault(name, RepoConfig(name, url, None, "env"))

    hosts = []
    for i, h in enumerate(sec.str_list("allowed_hosts")):
        hosts.append(_allowed_host(loader, f"{sec.key('allowed_hosts')}[{i}]", h))

    creds: dict[str, GitCredentials] = {}
    craw = sec.raw("credentials", {}) or {}
    if not isinstance(craw, dict):
        raise loader.error(sec.key("credentials"), "expected a mapping of host or repository name to credentials")
    csec = Section(loader, sec.key("credentials"), craw)
    for key in craw:
        creds[str(key)] = _credentials(loader, csec.sub(str(key)))

    maintenance = sec.convert("maintenance_interval", parse_duration, d.maintenance_interval)
    fsck = sec.convert("fsck_interval", parse_duration, d.fsck_interval)
    for key, v in (("maintenance_interval", maintenance), ("fsck_interval", fsck)):
        if v < 1.0:
            raise loader.error(sec.key(key), "must be at least 1s")
    max_interval = sec.convert("max_interval", parse_duration, max(d.max_interval, fetch_interval))
    if max_interval < fetch_interval:
        raise loader.error(sec.key("max_interval"), "must be at least fetch_interval")
    rate = sec.get("max_upstream_rate", (int, float), d.max_upstream_rate)
    if isinstance(rate, bool) or not rate > 0:
        raise loader.error(sec.key("max_upstream_rate"), "expected a positive number of ref checks per second")
    webhooks = _webhooks(loader, sec)
    min_fetch = sec.convert("min_fetch_interval", parse_duration, min(d.min_fetch_interval, fetch_interval))
    if min_fetch < 0 or min_fetch > fetch_interval:
        raise loader.error(sec.key("min_fetch_interval"), "must be between 0s and fetch_interval")
    max_mirrors = sec.get("max_mirrors", int, d.max_mirrors)
    if isinstance(max_mirrors, bool) or max_mirrors < 0:
        raise loader.error(sec.key("max_mirrors"), "expected a number of mirrors (0: none created at run time)")
    max_size = sec.convert("max_size", parse_size, None)
    cfg = GitConfig(
        fetch_interval=fetch_interval,
        fetch_concurrency=concurrency,
        jitter=jitter,
        threads=threads,
        repos=repos,
        allowed_hosts=tuple(hosts),
        credentials=creds,
        maintenance_interval=maintenance,
        fsck_interval=fsck,
        stale_lock_age=sec.convert("stale_lock_age", parse_duration, d.stale_lock_age),
        max_upload_pack_body=sec.convert("max_upload_pack_body", parse_size, d.max_upload_pack_body),
        pack_cache=sec.get("pack_cache", bool, d.pack_cache),
        max_interval=max_interval,
        max_upstream_rate=float(rate),
        webhooks=webhooks,
        min_fetch_interval=min_fetch,
        max_mirrors=max_mirrors,
        max_size=max_size,
    )
    sec.done()
    return cfg


FORGES = ("github", "gitlab", "gitea", "forgejo")


def _webhooks(loader: Any, sec: Any) -> dict[str, str]:
    raw = sec.raw("webhooks", {}) or {}
    if not isinstance(raw, dict):
        raise loader.error(sec.key("webhooks"), f"expected a mapping of forge ({', '.join(FORGES)}) to a secret")
    from sparkcache.config import Section

    wsec = Section(loader, sec.key("webhooks"), raw)
    out: dict[str, str] = {}
    for forge in raw:
        if forge not in FORGES:
            raise loader.error(wsec.key(str(forge)), f"unknown forge; expected one of {', '.join(FORGES)}")
        fsec = wsec.sub(str(forge))
        secret = loader.secret(fsec, "secret")
        if not secret:
            raise loader.error(fsec.path, "a webhook needs secret or secret_env (a non-empty shared secret)")
        fsec.done()
        out[str(forge)] = secret
    return out
