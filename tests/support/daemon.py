"""Run the real daemon (``twistd -n sparkcache``) as a subprocess for end-to-end tests.

A :class:`Daemon` owns a private directory: its YAML config, its data dir and
its log. ``start()`` waits until ``GET /health`` answers 200 and raises with
the log when the daemon dies or never gets there. The ``daemon_factory``
fixture (see ``tests/conftest.py``) makes daemons and attaches their logs to
the report of any test that fails.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from .client import DEFAULT_TIMEOUT, Response, request

REPO_ROOT = Path(__file__).resolve().parents[2]

# Variables that steer the daemon's config or its HTTP clients: never inherited
# from the environment running the tests, only set explicitly by a test.
_SCRUBBED_PREFIXES = ("SPARKCACHE_",)
_SCRUBBED = {"DATA_DIR", "PORT", "FETCH_INTERVAL", "GITCACHE_REPOS", "SPARKWING_API_TOKEN",  # sparkwing aliases
             "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"}


class DaemonError(AssertionError):
    """The daemon did not start, or did not stop, as expected."""


def project_version() -> str:
    """``sparkcache.__version__`` of the checkout under test, without importing it."""
    text = (REPO_ROOT / "sparkcache" / "__init__.py").read_text()
    m = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.M)
    if m is None:
        raise AssertionError("no __version__ in sparkcache/__init__.py")
    return m.group(1)


def twistd_path() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(candidate):
        return candidate
    found = shutil.which("twistd")
    if found is None:
        raise DaemonError("twistd not found next to the python interpreter nor on PATH")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_workers() -> int:
    """``server.workers`` of a test daemon whose test did not choose: ``SPARKCACHE_TEST_WORKERS``, else 1."""
    return int(os.environ.get("SPARKCACHE_TEST_WORKERS") or 1)


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a daemon or twistd run: clean, with the checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith(_SCRUBBED_PREFIXES)}
    # Run the working tree under test, installed or not: twistd then finds
    # twisted/plugins/sparkcache_plugin.py and the sparkcache package here.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGKILL the daemon if the test process dies, so no orphan keeps running."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def twistd_command(config_path: str | os.PathLike[str], logfile: str | os.PathLike[str] | None = None) -> list[str]:
    cmd = [twistd_path(), "-n", "--pidfile="]
    if logfile is not None:
        cmd.append(f"--logfile={logfile}")
    return cmd + ["sparkcache", "-c", str(config_path)]


class Daemon:
    """One sparkcache daemon in its own directory, on its own port."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        remotes: dict[str, dict[str, Any]] | None = None,
        *,
        auth: dict[str, Any] | None = None,
        server: dict[str, Any] | None = None,
        storage: dict[str, Any] | None = None,
        upstream: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "cache.yaml"
        self.log_path = self.dir / "daemon.log"
        self.out_path = self.dir / "daemon.out"
        self.port = port or free_port()
        self._port_chosen = port is None
        self.remotes = remotes or {}
        self.auth = auth
        self.server = server or {}
        self.storage = storage or {}
        self.upstream = upstream
        self.extra = extra or {}
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # -- config ------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        # One process (not the default, one per core: the suite runs many
        # daemons at once) unless the test chose its own server.workers, or
        # SPARKCACHE_TEST_WORKERS (the both-ways modules, tests/conftest.py) asks for more.
        server: dict[str, Any] = {"listen": [f"tcp:{self.port}:interface=127.0.0.1"], "shutdown_timeout": "10s",
                                  "workers": default_workers()}
        cfg: dict[str, Any] = {
            "server": {**server, **self.server},
            "storage": {"data_dir": str(self.data_dir), **self.storage},
            "remotes": self.remotes,
        }
        if self.auth is not None:
            cfg["auth"] = self.auth
        if self.upstream is not None:
            cfg["upstream"] = self.upstream
        cfg.update(self.extra)
        return cfg

    def write_config(self) -> Path:
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        return self.config_path

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    def spool_files(self) -> list[str]:
        """What the spool holds but the spool files each process keeps made
        for its next misses (``Store.spool``): empty ones, at most
        SPARE_SPOOLS per directory (a process's). A body left behind has
        bytes, and a spool file left empty is one too many."""
        from sparkcache.store import SPARE_SPOOLS

        if not self.spool_dir.is_dir():
            return []
        files = sorted(p for p in self.spool_dir.rglob("*") if not p.is_dir())
        spare: dict[Path, int] = {}
        left = []
        for p in files:
            try:
                empty = p.stat().st_size == 0
            except FileNotFoundError:
                continue
            if empty and p.name.startswith("dl-") and spare.get(p.parent, 0) < SPARE_SPOOLS:
                spare[p.parent] = spare.get(p.parent, 0) + 1
                continue
            left.append(str(p.relative_to(self.spool_dir)))
        return left

    # -- process -----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> "Daemon":
        """Start and wait until ready.

        A port picked by free_port() can be taken by a parallel test before
        the daemon binds it; the first start then retries on another port.
        """
        for attempt in range(3):
            try:
                return self._start(timeout)
            except DaemonError as e:
                lost_race = "Address already in use" in str(e) or "CannotListenError" in str(e)
                if not (lost_race and self._port_chosen and self.starts == 1 + attempt and attempt < 2):
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> "Daemon":
        if self.running:
            raise DaemonError("daemon already running")
        self.write_config()
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== test harness: start #{self.starts} on port {self.port} =====\n".encode())
        out = open(self.out_path, "ab")
        try:
            self.proc = subprocess.Popen(
                twistd_command(self.config_path, self.log_path),
                cwd=self.dir,
                env=daemon_env(self.env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        finally:
            out.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            assert self.proc is not None
            rc = self.proc.poll()
            if rc is not None:
                raise DaemonError(f"daemon exited with status {rc} before it was ready\n{self.log_tail()}")
            try:
                resp = self.request("GET", "/health", timeout=2)
                if resp.status in (401, 403) and self._probe_token():
                    resp = self.request("GET", "/health", headers={"Authorization": f"Bearer {self._probe_token()}"}, timeout=2)
                if resp.status == 200:
                    return
                last = f"GET /health answered {resp.status}: {resp.body[:200]!r}"
            except (OSError, http.client.HTTPException) as e:
                last = f"GET /health: {e!r}"
            if time.monotonic() > deadline:
                self.kill()
                raise DaemonError(f"daemon not ready within {timeout}s ({last})\n{self.log_tail()}")
            time.sleep(0.05)

    def _probe_token(self) -> str | None:
        for var in ("SPARKCACHE_ADMIN_TOKEN", "SPARKCACHE_READ_TOKEN", "SPARKCACHE_WRITE_TOKEN"):
            if self.env.get(var):
                return self.env[var]
        return None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; return the exit status (raise if it does not exit)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DaemonError(f"daemon did not exit within {timeout}s of SIGTERM\n{self.log_tail()}") from None

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DaemonError(f"daemon did not exit within {timeout}s\n{self.log_tail()}") from None

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def restart(self, timeout: float = 60.0) -> "Daemon":
        if self.running:
            self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Teardown: stop gracefully if possible, then make sure it is gone."""
        if self.running:
            try:
                self.stop(15)
            except DaemonError:
                pass
        self.kill()

    # -- logs --------------------------------------------------------------

    def log(self) -> str:
        parts = []
        for p in (self.log_path, self.out_path):
            if p.exists():
                text = p.read_text(errors="replace")
                if text.strip():
                    parts.append(f"--- {p.name} ---\n{text}")
        return "\n".join(parts) or "(no daemon output)"

    def log_tail(self, lines: int = 200) -> str:
        text = self.log().splitlines()
        if len(text) > lines:
            text = [f"... ({len(text) - lines} earlier lines in {self.dir})"] + text[-lines:]
        return "\n".join(text)

    # -- HTTP --------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.base_url + path

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Response:
        return request(self.port, method, path, headers, body, timeout)

    def get(self, path: str, headers: dict[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> Response:
        return self.request("GET", path, headers, timeout=timeout)

    def head(self, path: str, headers: dict[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> Response:
        return self.request("HEAD", path, headers, timeout=timeout)


DaemonFactory = Callable[..., Daemon]
