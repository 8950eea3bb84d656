"""Shared helpers for the sparkcache benchmarks (bench/*.py).

Everything here runs on loopback only (127.0.0.1): an unprivileged nginx that
this process starts itself (never the system service), the sparkcache daemon
(``twistd -n sparkcache``) as a subprocess with a generated config, curl for
single transfers and wrk for many connections.

A :class:`Bench` owns one temporary directory (under /tmp or ``--workdir``)
and every process started through it; leaving its ``with`` block (normally,
on an exception, on SIGINT or SIGTERM) stops the processes and deletes the
directory. Results go to ``bench/results/<name>.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import hashlib
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
MB = 1_000_000  # throughput figures are decimal megabytes per second
MiB = 1 << 20
GiB = 1 << 30

_PROXY_VARS = {"http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"}


class BenchError(RuntimeError):
    """A benchmark could not run or produced wrong results."""


# -- sizes, stats, formatting ---------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.I)


def parse_size(text: str | int) -> int:
    """``1GiB``, ``256MiB``, ``4KiB``, ``4k``, ``1048576`` → bytes (K/M/G are binary)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1GiB, 256MiB, 4KiB)")
    n, unit = float(m.group(1)), m.group(2).upper()
    return int(n * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


def fmt_size(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{int(n)} B"


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_num(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 2) -> None:
    """A plain-text table; the first ``left`` columns are left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt_num(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "+".join("-" * (w + 2) for w in widths)
    print()
    print(title)
    print("+" + line + "+")
    for i, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) + " |")
        if i == 0:
            print("+" + line.replace("-", "=") + "+")
    print("+" + line + "+")
    sys.stdout.flush()


def summary_row(metric: str, unit: str, sparkcache: float | None, reference_name: str, reference: float | None,
                goal: str, met: bool | None, ratio_value: float | None = None, note: str = "") -> dict[str, Any]:
    """One line of a scenario's headline table (also what run_all.py prints)."""
    return {
        "metric": metric, "unit": unit, "sparkcache": sparkcache, "reference_name": reference_name,
        "reference": reference, "ratio": ratio_value if ratio_value is not None else ratio(sparkcache, reference),
        "goal": goal, "met": met, "note": note,
    }


def print_summary(title: str, rows: list[dict[str, Any]]) -> None:
    print_table(title, ["metric", "sparkcache", "reference", "ratio", "goal", "met"], left=1, rows=[
        [
            f"{r['metric']} ({r['unit']})" if r["unit"] else r["metric"],
            fmt_num(r["sparkcache"]),
            f"{fmt_num(r['reference'])} [{r['reference_name']}]" if r["reference_name"] else fmt_num(r["reference"]),
            fmt_ratio(r["ratio"]),
            r["goal"],
            "-" if r["met"] is None else ("yes" if r["met"] else "NO"),
        ]
        for r in rows
    ])


# -- environment ---------------------------------------------------------------------------


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """No proxies and no SPARKCACHE_* from the caller's environment."""
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS and not k.startswith("SPARKCACHE_")}
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"process listening on {port} exited before it was ready")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listening on {LOOPBACK}:{port} after {timeout}s")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGTERM the child if this script dies, so no orphan keeps running."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} is not installed (Debian package: {name})")
    return path


