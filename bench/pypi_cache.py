#!/usr/bin/env python3
"""PyPI pull-through: sparkcache (``type: pypi``) versus devpi-server and proxpi, side by side.

All three caches mirror the same upstream, the index this machine's pip is
configured with (``pip config get global.index-url``, else pip's built-in
default; its host is masked in everything printed). The clients install the
same pinned set of 38 real distributions (36 pure-Python wheels and 2 sdists
built with build isolation, so the build backend is fetched through the cache
too), dependencies resolved:

* ``pip install --isolated --no-cache-dir --target <tmp> --index-url <cache>``
  with ``PIP_*`` removed from the environment and ``PIP_CONFIG_FILE=/dev/null``
  (this machine's pip config adds find-links and extra indexes);
* ``uv pip install --no-config --no-cache --target <tmp> --index-url <cache>``
  (``--clients pip,uv``; uv is the one next to this Python, if present).

Phases, per client: *cold* (every cache emptied and restarted, one install),
*warm* (cache filled, client cache empty; median of ``--runs``), *warm x4*
(4 installs released together; median of ``--runs``). Per cache: wall time,
CPU seconds of the cache's process tree (/proc utime+stime before and after)
and peak RSS (VmHWM of the tree over the whole run).

References (installed on first use into their own virtualenv, ``--anchors-venv``):
devpi-server (``devpi-init`` then ``devpi-server``; its ``root/pypi`` index is
re-created as a mirror of the upstream through devpi's REST API) and proxpi
(gunicorn, 1 worker, 8 threads, ``PROXPI_INDEX_URL`` = the upstream). All
three keep index pages fresh for ``--index-ttl`` (30 minutes: proxpi's and
devpi's default, sparkcache's ``cache.mutable_ttl``), so the warm phases
measure serving from the cache even when a busy machine stretches the run.

Goals (issue 9): warm wall <= 1.0x the best reference; cache CPU <= 0.5x
proxpi's; peak RSS <= 150 MiB.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from common import LOOPBACK, Bench, BenchError, apply_quick, base_parser, run_main
from registry_common import (CA_BUNDLE, add_phase_args, Server, SparkcacheServer, mask, pypi_upstream, report,
                             run_matrix, scrubbed_env, write_results)

NAME = "pypi_cache"
DEFAULT_ANCHORS_VENV = "/tmp/sparkbench-anchors/pypi"
CLIENT_TIMEOUT = 120  # seconds a client waits for one response

# 36 pure-Python wheels and 2 sdists (docopt, sgmllib3k); the dependency closure is pinned too.
REQUIREMENTS = """\
anyio==4.6.0
attrs==24.2.0
beautifulsoup4==4.12.3
blinker==1.8.2
certifi==2024.8.30
click==8.1.7
decorator==5.1.1
distlib==0.3.8
docopt==0.6.2
docutils==0.21.2
filelock==3.16.1
h11==0.14.0
idna==3.10
importlib-metadata==8.5.0
iniconfig==2.0.0
itsdangerous==2.2.0
more-itertools==10.5.0
packaging==24.1
platformdirs==4.3.6
pluggy==1.5.0
pygments==2.18.0
pyparsing==3.1.4
pytest==8.3.3
python-dateutil==2.9.0.post0
pytz==2024.2
sgmllib3k==1.0.0
six==1.16.0
sniffio==1.3.1
soupsieve==2.6
tabulate==0.9.0
toml==0.10.2
tomli==2.0.2
typing-extensions==4.12.2
tzdata==2024.2
urllib3==2.2.3
wcwidth==0.2.13
wheel==0.44.0
zipp==3.20.2
"""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


PINNED = {normalize(line.split("==")[0]): line.split("==")[1] for line in REQUIREMENTS.split()}


def anchors_venv(path: Path, log: Any) -> Path:
    """A virtualenv with devpi-server, proxpi and gunicorn (created once, reused)."""
    py = path / "bin" / "python"
    if (path / "bin" / "devpi-server").exists() and (path / "bin" / "gunicorn").exists():
        return path
    log(f"installing devpi-server, proxpi and gunicorn into {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    out = subprocess.run([str(py), "-m", "pip", "install", "-q", "devpi-server", "proxpi", "gunicorn"],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise BenchError(f"installing the references failed: {mask(out.stderr[-1500:])}")
    return path


def anchor_env(extra: dict[str, str]) -> dict[str, str]:
    env = scrubbed_env(extra)
    if os.path.exists(CA_BUNDLE):  # the machine's CA store, as pip (PIP_CERT) and curl use here
        env.update({"SSL_CERT_FILE": CA_BUNDLE, "REQUESTS_CA_BUNDLE": CA_BUNDLE})
    return env


class Devpi(Server):
    name = "devpi"
    PASSWORD = "bench"

    def __init__(self, bench: Bench, venv: Path, upstream: str, index_ttl: float) -> None:
        super().__init__(bench)
        self.venv = venv
        self.upstream = upstream
        self.index_ttl = index_ttl
        self.version = _pkg_version(venv, "devpi-server")

    def prepare(self) -> None:
        data = self.dir / "data"
        if not (data / ".serverversion").exists():
            out = subprocess.run([str(self.venv / "bin" / "devpi-init"), "--serverdir", str(data), "--no-root-pypi",
                                  "--root-passwd", self.PASSWORD], capture_output=True, text=True, timeout=120,
                                 env=anchor_env({}))
            if out.returncode != 0:
                raise BenchError(f"devpi-init failed: {mask(out.stdout + out.stderr)[-1500:]}")

    def command(self) -> tuple[list[str], dict[str, str]]:
        return ([str(self.venv / "bin" / "devpi-server"), "--serverdir", str(self.dir / "data"), "--host", LOOPBACK,
                 "--port", str(self.port), "--mirror-cache-expiry", str(int(self.index_ttl))], anchor_env({}))

    def ready_path(self) -> str:
        return "/+api"

    def _call(self, method: str, path: str, body: dict[str, Any], auth: str | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["X-Devpi-Auth"] = auth
        req = urllib.request.Request(f"http://{LOOPBACK}:{self.port}{path}", data=json.dumps(body).encode(),
                                     headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return dict(json.loads(r.read() or b"{}"))
        except urllib.error.HTTPError as e:
            raise BenchError(f"devpi {method} {path}: {e.code} {mask(e.read()[:300])!r}") from None

    def configure(self) -> None:
        """root/pypi as a mirror of the upstream read at run time (devpi's default names a fixed host)."""
        token = self._call("POST", "/+login", {"user": "root", "password": self.PASSWORD})["result"]["password"]
        auth = base64.b64encode(f"root:{token}".encode()).decode()
        try:
            self._call("PUT", "/root/pypi", {"type": "mirror", "mirror_url": self.upstream + "/"}, auth)
        except BenchError as e:
            if "409" not in str(e):  # exists already after a restart on the same data
                raise

    def index_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/root/pypi/+simple/"


class Proxpi(Server):
    name = "proxpi"

    def __init__(self, bench: Bench, venv: Path, upstream: str, index_ttl: float, threads: int) -> None:
        super().__init__(bench)
        self.venv = venv
        self.upstream = upstream
        self.index_ttl = index_ttl
        self.threads = threads
        self.version = _pkg_version(venv, "proxpi")

    def prepare(self) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)

    def command(self) -> tuple[list[str], dict[str, str]]:
        return ([str(self.venv / "bin" / "gunicorn"), "--bind", f"{LOOPBACK}:{self.port}", "--workers", "1",
                 "--threads", str(self.threads), "--log-level", "warning", "proxpi.server:app"],
                anchor_env({"PROXPI_INDEX_URL": self.upstream + "/", "PROXPI_CACHE_DIR": str(self.dir / "data"),
                            "PROXPI_INDEX_TTL": str(int(self.index_ttl)), "PROXPI_LOGGING_LEVEL": "WARNING"}))

    def ready_path(self) -> str:
        return "/health"

    def index_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/index/"


