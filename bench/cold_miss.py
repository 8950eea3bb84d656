#!/usr/bin/env python3
"""Scenario 3: a cold miss of a large object.

Time to first byte and throughput of one client fetching a 256 MiB object
through sparkcache with an empty cache (the remote is purged before every
run) versus fetching it directly from the upstream. The upstream is nginx
serving a directory from disk with no rate limit, so the proxy's own overhead
(spooling to disk, hashing, serving from the spool, fsync + commit) shows.
Runs alternate direct/sparkcache; medians of ``--runs`` are reported. Before
the timed runs, one untimed cold fetch through sparkcache is checked
byte-for-byte (sha256 of what the client received).

No goal was set for this scenario; the ratio is reported for information.
"""

from __future__ import annotations

from common import (MB, AccessLog, Bench, BenchError, Daemon, Nginx, apply_quick, base_parser, check_transfer, cpu_seconds, curl,
                    fmt_size, free_port, make_random_file, median, parse_size, print_summary, print_table,
                    run_main, static_server, summary_row)

NAME = "cold_miss"


def main() -> int:
    p = base_parser(__doc__ or NAME, "(64 MiB, 3 runs)")
    p.add_argument("--size", type=parse_size, default=None, help="object size (default 256MiB; --quick 64MiB)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per path (default 3)")
    args = p.parse_args()
    apply_quick(args, {"size": 64 << 20}, {"size": 256 << 20, "runs": 3})
    size, runs = args.size, max(1, args.runs)

    with Bench(NAME, args) as b:
        b.check_disk(3 * size + (256 << 20))
        files = b.path("files")
        b.log(f"writing {fmt_size(size)} of urandom data")
        digest = make_random_file(files / "cold.bin", size)
        up_port = free_port()
        origin = Nginx(b, "origin", [static_server(up_port, files, "access.log")]).start()
        daemon = Daemon(b, {"cold": {"type": "generic", "upstream": f"http://127.0.0.1:{up_port}"}}).start()
        log = AccessLog(origin.dir / "access.log")
        direct_url = origin.url("/cold.bin")
        spark_url = daemon.url("/api/cold/cold.bin")

        def cold_fetch(verify: bool, what: str) -> dict:
            # a fresh daemon with an empty data dir for every cold fetch (see purge_probe below)
            restart = daemon.fresh_start()
            if daemon.entries("cold"):
                raise BenchError("a fresh data dir is not empty")
            log.mark()
            cpu0 = cpu_seconds([daemon.pid])
            r = curl(spark_url, verify=verify)
            check_transfer(r, size, sha256=digest if verify else None, x_cache="MISS", what=what)
            r["commit_wait"] = daemon.wait_idle()
            r["daemon_cpu_s"] = cpu_seconds([daemon.pid]) - cpu0  # transfer + commit
            r["restart_s"] = restart
            entries = daemon.entries("cold")
            if len(entries) != 1 or entries[0]["digest"] != digest:
                raise BenchError(f"{what}: cache holds {entries!r}, expected one entry with sha256 {digest}")
            up = [x for x in log.settle(expect=1) if x["uri"] == "/cold.bin"]
            r["upstream_requests"] = len(up)
            r["upstream_bytes"] = sum(x["bytes"] for x in up)
            if len(up) != 1 or r["upstream_bytes"] != size:
                raise BenchError(f"{what}: upstream served {len(up)} request(s), {r['upstream_bytes']} bytes")
            return r

        # The admin purge would be the cheaper way to empty the cache between runs;
        # record whether it works, but do not depend on it.
        purge_probe = daemon.try_purge("cold")
        b.log(f"admin purge probe: HTTP {purge_probe[0]}")
        b.log("untimed verified cold fetch through sparkcache")
        verified = cold_fetch(True, "verified cold fetch")
        check_transfer(curl(direct_url), size, what="warm-up direct fetch")

        results: dict[str, list[dict]] = {"direct": [], "sparkcache": []}
        rows = []
        for i in range(runs):
            r = curl(direct_url)
            check_transfer(r, size, what=f"direct run {i + 1}")
            results["direct"].append(r)
            s = cold_fetch(False, f"sparkcache run {i + 1}")
            results["sparkcache"].append(s)
            for who, x in (("direct", r), ("sparkcache", s)):
                rows.append([str(i + 1), who, x["ttfb"] * 1000, x["speed"] / MB, f"{x['total']:.2f}",
                             f"{x['commit_wait'] * 1000:.0f}" if "commit_wait" in x else "-", x["x_cache"] or "-",
                             f"{x['daemon_cpu_s']:.2f}" if "daemon_cpu_s" in x else "-"])
            b.log(f"run {i + 1}: direct {r['speed'] / MB:,.0f} MB/s, sparkcache {s['speed'] / MB:,.0f} MB/s")
        print_table(f"{NAME}: {fmt_size(size)} cold miss, one client (curl -o /dev/null)",
                    ["run", "path", "TTFB ms", "MB/s", "seconds", "commit ms after last byte", "X-Cache",
                     "daemon CPU s"], rows)

        def med(who: str, key: str) -> float:
            return median(x[key] for x in results[who])

        summary = [
            summary_row("time to first byte, median", "ms", med("sparkcache", "ttfb") * 1000, "direct from upstream",
                        med("direct", "ttfb") * 1000, "-", None),
            summary_row("throughput, median", "MB/s", med("sparkcache", "speed") / MB, "direct from upstream",
                        med("direct", "speed") / MB, "-", None),
            summary_row("commit after last byte, median", "ms", med("sparkcache", "commit_wait") * 1000, "", None,
                        "-", None),
        ]
        print_summary(f"{NAME} summary (median of {runs})", summary)
        daemon.stop()
        b.write_results({
            "params": {"size": size, "runs": runs, "upstream": "nginx static, sendfile on, no rate limit",
                       "client": "curl -o /dev/null"},
            "runs": results,
            "verified_fetch": verified,
            "summary": summary,
            "checks": {
                "sha256": digest,
                "verified_fetch_sha256_ok": verified["sha256"] == digest,
                "upstream_requests_per_cold_fetch": [x["upstream_requests"] for x in results["sparkcache"]],
                "admin_purge_probe": {"status": purge_probe[0], "body": purge_probe[1]},
                "daemon_exit_status": daemon.exit_status,
                "daemon_log_problems": daemon.log_problems()[:20],
            },
        })
    return 0


if __name__ == "__main__":
    run_main(main)
