"""YAML configuration → validated, frozen objects.

Every error names the file, the key path and the problem, so an operator can
fix a typo without reading a traceback.  The loader accepts the keys of the
FastAPI artifact cache's ``remotes.yaml`` (``base_url``, ``username``,
``password``, ``description``, and ``type: remote|local`` with ``package:``)
and the sparkwing-cache environment (``DATA_DIR``, ``PORT``...), so those
load unchanged (:mod:`sparkcache.config_compat`).  A shared key a remote type
does not use is an error, never silently ignored (``RemoteType.honours``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence
from urllib.parse import urlsplit

import yaml
from twisted.logger import Logger

from sparkcache import config_compat

log = Logger()

SCOPES = ("read", "write", "admin")

# The keys of a remote section the loader reads for every type (``cache.*``
# by sub-key; ``username``/``password`` count as ``credentials``). A type
# lists the ones it uses in ``RemoteType.honours``; any other one given is an
# error naming the key.
SHARED_KEYS = frozenset({
    "upstream", "immutable_patterns", "mutable_patterns", "check_mutable_updates",
    "cache.immutable_ttl", "cache.mutable_ttl", "cache.negative_ttl",
    "credentials", "connect_timeout", "read_timeout",
})
# What every type that fetches through the engine uses (sparkcache.fetch):
# the upstream, its credentials and timeouts, and how long a 404 is kept.
UPSTREAM_KEYS = frozenset({"upstream", "credentials", "connect_timeout", "read_timeout", "cache.negative_ttl"})


class RemoteType(Protocol):
    """What the loader needs to know of a remote ``type`` (a protocol supplies it)."""

    @property
    def name(self) -> str: ...

    @property
    def mutable_patterns(self) -> tuple[str, ...]:
        """Paths that change in place upstream (regexes): the default of a remote's mutable_patterns."""

    @property
    def needs_upstream(self) -> bool:
        """Whether a remote of this type needs an upstream URL (local content does not)."""

    @property
    def mutable_ttl(self) -> float:
        """The default ``cache.mutable_ttl`` of a remote of this type, in seconds."""

    @property
    def many_upstreams(self) -> bool:
        """Whether ``upstream:`` may list several URLs, tried in order."""

    @property
    def honours(self) -> frozenset[str]:
        """The SHARED_KEYS a remote of this type uses; giving another is an error."""

    @property
    def local_type(self) -> str | None:
        """The type of a remotes.yaml ``type: local`` remote of this ``package``
        (None: ``<type>-local`` when that exists)."""

    def parse_options(self, loader: "Loader", sec: "Section") -> Any:
        """The type's own keys of a remote section (read through ``sec``), or None."""

    def check_remote(self, loader: "Loader", remote: "RemoteConfig", remotes: Mapping[str, "RemoteConfig"]) -> None:
        """Check ``remote`` against every other (a group's members) once all are read."""