def _pkg_version(venv: Path, dist: str) -> str:
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          f"import importlib.metadata as m; print(m.version({dist!r}))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


# -- clients -----------------------------------------------------------------------------------------------


def uv_path() -> str | None:
    cand = Path(sys.executable).parent / "uv"
    return str(cand) if cand.exists() else shutil.which("uv")


def client_specs(bench: Bench, client: str, server: Server, n: int,
                 req: Path) -> list[tuple[list[str], Path, dict[str, str]]]:
    specs = []
    for i in range(n):
        cwd = bench.path("clients", f"{server.name}-{i}")
        shutil.rmtree(cwd, ignore_errors=True)
        cwd.mkdir(parents=True)
        # a generous read timeout (pip's default is 15 s, uv's 30 s): a cold devpi answers its first
        # page only after it has fetched the upstream's whole project list, slower on a busy machine
        env = scrubbed_env({"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1", "UV_HTTP_TIMEOUT": str(CLIENT_TIMEOUT)})
        if client == "pip":
            cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check",
                   "--no-cache-dir", "--progress-bar", "off", "--timeout", str(CLIENT_TIMEOUT),
                   "--target", str(cwd / "target"),
                   "--index-url", server.index_url(), "--report", str(cwd / "report.json"), "-r", str(req)]
        else:
            uv = uv_path()
            assert uv is not None
            cmd = [uv, "pip", "install", "--no-config", "--no-cache", "--python", sys.executable,
                   "--target", str(cwd / "target"), "--index-url", server.index_url(), "-r", str(req)]
        specs.append((cmd, cwd, env))
    return specs


