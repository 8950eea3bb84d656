#!/usr/bin/env python3
"""Scenario 1: a large cache hit, one client.

sparkcache serving a warm 1 GiB entry (fetched once through it first) versus
nginx serving the same file straight from disk with ``sendfile on``. One curl
to /dev/null per run; runs alternate nginx/sparkcache; the median of
``--runs`` is reported. Goal: sparkcache/nginx >= 1.0x.
"""

from __future__ import annotations

from common import (MB, Bench, BenchError, Daemon, Nginx, apply_quick, base_parser, check_transfer, cpu_seconds, curl, fmt_size,
                    free_port, make_random_file, median, parse_size, print_summary, print_table, ratio, run_main,
                    static_server, summary_row)

NAME = "hit_large"
GOAL = 1.0


def main() -> int:
    p = base_parser(__doc__ or NAME, "(128 MiB, 3 runs)")
    p.add_argument("--size", type=parse_size, default=None, help="object size (default 1GiB; --quick 128MiB)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per server (default 3)")
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
        daemon = Daemon(b, {"large": {"type": "generic", "upstream": f"http://127.0.0.1:{up_port}"}}).start()
        spark_url = daemon.url("/api/large/big.bin")
        nginx_url = nginx.url("/big.bin")

        b.log("warming: one fetch through sparkcache (MISS), checked against the file's sha256")
        warm = curl(spark_url, verify=True)
        check_transfer(warm, size, sha256=digest, x_cache="MISS", what="warm-up fetch through sparkcache")
        commit_wait = daemon.wait_idle()
        entries = daemon.entries("large")
        if len(entries) != 1 or entries[0]["digest"] != digest:
            raise BenchError(f"after the warm-up the cache holds {entries!r}, expected one entry with sha256 {digest}")
        check_transfer(curl(nginx_url), size, what="warm-up fetch from nginx")
        hit = curl(spark_url, verify=True)
        check_transfer(hit, size, sha256=digest, x_cache="HIT", what="verified hit through sparkcache")

        rows = []
        results: dict[str, list[dict]] = {"nginx": [], "sparkcache": []}
        server_pids = {"nginx": nginx.worker_pids(), "sparkcache": [daemon.pid]}
        for i in range(runs):
            for who, url, xc in (("nginx", nginx_url, None), ("sparkcache", spark_url, "HIT")):
                cpu0 = cpu_seconds(server_pids[who])
                r = curl(url)
                r["server_cpu_s"] = cpu_seconds(server_pids[who]) - cpu0
                check_transfer(r, size, x_cache=xc, what=f"{who} run {i + 1}")
                results[who].append(r)
                rows.append([f"{i + 1}", who, r["speed"] / MB, r["ttfb"] * 1000, f"{r['total']:.2f}", r["x_cache"] or "-",
                             f"{r['server_cpu_s']:.2f}"])
                b.log(f"run {i + 1} {who}: {r['speed'] / MB:,.0f} MB/s")
        print_table(f"{NAME}: {fmt_size(size)} hit, one client (curl -o /dev/null)",
                    ["run", "server", "MB/s", "TTFB ms", "seconds", "X-Cache", "server CPU s"], rows)

        n_mbs = median(r["speed"] for r in results["nginx"]) / MB
        s_mbs = median(r["speed"] for r in results["sparkcache"]) / MB
        rat = ratio(s_mbs, n_mbs)
        summary = [
            summary_row("throughput, median", "MB/s", s_mbs, "nginx sendfile", n_mbs, f">= {GOAL:.1f}x",
                        rat is not None and rat >= GOAL),
            summary_row("time to first byte, median", "ms", median(r["ttfb"] for r in results["sparkcache"]) * 1000,
                        "nginx sendfile", median(r["ttfb"] for r in results["nginx"]) * 1000, "-", None),
        ]
        print_summary(f"{NAME} summary (median of {runs})", summary)
        upstream_lines = (nginx.dir / "access.log").read_text().splitlines()
        upstream_fetches = sum(1 for line in upstream_lines if line.startswith("/big.bin") and " 200 " in line)
        daemon.stop()
        problems = daemon.log_problems()
        b.write_results({
            "params": {"size": size, "runs": runs, "client": "curl -o /dev/null", "nginx": "sendfile on, 1 worker"},
            "runs": results,
            "warmup": warm,
            "warmup_commit_wait_s": commit_wait,
            "summary": summary,
            "checks": {
                "sha256": digest,
                "verified_hit_sha256_ok": hit["sha256"] == digest,
                # the nginx runs and the daemon's one upstream fetch share this log
                "requests_to_nginx": upstream_fetches,
                "expected_requests_to_nginx": runs + 2,
                "daemon_exit_status": daemon.exit_status,
                "daemon_log_problems": problems[:20],
            },
        })
    return 0


if __name__ == "__main__":
    run_main(main)
