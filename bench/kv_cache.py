#!/usr/bin/env python3
"""Build caches through a ``type: kv`` remote: a ccache rebuild (and a Gradle one) through
sparkcache versus with no remote cache at all.

*ccache*: a generated C project of ``--units`` translation units (each a few
hundred lines that ``gcc -O2`` takes a moment over) is compiled through
ccache, every unit one ``ccache gcc -c``, two at a time (the machine's two
cores), with an empty local cache each time (a fresh CI machine):

* *none*: no remote storage: every unit is compiled;
* *warm*: ``CCACHE_REMOTE_STORAGE`` is the kv remote, filled by one untimed
  build before: every unit is a remote hit (checked with ``--print-stats``).

*Gradle* (skipped with ``--no-gradle`` or when gradle is missing): a Java
project of ``--classes`` classes, ``gradle clean build --build-cache`` with
the local build cache off: *none* has no remote cache; *warm* has the kv
remote, filled before, and compileJava must come FROM-CACHE. A Gradle run is
dominated by its JVM's start, which is in both figures.

Reported, medians of ``--runs``: wall time per build, the daemon's CPU
seconds per warm build, its peak RSS (VmHWM) at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import (REPO, Bench, BenchError, Daemon, apply_quick, base_parser, cpu_seconds, median, print_summary,
                    print_table, run_main, summary_row, tool)

NAME = "kv_cache"
JOBS = 2


def c_unit(i: int) -> str:
    funcs = []
    for f in range(12):
        funcs.append(
            f"double u{i}_f{f}(const double *v, int n) {{\n"
            f"  double acc = {i}.{f};\n"
            f"  for (int k = 0; k < n; k++) {{\n"
            f"    acc += v[k] * (k % {f + 3}) - acc / (k + {f + 1});\n"
            f"    if (acc > 1e6) acc = acc / {f + 2}.0; else acc *= 1.{f + 1};\n"
            f"  }}\n"
            f"  for (int k = n - 1; k >= 0; k -= {f + 1}) acc -= v[k] / (1 + k * {i % 7 + 1});\n"
            f"  return acc;\n}}\n"
        )
    total = " + ".join(f"u{i}_f{f}(v, n)" for f in range(12))
    return "#include <math.h>\n" + "".join(funcs) + f"double unit{i}(const double *v, int n) {{ return {total}; }}\n"


def write_c_project(root: Path, units: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(units):
        name = f"unit{i:03d}.c"
        (root / name).write_text(c_unit(i))
        names.append(name)
    return names


def ccache_env(b: Bench, storage: str | None, label: str) -> dict[str, str]:
    conf = b.path(f"ccache-{label}.conf")
    conf.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCACHE_")}
    env.update({"CCACHE_DIR": str(b.path(f"ccache-{label}")), "CCACHE_CONFIGPATH": str(conf), "CCACHE_NOHASHDIR": "1"})
    if storage:
        env["CCACHE_REMOTE_STORAGE"] = storage
    return env


def ccache_build(root: Path, units: list[str], env: dict[str, str]) -> tuple[float, dict[str, int]]:
    """All units through ccache with an empty local cache: (wall seconds, ccache's counters)."""
    shutil.rmtree(env["CCACHE_DIR"], ignore_errors=True)

    def compile_one(name: str) -> None:
        out = subprocess.run([tool("ccache"), "gcc", "-O2", "-c", name, "-o", name[:-2] + ".o"], cwd=root, env=env,
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise BenchError(f"compiling {name} failed:\n{out.stderr[-2000:]}")

    t0 = time.monotonic()
    with ThreadPoolExecutor(JOBS) as pool:
        list(pool.map(compile_one, units))
    took = time.monotonic() - t0
    stats = {}
    for line in subprocess.run([tool("ccache"), "--print-stats"], env=env, capture_output=True, text=True).stdout.splitlines():
        k, _, v = line.partition("\t")
        if v.strip().isdigit():
            stats[k] = int(v)
    return took, stats


def java_project(root: Path, classes: int, settings: str) -> None:
    src = root / "src/main/java/bench"
    src.mkdir(parents=True, exist_ok=True)
    (root / "build.gradle").write_text("apply plugin: 'java'\n")
    (root / "settings.gradle").write_text("rootProject.name = 'bench'\n" + settings)
    for i in range(classes):
        methods = "".join(
            f"  public static long m{m}(long x) {{ long a = x; for (int k = 0; k < {m + 3}; k++) a = a * 31 + k + C{(i + 1) % classes}.K; return a; }}\n"
            for m in range(20))
        (src / f"C{i}.java").write_text(f"package bench;\npublic class C{i} {{\n  public static final long K = {i};\n{methods}}}\n")


def gradle_build(root: Path, env: dict[str, str]) -> tuple[float, str]:
    t0 = time.monotonic()
    out = subprocess.run([tool("gradle"), "--no-daemon", "--console=plain", "--build-cache", "clean", "build"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
    took = time.monotonic() - t0
    if out.returncode != 0:
        raise BenchError(f"gradle failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return took, out.stdout


def main() -> int:
    p = base_parser(__doc__ or NAME, "(16 C units, 20 Java classes, 1 run)")
    p.add_argument("--units", type=int, default=None, help="C translation units (default 64)")
    p.add_argument("--classes", type=int, default=None, help="Java classes (default 100)")
    p.add_argument("--runs", type=int, default=None, help="builds per mode (default 3; Gradle: 1 in --quick)")
    p.add_argument("--no-gradle", action="store_true", help="only the ccache part")
    args = p.parse_args()
    apply_quick(args, {"units": 16, "classes": 20, "runs": 1}, {"units": 64, "classes": 100, "runs": 3})

    with Bench(NAME, args) as b:
        cache = Daemon(b, {"builds": {"type": "kv"}}).start()
        token = cache.admin_token  # the bench daemon's one token (admin includes write)
        base = cache.url("/kv/builds").rstrip("/")
        root = b.path("c")
        units = write_c_project(root, args.units)
        storage = f"{base}|layout=subdirs|bearer-token={token}"
        b.log(f"{len(units)} C units; filling the remote with one untimed build")
        _t, primed = ccache_build(root, units, ccache_env(b, storage, "prime"))
        if primed.get("remote_storage_write", 0) < len(units):
            raise BenchError(f"priming stored too little: {primed}")

        times: dict[str, list[float]] = {"none": [], "warm": []}
        cpu: list[float] = []
        for run in range(args.runs):
            took, stats = ccache_build(root, units, ccache_env(b, None, "none"))
            times["none"].append(took)
            before = cpu_seconds([cache.pid])
            took, stats = ccache_build(root, units, ccache_env(b, storage, "warm"))
            cpu.append(cpu_seconds([cache.pid]) - before)
            if stats.get("remote_storage_hit", 0) != len(units):
                raise BenchError(f"warm build was not all remote hits: {stats}")
            times["warm"].append(took)
            b.log(f"run {run + 1}: none {times['none'][-1]:.2f}s, warm {took:.2f}s, cache CPU {cpu[-1]:.2f}s")

        gradle_times: dict[str, list[float]] = {"none": [], "warm": []}
        gradle_cpu: list[float] = []
        gradle_skipped = args.no_gradle or shutil.which("gradle") is None
        if not gradle_skipped:
            local_off = "buildCache {\n  local { enabled = false }\n}\n"
            remote = (f"buildCache {{\n  remote(HttpBuildCache) {{\n    url = '{base}/cache/'\n    push = true\n"
                      f"    credentials {{ username = 'bench'; password = '{token}' }}\n  }}\n}}\n")
            genv = {k: v for k, v in os.environ.items() if not k.startswith("GRADLE_")}
            genv["GRADLE_USER_HOME"] = str(b.path("gradle-home"))
            java_project(b.path("java-none"), args.classes, local_off)
            java_project(b.path("java-warm"), args.classes, local_off + remote)
            b.log(f"{args.classes} Java classes; filling the remote with one untimed Gradle build")
            gradle_build(b.path("java-warm"), genv)
            for run in range(args.runs):
                took, _out = gradle_build(b.path("java-none"), genv)
                gradle_times["none"].append(took)
                before = cpu_seconds([cache.pid])
                took, out = gradle_build(b.path("java-warm"), genv)
                gradle_cpu.append(cpu_seconds([cache.pid]) - before)
                if ":compileJava FROM-CACHE" not in out:
                    raise BenchError(f"warm Gradle build did not come from the cache:\n{out[-2000:]}")
                gradle_times["warm"].append(took)
                b.log(f"gradle run {run + 1}: none {gradle_times['none'][-1]:.2f}s, warm {took:.2f}s")
        rss = cache.proc_status()
        problems = cache.log_problems()
        if problems:
            b.notes.append(f"daemon log: {problems[:5]}")

        med = {m: median(v) for m, v in times.items()}
        table = [["ccache", "none", f"{med['none']:.2f}", "-"],
                 ["ccache", "kv remote (warm)", f"{med['warm']:.2f}", f"{median(cpu):.2f}"]]
        if not gradle_skipped:
            table += [["gradle", "none", f"{median(gradle_times['none']):.2f}", "-"],
                      ["gradle", "kv remote (warm)", f"{median(gradle_times['warm']):.2f}", f"{median(gradle_cpu):.2f}"]]
        print_table(f"rebuilds with an empty local cache, medians of {args.runs}",
                    ["tool", "remote cache", "wall s", "cache CPU s"], rows=table)
        hwm = rss.get("VmHWM", 0) / (1 << 20)
        rows: list[dict[str, Any]] = [
            summary_row("ccache warm rebuild wall time", "s", round(med["warm"], 2), "no remote", round(med["none"], 2),
                        "-", None),
            summary_row("cache CPU per warm ccache rebuild", "s", round(median(cpu), 2), "", None, "-", None),
        ]
        if not gradle_skipped:
            rows += [
                summary_row("gradle warm clean build wall time", "s", round(median(gradle_times["warm"]), 2), "no remote",
                            round(median(gradle_times["none"]), 2), "-", None),
                summary_row("cache CPU per warm gradle build", "s", round(median(gradle_cpu), 2), "", None, "-", None),
            ]
        rows.append(summary_row("peak RSS (VmHWM)", "MiB", round(hwm, 1), "", None, "-", None))
        print_summary("kv_cache summary", rows)
        b.write_results({"units": args.units, "classes": args.classes, "runs": args.runs, "ccache_times": times,
                         "ccache_cache_cpu_s": cpu, "gradle_times": gradle_times, "gradle_cache_cpu_s": gradle_cpu,
                         "gradle_skipped": gradle_skipped, "rss": rss, "summary": rows})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    run_main(main)
