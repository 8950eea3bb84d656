"""Git mirrors shared by worker processes (``server.workers > 1``, docs/workers.rst).

Several workers serve one ``<data_dir>/git``; any of them may clone a new
mirror, fetch one (a refresh, a missing object, a webhook), seed it from a
bundle, and the primary also runs the check loop and maintenance. What keeps
one mirror consistent across them:

- ``MirrorLocks``: a ``flock`` per mirror on ``git/locks/<mirror>.lock``
  around everything that changes refs or replaces the repository (clone,
  fetch, seed, fsck and re-clone), and a second one (``.maint.lock``) around
  repack and commit-graph, which git lets run beside a fetch. Taken with
  ``LOCK_NB`` in the git pool and retried on the reactor's clock, so neither
  the reactor nor a pool thread ever waits on it. The kernel drops a lock
  with its process: a worker killed mid-fetch leaves no stale lock.
- A *fetch record* per mirror (``git/locks/<mirror>.fetched``, JSON written
  to a temp name and renamed, only by the lock's holder): when the last
  upstream fetch started and ended, and its error. A worker that waited for
  the lock while another fetched reads the record: a fetch that ended after
  it asked is its answer (it joins it, as a caller joins a running fetch in
  one process), and ``git.min_fetch_interval`` counts from the record's end,
  whoever fetched.
- ``RegistryChanges``: a counter in ``git/registry.changes`` mapped into
  every worker, bumped after each write of
  ``registry.json``; a worker whose last seen value differs re-reads the file
  (in the pool) before it answers from its registry.

With ``workers: 1`` none of this exists: no file, no syscall.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from sparkcache.fetch.xlock import try_lock, unlock
from sparkcache.store.changes import ChangeCounters

LOCKS_DIR = "locks"
# First retry soon (a ref update takes milliseconds), then back off: a clone
# of a large repository holds the lock for minutes.
RETRY_FIRST = 0.02
RETRY_MAX = 0.25

RunInPool = Callable[..., "Deferred[Any]"]


@dataclass(frozen=True)
class FetchRecord:
    """The last upstream fetch (or clone) of a mirror, by any worker."""

    started: float
    ended: float
    error: str | None = None
    pid: int = 0
    # What the fetch left, for GET /repos and git.max_size in the other workers.
    refs: int | None = None
    size: int | None = None
    changed: float | None = None  # when a fetch last changed the refs


def lock_path(locks_dir: str, mirror_path: str, kind: str = "") -> str:
    # Mirror directory names are unique (a hash of name and URL, registry.path_for).
    base = os.path.basename(mirror_path.rstrip("/"))
    return os.path.join(locks_dir, f"{base}{'.' + kind if kind else ''}.lock")


def record_path(locks_dir: str, mirror_path: str) -> str:
    return os.path.join(locks_dir, os.path.basename(mirror_path.rstrip("/")) + ".fetched")


def read_record(path: str) -> FetchRecord | None:
    """Blocking. None when no worker has fetched yet (or the record is unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return FetchRecord(float(data["started"]), float(data["ended"]), data.get("error"), int(data.get("pid", 0)),
                           data.get("refs"), data.get("size"), data.get("changed"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_json(path: str, data: Any) -> None:
    """Blocking: ``data`` as JSON at ``path``, whole or not at all (a temp name per
    process, then a rename: a reader sees the old file or the new one)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def write_record(path: str, record: FetchRecord) -> None:
    """Blocking; only the holder of the mirror's lock writes."""
    write_json(path, asdict(record))


@dataclass(frozen=True)
class Checked:
    """The last ref check that fetched nothing (the primary's loop, or a stale clone)."""

    at: float
    error: str | None = None


Seen = tuple[FetchRecord | None, Checked | None]


def write_checked(path: str, checked: Checked) -> None:
    """Blocking; any worker (a check takes no lock): temp name per process, then rename."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, asdict(checked))


def write_host_stats(path: str, stats: dict[str, tuple[int, float]]) -> None:
    """Blocking: the primary's ref checks per forge host (its loop sends nearly all)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, {host: list(v) for host, v in stats.items()})


def read_host_stats(path: str) -> dict[str, tuple[int, float]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return {str(h): (int(v[0]), float(v[1])) for h, v in data.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError, IndexError):
        return {}


def read_checked(path: str) -> Checked | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return Checked(float(data["at"]), data.get("error"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_locked(path: str) -> bool:
    """Blocking: whether some process holds the lock at ``path`` right now."""
    if not os.path.exists(path):
        return False
    fd = try_lock(path)
    if fd is None:
        return True
    unlock(fd)
    return False


def hold_shared(path: str) -> int | None:
    """Blocking: a shared lock on ``path`` (this worker serves the mirror), or None at
    the instant a repack probes it (serving goes on: the same race as in one process)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def served_anywhere(path: str) -> bool:
    """Blocking: whether any worker holds the serve lock (an upload-pack reads the mirror)."""
    return is_locked(path)


class MirrorLocks:
    """The per-mirror locks and fetch records under ``<git_dir>/locks``."""

    def __init__(self, git_dir: str, run: RunInPool, clock: Any) -> None:
        self.dir = os.path.join(git_dir, LOCKS_DIR)
        self.run = run
        self.clock = clock
        self.waits = 0  # lock attempts that found the lock held (tests, metrics)
        self._serving: dict[str, Deferred[int | None]] = {}

    def path(self, mirror_path: str, kind: str = "") -> str:
        return lock_path(self.dir, mirror_path, kind)

    async def acquire(self, mirror_path: str, kind: str = "") -> int:
        """The descriptor holding the mirror's lock (``unlock`` it, in the pool or
        not: closing never waits). Retries until free; cancelling stops retrying."""
        path = self.path(mirror_path, kind)
        delay = RETRY_FIRST
        while True:
            fd = await self.run(try_lock, path)
            if fd is not None:
                return fd  # type: ignore[no-any-return]
            self.waits += 1
            await deferLater(self.clock, delay)
            delay = min(RETRY_MAX, delay * 2)

    async def holding(self, mirror_path: str, fn: Callable[..., Any], *args: Any, kind: str = "") -> Any:
        """Run ``fn(*args)`` in the pool while holding the mirror's lock."""
        fd = await self.acquire(mirror_path, kind)
        try:
            return await self.run(fn, *args)
        finally:
            unlock(fd)

    def serve_begin(self, mirror_path: str) -> None:
        """This worker began serving the mirror (its first serve in flight): a pruning
        repack in any worker leaves it alone until ``serve_end``."""
        if mirror_path not in self._serving:
            self._serving[mirror_path] = self.run(hold_shared, self.path(mirror_path, "serve"))

    def serve_end(self, mirror_path: str) -> None:
        d = self._serving.pop(mirror_path, None)
        if d is not None:
            d.addCallback(lambda fd: unlock(fd) if fd is not None else None)
            d.addErrback(lambda _: None)

    def record_path(self, mirror_path: str) -> str:
        return record_path(self.dir, mirror_path)

    def read(self, mirror_path: str) -> "Deferred[FetchRecord | None]":
        return self.run(read_record, self.record_path(mirror_path))

    def checked_path(self, mirror_path: str) -> str:
        return os.path.join(self.dir, os.path.basename(mirror_path.rstrip("/")) + ".checked")

    def checked(self, mirror_path: str, at: float, error: str | None) -> None:
        """A ref check without a fetch: nothing changed, or the upstream failed (``error``)."""
        d = self.run(write_checked, self.checked_path(mirror_path), Checked(at, error))
        d.addErrback(lambda _: None)

    def last_seen(self, mirror_paths: list[str]) -> "Deferred[list[Seen]]":
        """For each mirror: its fetch record and its last check, by any worker (one pool job)."""
        return self.run(self.seen_sync, mirror_paths)

    def seen_sync(self, mirror_paths: list[str]) -> list[Seen]:
        """Blocking: ``last_seen``."""
        return [(read_record(self.record_path(p)), read_checked(self.checked_path(p))) for p in mirror_paths]

    def hosts_path(self) -> str:
        return os.path.join(self.dir, "hosts.json")

    def building(self, tmp_entry: str) -> bool:
        """Blocking: whether ``git/tmp/<tmp_entry>`` (``<mirror dir>.<random>``) is a clone
        some worker is making now (it holds that mirror's lock while it does)."""
        base = tmp_entry.rsplit(".", 1)[0]
        return is_locked(os.path.join(self.dir, f"{base}.lock"))


class RegistryChanges:
    """How many times any worker wrote ``registry.json``: the global counter of a
    ``store.changes.ChangeCounters`` file of its own (mapped: a look is a memory read)."""

    def __init__(self, git_dir: str) -> None:
        """Blocking (start-up): creates ``git/registry.changes`` when missing."""
        os.makedirs(git_dir, exist_ok=True)
        self._counters = ChangeCounters(os.path.join(git_dir, "registry.changes"))
        self.seen = self.value()

    def value(self) -> int:
        return self._counters.stamp("")[0]

    def stale(self) -> bool:
        return self.value() != self.seen

    def bump(self) -> int:
        """Blocking (after a write of registry.json); the new value."""
        return self._counters.bump(None)

    def close(self) -> None:
        self._counters.close()


async def wait(clock: Any, seconds: float) -> None:
    if seconds > 0:
        await deferLater(clock, seconds)
