"""A real upstream registry for OCI tests: Debian's ``docker-registry`` (distribution).

Three pieces, usable separately (OCI push tests and the benchmark import them):

* **Images, built offline** — :func:`build_image` writes a single-platform image
  into an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/``)
  with deterministic gzip layers; :func:`build_index` adds a multi-platform
  index over images already in the layout; :func:`push` copies a layout tag to
  a registry with ``skopeo copy`` (``--all`` for indexes, ``fmt="v2s2"`` for
  Docker schema 2)::

      layout = tmp_path / "layout"
      amd = build_image(layout, "amd64", files={"hello.txt": b"hi"}, arch="amd64")
      arm = build_image(layout, "arm64", files={"hello.txt": b"hi"}, arch="arm64")
      idx = build_index(layout, "multi", [amd, arm])
      push(layout, "multi", f"{reg.host}/demo/app:1.0")
      assert idx.digest == manifest_digest(...)

* **The registry** — :class:`Registry` runs ``docker-registry serve`` on a free
  127.0.0.1 port with a temporary config and storage; ``token_auth=True`` puts
  it behind the Bearer token flow, with a small token server
  (:class:`TokenServer`, ES256 JWTs whose ``x5c`` certificate is the
  registry's ``rootcertbundle``) that optionally requires basic credentials.

* **A counting, fault-injecting front** — :class:`Front` is an HTTP proxy
  placed between the cache and the registry: it records every request
  (``count("GET", "/blobs/")``), and on demand answers a status, corrupts a
  blob's bytes, redirects blob GETs to a second host name (object storage
  style), or refuses connections (``stop()``).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import parse_qs, urlsplit

from .daemon import free_port
from .tools import require_tool

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ALL_MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)


# -- images -------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    digest: str  # "sha256:<hex>"
    size: int
    media_type: str

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class Image:
    """A manifest (or index) written into a layout: its own blob plus what it references."""

    digest: str
    size: int
    media_type: str
    layers: tuple[Blob, ...] = ()
    config: Blob | None = None
    platform: dict[str, str] = field(default_factory=dict)
    children: tuple["Image", ...] = ()

    def blobs(self) -> list[Blob]:
        """Every blob a full pull fetches (configs and layers of all platforms)."""
        out: list[Blob] = []
        for img in (self, *self.children):
            if img.config is not None:
                out.append(img.config)
            out.extend(img.layers)
        return out


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layout(layout: Path) -> Path:
    layout = Path(layout)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    if not (layout / "oci-layout").exists():
        (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    if not (layout / "index.json").exists():
        (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": []}))
    return layout


def write_blob(layout: Path, data: bytes, media_type: str) -> Blob:
    digest = sha256_digest(data)
    path = _layout(layout) / "blobs" / "sha256" / digest.split(":", 1)[1]
    if not path.exists():
        path.write_bytes(data)
    return Blob(digest, len(data), media_type)


def _tag(layout: Path, tag: str, desc: dict[str, Any]) -> None:
    index_path = _layout(layout) / "index.json"
    index = json.loads(index_path.read_text())
    kept = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    kept.append({**desc, "annotations": {"org.opencontainers.image.ref.name": tag}})
    index["manifests"] = kept
    index_path.write_text(json.dumps(index))


def layer_tar(files: dict[str, bytes]) -> bytes:
    """A gzip'd tar of ``files`` with fixed metadata, so equal input gives equal digests."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=1) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def build_image(
    layout: Path | str,
    tag: str,
    files: dict[str, bytes] | None = None,
    *,
    arch: str = "amd64",
    os_name: str = "linux",
    extra_layers: Iterable[dict[str, bytes]] = (),
) -> Image:
    """Write a single-platform OCI image (one layer per files dict) and tag it in ``layout``."""
    layout = Path(layout)
    layers = [write_blob(layout, layer_tar(f), OCI_LAYER) for f in [files or {"hello.txt": tag.encode()}, *extra_layers]]
    diff_ids = []
    for blob in layers:
        data = (layout / "blobs" / "sha256" / blob.digest.split(":", 1)[1]).read_bytes()
        diff_ids.append(sha256_digest(gzip.decompress(data)))
    config = {
        "architecture": arch, "os": os_name, "created": "2026-01-01T00:00:00Z",
        "config": {"Labels": {"test.tag": tag}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2026-01-01T00:00:00Z", "created_by": "tests.support.registry"} for _ in layers],
    }
    cfg = write_blob(layout, json.dumps(config, sort_keys=True).encode(), OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg.descriptor(),
                "layers": [b.descriptor() for b in layers]}
    m = write_blob(layout, json.dumps(manifest, sort_keys=True).encode(), OCI_MANIFEST)
    platform = {"architecture": arch, "os": os_name}
    _tag(layout, tag, m.descriptor(platform=platform))
    return Image(m.digest, m.size, OCI_MANIFEST, tuple(layers), cfg, platform)


def build_index(layout: Path | str, tag: str, images: list[Image]) -> Image:
    """Write an OCI image index over ``images`` (each with its platform) and tag it."""
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [{"mediaType": i.media_type, "digest": i.digest, "size": i.size, "platform": i.platform}
                           for i in images]}
    blob = write_blob(Path(layout), json.dumps(index, sort_keys=True).encode(), OCI_INDEX)
    _tag(Path(layout), tag, blob.descriptor())
    return Image(blob.digest, blob.size, OCI_INDEX, children=tuple(images))


