#!/usr/bin/env python3
"""Seed endpoints: small PUT/GET pairs at a fixed rate, sustained.

An open-loop asyncio client schedules ``--rate`` pairs per second for
``--duration`` seconds (1,000/s for 20 s by default): each pair PUTs a fresh
small body under ``/cache/bench/<n>`` (write token) and GETs it back on the
same keep-alive connection, checking the bytes. A pair waits in a queue for
a free connection (``--connections``), so a server that falls behind shows up
as latency measured from the pair's *scheduled* time (no coordinated
omission), and as an achieved rate below the target.

Reported: achieved pairs/s, p50/p99/max latency of PUTs and GETs (from the
scheduled start), errors, and the daemon's CPU time per request (user+sys of
the twistd process, from /proc) and its CPU share. The client runs in this
process; on a 2-core machine client and server share the cores.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from common import Bench, BenchError, Daemon, apply_quick, base_parser, cpu_seconds, print_table, run_main

NAME = "seed_kv"


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, body
            body += chunk[:-2]
    raise BenchError(f"response without a length: {head!r}")


class Client:
    def __init__(self, port: int, token: str, size: int, gets_only: int = 0) -> None:
        """``gets_only``: GET the keys [0, gets_only) of an earlier run in turn, no PUTs."""
        self.port, self.token, self.size, self.gets_only = port, token, size, gets_only
        self.put_lat: list[float] = []
        self.get_lat: list[float] = []
        self.errors: list[str] = []
        self.done = 0

    async def worker(self, queue: "asyncio.Queue[tuple[float, int] | None]") -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        auth = f"Authorization: Bearer {self.token}\r\n".encode()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                scheduled, n = item
                if self.gets_only:
                    path = f"/cache/bench/{10_000_000 + n % self.gets_only}".encode()
                    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: bench\r\n\r\n")
                    status, got = await read_response(reader)
                    if status != 200 or len(got) != self.size:
                        self.errors.append(f"GET {path!r}: {status}")
                    self.get_lat.append(time.perf_counter() - scheduled)
                    self.done += 1
                    continue
                body = n.to_bytes(8, "big") + os.urandom(self.size - 8)
                path = f"/cache/bench/{n}".encode()
                writer.write(b"PUT " + path + b" HTTP/1.1\r\nHost: bench\r\n" + auth +
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
                status, _ = await read_response(reader)
                t_put = time.perf_counter()
                if status != 201:
                    self.errors.append(f"PUT {n}: {status}")
                writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: bench\r\n\r\n")
                status, got = await read_response(reader)
                t_get = time.perf_counter()
                if status != 200 or got != body:
                    self.errors.append(f"GET {n}: {status}, {'same' if got == body else 'different'} bytes")
                self.put_lat.append(t_put - scheduled)
                self.get_lat.append(t_get - scheduled)
                self.done += 1
        finally:
            writer.close()

    async def run(self, rate: float, duration: float, connections: int, first: int) -> float:
        queue: asyncio.Queue[tuple[float, int] | None] = asyncio.Queue()
        workers = [asyncio.create_task(self.worker(queue)) for _ in range(connections)]
        total = int(rate * duration)
        start = time.perf_counter()
        for i in range(total):
            at = start + i / rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((at, first + i))
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
        return time.perf_counter() - start


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


def main() -> int:
    p = base_parser(__doc__ or NAME, "(5 s at the same rate)")
    p.add_argument("--rate", type=float, default=None, help="PUT/GET pairs per second (default 1000)")
    p.add_argument("--duration", type=float, default=None, help="seconds of the measured run (default 20; --quick 5)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of unreported load first (default 3; --quick 1)")
    p.add_argument("--connections", type=int, default=None, help="keep-alive connections (default 32)")
    p.add_argument("--size", type=int, default=None, help="body size in bytes (default 1024)")
    args = p.parse_args()
    apply_quick(args, {"duration": 5, "warmup": 1},
                {"rate": 1000.0, "duration": 20.0, "warmup": 3.0, "connections": 32, "size": 1024})

    with Bench(NAME, args) as b:
        daemon = Daemon(b, {}).start()
        client = Client(daemon.port, daemon.admin_token, args.size)
        b.log(f"warm-up: {args.warmup:g}s at {args.rate:g} pairs/s")
        asyncio.run(client.run(args.rate, args.warmup, args.connections, 0))
        warm_errors = list(client.errors)
        measured = Client(daemon.port, daemon.admin_token, args.size)
        b.log(f"measured: {args.duration:g}s at {args.rate:g} pairs/s over {args.connections} connections")
        cpu0 = cpu_seconds([daemon.pid])
        elapsed = asyncio.run(measured.run(args.rate, args.duration, args.connections, 10_000_000))
        cpu = cpu_seconds([daemon.pid]) - cpu0
        requests = 2 * measured.done
        result: dict[str, Any] = {
            "target_pairs_per_s": args.rate,
            "achieved_pairs_per_s": measured.done / elapsed,
            "pairs": measured.done,
            "elapsed_s": elapsed,
            "errors": len(measured.errors),
            "error_examples": measured.errors[:5],
            "warmup_errors": len(warm_errors),
            "put_p50_ms": pct(measured.put_lat, 0.5) * 1000,
            "put_p99_ms": pct(measured.put_lat, 0.99) * 1000,
            "put_max_ms": max(measured.put_lat, default=float("nan")) * 1000,
            "get_p50_ms": pct(measured.get_lat, 0.5) * 1000,
            "get_p99_ms": pct(measured.get_lat, 0.99) * 1000,
            "get_max_ms": max(measured.get_lat, default=float("nan")) * 1000,
            "server_cpu_s": cpu,
            "server_cpu_share": cpu / elapsed,
            "server_cpu_us_per_request": cpu * 1e6 / requests if requests else None,
        }
        print_table(f"{NAME}: {args.size} B bodies, PUT then GET, {args.connections} connections",
                    ["target/s", "achieved/s", "pairs", "PUT p50 ms", "PUT p99 ms", "GET p50 ms", "GET p99 ms",
                     "errors", "server CPU", "CPU us/req"],
                    [[args.rate, result["achieved_pairs_per_s"], measured.done, result["put_p50_ms"],
                      result["put_p99_ms"], result["get_p50_ms"], result["get_p99_ms"], result["errors"],
                      f"{result['server_cpu_share']:.0%}", result["server_cpu_us_per_request"]]])
        sustained = result["achieved_pairs_per_s"] >= 0.98 * args.rate and not measured.errors
        print(f"sustained {args.rate:g} pairs/s: {'yes' if sustained else 'NO'}")
        # The same rate of GETs alone (the keys just stored): what reads cost without the uploads' fsyncs.
        gets = Client(daemon.port, daemon.admin_token, args.size, gets_only=max(1, measured.done))
        b.log(f"GETs only: {args.duration:g}s at {2 * args.rate:g}/s")
        cpu0 = cpu_seconds([daemon.pid])
        g_elapsed = asyncio.run(gets.run(2 * args.rate, args.duration, args.connections, 0))
        g_cpu = cpu_seconds([daemon.pid]) - cpu0
        result["gets_only"] = {
            "target_per_s": 2 * args.rate, "achieved_per_s": gets.done / g_elapsed, "errors": len(gets.errors),
            "p50_ms": pct(gets.get_lat, 0.5) * 1000, "p99_ms": pct(gets.get_lat, 0.99) * 1000,
            "server_cpu_share": g_cpu / g_elapsed,
            "server_cpu_us_per_request": g_cpu * 1e6 / gets.done if gets.done else None,
        }
        print(f"GETs only: {result['gets_only']}")
        daemon.stop()
        b.write_results({
            "params": {k: getattr(args, k) for k in ("rate", "duration", "warmup", "connections", "size")},
            "result": result,
            "sustained": sustained,
            "checks": {"daemon_exit_status": daemon.exit_status, "daemon_log_problems": daemon.log_problems()[:20]},
        })
    return 0


if __name__ == "__main__":
    run_main(main)
