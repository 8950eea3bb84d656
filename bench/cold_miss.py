#!/usr/bin/env python3
"""Scenario 3: a cold miss of a large object.

Time to first byte and throughput of one client fetching a 256 MiB object
through sparkcache with an empty cache versus fetching it directly from the
upstream. The upstream is nginx serving a directory from disk with no rate
limit, so the proxy's own overhead (spooling to disk, hashing, serving from
the spool, fsync + commit) shows. Runs alternate direct/sparkcache; medians
of ``--runs`` are reported. Before the timed runs, one untimed cold fetch
through sparkcache is checked byte-for-byte (sha256 of what the client
received).

Every cold fetch gets a fresh daemon on an empty data dir (certainly cold:
no index row, no body, nothing in memory), which then serves a few small
requests of another remote first, with its own upstream port, so the timed
miss measures a running daemon (not a new process's first request) that
still has to open its connection to the upstream, as ``curl`` does direct.

``--workers 1,2`` (the default) runs the whole scenario once per
``server.workers`` value. The daemon's CPU (all its processes and threads,
from schedstat) per GB received is reported beside the wall figures, which
a loaded machine disturbs. Goals (issue 14): throughput >= 0.5x direct,
time to first byte <= direct + 2 ms.
"""

from __future__ import annotations

import time

from common import (MB, AccessLog, Bench, BenchError, Daemon, Nginx, add_workers_arg, apply_quick, base_parser,
                    check_transfer, curl, fmt_size, free_port, make_random_file, median, parse_size, print_summary,
                    print_table, run_main, static_server, summary_row, task_cpu_seconds)

NAME = "cold_miss"
SPEED_GOAL = 0.5
TTFB_GOAL_MS = 2.0
WARMUPS = 4  # small requests before the timed miss (with workers, the kernel picks who answers)


def main() -> int:
    p = base_parser(__doc__ or NAME, "(64 MiB, 3 runs)")
    p.add_argument("--size", type=parse_size, default=None, help="object size (default 256MiB; --quick 64MiB)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per path (default 3)")
    add_workers_arg(p)
    args = p.parse_args()
    apply_quick(args, {"size": 64 << 20}, {"size": 256 << 20, "runs": 3})
    size, runs = args.size, max(1, args.runs)

    with Bench(NAME, args) as b:
        b.check_disk(3 * size + (256 << 20))
        files = b.path("files")
        b.log(f"writing {fmt_size(size)} of urandom data")
        digest = make_random_file(files / "cold.bin", size)
        (files / "small.txt").write_text("warm-up\n")
        up_port, warm_port = free_port(), free_port()
        origin = Nginx(b, "origin", [static_server(up_port, files, "access.log"),
                                     static_server(warm_port, files, "warm.log")]).start()
        log = AccessLog(origin.dir / "access.log")
        direct_url = origin.url("/cold.bin")
        check_transfer(curl(direct_url), size, what="warm-up direct fetch")
        summary: list[dict] = []
        by_workers = {}
        for workers in args.workers:
            by_workers[str(workers)] = scenario(b, size, runs, workers, up_port, warm_port, direct_url, log, digest,
                                                summary)
        print_summary(f"{NAME} summary (median of {runs})", summary)
        b.write_results({
            "params": {"size": size, "runs": runs, "workers": args.workers,
                       "upstream": "nginx static, sendfile on, no rate limit", "client": "curl -o /dev/null",
                       "warm_ups": f"{WARMUPS} small requests to another remote (other upstream port) first"},
            "workers": by_workers,
            "summary": summary,
            "checks": {"sha256": digest},
        })
    return 0


