"""The real ``@actions/cache`` (the library actions/cache runs), driven from a
tiny node script: ``saveCache(paths, key)`` and ``restoreCache(paths, key,
restoreKeys)`` against a daemon, in a workspace and runner temp of its own.

The library is an ES module installed under ``$SPARKCACHE_TEST_NODE_MODULES``
(default ``~/.cache/sparkcache-tests/node``; ``.ci/run`` installs it): the
script imports it by file URL (NODE_PATH does not reach ES imports), and its
own imports resolve from the node_modules it sits in. It shells out to
``tar`` (and ``zstd`` when present, else gzip).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.tools import require_installed, require_tool

SCRIPT = r"""
const cache = await import(process.env.SPARKCACHE_ACTIONS_CACHE);
const [op, key, paths, restoreKeys] = [process.argv[2], process.argv[3], JSON.parse(process.argv[4]),
                                       JSON.parse(process.argv[5] || "[]")];
let result;
if (op === "save") {
  const chunk = process.env.SPARKCACHE_UPLOAD_CHUNK;  // v1 only: v2 sets its own
  result = {id: await cache.saveCache(paths, key, chunk ? {uploadChunkSize: Number(chunk)} : undefined)};
} else {
  result = {matched: (await cache.restoreCache(paths, key, restoreKeys)) ?? null};
}
console.log("RESULT " + JSON.stringify(result));
"""


def node_modules_dir() -> Path:
    root = os.environ.get("SPARKCACHE_TEST_NODE_MODULES") or os.path.expanduser("~/.cache/sparkcache-tests/node")
    return Path(root) / "node_modules"


def require_actions_cache() -> Path:
    """The entry module of @actions/cache; skip (fail under CI=true) when node or it is missing."""
    require_tool("node")
    require_tool("tar")
    return require_installed(node_modules_dir() / "@actions" / "cache" / "lib" / "cache.js", "@actions/cache")


@dataclass
class Outcome:
    result: dict
    stdout: str
    stderr: str

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.startswith(("::warning", "::error"))]


class ActionsCache:
    """One runner's view: a workspace, a runner temp, and the env pointing at the cache."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.entry = require_actions_cache()
        self.workspace = tmp / "workspace"
        self.runner_temp = tmp / "runner-temp"
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.runner_temp.mkdir(parents=True, exist_ok=True)
        self.script = tmp / "actions-cache.mjs"
        self.script.write_text(SCRIPT)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("ACTIONS_", "GITHUB_", "RUNNER_", "INPUT_"))
                    and k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
        self.env.update({"RUNNER_TEMP": str(self.runner_temp), "GITHUB_WORKSPACE": str(self.workspace),
                         "SPARKCACHE_ACTIONS_CACHE": self.entry.as_uri(), "NODE_PATH": str(node_modules_dir())})
        self.env.update(env)

    def run(self, op: str, key: str, paths: list[str], restore_keys: list[str] | None = None,
            timeout: float = 120) -> Outcome:
        proc = subprocess.run(["node", str(self.script), op, key, json.dumps(paths), json.dumps(restore_keys or [])],
                              cwd=self.workspace, env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise AssertionError(f"node {op} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return Outcome(json.loads(lines[-1][len("RESULT "):]), proc.stdout, proc.stderr)

    def save(self, key: str, paths: list[str]) -> Outcome:
        return self.run("save", key, paths)

    def restore(self, key: str, paths: list[str], restore_keys: list[str] | None = None) -> Outcome:
        return self.run("restore", key, paths, restore_keys)
