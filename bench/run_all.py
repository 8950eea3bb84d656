#!/usr/bin/env python3
"""Run every sparkcache benchmark scenario, then print one summary table.

Each scenario runs as its own process (``python bench/<scenario>.py``), so
each can also be run alone with the same flags. ``--quick`` is a smoke run
(small sizes, short runs). Results:
``bench/results/<scenario>.json`` and ``bench/results/summary.json``.

Exit status: 0 when every scenario ran (whether or not its goals were met;
``--strict`` makes an unmet goal exit 2), 1 when a scenario failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS_DIR, fmt_num, fmt_ratio, machine_info, print_table, wait_for_quiet

HERE = Path(__file__).resolve().parent
SCENARIOS = ["hit_large", "hit_small", "cold_miss", "miss_ttfb", "thundering_herd", "rss",
             "oci_pull", "git_clone_cpu", "git_parallel_fetch", "git_wan_clone", "git_idle_loop", "s3_store"]
# these reach the registry the machine's pip/npm are configured with (not loopback only):
# run only when named in --only
NETWORK_SCENARIOS = ["pypi_cache", "npm_cache"]


def run_one(name: str, args: argparse.Namespace, timeout: float) -> tuple[str, float]:
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--results", args.results]
    if args.quick:
        cmd.append("--quick")
    if args.workdir:
        cmd += ["--workdir", args.workdir]
    if args.keep:
        cmd.append("--keep")
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.monotonic()
    # own session: a timeout or Ctrl-C here becomes one SIGTERM to the scenario,
    # which then stops its nginx/daemon/clients and removes its temp dir
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout:.0f}s"
        _terminate(proc)
    except KeyboardInterrupt:
        _terminate(proc)
        raise
    return status, time.monotonic() - t0


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, short runs")
    p.add_argument("--workdir", default=None, help="parent directory for the scenarios' temporary directories")
    p.add_argument("--results", default=str(RESULTS_DIR), help="directory for the JSON results")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(SCENARIOS + NETWORK_SCENARIOS)} "
                                             f"(the last {len(NETWORK_SCENARIOS)} use the network; only when named)")
    p.add_argument("--skip", default="", help="comma-separated scenarios to leave out")
    p.add_argument("--keep", action="store_true", help="keep each scenario's temporary directory")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds allowed per scenario (default 1200; --quick 180)")
    p.add_argument("--strict", action="store_true", help="exit 2 when a goal is not met")
    p.add_argument("--wait-quiet", type=float, default=None,
                   help="before each scenario, wait up to this many seconds for the machine to be idle "
                        "(default 300; --quick 0)")
    args = p.parse_args()
    timeout = args.timeout or (180.0 if args.quick else 1200.0)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    for s in [*only, *skip]:
        if s not in SCENARIOS + NETWORK_SCENARIOS:
            p.error(f"unknown scenario {s!r}; expected one of {', '.join(SCENARIOS + NETWORK_SCENARIOS)}")
    chosen = [s for s in (only or SCENARIOS) if s not in skip]
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    statuses: dict[str, tuple[str, float]] = {}
    try:
        for name in chosen:
            stale = results_dir / f"{name}.json"
            if stale.exists():
                stale.unlink()
            wait = args.wait_quiet if args.wait_quiet is not None else (0.0 if args.quick else 300.0)
            if wait > 0:
                wait_for_quiet(wait, log=lambda m: print(f"[run_all] {m}", flush=True))
            statuses[name] = run_one(name, args, timeout)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130

    rows = []
    scenarios = {}
    goals = met = 0
    for name in chosen:
        status, secs = statuses[name]
        path = results_dir / f"{name}.json"
        data = json.loads(path.read_text()) if status == "ok" and path.exists() else None
        scenarios[name] = {"status": status, "seconds": round(secs, 1), "summary": data["summary"] if data else None,
                           "foreign_cpu_share": data.get("foreign_cpu_share") if data else None}
        if data is None:
            rows.append([name, status, "-", "-", "-", "-", "-"])
            continue
        for r in data["summary"]:
            if r["met"] is not None:
                goals += 1
                met += bool(r["met"])
            ref = fmt_num(r["reference"])
            if r["reference_name"]:
                ref = f"{ref} [{r['reference_name']}]"
            rows.append([name, f"{r['metric']} ({r['unit']})" if r["unit"] else r["metric"], fmt_num(r["sparkcache"]),
                         ref, fmt_ratio(r["ratio"]), r["goal"],
                         "-" if r["met"] is None else ("yes" if r["met"] else "NO")])
    total = time.monotonic() - started
    print_table(f"sparkcache benchmarks{' (quick)' if args.quick else ''}: {met} of {goals} goals met, "
                f"{total:.0f}s", ["scenario", "metric", "sparkcache", "reference", "ratio", "goal", "met"], rows)
    print("CPU used by other processes during each scenario: " + ", ".join(
        f"{n} {v['foreign_cpu_share']:.0%}" for n, v in scenarios.items() if v["foreign_cpu_share"] is not None))
    failed = [n for n, (s, _t) in statuses.items() if s != "ok"]
    if failed:
        print(f"\nFAILED: {', '.join(f'{n} ({statuses[n][0]})' for n in failed)}")
    summary = {"quick": args.quick, "machine": machine_info(), "seconds": round(total, 1), "goals": goals,
               "goals_met": met, "scenarios": scenarios}
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary written to {results_dir / 'summary.json'}")
    if failed:
        return 1
    if args.strict and met < goals:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
