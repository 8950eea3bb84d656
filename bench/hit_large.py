#!/usr/bin/env python3
"""Scenario 1: a large cache hit, one client.

sparkcache serving a warm 1 GiB entry (fetched once through it first) versus
nginx serving the same file with ``sendfile on``, ``tcp_nopush on``,
``sendfile_max_chunk`` left at its default (2m since nginx 1.21.4;
``--nginx-max-chunk`` sets it); the page cache is warm, so neither ``aio``
nor ``directio``, which nginx's docs suggest for files read from disk.

*The same file*: by default nginx serves sparkcache's stored body itself (a
hard link to it in nginx's root, made readable to nginx's workers), so both
read the very same page cache. The origin file, written by this script in
8 MiB writes, sits in the page cache in 2 MiB folios; the stored body,
written as it arrived from upstream, in folios of 4 KiB to 512 KiB, and the
kernel's sendfile works per folio. ``--nginx-file origin`` serves the origin
file instead (what the runs before this option measured). ``--folios``
reports each file's folio sizes (root: /proc/kpageflags).

A *sample* is one curl process fetching the object ``--repeat`` times back
to back on one keep-alive connection (to /dev/null; ``--repeat 4``: 4 GiB,
about 1.5 s): one transfer of 1 GiB lasts a third of a second here, and
single transfers of either server swing by ±15 %. ``--runs`` pairs of
samples alternate the servers, the first of each pair rotating (nginx
first, then sparkcache first, ...), so neither always follows the other.
The headline is the median of the per-pair ratios sparkcache/nginx with its
interquartile range and how many pairs sparkcache won: an IQR that straddles
1.0× is parity, one above it a win.

``--baseline DIR`` runs another checkout of sparkcache (``/work/main``:
before a change) as a third server in the same pairs (then triples), for an
A/B: each change's ratio to the baseline, with its spread.

How cores are shared: by default the scheduler places curl and the server
on the machine's 2 cores as it likes (as a client on the same host would
see). ``--pin`` puts every thread of the servers on CPU 0 and curl on CPU 1
(loopback's receive work runs in the sender's context, on CPU 0).

Per sample, load-independent figures beside the wall ones: the server's CPU
(utime+stime of every thread of nginx's workers / of every sparkcache
process, from schedstat) and curl's (its rusage) per GB, and, with
``--syscalls``, one more sample per server under ``strace -c -f``: its
``sendfile`` calls, those that failed with EAGAIN, and waits for room
(``poll`` / ``epoll_wait``) per GB. ``--perf`` adds one more sample per
server under ``perf stat`` (context switches and CPU migrations of the
server's threads per GB).
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from common import (MB, Bench, BenchError, Daemon, ForeignLoad, Nginx, add_workers_arg, apply_quick, base_parser,
                    check_transfer, clean_env, curl, fmt_size, free_port, make_random_file, median, parse_size,
                    print_summary, print_table, run_main, static_server, summary_row, task_cpu_seconds, tool,
                    wait_for_quiet)

NAME = "hit_large"
GOAL = 1.0
SERVER_CPU, CLIENT_CPU = "0", "1"  # --pin


def main() -> int:
    p = base_parser(__doc__ or NAME, "(128 MiB, 3 pairs)")
    p.add_argument("--size", type=parse_size, default=None, help="object size (default 1GiB; --quick 128MiB)")
    p.add_argument("--runs", type=int, default=None, help="rounds: one sample per server each (default 12)")
    p.add_argument("--repeat", type=int, default=4, help="transfers of the object per sample (one curl, one connection)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another sparkcache checkout (e.g. /work/main) run in the same pairs, for an A/B")
    p.add_argument("--pin", action="store_true", help=f"servers on CPU {SERVER_CPU}, curl on CPU {CLIENT_CPU}")
    p.add_argument("--nginx-max-chunk", default=None, help="nginx sendfile_max_chunk (default: nginx's own, 2m)")
    p.add_argument("--nginx-file", choices=("same", "origin", "both"), default="same",
                   help="what nginx serves: sparkcache's stored body (a hard link), the origin file, or both "
                        "(the origin file as a further server, nginx-origin)")
    p.add_argument("--folios", action="store_true", help="report the page cache folio sizes of the files served")
    p.add_argument("--quiet-wait", type=float, default=20.0,
                   help="before each round, wait up to this many seconds for the machine to be idle")
    p.add_argument("--clean-below", type=float, default=0.05,
                   help="a pair is clean when other processes used less than this share of the machine "
                        "during each of its samples; clean pairs get a statistic of their own")
    p.add_argument("--syscalls", action="store_true", help="also count each server's system calls per GB (strace)")
    p.add_argument("--perf", action="store_true", help="also count each server's context switches per GB (perf stat)")
    add_workers_arg(p)
    args = p.parse_args()
    apply_quick(args, {"size": 128 << 20, "runs": 3}, {"size": 1 << 30, "runs": 12})
    size, runs, repeat = args.size, max(1, args.runs), max(1, args.repeat)

    with Bench(NAME, args) as b:
        b.check_disk(3 * size + (256 << 20))
        files = b.path("files")
        b.log(f"writing {fmt_size(size)} of urandom data")
        digest = make_random_file(files / "big.bin", size)

        up_port = free_port()
        extra = f"sendfile_max_chunk {args.nginx_max_chunk};" if args.nginx_max_chunk else ""
        nginx = Nginx(b, "origin", [static_server(up_port, files, "access.log", extra)]).start()
        if args.pin:
            pin(nginx.worker_pids() + [nginx.proc.pid], SERVER_CPU)  # type: ignore[union-attr]
        nginx_url = nginx.url("/big.bin")
        check_transfer(curl(nginx_url), size, what="warm-up fetch from nginx")
        summary: list[dict] = []
        by_workers: dict[str, dict] = {}
        for workers in args.workers:
            by_workers[str(workers)] = scenario(b, args, size, runs, repeat, workers, up_port, nginx, nginx_url, files,
                                                digest, summary)
        print_summary(f"{NAME} summary ({runs} pairs of {repeat} x {fmt_size(size)})", summary)
        upstream_lines = (nginx.dir / "access.log").read_text().splitlines()
        upstream_fetches = sum(1 for line in upstream_lines if line.startswith("/big.bin") and " 200 " in line)
        daemons = 2 if args.baseline else 1
        extra_samples = int(args.syscalls) + int(args.perf)
        origin_samples = (runs + extra_samples) * repeat if args.nginx_file != "same" else 0
        b.write_results({
            "params": {"size": size, "runs": runs, "repeat": repeat, "workers": args.workers,
                       "client": f"one curl -o /dev/null per sample, {repeat} transfers on one connection",
                       "cores": f"servers on CPU {SERVER_CPU}, curl on CPU {CLIENT_CPU}" if args.pin
                       else "unpinned (2 cores shared by curl and the server)",
                       "nginx": "1 worker, sendfile on, tcp_nopush on, tcp_nodelay on, sendfile_max_chunk "
                                + (args.nginx_max_chunk or "default (2m)"),
                       "nginx_file": {"same": "sparkcache's stored body (hard link)", "origin": "the origin file",
                                      "both": "sparkcache's stored body (hard link); nginx-origin: the origin file"}
                       [args.nginx_file],
                       "baseline": str(args.baseline) if args.baseline else None},
            "workers": by_workers,
            "summary": summary,
            "checks": {
                "sha256": digest,
                # the nginx samples and each daemon's one upstream fetch share this log
                "requests_to_nginx": upstream_fetches,
                "expected_requests_to_nginx": 1 + len(args.workers) * (daemons + origin_samples),
            },
        })
    return 0


def pin(pids: list[int], cpus: str) -> None:
    """Every thread of these processes (and the threads they start later) on ``cpus``."""
    for pid in pids:
        subprocess.run([tool("taskset"), "-a", "-p", "-c", cpus, str(pid)], check=True, stdout=subprocess.DEVNULL)


SAMPLE_FMT = "##S %{http_code} %{size_download} %{time_total} %{time_starttransfer} %header{x-cache}\\n"


def _stat_busy() -> float:
    """Busy CPU seconds of the whole machine so far (every CPU, softirq included)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - (v[4] if len(v) > 4 else 0)) / os.sysconf("SC_CLK_TCK")


