#!/usr/bin/env python3
"""Go builds: through sparkcache's module proxy (``type: go``) versus straight from the upstream.

A GOPROXY tree of ``--modules`` modules with two versions each (by default
100: 200 module versions, of which the build needs 100; each version is a
real module zip) is made offline (tests/support/go_modules.py) and served
from disk by an nginx of our own on 127.0.0.1, whose access log counts the
upstream requests. A main module imports every one of them. The real
``go build`` runs with an empty module cache each time (a fresh CI
machine) and a primed build cache (so compiling does not drown the module
fetches), and with ``GOSUMDB=off`` (go.sum, made once, is checked locally):

* *direct*: ``GOPROXY`` is the upstream itself;
* *cold*: through a sparkcache whose storage was just emptied;
* *warm*: through the same sparkcache again (the upstream should see no
  request at all: every file go asks for is a canonical version's).

Reported, as medians of ``--runs``: wall time of the build, upstream
requests, the daemon's CPU seconds per build, and its peak RSS (VmHWM).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (REPO, AccessLog, Bench, BenchError, Daemon, Nginx, apply_quick, base_parser, cpu_seconds,
                    free_port, median, print_summary, print_table, run_main, static_server, summary_row, tool)

sys.path.insert(0, str(REPO))
from tests.support.go_modules import app_module, proxy_tree, scaled, write_tree  # noqa: E402

NAME = "go_proxy"
RSS_GOAL_MIB = 150


def go_env(home: Path, proxy: str, gocache: Path) -> dict[str, str]:
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ["PATH"], "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
        "GOPATH": str(home / "gopath"), "GOMODCACHE": str(home / "modcache"), "GOCACHE": str(gocache),
        "GOFLAGS": "-modcacherw -mod=mod", "GOTOOLCHAIN": "local", "GO111MODULE": "on", "CGO_ENABLED": "0",
        "GOPROXY": proxy, "GOSUMDB": "off", "TMPDIR": str(home / "tmp"),
    }


def build(b: Bench, app: Path, proxy: str, gocache: Path, label: str) -> float:
    """``go build`` of ``app`` with an empty module cache; the wall time."""
    home = b.path(f"home-{label}")
    shutil.rmtree(home, ignore_errors=True)
    t0 = time.monotonic()
    out = subprocess.run([tool("go"), "build", "-o", str(b.path("app.bin")), "."], cwd=app,
                         env=go_env(home, proxy, gocache), capture_output=True, text=True, timeout=1800,
                         stdin=subprocess.DEVNULL)
    took = time.monotonic() - t0
    if out.returncode != 0:
        raise BenchError(f"go build ({label}) failed:\n{out.stderr[-3000:]}")
    shutil.rmtree(home, ignore_errors=True)
    return took


def main() -> int:
    p = base_parser(__doc__ or NAME, "(10 modules, 1 run)")
    p.add_argument("--modules", type=int, default=None, help="modules, two versions each (default 100)")
    p.add_argument("--runs", type=int, default=None, help="builds per mode (default 3)")
    args = p.parse_args()
    apply_quick(args, {"modules": 10, "runs": 1}, {"modules": 100, "runs": 3})

    with Bench(NAME, args) as b:
        versions, requires, main_go = scaled(args.modules)
        root = b.path("upstream")
        write_tree(root, proxy_tree(versions))
        for d in (root, *root.rglob("*")):
            os.chmod(d, 0o755 if d.is_dir() else 0o644)
        port = free_port()
        nginx = Nginx(b, "upstream", [static_server(port, root, "access.log")]).start()
        upstream = nginx.url("").rstrip("/")
        access = AccessLog(nginx.dir / "access.log")
        cache = Daemon(b, {"golang": {"type": "go", "upstream": upstream, "sumdb": False}}).start()
        via_cache = cache.url("/go/golang")
        app = b.path("app")
        app_module(app, requires, main_go)
        gocache = b.path("gocache")
        b.log(f"{len(versions)} module versions upstream; priming go.sum and the build cache")
        build(b, app, upstream, gocache, "prime")

        times: dict[str, list[float]] = {"direct": [], "cold": [], "warm": []}
        requests: dict[str, list[int]] = {"direct": [], "cold": [], "warm": []}
        cpu: dict[str, list[float]] = {"cold": [], "warm": []}
        for run in range(args.runs):
            for mode in ("direct", "cold", "warm"):
                if mode == "cold":
                    cache.fresh_start()
                access.mark()
                before = cpu_seconds([cache.pid])
                took = build(b, app, upstream if mode == "direct" else via_cache, gocache, mode)
                if mode != "direct":
                    cache.wait_idle()
                    cpu[mode].append(cpu_seconds([cache.pid]) - before)
                times[mode].append(took)
                requests[mode].append(len(access.settle()))
                b.log(f"run {run + 1} {mode}: {took:.2f}s, {requests[mode][-1]} upstream requests")
        rss = cache.proc_status()
        problems = cache.log_problems()
        if problems:
            b.notes.append(f"daemon log: {problems[:5]}")

        med = {m: median(v) for m, v in times.items()}
        reqs = {m: int(median(v)) for m, v in requests.items()}
        print_table(f"go build of {args.modules} modules ({2 * args.modules} versions upstream), medians of "
                    f"{args.runs}", ["mode", "GOPROXY", "wall s", "upstream requests", "cache CPU s"], rows=[
                        ["direct", "upstream", f"{med['direct']:.2f}", reqs["direct"], "-"],
                        ["cold", "sparkcache", f"{med['cold']:.2f}", reqs["cold"], f"{median(cpu['cold']):.2f}"],
                        ["warm", "sparkcache", f"{med['warm']:.2f}", reqs["warm"], f"{median(cpu['warm']):.2f}"],
                    ])
        hwm = rss.get("VmHWM", 0) / (1 << 20)
        rows: list[dict[str, Any]] = [
            summary_row("warm build wall time", "s", round(med["warm"], 2), "direct", round(med["direct"], 2),
                        "-", None, ratio_value=med["warm"] / med["direct"]),
            summary_row("cold build wall time", "s", round(med["cold"], 2), "direct", round(med["direct"], 2), "-", None,
                        ratio_value=med["cold"] / med["direct"]),
            summary_row("warm upstream requests", "", reqs["warm"], "cold", reqs["cold"], "0", reqs["warm"] == 0),
            summary_row("cache CPU per warm build", "s", round(median(cpu["warm"]), 2), "", None, "-", None),
            summary_row("cache CPU per cold build", "s", round(median(cpu["cold"]), 2), "", None, "-", None),
            summary_row("peak RSS (VmHWM)", "MiB", round(hwm, 1), "", None, f"<= {RSS_GOAL_MIB}", hwm <= RSS_GOAL_MIB),
        ]
        print_summary("go_proxy summary", rows)
        b.write_results({"modules": args.modules, "versions": len(versions), "runs": args.runs,
                         "times": times, "requests": requests, "cache_cpu_s": cpu, "rss": rss, "summary": rows})
    return 0


if __name__ == "__main__":
    run_main(main)
