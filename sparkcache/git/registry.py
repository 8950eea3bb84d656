"""Which repositories the cache mirrors, under which names, and where on disk.

Sources, in order of precedence: ``git.repos`` in the configuration,
``GITCACHE_REPOS`` (both folded into GitConfig.repos), runtime registrations
(``POST /git/register``, bundle seeding) and first use of a repository on an
allow-listed host. The last two are persisted in ``<data_dir>/git/registry.json``
(names and credential-free URLs only), written atomically.

Mirror paths are derived from a hash of the name and URL, never from request
strings, so no name can point outside ``<data_dir>/git/mirrors``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

from sparkcache.git.config import SCP_LIKE, GitConfig, check_name, check_url, url_host
from sparkcache.git.interfaces import Mirror, MirrorLimit, UnknownRepo

if TYPE_CHECKING:
    from sparkcache.git.shared import RegistryChanges

REGISTRY_FILE = "registry.json"
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_HOSTPORT = re.compile(r"^(?!.*\.\.)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?$")
MAX_SEGMENTS = 8
# Registrations made while running, counted against git.max_mirrors (the
# configured repos are not: the operator listed them).
RUNTIME_SOURCES = ("runtime", "host")


class RegistrationError(ValueError):
    """A registration was refused (bad name or URL, or a name already taken)."""


@dataclass(frozen=True)
class Registration:
    name: str
    url: str
    source: str  # config | env | runtime | host


def url_key(url: str) -> str:
    """A comparison key for "the same repository": host and path, with case of the
    host, a trailing ``/`` or ``.git`` and the scheme (https vs ssh) ignored."""
    m = SCP_LIKE.match(url)
    if m and "://" not in url:
        host, path = m.group("host").lower(), m.group("path")
    else:
        parts = urlsplit(url)
        if parts.scheme == "file":
            host, path = "file:", parts.path
        else:
            host, path = url_host(url) or "", parts.path
    path = path.strip("/")
    while path.endswith("/"):
        path = path[:-1]
    if path.endswith(".git"):
        path = path[:-4]
    return f"{host}/{path.strip('/')}"


def name_from_url(url: str) -> str:
    """``https://github.com/org/app.git`` → ``github.com/org/app``: the name a
    registration made from a URL alone gets."""
    key = url_key(url)
    host, _, path = key.partition("/")
    if host == "file:":
        host = "local"
    segs = [s for s in path.split("/") if s]
    if not segs or not _HOSTPORT.match(host) or any(not _SEGMENT.match(s) or s in (".", "..") for s in segs):
        raise RegistrationError(f"cannot derive a repository name from {url!r}; give name=")
    return "/".join([host, *segs])


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._")[:64] or "repo"


class Registry:
    """Names → registrations. Reads happen on the reactor; ``save`` runs in a thread."""

    def __init__(self, config: GitConfig, git_dir: str) -> None:
        self.config = config
        self.git_dir = git_dir
        self.mirrors_dir = os.path.join(git_dir, "mirrors")
        self.file = os.path.join(git_dir, REGISTRY_FILE)
        self._repos: dict[str, Registration] = {}
        self._by_key: dict[str, str] = {}
        self._mirrors: dict[Registration, Mirror] = {}
        self._version = 0
        self._saved_version = 0
        self._save_lock = threading.Lock()
        # Asked before a registration is created at run time (first use on an
        # allowed host, POST /git/register); raises MirrorLimit when over budget.
        self.admit: Callable[[], None] = lambda: None
        # With worker processes (shared.py): the counter of writes of the file, and
        # the names forgotten here since the last save (removed from the file then).
        self.changes: "RegistryChanges | None" = None
        self._forgotten: set[str] = set()
        # Run-time registrations made here and not yet in the shared file.
        self._pending: set[str] = set()
        for r in config.repos.values():
            self._add(Registration(r.name, r.url, r.source))

    # -- loading and saving --------------------------------------------------

    def load(self) -> list[str]:
        """Read persisted registrations (blocking: call at start-up or from a thread).
        Returns the problems found; bad entries are skipped, never fatal."""
        try:
            entries = self._read_file()
        except (OSError, ValueError) as e:
            return [f"{self.file}: unreadable ({e}); runtime registrations start empty"]
        return self.merge(entries)[1]

    def _read_file(self) -> list[Any]:
        """Blocking: the entries of registry.json ([] when there is none)."""
        try:
            with open(self.file, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return []
        entries = data.get("repos", []) if isinstance(data, dict) else []
        return entries if isinstance(entries, list) else []

    def merge(self, entries: list[Any], shared: bool = False) -> tuple[list[Registration], list[str]]:
        """Add the registrations of ``entries`` (read from the file) not known here;
        returns (added, problems). What the file holds needs no saving again.
        ``shared``: the file is the truth for run-time registrations: one another
        worker forgot (its first clone failed) is forgotten here too, unless made
        here and not written yet."""
        problems: list[str] = []
        added: list[Registration] = []
        clean = not self.dirty()
        if shared:
            named = {e.get("name") for e in entries if isinstance(e, dict)}
            for reg in [r for r in self._repos.values() if r.source in RUNTIME_SOURCES]:
                if reg.name not in named and reg.name not in self._pending:
                    self._remove(reg)
        for entry in entries:
            try:
                name, url, source = str(entry["name"]), str(entry["url"]), str(entry.get("source", "runtime"))
                self._check(name, url, source)
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                problems.append(f"{self.file}: skipped {entry!r}: {err}")
                continue
            if name not in self._repos and name not in self._forgotten:
                reg = Registration(name, url, source)
                self._add(reg)
                added.append(reg)
        if clean:
            self._saved_version = self._version
        return added, problems

    def snapshot(self) -> tuple[int, list[dict[str, str]], frozenset[str]]:
        entries = [{"name": r.name, "url": r.url, "source": r.source}
                   for r in self._repos.values() if r.source in RUNTIME_SOURCES]
        forgotten, self._forgotten = frozenset(self._forgotten), set()
        return self._version, entries, forgotten

    def dirty(self) -> bool:
        return self._version != self._saved_version

    def save(self, snapshot: tuple[int, list[dict[str, str]], frozenset[str]]) -> int | None:
        """Write a snapshot taken on the reactor; an older snapshot never overwrites a newer
        one. Shared by worker processes: merged, under the file's lock, with what the others
        wrote; returns the new value of the change counter then (None: nothing shared)."""
        version, entries, forgotten = snapshot
        with self._save_lock:
            if version <= self._saved_version:
                return None
            os.makedirs(self.git_dir, exist_ok=True)
            if self.changes is None:
                self._write(entries)
                self._saved_version = version
                return None
            with self._file_lock():
                mine = {e["name"] for e in entries}
                try:
                    theirs = self._read_file()
                except ValueError:
                    theirs = []  # torn by hand: ours is what survives
                self._write(entries + [e for e in theirs if isinstance(e, dict) and e.get("name") not in mine
                                       and e.get("name") not in forgotten])
                value = self.changes.bump()
            self._saved_version = version
            return value

    def _write(self, entries: list[Any]) -> None:
        data = json.dumps({"version": 1, "repos": entries}, indent=1).encode() + b"\n"
        tmp = f"{self.file}.tmp.{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.file)

    def _file_lock(self) -> Any:
        """Blocking (a pool thread): the lock of registry.json across worker processes,
        held only while the small file is read and rewritten."""
        registry = self

        class Held:
            def __enter__(self) -> None:
                self.fd = os.open(registry.file + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(self.fd, fcntl.LOCK_EX)

            def __exit__(self, *exc: Any) -> None:
                os.close(self.fd)

        return Held()

    def read_shared(self) -> tuple[int, list[Any]]:
        """Blocking: (the change counter, the file's entries). The counter is read first:
        a write after it is seen again at the next look."""
        assert self.changes is not None
        value = self.changes.value()
        try:
            return value, self._read_file()
        except (OSError, ValueError):
            return value, []

    def reserve(self, reg: Registration, max_mirrors: int) -> None:
        """Blocking, shared only: before the first clone of a run-time mirror, put it in
        the file unless the file already holds ``max_mirrors`` run-time mirrors (those
        of every worker): git.max_mirrors holds across worker processes."""
        if self.changes is None or reg.source not in RUNTIME_SOURCES:
            return
        with self._file_lock():
            try:
                theirs = [e for e in self._read_file() if isinstance(e, dict)]
            except ValueError:
                theirs = []
            if any(e.get("name") == reg.name for e in theirs):
                return
            if sum(1 for e in theirs if e.get("source", "runtime") in RUNTIME_SOURCES) >= max_mirrors:
                raise MirrorLimit(f"this cache already holds git.max_mirrors ({max_mirrors}) mirrors created at "
                                  "run time; list the repository in git.repos or raise the limit")
            self._write([*theirs, {"name": reg.name, "url": reg.url, "source": reg.source}])
            self.changes.bump()

    # -- lookups -------------------------------------------------------------

    def all(self) -> list[Registration]:
        return list(self._repos.values())

    def get(self, name: str) -> Registration | None:
        return self._repos.get(name)

    def by_url(self, url: str) -> Registration | None:
        name = self._by_key.get(url_key(url))
        return self._repos.get(name) if name else None

    def mirror(self, reg: Registration) -> Mirror:
        # Cached: the fetch loop asks for every mirror each round.
        m = self._mirrors.get(reg)
        if m is None:
            m = self._mirrors[reg] = Mirror(reg.name, reg.url, self.path_for(reg))
        return m

    def path_for(self, reg: Registration) -> str:
        # The URL is part of the hash: a repo re-pointed at another URL in the
        # config gets a fresh mirror instead of the old repository's objects.
        digest = hashlib.sha256(f"{reg.name}\0{url_key(reg.url)}".encode()).hexdigest()[:16]
        return os.path.join(self.mirrors_dir, f"{_slug(reg.name)}-{digest}.git")

    def resolve(self, name_or_url: str) -> tuple[Registration, bool]:
        """The registration for a name, ``host/owner/repo`` or URL, creating one for an
        allow-listed host; returns (registration, created). Raises UnknownRepo."""
        if not isinstance(name_or_url, str) or not name_or_url or len(name_or_url) > 1024:
            raise UnknownRepo("no repository given")
        s = name_or_url.strip()
        reg = self._repos.get(s)
        if reg is not None:
            return reg, False
        if "://" in s or (SCP_LIKE.match(s) and "/" in s.split(":", 1)[-1] and "@" in s):
            reg = self.by_url(s)
            if reg is not None:
                return reg, False
            host = url_host(s)
            allowed = self.config.allowed_host(host) if host else None
            if allowed is None:
                raise UnknownRepo(f"{s} is not registered")
            path = url_key(s).partition("/")[2]
            return self._from_host(allowed.host, allowed.scheme, path, s)
        stripped = s[:-4] if s.endswith(".git") else s
        stripped = stripped.rstrip("/")
        reg = self._repos.get(stripped)
        if reg is not None:
            return reg, False
        host, sep, path = stripped.partition("/")
        allowed = self.config.allowed_host(host) if sep else None
        if allowed is None:
            raise UnknownRepo(f"no repository named {s!r}")
        return self._from_host(allowed.host, allowed.scheme, path, s)

    def _from_host(self, host: str, scheme: str, path: str, asked: str) -> tuple[Registration, bool]:
        segs = path.split("/")
        if segs and segs[-1].endswith(".git"):
            segs[-1] = segs[-1][:-4]
        if (not segs or len(segs) > MAX_SEGMENTS
                or any(not s or s in (".", "..") or not _SEGMENT.match(s) or s.startswith(".") for s in segs)):
            raise UnknownRepo(f"{asked!r} is not a valid repository path on {host}")
        name = "/".join([host, *segs])
        reg = self._repos.get(name)
        if reg is not None:
            return reg, False
        reg = Registration(name, f"{scheme}://{host}/{'/'.join(segs)}.git", "host")
        if self.by_url(reg.url) is not None:
            existing = self.by_url(reg.url)
            assert existing is not None
            return existing, False
        self.admit()
        self._add(reg)
        if self.changes is not None:
            self._pending.add(reg.name)
        return reg, True

    # -- reconfiguration -----------------------------------------------------

    def reconfigure(self, config: GitConfig) -> tuple[list[Registration], list[Registration]]:
        """Follow a new configuration's repos (a reload); returns (added, removed).

        As at start-up, a repo of the configuration takes its name over from a
        runtime registration. A removed repo is only forgotten, as an unused
        first-use registration is: its mirror stays on disk (and serves again if
        the repo comes back with the same URL)."""
        old = {n: r for n, r in self._repos.items() if r.source in ("config", "env")}
        new = {r.name: Registration(r.name, r.url, r.source) for r in config.repos.values()}
        self.config = config
        removed = [r for n, r in old.items() if new.get(n) != r]
        added = [r for n, r in new.items() if old.get(n) != r]
        for reg in removed:
            self._drop(reg)
        for reg in added:
            shadowed = self._repos.get(reg.name)
            if shadowed is not None:
                self._drop(shadowed)
            self._add(reg)
        return added, removed

    def _drop(self, reg: Registration) -> None:
        del self._repos[reg.name]
        self._mirrors.pop(reg, None)
        key = url_key(reg.url)
        if self._by_key.get(key) == reg.name:
            del self._by_key[key]
            other = next((r for r in self._repos.values() if url_key(r.url) == key), None)
            if other is not None:
                self._by_key[key] = other.name
        if reg.source in ("runtime", "host"):
            self._version += 1

    # -- registration --------------------------------------------------------

    def register(self, name: str | None, url: str, source: str = "runtime") -> tuple[Registration, bool]:
        """Register ``url`` (under ``name``, or a name derived from the URL); returns
        (registration, created). Re-registering the same name and URL is a no-op."""
        if name is None or name == "":
            existing = self.by_url(url)
            if existing is not None:
                return existing, False
            name = name_from_url(url)
        self._check(name, url, source)
        reg = self._repos.get(name)
        if reg is not None:
            if url_key(reg.url) == url_key(url):
                return reg, False
            raise RegistrationError(f"{name} is already registered with another URL ({reg.url})")
        other = self.by_url(url)
        if other is not None and source == "runtime":
            raise RegistrationError(f"{url} is already registered as {other.name}")
        reg = Registration(name, url, source)
        if source in RUNTIME_SOURCES:
            self.admit()
        self._add(reg)
        if self.changes is not None:
            self._pending.add(reg.name)
        return reg, True

    def created_at_runtime(self) -> int:
        return sum(1 for r in self._repos.values() if r.source in RUNTIME_SOURCES)

    def forget_unused_host(self, name: str) -> bool:
        """Drop a first-use registration on an allow-listed host that never got a
        mirror (the repository does not exist upstream, or is not reachable)."""
        reg = self._repos.get(name)
        if reg is None or reg.source != "host" or os.path.isdir(self.path_for(reg)):
            return False
        self._remove(reg)
        self._version += 1
        self._pending.discard(name)
        if self.changes is not None:
            self._forgotten.add(name)  # reserve() may have written it to the shared file
        return True

    def _remove(self, reg: Registration) -> None:
        del self._repos[reg.name]
        self._mirrors.pop(reg, None)
        key = url_key(reg.url)
        if self._by_key.get(key) == reg.name:
            del self._by_key[key]

    def written(self, names: Any) -> None:
        """The shared file now holds these (a save or a reservation completed)."""
        self._pending.difference_update(names)

    def _check(self, name: str, url: str, source: str) -> None:
        try:
            if "/" in name:
                host, _, path = name.partition("/")
                if (not _HOSTPORT.match(host)
                        or any(not s or s in (".", "..") or not _SEGMENT.match(s) for s in path.split("/"))):
                    raise ValueError(f"bad repository name {name!r}")
            else:
                check_name(name)
            # file:// URLs reach the server's own disk: only the configuration may use them.
            check_url(url, allow_file=source in ("config", "env"))
        except ValueError as e:
            raise RegistrationError(str(e)) from None

    def _add(self, reg: Registration) -> None:
        self._repos[reg.name] = reg
        self._by_key.setdefault(url_key(reg.url), reg.name)
        if reg.source in RUNTIME_SOURCES:
            self._version += 1

    def describe(self) -> dict[str, Any]:
        return {r.name: {"url": r.url, "source": r.source} for r in self._repos.values()}
