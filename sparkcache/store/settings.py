"""Settings the daemon keeps in its data dir: the remotes added through the API.

``<data_dir>/remotes.d/api.json`` holds ``{"version": 1, "generation": n,
"remotes": {name: mapping}}``, each mapping exactly what ``PUT
/admin/remotes/<name>`` was given (the same keys as a ``remotes:`` entry of
the YAML file); ``generation`` counts the changes. It is written whole (temp
file, fsync, rename, fsync of the folder), so a crash leaves the old set or
the new one, never a torn file. ``update_api_remotes`` is the one
read-modify-write, under ``flock`` on the ``remotes.d`` folder, so two
worker processes changing remotes at once never lose one's change. Every
function blocks: call them in the store's I/O pool (``Store.in_io``), or
before the reactor runs.

With worker processes, :class:`AppliedGenerations` (``remotes.d/workers``,
mapped into each worker) says which generation each worker applies, so the
worker that answered a change can wait until the others have it too.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
import threading
from typing import Any, Callable, Mapping

from sparkcache.store.changes import allocate

API_REMOTES = os.path.join("remotes.d", "api.json")
VERSION = 1


class SettingsError(Exception):
    """The settings file exists but cannot be read as one (already phrased for the log)."""


def api_remotes_path(data_dir: str) -> str:
    return os.path.join(os.path.abspath(data_dir), API_REMOTES)


def read_api_remotes(data_dir: str) -> dict[str, Any]:
    """The persisted API remotes by name; {} when there are none."""
    return read_api_state(data_dir)[0]


def read_api_state(data_dir: str) -> tuple[dict[str, Any], int]:
    """The persisted API remotes by name and the file's generation; ({}, 0) when there are none."""
    path = api_remotes_path(data_dir)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}, 0
    except (OSError, ValueError) as e:
        raise SettingsError(f"{path}: unreadable: {e}") from None
    remotes = data.get("remotes") if isinstance(data, dict) else None
    if not isinstance(remotes, dict):
        raise SettingsError(f"{path}: expected {{\"version\": 1, \"remotes\": {{...}}}}")
    generation = data.get("generation", 0)
    return {str(k): v for k, v in remotes.items()}, generation if isinstance(generation, int) else 0


def update_api_remotes(data_dir: str, change: Callable[[dict[str, Any]], dict[str, Any]],
                       base: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], int]:
    """Replace the persisted API remotes with ``change(current)`` (which may
    raise: nothing is written), under a lock every process of the daemon takes
    for this; returns the new remotes and generation. ``current`` is what the
    file holds, or ``base`` when given (one process: what it runs)."""
    folder = os.path.dirname(api_remotes_path(data_dir))
    os.makedirs(folder, exist_ok=True)
    # The folder, not api.json (replaced by each write) nor an extra lock file.
    fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        current, generation = read_api_state(data_dir)
        new = change(dict(current if base is None else base))
        write_api_remotes(data_dir, new, generation + 1)
        return new, generation + 1
    finally:
        os.close(fd)  # releases the lock


_write_lock = threading.Lock()


def write_api_remotes(data_dir: str, remotes: Mapping[str, Any], generation: int = 0) -> None:
    """Replace the persisted API remotes with ``remotes`` atomically (callers
    that change them use ``update_api_remotes``)."""
    path = api_remotes_path(data_dir)
    folder = os.path.dirname(path)
    body = json.dumps({"version": VERSION, "generation": generation, "remotes": dict(remotes)}, indent=1,
                      sort_keys=True).encode() + b"\n"
    with _write_lock:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
        try:
            # Owner-only, as a config file with inline credentials should be.
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        # The rename itself is durable only once the folder is synced.
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AppliedGenerations:
    """``remotes.d/workers``: per worker index, the pid and the generation of
    api.json it runs (two 8-byte words each, mapped into every worker)."""

    _SLOT = struct.Struct("<QQ")

    def __init__(self, data_dir: str, index: int, count: int) -> None:
        """Blocking (start-up): opens or creates the file and maps it."""
        folder = os.path.dirname(api_remotes_path(data_dir))
        os.makedirs(folder, exist_ok=True)
        self.index = index
        self.count = count
        size = self._SLOT.size * max(count, index + 1)
        self._fd = os.open(os.path.join(folder, "workers"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        allocate(self._fd, size)
        self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def mark(self, generation: int) -> None:
        """This worker now runs ``generation``."""
        self._SLOT.pack_into(self._map, self.index * self._SLOT.size, os.getpid(), generation)

    def behind(self, generation: int) -> list[int]:
        """The other live workers that do not run ``generation`` yet (a slot
        whose pid is gone is a dead worker's: its replacement reads the file)."""
        late = []
        for i in range(self.count):
            if i == self.index:
                continue
            pid, applied = self._SLOT.unpack_from(self._map, i * self._SLOT.size)
            if applied < generation and pid and _alive(pid):
                late.append(i)
        return late

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
