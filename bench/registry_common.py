"""Shared helpers for the package-registry benchmarks (bench/pypi_cache.py, bench/npm_cache.py).

Those two scenarios put sparkcache and reference caches (devpi-server and
proxpi for PyPI, Verdaccio for npm) side by side, each a pull-through of the
same upstream: the registry this machine's own pip / npm configuration names,
read at run time. Its host name is never written anywhere: every line these
scripts print or store goes through :func:`mask` first.

What is measured per cache and phase: the wall time of the client run(s), the
CPU seconds of the cache's process tree (utime+stime from /proc before and
after) and its peak RSS (VmHWM, summed over the tree).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from common import (LOOPBACK, REPO, MiB, Bench, BenchError, Daemon, _descendants, _die_with_parent, _stop_process,
                    clean_env, free_port, median, print_summary, print_table, summary_row, wait_port)

CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
_MASKED: set[str] = set()


# -- the upstream, read from the clients' own configuration, never written down --------------------------


def _remember(url: str) -> str:
    host = urlsplit(url).hostname
    if host and host not in (LOOPBACK, "localhost"):
        _MASKED.add(host)
    return url


def pypi_upstream() -> str:
    """pip's index: ``pip config get global.index-url`` if set, else pip's built-in default."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                         capture_output=True, text=True, timeout=60, env=clean_env())
    url = out.stdout.strip() if out.returncode == 0 else ""
    if not url:
        from pip._internal.models.index import PyPI
        url = PyPI.simple_url
    return _remember(url.rstrip("/"))


def npm_upstream() -> str:
    """npm's registry: ``npm config get registry`` (with a trailing slash)."""
    out = subprocess.run(["npm", "config", "get", "registry"], capture_output=True, text=True, timeout=60,
                         env=scrubbed_env())
    url = out.stdout.strip()
    if out.returncode != 0 or not url.startswith("http"):
        raise BenchError(f"npm config get registry gave {mask(out.stdout + out.stderr)!r}")
    return _remember(url.rstrip("/") + "/")


def mask(text: Any) -> Any:
    """Replace the upstream host names in ``text`` (recursively in lists and dicts) by ``<upstream>``."""
    if isinstance(text, str):
        for host in _MASKED:
            text = text.replace(host, "<upstream>")
        return text
    if isinstance(text, list):
        return [mask(x) for x in text]
    if isinstance(text, tuple):
        return tuple(mask(x) for x in text)
    if isinstance(text, dict):
        return {mask(k): mask(v) for k, v in text.items()}
    return text


def scrubbed_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """No proxies, no SPARKCACHE_*, and no pip/uv/npm settings from the caller's environment."""
    env = {k: v for k, v in clean_env().items()
           if not re.match(r"(PIP_|UV_|npm_config_|NPM_CONFIG_|PYTHONPATH$|VIRTUAL_ENV$)", k, re.I)}
    env.update(extra or {})
    return env


# -- a cache server: any process tree on a loopback port --------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    return [pid, *_descendants(pid)]


