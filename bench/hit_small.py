#!/usr/bin/env python3
"""Scenario 2: small cache hits, many connections.

A few hundred distinct 4 KiB objects, all warm, requested by wrk over 64
keep-alive connections for ~10 s; a wrk Lua script rotates over every path
(each wrk thread from its own random offset). sparkcache (generic remote) is
compared with nginx as a caching reverse proxy (``proxy_cache``) in front of
the same upstream (another nginx serving the files from disk). Both caches
are warmed (each object fetched until it is a HIT) before a short unreported
wrk warm-up and the measured run. Goal: sparkcache/nginx >= 0.35x requests/s.

The cache nginx runs one worker with its access log off (sparkcache's default
is no access log either); wrk gets one thread by default, so on a 2-core
machine load generator and server get about a core each.
"""

from __future__ import annotations

import http.client

from common import (Bench, BenchError, Daemon, Nginx, AccessLog, apply_quick, base_parser, cpu_seconds, fmt_size, free_port,
                    make_random_file, parse_size, print_summary, print_table, ratio, run_main, run_wrk,
                    static_server, summary_row, write_wrk_script)

NAME = "hit_small"
GOAL = 0.35


def cache_server(port: int, upstream_port: int) -> tuple[str, str]:
    http_extra = f"""
    proxy_cache_path {{dir}}/proxy_cache levels=1:2 keys_zone=bench:32m max_size=4g inactive=1d use_temp_path=off;
    upstream origin {{ server 127.0.0.1:{upstream_port}; keepalive 16; }}"""
    server = f"""
    server {{
        listen 127.0.0.1:{port};
        access_log off;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_valid 200 1d;
            proxy_cache_lock on;
            add_header X-Cache $upstream_cache_status;
        }}
    }}"""
    return http_extra, server


def warm(port: int, paths: list[str], bodies: list[bytes], what: str, settle=lambda: None,
         rounds: int = 3) -> dict[str, int]:
    """GET every path, round after round, until each answers X-Cache: HIT; check the bytes every time.

    ``settle`` runs between rounds (sparkcache: wait until its fetches have committed).
    """
    seen: dict[str, int] = {}
    todo = list(zip(paths, bodies))
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(rounds):
            left = []
            for path, body in todo:
                c.request("GET", path)
                r = c.getresponse()
                data = r.read()
                state = r.getheader("X-Cache") or "-"
                seen[state] = seen.get(state, 0) + 1
                if r.status != 200 or data != body:
                    raise BenchError(f"{what} {path}: status {r.status}, {len(data)} bytes, "
                                     f"body {'ok' if data == body else 'WRONG'}")
                if state != "HIT":
                    left.append((path, body))
            todo = left
            if not todo:
                return seen
            settle()
    finally:
        c.close()
    raise BenchError(f"{what}: {len(todo)} object(s) still not HIT after {rounds} rounds, e.g. {todo[0][0]}")