# A protocol's own top-level section (``git:``): reads its keys through the Section.
SectionParser = Callable[["Loader", "Section"], Any]


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator."""

    def __init__(self, source: str, path: str, problem: str) -> None:
        self.source = source
        self.path = path
        self.problem = problem
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = None
    token: str | None = None

    def redacted(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "password": "***" if self.password else None,
            "token": "***" if self.token else None,
        }


@dataclass(frozen=True)
class CachePolicy:
    immutable_ttl: float = 0.0  # 0 = forever
    mutable_ttl: float = 3600.0
    negative_ttl: float = 60.0


@dataclass(frozen=True)
class RemoteConfig:
    name: str
    type: str
    upstream: str | None
    immutable_patterns: tuple[re.Pattern[str], ...] = ()
    mutable_patterns: tuple[re.Pattern[str], ...] = ()
    check_mutable_updates: bool = False
    cache: CachePolicy = field(default_factory=CachePolicy)
    credentials: Credentials | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # The type's own settings, parsed by its protocol (RemoteType.parse_options).
    options: Any = None
    # Every upstream, in the order they are tried (``upstream:`` given as a
    # list); ``upstream`` is the first. Empty when there is none.
    upstreams: tuple[str, ...] = ()
    # Free text for people (remotes.yaml's ``description``), shown in ``GET /`` and ``/config``.
    description: str | None = None

    def __post_init__(self) -> None:
        if not self.upstreams and self.upstream is not None:
            object.__setattr__(self, "upstreams", (self.upstream,))

    def redacted(self) -> dict[str, Any]:
        out = self._redacted()
        if self.options is not None and hasattr(self.options, "redacted"):
            out["options"] = self.options.redacted()
        return out

    def _redacted(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "description": self.description,
            "upstream": list(self.upstreams) if len(self.upstreams) > 1 else self.upstream,
            "immutable_patterns": [p.pattern for p in self.immutable_patterns],
            "mutable_patterns": [p.pattern for p in self.mutable_patterns],
            "check_mutable_updates": self.check_mutable_updates,
            "cache": {
                "immutable_ttl": self.cache.immutable_ttl,
                "mutable_ttl": self.cache.mutable_ttl,
                "negative_ttl": self.cache.negative_ttl,
            },
            "credentials": self.credentials.redacted() if self.credentials else None,
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
        }


@dataclass(frozen=True)
class TokenConfig:
    name: str
    token: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class AuthConfig:
    anonymous_read: bool = True
    tokens: tuple[TokenConfig, ...] = ()


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = ("tcp:8090:interface=127.0.0.1",)
    public_url: str | None = None
    shutdown_timeout: float = 30.0
    max_path_length: int = 4096
    sendfile: bool = True
    access_log: bool = False
    max_body_size: int = 10 * 2**30
    # Seconds a keep-alive connection may sit between requests, and a request's
    # head may take to arrive (slowloris); 0 disables either.
    idle_timeout: float = 60.0
    header_timeout: float = 30.0
    # Open client connections at most; None: three quarters of the open-file
    # limit the daemon starts with (see sparkcache.web.site.connection_cap).
    max_connections: int | None = None
    # Processes serving the listeners (docs/workers.rst); 1: one process, no
    # supervisor. The file's default is auto (one per core, see _workers); a
    # ServerConfig built in code is one process.
    workers: int = 1


@dataclass(frozen=True)
class StorageConfig:
    data_dir: str = "./data"
    max_size: int = 50 * 2**30
    eviction_interval: float = 60.0
    expiry_interval: float = 300.0
    stale_retention: float = 7 * 86400.0
    # The free-space floor: bytes, or a percentage of the filesystem; neither
    # set: the smaller of 1 GiB and 5 %.
    min_free: int | None = None
    min_free_percent: float | None = None
    # Where bodies live: local (data_dir/cas) or s3 (a bucket, with the
    # local disk tier of storage.tier.max_size in front: docs/s3.rst).
    backend: str = "local"
    s3: Any = None  # sparkcache.store.s3.settings.S3Settings with backend s3
    tier_max_size: int | None = None  # None: storage.max_size


@dataclass(frozen=True)
class Config:
    source: str
    server: ServerConfig
    storage: StorageConfig
    auth: AuthConfig
    remotes: Mapping[str, RemoteConfig]
    # Protocols' own top-level sections (``git:``), parsed by each protocol.
    sections: Mapping[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> Any:
        """A protocol's parsed section, or None when the protocol has none."""
        return self.sections.get(name)

    @property
    def git(self) -> Any:
        # Kept for the git machinery and its tests, which predate sections.
        return self.sections.get("git")

    def redacted(self) -> dict[str, Any]:
        return {
            "server": {
                "listen": list(self.server.listen),
                "public_url": self.server.public_url,
                "shutdown_timeout": self.server.shutdown_timeout,
                "max_path_length": self.server.max_path_length,
                "sendfile": self.server.sendfile,
                "access_log": self.server.access_log,
                "max_body_size": self.server.max_body_size,
                "idle_timeout": self.server.idle_timeout,
                "header_timeout": self.server.header_timeout,
                "max_connections": self.server.max_connections,
                "workers": self.server.workers,
            },
            "storage": {
                "data_dir": self.storage.data_dir,
                "max_size": self.storage.max_size,
                "eviction_interval": self.storage.eviction_interval,
                "expiry_interval": self.storage.expiry_interval,
                "stale_retention": self.storage.stale_retention,
                "min_free": self.storage.min_free if self.storage.min_free_percent is None
                else f"{self.storage.min_free_percent:g}%",
                "backend": self.storage.backend,
                **({"s3": self.storage.s3.redacted(), "tier": {"max_size": self.storage.tier_max_size}}
                   if self.storage.s3 is not None else {}),
            },
            "auth": {
                "anonymous_read": self.auth.anonymous_read,
                "tokens": [
                    {"name": t.name, "token": "***", "scopes": sorted(t.scopes)}
                    for t in self.auth.tokens
                ],
            },
            "remotes": {n: r.redacted() for n, r in self.remotes.items()},
            **{name: (v.redacted() if hasattr(v, "redacted") else None) for name, v in self.sections.items()},
        }