def skopeo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run skopeo without TLS, with a private (empty) auth file and policy that accepts anything."""
    policy = Path(os.environ.get("TMPDIR", "/tmp")) / "sparkcache-skopeo-policy.json"
    if not policy.exists():
        policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    cmd = ["skopeo", "--policy", str(policy), *args]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.setdefault("HOME", "/tmp")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def push(layout: Path | str, tag: str, dest: str, *, fmt: str | None = None, creds: str | None = None) -> None:
    """``skopeo copy --all oci:<layout>:<tag> docker://<dest>`` over plain HTTP.

    ``fmt="v2s2"`` converts to Docker schema 2 (manifest and list types) on the way.
    """
    args = ["copy", "--all", "--dest-tls-verify=false"]
    if fmt:
        args += ["--format", fmt]
    if creds:
        args += ["--dest-creds", creds]
    skopeo(*args, f"oci:{layout}:{tag}", f"docker://{dest}")


# -- serving in a thread (the token server, the front) -------------------------------


def _serve(port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """``handler`` on 127.0.0.1:``port``, served from a daemon thread (one thread per connection)."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _close(server: ThreadingHTTPServer | None) -> None:
    """Stop serving and close the listening socket (``None``: not started, nothing to do)."""
    if server is not None:
        server.shutdown()
        server.server_close()


# -- token server ---------------------------------------------------------------------


