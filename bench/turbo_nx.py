#!/usr/bin/env python3
"""turbo and Nx builds on a fresh machine: through sparkcache's remote caches vs no remote cache.

A monorepo of ``--packages`` packages (default 20) is generated for each
tool (tests/support/turbo_workspaces: npm workspaces + turbo.json for turbo;
nx.json + project.json targets for Nx, the global ``nx`` linked in). Each
package's ``build`` burns ``--work-ms`` of CPU (default 500) and writes
``--output-kib`` of random bytes (default 256): a small compile step.

Every run starts as a new CI machine would: the tool's local cache and the
outputs removed. Per tool:

* *none*: no remote cache: every task runs;
* *cold*: through the cache (``type: turborepo`` / ``type: nx``), the remote
  empty: every task runs and uploads its outputs;
* *warm*: through the cache again: every task is a remote hit.

Reported: wall time of the build (median of ``--runs``), the share of tasks
that were remote hits, and the cache's CPU seconds per run. ``--parallel``
runs both tools' workloads with the tool's default concurrency.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from common import (REPO, Bench, BenchError, Daemon, apply_quick, base_parser, cpu_seconds, median, print_summary,
                    print_table, run_main, summary_row)

sys.path.insert(0, str(REPO))
from tests.support.turbo_workspaces import (  # noqa: E402
    clear_nx, clear_turbo, nx_env, nx_package_dir, nx_workspace, run_nx, run_turbo, turbo_env, turbo_summary,
    turbo_workspace,
)

NAME = "turbo_nx"
KINDS = ("none", "cold", "warm")


def task_command(work_ms: int, output_kib: int) -> str:
    return ("node -e \"const fs=require('fs'),c=require('crypto');const t=Date.now();let x=0;"
            f"while(Date.now()-t<{work_ms})x+=Math.sqrt(x+1);"
            "fs.mkdirSync('dist',{recursive:true});"
            f"fs.writeFileSync('dist/out.bin',c.randomBytes({output_kib * 1024}))\"")


class Tool:
    """One tool's workspace and how to run it with or without the remote cache."""

    def __init__(self, bench: Bench, name: str, daemon: Daemon, packages: tuple[str, ...], command: str) -> None:
        self.bench, self.name, self.daemon = bench, name, daemon
        root = bench.path(f"{name}-ws")
        home = bench.path(f"{name}-home")
        if name == "turbo":
            self.ws = turbo_workspace(root, packages=packages, command=command)
            self.env = turbo_env(home)
        else:
            self.ws = nx_workspace(root, projects=packages, command=command)
            self.env = nx_env(home)
        self.n = 0
        for project in (root / ("packages" if name == "turbo" else "libs")).iterdir():
            (project / "seed.txt").write_text("0\n")

    def run(self, kind: str) -> dict[str, Any]:
        """One build from a cleared workspace; ``cold`` starts with inputs the remote
        has never seen, ``warm`` reads what cold stored."""
        self.n += 1
        token = self.daemon.admin_token
        env = dict(self.env)
        args: list[str] = []
        if kind == "cold":
            # New inputs, new task hashes: the remote has none of them.
            for seed in self.ws.glob("*/*/seed.txt"):
                seed.write_text(f"{self.n}\n")
        if self.name == "turbo":
            clear_turbo(self.ws)
            if kind != "none":
                args = [f"--api={self.daemon.url('/turborepo/turbo')}", "--team=bench", f"--token={token}"]
        else:
            clear_nx(self.ws, env)
            if kind != "none":
                env.update({"NX_SELF_HOSTED_REMOTE_CACHE_SERVER": self.daemon.url("/nx/nx"),
                            "NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN": token})
        cpu0 = cpu_seconds([self.daemon.pid])
        t0 = time.monotonic()
        run = run_turbo if self.name == "turbo" else run_nx
        proc = run(self.ws, env, *args, timeout=1800)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise BenchError(f"{self.name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        out = proc.stdout + proc.stderr
        if self.name == "turbo":
            tasks = turbo_summary(self.ws)["tasks"]
            hits = sum(1 for t in tasks if t["cache"].get("source") == "REMOTE")  # type: ignore[index,union-attr]
            total = len(tasks)  # type: ignore[arg-type]
        else:
            hits = out.count("[remote cache]")
            total = len(list((self.ws / "libs").iterdir()))
        return {"wall_s": round(wall, 3), "remote_hits": hits, "tasks": total,
                "cache_cpu_s": round(cpu_seconds([self.daemon.pid]) - cpu0, 3)}


def main() -> int:
    p = base_parser(__doc__.split("\n")[0], "5 packages, 1 run")
    p.add_argument("--packages", type=int, default=None, help="packages (projects) per workspace")
    p.add_argument("--work-ms", type=int, default=None, help="CPU milliseconds each build task burns")
    p.add_argument("--output-kib", type=int, default=None, help="KiB each build task writes")
    p.add_argument("--runs", type=int, default=None, help="runs of each kind (the median is reported)")
    p.add_argument("--tools", default="turbo,nx", help="which tools: turbo, nx or both")
    args = p.parse_args()
    apply_quick(args, {"packages": 5, "runs": 1}, {"packages": 20, "work_ms": 500, "output_kib": 256, "runs": 3})
    tools = [t for t in args.tools.split(",") if t]
    for t in tools:
        if t not in ("turbo", "nx"):
            raise BenchError(f"unknown tool {t!r}")
        if shutil.which(t) is None or (t == "nx" and nx_package_dir() is None):
            raise BenchError(f"{t} is not installed (global npm package)")
    with Bench(NAME, args) as bench:
        daemon = Daemon(bench, {"turbo": {"type": "turborepo"}, "nx": {"type": "nx"}}).start()
        packages = tuple(f"p{i:03d}" for i in range(args.packages))
        command = task_command(args.work_ms, args.output_kib)
        results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for name in tools:
            tool = Tool(bench, name, daemon, packages, command)
            results[name] = {k: [] for k in KINDS}
            for i in range(args.runs):
                for kind in KINDS:  # cold then warm: warm reads what cold stored
                    r = tool.run(kind)
                    results[name][kind].append(r)
                    bench.log(f"{name} {kind} run {i + 1}: {r}")

        def med(tool: str, kind: str, key: str) -> float:
            return median(r[key] for r in results[tool][kind])

        rows = []
        table = []
        for name in tools:
            none = med(name, "none", "wall_s")
            for kind in KINDS:
                table.append([name, kind, med(name, kind, "wall_s"), f"{med(name, kind, 'wall_s') / none:.2f}x",
                              f"{med(name, kind, 'remote_hits'):.0f}/{med(name, kind, 'tasks'):.0f}",
                              "-" if kind == "none" else med(name, kind, "cache_cpu_s")])
            warm = med(name, "warm", "wall_s")
            rows.append(summary_row(f"{name}: warm build wall (all remote hits)", "s", warm, "no remote cache", none,
                                    "faster than no remote cache", warm < none))
            rows.append(summary_row(f"{name}: warm remote hits", "", med(name, "warm", "remote_hits"), "", None,
                                    f"all {args.packages}", med(name, "warm", "remote_hits") == args.packages))
        print_table(f"{args.packages} packages, {args.work_ms} ms of CPU and {args.output_kib} KiB of output each, "
                    f"local caches cleared before every run (medians of {args.runs})",
                    ["tool", "kind", "wall s", "vs none", "remote hits", "cache CPU s"], table)
        print_summary(NAME, rows)
        bench.write_results({"packages": args.packages, "work_ms": args.work_ms, "output_kib": args.output_kib,
                             "runs": args.runs, "results": results, "summary": rows,
                             "log_problems": daemon.log_problems()[:20]})
    return 0


if __name__ == "__main__":
    run_main(main)
