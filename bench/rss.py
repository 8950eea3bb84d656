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

``--workers 1,2`` (the default) runs both phases once per ``server.workers``
value, each with a fresh daemon. With workers the figures are of the whole
daemon: VmRSS (and VmHWM) summed over the parent and every worker, sampled
together; the goal is then 150 MiB per worker (the sum <= 150 MiB x workers),
and the largest single process is reported too.
"""

from __future__ import annotations

from typing import Any

from common import (MB, MiB, AccessLog, Bench, BenchError, Daemon, Nginx, Sampler, add_workers_arg, apply_quick, base_parser,
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
    add_workers_arg(p)
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
        summary: list[dict] = []
        by_workers = {}
        for workers in args.workers:
            by_workers[str(workers)] = scenario(b, args, size, clients, keys, names, up_port, origin, digest, workers,
                                                summary)
        print_summary(f"{NAME} summary (ratio = peak / goal)", summary)
        b.write_results({
            "params": {"size": size, "clients": clients, "keys": keys, "same_object": args.same_object,
                       "objects": "hard links to one urandom file" if keys > 1 else "one urandom file",
                       "sampling_interval_s": args.interval, "workers": args.workers,
                       "rss": "VmRSS summed over the daemon's processes (parent and workers)"},
            "workers": by_workers,
            "summary": summary,
            "checks": {"sha256": digest},
        })
    return 0


def tree_status(daemon: Daemon) -> dict[str, int]:
    """VmRSS, VmHWM and Threads summed over the daemon's processes; the largest VmRSS of one."""
    out = {"VmRSS": 0, "VmHWM": 0, "Threads": 0, "MaxVmRSS": 0, "Processes": 0}
    for pid in daemon.pids():
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # (a worker that just exited)
        rss = int(fields["VmRSS"].split()[0]) * 1024
        out["VmRSS"] += rss
        out["VmHWM"] += int(fields["VmHWM"].split()[0]) * 1024
        out["Threads"] += int(fields["Threads"])
        out["MaxVmRSS"] = max(out["MaxVmRSS"], rss)
        out["Processes"] += 1
    return out


def scenario(b: Bench, args: Any, size: int, clients: int, keys: int, names: list[str], up_port: int, origin: Nginx,
             digest: str, workers: int, summary: list[dict]) -> dict:
    tag = f"workers {workers}"
    daemon = Daemon(b, {"big": {"type": "generic", "upstream": f"http://127.0.0.1:{up_port}"}},
                    name=f"sparkcache-w{workers}", workers=workers).start()
    log = AccessLog(origin.dir / "access.log")
    urls = [daemon.url(f"/api/big/{names[i % keys]}") for i in range(clients)]

    # one small request per worker first, so the baseline includes the request path's imports
    for _ in range(2 * workers):
        daemon.request("GET", "/api/big/")
    baseline = tree_status(daemon)
    b.log(f"[{tag}] baseline VmRSS {baseline['VmRSS'] / MiB:.1f} MiB over {baseline['Processes']} process(es)")

    phases = {}
    rows = []
    for phase, expect in (("cold", "MISS"), ("warm", "HIT")):
        log.mark()
        b.log(f"[{tag}] {phase}: {clients} clients x {fmt_size(size)}")
        with Sampler(lambda: tree_status(daemon), args.interval) as sampler:
            wall, results = run_parallel(urls, timeout=1800, verify=[i == clients - 1 for i in range(clients)])
            if phase == "cold":
                daemon.wait_idle(timeout=600)
                daemon.wait_entries("big", keys, timeout=600)
        status_end = tree_status(daemon)
        for i, r in enumerate(results):
            check_transfer(r, size, sha256=digest if r["sha256"] is not None else None,
                           x_cache=expect if keys == clients else None, what=f"{phase} client {i} ({tag})")
        up = [x for x in log.settle(expect=keys if phase == "cold" else None) if x["uri"].startswith("/obj-")]
        peak_rss = max(sampler.peak("VmRSS"), status_end["VmRSS"])
        phases[phase] = {
            "wall": wall,
            "peak_vmrss": peak_rss,
            "peak_vmrss_one_process": max(sampler.peak("MaxVmRSS"), status_end["MaxVmRSS"]),
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
                     f"{peak_rss / MiB:.1f}", f"{phases[phase]['peak_vmrss_one_process'] / MiB:.1f}",
                     f"{status_end['VmHWM'] / MiB:.1f}", sampler.peak("Threads")])
        b.log(f"[{tag}] {phase}: {wall:.1f}s, peak VmRSS {peak_rss / MiB:.1f} MiB, VmHWM {status_end['VmHWM'] / MiB:.1f} MiB")
        if phase == "cold" and len(up) != keys:
            b.notes.append(f"{tag}, cold phase: {len(up)} upstream requests for {keys} keys")
        if phase == "warm" and up:
            raise BenchError(f"{tag}: warm phase reached the upstream {len(up)} time(s)")
    entries = daemon.entries("big")
    daemon.stop()

    print_table(f"{NAME}: sparkcache memory, {clients} clients x {fmt_size(size)}, {tag} "
                f"({keys} key{'s' if keys > 1 else ''}; baseline VmRSS {baseline['VmRSS'] / MiB:.1f} MiB)",
                ["phase", "clients", "keys", "wall s", "aggregate MB/s", "upstream reqs", "peak VmRSS MiB (sum)",
                 "one process MiB", "VmHWM MiB (sum)", "threads"], rows)
    peak = max(phases["warm"]["vmhwm_at_end"], phases["cold"]["peak_vmrss"], phases["warm"]["peak_vmrss"])
    goal = GOAL_MIB * workers
    summary += [
        summary_row(f"peak RSS (VmHWM), cold + warm, {tag}", "MiB", peak / MiB, "", None, f"<= {goal} MiB",
                    peak <= goal * MiB, ratio_value=peak / (goal * MiB)),
        summary_row(f"peak VmRSS, cold phase, {tag}", "MiB", phases["cold"]["peak_vmrss"] / MiB, "", None, "-", None),
        summary_row(f"peak VmRSS, warm phase, {tag}", "MiB", phases["warm"]["peak_vmrss"] / MiB, "", None, "-", None),
        summary_row(f"VmRSS before the clients, {tag}", "MiB", baseline["VmRSS"] / MiB, "", None, "-", None),
    ]
    return {
        "baseline": baseline,
        "phases": phases,
        "entries_after": len(entries),
        "entry_digests_ok": all(e["digest"] == digest for e in entries),
        "daemon_exit_status": daemon.exit_status,
        "daemon_log_problems": daemon.log_problems()[:20],
    }


if __name__ == "__main__":
    run_main(main)