# -- scalar parsers ---------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _SIZE_UNITS[_p] = _SIZE_UNITS[_p + "b"] = 1000**_i
    _SIZE_UNITS[_p + "i"] = _SIZE_UNITS[_p + "ib"] = 1024**_i


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, 30s, 5m, 1h or 1d")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration such as 30, 30s, 5m, 1h or 1d, got {value!r}")


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576, 500MiB or 50GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])
    raise ValueError(f"expected a size such as 1048576, 500MiB or 50GiB, got {value!r}")


def _percent(value: Any) -> float | None:
    """``"5%"`` as 5.0; None for anything that is not a percentage (a size)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            p = float(value.strip()[:-1])
        except ValueError:
            raise ValueError(f"expected a size such as 1GiB or a percentage such as 5%, got {value!r}") from None
        if not 0 <= p < 100:
            raise ValueError(f"a percentage of the filesystem must be from 0 to below 100, got {value!r}")
        return p
    return None


# -- the walker -------------------------------------------------------------


class Section:
    """A mapping being read, which remembers its key path and rejects leftovers."""

    def __init__(self, loader: "Loader", path: str, data: Any) -> None:
        self.loader = loader
        self.path = path
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise loader.error(path, f"expected a mapping, got {_kind(data)}")
        self.data = dict(data)
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = None) -> Any:
        self.seen.add(name)
        return self.data.get(name, default)

    def alias(self, name: str, *aliases: str) -> None:
        """Fold an alias key into its canonical name."""
        for a in aliases:
            if a in self.data:
                if name in self.data:
                    raise self.loader.error(self.key(a), f"'{a}' is an alias of '{name}'; give only one")
                self.data[name] = self.data.pop(a)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = self.raw(name, default)
        if value is default:
            return value
        if isinstance(value, bool) and kind is not bool and (not isinstance(kind, tuple) or bool not in kind):
            raise self.loader.error(self.key(name), f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.loader.error(self.key(name), f"expected {_kind_name(kind)}, got {_kind(value)}")
        return value

    def convert(self, name: str, fn: Callable[[Any], Any], default: Any) -> Any:
        value = self.raw(name, None)
        if value is None:
            return default
        try:
            return fn(value)
        except ValueError as e:
            raise self.loader.error(self.key(name), str(e)) from None

    def sub(self, name: str) -> "Section":
        return Section(self.loader, self.key(name), self.raw(name))

    def str_list(self, name: str) -> list[str]:
        value = self.raw(name, [])
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.loader.error(self.key(name), f"expected a list of strings, got {_kind(value)}")
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise self.loader.error(f"{self.key(name)}[{i}]", f"expected a string, got {_kind(v)}")
        return value

    def done(self) -> None:
        extra = sorted(set(self.data) - self.seen)
        if extra:
            raise self.loader.error(self.key(str(extra[0])), "unknown key")


def _max_connections(loader: Any, sec: Section) -> int | None:
    """``server.max_connections``: a positive count, or ``auto`` (the default)."""
    value = sec.raw("max_connections", None)
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise loader.error(sec.key("max_connections"), f"expected a positive number of connections or auto, got {value!r}")
    return value


# Listeners whose socket worker processes can adopt (sparkcache.workers.sockets;
# an ssl: socket is plain TCP, each worker wraps its factory in TLS again).
SHAREABLE_LISTENERS = ("tcp", "tcp6", "ssl", "unix", "systemd")


def cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _workers(loader: Any, sec: Section, listen: list[str]) -> int:
    """``server.workers``: a positive count, or ``auto`` (the default: one per core)."""
    value = sec.raw("workers", "auto")
    auto = value == "auto"
    if auto:
        value = cores()
    elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise loader.error(sec.key("workers"), f"expected a positive number of processes or auto, got {value!r}")
    if value > 1:
        for spec in listen:
            if spec.split(":", 1)[0].strip().lower() not in SHAREABLE_LISTENERS:
                if auto:
                    # Nobody asked for processes: serve the listener in one, as before.
                    log.info("{source}: {key}: auto gives 1 process, not {n}: listener {spec!r} cannot be "
                             "shared by worker processes", source=loader.source, key=sec.key("workers"), n=value, spec=spec)
                    return 1
                raise loader.error(sec.key("workers"), f"listener {spec!r} cannot be shared by worker processes "
                                   f"(only {', '.join(SHAREABLE_LISTENERS)} endpoints can); use workers: 1 or auto")
    return int(value)


def _kind(v: Any) -> str:
    if v is None:
        return "nothing (null)"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}.get(
        type(v), type(v).__name__
    )


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", bool: "a boolean (true/false)", int: "an integer", float: "a number", list: "a list", dict: "a mapping"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


class Loader:
    """Reads a whole configuration; remote types and top-level sections beyond
    server/storage/auth/upstream/remotes come from the protocols it is given."""

    def __init__(self, source: str, environ: Mapping[str, str], types: Iterable[RemoteType] = (),
                 sections: Mapping[str, SectionParser] | None = None) -> None:
        self.source = source
        self.environ = environ
        # SPARKCACHE_* name → the variable that set it (itself, or a sparkwing alias).
        self.env_names = config_compat.env_names(environ)
        self.types = {t.name: t for t in types}
        self.sections = dict(sections or {})
        # Scratch space for checks that span remotes (a registry host claimed twice).
        self.scratch: dict[str, Any] = {}

    def error(self, path: str, problem: str) -> ConfigError:
        return ConfigError(self.source, path, problem)

    def env(self, path: str, var: Any) -> str:
        if not isinstance(var, str) or not var:
            raise self.error(path, "expected the name of an environment variable")
        if var not in self.environ:
            raise self.error(path, f"environment variable {var} is not set")
        return self.environ[var]

    def setting(self, name: str) -> tuple[str, str] | None:
        """(variable, value) of the SPARKCACHE_* setting ``name``, from itself or
        its sparkwing-cache alias (config_compat.ENV_ALIASES); None when neither is set.
        Errors name the variable actually set."""
        var = self.env_names.get(name) or (name if self.environ.get(name) else None)
        return (var, self.environ[var]) if var is not None else None

    def secret(self, sec: Section, name: str) -> str | None:
        """A secret given inline as ``name`` or indirectly as ``name_env``."""
        literal = sec.get(name, str, None)
        env_name = sec.raw(f"{name}_env")
        if literal is not None and env_name is not None:
            raise self.error(sec.key(name), f"give either {name} or {name}_env, not both")
        if env_name is not None:
            return self.env(sec.key(f"{name}_env"), env_name)
        return _expand(literal, self, sec.key(name)) if literal is not None else None

    # -- sections ----------------------------------------------------------

    def load(self, data: Any) -> Config:
        top = Section(self, "", data)
        server = self.server(top.sub("server"))
        storage = self.storage(top.sub("storage"))
        auth = self.auth(top.sub("auth"))
        defaults = top.sub("upstream")
        connect_timeout = defaults.convert("connect_timeout", parse_duration, 10.0)
        read_timeout = defaults.convert("read_timeout", parse_duration, 60.0)
        defaults.done()
        remotes_raw = top.raw("remotes", {})
        if remotes_raw is None:
            remotes_raw = {}
        if not isinstance(remotes_raw, dict):
            raise self.error("remotes", f"expected a mapping of remote name to settings, got {_kind(remotes_raw)}")
        remotes = {}
        for name, body in remotes_raw.items():
            remotes[str(name)] = self.remote(str(name), Section(self, f"remotes.{name}", body), connect_timeout, read_timeout)
        for r in remotes.values():
            self.types[r.type].check_remote(self, r, remotes)
        sections = {name: parse(self, top.sub(name)) for name, parse in self.sections.items()}
        top.done()
        return Config(self.source, server, storage, auth, remotes, sections)

    def server(self, sec: Section) -> ServerConfig:
        listen = sec.str_list("listen") or list(ServerConfig.listen)
        if "SPARKCACHE_LISTEN" in self.environ:
            listen = [s.strip() for s in self.environ["SPARKCACHE_LISTEN"].split(",") if s.strip()]
        elif "SPARKCACHE_PORT" in self.environ:
            port = self.environ["SPARKCACHE_PORT"]
            if not port.isdigit():
                raise self.error("SPARKCACHE_PORT", f"expected a port number, got {port!r}")
            listen = [f"tcp:{port}:interface={self.environ.get('SPARKCACHE_INTERFACE', '127.0.0.1')}"]
        else:
            listen = config_compat.sparkwing_listen(self) or listen
        public_url = sec.get("public_url", str, None)
        if public_url is not None:
            self.url(sec.key("public_url"), public_url)
            public_url = public_url.rstrip("/")
        cfg = ServerConfig(
            listen=tuple(listen),
            public_url=public_url,
            shutdown_timeout=sec.convert("shutdown_timeout", parse_duration, 30.0),
            max_path_length=sec.get("max_path_length", int, 4096),
            sendfile=sec.get("sendfile", bool, True),
            access_log=sec.get("access_log", bool, False),
            max_body_size=sec.convert("max_body_size", parse_size, ServerConfig.max_body_size),
            idle_timeout=sec.convert("idle_timeout", parse_duration, ServerConfig.idle_timeout),
            header_timeout=sec.convert("header_timeout", parse_duration, ServerConfig.header_timeout),
            max_connections=_max_connections(self, sec),
            workers=_workers(self, sec, listen),
        )
        sec.done()
        return cfg

    def storage(self, sec: Section) -> StorageConfig:
        # Read the key even when the environment overrides it, so it is
        # validated and not reported as unknown.
        data_dir = sec.get("data_dir", str, "./data")
        found = self.setting("SPARKCACHE_DATA_DIR")
        data_dir = found[1] if found else data_dir
        cfg = StorageConfig(
            data_dir=data_dir,
            max_size=sec.convert("max_size", parse_size, StorageConfig.max_size),
            eviction_interval=sec.convert("eviction_interval", parse_duration, 60.0),
            expiry_interval=sec.convert("expiry_interval", parse_duration, 300.0),
            stale_retention=sec.convert("stale_retention", parse_duration, 7 * 86400.0),
            min_free=sec.convert("min_free", lambda v: None if _percent(v) is not None else parse_size(v), None),
            min_free_percent=sec.convert("min_free", _percent, None),
            **self._backend(sec),
        )
        sec.done()
        return cfg

    def _backend(self, sec: Section) -> dict[str, Any]:
        """``storage.backend``, ``storage.s3`` and ``storage.tier`` (docs/s3.rst)."""
        backend = sec.get("backend", str, "local")
        if backend not in ("local", "s3"):
            raise self.error(sec.key("backend"), f"expected local or s3, got {backend!r}")
        if backend == "local":
            for name in ("s3", "tier"):
                if sec.has(name):
                    raise self.error(sec.key(name), "only used with storage.backend: s3")
            return {}
        from sparkcache.store.s3.settings import parse_s3

        s3 = parse_s3(self, sec.sub("s3"))
        tier = sec.sub("tier")
        tier_max = tier.convert("max_size", parse_size, None)
        tier.done()
        return {"backend": backend, "s3": s3, "tier_max_size": tier_max}

    def auth(self, sec: Section) -> AuthConfig:
        anonymous = sec.get("anonymous_read", bool, True)
        if "SPARKCACHE_ANONYMOUS_READ" in self.environ:
            anonymous = self.environ["SPARKCACHE_ANONYMOUS_READ"].lower() in ("1", "true", "yes", "on")
        tokens: list[TokenConfig] = []
        raw = sec.raw("tokens", []) or []
        if not isinstance(raw, list):
            raise self.error(sec.key("tokens"), f"expected a list of tokens, got {_kind(raw)}")
        for i, item in enumerate(raw):
            t = Section(self, f"{sec.key('tokens')}[{i}]", item)
            name = t.get("name", str, f"token{i}")
            secret = self.secret(t, "token")
            if not secret:
                raise self.error(t.key("token"), "a token needs token or token_env")
            scopes = t.str_list("scopes") or ["read"]
            for j, s in enumerate(scopes):
                if s not in SCOPES:
                    raise self.error(f"{t.key('scopes')}[{j}]", f"unknown scope {s!r}; expected one of {', '.join(SCOPES)}")
            t.done()
            tokens.append(TokenConfig(name, secret, _implied_scopes(scopes)))
        for var, scopes in (("SPARKCACHE_ADMIN_TOKEN", ["admin"]), ("SPARKCACHE_WRITE_TOKEN", ["write"]), ("SPARKCACHE_READ_TOKEN", ["read"])):
            found = self.setting(var)
            if found:
                tokens.append(TokenConfig(found[0].lower(), found[1], _implied_scopes(scopes)))
        sec.done()
        return AuthConfig(anonymous, tuple(tokens))

    def url(self, path: str, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.error(path, f"expected an http:// or https:// URL, got {value!r}")
        return value

    def patterns(self, sec: Section, name: str) -> tuple[re.Pattern[str], ...]:
        out = []
        for i, p in enumerate(sec.str_list(name)):
            try:
                out.append(re.compile(p))
            except re.error as e:
                raise self.error(f"{sec.key(name)}[{i}]", f"bad regular expression {p!r}: {e}") from None
        return tuple(out)

    def remote(self, name: str, sec: Section, connect_timeout: float, read_timeout: float) -> RemoteConfig:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", name):
            raise self.error(f"remotes.{name}", "a remote name may hold only letters, digits, '.', '_' and '-'")
        sec.alias("upstream", "base_url", "url")
        rtype = config_compat.remote_type(self, sec)
        kind = self.types[rtype]
        self.refuse_unused(sec, rtype, kind)
        description = sec.get("description", str, None)
        given = sec.get("upstream", (str, list), None)
        if given is None and kind.needs_upstream:
            raise self.error(sec.key("upstream"), "missing: a remote needs an upstream URL")
        upstreams: list[str] = []
        if isinstance(given, str):
            upstreams = [self.url(sec.key("upstream"), _expand(given, self, sec.key("upstream"))).rstrip("/")]
        elif isinstance(given, list):
            # Several upstreams: tried in order when one is unreachable or fails (5xx, 429).
            if not kind.many_upstreams:
                raise self.error(sec.key("upstream"), f"a type: {rtype} remote has one upstream URL, not a list")
            if not given:
                raise self.error(sec.key("upstream"), "an empty list; give at least one upstream URL")
            for i, u in enumerate(given):
                where = f"{sec.key('upstream')}[{i}]"
                if not isinstance(u, str):
                    raise self.error(where, f"expected a URL, got {_kind(u)}")
                upstreams.append(self.url(where, _expand(u, self, where)).rstrip("/"))
        upstream = upstreams[0] if upstreams else None
        immutable = self.patterns(sec, "immutable_patterns")
        mutable = self.patterns(sec, "mutable_patterns")
        if not sec.has("mutable_patterns"):
            mutable = tuple(re.compile(p) for p in kind.mutable_patterns)
        check = sec.get("check_mutable_updates", bool, False)
        c = sec.sub("cache")
        policy = CachePolicy(
            immutable_ttl=c.convert("immutable_ttl", parse_duration, 0.0),
            mutable_ttl=c.convert("mutable_ttl", parse_duration, kind.mutable_ttl),
            negative_ttl=c.convert("negative_ttl", parse_duration, 60.0),
        )
        c.done()
        creds = None
        if sec.has("credentials"):
            cs = sec.sub("credentials")
            creds = Credentials(self.secret(cs, "username"), self.secret(cs, "password"), self.secret(cs, "token"))
            cs.done()
        username = self.secret(sec, "username")
        password = self.secret(sec, "password")
        if username is not None or password is not None:
            if creds is not None:
                raise self.error(sec.key("username"), "give credentials either inline (username/password) or under credentials, not both")
            creds = Credentials(username, password, None)
        options = kind.parse_options(self, sec)
        cfg = RemoteConfig(
            name=name,
            type=rtype,
            upstream=upstream,
            immutable_patterns=immutable,
            mutable_patterns=mutable,
            check_mutable_updates=check,
            cache=policy,
            credentials=creds,
            connect_timeout=sec.convert("connect_timeout", parse_duration, connect_timeout),
            read_timeout=sec.convert("read_timeout", parse_duration, read_timeout),
            options=options,
            upstreams=tuple(upstreams),
            description=description,
        )
        sec.done()
        return cfg

    def refuse_unused(self, sec: Section, rtype: str, kind: RemoteType) -> None:
        """A shared key ``kind`` does not use is an error naming it: an
        allow-list or TTL that is silently ignored is worse than none."""
        given: list[tuple[str, str]] = []  # (key as written, SHARED_KEYS name)
        for key in ("upstream", "immutable_patterns", "mutable_patterns", "check_mutable_updates",
                    "credentials", "connect_timeout", "read_timeout"):
            if sec.has(key):
                given.append((key, key))
        for key in ("username", "username_env", "password", "password_env"):
            if sec.has(key):
                given.append((key, "credentials"))
        cache = sec.data.get("cache")
        if isinstance(cache, dict):
            given.extend((f"cache.{k}", f"cache.{k}") for k in cache if f"cache.{k}" in SHARED_KEYS)
        for key, shared in given:
            if shared == "cache.immutable_ttl" and "upstream" in kind.honours and cache and \
                    str(cache.get("immutable_ttl")).strip() in ("0", "0s"):
                # 0 (keep until evicted) is what every pull-through type does with
                # content it never revalidates: the setting says what happens anyway,
                # and remotes.yaml files carry the same cache: block on every remote.
                continue
            if shared not in kind.honours:
                raise self.error(sec.key(key), f"has no effect on type: {rtype} remotes")


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: str, loader: Loader, path: str) -> str:
    """Expand ``${VAR}`` references so example configs never hard-code hosts or secrets."""

    def sub(m: re.Match[str]) -> str:
        return loader.env(path, m.group(1))

    return _ENV_REF.sub(sub, value)


def _implied_scopes(scopes: Sequence[str]) -> frozenset[str]:
    out = set(scopes)
    if "admin" in out:
        out |= {"write", "read"}
    if "write" in out:
        out.add("read")
    return frozenset(out)


def read_yaml(path: str) -> Any:
    """The parsed YAML of ``path``; raise ConfigError with an operator-facing message."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(path, "", f"invalid YAML: {where}{getattr(e, 'problem', None) or e}") from None
    return data


