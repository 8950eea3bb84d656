"""``sparkcache config check FILE``: the daemon's own validation, without starting it."""

from __future__ import annotations

import os
from typing import Any, Mapping, TextIO

from sparkcache.cli import output


def summary(cfg: Any) -> dict[str, Any]:
    """What a loaded config will serve, for one line (or ``--json``)."""
    types: dict[str, int] = {}
    for r in cfg.remotes.values():
        types[r.type] = types.get(r.type, 0) + 1
    git = cfg.section("git")
    return {
        "remotes": len(cfg.remotes),
        "types": dict(sorted(types.items())),
        "git_repos": len(getattr(git, "repos", None) or {}),
        "listen": list(cfg.server.listen),
        "data_dir": str(cfg.storage.data_dir),
    }


def check(path: str, out: TextIO, err: TextIO, as_json: bool, environ: Mapping[str, str] | None = None) -> int:
    """0 and a one-line summary for a valid file; 1 and the error ``twistd sparkcache`` would print."""
    from sparkcache.config import ConfigError
    from sparkcache.protocols import load_config

    try:
        cfg = load_config(path, dict(os.environ) if environ is None else environ)
    except ConfigError as e:
        if as_json:
            output.dump_json({"file": path, "valid": False, "error": str(e)}, out)
        # The line twistd prints (sparkcache.tap), so a deploy check and a failed start read alike.
        err.write(f"configuration error: {e}\n")
        return 1
    s = summary(cfg)
    if as_json:
        output.dump_json({"file": path, "valid": True, **s}, out)
        return 0
    kinds = ", ".join(f"{n} {t}" for t, n in s["types"].items()) or "none"
    out.write(f"{path}: OK: {s['remotes']} remotes ({kinds}), {s['git_repos']} git repos, "
              f"listen {', '.join(s['listen']) or '-'}, data_dir {s['data_dir']}\n")
    return 0