def twistd_path() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(candidate):
        return candidate
    found = shutil.which("twistd")
    if found is None:
        raise BenchError("twistd not found next to the python interpreter nor on PATH")
    return found


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except Exception as e:  # pragma: no cover
        return f"unknown ({e})"


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy (system-wide, anyone's processes) over ``seconds``."""
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle

    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def _stat_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                out.extend(kids)
                todo.extend(kids)
        except OSError:
            pass
    return out


def _own_cpu() -> int:
    """Jiffies used by this process, its live descendants and every child they have reaped."""
    total = 0
    for pid in [os.getpid(), *_descendants(os.getpid())]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        except (OSError, IndexError, ValueError):
            pass
    return total


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by these processes (all their threads)."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tck


def task_cpu_seconds(pids: Iterable[int]) -> float:
    """On-CPU seconds of these processes' live threads, in nanoseconds from
    /proc/<pid>/task/*/schedstat: finer than ``cpu_seconds``' clock ticks (10 ms),
    which a sub-second transfer needs. (A thread that exited no longer counts.)"""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                pass
    return total / 1e9


class ForeignLoad:
    """How much CPU processes other than this benchmark's used while it ran (0..1 of the machine)."""

    def __init__(self) -> None:
        self.busy0, self.total0 = _stat_cpu()
        self.own0 = _own_cpu()

    def share(self) -> float:
        busy, total = _stat_cpu()
        own = _own_cpu() - self.own0
        return max(0.0, (busy - self.busy0 - own) / max(1, total - self.total0))


def wait_for_quiet(max_wait: float, threshold: float = 0.15, log: Callable[[str], None] = print) -> float:
    """Wait (up to ``max_wait`` s) until the machine is nearly idle; return the last busy fraction.

    Other work on a 2-core machine (a test suite, a build) moves every figure;
    the busy fraction measured here is recorded with the results.
    """
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        log(f"machine busy ({busy:.0%} of CPU used by other processes); waiting for it to quiet down")
        time.sleep(4)
        busy = cpu_busy()
    if busy > threshold:
        log(f"WARNING: machine still {busy:.0%} busy; figures will be disturbed")
    return busy


def _tree_hash(*roots: Path) -> str:
    h = hashlib.sha256()
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def machine_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""

    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        mem = 0
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_bytes": mem,
        "kernel": platform.release(),
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "python": sys.version.split()[0],
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty_sparkcache": bool(git("status", "--porcelain", "--", "sparkcache", "twisted")),
        # the daemon code is edited concurrently: identify exactly what was measured
        "sparkcache_tree_sha256": _tree_hash(REPO / "sparkcache", REPO / "twisted" / "plugins"),
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "-v"]),
        "curl": _version(["curl", "--version"]),
    }


# -- the bench context -----------------------------------------------------------------------