def dropin_dir(path: str) -> str:
    """Where the drop-ins of the file ``path`` live: ``/etc/sparkcache/cache.yaml``
    → ``/etc/sparkcache/cache.d/`` (``*.yaml``, read in name order)."""
    return os.path.splitext(path)[0] + ".d"


# What a drop-in may add, as (top-level key, key inside it or None).
DROPIN_KEYS = (("remotes", None), ("git", "repos"))


def read_config_files(path: str) -> tuple[Any, dict[str, str]]:
    """The parsed YAML of ``path`` with its drop-ins merged in, and where each
    remote or repository a drop-in added came from (``remotes.<name>`` → file).

    A drop-in (one file per team or per tool, written by configuration
    management) may only add ``remotes:`` and ``git: {repos: }`` entries; a name
    defined twice is an error naming both files, never a silent override."""
    data = read_yaml(path)
    folder = dropin_dir(path)
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith((".yaml", ".yml")) and not n.startswith("."))
    except FileNotFoundError:
        return data, {}
    except OSError as e:
        raise ConfigError(folder, "", f"cannot read: {e.strerror}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return data, {}  # the loader says what is wrong with it
    origins: dict[str, str] = {}
    for name in names:
        file = os.path.join(folder, name)
        extra = read_yaml(file)
        if extra is None:
            continue
        if not isinstance(extra, dict):
            raise ConfigError(file, "", "expected a mapping with remotes: and/or git: {repos: ...}")
        for key in extra:
            if str(key) not in ("remotes", "git"):
                raise ConfigError(file, str(key), f"a drop-in may add remotes: and git: repos: only; {key} belongs in {path}")
        for top, inner in DROPIN_KEYS:
            items, where = extra.get(top), top
            if inner is not None and items is not None:
                if not isinstance(items, dict) or set(map(str, items)) - {inner}:
                    raise ConfigError(file, top, f"a drop-in's {top}: may hold {inner}: only")
                items, where = items.get(inner), f"{top}.{inner}"
            if items is None:
                continue
            if not isinstance(items, dict):
                raise ConfigError(file, where, "expected a mapping of name to its settings")
            table = _table(data, path, top if inner is None else (top, inner))
            for entry, body in items.items():
                key = f"{where}.{entry}"
                if entry in table:
                    raise ConfigError(file, key, f"already defined in {origins.get(key, path)}")
                table[entry] = body
                origins[key] = file
    return data, origins


def _table(data: dict[str, Any], path: str, keys: str | tuple[str, ...]) -> dict[Any, Any]:
    """``data[a][b]...`` for ``keys``, each level created empty when absent."""
    node, where = data, ""
    for key in (keys,) if isinstance(keys, str) else keys:
        where = f"{where}.{key}" if where else key
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise ConfigError(path, where, "expected a mapping")
        node = node[key]
    return node


def attribute(error: ConfigError, origins: Mapping[str, str]) -> ConfigError:
    """``error`` naming the drop-in that defined the remote or repository it is
    about, when a drop-in did (the loader saw one merged mapping)."""
    for prefix, file in origins.items():
        if error.path == prefix or error.path.startswith((prefix + ".", prefix + "[")):
            return ConfigError(file, error.path, error.problem)
    return error


def load(data: Any, source: str, environ: Mapping[str, str] | None, types: Iterable[RemoteType],
         sections: Mapping[str, SectionParser]) -> Config:
    """Validate parsed YAML into a Config, with the remote types and sections of some protocols.

    (``sparkcache.protocols.load_config`` calls this with every registered protocol.)"""
    return Loader(source, os.environ if environ is None else environ, types, sections).load(data)