_DIST_INFO = re.compile(r"^(.+)-([^-]+)\.dist-info$")


def check_install(server: Server, dirs: list[Path], seen: dict[str, Any]) -> dict[str, Any]:
    """Every pinned distribution installed at its pinned version; downloads went through the cache."""
    via_cache = downloads = 0
    for d in dirs:
        got = {}
        for p in (d / "target").iterdir():
            m = _DIST_INFO.match(p.name)
            if m:
                got[normalize(m.group(1))] = m.group(2)
        if got != PINNED:
            missing = {k: v for k, v in PINNED.items() if got.get(k) != v}
            extra = {k: v for k, v in got.items() if k not in PINNED}
            raise BenchError(f"{server.name}: installed set differs: missing/wrong {missing}, extra {extra}")
        report = d / "report.json"
        if report.exists():
            for item in json.loads(report.read_text())["install"]:
                downloads += 1
                via_cache += item["download_info"]["url"].startswith(f"http://{LOOPBACK}:{server.port}/")
    if downloads:
        seen.setdefault("via_cache", {})[server.name] = f"{via_cache}/{downloads}"
    return {"installed": len(PINNED), "downloads": downloads, "downloads_via_cache": via_cache}


# -- the scenario -----------------------------------------------------------------------------------------


def main() -> int:
    p = base_parser(__doc__ or NAME, "(1 run per warm phase, pip only)")
    add_phase_args(p)
    p.add_argument("--clients", default=None, help="pip,uv (default: both when uv is present; --quick pip)")
    p.add_argument("--caches", default="sparkcache,devpi,proxpi", help="subset of sparkcache,devpi,proxpi")
    p.add_argument("--anchors-venv", default=DEFAULT_ANCHORS_VENV,
                   help="virtualenv holding devpi-server, proxpi and gunicorn (created when missing)")
    p.add_argument("--client-timeout", type=float, default=600.0, help="seconds allowed per client run")
    args = p.parse_args()
    apply_quick(args, {"runs": 1, "clients": "pip"},
                {"runs": 3, "clients": "pip,uv" if uv_path() else "pip"})
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    for c in clients:
        if c not in ("pip", "uv") or (c == "uv" and not uv_path()):
            p.error(f"client {c!r}: pip or uv (uv must be installed)")

    with Bench(NAME, args) as b:
        upstream = pypi_upstream()
        b.log(f"upstream (from pip's configuration): {mask(upstream)}")
        venv = anchors_venv(Path(args.anchors_venv), b.log)
        req = b.path("requirements.txt")
        req.write_text(REQUIREMENTS)
        make = {"sparkcache": lambda: SparkcacheServer(b, "pypi", upstream, "/pypi/{remote}/simple/", args.index_ttl),
                "devpi": lambda: Devpi(b, venv, upstream, args.index_ttl),
                "proxpi": lambda: Proxpi(b, venv, upstream, args.index_ttl, threads=8)}
        servers = [make[c]() for c in caches]
        seen: dict[str, Any] = {}
        results: dict[str, Any] = {}
        rounds = (args.runs, args.parallel_runs or args.runs)
        for client in clients:
            results[client] = run_matrix(
                b, client, servers, rounds, args.parallel, args.client_timeout,
                lambda s, n: client_specs(b, client, s, n, req), lambda s, dirs: check_install(s, dirs, seen))
        for s in servers:
            s.stop()
        checks: dict[str, Any] = {"downloads_via_cache": seen.get("via_cache", {})}
        summary = report(b, NAME, f"{len(PINNED)} pinned distributions", rounds, clients, servers, results,
                         cpu_reference="proxpi")
        if seen.get("via_cache"):
            b.log("pip downloads whose URL pointed at the cache (all runs): " +
                  ", ".join(f"{k} {v}" for k, v in seen["via_cache"].items()))
        write_results(b, {"distributions": len(PINNED), "requirements": REQUIREMENTS.split(), "runs": args.runs,
                          "parallel": args.parallel, "parallel_runs": args.parallel_runs or args.runs,
                          "index_ttl": args.index_ttl, "clients": clients, "upstream": mask(upstream)},
                      servers, results, summary, checks)
        return 0


if __name__ == "__main__":
    run_main(main)