def base_parser(description: str, quick_help: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes and shorter runs (smoke test). " + quick_help)
    p.add_argument("--workdir", default=None,
                   help="parent directory for the temporary directory (default: the system temp dir, /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs) for inspection")
    p.add_argument("--results", default=str(RESULTS_DIR), help="directory for the JSON results")
    return p


def add_workers_arg(p: argparse.ArgumentParser, default: str = "1,2") -> None:
    """``--workers 1,2``: the daemon's ``server.workers`` values to run the scenario with, in turn."""
    def counts(text: str) -> list[int]:
        try:
            out = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            out = []
        if not out or min(out) < 1:
            raise argparse.ArgumentTypeError(f"not a list of worker counts: {text!r} (try 1,2)")
        return out

    p.add_argument("--workers", type=counts, default=counts(default),
                   help="comma-separated server.workers values; the scenario runs once per value")


def apply_quick(args: argparse.Namespace, quick: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Fill options left unset (None) from the quick or the full defaults."""
    table = quick if args.quick else defaults
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, table.get(k, v))


class Bench:
    """One benchmark run: a private temp dir, the processes it started, and cleanup."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.args = args
        parent = args.workdir or None
        if parent:
            os.makedirs(parent, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"sparkbench-{name}-", dir=parent))
        # nginx workers run as nobody when we are root: they must be able to
        # traverse this directory and read the files it serves.
        os.chmod(self.dir, 0o755)
        self._cleanups: list[Callable[[], None]] = []
        self._old_handlers: dict[int, Any] = {}
        self.started = time.monotonic()
        self.notes: list[str] = []
        self.cpu_busy_before = cpu_busy(1.0)
        self.foreign = ForeignLoad()

    def __enter__(self) -> "Bench":
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        print(f"[{self.name}] working in {self.dir}", flush=True)
        if self.cpu_busy_before > 0.15:
            print(f"[{self.name}] WARNING: {self.cpu_busy_before:.0%} of the CPUs were busy before the run "
                  f"(other processes); figures will be disturbed", flush=True)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc: Any) -> None:
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as e:  # keep cleaning up
                print(f"[{self.name}] cleanup error: {e!r}", file=sys.stderr)
        self._cleanups.clear()
        if self.args.keep:
            print(f"[{self.name}] kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        for sig, h in self._old_handlers.items():
            signal.signal(sig, h)

    def on_cleanup(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def path(self, *parts: str) -> Path:
        p = self.dir.joinpath(*parts)
        return p

    def log(self, msg: str) -> None:
        print(f"[{self.name} {time.monotonic() - self.started:6.1f}s] {msg}", flush=True)

    def check_disk(self, need: int) -> None:
        free = shutil.disk_usage(self.dir).free
        if free < need:
            raise BenchError(f"{self.dir} has {fmt_size(free)} free; this run needs about {fmt_size(need)} "
                             f"(use smaller --size or another --workdir)")

    def write_results(self, data: dict[str, Any]) -> Path:
        out = Path(self.args.results)
        out.mkdir(parents=True, exist_ok=True)
        data = {
            "scenario": self.name,
            "quick": bool(self.args.quick),
            "machine": machine_info(),
            "elapsed_s": round(time.monotonic() - self.started, 2),
            # share of the CPUs other processes used during the second before the run
            "cpu_busy_before": round(self.cpu_busy_before, 3),
            # share of the machine's CPU used by other processes during this run
            "foreign_cpu_share": round(self.foreign.share(), 3),
            "notes": self.notes,
            **data,
        }
        path = out / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
        print(f"\n[{self.name}] results written to {path} (other processes used "
              f"{data['foreign_cpu_share']:.0%} of the CPU meanwhile)")
        return path


def run_main(main: Callable[[], int]) -> None:
    """Exit status: 0 ran (goals may or may not be met), 1 failed, 130 interrupted."""
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        print(f"interrupted ({e}); cleaned up", file=sys.stderr)
        sys.exit(130)


# -- test data ---------------------------------------------------------------------------------


def make_random_file(path: Path, size: int, chunk: int = 8 * MiB) -> str:
    """Write ``size`` bytes from os.urandom; return their sha256 (hex)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            b = os.urandom(min(chunk, left))
            h.update(b)
            f.write(b)
            left -= len(b)
    os.chmod(path, 0o644)
    return h.hexdigest()


def make_links(src: Path, names: Iterable[Path]) -> None:
    """Hard links of one file under several names (same bytes, no extra disk)."""
    for n in names:
        n.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, n)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(8 * MiB)
            if not b:
                return h.hexdigest()
            h.update(b)


# -- processes ------------------------------------------------------------------------------------


def _stop_process(proc: subprocess.Popen[Any], first: int, timeout: float) -> int | None:
    if proc.poll() is None:
        try:
            proc.send_signal(first)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


class Nginx:
    """An nginx of our own: ``nginx -p <dir> -c <dir>/nginx.conf -g 'daemon off;'``.

    ``servers`` are ``server { ... }`` blocks; ``{dir}`` in them is replaced by
    this instance's directory. Logs, pid and temp paths all live in that dir.
    """

    LOG_FORMAT = ("log_format bench '$request_uri $status $body_bytes_sent $request_time "
                  "$upstream_cache_status $connection $connection_requests';")

    def __init__(self, bench: Bench, name: str, servers: Sequence[str], http_extra: str = "", workers: int = 1) -> None:
        self.bench = bench
        self.name = name
        self.dir = bench.path(f"nginx-{name}")
        self.servers = servers
        self.http_extra = http_extra
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports = [int(p) for s in servers for p in re.findall(r"listen\s+127\.0\.0\.1:(\d+)", s)]

    def conf(self) -> str:
        d = str(self.dir)
        user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
        servers = "\n".join(s.replace("{dir}", d) for s in self.servers)
        return f"""# generated by bench/common.py — a private nginx on loopback only
{user}worker_processes {self.workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    default_type application/octet-stream;
    types {{ }}
    {self.LOG_FORMAT}
    access_log off;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    server_tokens off;
{self.http_extra.replace("{dir}", d)}
{servers}
}}
"""

    def start(self, timeout: float = 15.0) -> "Nginx":
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        conf = self.dir / "nginx.conf"
        conf.write_text(self.conf())
        check = subprocess.run([tool("nginx"), "-t", "-q", "-p", str(self.dir), "-c", str(conf)],
                               capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise BenchError(f"nginx {self.name}: bad config:\n{check.stderr}")
        out = open(self.dir / "stderr.log", "ab")
        try:
            self.proc = subprocess.Popen(
                [tool("nginx"), "-p", str(self.dir), "-c", str(conf), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
                preexec_fn=_die_with_parent,
            )
        finally:
            out.close()
        self.bench.on_cleanup(self.stop)
        for port in self.ports:
            try:
                wait_port(port, timeout, lambda: self.proc is not None and self.proc.poll() is None)
            except BenchError as e:
                raise BenchError(f"nginx {self.name}: {e}\n{self.error_log()}") from None
        return self

    def url(self, path: str, port: int | None = None) -> str:
        return f"http://{LOOPBACK}:{port or self.ports[0]}/{path.lstrip('/')}"

    def worker_pids(self) -> list[int]:
        return _descendants(self.proc.pid) if self.proc is not None else []

    def error_log(self) -> str:
        parts = []
        for n in ("error.log", "stderr.log"):
            p = self.dir / n
            if p.exists():
                parts.append(p.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGQUIT, 15)  # graceful: workers finish, then exit
            self.proc = None


class ScriptServer:
    """A script of bench/ serving HTTP on a free port of its own
    (``python SCRIPT PORT ARGS...``), killed with the bench."""

    def __init__(self, bench: Bench, script: Path, args: Sequence[str]) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(script), str(self.port), *args], stdin=subprocess.DEVNULL,
                                     env=clean_env(), preexec_fn=_die_with_parent)
        bench.on_cleanup(self.stop)
        wait_port(self.port, 15, lambda: self.proc.poll() is None)

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}/{path.lstrip('/')}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class AccessLog:
    """Reads lines nginx appends to a ``bench`` format access log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def new_lines(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        out = []
        for line in data.decode("latin-1").splitlines():
            p = line.split()
            if len(p) < 7:
                continue
            out.append({"uri": p[0], "status": int(p[1]), "bytes": int(p[2]), "time": float(p[3]),
                        "cache": p[4], "connection": p[5], "connection_requests": int(p[6])})
        return out

    def settle(self, expect: int | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
        """New lines, once at least ``expect`` are there (nginx logs at request end) or the file is quiet."""
        deadline = time.monotonic() + timeout
        last = -1
        while True:
            lines = self.new_lines()
            if expect is not None and len(lines) >= expect:
                time.sleep(0.2)
                return self.new_lines()
            if expect is None and len(lines) == last:
                return lines
            if time.monotonic() > deadline:
                return lines
            last = len(lines)
            time.sleep(0.25)


def static_server(port: int, root: Path, log_name: str, extra: str = "") -> str:
    """An nginx server serving ``root`` from disk (sendfile on, from the http block)."""
    return f"""
    server {{
        listen 127.0.0.1:{port};
        root {root};
        access_log {{dir}}/{log_name} bench;
        location / {{
            {extra}
        }}
    }}"""


def read_response(s: socket.socket) -> tuple[str, bytes]:
    """One whole response (head, body by Content-Length or chunked) from a blocking socket."""
    buf = b""

    def more() -> bytes:
        data = s.recv(65536)
        if not data:
            raise BenchError("connection closed in a response")
        return data

    while b"\r\n\r\n" not in buf:
        buf += more()
    head, _, rest = buf.partition(b"\r\n\r\n")
    text = head.decode("latin-1")
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in text.split("\r\n")[1:])}
    if "content-length" in fields:
        length = int(fields["content-length"])
        while len(rest) < length:
            rest += more()
        return text, rest[:length]
    body = b""
    while True:  # chunked
        while b"\r\n" not in rest:
            rest += more()
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(rest) < size + 2:
            rest += more()
        body, rest = body + rest[:size], rest[size + 2:]
        if size == 0:
            return text, body


def worker_connections(port: int, workers: int, per_worker: int, tries: int = 500) -> dict[Any, list[socket.socket]]:
    """``per_worker`` keep-alive connections accepted by each of ``workers``
    processes (each connection asks /health which worker holds it; the others
    are closed): the kernel hands a shared socket's connections to whichever
    worker accepts first, and a window counted under callgrind must reach every
    worker, each with its part of the load."""
    held: dict[Any, list[socket.socket]] = {}
    for _ in range(tries):
        if len(held) == workers and all(len(v) >= per_worker for v in held.values()):
            return held
        s = socket.create_connection(("127.0.0.1", port), timeout=120)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        _head, body = read_response(s)
        worker = json.loads(body).get("worker")
        if len(held.setdefault(worker, [])) < per_worker:
            held[worker].append(s)
        else:
            s.close()
    for socks in held.values():
        for s in socks:
            s.close()
    raise BenchError(f"{tries} connections did not reach {per_worker} per worker of {workers}: {sorted(map(str, held))}")


class Daemon:
    """sparkcache under ``twistd -n`` with a generated config, in its own directory."""

    def __init__(self, bench: Bench, remotes: dict[str, dict[str, Any]], name: str = "sparkcache",
                 storage: dict[str, Any] | None = None, upstream: dict[str, Any] | None = None,
                 workers: int = 1, wrap: Sequence[str] = (), tree: Path | None = None) -> None:
        """``workers``: ``server.workers``, always set (the daemon's default is not
        what a benchmark should silently follow); ``wrap``: a command the daemon
        runs under (``taskset -c 0``, ``valgrind --tool=callgrind``...); ``tree``:
        another checkout of sparkcache to run (a "before" beside this one)."""
        self.bench = bench
        self.tree = tree or REPO
        self.workers = workers
        self.wrap = list(wrap)
        self.dir = bench.path(name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.dir / "data"
        self.port = free_port()
        self.remotes = remotes
        self.storage = {"data_dir": str(self.data_dir), "max_size": "512GiB", **(storage or {})}
        self.upstream = upstream
        self.admin_token = secrets.token_hex(16)
        self.log_path = self.dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_status: int | None = None

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "server": {"listen": [f"tcp:{self.port}:interface={LOOPBACK}"], "shutdown_timeout": "5s",
                       "workers": self.workers},
            "storage": self.storage,
            "auth": {"anonymous_read": True},
            "remotes": self.remotes,
        }
        if self.upstream:
            cfg["upstream"] = self.upstream
        return cfg

    def start(self, timeout: float = 30.0) -> "Daemon":
        cfg = self.dir / "cache.yaml"
        cfg.write_text(json.dumps(self.config(), indent=2) + "\n")  # JSON is YAML
        env = clean_env({
            "PYTHONPATH": os.pathsep.join([str(self.tree)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
            "PYTHONUNBUFFERED": "1",
            "SPARKCACHE_ADMIN_TOKEN": self.admin_token,
        })
        out = open(self.dir / "daemon.out", "ab")
        try:
            self.proc = subprocess.Popen(
                [*self.wrap, twistd_path(), "-n", "--pidfile=", f"--logfile={self.log_path}", "sparkcache", "-c", str(cfg)],
                cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        finally:
            out.close()
        self.bench.on_cleanup(self.stop)
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"sparkcache exited with status {self.proc.returncode} before it was ready\n{self.log_tail()}")
            try:
                status, _h, body = self.request("GET", "/health", timeout=2)
                if status == 200:
                    return self
                last = f"/health answered {status}: {body[:200]!r}"
            except (OSError, http.client.HTTPException) as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise BenchError(f"sparkcache not ready after {timeout}s ({last})\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The daemon's processes: the parent and, with workers, each worker (for CPU accounting)."""
        return [self.pid, *_descendants(self.pid)]

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}/{path.lstrip('/')}"

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        c = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        try:
            c.request(method, path, headers=headers or {})
            r = c.getresponse()
            body = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, body
        finally:
            c.close()

    def each_worker(self) -> list[http.client.HTTPConnection]:
        """One open keep-alive connection to each worker process
        (``worker_connections``), for warm-ups that must reach every one of
        them. The caller closes them."""
        conns = []
        for (sock,) in worker_connections(self.port, self.workers, 1).values():
            c = http.client.HTTPConnection(LOOPBACK, self.port)
            c.sock = sock  # (http.client sends on a socket it was given)
            conns.append(c)
        return conns

    def warm_up(self, requests: Callable[[], Sequence[tuple[str, bytes | int]]]) -> None:
        """Send each worker process the ``requests()`` made for it ((path,
        expected body, or its length), in order) over one connection: what a
        benchmark times next is then no worker's first pass through that path.
        Called once per worker, so a miss can be of a key of its own."""
        conns = self.each_worker()
        try:
            for c in conns:
                for path, expected in requests():
                    c.request("GET", path)
                    r = c.getresponse()
                    body = r.read()
                    if r.status != 200 or (body != expected and len(body) != expected):
                        raise BenchError(f"warm-up GET {path} answered {r.status}, {len(body)} bytes: {body[:200]!r}")
        finally:
            for c in conns:
                c.close()

    def admin(self, method: str, path: str) -> Any:
        status, _h, body = self.request(method, path, {"Authorization": f"Bearer {self.admin_token}"})
        if status >= 300:
            raise BenchError(f"{method} {path} answered {status}: {body[:300]!r}")
        return json.loads(body)

    def fresh_start(self) -> float:
        """Stop, delete the data dir, start again on the same port: a cache that is
        certainly cold (no index rows, no bodies, no in-memory state). Returns the seconds taken."""
        t0 = time.monotonic()
        self.stop()
        if not self.clean_exit:
            raise BenchError(f"sparkcache exited with status {self.exit_status} on SIGTERM\n{self.log_tail()}")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start()
        return time.monotonic() - t0

    def try_purge(self, remote: str) -> tuple[int, str]:
        """POST /admin/purge?remote=… with the admin token: (status, body) whatever happens."""
        status, _h, body = self.request("POST", f"/admin/purge?remote={remote}",
                                        {"Authorization": f"Bearer {self.admin_token}"})
        return status, body.decode(errors="replace")[:300]

    def purge(self, remote: str) -> int:
        """Empty one remote (index rows and bodies) and check that it is empty."""
        n = self.admin("POST", f"/admin/purge?remote={remote}")["purged"]
        left = self.entries(remote)
        if left:
            raise BenchError(f"purge of remote {remote} left {len(left)} entries")
        return int(n)

    def entries(self, remote: str) -> list[dict[str, Any]]:
        status, _h, body = self.request("GET", f"/api/{remote}/")
        if status != 200:
            raise BenchError(f"listing /api/{remote}/ answered {status}: {body[:300]!r}")
        return list(json.loads(body)["entries"])

    def wait_idle(self, timeout: float = 120.0) -> float:
        """Wait until no upstream fetch is in flight; return the seconds waited.

        A client's MISS response ends when the last byte is sent, which can be
        before the fetch has fsynced and committed the body (and left the
        in-flight map): wait for that before counting on a HIT.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            h = self.health()
            if h.get("inflight_fetches") == 0:
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise BenchError(f"sparkcache still has {h.get('inflight_fetches')} fetch(es) in flight after {timeout}s")
            time.sleep(0.02)

    def wait_entries(self, remote: str, n: int, timeout: float = 120.0) -> list[dict[str, Any]]:
        """The remote's entries once there are ``n`` (or what there is after ``timeout``).
        With workers, ``wait_idle`` sees one worker's fetches: the one that
        fetched may still be committing when another answers."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.entries(remote)
            if len(entries) >= n or time.monotonic() > deadline:
                return entries
            time.sleep(0.02)

    def health(self) -> dict[str, Any]:
        status, _h, body = self.request("GET", "/health")
        return dict(json.loads(body)) if status == 200 else {"status": status}

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{labels}': value}."""
        status, _h, body = self.request("GET", "/metrics")
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                try:
                    out[k] = float(v)
                except ValueError:
                    pass
        return out

    def proc_status(self) -> dict[str, int]:
        """VmRSS / VmHWM / Threads of the daemon process (kB values in bytes)."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "VmSize", "VmPeak", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0]) * 1024
                elif k == "Threads":
                    out[k] = int(v)
        return out

    def log_text(self) -> str:
        parts = []
        for p in (self.log_path, self.dir / "daemon.out"):
            if p.exists():
                parts.append(p.read_text(errors="replace"))
        return "\n".join(parts)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def log_problems(self) -> list[str]:
        """Lines of the daemon log that look like errors, warnings or tracebacks."""
        pat = re.compile(r"Traceback|Unhandled|Error|error|failed|not caching|CRITICAL|WARN|warn|stalled|aborted")
        return [line for line in self.log_text().splitlines() if pat.search(line)]

    @property
    def clean_exit(self) -> bool:
        # twistd re-raises the signal that stopped it, so a clean stop on SIGTERM
        # is reported as "killed by signal 15" (-15); 0 is fine too.
        return self.exit_status in (0, -signal.SIGTERM, None)

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        started = time.monotonic()
        self.exit_status = _stop_process(proc, signal.SIGTERM, 30)
        self.stop_seconds = time.monotonic() - started


# -- clients ---------------------------------------------------------------------------------------

# (a -w argument must not start with "@": curl would read the format from a file)
_MARK = "##CURL##"
CURL_WRITEOUT = _MARK + "J%{json}\n" + _MARK + "H%{header_json}\n" + _MARK + "E\n"
_WRITEOUT_RE = re.compile(re.escape(_MARK) + r"J(.*?)\n" + re.escape(_MARK) + r"H(.*?)\n" + re.escape(_MARK) + "E\n", re.S)


class Transfer:
    """One curl transfer running in the background (``curl -o /dev/null``, or piped to sha256sum)."""

    def __init__(self, url: str, timeout: float = 600.0, verify: bool = False, headers: Sequence[str] = (),
                 gate: int | None = None) -> None:
        """``gate``: the read end of a pipe; curl starts only once a line can be read from it
        (so that many transfers, spawned one by one, begin together)."""
        self.url = url
        self.verify = verify
        cmd = [tool("curl"), "-sS", "--noproxy", "*", "--max-time", str(int(timeout)), "-H", "Expect:"]
        for h in headers:
            cmd += ["-H", h]
        self.hasher: subprocess.Popen[bytes] | None = None
        self.t0 = time.monotonic()
        prefix: list[str] = []
        if gate is not None:
            # sh's read builtin consumes exactly one line of a pipe; EOF (the parent gave up) means no transfer
            prefix = ["sh", "-c", f'read _ <&{gate} || exit 99; exec "$@"', "gated-curl"]
        fds = (gate,) if gate is not None else ()
        if verify:
            cmd += ["-o", "-", "-w", "%{stderr}" + CURL_WRITEOUT, url]
            self.proc = subprocess.Popen(prefix + cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         stdin=subprocess.DEVNULL, env=clean_env(), preexec_fn=_die_with_parent,
                                         pass_fds=fds)
            self.hasher = subprocess.Popen(["sha256sum"], stdin=self.proc.stdout, stdout=subprocess.PIPE,
                                           env=clean_env(), preexec_fn=_die_with_parent)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        else:
            cmd += ["-o", "/dev/null", "-w", CURL_WRITEOUT, url]
            self.proc = subprocess.Popen(prefix + cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         stdin=subprocess.DEVNULL, env=clean_env(), preexec_fn=_die_with_parent,
                                         pass_fds=fds)

    def wait(self) -> dict[str, Any]:
        if self.verify:
            assert self.hasher is not None and self.proc.stderr is not None
            err = self.proc.stderr.read().decode(errors="replace")
            self.proc.wait()
            digest = self.hasher.communicate()[0].decode().split()[0] if self.hasher else None
            text = err
        else:
            out, errb = self.proc.communicate()
            text = out.decode(errors="replace") + "\n" + errb.decode(errors="replace")
            digest = None
        wall = time.monotonic() - self.t0
        info: dict[str, Any] = {}
        headers: dict[str, Any] = {}
        m = _WRITEOUT_RE.search(text)
        if m:
            info = json.loads(m.group(1))
            headers = json.loads(m.group(2))
            text = text[:m.start()] + text[m.end():]
        errors = [line.strip() for line in text.splitlines() if line.strip()]
        xc = headers.get("x-cache") or [None]
        return {
            "url": self.url,
            "exit": self.proc.returncode,
            "http_code": info.get("http_code"),
            "size": info.get("size_download"),
            "speed": info.get("speed_download"),  # bytes/s, whole transfer
            "ttfb": info.get("time_starttransfer"),
            "total": info.get("time_total"),
            "wall": wall,
            "x_cache": xc[0] if isinstance(xc, list) else xc,
            "sha256": digest,
            "errors": errors[:5],
        }

    def kill(self) -> None:
        for p in (self.proc, self.hasher):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def curl(url: str, timeout: float = 600.0, verify: bool = False, headers: Sequence[str] = ()) -> dict[str, Any]:
    t = Transfer(url, timeout, verify, headers)
    try:
        return t.wait()
    finally:
        t.kill()


def check_transfer(r: dict[str, Any], size: int, *, sha256: str | None = None, x_cache: str | None = None,
                   what: str = "") -> None:
    """Raise BenchError unless the transfer was a complete 200 (with the right bytes/X-Cache)."""
    problems = []
    if r["exit"] != 0:
        problems.append(f"curl exit {r['exit']} {r['errors']}")
    if r["http_code"] != 200:
        problems.append(f"HTTP {r['http_code']}")
    if r["size"] != size:
        problems.append(f"{r['size']} bytes, expected {size}")
    if sha256 is not None and r["sha256"] != sha256:
        problems.append(f"sha256 {r['sha256']}, expected {sha256}")
    if x_cache is not None and r["x_cache"] != x_cache:
        problems.append(f"X-Cache {r['x_cache']}, expected {x_cache}")
    if problems:
        raise BenchError(f"{what or r['url']}: " + "; ".join(problems))


def herd_problems(herd: Sequence[dict[str, Any]], size: int, sha256: str) -> list[str]:
    """What is wrong with each transfer of a herd (``check_transfer``'s messages,
    one a client); the clients that kept their body are checked against ``sha256``."""
    bad = []
    for i, r in enumerate(herd):
        try:
            check_transfer(r, size, sha256=sha256 if r["sha256"] is not None else None, what=f"client {i}")
        except BenchError as e:
            bad.append(str(e))
    return bad


def run_parallel(urls: Sequence[str], timeout: float = 600.0, verify: Sequence[bool] | None = None) -> tuple[float, list[dict[str, Any]]]:
    """One curl per URL, all released at the same instant; (wall seconds from release until the last exits, results).

    Every curl is spawned first, waiting on a shared pipe; then one line per
    transfer is written to the pipe, so spawning 64 processes does not stagger
    the start. Each result's ``spawn_s`` says how long the spawning took (not timed).
    """
    verify = verify or [False] * len(urls)
    r_fd, w_fd = os.pipe()
    transfers: list[Transfer] = []
    try:
        s0 = time.monotonic()
        try:
            transfers = [Transfer(u, timeout, v, gate=r_fd) for u, v in zip(urls, verify)]
        finally:
            os.close(r_fd)
        spawned = time.monotonic() - s0
        t0 = time.monotonic()
        os.write(w_fd, b"\n" * len(transfers))
        os.close(w_fd)
        w_fd = -1
        for t in transfers:
            t.t0 = t0
        results = [t.wait() for t in transfers]
        wall = time.monotonic() - t0
    finally:
        if w_fd >= 0:
            os.close(w_fd)
        for t in transfers:
            t.kill()
    for r in results:
        r["spawn_s"] = spawned
    return wall, results


class Sampler:
    """Polls a function in a thread every ``interval`` seconds; keeps every sample."""

    def __init__(self, fn: Callable[[], dict[str, int]], interval: float = 0.05) -> None:
        self.fn = fn
        self.interval = interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - self.t0, self.fn()))
            except (OSError, ValueError):
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def peak(self, key: str) -> int:
        return max((s[key] for _t, s in self.samples if key in s), default=0)


# -- wrk --------------------------------------------------------------------------------------------

WRK_LUA = r"""
-- generated by bench/common.py: rotate over {count} paths, report JSON at the end
local paths = {paths}
local reqs = {{}}
local idx = 0
init = function(args)
  for i, p in ipairs(paths) do reqs[i] = wrk.format("GET", p) end
  -- each thread starts at its own offset so threads do not march in step
  idx = math.random(#reqs) - 1
end
request = function()
  idx = idx % #reqs + 1
  return reqs[idx]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "lat_mean_us": %.1f, "lat_p50_us": %d, ' ..
    '"lat_p90_us": %d, "lat_p99_us": %d, "lat_max_us": %d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def write_wrk_script(path: Path, paths: Sequence[str]) -> Path:
    lua_list = "{" + ", ".join(json.dumps(p) for p in paths) + "}"
    path.write_text(WRK_LUA.format(count=len(paths), paths=lua_list))
    return path


def run_wrk(base_url: str, script: Path, connections: int, duration: float, threads: int,
            timeout_s: int = 10) -> dict[str, Any]:
    cmd = [tool("wrk"), f"-t{threads}", f"-c{connections}", f"-d{int(round(duration))}s", f"--timeout={timeout_s}s",
           "-s", str(script), base_url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, env=clean_env())
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            r = json.loads(line[len("WRKJSON "):])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
            r["errors"] = sum(r[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
            r["cmd"] = " ".join(cmd)
            return r
    raise BenchError(f"wrk gave no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")