def sample(url: str, repeat: int, size: int, server_pids: list[int], x_cache: str | None, pinned: bool,
           what: str, wrap: list[str] | None = None) -> dict[str, Any]:
    """One curl fetching ``url`` ``repeat`` times on one connection, each
    transfer checked; the bytes per second over the sum of the transfers'
    times, and the server's, curl's and the machine's CPU meanwhile."""
    cmd = [tool("curl"), "-sS", "--noproxy", "*", "--max-time", "600", "-H", "Expect:", "-w", SAMPLE_FMT]
    for _ in range(repeat):
        cmd += ["-o", "/dev/null", url]
    if pinned:
        cmd = [tool("taskset"), "-c", CLIENT_CPU, *cmd]
    cpu0, busy0 = task_cpu_seconds(server_pids), _stat_busy()
    foreign = ForeignLoad()
    t0 = time.monotonic()
    proc = subprocess.Popen([*(wrap or []), *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()  # (curl -sS writes little to stderr)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    server_cpu, busy = task_cpu_seconds(server_pids) - cpu0, _stat_busy() - busy0
    foreign_share = foreign.share()
    transfers = []
    for line in out.decode(errors="replace").splitlines():
        f = line.split()
        if len(f) >= 5 and f[0] == "##S":
            transfers.append({"exit": 0, "http_code": int(f[1]), "size": int(f[2]), "total": float(f[3]),
                              "ttfb": float(f[4]), "x_cache": f[5] if len(f) > 5 else None, "errors": [],
                              "url": url})
    if proc.returncode != 0 or len(transfers) != repeat:
        raise BenchError(f"{what}: curl exit {proc.returncode}, {len(transfers)} of {repeat} transfers: "
                         f"{err.decode(errors='replace')[:300]}")
    for i, t in enumerate(transfers):
        check_transfer(t, size, x_cache=x_cache, what=f"{what}, transfer {i + 1}")
    seconds = sum(t["total"] for t in transfers)
    gb = repeat * size / 1e9
    return {
        "speed": repeat * size / seconds,
        "seconds": seconds,
        "wall": wall,
        "transfer_speeds": [size / t["total"] for t in transfers],
        "ttfb": median(t["ttfb"] for t in transfers),
        "server_cpu_s_per_gb": server_cpu / gb,
        "curl_cpu_s_per_gb": (usage.ru_utime + usage.ru_stime) / gb,
        "machine_cpu_s_per_gb": busy / gb,
        "curl_ctx_switches_per_gb": (usage.ru_nvcsw + usage.ru_nivcsw) / gb,
        # share of the machine's CPU that other processes (not this script's) used meanwhile
        "foreign_share": foreign_share,
    }


def folio_sizes(path: Path) -> dict[str, Any]:
    """How the page cache holds ``path`` (root only): map it, touch every page
    (it is cached: no disk read), and read each page's frame from
    /proc/self/pagemap and its compound-page flags from /proc/kpageflags."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = size // 4096
    fd = os.open(path, os.O_RDONLY)
    try:
        base = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
    finally:
        os.close(fd)
    if base in (None, ctypes.c_void_p(-1).value):
        raise BenchError(f"mmap of {path} failed")
    runs: dict[int, int] = {}
    try:
        for i in range(pages):
            ctypes.c_ubyte.from_address(base + i * 4096).value  # fault in
        current = 0
        with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
            pm.seek((base // 4096) * 8)
            for e in struct.unpack(f"{pages}Q", pm.read(pages * 8)):
                if not e >> 63:
                    continue
                kf.seek((e & ((1 << 55) - 1)) * 8)
                if (struct.unpack("Q", kf.read(8))[0] >> 16) & 1:  # KPF_COMPOUND_TAIL
                    current += 1
                    continue
                if current:
                    runs[current] = runs.get(current, 0) + 1
                current = 1
            if current:
                runs[current] = runs.get(current, 0) + 1
    finally:
        libc.munmap(base, size)
    total = sum(k * v for k, v in runs.items()) or 1
    return {"mean_kib": 4 * total / max(1, sum(runs.values())), "share_4k": runs.get(1, 0) / total,
            "share_2m": sum(k * v for k, v in runs.items() if k >= 512) / total,
            "pages_by_folio_pages": {str(k): k * v for k, v in sorted(runs.items())}}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def verdict(q1: float, q3: float, goal: float = GOAL) -> str:
    return "win" if q1 > goal else ("loss" if q3 < goal else "parity")


def syscalls(b: Bench, pids: list[int], url: str, repeat: int, size: int, what: str, x_cache: str | None,
             pinned: bool) -> dict[str, float]:
    """One sample with every process of ``pids`` under ``strace -c -f``: its
    sendfile calls, those that failed, and its waits, per GB."""
    out = b.path(f"strace-{what}.txt")
    tracers = [subprocess.Popen([tool("strace"), "-c", "-f", "-o", f"{out}.{pid}", "-p", str(pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids]
    time.sleep(1)  # attached (strace has no "ready" signal)
    try:
        sample(url, repeat, size, [], x_cache, pinned, f"{what} under strace")
    finally:
        for t in tracers:
            t.send_signal(signal.SIGINT)
            t.wait(60)
    counts: dict[str, float] = {"sendfile": 0, "sendfile_eagain": 0, "waits": 0, "all": 0}
    for pid in pids:
        path = Path(f"{out}.{pid}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            f = line.split()
            if len(f) >= 5 and re.fullmatch(r"\d+", f[3]) and f[-1] != "total":
                calls = int(f[3])
                counts["all"] += calls
                errors = int(f[4]) if len(f) == 6 else 0
                if f[-1] == "sendfile":
                    counts["sendfile"] += calls
                    counts["sendfile_eagain"] += errors
                elif f[-1] in ("poll", "epoll_wait"):
                    counts["waits"] += calls
    gb = repeat * size / 1e9
    return {k: v / gb for k, v in counts.items()}


def perf_stat(b: Bench, pids: list[int], url: str, repeat: int, size: int, what: str, x_cache: str | None,
              pinned: bool) -> dict[str, float]:
    """One sample with the server's threads under ``perf stat``: context
    switches, CPU migrations and task-clock per GB."""
    out = b.path(f"perf-{what}.txt")
    tids = [t for pid in pids for t in os.listdir(f"/proc/{pid}/task")]
    # perf stat -t follows only the threads named: sparkcache's sender thread
    # starts with the first hit, so one sample before this makes it exist.
    stat = subprocess.Popen([tool("perf"), "stat", "-x", ",", "-o", str(out), "-e",
                             "task-clock,context-switches,cpu-migrations", "-t", ",".join(tids)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        sample(url, repeat, size, [], x_cache, pinned, f"{what} under perf stat")
    finally:
        stat.send_signal(signal.SIGINT)
        stat.wait(60)
    gb = repeat * size / 1e9
    got: dict[str, float] = {}
    for line in out.read_text().splitlines():
        f = line.split(",")
        if len(f) > 2 and f[2] in ("task-clock", "context-switches", "cpu-migrations"):
            try:
                got[f[2]] = float(f[0]) / gb
            except ValueError:
                pass
    return got


def scenario(b: Bench, args: Any, size: int, runs: int, repeat: int, workers: int, up_port: int, nginx: Nginx,
             nginx_url: str, nginx_root: Path, digest: str, summary: list[dict]) -> dict:
    """Daemon(s) with ``workers``, warmed; then ``runs`` rounds of one sample per server."""
    tag = f"workers {workers}"
    remotes = {"large": {"type": "generic", "upstream": f"http://127.0.0.1:{up_port}"}}
    daemons = {"sparkcache": Daemon(b, remotes, name=f"sparkcache-w{workers}", workers=workers).start()}
    if args.baseline is not None:
        daemons["baseline"] = Daemon(b, remotes, name=f"baseline-w{workers}", workers=workers,
                                     tree=args.baseline).start()
    urls: dict[str, tuple[str, str | None]] = {"nginx": (nginx_url, None)}
    warm: dict[str, Any] = {}
    for who, daemon in daemons.items():
        if args.pin:
            pin(daemon.pids(), SERVER_CPU)
        url = daemon.url("/api/large/big.bin")
        b.log(f"[{tag}] warming {who}: one fetch through it (MISS), checked against the file's sha256")
        r = curl(url, verify=True)
        check_transfer(r, size, sha256=digest, x_cache="MISS", what=f"warm-up fetch through {who}")
        daemon.wait_idle()
        entries = daemon.wait_entries("large", 1)
        if len(entries) != 1 or entries[0]["digest"] != digest:
            raise BenchError(f"after the warm-up {who} holds {entries!r}, expected one entry with sha256 {digest}")
        hit = curl(url, verify=True)
        check_transfer(hit, size, sha256=digest, x_cache="HIT", what=f"verified hit through {who}")
        warm[who] = {"miss": r, "hit_sha256_ok": hit["sha256"] == digest}
        urls[who] = (url, "HIT")
    stored = daemons["sparkcache"].data_dir / "cas" / "sha256" / digest[:2] / digest
    if args.nginx_file != "origin":
        if not stored.is_file():
            raise BenchError(f"sparkcache's stored body is not at {stored} (has the store's layout changed?)")
        link = Path(nginx_root) / f"stored-w{workers}.bin"
        os.link(stored, link)
        os.chmod(link, 0o644)  # (the stored body's own inode: nginx's workers run as nobody)
        urls["nginx"] = (nginx.url(f"/{link.name}"), None)
        check_transfer(curl(urls["nginx"][0], verify=True), size, sha256=digest, what="nginx serving the stored body")
    folios = {}
    if args.folios:
        folios = {"origin file": folio_sizes(Path(nginx_root) / "big.bin"), "stored body": folio_sizes(stored)}
        for what, f in folios.items():
            b.log(f"[{tag}] page cache of the {what}: mean folio {f['mean_kib']:.1f} KiB, "
                  f"{f['share_4k']:.0%} of bytes in 4 KiB pages, {f['share_2m']:.0%} in 2 MiB folios")
    if args.nginx_file == "both":
        urls["nginx-origin"] = (nginx_url, None)
    names = list(urls)
    pids = {"nginx": nginx.worker_pids(), "nginx-origin": nginx.worker_pids(),
            **{who: d.pids() for who, d in daemons.items()}}

    rows = []
    results: dict[str, list[dict]] = {who: [] for who in names}
    for i in range(runs):
        order = names[i % len(names):] + names[:i % len(names)]
        if args.quiet_wait > 0:
            wait_for_quiet(args.quiet_wait, 0.1, log=lambda m: b.log(f"[{tag}] {m}"))
        for who in order:
            url, xc = urls[who]
            r = sample(url, repeat, size, pids[who], xc, args.pin, f"{who} pair {i + 1} ({tag})")
            r["position"] = order.index(who)
            results[who].append(r)
            rows.append([f"{i + 1}", who, f"{r['foreign_share']:.0%}", r["speed"] / MB, min(r["transfer_speeds"]) / MB,
                         max(r["transfer_speeds"]) / MB, r["ttfb"] * 1000, r["server_cpu_s_per_gb"] * 1000,
                         r["curl_cpu_s_per_gb"] * 1000, r["machine_cpu_s_per_gb"] * 1000])
            b.log(f"[{tag}] pair {i + 1} {who}: {r['speed'] / MB:,.0f} MB/s")
    print_table(f"{NAME}: {fmt_size(size)} hit x {repeat} per sample, one curl, sparkcache {tag}",
                ["pair", "server", "others", "MB/s", "min", "max", "TTFB ms", "server CPU ms/GB", "curl CPU ms/GB",
                 "machine CPU ms/GB"], rows)

    def med(who: str, key: str) -> float:
        return median(r[key] for r in results[who])

    pair_stats: dict[str, dict[str, Any]] = {}
    comparisons = [("sparkcache", "nginx")] + ([("baseline", "nginx"), ("sparkcache", "baseline")]
                                               if "baseline" in results else []) \
        + ([("sparkcache", "nginx-origin"), ("nginx-origin", "nginx")] if "nginx-origin" in results else [])
    # a round is clean when no other process used the machine much during any of its samples
    clean = [i for i in range(runs) if max(results[who][i]["foreign_share"] for who in names) < args.clean_below]
    for a, ref in comparisons:
        for subset, rounds in (("", list(range(runs))), (" clean", clean)):
            ratios = [results[a][i]["speed"] / results[ref][i]["speed"] for i in rounds]
            if not ratios:
                continue
            q1, q2, q3 = quartiles(ratios)
            pair_stats[f"{a}/{ref}{subset}"] = {
                "rounds": rounds, "ratios": ratios, "q1": q1, "median": q2, "q3": q3, "min": min(ratios),
                "max": max(ratios), "wins": sum(1 for r in ratios if r > 1.0), "verdict": verdict(q1, q3)}
    ref_names = {"nginx": "nginx sendfile", "baseline": f"sparkcache {args.baseline}",
                 "nginx-origin": "nginx, origin file"}
    for key, st in pair_stats.items():
        a, ref = key.split()[0].split("/")
        if key.endswith("clean"):
            summary.append(summary_row(
                f"  clean pairs only ({len(st['ratios'])}): median {st['median']:.3f}, IQR {st['q1']:.3f}-"
                f"{st['q3']:.3f}, {a} faster in {st['wins']}: {st['verdict']}", "", None, "", None, "-", None))
            continue
        goal = f">= {GOAL:.1f}x" if key == "sparkcache/nginx" else "-"
        summary.append(summary_row(
            f"{a} MB/s, median, {tag}", "MB/s", med(a, "speed") / MB, ref_names[ref], med(ref, "speed") / MB,
            goal, st["median"] >= GOAL if key == "sparkcache/nginx" else None, ratio_value=st["median"],
            note=f"median of {len(st['ratios'])} per-pair ratios"))
        summary.append(summary_row(
            f"  per-pair ratio IQR {st['q1']:.3f}-{st['q3']:.3f}, range {st['min']:.3f}-{st['max']:.3f}, "
            f"{a} faster in {st['wins']} of {len(st['ratios'])}: {st['verdict']}", "", None, "", None, "-", None))
    for who in names:
        if who == "nginx":
            continue
        for key, label in (("server_cpu_s_per_gb", "server CPU per GB"), ("curl_cpu_s_per_gb", "curl CPU per GB"),
                           ("machine_cpu_s_per_gb", "machine CPU per GB"), ("ttfb", "time to first byte")):
            summary.append(summary_row(f"{label}, {who}, median, {tag}", "ms" if key == "ttfb" else "ms per GB",
                                       med(who, key) * 1000, "nginx sendfile", med("nginx", key) * 1000, "-", None))
    calls: dict[str, dict[str, float]] = {}
    perf: dict[str, dict[str, float]] = {}
    for who in names:
        url, xc = urls[who]
        if args.syscalls:
            calls[who] = syscalls(b, pids[who], url, repeat, size, f"{who}-w{workers}", xc, args.pin)
        if args.perf:
            perf[who] = perf_stat(b, pids[who], url, repeat, size, f"{who}-w{workers}", xc, args.pin)
    for who in calls:
        if who == "nginx":
            continue
        for key, label in (("sendfile", "sendfile calls per GB"), ("sendfile_eagain", "sendfile EAGAIN per GB"),
                           ("waits", "waits for room per GB"), ("all", "system calls per GB")):
            summary.append(summary_row(f"{label}, {who}, {tag} (strace)", "calls", calls[who][key],
                                       "nginx sendfile", calls["nginx"][key], "-", None))
    for who in perf:
        if who == "nginx":
            continue
        for key in ("context-switches", "cpu-migrations", "task-clock"):
            summary.append(summary_row(f"{key} per GB, {who}, {tag} (perf stat)", "ms" if key == "task-clock" else "",
                                       perf[who].get(key), "nginx sendfile", perf["nginx"].get(key), "-", None))
    for d in daemons.values():
        d.stop()
    return {
        "nginx_serves": urls["nginx"][0],
        "folios": folios,
        "pairs": pair_stats,
        "syscalls_per_gb": calls,
        "perf_per_gb": perf,
        "samples": results,
        "warmup": warm,
        "daemon_exit_status": {who: d.exit_status for who, d in daemons.items()},
        "daemon_log_problems": {who: d.log_problems()[:20] for who, d in daemons.items()},
    }


if __name__ == "__main__":
    run_main(main)
