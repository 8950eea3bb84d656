"""Small facts worker processes share about the world outside the store.

One worker learns something another should not have to learn again the slow
way: "this remote's upstream timed out: serve its stale tags without asking
for a while" (protocols/oci/mirror.py). Each fact is a deadline, kept in a
file of its own under ``<data_dir>/locks/hints/`` (written to a temp name and
renamed, so a reader sees a whole value or none). Blocking: call these in the
I/O pool, and only with worker processes (one process keeps such facts in memory).
"""

from __future__ import annotations

import hashlib
import os


def _path(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, "locks", "hints", hashlib.sha256(name.encode("utf-8")).hexdigest())


def read_until(data_dir: str, name: str) -> float:
    """The deadline stored under ``name``; 0 when there is none."""
    try:
        with open(_path(data_dir, name)) as f:
            return float(f.read() or 0)
    except (FileNotFoundError, ValueError):
        return 0.0


def write_until(data_dir: str, name: str, until: float) -> None:
    path = _path(data_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(repr(until))
    os.replace(tmp, path)


def clear(data_dir: str, name: str) -> None:
    try:
        os.unlink(_path(data_dir, name))
    except FileNotFoundError:
        pass