def scenario(b: Bench, size: int, runs: int, workers: int, up_port: int, warm_port: int, direct_url: str,
             log: AccessLog, digest: str, summary: list[dict]) -> dict:
    tag = f"workers {workers}"
    daemon = Daemon(b, {"cold": {"type": "generic", "upstream": f"http://127.0.0.1:{up_port}"},
                        "warm": {"type": "generic", "upstream": f"http://127.0.0.1:{warm_port}"}},
                    name=f"sparkcache-w{workers}", workers=workers).start()
    spark_url = daemon.url("/api/cold/cold.bin")

    def cold_fetch(verify: bool, what: str) -> dict:
        restart = daemon.fresh_start()
        if daemon.entries("cold"):
            raise BenchError("a fresh data dir is not empty")
        for _ in range(WARMUPS):
            status, _h, body = daemon.request("GET", "/api/warm/small.txt")
            if status != 200 or body != b"warm-up\n":
                raise BenchError(f"warm-up request answered {status}: {body[:200]!r}")
        log.mark()
        pids = daemon.pids()
        cpu0 = task_cpu_seconds(pids)
        r = curl(spark_url, verify=verify)
        check_transfer(r, size, sha256=digest if verify else None, x_cache="MISS", what=what)
        t0 = time.monotonic()
        daemon.wait_idle()
        entries = daemon.wait_entries("cold", 1)
        r["commit_wait"] = time.monotonic() - t0
        r["daemon_cpu_s"] = task_cpu_seconds(pids) - cpu0  # transfer + commit
        r["restart_s"] = restart
        if len(entries) != 1 or entries[0]["digest"] != digest:
            raise BenchError(f"{what}: cache holds {entries!r}, expected one entry with sha256 {digest}")
        up = [x for x in log.settle(expect=1) if x["uri"] == "/cold.bin"]
        r["upstream_requests"] = len(up)
        r["upstream_bytes"] = sum(x["bytes"] for x in up)
        if len(up) != 1 or r["upstream_bytes"] != size:
            raise BenchError(f"{what}: upstream served {len(up)} request(s), {r['upstream_bytes']} bytes")
        return r

    purge_probe = daemon.try_purge("cold")
    b.log(f"[{tag}] admin purge probe: HTTP {purge_probe[0]}; untimed verified cold fetch through sparkcache")
    verified = cold_fetch(True, f"verified cold fetch ({tag})")

    results: dict[str, list[dict]] = {"direct": [], "sparkcache": []}
    rows = []
    gb = size / 1e9
    for i in range(runs):
        r = curl(direct_url)
        check_transfer(r, size, what=f"direct run {i + 1}")
        results["direct"].append(r)
        s = cold_fetch(False, f"sparkcache run {i + 1} ({tag})")
        results["sparkcache"].append(s)
        for who, x in (("direct", r), ("sparkcache", s)):
            rows.append([str(i + 1), who, x["ttfb"] * 1000, x["speed"] / MB, f"{x['total']:.2f}",
                         f"{x['commit_wait'] * 1000:.0f}" if "commit_wait" in x else "-", x["x_cache"] or "-",
                         f"{x['daemon_cpu_s'] / gb:.2f}" if "daemon_cpu_s" in x else "-"])
        b.log(f"[{tag}] run {i + 1}: direct {r['speed'] / MB:,.0f} MB/s, sparkcache {s['speed'] / MB:,.0f} MB/s")
    print_table(f"{NAME}: {fmt_size(size)} cold miss, one client (curl -o /dev/null), sparkcache {tag}",
                ["run", "path", "TTFB ms", "MB/s", "seconds", "commit ms after last byte", "X-Cache",
                 "daemon CPU s/GB"], rows)

    def med(who: str, key: str) -> float:
        return median(x[key] for x in results[who])

    pairs = list(zip(results["sparkcache"], results["direct"]))
    speed_ratio = median(s["speed"] / d["speed"] for s, d in pairs)
    ttfb_extra = median((s["ttfb"] - d["ttfb"]) * 1000 for s, d in pairs)
    summary += [
        summary_row(f"throughput, median, {tag}", "MB/s", med("sparkcache", "speed") / MB, "direct from upstream",
                    med("direct", "speed") / MB, f">= {SPEED_GOAL}x", speed_ratio >= SPEED_GOAL,
                    ratio_value=speed_ratio, note="median of the per-run ratios"),
        summary_row(f"time to first byte, median, {tag}", "ms", med("sparkcache", "ttfb") * 1000,
                    "direct from upstream", med("direct", "ttfb") * 1000, f"<= +{TTFB_GOAL_MS:g} ms",
                    ttfb_extra <= TTFB_GOAL_MS, note=f"median extra {ttfb_extra:.1f} ms per run pair"),
        summary_row(f"daemon CPU per GB, median, {tag}", "s", med("sparkcache", "daemon_cpu_s") / gb, "", None, "-",
                    None),
        summary_row(f"commit after last byte, median, {tag}", "ms", med("sparkcache", "commit_wait") * 1000, "",
                    None, "-", None),
    ]
    daemon.stop()
    return {
        "runs": results,
        "verified_fetch": verified,
        "ttfb_extra_ms_median": ttfb_extra,
        "checks": {
            "verified_fetch_sha256_ok": verified["sha256"] == digest,
            "upstream_requests_per_cold_fetch": [x["upstream_requests"] for x in results["sparkcache"]],
            "admin_purge_probe": {"status": purge_probe[0], "body": purge_probe[1]},
            "daemon_exit_status": daemon.exit_status,
            "daemon_log_problems": daemon.log_problems()[:20],
        },
    }


if __name__ == "__main__":
    run_main(main)
