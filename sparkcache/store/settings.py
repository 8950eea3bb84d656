"""Settings the daemon keeps in its data dir: the remotes added through the API.

``<data_dir>/remotes.d/api.json`` holds ``{"version": 1, "remotes": {name:
mapping}}``, each mapping exactly what ``PUT /admin/remotes/<name>`` was
given (the same keys as a ``remotes:`` entry of the YAML file). It is written
whole (temp file, fsync, rename, fsync of the folder), so a crash leaves the
old set or the new one, never a torn file. Both functions block: call them
in the store's I/O pool (``Store.in_io``), or before the reactor runs.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Mapping

API_REMOTES = os.path.join("remotes.d", "api.json")
VERSION = 1


class SettingsError(Exception):
    """The settings file exists but cannot be read as one (already phrased for the log)."""


def api_remotes_path(data_dir: str) -> str:
    return os.path.join(os.path.abspath(data_dir), API_REMOTES)


def read_api_remotes(data_dir: str) -> dict[str, Any]:
    """The persisted API remotes by name; {} when there are none."""
    path = api_remotes_path(data_dir)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise SettingsError(f"{path}: unreadable: {e}") from None
    remotes = data.get("remotes") if isinstance(data, dict) else None
    if not isinstance(remotes, dict):
        raise SettingsError(f"{path}: expected {{\"version\": 1, \"remotes\": {{...}}}}")
    return {str(k): v for k, v in remotes.items()}


_write_lock = threading.Lock()


def write_api_remotes(data_dir: str, remotes: Mapping[str, Any]) -> None:
    """Replace the persisted API remotes with ``remotes`` atomically."""
    path = api_remotes_path(data_dir)
    folder = os.path.dirname(path)
    body = json.dumps({"version": VERSION, "remotes": dict(remotes)}, indent=1, sort_keys=True).encode() + b"\n"
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
