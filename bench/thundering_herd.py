#!/usr/bin/env python3
"""Scenario 4: a thundering herd on one cold object.

64 clients (64 curl processes, spawned first, then released together
through a shared pipe) ask sparkcache for the
same uncached 256 MiB object at once. The upstream is nginx serving the file
from disk with ``limit_rate`` on every connection, so one fetch is
upstream-bound as on a real network. Measured:

* bytes the upstream actually sent (nginx access log, ``$body_bytes_sent``,
  summed over every request for the object): goal exactly 1x the object size,
  in exactly one request;
* wall time until all 64 clients have the whole object versus a single cold
  fetch through sparkcache (same rate limit, fresh cache): goal <= 1.2x.

Every run uses a fresh daemon on an empty data dir. One client of the herd
(the last started) and the single client pipe the body through sha256sum;
the others write to /dev/null and their sizes are checked. After the cold
herd the same herd runs again against the now warm entry (all HITs, upstream
untouched): its wall time is this machine's fan-out floor, the least the
cold herd could take however well the misses are coalesced.

``--rates`` takes one or more per-connection upstream rates (bytes/s, binary
units as for nginx): the default runs 25MiB/s (~210 Mbit/s, a WAN-like
upstream) and 200MiB/s (~1.7 Gbit/s, a fast LAN mirror).

``--workers 1,2`` (the default) runs every rate once per ``server.workers``
value: with two workers the herd lands on both, and the upstream must still
send the object exactly once (the cross-process singleflight, fetch/across.py).
"""

from __future__ import annotations

from collections import Counter

from common import (MB, AccessLog, Bench, BenchError, Daemon, Nginx, add_workers_arg, apply_quick, base_parser, check_transfer,
                    fmt_size, free_port, herd_problems, make_random_file, median, parse_size, print_summary, print_table,
                    run_main, run_parallel, static_server, summary_row, task_cpu_seconds)

NAME = "thundering_herd"
WALL_GOAL = 1.2