def tree_cpu(pid: int) -> float:
    """utime+stime (plus reaped children's) of a process and its live descendants, in seconds."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])
        except (OSError, IndexError, ValueError):
            pass
    return total / tck


def tree_hwm(pid: int) -> int:
    """Peak RSS (VmHWM) summed over a process and its live descendants, in bytes."""
    total = 0
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
    return total


class Server:
    """One cache under test. Subclasses say how to start it empty; this class runs and measures it."""

    name = "server"

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.dir = bench.path(self.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss = 0
        self.version = ""
        bench.on_cleanup(self.stop)

    # subclasses
    def prepare(self) -> None:
        """Create an empty data directory and configuration (before each start)."""

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def configure(self) -> None:
        """After the port answers: any set-up over HTTP."""

    def index_url(self) -> str:
        """What the client is pointed at."""
        raise NotImplementedError

    def ready_path(self) -> str:
        return "/"

    # common
    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def start(self, timeout: float = 90.0) -> None:
        self.prepare()
        cmd, env = self.command()
        log = open(self.dir / "server.log", "ab")
        try:
            self.proc = subprocess.Popen(cmd, cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        finally:
            log.close()
        wait_port(self.port, timeout, lambda: self.proc is not None and self.proc.poll() is None)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://{LOOPBACK}:{self.port}{self.ready_path()}", timeout=5) as r:
                    r.read()
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} not ready after {timeout}s: {e}\n{self.log_tail()}") from None
                time.sleep(0.2)
        self.configure()

    def fresh_start(self) -> None:
        """Stopped, data removed, started again: certainly cold."""
        self.stop()
        shutil.rmtree(self.dir / "data", ignore_errors=True)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.sample()
            proc, self.proc = self.proc, None
            # the whole tree: gunicorn workers, node children of a wrapper
            pids = tree_pids(proc.pid)
            _stop_process(proc, signal.SIGTERM, 20)
            for p in pids[1:]:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass

    def cpu(self) -> float:
        return tree_cpu(self.pid)

    def counters(self) -> dict[str, int]:
        """Responses so far by kind and result, where the cache tells (sparkcache's /metrics)."""
        return {}

    def sample(self) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.peak_rss = max(self.peak_rss, tree_hwm(self.proc.pid))
        return self.peak_rss

    def log_tail(self, n: int = 40) -> str:
        p = self.dir / "server.log"
        return mask("\n".join(p.read_text(errors="replace").splitlines()[-n:])) if p.exists() else ""


class SparkcacheServer(Server):
    """The daemon of this checkout (bench/common.py's Daemon) with one remote of the given type."""

    name = "sparkcache"

    def __init__(self, bench: Bench, remote_type: str, upstream: str, index_path: str, index_ttl: float,
                 remote: str = "up") -> None:
        """``index_path``: what clients are pointed at, with ``{remote}`` for the remote's name;
        ``index_ttl``: the remote's ``cache.mutable_ttl`` (pages, packuments), as the references are given."""
        super().__init__(bench)
        self.remote_type = remote_type
        self.remote = remote
        self.index_path = index_path.format(remote=remote)
        self.daemon = Daemon(bench, {remote: {"type": remote_type, "upstream": upstream,
                                              "cache": {"mutable_ttl": index_ttl}}}, name="sparkcache-daemon")
        self.port = self.daemon.port
        self.version = bench_commit()

    def index_url(self) -> str:
        return self.daemon.url(self.index_path)

    def start(self, timeout: float = 60.0) -> None:
        env_ca = {"SSL_CERT_FILE": CA_BUNDLE} if os.path.exists(CA_BUNDLE) else {}
        os.environ.update(env_ca)  # Daemon passes our environment on (minus proxies)
        self.daemon.start(timeout)
        self.proc = self.daemon.proc

    def fresh_start(self) -> None:
        self.stop()
        shutil.rmtree(self.daemon.data_dir, ignore_errors=True)
        self.start()

    def stop(self) -> None:
        if self.daemon.proc is not None:
            self.sample()
            self.daemon.stop()
        self.proc = None

    def log_tail(self, n: int = 40) -> str:
        return mask(self.daemon.log_tail(n))

    def counters(self) -> dict[str, int]:
        """sparkcache_registry_requests by form and result ("page hit": 38, ...)."""
        out: dict[str, int] = {}
        for k, v in self.daemon.metrics().items():
            m = re.match(r'sparkcache_registry_requests(?:_total)?\{(.*)\}$', k)
            if m:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
                key = f"{labels.get('form')} {labels.get('result')}"
                out[key] = out.get(key, 0) + int(v)
        return out

    def problems(self) -> list[str]:
        return mask(self.daemon.log_problems()[:20])


# -- clients, released together ------------------------------------------------------------------------


class ClientRun:
    """One client process (its own empty target and cache dirs), started when a gate line arrives."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str], gate: int, timeout: float) -> None:
        self.cmd = cmd
        self.timeout = timeout
        self.log = cwd / "client.log"
        out = open(self.log, "wb")
        try:
            self.proc = subprocess.Popen(["sh", "-c", f'read _ <&{gate} || exit 99; exec "$@"', "gated", *cmd],
                                         cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, pass_fds=(gate,))
        finally:
            out.close()
        self.seconds = 0.0


def run_clients(specs: Sequence[tuple[list[str], Path, dict[str, str]]], timeout: float,
                sample: Callable[[], Any]) -> list[ClientRun]:
    """Start every client gated, release them at once, wait for all; each run's ``seconds`` is set.

    ``sample`` is called about every 0.2 s meanwhile (to follow the server's RSS)."""
    r_fd, w_fd = os.pipe()
    runs: list[ClientRun] = []
    try:
        try:
            runs = [ClientRun(cmd, cwd, env, r_fd, timeout) for cmd, cwd, env in specs]
        finally:
            os.close(r_fd)
        t0 = time.monotonic()
        os.write(w_fd, b"\n" * len(runs))
        os.close(w_fd)
        w_fd = -1
        pending = list(runs)
        while pending:
            for r in list(pending):
                if r.proc.poll() is not None:
                    r.seconds = time.monotonic() - t0
                    pending.remove(r)
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"{len(pending)} client(s) still running after {timeout:.0f}s: "
                                 f"{mask(' '.join(pending[0].cmd))}")
            sample()
            time.sleep(0.05)
    finally:
        if w_fd >= 0:
            os.close(w_fd)
        for r in runs:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()
    failed = [r for r in runs if r.proc.returncode != 0]
    if failed:
        tail = "\n".join(failed[0].log.read_text(errors="replace").splitlines()[-25:])
        raise BenchError(f"{len(failed)} of {len(runs)} client(s) failed (exit {failed[0].proc.returncode}): "
                         f"{mask(' '.join(failed[0].cmd))}\n{mask(tail)}")
    return runs


# -- phases and the report ------------------------------------------------------------------------------


PHASES = ("cold", "warm", "warm x4")


def add_phase_args(p: argparse.ArgumentParser) -> None:
    """The options both registry scenarios take for their phases."""
    p.add_argument("--runs", type=int, default=None, help="runs of each warm phase (median reported; default 3)")
    p.add_argument("--parallel", type=int, default=4, help="clients released together in the parallel phase")
    p.add_argument("--parallel-runs", type=int, default=None, help="runs of the parallel phase (default: --runs)")
    p.add_argument("--index-ttl", type=float, default=1800.0,
                   help="seconds every cache keeps pages/packuments fresh (sparkcache's cache.mutable_ttl and the "
                        "references' equivalent; 1800 = proxpi's and devpi's default)")


PARALLEL_LABEL = 4  # the parallel phase is named "warm x4" whatever --parallel says


def measure(server: Server, make_specs: Callable[[int], list[tuple[list[str], Path, dict[str, str]]]],
            n: int, timeout: float, check: Callable[[list[Path]], dict[str, Any]]) -> dict[str, Any]:
    """One timed run of ``n`` clients against ``server``: wall, the server's CPU, the checks' facts."""
    specs = make_specs(n)
    counts0 = server.counters()
    cpu0 = server.cpu()
    runs = run_clients(specs, timeout, server.sample)
    cpu = server.cpu() - cpu0
    server.sample()
    facts = check([cwd for _cmd, cwd, _env in specs])
    counts = {k: v - counts0.get(k, 0) for k, v in server.counters().items() if v - counts0.get(k, 0)}
    if counts:
        facts["responses"] = counts
    for _cmd, cwd, _env in specs:
        shutil.rmtree(cwd, ignore_errors=True)
    return {"seconds": max(r.seconds for r in runs), "client_seconds": [round(r.seconds, 3) for r in runs],
            "server_cpu_seconds": round(cpu, 3), "server_peak_rss_so_far": tree_hwm(server.pid), **facts}


FAILURES: dict[str, str] = {}  # "client cache" -> why that cache was left out for that client


def run_matrix(bench: Bench, client: str, servers: list[Server], runs: tuple[int, int], parallel: int, timeout: float,
               make_specs: Callable[[Server, int], list[tuple[list[str], Path, dict[str, str]]]],
               check: Callable[[Server, list[Path]], dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """cold (each cache emptied and restarted, one run), then ``runs[0]`` warm single runs, then ``runs[1]``
    warm runs of ``parallel`` clients; the caches alternate within every round.

    A reference cache whose client run fails is reported (FAILURES) and left out for this client
    from then on; a sparkcache failure aborts the scenario."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {s.name: {p: [] for p in PHASES} for s in servers}
    live = list(servers)

    def one(s: Server, phase: str, n: int) -> dict[str, Any] | None:
        try:
            return measure(s, lambda k: make_specs(s, k), n, timeout, lambda d: check(s, d))
        except BenchError as e:
            if isinstance(s, SparkcacheServer):
                raise BenchError(f"sparkcache, {client} {phase}: {e}\n--- daemon log ---\n{s.log_tail()}") from None
            FAILURES[f"{client} {s.name}"] = f"{phase}: {str(e)[-600:]}"
            bench.log(f"{client} {phase} {s.name} FAILED, left out for {client}: {str(e)[-600:]}")
            live.remove(s)
            out.pop(s.name, None)
            return None

    for s in list(live):
        s.fresh_start()
        r = one(s, "cold", 1)
        if r is not None:
            out[s.name]["cold"].append(r)
            bench.log(f"{client} cold {s.name}: {r['seconds']:.2f}s, cache CPU {r['server_cpu_seconds']:.2f}s, "
                      f"peak RSS {fmt_mib(r['server_peak_rss_so_far'])} MiB")
    for (phase, n), rounds in zip((("warm", 1), ("warm x4", parallel)), runs):
        for i in range(rounds):
            for s in list(live):
                r = one(s, phase, n)
                if r is not None:
                    out[s.name][phase].append(r)
                    bench.log(f"{client} {phase} #{i + 1} {s.name}: {r['seconds']:.2f}s, cache CPU "
                              f"{r['server_cpu_seconds']:.2f}s, peak RSS {fmt_mib(r['server_peak_rss_so_far'])} MiB")
    return out


def med(results: dict[str, dict[str, list[dict[str, Any]]]], server: str, phase: str,
        key: str = "seconds") -> float | None:
    xs = results.get(server, {}).get(phase) or []
    return median(x[key] for x in xs) if xs else None


def fmt_mib(n: int) -> str:
    return f"{n / MiB:.1f}"


def bench_commit() -> str:
    """The checkout measured (the daemon runs from this working tree)."""
    out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip()


def report(b: Bench, name: str, what: str, runs: tuple[int, int], clients: list[str], servers: list[Server],
           results: dict[str, Any], cpu_reference: str | None) -> list[dict[str, Any]]:
    """Print the per-phase table, the peak RSS table and the summary against the goals; return the summary."""
    names = [s.name for s in servers]
    anchors = [n for n in names if n != "sparkcache"]
    rows = []
    for client in clients:
        for phase in PHASES:
            for n in [n for n in names if n in results[client]]:
                rs = results[client][n][phase]
                rows.append([client, phase, n, f"{med(results[client], n, phase):.2f}",
                             f"{min(r['seconds'] for r in rs):.2f}-{max(r['seconds'] for r in rs):.2f}",
                             f"{med(results[client], n, phase, 'server_cpu_seconds'):.2f}", len(rs)])
    print_table(f"{name}: {what}, median wall and cache CPU per phase",
                ["client", "phase", "cache", "wall s", "range", "cache CPU s", "runs"], rows, left=3)
    for client in clients:
        for phase in PHASES:
            for r in results[client].get("sparkcache", {}).get(phase, [])[:1]:
                if r.get("responses"):
                    b.log(f"sparkcache responses, {client} {phase} (first run): " +
                          ", ".join(f"{k} {v}" for k, v in sorted(r["responses"].items())))
    print_table(f"{name}: peak RSS of each cache (VmHWM of its process tree, whole run)",
                ["cache", "version", "peak RSS MiB"], [[s.name, s.version, fmt_mib(s.peak_rss)] for s in servers])

    summary: list[dict[str, Any]] = []
    sc = next((s for s in servers if s.name == "sparkcache"), None)
    if sc is None or not anchors:
        return summary
    for client in clients:
        res = results[client]
        if "sparkcache" not in res or not [a for a in anchors if a in res]:
            continue
        for phase in PHASES:
            best = min([a for a in anchors if a in res], key=lambda a: med(res, a, phase) or 1e9)
            s, r = med(res, "sparkcache", phase), med(res, best, phase)
            goal = phase != "cold"
            summary.append(summary_row(f"{client} {phase} wall", "s", s, best, r, "<= 1.0x" if goal else "-",
                                       (s <= r) if goal and s is not None and r is not None else None))
        for a in [a for a in anchors if a in res]:
            for phase in PHASES:
                s, r = med(res, "sparkcache", phase, "server_cpu_seconds"), med(res, a, phase, "server_cpu_seconds")
                goal = a == cpu_reference and phase != "cold"
                summary.append(summary_row(f"{client} {phase} cache CPU", "s", s, a, r, "<= 0.5x" if goal else "-",
                                           (s <= 0.5 * r) if goal and s is not None and r else None))
    best_rss = min((x for x in servers if x.name != "sparkcache"), key=lambda x: x.peak_rss)
    summary.append(summary_row("peak RSS", "MiB", sc.peak_rss / MiB, best_rss.name, best_rss.peak_rss / MiB,
                               "<= 150 MiB", sc.peak_rss <= 150 * MiB))
    print_summary(f"{name} summary (medians of {runs[0]} warm and {runs[1]} warm x{PARALLEL_LABEL} runs; "
                  "ratio = sparkcache / reference)", summary)
    for k, v in FAILURES.items():
        print(f"FAILED and left out: {k}: {v}")
    return summary


def write_results(b: Bench, params: dict[str, Any], servers: list[Server], results: dict[str, Any],
                  summary: list[dict[str, Any]], checks: dict[str, Any]) -> None:
    sc = next((s for s in servers if isinstance(s, SparkcacheServer)), None)
    checks = {**checks, "failures": dict(FAILURES)}
    if sc is not None:
        checks = {**checks, "daemon_exit_status": sc.daemon.exit_status, "daemon_log_problems": sc.problems()}
    b.write_results(mask({
        "params": {**params, "versions": {s.name: s.version for s in servers}},
        "runs": results,
        "peak_rss_bytes": {s.name: s.peak_rss for s in servers},
        "summary": summary,
        "checks": checks,
    }))
