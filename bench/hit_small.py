#!/usr/bin/env python3
"""Scenario 2: small cache hits, many connections, one and two worker processes.

A few hundred distinct 4 KiB objects, all warm, requested by wrk over 64
keep-alive connections for ~10 s; a wrk Lua script rotates over every path
(each wrk thread from its own random offset). sparkcache (generic remote,
``server.workers: 1`` and ``2``) is compared with nginx as a caching reverse
proxy (``proxy_cache``, ``worker_processes 1`` and ``2``) in front of the same
upstream (another nginx serving the files from disk). Every cache is warmed
(each object fetched until it is a HIT) before a short unreported wrk warm-up
and the measured run. Goal: sparkcache/nginx >= 0.35x requests/s at equal
worker counts, and near-linear scaling from 1 to 2 workers, measured in
server CPU per request (all server processes summed, from /proc).

How the 2 cores are shared: with one worker the server's processes are pinned
to CPU 0 and wrk (one thread) to CPU 1, so each gets a core of its own; with
two workers servers and wrk (two threads) share both CPUs, unpinned, as they
would on a host where the load comes from elsewhere. CPU per request does not
depend on how the cores are shared; requests/s does, and on a busy machine
both servers lose alike: compare the ratios.

``--instructions`` also runs sparkcache (one worker) under callgrind for a
fixed number of keep-alive hits (``--instruction-hits``, 3000 over 8
connections, from a small client of this script's own) and reports
instructions per hit: a figure that does not depend on the machine's load
(valgrind needed; minutes, not seconds). Run the same command from another
checkout to compare two trees.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import selectors
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from common import (Bench, BenchError, Daemon, Nginx, AccessLog, apply_quick, base_parser, cpu_seconds, fmt_size,
                    free_port, make_random_file, parse_size, print_summary, print_table, ratio, run_main, run_wrk,
                    static_server, summary_row, tool, worker_connections, write_wrk_script)

NAME = "hit_small"
GOAL = 0.35
# Near-linear scaling: CPU per request with two workers at most this much above one worker's.
SCALING_GOAL = 1.25


def cache_server(port: int, upstream_port: int, zone: str) -> tuple[str, str]:
    http_extra = f"""
    proxy_cache_path {{dir}}/proxy_cache levels=1:2 keys_zone={zone}:32m max_size=4g inactive=1d use_temp_path=off;
    upstream origin {{ server 127.0.0.1:{upstream_port}; keepalive 16; }}"""
    server = f"""
    server {{
        listen 127.0.0.1:{port};
        access_log off;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache {zone};
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


def wait_workers(daemon: Daemon, n: int, timeout: float = 180.0) -> None:
    """Until ``n`` worker processes have answered /health (each listens once it
    is up; a busy machine starts them slowly)."""
    seen: set[Any] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < n:
        pid = daemon.health().get("pid")
        if pid is not None:
            seen.add(pid)
        if time.monotonic() > deadline:
            raise BenchError(f"only {len(seen)} of {n} sparkcache workers answered within {timeout:g}s")
        time.sleep(0.05)


def pin(pids: list[int], cpus: set[int]) -> None:
    """Every thread of these processes onto ``cpus`` (threads made later inherit it)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def switches(pids: list[int]) -> int:
    """Context switches (voluntary and not) of every thread of these processes
    so far: how often a server slept in epoll_wait or was preempted, which the
    CPU per request pays for and instruction counts do not see."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            total += int(line.split()[1])
    return total


@contextlib.contextmanager
def affinity(cpus: set[int]) -> Iterator[None]:
    """This process (so the wrk it starts) on ``cpus`` meanwhile."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def fixed_hits(port: int, paths: list[str], total: int, connections: int,
               socks: list[socket.socket] | None = None) -> int:
    """Exactly ``total`` keep-alive GETs over ``connections`` connections (or
    over ``socks``, open ones), one outstanding per connection, rotating over
    ``paths``; each answer checked (200, whole body). A fixed count, so
    instructions per hit do not depend on how fast a loaded machine lets a
    client go (nor on the daemon's idle cost over a fixed duration)."""
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, bytes] = {}
    sent = done = 0

    def ask(s: socket.socket) -> None:
        nonlocal sent
        path = paths[sent % len(paths)]
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: hit_small\r\nAccept: */*\r\n\r\n"
                  .encode())
        sent += 1

    given = socks is not None
    socks = list(socks or [])
    try:
        if not given:
            for _ in range(min(connections, total)):
                s = socket.create_connection(("127.0.0.1", port), timeout=60)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                socks.append(s)
        for s in socks[:total]:
            pending[s] = b""
            sel.register(s, selectors.EVENT_READ)
            ask(s)
        while done < total:
            events = sel.select(60)
            if not events:
                raise BenchError(f"no answer within 60 s after {done} of {total} hits")
            for key, _ in events:
                s = key.fileobj  # type: ignore[assignment]
                data = s.recv(1 << 18)
                if not data:
                    raise BenchError(f"sparkcache closed a connection after {done} of {total} hits")
                buf = pending[s] + data
                while True:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head = buf[:end].decode("latin-1")
                    if not head.startswith("HTTP/1.1 200 "):
                        raise BenchError(f"hit {done + 1}: {head.splitlines()[0]!r}")
                    length = int(next(line.split(":", 1)[1] for line in head.split("\r\n")
                                      if line.lower().startswith("content-length:")))
                    if len(buf) < end + 4 + length:
                        break
                    buf = buf[end + 4 + length:]
                    done += 1
                    if sent < total:
                        ask(s)
                pending[s] = buf
    finally:
        for s in socks:
            s.close()
    return done


def instructions(b: Bench, upstream_port: int, paths: list[str], bodies: list[bytes], hits: int,
                 connections: int = 8, workers: int = 1, tree: Path | None = None,
                 name: str = "sparkcache") -> dict[str, Any]:
    """Instructions per hit of sparkcache under callgrind: counted only during
    ``hits`` keep-alive hits over ``connections`` connections, after the cache
    is warm and every path went twice through each worker's fast path. With
    ``workers`` > 1 valgrind follows the parent's children (each process its
    own file), the connections are spread evenly over the workers
    (``worker_connections``) and every worker is counted (the parent, which
    never serves, is not). ``per_request``: the hit window's instructions less
    those of an idle window as long (the timers'), over the hits;
    ``per_request_raw`` without that subtraction."""
    out = b.path(f"callgrind-{name}-w{workers}")
    out.mkdir(exist_ok=True)
    d = Daemon(b, {"small": {"type": "generic", "upstream": f"http://127.0.0.1:{upstream_port}"}},
               name=f"{name}-callgrind-w{workers}", workers=workers, tree=tree,
               wrap=[tool("valgrind"), "--tool=callgrind", "--instr-atstart=no",
                     *(["--trace-children=yes"] if workers > 1 else []),
                     f"--callgrind-out-file={out}/callgrind.out.%p"])
    d.start(timeout=900)
    wait_workers(d, workers, timeout=900)
    warm(d.port, paths, bodies, "sparkcache under callgrind", settle=d.wait_idle)
    # Every path through each worker's caches (its in-memory index rows, routes, response blocks).
    for socks in worker_connections(d.port, workers, 2).values():
        fixed_hits(d.port, paths, 2 * len(paths), len(socks), socks=socks)
    counted = [d.pid] if workers == 1 else [p for p in d.pids() if p != d.pid]
    control = tool("callgrind_control")

    def each(*what: str) -> None:
        for pid in counted:
            subprocess.run([control, *what, str(pid)], check=True, capture_output=True, timeout=120)

    held = worker_connections(d.port, workers, max(1, connections // workers))
    socks = [s for group in held.values() for s in group]
    each("-i", "on")
    t0 = time.monotonic()
    n = fixed_hits(d.port, paths, hits, len(socks), socks=socks)
    busy = time.monotonic() - t0
    each("-d")  # part 1: the hits
    # Part 2: as long again with no request, to subtract what the daemon's
    # timers cost meanwhile (under valgrind a second of them is many
    # instructions against the hits of that second; more so with workers).
    time.sleep(busy)
    each("-d")
    each("-i", "off")
    time.sleep(1)

    def part(pid: int, k: int) -> int:
        total = 0
        for f in glob.glob(f"{out}/callgrind.out.{pid}.{k}"):
            with open(f, errors="replace") as fh:
                for line in fh:
                    if line.startswith(("summary:", "totals:")):
                        total = max(total, int(line.split()[1]))
        return total

    hit_parts = {pid: part(pid, 1) for pid in counted}
    idle_parts = {pid: part(pid, 2) for pid in counted}
    total, idle = sum(hit_parts.values()), sum(idle_parts.values())
    d.stop()
    if not n or not total:
        raise BenchError(f"callgrind counted {total} instructions for {n} hits")
    return {"requests": n, "connections": len(socks), "workers": workers, "instructions": total,
            "idle_instructions": idle, "seconds": busy, "per_request_raw": total / n,
            "per_request": max(0, total - idle) / n,
            "connections_per_worker": {str(k): len(v) for k, v in held.items()},
            "instructions_per_process": {str(k): v for k, v in hit_parts.items()},
            "idle_instructions_per_process": {str(k): v for k, v in idle_parts.items()}, "errors": 0}


def main() -> int:
    p = base_parser(__doc__ or NAME, "(100 objects, 3 s runs)")
    p.add_argument("--objects", type=int, default=None, help="distinct objects (default 300; --quick 100)")
    p.add_argument("--object-size", type=parse_size, default=None, help="object size (default 4KiB)")
    p.add_argument("--connections", type=int, default=None, help="wrk connections (default 64)")
    p.add_argument("--duration", type=float, default=None, help="seconds per measured wrk run (default 10; --quick 3)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of unreported wrk warm-up (default 2; --quick 1)")
    p.add_argument("--workers", default=None, help="worker counts to compare, comma-separated (default 1,2)")
    p.add_argument("--runs", type=int, default=None, help="measured runs per server, median reported (default 1)")
    p.add_argument("--instructions", action="store_true",
                   help="also count sparkcache's instructions per hit under callgrind (needs valgrind)")
    p.add_argument("--instruction-hits", type=int, default=3000,
                   help="hits counted under callgrind, over 8 connections (default 3000)")
    p.add_argument("--instruction-workers", default="1",
                   help="worker counts counted under callgrind, comma-separated (default 1; 1,2 compares)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another checkout of sparkcache (e.g. /work/main) measured beside this one in the same run")
    p.add_argument("--instructions-only", action="store_true",
                   help="skip the wrk runs: only count instructions (implies --instructions)")
    args = p.parse_args()
    apply_quick(args, {"objects": 100, "duration": 3, "warmup": 1},
                {"objects": 300, "object_size": 4096, "connections": 64, "duration": 10, "warmup": 2,
                 "workers": "1,2", "runs": 1})
    counts = [int(w) for w in str(args.workers).split(",") if w.strip()]
    if args.instructions_only:
        args.instructions, counts = True, []
    cpus = sorted(os.sched_getaffinity(0))

    with Bench(NAME, args) as b:
        files = b.path("files")
        names = [f"obj-{i:04d}.bin" for i in range(args.objects)]
        b.log(f"writing {args.objects} objects of {fmt_size(args.object_size)}")
        for n in names:
            make_random_file(files / n, args.object_size)
        bodies = [(files / n).read_bytes() for n in names]
        spark_paths = [f"/api/small/{n}" for n in names]
        nginx_paths = [f"/{n}" for n in names]
        lua_spark = write_wrk_script(b.path("spark.lua"), spark_paths)
        lua_nginx = write_wrk_script(b.path("nginx.lua"), nginx_paths)

        up_port = free_port()
        origin = Nginx(b, "origin", [static_server(up_port, files, "access.log")]).start()
        origin_log = AccessLog(origin.dir / "access.log")
        # (server, workers) -> (url, wrk script, server pids, warm-up states, daemon or None)
        targets: dict[tuple[str, int], dict[str, Any]] = {}
        for w in counts:
            port = free_port()
            http_extra, server = cache_server(port, up_port, f"bench{w}")
            cache = Nginx(b, f"proxycache{w}", [server], http_extra=http_extra, workers=w).start()
            daemon = Daemon(b, {"small": {"type": "generic", "upstream": f"http://127.0.0.1:{up_port}"}},
                            name=f"sparkcache{w}", workers=w).start(timeout=180)
            wait_workers(daemon, w)
            b.log(f"warming nginx and sparkcache with {w} worker(s) (every object until it answers HIT, bytes checked)")
            targets[("nginx", w)] = {"url": f"http://127.0.0.1:{port}", "lua": lua_nginx, "pids": cache.worker_pids,
                                     "warm": warm(port, nginx_paths, bodies, f"nginx proxy_cache x{w}")}
            targets[("sparkcache", w)] = {"url": f"http://127.0.0.1:{daemon.port}", "lua": lua_spark,
                                          "pids": daemon.pids, "daemon": daemon,
                                          "warm": warm(daemon.port, spark_paths, bodies, f"sparkcache x{w}",
                                                       settle=daemon.wait_idle)}
            if args.baseline is not None:
                base = Daemon(b, {"small": {"type": "generic", "upstream": f"http://127.0.0.1:{up_port}"}},
                              name=f"baseline{w}", workers=w, tree=args.baseline).start(timeout=180)
                wait_workers(base, w)
                targets[("baseline", w)] = {"url": f"http://127.0.0.1:{base.port}", "lua": lua_spark,
                                            "pids": base.pids, "daemon": base,
                                            "warm": warm(base.port, spark_paths, bodies, f"baseline x{w}",
                                                         settle=base.wait_idle)}

        def sharing(w: int) -> tuple[set[int] | None, set[int] | None, int, str]:
            """(server CPUs, wrk CPUs, wrk threads, how it is said) for ``w`` workers."""
            if w == 1 and len(cpus) >= 2:
                return {cpus[0]}, {cpus[1]}, 1, f"server pinned to CPU {cpus[0]}, wrk -t1 pinned to CPU {cpus[1]}"
            return None, None, min(w, 2), f"server and wrk -t{min(w, 2)} share CPUs {','.join(map(str, cpus))}"

        def non_hits() -> float:
            """sparkcache_requests_total other than result="hit", over every daemon."""
            total = 0.0
            for (who, _w), t in targets.items():
                if who != "nginx":
                    m = t["daemon"].metrics()
                    total += sum(v for k, v in m.items() if k.startswith("sparkcache_requests_total{")
                                 and 'result="hit"' not in k)
            return total

        results: dict[str, list[dict[str, Any]]] = {f"{who}x{w}": [] for who, w in targets}
        warmups: dict[str, list[dict[str, Any]]] = {k: [] for k in results}
        origin_log.mark()
        non_hits0 = non_hits()
        rows = []
        for i in range(max(1, args.runs)):
            for (who, w), t in targets.items():
                server_cpus, wrk_cpus, threads, how = sharing(w)
                pids = t["pids"]()
                if server_cpus is not None:
                    pin(pids, server_cpus)
                else:
                    pin(pids, set(cpus))
                with affinity(wrk_cpus or set(cpus)):
                    if args.warmup > 0:
                        warmups[f"{who}x{w}"].append(run_wrk(t["url"], t["lua"], args.connections, args.warmup,
                                                             threads))
                    per0 = {pid: cpu_seconds([pid]) for pid in pids}
                    sw0 = switches(pids)
                    r = run_wrk(t["url"], t["lua"], args.connections, args.duration, threads)
                    per = {pid: cpu_seconds([pid]) - c for pid, c in per0.items()}
                    sw = switches(pids) - sw0
                cpu = sum(per.values())
                secs = r["duration_us"] / 1e6
                r.update({"server": who, "workers": w, "cores": how, "server_cpu_s": cpu,
                          "server_cpu_share": cpu / secs if secs else None,
                          "server_cpu_us_per_request": cpu * 1e6 / r["requests"] if r["requests"] else None,
                          "context_switches_per_request": sw / r["requests"] if r["requests"] else None,
                          "cpu_s_per_process": {str(pid): round(c, 3) for pid, c in per.items()}})
                results[f"{who}x{w}"].append(r)
                busy = sorted((c for c in per.values() if c > 0.01 * max(cpu, 1e-9)), reverse=True)
                b.log(f"{who} x{w}: {r['rps']:,.0f} req/s, {r['server_cpu_us_per_request']:.1f} us CPU/request, "
                      f"{r['context_switches_per_request'] or 0:.3f} context switches/request, errors {r['errors']} ({how})")
                rows.append([str(i + 1), who, str(w), r["rps"], r["lat_p50_us"] / 1000, r["lat_p99_us"] / 1000,
                             r["errors"], f"{r['server_cpu_share']:.0%}",
                             "/".join(f"{c / cpu:.0%}" for c in busy) if cpu else "-",
                             f"{r['server_cpu_us_per_request']:.1f}", f"{r['context_switches_per_request'] or 0:.3f}", how])
        non_hits1 = non_hits()
        upstream_during = origin_log.settle()
        print_table(f"{NAME}: {args.objects} x {fmt_size(args.object_size)} hits, wrk -c{args.connections} "
                    f"-d{args.duration:g}s", ["run", "server", "workers", "req/s", "p50 ms", "p99 ms", "errors",
                                              "server CPU", "CPU split", "CPU us/req", "switches/req", "cores"],
                    rows)

        def med(key: str, field: str) -> float:
            vals = sorted(r[field] for r in results[key])
            return float(vals[len(vals) // 2])

        errors = sum(r["errors"] for rs in results.values() for r in rs)
        summary = []
        for w in counts:
            s_rps, n_rps = med(f"sparkcachex{w}", "rps"), med(f"nginxx{w}", "rps")
            s_cpu, n_cpu = med(f"sparkcachex{w}", "server_cpu_us_per_request"), med(f"nginxx{w}",
                                                                                   "server_cpu_us_per_request")
            rat = ratio(s_rps, n_rps)
            cpu_rat = ratio(n_cpu, s_cpu)
            summary += [
                summary_row(f"requests/s, {w} worker(s)", "req/s", s_rps, f"nginx proxy_cache x{w}", n_rps,
                            f">= {GOAL:.2f}x", rat is not None and rat >= GOAL and errors == 0,
                            note="load-dependent: compare on a quiet machine"),
                # ratio = nginx's CPU per request / sparkcache's: the req/s ratio two CPU-bound servers would reach
                summary_row(f"server CPU per request, {w} worker(s)", "us", s_cpu, f"nginx proxy_cache x{w}", n_cpu,
                            f">= {GOAL:.2f}x (nginx/sparkcache)", cpu_rat is not None and cpu_rat >= GOAL,
                            ratio_value=cpu_rat),
            ]
        if args.baseline is not None:
            for w in counts:
                summary.append(summary_row(f"server CPU per request, {w} worker(s), this tree vs baseline", "us",
                                           med(f"sparkcachex{w}", "server_cpu_us_per_request"),
                                           f"baseline x{w}", med(f"baselinex{w}", "server_cpu_us_per_request"),
                                           "-", None))
        if 1 in counts and 2 in counts:
            for who in ("sparkcache", "nginx") + (("baseline",) if args.baseline is not None else ()):
                c1, c2 = med(f"{who}x1", "server_cpu_us_per_request"), med(f"{who}x2", "server_cpu_us_per_request")
                summary.append(summary_row(f"{who}: CPU/request 2 workers vs 1", "us", c2, f"{who} x1", c1,
                                           f"<= {SCALING_GOAL:.2f}x" if who == "sparkcache" else "-",
                                           (c2 / c1 <= SCALING_GOAL) if who == "sparkcache" and c1 else None))
            summary.append(summary_row("sparkcache: req/s 2 workers vs 1", "req/s", med("sparkcachex2", "rps"),
                                       "sparkcache x1", med("sparkcachex1", "rps"), "-", None,
                                       note="2 workers share the cores with wrk"))
        counted: dict[str, Any] = {}
        if args.instructions:
            for w in [int(x) for x in str(args.instruction_workers).split(",") if x.strip()]:
                b.log(f"counting sparkcache's instructions per hit under callgrind, {w} worker(s)")
                counted[str(w)] = instructions(b, up_port, spark_paths, bodies, args.instruction_hits, workers=w)
                b.log(f"  {counted[str(w)]['per_request']:,.0f} Ir/hit ({counted[str(w)]['per_request_raw']:,.0f} "
                      f"before the idle window's {counted[str(w)]['idle_instructions']:,} are taken off)")
                base_count = None
                if args.baseline is not None:
                    b.log(f"counting the baseline's instructions per hit under callgrind, {w} worker(s)")
                    counted[f"baseline{w}"] = instructions(b, up_port, spark_paths, bodies, args.instruction_hits,
                                                           workers=w, tree=args.baseline, name="baseline")
                    base_count = counted[f"baseline{w}"]["per_request"]
                    b.log(f"  {base_count:,.0f} Ir/hit ({counted[f'baseline{w}']['per_request_raw']:,.0f} before the "
                          f"idle window's {counted[f'baseline{w}']['idle_instructions']:,} are taken off)")
                summary.append(summary_row(f"sparkcache instructions per hit (callgrind), {w} worker(s)", "Ir",
                                           counted[str(w)]["per_request"], "baseline" if base_count else "",
                                           base_count, "-", None))
            if "1" in counted and "2" in counted:
                i1, i2 = counted["1"]["per_request"], counted["2"]["per_request"]
                summary.append(summary_row("sparkcache: instructions/hit 2 workers vs 1", "Ir", i2,
                                           "sparkcache x1", i1, "-", None))
        print_summary(f"{NAME} summary", summary)
        checks = {
            **{f"warmup_states_{who}x{w}": t["warm"] for (who, w), t in targets.items()},
            "sparkcache_non_hit_requests_during_runs": non_hits1 - non_hits0,
            "upstream_requests_during_runs": len(upstream_during),
            "wrk_errors": errors,
        }
        print(f"checks: {checks}")
        if non_hits1 != non_hits0 or upstream_during:
            b.notes.append("WARNING: requests reached the upstream or missed the cache during the measured runs")
        for (who, w), t in targets.items():
            if who != "nginx":
                d = t["daemon"]
                d.stop()
                checks[f"{'' if who == 'sparkcache' else who + '_'}daemon_x{w}_exit_status"] = d.exit_status
                checks[f"{'' if who == 'sparkcache' else who + '_'}daemon_x{w}_log_problems"] = d.log_problems()[:20]
        b.write_results({
            "params": {k: getattr(args, k) for k in ("objects", "object_size", "connections", "duration", "warmup",
                                                     "workers", "runs")},
            "paths": "rotating over every object; sparkcache /api/small/obj-NNNN.bin, nginx /obj-NNNN.bin",
            "cores": {str(w): sharing(w)[3] for w in counts},
            "runs": results,
            "warmup_runs": warmups,
            "instructions": counted,
            "summary": summary,
            "checks": checks,
        })
    return 0


if __name__ == "__main__":
    run_main(main)