def main() -> int:
    p = base_parser(__doc__ or NAME, "(64 MiB object, 25MiB/s only)")
    p.add_argument("--size", type=parse_size, default=None, help="object size (default 256MiB; --quick 64MiB)")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 64)")
    p.add_argument("--rates", default=None,
                   help="comma-separated nginx limit_rate values per connection (default 25MiB,200MiB; --quick 25MiB)")
    p.add_argument("--no-warm-herd", dest="warm_herd", action="store_false",
                   help="skip the second, all-HIT herd that shows the fan-out floor")
    add_workers_arg(p)
    args = p.parse_args()
    apply_quick(args, {"size": 64 << 20, "rates": "25MiB"}, {"size": 256 << 20, "clients": 64, "rates": "25MiB,200MiB"})
    size, clients = args.size, max(2, args.clients)
    rates = [parse_size(r) for r in args.rates.split(",") if r.strip()]

    with Bench(NAME, args) as b:
        b.check_disk(3 * size + (256 << 20))
        files = b.path("files")
        b.log(f"writing {fmt_size(size)} of urandom data")
        digest = make_random_file(files / "herd.bin", size)
        servers = []
        ports = {}
        for rate in rates:
            ports[rate] = free_port()
            servers.append(static_server(ports[rate], files, f"access-{rate}.log", f"limit_rate {rate};"))
        origin = Nginx(b, "origin", servers).start()
        daemons = {
            (workers, rate): Daemon(b, {"herd": {"type": "generic", "upstream": f"http://127.0.0.1:{ports[rate]}"}},
                                    name=f"sparkcache-w{workers}-{rate}", workers=workers)
            for workers in args.workers for rate in rates
        }

        def upstream(log: AccessLog, what: str) -> tuple[int, int, float]:
            """(requests, body bytes sent, longest request time) for the object since the mark."""
            lines = [x for x in log.settle(expect=1) if x["uri"] == "/herd.bin"]
            if not lines:
                raise BenchError(f"{what}: the upstream log shows no request for /herd.bin")
            return len(lines), sum(x["bytes"] for x in lines), max(x["time"] for x in lines)

        all_results = {}
        summary = []
        rows = []
        for workers, rate in daemons:
            daemon = daemons[(workers, rate)].start()
            log = AccessLog(origin.dir / f"access-{rate}.log")
            url = daemon.url("/api/herd/herd.bin")
            label = f"{fmt_size(rate)}/s, workers {workers}"

            daemon.fresh_start()
            log.mark()
            b.log(f"[{label}] single cold fetch")
            wall1, (single,) = run_parallel([url], verify=[True])
            check_transfer(single, size, sha256=digest, x_cache="MISS", what=f"single cold fetch at {label}")
            single_commit = daemon.wait_idle()
            daemon.wait_entries("herd", 1)
            req1, bytes1, up_time1 = upstream(log, "single fetch")

            daemon.fresh_start()
            log.mark()
            b.log(f"[{label}] {clients} clients at once")
            pids = daemon.pids()
            cpu0 = task_cpu_seconds(pids)
            wall_n, herd = run_parallel([url] * clients, verify=[False] * (clients - 1) + [True])
            herd_cpu = task_cpu_seconds(pids) - cpu0
            bad = herd_problems(herd, size, digest)
            herd_commit = daemon.wait_idle()
            entries = daemon.wait_entries("herd", 1)
            reqn, bytesn, up_time_n = upstream(log, "herd")
            stored_ok = len(entries) == 1 and entries[0]["digest"] == digest
            xcache = Counter(str(r["x_cache"]) for r in herd)
            health = daemon.health()
            warm_wall = None
            if args.warm_herd:
                # the same herd again, now all HITs: the fan-out floor of this machine
                b.log(f"[{label}] {clients} clients again, warm (fan-out floor)")
                log.mark()
                warm_wall, warm = run_parallel([url] * clients)
                for i, r in enumerate(warm):
                    check_transfer(r, size, x_cache="HIT", what=f"warm client {i}")
                if log.settle():
                    raise BenchError("warm herd reached the upstream")
            daemon.stop()
            res = {
                "rate_bytes_per_s": rate,
                "workers": workers,
                "single": {"wall": wall1, "transfer": single, "upstream_requests": req1, "upstream_bytes": bytes1, "upstream_request_time": up_time1,
                           "commit_wait": single_commit},
                "herd": {
                    "clients": clients, "wall": wall_n, "spawn_s": herd[0]["spawn_s"], "daemon_cpu_s": herd_cpu,
                    "daemon_cpu_s_per_gb_sent": herd_cpu / (clients * size / 1e9),
                    "upstream_requests": reqn, "upstream_bytes": bytesn, "upstream_bytes_ratio": bytesn / size,
                    "upstream_request_time": up_time_n,
                    "x_cache": dict(xcache), "client_errors": bad[:10], "client_error_count": len(bad),
                    "stored_digest_ok": stored_ok, "commit_wait": herd_commit,
                    "client_total_s": {"min": min(r["total"] or 0 for r in herd), "median": median(r["total"] or 0 for r in herd),
                                       "max": max(r["total"] or 0 for r in herd)},
                    "client_ttfb_ms": {"min": min(r["ttfb"] or 0 for r in herd) * 1000,
                                       "median": median(r["ttfb"] or 0 for r in herd) * 1000,
                                       "max": max(r["ttfb"] or 0 for r in herd) * 1000},
                    "client_speed_mb_s_median": median(r["speed"] or 0 for r in herd) / MB,
                    "verified_client_sha256_ok": herd[-1]["sha256"] == digest,
                    "health_after": health,
                },
                "warm_herd_wall": warm_wall,
                "daemon_exit_status": daemon.exit_status,
                "daemon_log_problems": daemon.log_problems()[:20],
            }
            all_results[label] = res
            b.log(f"[{label}] single {wall1:.2f}s, herd {wall_n:.2f}s, upstream {reqn} request(s) {bytesn:,} bytes, "
                  f"{len(bad)} bad client(s)")
            rows.append([label, "single", 1, f"{wall1:.2f}", f"{up_time1:.2f}", req1, f"{bytes1:,}", f"{bytes1 / size:.3f}x",
                         str(single["x_cache"]), "0"])
            rows.append([label, "herd", clients, f"{wall_n:.2f}", f"{up_time_n:.2f}", reqn, f"{bytesn:,}", f"{bytesn / size:.3f}x",
                         " ".join(f"{k}:{v}" for k, v in sorted(xcache.items())), str(len(bad))])
            if warm_wall is not None:
                rows.append([label, "herd, warm", clients, f"{warm_wall:.2f}", "-", 0, "0", "0x", f"HIT:{clients}", "0"])
            bytes_ratio = bytesn / size
            summary.append(summary_row(f"upstream bytes, {clients} clients @{label}", "x object", bytes_ratio,
                                       "", None, "== 1.00x, 1 request",
                                       bytesn == size and reqn == 1 and not bad and stored_ok,
                                       ratio_value=bytes_ratio))
            summary.append(summary_row(f"wall time, {clients} clients vs 1 @{label}", "s", wall_n, "single cold fetch",
                                       wall1, f"<= {WALL_GOAL:.1f}x", wall_n / wall1 <= WALL_GOAL and not bad))
            if warm_wall is not None:
                summary.append(summary_row(f"wall time, {clients} clients, warm (fan-out floor) @{label}", "s",
                                           warm_wall, "single cold fetch", wall1, "-", None))

        print_table(f"{NAME}: {fmt_size(size)} object, cold, upstream nginx limit_rate per connection",
                    ["rate", "case", "clients", "wall s", "upstream s", "upstream reqs", "upstream bytes", "x size", "X-Cache",
                     "bad clients"], rows)
        print_summary(f"{NAME} summary", summary)
        b.write_results({
            "params": {"size": size, "clients": clients, "rates": rates, "workers": args.workers,
                       "client": "curl processes released together through a pipe; last one piped to sha256sum",
                       "upstream": "nginx static, sendfile on, limit_rate per connection"},
            "results": all_results,
            "summary": summary,
            "checks": {"sha256": digest},
        })
    return 0


if __name__ == "__main__":
    run_main(main)