class TokenServer:
    """The Docker token endpoint: signs ES256 JWTs the registry trusts.

    ``credentials=("user", "pass")`` makes it answer 401 to requests without
    that basic auth; ``expires_in`` is what it tells clients. ``requests``
    records (query, had Authorization) per token request.
    """

    def __init__(self, workdir: Path, service: str = "sparkcache-test", credentials: tuple[str, str] | None = None,
                 expires_in: int = 300) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        import datetime

        self.service = service
        self.issuer = "sparkcache-test-issuer"
        self.credentials = credentials
        self.expires_in = expires_in
        self.requests: list[tuple[dict[str, list[str]], str | None]] = []
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sparkcache test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self._key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self._key, hashes.SHA256()))
        self.cert_path = Path(workdir) / "token-signer.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.port = free_port()
        self._server: ThreadingHTTPServer | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def token(self, scopes: list[str], subject: str = "") -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) >= 3:
                access.append({"type": parts[0], "name": ":".join(parts[1:-1]), "actions": parts[-1].split(",")})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + self.expires_in,
                  "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access}
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def start(self) -> "TokenServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                q = parse_qs(urlsplit(self.path).query)
                auth = self.headers.get("Authorization")
                owner.requests.append((q, auth))
                if owner.credentials is not None:
                    want = "Basic " + base64.b64encode(":".join(owner.credentials).encode()).decode()
                    if auth != want:
                        self._reply(401, {"details": "bad credentials"})
                        return
                tok = owner.token(q.get("scope", []), owner.credentials[0] if owner.credentials else "")
                self._reply(200, {"token": tok, "access_token": tok, "expires_in": owner.expires_in})

            def _reply(self, status: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = _serve(self.port, Handler)
        return self

    def stop(self) -> None:
        _close(self._server)
        self._server = None


# -- the registry ---------------------------------------------------------------------


class Registry:
    """``docker-registry serve`` on 127.0.0.1 with its own storage; ``host`` is ``127.0.0.1:<port>``."""

    def __init__(self, workdir: Path | str, *, token_auth: bool = False,
                 credentials: tuple[str, str] | None = None) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tokens = TokenServer(self.dir, credentials=credentials) if token_auth else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.dir / "storage")}, "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": os.urandom(8).hex()},
        }
        if self.tokens is not None:
            cfg["auth"] = {"token": {"realm": self.tokens.realm, "service": self.tokens.service,
                                     "issuer": self.tokens.issuer, "rootcertbundle": str(self.tokens.cert_path)}}
        return cfg

    def start(self, timeout: float = 60) -> "Registry":
        exe = shutil.which("docker-registry")
        if exe is None:
            raise AssertionError("docker-registry is not installed")
        if self.tokens is not None and self.tokens._server is None:
            self.tokens.start()
        conf = self.dir / "config.yml"
        conf.write_text(json.dumps(self.config()))  # YAML is a superset of JSON
        log = open(self.dir / "registry.log", "ab")
        try:
            self.proc = subprocess.Popen([exe, "serve", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v2/")
                status = conn.getresponse().status
                conn.close()
                if status in (200, 401):
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"docker-registry did not start:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.tokens is not None:
            self.tokens.stop()

    def log(self) -> str:
        p = self.dir / "registry.log"
        return p.read_text(errors="replace")[-5000:] if p.exists() else "(no registry log)"

    def push_creds(self) -> str | None:
        """``user:pass`` for skopeo when the token server wants credentials."""
        if self.tokens is not None and self.tokens.credentials is not None:
            return ":".join(self.tokens.credentials)
        return None

    def push(self, layout: Path | str, tag: str, repo_tag: str, fmt: str | None = None) -> None:
        push(layout, tag, f"{self.host}/{repo_tag}", fmt=fmt, creds=self.push_creds())

    def manifest(self, repo: str, ref: str) -> tuple[int, dict[str, str], bytes]:
        """GET a manifest straight from the registry (token flow included): (status, headers, body)."""
        headers = {"Accept": ", ".join(ALL_MANIFEST_TYPES)}
        if self.tokens is not None:
            headers["Authorization"] = "Bearer " + self.tokens.token([f"repository:{repo}:pull"])
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", f"/v2/{repo}/manifests/{ref}", headers=headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


@contextmanager
def running_registry(work: Path, **kwargs: Any) -> Iterator[Registry]:
    """A started :class:`Registry` in ``work / "registry"`` (``kwargs`` as for it), stopped on exit.

    Skips the test when ``docker-registry`` or ``skopeo`` (which pushes to it) is
    missing. ``work / "layout"`` is left for the caller's image layout.
    """
    require_tool("docker-registry")
    require_tool("skopeo")
    registry = Registry(work / "registry", **kwargs).start()
    try:
        yield registry
    finally:
        registry.stop()


# -- the counting, fault-injecting front ------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str  # query included
    status: int
    authorization: str | None
    host: str | None
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Fault:
    status: int | None = None  # answer this instead of forwarding
    corrupt: bool = False  # flip one byte in the body (digest mismatch)
    redirect: bool = False  # 307 to the same path on the "object storage" host name
    delay: float = 0.0  # seconds to wait before forwarding (lets concurrent clients pile up)
    times: int | None = None  # lapse after this many uses


HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
       "proxy-authenticate", "host", "content-length"}


class Front:
    """An HTTP proxy in front of a registry: counts, and misbehaves on demand.

    ``fault(substring, Fault(...))`` applies to requests whose path contains
    ``substring`` (the first matching rule wins). Redirect targets go to
    ``localhost:<port>/_storage/...`` — another origin as far as any client is
    concerned (so Authorization must not follow) — and are served from the
    registry by the same proxy.
    """

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.port = free_port()
        self.seen: list[Seen] = []
        self.faults: list[tuple[str, Fault]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fault(self, substring: str, fault: Fault) -> None:
        with self.lock:
            self.faults.append((substring, fault))

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def count(self, method: str | None = None, contains: str = "", status: int | None = None) -> int:
        with self.lock:
            return sum(1 for s in self.seen if (method is None or s.method == method) and contains in s.path
                       and (status is None or s.status == status))

    def requests(self, method: str | None = None, contains: str = "") -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if (method is None or s.method == method) and contains in s.path]

    def describe(self) -> str:
        with self.lock:
            return "\n".join(f"{s.method} {s.path} -> {s.status} auth={'yes' if s.authorization else 'no'}"
                             for s in self.seen)

    def _match(self, path: str) -> Fault | None:
        with self.lock:
            for sub, f in self.faults:
                if sub in path and (f.times is None or f.times > 0):
                    if f.times is not None:
                        f.times -= 1
                    return f
        return None

    def start(self) -> "Front":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._proxy()

            def do_HEAD(self) -> None:
                self._proxy()

            def _record(self, status: int) -> None:
                with owner.lock:
                    owner.seen.append(Seen(self.command, self.path, status, self.headers.get("Authorization"),
                                           self.headers.get("Host"),
                                           {k.lower(): ", ".join(self.headers.get_all(k) or []) for k in self.headers}))

            def _proxy(self) -> None:
                path = self.path
                redirected = path.startswith("/_storage/")
                fault = None if redirected else owner._match(path)
                if fault is not None and fault.status is not None:
                    body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "injected"}]}).encode()
                    self._record(fault.status)
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                    return
                if fault is not None and fault.delay:
                    time.sleep(fault.delay)
                if fault is not None and fault.redirect:
                    self._record(307)
                    self.send_response(307)
                    self.send_header("Location", f"http://localhost:{owner.port}/_storage{path}?X-Amz-Signature=secret")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                upstream_path = path[len("/_storage"):].split("?X-Amz", 1)[0] if redirected else path
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                if redirected:
                    # "Storage" grants access by the signature alone (use an open registry behind).
                    headers.pop("Authorization", None)
                u = urlsplit(owner.target)
                conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=60)
                try:
                    conn.request(self.command, upstream_path, headers=headers)
                    resp = conn.getresponse()
                    self._record(resp.status)
                    self.send_response(resp.status)
                    length = resp.getheader("Content-Length")
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP:
                            self.send_header(k, v)
                    if length is not None:
                        self.send_header("Content-Length", length)
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    first = True
                    while True:
                        chunk = resp.read(64 * 1024)
                        if not chunk:
                            break
                        if first and fault is not None and fault.corrupt:
                            chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                        first = False
                        self.wfile.write(chunk)
                    if length is None:
                        self.close_connection = True
                finally:
                    conn.close()

        self._server = _serve(self.port, Handler)
        return self

    def stop(self) -> None:
        """Close the listener: connections are refused from now on (``start()`` again reopens the port)."""
        _close(self._server)
        self._server = None


def oci_remote(upstream: str, *, registries: list[str] | None = None, **settings: Any) -> dict[str, Any]:
    """A ``type: oci`` remote section for the daemon under test."""
    remote: dict[str, Any] = {"type": "oci", "upstream": upstream, "tag_ttl": "5m"}
    if registries:
        remote["registries"] = registries
    remote.update(settings)
    return remote

