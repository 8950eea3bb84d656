#!/usr/bin/env python3
"""Bazel builds: a warm rebuild through sparkcache's Bazel HTTP cache (``type: bazel``)
versus the same rebuild with no remote cache.

A workspace of ``--actions`` genrules (by default 120; each hashes its source
``--work`` times with sha256sum in a shell loop, a stand-in for a compile
step) is built by Debian's Bazel 4.2 (``--batch``, offline, isolated output
root), then ``bazel clean`` and built again, which is the measured build:

* *local*: no ``--remote_cache``: the rebuild runs every action again;
* *cold*: through a freshly emptied sparkcache (the rebuild of a cache that was
  filled only by this build: every action is a hit), with the first build
  (every action run and uploaded) timed too;
* *warm*: a second clean rebuild through the same cache.

Reported, as medians of ``--runs``: wall time of each build, the daemon's CPU
seconds per build and its peak RSS (VmHWM), and how many actions were remote
cache hits (every one of them in a warm build, or the run fails).
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from common import (REPO, Bench, BenchError, Daemon, apply_quick, base_parser, cpu_seconds, median, print_summary,
                    print_table, run_main, summary_row, tool)

sys.path.insert(0, str(REPO))
from tests.support.bazel_workspace import Bazel, write_genrules  # noqa: E402

NAME = "bazel_cache"
RSS_GOAL_MIB = 150


def hits(stderr: str) -> int:
    found = re.findall(r"INFO: \d+ process(?:es)?: (.*)", stderr)
    if not found:
        raise BenchError(f"no process summary in Bazel's output:\n{stderr[-3000:]}")
    m = re.search(r"(\d+) remote cache hit", found[-1])
    return int(m.group(1)) if m else 0


def timed(bazel: Bazel, *args: str) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = bazel.run(*args, timeout=3600)
    return time.monotonic() - t0, proc.stderr


def main() -> int:
    p = base_parser(__doc__ or NAME, "(20 actions, 1 run)")
    p.add_argument("--actions", type=int, default=None, help="genrule actions (default 120)")
    p.add_argument("--work", type=int, default=None, help="sha256sum rounds per action (default 40)")
    p.add_argument("--runs", type=int, default=None, help="builds per mode (default 3)")
    args = p.parse_args()
    apply_quick(args, {"actions": 20, "runs": 1}, {"actions": 120, "work": 40, "runs": 3})

    with Bench(NAME, args) as b:
        binary = tool("bazel")
        cache = Daemon(b, {"bz": {"type": "bazel"}}).start()
        url = cache.url("/bazel/bz").rstrip("/")
        times: dict[str, list[float]] = {"local": [], "first": [], "cold": [], "warm": []}
        cpu: dict[str, list[float]] = {"first": [], "cold": [], "warm": []}
        hit_counts: dict[str, list[int]] = {"local": [], "cold": [], "warm": []}
        for run in range(args.runs):
            ws = b.path(f"ws{run}")
            write_genrules(ws, args.actions, work=args.work)
            local = Bazel(binary, ws, b.path(f"home-local{run}"))
            local.run("build", "//...", timeout=3600)  # the first build, not measured
            local.run("clean")
            took, err = timed(local, "build", "//...")
            times["local"].append(took)
            hit_counts["local"].append(hits(err))
            shutil.rmtree(b.path(f"home-local{run}"), ignore_errors=True)

            cache.fresh_start()
            remote = Bazel(binary, ws, b.path(f"home-remote{run}"), url, cache.admin_token)
            for mode in ("first", "cold", "warm"):
                if mode != "first":
                    remote.run("clean")
                before = cpu_seconds([cache.pid])
                took, err = timed(remote, "build", "//...")
                cache.wait_idle()
                cpu[mode].append(cpu_seconds([cache.pid]) - before)
                times[mode].append(took)
                if mode != "first":
                    hit_counts[mode].append(hits(err))
                    if hit_counts[mode][-1] != args.actions:
                        raise BenchError(f"{mode} rebuild: {hit_counts[mode][-1]} of {args.actions} actions were "
                                         f"remote cache hits\n{err[-3000:]}")
                b.log(f"run {run + 1} {mode}: {took:.2f}s, cache CPU {cpu[mode][-1]:.2f}s")
            b.log(f"run {run + 1} local rebuild: {times['local'][-1]:.2f}s")
            shutil.rmtree(b.path(f"home-remote{run}"), ignore_errors=True)
        rss = cache.proc_status()
        problems = cache.log_problems()
        if problems:
            b.notes.append(f"daemon log: {problems[:5]}")

        med = {m: median(v) for m, v in times.items()}
        mcpu = {m: median(v) for m, v in cpu.items()}
        print_table(f"bazel clean + build of {args.actions} genrules (work {args.work}), medians of {args.runs}",
                    ["build", "remote cache", "wall s", "remote hits", "cache CPU s"], rows=[
                        ["rebuild", "none", f"{med['local']:.2f}", 0, "-"],
                        ["first build", "sparkcache (empty)", f"{med['first']:.2f}", 0, f"{mcpu['first']:.2f}"],
                        ["rebuild", "sparkcache", f"{med['cold']:.2f}", int(median(hit_counts['cold'])),
                         f"{mcpu['cold']:.2f}"],
                        ["rebuild again", "sparkcache", f"{med['warm']:.2f}", int(median(hit_counts['warm'])),
                         f"{mcpu['warm']:.2f}"],
                    ])
        hwm = rss.get("VmHWM", 0) / (1 << 20)
        rows: list[dict[str, Any]] = [
            summary_row("warm rebuild wall time", "s", round(med["warm"], 2), "no remote cache", round(med["local"], 2),
                        "-", None, ratio_value=med["warm"] / med["local"]),
            summary_row("first build wall time (uploads)", "s", round(med["first"], 2), "", None, "-", None),
            summary_row("cache CPU per warm rebuild", "s", round(mcpu["warm"], 2), "", None, "-", None),
            summary_row("cache CPU per first build", "s", round(mcpu["first"], 2), "", None, "-", None),
            summary_row("peak RSS (VmHWM)", "MiB", round(hwm, 1), "", None, f"<= {RSS_GOAL_MIB}", hwm <= RSS_GOAL_MIB),
        ]
        print_summary("bazel_cache summary", rows)
        b.write_results({"actions": args.actions, "work": args.work, "runs": args.runs, "times": times,
                         "cache_cpu_s": cpu, "hits": hit_counts, "rss": rss, "summary": rows})
    return 0


if __name__ == "__main__":
    run_main(main)
