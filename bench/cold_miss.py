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
requests of another remote first, with its own upstream port, in each worker
process (``Daemon.warm_up``), so the timed miss measures a running daemon
(not a process's first request) that still has to open its connection to the
upstream, as ``curl`` does direct.

``--workers 1,2`` (the default) runs the whole scenario once per
``server.workers`` value. The daemon's CPU (all its processes and threads,
exited ones included: /proc/<pid>/stat, in 10 ms ticks; schedstat would
miss a miss's spool threads, which end with it) per GB received is reported beside the wall figures, which
a loaded machine disturbs. Goals (issue 14): throughput >= 0.5x direct,
time to first byte <= direct + 2 ms.

Two references do the same work as the miss without sparkcache, in the same
runs: nginx ``proxy_cache`` on a cold key (``?cold=N``: receive, write the
cache file, send; it neither hashes nor fsyncs), and ``miss_floor.py``, a
few dozen lines of blocking Python that receive in 1 MiB reads, write a
spool, sha256 in a second thread, send, fsync and rename: the machine's
floor for the miss with sparkcache's guarantees, run twice: plain
(``floor``) and with the socket options and read size sparkcache's miss
path uses (``floor-tuned``, ``FLOORS``), so that no trick of sparkcache's is missing
from the reference it is compared with. Their throughput and CPU
per GB beside sparkcache's say how much of the gap to ``direct`` is the
work itself (on 2 cores, curl, the upstream nginx and the proxy share
them). ``--baseline DIR`` runs another checkout of sparkcache (``/work/main``:
before a change) in the same runs, for an A/B of CPU per GB and TTFB.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from common import (AccessLog, Bench, BenchError, Daemon, MB, Nginx, ScriptServer, add_workers_arg, apply_quick,
                    base_parser, check_transfer, cpu_seconds, curl, fmt_size, free_port, make_random_file, median,
                    parse_size, print_summary, print_table, run_main, static_server, summary_row)
from hit_small import cache_server

NAME = "cold_miss"
SPEED_GOAL = 0.5
TTFB_GOAL_MS = 2.0
WARMUPS = 4  # small requests to each worker before the timed miss (Daemon.warm_up)
HERE = Path(__file__).resolve().parent


def proxy_cache_server(port: int, upstream_port: int) -> tuple[str, str]:
    """hit_small's nginx ``proxy_cache``, with buffers sized for large bodies."""
    http_extra, server = cache_server(port, upstream_port, "cold")
    return http_extra, server.replace("proxy_cache_lock on;", "proxy_cache_lock on;\n            proxy_buffer_size 64k;"
                                      "\n            proxy_buffers 16 64k;\n            proxy_busy_buffers_size 256k;")


# The floor's variants, run side by side: "floor" is its plain mode (what it
# always measured); "floor-tuned" is given every trick sparkcache's miss path
# uses beyond the plain program (see miss_floor.py's options), so that a
# ratio to it says what sparkcache costs over the same work done as cheaply.
FLOORS = {"floor": [], "floor-tuned": ["--rcvbuf", str(4 << 20), "--read", str(2 << 20)]}
# ``--splice-floor`` adds the tuned floor moving the body with splice(2) and
# hashing it from a mapping of the spool (fewer copies; sparkcache does not).
SPLICE_FLOOR = {"floor-splice": [*FLOORS["floor-tuned"], "--splice"]}


def level_pages(b: Bench, size: int) -> None:
    """Write ``size`` bytes of page cache to a scratch file and delete it, just
    before a timed path, so that every path writes its body into pages freed
    a moment ago.

    On this VM free memory seems to go back to the host a few seconds after it
    is freed (it has a virtio balloon: free page reporting waits 2 s), and a
    page the guest takes again then costs a host fault on its first write: writing 256 MiB into the page cache took
    50 ms in pages freed just before and 140-190 ms (up to ~600) in pages
    freed seconds before. Which path got which was left to timing (a
    daemon's restart takes seconds, the floor may run right after nginx's
    cache file is deleted): a run that got them took up to twice the CPU
    per GB, seen in sparkcache's and the floor's runs alike. A host whose
    memory is full of page cache, the usual case,
    reuses warm pages for every writer."""
    path = b.path("level-pages.tmp")
    zeros = bytes(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(max(1, size >> 20)):
            os.write(fd, zeros)
    finally:
        os.close(fd)
        os.unlink(path)  # (dirty pages of a deleted file are dropped, never written back)


class Floor(ScriptServer):
    """bench/miss_floor.py as a subprocess: the no-framework reference."""

    def __init__(self, b: Bench, upstream_port: int, name: str = "floor", options: list[str] | None = None) -> None:
        super().__init__(b, HERE / "miss_floor.py", [str(upstream_port), str(b.path(f"{name}-spool")), *(options or [])])


def main() -> int:
    p = base_parser(__doc__ or NAME, "(64 MiB, 3 runs)")
    p.add_argument("--size", type=parse_size, default=None, help="object size (default 256MiB; --quick 64MiB)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per path (default 3)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another sparkcache checkout (e.g. /work/main) run in the same runs, for an A/B")
    p.add_argument("--no-references", action="store_true",
                   help="skip the nginx proxy_cache and no-framework references")
    p.add_argument("--splice-floor", action="store_true",
                   help="also run the tuned floor with --splice (a reference with one copy fewer)")
    p.add_argument("--no-level-pages", action="store_true",
                   help="do not recycle page cache before each timed path (see level_pages: the order of the "
                        "paths then decides which of them pays for host page faults)")
    p.add_argument("--ttfb-only", action="store_true",
                   help="time to first byte only: a 16 MiB object, 9 runs, direct (and --baseline) as the only "
                        "references (their throughput figures then mean little)")
    add_workers_arg(p)
    args = p.parse_args()
    if args.ttfb_only:
        args.no_references = True
        apply_quick(args, {}, {"size": 16 << 20, "runs": 9})
    apply_quick(args, {"size": 64 << 20}, {"size": 256 << 20, "runs": 3})
    size, runs = args.size, max(1, args.runs)
    if args.splice_floor:
        FLOORS.update(SPLICE_FLOOR)

    with Bench(NAME, args) as b:
        b.check_disk(4 * size + (256 << 20))
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
        refs = None if args.no_references else References(b, up_port, size, digest)
        summary: list[dict] = []
        by_workers = {}
        for workers in args.workers:
            by_workers[str(workers)] = scenario(b, size, runs, workers, up_port, warm_port, direct_url, log, digest,
                                                summary, refs, args.baseline, not args.no_level_pages)
        print_summary(f"{NAME} summary (median of {runs})", summary)
        b.write_results({
            "params": {"size": size, "runs": runs, "workers": args.workers,
                       "upstream": "nginx static, sendfile on, no rate limit", "client": "curl -o /dev/null",
                       "warm_ups": f"{WARMUPS} small requests to another remote (other upstream port) first, to each worker",
                       "references": None if refs is None else
                       {"nginx_proxy_cache_cold": "nginx proxy_cache, a new key per run (?cold=N), proxy_buffers 16 64k",
                        "floor": "bench/miss_floor.py: blocking Python, 1 MiB reads, write + sha256 (thread) + send, "
                                 "fsync + rename",
                        "floor-tuned": f"bench/miss_floor.py {' '.join(FLOORS['floor-tuned'])}: the same, with "
                                       "sparkcache's receive buffer and read size",
                        **({"floor-splice": f"bench/miss_floor.py {' '.join(SPLICE_FLOOR['floor-splice'])}"}
                           if args.splice_floor else {})},
                       "baseline": str(args.baseline) if args.baseline else None, "ttfb_only": args.ttfb_only,
                       "level_pages": not args.no_level_pages},
            "workers": by_workers,
            "summary": summary,
            "checks": {"sha256": digest},
        })
    return 0


class References:
    """The cold miss without sparkcache: nginx proxy_cache on a new key, and the floor."""

    def __init__(self, b: Bench, up_port: int, size: int, digest: str) -> None:
        self.size = size
        self.port = free_port()
        extra, server = proxy_cache_server(self.port, up_port)
        self.nginx = Nginx(b, "proxy-cache", [server], http_extra=extra).start()
        self.floors = {name: Floor(b, up_port, name, options) for name, options in FLOORS.items()}
        self.n = 0
        for name, floor in self.floors.items():
            r = curl(floor.url("/cold.bin"), verify=True)
            check_transfer(r, size, sha256=digest, what=f"verified fetch through the {name}")
        r = self.nginx_cold(verify=True, digest=digest)

    def nginx_cold(self, verify: bool = False, digest: str | None = None) -> dict:
        self.n += 1
        pids = self.nginx.worker_pids()
        cpu0 = cpu_seconds(pids)
        r = curl(self.nginx.url(f"/cold.bin?cold={self.n}"), verify=verify)
        check_transfer(r, self.size, sha256=digest, x_cache="MISS", what=f"nginx proxy_cache cold {self.n}")
        r["daemon_cpu_s"] = cpu_seconds(pids) - cpu0
        # (Its cache would fill the disk: each run is a new key, never asked again.)
        for root, _dirs, names in os.walk(self.nginx.dir / "proxy_cache"):
            for name in names:
                os.unlink(os.path.join(root, name))
        return r

    def floor_fetch(self, name: str = "floor") -> dict:
        floor = self.floors[name]
        pids = [floor.proc.pid]
        cpu0 = cpu_seconds(pids)
        r = curl(floor.url("/cold.bin"))
        check_transfer(r, self.size, what=name)
        r["daemon_cpu_s"] = cpu_seconds(pids) - cpu0
        return r


def scenario(b: Bench, size: int, runs: int, workers: int, up_port: int, warm_port: int, direct_url: str,
             log: AccessLog, digest: str, summary: list[dict], refs: References | None,
             baseline: Path | None, level: bool = True) -> dict:
    tag = f"workers {workers}"
    remotes = {"cold": {"type": "generic", "upstream": f"http://127.0.0.1:{up_port}"},
               "warm": {"type": "generic", "upstream": f"http://127.0.0.1:{warm_port}"}}
    daemons = {"sparkcache": Daemon(b, remotes, name=f"sparkcache-w{workers}", workers=workers).start()}
    if baseline is not None:
        daemons["baseline"] = Daemon(b, remotes, name=f"baseline-w{workers}", workers=workers, tree=baseline).start()

    def level_now() -> None:
        if level:
            level_pages(b, size + (64 << 20))

    def cold_fetch(daemon: Daemon, verify: bool, what: str) -> dict:
        restart = daemon.fresh_start()
        if daemon.entries("cold"):
            raise BenchError("a fresh data dir is not empty")
        daemon.warm_up(lambda: [("/api/warm/small.txt", b"warm-up\n")] * WARMUPS)
        log.mark()
        level_now()
        pids = daemon.pids()
        cpu0 = cpu_seconds(pids)
        r = curl(daemon.url("/api/cold/cold.bin"), verify=verify)
        check_transfer(r, size, sha256=digest if verify else None, x_cache="MISS", what=what)
        t0 = time.monotonic()
        daemon.wait_idle()
        entries = daemon.wait_entries("cold", 1)
        r["commit_wait"] = time.monotonic() - t0
        r["daemon_cpu_s"] = cpu_seconds(pids) - cpu0  # transfer + commit
        r["restart_s"] = restart
        if len(entries) != 1 or entries[0]["digest"] != digest:
            raise BenchError(f"{what}: cache holds {entries!r}, expected one entry with sha256 {digest}")
        up = [x for x in log.settle(expect=1) if x["uri"] == "/cold.bin"]
        r["upstream_requests"] = len(up)
        r["upstream_bytes"] = sum(x["bytes"] for x in up)
        if len(up) != 1 or r["upstream_bytes"] != size:
            raise BenchError(f"{what}: upstream served {len(up)} request(s), {r['upstream_bytes']} bytes")
        return r

    purge_probe = daemons["sparkcache"].try_purge("cold")
    b.log(f"[{tag}] admin purge probe: HTTP {purge_probe[0]}; untimed verified cold fetch through sparkcache")
    verified = {who: cold_fetch(d, True, f"verified cold fetch ({who}, {tag})") for who, d in daemons.items()}

    paths = ["direct"] + (["nginx-cold", *FLOORS] if refs is not None else []) + list(daemons)
    results: dict[str, list[dict]] = {who: [] for who in paths}
    rows = []
    gb = size / 1e9
    for i in range(runs):
        for who in paths:
            # Each path starts with nothing of the one before still being
            # written back: the floor fsyncs its 256 MiB after the last byte
            # (curl has ended), nginx's cache file is written back later, and
            # either used to land on whichever path came next (the first
            # sparkcache daemon: its spool creation and index waited on the disk).
            os.sync()
            if who in ("direct", "nginx-cold", *FLOORS):
                level_now()
            if who == "direct":
                x = curl(direct_url)
                check_transfer(x, size, what=f"direct run {i + 1}")
            elif who == "nginx-cold":
                assert refs is not None
                x = refs.nginx_cold()
            elif who in FLOORS:
                assert refs is not None
                x = refs.floor_fetch(who)
            else:
                x = cold_fetch(daemons[who], False, f"{who} run {i + 1} ({tag})")
            results[who].append(x)
            rows.append([str(i + 1), who, x["ttfb"] * 1000, x["speed"] / MB, f"{x['total']:.2f}",
                         f"{x['commit_wait'] * 1000:.0f}" if "commit_wait" in x else "-", x["x_cache"] or "-",
                         f"{x['daemon_cpu_s'] / gb:.2f}" if "daemon_cpu_s" in x else "-"])
        b.log(f"[{tag}] run {i + 1}: " + ", ".join(f"{who} {results[who][-1]['speed'] / MB:,.0f} MB/s" for who in paths))
    print_table(f"{NAME}: {fmt_size(size)} cold miss, one client (curl -o /dev/null), sparkcache {tag}",
                ["run", "path", "TTFB ms", "MB/s", "seconds", "commit ms after last byte", "X-Cache",
                 "server CPU s/GB"], rows)

    def med(who: str, key: str) -> float:
        return median(x[key] for x in results[who])

    def speed_ratio(who: str, ref: str) -> float:
        return median(s["speed"] / d["speed"] for s, d in zip(results[who], results[ref]))

    def ttfb_extra(who: str) -> float:
        return median((s["ttfb"] - d["ttfb"]) * 1000 for s, d in zip(results[who], results["direct"]))

    names = {"direct": "direct from upstream", "nginx-cold": "nginx proxy_cache cold",
             "floor": "no-framework floor", "floor-tuned": "no-framework floor, tuned as sparkcache",
             "floor-splice": "no-framework floor, tuned, splice + mapped hash",
             "baseline": f"sparkcache {baseline}"}
    ratio_sd = speed_ratio("sparkcache", "direct")
    extra = ttfb_extra("sparkcache")
    summary += [
        summary_row(f"throughput, median, {tag}", "MB/s", med("sparkcache", "speed") / MB, names["direct"],
                    med("direct", "speed") / MB, f">= {SPEED_GOAL}x", ratio_sd >= SPEED_GOAL,
                    ratio_value=ratio_sd, note="median of the per-run ratios"),
    ]
    for ref in [r for r in ("nginx-cold", *FLOORS, "baseline") if r in results]:
        summary.append(summary_row(f"throughput vs {ref}, median, {tag}", "MB/s", med("sparkcache", "speed") / MB,
                                   names[ref], med(ref, "speed") / MB, "-", None,
                                   ratio_value=speed_ratio("sparkcache", ref)))
    for ref in [r for r in ("nginx-cold", *FLOORS) if r in results]:
        r_d = speed_ratio(ref, "direct")
        summary.append(summary_row(f"reference {ref}: throughput, median, {tag}", "MB/s", med(ref, "speed") / MB,
                                   names["direct"], med("direct", "speed") / MB, f">= {SPEED_GOAL}x",
                                   r_d >= SPEED_GOAL, ratio_value=r_d,
                                   note=f"{names[ref]} (not sparkcache) against direct: is the goal reachable?"))
    summary.append(summary_row(f"time to first byte, median, {tag}", "ms", med("sparkcache", "ttfb") * 1000,
                               names["direct"], med("direct", "ttfb") * 1000, f"<= +{TTFB_GOAL_MS:g} ms",
                               extra <= TTFB_GOAL_MS, note=f"median extra {extra:.1f} ms per run pair"))
    if "baseline" in results:
        summary.append(summary_row(f"time to first byte vs baseline, median, {tag}", "ms",
                                   med("sparkcache", "ttfb") * 1000, names["baseline"], med("baseline", "ttfb") * 1000,
                                   "-", None, note=f"baseline's median extra over direct {ttfb_extra('baseline'):.1f} ms"))
    cpu = med("sparkcache", "daemon_cpu_s") / gb
    summary.append(summary_row(f"daemon CPU per GB, median, {tag}", "s", cpu, "", None, "-", None))
    for ref in [r for r in (*FLOORS, "nginx-cold", "baseline") if r in results]:
        summary.append(summary_row(f"daemon CPU per GB vs {ref}, median, {tag}", "s", cpu, names[ref],
                                   med(ref, "daemon_cpu_s") / gb, "-", None))
    summary.append(summary_row(f"commit after last byte, median, {tag}", "ms", med("sparkcache", "commit_wait") * 1000,
                               "", None, "-", None))
    for d in daemons.values():
        d.stop()
    main_daemon = daemons["sparkcache"]
    return {
        "runs": results,
        "verified_fetch": verified["sparkcache"],
        "ttfb_extra_ms_median": extra,
        "checks": {
            "verified_fetch_sha256_ok": all(v["sha256"] == digest for v in verified.values()),
            "upstream_requests_per_cold_fetch": [x["upstream_requests"] for x in results["sparkcache"]],
            "admin_purge_probe": {"status": purge_probe[0], "body": purge_probe[1]},
            "daemon_exit_status": main_daemon.exit_status,
            "daemon_log_problems": main_daemon.log_problems()[:20],
        },
    }


if __name__ == "__main__":
    run_main(main)