def main() -> int:
    p = base_parser(__doc__ or NAME, "(100 objects, 3 s runs)")
    p.add_argument("--objects", type=int, default=None, help="distinct objects (default 300; --quick 100)")
    p.add_argument("--object-size", type=parse_size, default=None, help="object size (default 4KiB)")
    p.add_argument("--connections", type=int, default=None, help="wrk connections (default 64)")
    p.add_argument("--duration", type=float, default=None, help="seconds per measured wrk run (default 10; --quick 3)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of unreported wrk warm-up (default 2; --quick 1)")
    p.add_argument("--threads", type=int, default=None, help="wrk threads (default 1)")
    p.add_argument("--runs", type=int, default=None, help="measured runs per server, median reported (default 1)")
    args = p.parse_args()
    apply_quick(args, {"objects": 100, "duration": 3, "warmup": 1},
                {"objects": 300, "object_size": 4096, "connections": 64, "duration": 10, "warmup": 2, "threads": 1,
                 "runs": 1})

    with Bench(NAME, args) as b:
        files = b.path("files")
        names = [f"obj-{i:04d}.bin" for i in range(args.objects)]
        b.log(f"writing {args.objects} objects of {fmt_size(args.object_size)}")
        for n in names:
            make_random_file(files / n, args.object_size)
        bodies = [(files / n).read_bytes() for n in names]

        up_port, cache_port = free_port(), free_port()
        origin = Nginx(b, "origin", [static_server(up_port, files, "access.log")]).start()
        http_extra, server = cache_server(cache_port, up_port)
        cache = Nginx(b, "proxycache", [server], http_extra=http_extra).start()
        daemon = Daemon(b, {"small": {"type": "generic", "upstream": f"http://127.0.0.1:{up_port}"}}).start()
        origin_log = AccessLog(origin.dir / "access.log")

        spark_paths = [f"/api/small/{n}" for n in names]
        nginx_paths = [f"/{n}" for n in names]
        b.log("warming both caches (every object until it answers HIT, bytes checked)")
        warm_spark = warm(daemon.port, spark_paths, bodies, "sparkcache", settle=daemon.wait_idle)
        warm_nginx = warm(cache_port, nginx_paths, bodies, "nginx proxy_cache")
        lua_spark = write_wrk_script(b.path("spark.lua"), spark_paths)
        lua_nginx = write_wrk_script(b.path("nginx.lua"), nginx_paths)
        targets = {
            "nginx": (f"http://127.0.0.1:{cache_port}", lua_nginx),
            "sparkcache": (f"http://127.0.0.1:{daemon.port}", lua_spark),
        }
        # the server processes whose CPU time a run is charged with
        server_pids = {"nginx": cache.worker_pids(), "sparkcache": [daemon.pid]}

        def counts() -> tuple[float, float]:
            """(hits, everything else) from sparkcache_requests_total."""
            m = {k: v for k, v in daemon.metrics().items() if k.startswith("sparkcache_requests_total{")}
            hits = sum(v for k, v in m.items() if 'result="hit"' in k)
            return hits, sum(m.values()) - hits

        results: dict[str, list[dict]] = {"nginx": [], "sparkcache": []}
        warmups: dict[str, list[dict]] = {"nginx": [], "sparkcache": []}
        origin_log.mark()
        hits0, misses0 = counts()
        rows = []
        for i in range(max(1, args.runs)):
            for who, (url, lua) in targets.items():
                if args.warmup > 0:
                    warmups[who].append(run_wrk(url, lua, args.connections, args.warmup, args.threads))
                cpu0 = cpu_seconds(server_pids[who])
                r = run_wrk(url, lua, args.connections, args.duration, args.threads)
                cpu = cpu_seconds(server_pids[who]) - cpu0
                r["server_cpu_s"] = cpu
                r["server_cpu_share"] = cpu / (r["duration_us"] / 1e6) if r["duration_us"] else None
                r["server_cpu_us_per_request"] = cpu * 1e6 / r["requests"] if r["requests"] else None
                results[who].append(r)
                b.log(f"{who}: {r['rps']:,.0f} req/s, errors {r['errors']}")
                rows.append([str(i + 1), who, r["rps"], r["requests"], r["lat_p50_us"] / 1000, r["lat_p99_us"] / 1000,
                             r["bytes"] / r["requests"] if r["requests"] else 0, r["errors"],
                             f"{r['server_cpu_share']:.0%}", f"{r['server_cpu_us_per_request']:.1f}"])
        hits1, misses1 = counts()
        upstream_during = origin_log.settle()
        print_table(f"{NAME}: {args.objects} x {fmt_size(args.object_size)} hits, wrk -t{args.threads} "
                    f"-c{args.connections} -d{args.duration:g}s",
                    ["run", "server", "req/s", "requests", "p50 ms", "p99 ms", "bytes/resp", "errors", "server CPU",
                     "CPU us/req"], rows)

        def med(who: str, key: str) -> float:
            vals = sorted(r[key] for r in results[who])
            return float(vals[len(vals) // 2])

        s_rps, n_rps = med("sparkcache", "rps"), med("nginx", "rps")
        rat = ratio(s_rps, n_rps)
        errors = sum(r["errors"] for rs in results.values() for r in rs)
        summary = [
            summary_row("requests/s", "req/s", s_rps, "nginx proxy_cache", n_rps, f">= {GOAL:.2f}x",
                        rat is not None and rat >= GOAL and errors == 0),
            summary_row("latency p50", "ms", med("sparkcache", "lat_p50_us") / 1000, "nginx proxy_cache",
                        med("nginx", "lat_p50_us") / 1000, "-", None),
            summary_row("latency p99", "ms", med("sparkcache", "lat_p99_us") / 1000, "nginx proxy_cache",
                        med("nginx", "lat_p99_us") / 1000, "-", None),
            summary_row("server CPU per request", "us", med("sparkcache", "server_cpu_us_per_request"),
                        "nginx proxy_cache", med("nginx", "server_cpu_us_per_request"), "-", None),
        ]
        print_summary(f"{NAME} summary", summary)
        checks = {
            "warmup_states_sparkcache": warm_spark,
            "warmup_states_nginx": warm_nginx,
            "sparkcache_hits_counted_during_runs": hits1 - hits0,
            # wrk counts completed responses only; a few in flight when it stops are served but not counted
            "sparkcache_wrk_requests_incl_warmup": sum(r["requests"] for r in results["sparkcache"] + warmups["sparkcache"]),
            "sparkcache_non_hit_requests_during_runs": misses1 - misses0,
            "upstream_requests_during_runs": len(upstream_during),
            "wrk_errors": errors,
        }
        print(f"checks: {checks}")
        if misses1 != misses0 or upstream_during:
            b.notes.append("WARNING: requests reached the upstream or missed the cache during the measured runs")
        daemon.stop()
        checks["daemon_exit_status"] = daemon.exit_status
        checks["daemon_log_problems"] = daemon.log_problems()[:20]
        b.write_results({
            "params": {k: getattr(args, k) for k in ("objects", "object_size", "connections", "duration", "warmup",
                                                     "threads", "runs")},
            "paths": "rotating over every object; sparkcache /api/small/obj-NNNN.bin, nginx /obj-NNNN.bin",
            "runs": results,
            "warmup_runs": warmups,
            "summary": summary,
            "checks": checks,
        })
    return 0


if __name__ == "__main__":
    run_main(main)
