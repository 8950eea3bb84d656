#!/usr/bin/env python3
"""Scenario 5: peak memory of the daemon while 16 clients pull 1 GiB objects.

16 clients (curl to /dev/null) each pull a different 1 GiB object through
sparkcache at the same time: first cold (16 concurrent upstream fetches, each
spooled to disk while its client tails it), then warm (16 concurrent hits).
The 16 objects are 16 names hard-linked to one 1 GiB urandom file, so they
are 16 distinct cache keys and 16 separate upstream transfers that nginx and
the daemon must really read, write and hash, without 16 GiB of test data
(the content store keeps one body, since the bodies are identical).
``--same-object`` makes all 16 clients ask for one key instead.

The daemon's VmRSS is sampled from /proc/<pid>/status every 50 ms, and its
VmHWM (the kernel's high-water mark, which also catches peaks between
samples) is read at the end of each phase. Goal: peak <= 150 MiB.
"""

from __future__ import annotations

from common import (MB, MiB, AccessLog, Bench, BenchError, Daemon, Nginx, Sampler, apply_quick, base_parser,
                    check_transfer, fmt_size, free_port, make_links, make_random_file, parse_size, print_summary,
                    print_table, run_main, run_parallel, static_server, summary_row)

NAME = "rss"
GOAL_MIB = 150


def main() -> int:
    p = base_parser(__doc__ or NAME, "(128 MiB objects)")
    p.add_argument("--size", type=parse_size, default=None, help="object size (default 1GiB; --quick 128MiB)")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 16)")
    p.add_argument("--same-object", action="store_true", help="all clients ask for one key (default: one key each)")
    p.add_argument("--interval", type=float, default=0.05, help="VmRSS sampling interval, seconds")
    args = p.parse_args()
    apply_quick(args, {"size": 128 << 20}, {"size": 1 << 30, "clients": 16})
    size, clients = args.size, max(1, args.clients)
    keys = 1 if args.same_object else clients

    with Bench(NAME, args) as b:
        # the source file, one spool file per key during the cold phase, one stored body
        b.check_disk((keys + 2) * size + (512 << 20))
        files = b.path("files")
        b.log(f"writing {fmt_size(size)} of urandom data; {keys} name(s) for it")
        digest = make_random_file(files / "src.bin", size)
        names = [f"obj-{i:02d}.bin" for i in range(keys)]
        make_links(files / "src.bin", [files / n for n in names])
        up_port = free_port()
        origin = Nginx(b, "origin", [static_server(up_port, files, "access.log")]).start()
        daemon = Daemon(b, {"big": {"type": "generic", "upstream": f"http://127.0.0.1:{up_port}"}}).start()
        log = AccessLog(origin.dir / "access.log")
        urls = [daemon.url(f"/api/big/{names[i % keys]}") for i in range(clients)]

        # one small request first, so the baseline includes the request path's imports
        status, _h, _b = daemon.request("GET", "/api/big/")
        baseline = daemon.proc_status()
        b.log(f"baseline VmRSS {baseline['VmRSS'] / MiB:.1f} MiB, VmHWM {baseline['VmHWM'] / MiB:.1f} MiB")

        phases = {}
        rows = []
        for phase, expect in (("cold", "MISS"), ("warm", "HIT")):
            log.mark()
            b.log(f"{phase}: {clients} clients x {fmt_size(size)}")
            with Sampler(daemon.proc_status, args.interval) as sampler:
                wall, results = run_parallel(urls, timeout=1800, verify=[i == clients - 1 for i in range(clients)])
                commit = daemon.wait_idle(timeout=600) if phase == "cold" else 0.0
            status_end = daemon.proc_status()
            for i, r in enumerate(results):
                check_transfer(r, size, sha256=digest if r["sha256"] is not None else None,
                               x_cache=expect if keys == clients else None, what=f"{phase} client {i}")
            up = [x for x in log.settle(expect=keys if phase == "cold" else None) if x["uri"].startswith("/obj-")]
            peak_rss = max(sampler.peak("VmRSS"), status_end["VmRSS"])
            phases[phase] = {
                "wall": wall,
                "commit_wait_after_last_client": commit,
                "peak_vmrss": peak_rss,
                "vmhwm_at_end": status_end["VmHWM"],
                "threads_peak": sampler.peak("Threads"),
                "samples": len(sampler.samples),
                "rss_trace_mib": [(round(t, 2), round(s["VmRSS"] / MiB, 1)) for t, s in sampler.samples[:: max(1, len(sampler.samples) // 200)]],
                "aggregate_mb_s": clients * size / wall / MB,
                "upstream_requests": len(up),
                "upstream_bytes": sum(x["bytes"] for x in up),
                "x_cache": sorted({str(r["x_cache"]) for r in results}),
                "verified_client_sha256_ok": results[-1]["sha256"] == digest,
            }
            rows.append([phase, clients, keys, f"{wall:.1f}", f"{clients * size / wall / MB:,.0f}", len(up),
                         f"{peak_rss / MiB:.1f}", f"{status_end['VmHWM'] / MiB:.1f}", sampler.peak("Threads")])
            b.log(f"{phase}: {wall:.1f}s, peak VmRSS {peak_rss / MiB:.1f} MiB, VmHWM {status_end['VmHWM'] / MiB:.1f} MiB")
            if phase == "cold" and len(up) != keys:
                b.notes.append(f"cold phase: {len(up)} upstream requests for {keys} keys")
            if phase == "warm" and up:
                raise BenchError(f"warm phase reached the upstream {len(up)} time(s)")
        entries = daemon.entries("big")
        daemon.stop()

        print_table(f"{NAME}: sparkcache memory, {clients} clients x {fmt_size(size)} "
                    f"({keys} key{'s' if keys > 1 else ''}; baseline VmRSS {baseline['VmRSS'] / MiB:.1f} MiB)",
                    ["phase", "clients", "keys", "wall s", "aggregate MB/s", "upstream reqs", "peak VmRSS MiB",
                     "VmHWM MiB", "threads"], rows)
        peak = max(phases["warm"]["vmhwm_at_end"], phases["cold"]["peak_vmrss"], phases["warm"]["peak_vmrss"])
        summary = [summary_row("peak RSS (VmHWM), cold + warm", "MiB", peak / MiB, "", None, f"<= {GOAL_MIB} MiB",
                               peak <= GOAL_MIB * MiB, ratio_value=peak / (GOAL_MIB * MiB)),
                   summary_row("peak VmRSS, cold phase", "MiB", phases["cold"]["peak_vmrss"] / MiB, "", None, "-", None),
                   summary_row("peak VmRSS, warm phase", "MiB", phases["warm"]["peak_vmrss"] / MiB, "", None, "-", None),
                   summary_row("VmRSS before the clients", "MiB", baseline["VmRSS"] / MiB, "", None, "-", None)]
        print_summary(f"{NAME} summary (ratio = peak / goal)", summary)
        b.write_results({
            "params": {"size": size, "clients": clients, "keys": keys, "same_object": args.same_object,
                       "objects": "hard links to one urandom file" if keys > 1 else "one urandom file",
                       "sampling_interval_s": args.interval},
            "baseline": baseline,
            "phases": phases,
            "summary": summary,
            "checks": {
                "sha256": digest,
                "entries_after": len(entries),
                "entry_digests_ok": all(e["digest"] == digest for e in entries),
                "daemon_exit_status": daemon.exit_status,
                "daemon_log_problems": daemon.log_problems()[:20],
            },
        })
    return 0


if __name__ == "__main__":
    run_main(main)
