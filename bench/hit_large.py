#!/usr/bin/env python3
"""Scenario 1: a large cache hit, one client.

sparkcache serving a warm 1 GiB entry (fetched once through it first) versus
nginx serving the same file straight from disk with ``sendfile on``. One curl
to /dev/null per run; runs alternate nginx/sparkcache; the median of
``--runs`` is reported. Goal: sparkcache/nginx >= 1.0x.

``--workers 1,2`` (the default) runs the whole scenario once per
``server.workers`` value, each against the same nginx in the same run. The
server CPU of each transfer (utime+stime of nginx's workers, of every
sparkcache process) is reported as CPU seconds per GB: it holds up under
load where the wall-clock figures do not.

``--syscalls`` adds one more transfer per server under ``strace -c -f``
and reports its system calls per GB: ``sendfile`` calls, those that failed
with EAGAIN (a full socket buffer found by failing), and waits for room
(``poll`` / ``epoll_wait``). Counts, not times: they do not depend on the
machine's load (strace slows the transfer itself; its speed is not reported).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

from common import (MB, Bench, BenchError, Daemon, Nginx, add_workers_arg, apply_quick, base_parser, check_transfer, curl, fmt_size,
                    free_port, make_random_file, median, parse_size, print_summary, print_table, run_main,
                    static_server, summary_row, task_cpu_seconds, tool)

NAME = "hit_large"
GOAL = 1.0


def main() -> int:
    p = base_parser(__doc__ or NAME, "(128 MiB, 3 runs)")
    p.add_argument("--size", type=parse_size, default=None, help="object size (default 1GiB; --quick 128MiB)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per server (default 3)")
    p.add_argument("--syscalls", action="store_true", help="also count each server's system calls per GB (strace)")
    add_workers_arg(p)
    args = p.parse_args()
    apply_quick(args, {"size": 128 << 20, "runs": 3}, {"size": 1 << 30, "runs": 3})
    size, runs = args.size, max(1, args.runs)

    with Bench(NAME, args) as b:
        b.check_disk(3 * size + (256 << 20))
        files = b.path("files")
        b.log(f"writing {fmt_size(size)} of urandom data")
        digest = make_random_file(files / "big.bin", size)

        up_port = free_port()
        nginx = Nginx(b, "origin", [static_server(up_port, files, "access.log")]).start()
        nginx_url = nginx.url("/big.bin")
        check_transfer(curl(nginx_url), size, what="warm-up fetch from nginx")
        summary: list[dict] = []
        by_workers: dict[str, dict] = {}
        for workers in args.workers:
            by_workers[str(workers)] = scenario(b, size, runs, workers, up_port, nginx, nginx_url, digest, summary,
                                                args.syscalls)
        print_summary(f"{NAME} summary (median of {runs})", summary)
        upstream_lines = (nginx.dir / "access.log").read_text().splitlines()
        upstream_fetches = sum(1 for line in upstream_lines if line.startswith("/big.bin") and " 200 " in line)
        b.write_results({
            "params": {"size": size, "runs": runs, "workers": args.workers, "client": "curl -o /dev/null",
                       "nginx": "sendfile on, 1 worker"},
            "workers": by_workers,
            "summary": summary,
            "checks": {
                "sha256": digest,
                # the nginx runs and each daemon's one upstream fetch share this log
                "requests_to_nginx": upstream_fetches,
                "expected_requests_to_nginx": len(args.workers) * (runs + 1) + 1,
            },
        })
    return 0


def syscalls(b: Bench, pids: list[int], url: str, size: int, what: str, x_cache: str | None) -> dict[str, float]:
    """One transfer of ``url`` with every process of ``pids`` under ``strace -c
    -f``: its sendfile calls, those that failed, and its waits, per GB."""
    out = b.path(f"strace-{what}.txt")
    tracers = [subprocess.Popen([tool("strace"), "-c", "-f", "-o", f"{out}.{pid}", "-p", str(pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids]
    time.sleep(1)  # attached (strace has no "ready" signal)
    try:
        check_transfer(curl(url), size, x_cache=x_cache, what=f"{what} under strace")
    finally:
        for t in tracers:
            t.send_signal(signal.SIGINT)
            t.wait(60)
    counts: dict[str, float] = {"sendfile": 0, "sendfile_eagain": 0, "waits": 0}
    for pid in pids:
        path = Path(f"{out}.{pid}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            f = line.split()
            if len(f) >= 5 and f[-1] in ("sendfile", "poll", "epoll_wait") and re.fullmatch(r"\d+", f[3]):
                calls = int(f[3])
                errors = int(f[4]) if len(f) == 6 else 0
                if f[-1] == "sendfile":
                    counts["sendfile"] += calls
                    counts["sendfile_eagain"] += errors
                else:
                    counts["waits"] += calls
    gb = size / 1e9
    return {k: v / gb for k, v in counts.items()}


def scenario(b: Bench, size: int, runs: int, workers: int, up_port: int, nginx: Nginx, nginx_url: str,
             digest: str, summary: list[dict], count_syscalls: bool = False) -> dict:
    """One daemon with ``workers``: warm it, then alternate nginx / sparkcache runs."""
    tag = f"workers {workers}"
    daemon = Daemon(b, {"large": {"type": "generic", "upstream": f"http://127.0.0.1:{up_port}"}},
                    name=f"sparkcache-w{workers}", workers=workers).start()
    spark_url = daemon.url("/api/large/big.bin")
    b.log(f"[{tag}] warming: one fetch through sparkcache (MISS), checked against the file's sha256")
    warm = curl(spark_url, verify=True)
    check_transfer(warm, size, sha256=digest, x_cache="MISS", what="warm-up fetch through sparkcache")
    commit_wait = daemon.wait_idle()
    entries = daemon.entries("large")
    if len(entries) != 1 or entries[0]["digest"] != digest:
        raise BenchError(f"after the warm-up the cache holds {entries!r}, expected one entry with sha256 {digest}")
    hit = curl(spark_url, verify=True)
    check_transfer(hit, size, sha256=digest, x_cache="HIT", what="verified hit through sparkcache")

    rows = []
    results: dict[str, list[dict]] = {"nginx": [], "sparkcache": []}
    server_pids = {"nginx": nginx.worker_pids(), "sparkcache": daemon.pids()}
    for i in range(runs):
        for who, url, xc in (("nginx", nginx_url, None), ("sparkcache", spark_url, "HIT")):
            cpu0 = task_cpu_seconds(server_pids[who])
            r = curl(url)
            r["server_cpu_s"] = task_cpu_seconds(server_pids[who]) - cpu0
            check_transfer(r, size, x_cache=xc, what=f"{who} run {i + 1} ({tag})")
            results[who].append(r)
            rows.append([f"{i + 1}", who, r["speed"] / MB, r["ttfb"] * 1000, f"{r['total']:.2f}", r["x_cache"] or "-",
                         f"{r['server_cpu_s']:.3f}", f"{r['server_cpu_s'] / (size / 1e9):.3f}"])
            b.log(f"[{tag}] run {i + 1} {who}: {r['speed'] / MB:,.0f} MB/s")
    print_table(f"{NAME}: {fmt_size(size)} hit, one client (curl -o /dev/null), sparkcache {tag}",
                ["run", "server", "MB/s", "TTFB ms", "seconds", "X-Cache", "server CPU s", "CPU s/GB"], rows)

    def med(who: str, key: str) -> float:
        return median(r[key] for r in results[who])

    n_mbs, s_mbs = med("nginx", "speed") / MB, med("sparkcache", "speed") / MB
    # the ratio of each pair, run side by side, then their median: steadier than a ratio of medians
    pair = median(s["speed"] / n["speed"] for s, n in zip(results["sparkcache"], results["nginx"]))
    gb = size / 1e9
    summary += [
        summary_row(f"throughput, median, {tag}", "MB/s", s_mbs, "nginx sendfile", n_mbs, f">= {GOAL:.1f}x",
                    pair >= GOAL, ratio_value=pair, note="median of the per-run ratios"),
        summary_row(f"server CPU per GB, median, {tag}", "s", med("sparkcache", "server_cpu_s") / gb, "nginx sendfile",
                    med("nginx", "server_cpu_s") / gb, "-", None),
        summary_row(f"time to first byte, median, {tag}", "ms", med("sparkcache", "ttfb") * 1000, "nginx sendfile",
                    med("nginx", "ttfb") * 1000, "-", None),
    ]
    calls: dict[str, dict[str, float]] = {}
    if count_syscalls:
        calls["nginx"] = syscalls(b, nginx.worker_pids(), nginx_url, size, f"nginx-w{workers}", None)
        calls["sparkcache"] = syscalls(b, daemon.pids(), spark_url, size, f"sparkcache-w{workers}", "HIT")
        for key, label in (("sendfile", "sendfile calls per GB"), ("sendfile_eagain", "sendfile EAGAIN per GB"),
                           ("waits", "waits for room per GB")):
            summary.append(summary_row(f"{label}, {tag} (strace)", "calls", calls["sparkcache"][key],
                                       "nginx sendfile", calls["nginx"][key], "-", None))
    daemon.stop()
    return {
        "syscalls_per_gb": calls,
        "runs": results,
        "warmup": warm,
        "warmup_commit_wait_s": commit_wait,
        "verified_hit_sha256_ok": hit["sha256"] == digest,
        "daemon_exit_status": daemon.exit_status,
        "daemon_log_problems": daemon.log_problems()[:20],
    }


if __name__ == "__main__":
    run_main(main)
