"""Ten thousand malformed requests against one daemon, end to end.

A daemon with generic, local, git, OCI pull-through and OCI push remotes, real
upstreams behind them (an HTTP file server, ``git http-backend``, Debian's
``docker-registry``), and a sentinel listener standing for a host nobody
configured. Generated requests (seeded, so a failure replays): traversal in every
encoding, overlong paths and headers, bad Range, bad digests, request smuggling,
bad JSON, invalid UTF-8, odd methods and versions, and requests that name the
sentinel in every place a URL can hide. Each answer must be no 5xx and no HTML;
afterwards no file exists outside the data dir, the sentinel saw no connection,
the daemon logged no traceback, and it still serves every protocol correctly.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.client import bearer, request
from tests.support.daemon import free_port
from tests.support.git_upstream import GitUpstream, git_client, git_upstream_factory  # noqa: F401 - fixture
from tests.support.registry import build_image, oci_remote, push, running_registry
from tests.support.remotes import generic_remote
from tests.support.tools import require_tool
from tests.support.upstream import Upstream

pytestmark = pytest.mark.e2e

SEED = 20261207
TOTAL = 10_000
CANARY = "fzcanary"  # in every name a traversal tries to create
WRITE = "fuzz-write-61c0"
ADMIN = "fuzz-admin-90aa"
BODY = b"the real bytes of a release file\n" * 100


class Sentinel:
    """A TCP listener on a port no remote names: any connection to it is egress
    the configuration did not allow."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.hits += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


# -- the generator ----------------------------------------------------------------------

ROOTS = ["/api/files/", "/api/uploads/", "/api/", "/v2/hub/", "/v2/push/", "/v2/", "/git/", "/git/app/",
         "/git/app.git/", "/setup/", "/admin/", "/admin/purge", "/config", "/metrics", "/repos", "/file",
         "/pypi/", "/npm/", "/go/", "/cargo/", "/maven/", "/kv/", "/bazel/", "/turbo/", "/nx/", "/gha/",
         "/_apis/", "/dagger/", "/seed/", "/sync/", "/upload", "/archive", "/"]

TRAVERSAL = ["../", "..%2f", "%2e%2e/", "%2e%2e%2f", "%2E%2E%2F", ".%2e/", "%2e./", "%252e%252e%252f",
             "..\\", "..%5c", "%5c..%5c", "..%c0%af", "%c0%ae%c0%ae/", "%e0%80%ae%e0%80%ae/", "....//",
             ";/../", "..;/", "%00../", "../%00", "%ef%bc%8e%ef%bc%8e/", "/./", "//", "%2f%2f", "\\\\"]

TARGETS = [f"{CANARY}", f"tmp/{CANARY}", "etc/passwd", f"../../../../tmp/{CANARY}", f"/tmp/{CANARY}",
           f"%2ftmp%2f{CANARY}", f"C:%5c{CANARY}", f"..%2f..%2f{CANARY}.bin"]

BAD_UTF8 = ["%ff", "%c0", "%ed%a0%80", "%f8%88%80%80%80", "\xff", "\xc3\x28", "%80abc", "a%fe%ff"]

RANGES = ["bytes=", "bytes=" + "9" * 5000, "bytes=-" + "9" * 400, "bytes=5-1", "bytes=-", "bytes=a-b",
          "bytes=0-0,0-0," * 200, "bytes=99999999999999999999-", "items=0-1", "bytes 0-1", "bytes=0-1;x",
          "bytes=--1", "bytes=1--1", "bytes=0x10-0x20", "bytes=\xff-1", "bytes=1e3-2e3", "bytes=" + "0-," * 2000]

DIGESTS = ["sha256:zz", "sha256:" + "0" * 63, "sha256:" + "0" * 65, "sha256:" + "A" * 64, "sha512:" + "0" * 10,
           "md5:abc", "sha256:../../x", "sha256:%2e%2e", "sha256:" + "0" * 64 + "/../x", ":", "sha256",
           "sha256:" + "f" * 5000, "sha256:\xff" + "0" * 63]

METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND",
           "BREW", "G\x00T", "get", "X" * 300, "GET\t"]

JSONS = [b"{", b"[]", b"null", b"\"x\"", b"{\"a\":" * 500, b"\xff\xfe{}", b"{\"mediaType\": 5}",
         json.dumps({"schemaVersion": 2, "layers": [{"digest": "sha256:../x"}]}).encode(),
         json.dumps({"a": "b" * 100_000}).encode(), b"1e99999", b"{\"x\": NaN}", b"\x00" * 100]


class Gen:
    def __init__(self, rng: random.Random, sentinel: int, daemon: int, blob: str) -> None:
        self.blob = blob  # a layer the OCI remote really has
        self.r = rng
        self.s = f"127.0.0.1:{sentinel}"
        self.d = f"127.0.0.1:{daemon}"

    def pick(self, xs: list[Any]) -> Any:
        return self.r.choice(xs)

    def head(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"",
             version: str = "HTTP/1.1") -> bytes:
        lines = [f"{method} {target} {version}", f"Host: {self.d}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
            lines.append(f"Content-Length: {len(body)}")
        return "\r\n".join(lines).encode("latin-1", "replace") + b"\r\n\r\n" + body

    def auth(self) -> list[tuple[str, str]]:
        return self.pick([[], [("Authorization", f"Bearer {WRITE}")], [("Authorization", f"Bearer {ADMIN}")],
                          [("Authorization", "Bearer " + "x" * 5000)], [("Authorization", "Basic %%%")]])

    def traversal(self) -> bytes:
        path = self.pick(ROOTS) + self.pick(TRAVERSAL) * self.r.randint(1, 6) + self.pick(TARGETS)
        method = self.pick(["GET", "HEAD", "PUT", "DELETE", "POST"])
        body = b"escape attempt" if method in ("PUT", "POST") else b""
        return self.head(method, path, self.auth(), body)

    def overlong(self) -> bytes:
        kind = self.r.randint(0, 3)
        if kind == 0:
            return self.head("GET", self.pick(ROOTS) + "a" * self.r.choice([5000, 20_000, 70_000]), [])
        if kind == 1:
            return self.head("GET", "/api/files/x", [("X-Long", "v" * self.r.choice([9000, 70_000, 300_000]))])
        if kind == 2:
            return self.head("GET", "/v2/hub/library/x/manifests/latest",
                             [(f"X-H{i}", "v") for i in range(self.r.choice([200, 1000]))])
        return self.head("GET", "/api/files/" + "/".join(["d"] * self.r.choice([500, 3000])), [])

    def bad_range(self) -> bytes:
        path = self.pick(["/api/files/files/release.bin", "/api/files/files/missing.bin",
                          "/v2/hub/demo/app/blobs/" + self.pick(DIGESTS), "/api/uploads/a.bin",
                          f"/v2/hub/demo/app/blobs/{self.blob}"])
        return self.head(self.pick(["GET", "HEAD"]), path, [("Range", self.pick(RANGES))] +
                         self.pick([[], [("If-Range", "\"x\"")], [("If-Range", "Mon, 99 Xyz")]]))

    def bad_digest(self) -> bytes:
        d = self.pick(DIGESTS)
        path = self.pick([f"/v2/hub/demo/app/blobs/{d}", f"/v2/hub/demo/app/manifests/{d}",
                          f"/v2/push/demo/x/blobs/{d}", f"/v2/push/demo/x/blobs/uploads/?digest={d}",
                          f"/api/uploads/f.bin?sha256={d}", f"/kv/cas/{d}", f"/bazel/cas/{d}",
                          f"/api/files/files/release.bin?digest={d}"])
        method = self.pick(["GET", "HEAD", "PUT", "POST", "DELETE"])
        return self.head(method, path, self.auth(), b"data" if method in ("PUT", "POST") else b"")

    def smuggle(self) -> bytes:
        forms = [
            [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "identity")],
            [("Transfer-Encoding", "chunked, identity")],
            [("Transfer-Encoding", "chunked"), ("Content-Length", "4")],
            [("Content-Length", "4"), ("Content-Length", "5")],
            [("Content-Length", "-1")],
            [("Content-Length", "1" * 40)],
            [("Content-Length", "0x10")],
            [("Transfer-Encoding", "xchunked")],
            [("Transfer-Encoding", " chunked")],
            [("Transfer-Encoding", "gzip")],
            [("Transfer-Encoding", "chunked\x00")],
        ]
        hdrs = self.pick(forms)
        body = self.pick([b"0\r\n\r\nGET /admin/purge HTTP/1.1\r\nHost: x\r\n\r\n", b"zz\r\nabc\r\n0\r\n\r\n",
                          b"ffffffffffffffffff\r\n", b"4\r\nabcd\r\n0\r\n\r\n", b"-1\r\n\r\n"])
        return self.head(self.pick(["POST", "PUT"]), self.pick(["/api/uploads/s.bin", "/admin/purge",
                                                                "/git/app/git-upload-pack", "/kv/x"]), hdrs, body)

    def raw_garbage(self) -> bytes:
        return self.pick([
            b"GET /api/files/x HTTP/1.1\nHost: x\n\n",                  # bare LF
            b"GET /api/files/x HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",  # obs-fold
            b"GET /api/files/x HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET /api/files/x HTTP/1.1\r\n: empty-name\r\n\r\n",
            b"GET /api/files/x HTTP/1.1\r\nBad Name: v\r\n\r\n",
            b"GET /api/files/x\r\n\r\n",                                  # HTTP/0.9
            b"GET /api/files/x HTTP/2.0\r\n\r\n",
            b"GET /api/files/x HTTP/1.1x\r\n\r\n",
            b"GET /api/files/x FTP/1.0\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS hello
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET  /api/files/x  HTTP/1.1\r\n\r\n",
            b"\r\n\r\n\r\n",
            bytes(self.r.getrandbits(8) for _ in range(200)),
            b"GET /api/files/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
        ])

    def bad_json(self) -> bytes:
        path = self.pick(["/v2/push/demo/x/manifests/1", "/admin/remotes/fz", "/admin/purge", "/git/webhook",
                          "/_apis/artifactcache/caches", "/npm/npmlocal/fz", "/gha/_apis/artifactcache/caches",
                          "/twirp/github.actions.results.api.v1.CacheService/CreateCacheEntry", "/api/uploads/j"])
        ctype = self.pick(["application/json", "application/vnd.oci.image.manifest.v1+json", "text/plain", "\xff"])
        return self.head(self.pick(["PUT", "POST"]), path, [("Content-Type", ctype)] + self.auth(),
                         self.pick(JSONS))

    def bad_utf8(self) -> bytes:
        bad = self.pick(BAD_UTF8)
        where = self.r.randint(0, 3)
        if where == 0:
            return self.head("GET", self.pick(ROOTS) + bad + "x", [])
        if where == 1:
            return self.head("POST", f"/admin/purge?remote={bad}&path={bad}", [("Authorization", f"Bearer {ADMIN}")])
        if where == 2:
            return self.head("GET", "/api/files/files/release.bin", [("X-Thing", bad), ("Accept", bad)])
        return self.head("GET", f"/v2/hub/{bad}/manifests/{bad}", [])

    def odd_method(self) -> bytes:
        return self.head(self.pick(METHODS), self.pick(ROOTS) + "x", [])

    def egress(self) -> bytes:
        s = self.s
        return self.pick([
            self.head("GET", f"http://{s}/api/files/files/release.bin", []),
            self.head("GET", f"/api/files/http://{s}/x", []),
            self.head("GET", f"/api/files//{s}/x", []),
            self.head("GET", f"/v2/hub/{s}/library/x/manifests/latest", []),
            self.head("GET", f"/v2/{s}/library/x/manifests/latest", []),
            self.head("GET", f"/v2/hub/library/x/manifests/latest?ns={s}", []),
            self.head("GET", f"/git/{s}/o/r.git/info/refs?service=git-upload-pack", []),
            self.head("POST", f"/git/register?repo=http://{s}/o/r.git", [("Authorization", f"Bearer {WRITE}")]),
            self.head("POST", f"/git/refresh?repo=http://{s}/o/r.git", []),
            self.head("GET", f"/file?repo=http://{s}/o/r.git&path=README", []),
            self.head("GET", "/api/files/files/release.bin", [("Host", s)]),
            self.head("GET", "/api/files/files/release.bin", [("X-Forwarded-Host", s), ("Forwarded", f"host={s}")]),
            self.head("GET", f"/api/files/%2F%2F{s}%2Fx", []),
            self.head("GET", f"/api/files/@{s}/x", []),
            self.head("GET", f"/pypi/x/files/x/http%3A%2F%2F{s}%2Fx.whl", []),
            self.head("PUT", "/admin/remotes/fz", [("Authorization", f"Bearer {ADMIN}"),
                                                   ("Content-Type", "application/json")],
                      json.dumps({"type": "generic", "upstream": f"http://{s}", "bad_key": 1}).encode()),
        ])

    def requests(self, n: int) -> Iterator[tuple[str, bytes]]:
        kinds = [("traversal", self.traversal, 3), ("overlong", self.overlong, 1), ("range", self.bad_range, 2),
                 ("digest", self.bad_digest, 2), ("smuggle", self.smuggle, 1), ("garbage", self.raw_garbage, 1),
                 ("json", self.bad_json, 1), ("utf8", self.bad_utf8, 1), ("method", self.odd_method, 1),
                 ("egress", self.egress, 2)]
        weighted = [(name, fn) for name, fn, w in kinds for _ in range(w)]
        for _ in range(n):
            name, fn = self.r.choice(weighted)
            yield name, fn()


# Kinds whose bytes may not be a complete request.
INCOMPLETE = ("smuggle", "garbage")


# -- sending ----------------------------------------------------------------------------


def exchange(port: int, data: bytes, half_close: bool) -> bytes:
    """Send ``data``, read the answer until the daemon closes (Connection: close).
    ``half_close``: end our side after sending (bytes that are not a complete
    request would otherwise leave the daemon waiting for the rest)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused mid-send (a header too long): the answer, if any, is read below
        out = bytearray()
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
            if len(out) > 4 * 2**20:
                break
        return bytes(out)


def verdict(answer: bytes) -> tuple[int | None, str | None]:
    """(status, problem): the first response's status, and what is wrong with it."""
    if not answer:
        return None, None  # closed without an answer: allowed for bytes that are not HTTP
    head, _, body = answer.partition(b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return None, f"not an HTTP response: {line[:80]!r}"
    status = int(parts[1])
    if status >= 500:
        return status, f"{status}: {body[:300]!r}"
    lower = body[:2000].lower()
    if b"<html" in lower or b"<!doctype" in lower or b"traceback" in lower:
        return status, f"HTML or traceback in a {status}: {body[:300]!r}"
    return status, None


# -- the test ---------------------------------------------------------------------------


@pytest.fixture
def upstreams(tmp_path: Path, git_upstream_factory: Any) -> Iterator[dict[str, Any]]:
    require_tool("git")
    files = Upstream().start()
    files.add("/files/release.bin", BODY)
    up: GitUpstream = git_upstream_factory()
    up.create("app", files={"README": "hello\n"})
    with running_registry(tmp_path / "oci") as registry:
        image = build_image(tmp_path / "oci" / "layout", "1.0", {"hello.txt": b"fuzz"})
        push(tmp_path / "oci" / "layout", "1.0", f"{registry.host}/demo/app:1.0")
        yield {"files": files, "git": up, "registry": registry, "image": image}
    files.stop()


def test_ten_thousand_malformed_requests(upstreams: dict[str, Any], daemon_factory: Any, tmp_path: Path) -> None:
    sentinel = Sentinel()
    files, up, registry = upstreams["files"], upstreams["git"], upstreams["registry"]
    remotes = {
        "files": generic_remote(files),
        "uploads": {"type": "local"},
        "hub": oci_remote(registry.url),
        "push": {"type": "oci-local"},
    }
    d = daemon_factory(remotes, env={"SPARKCACHE_WRITE_TOKEN": WRITE, "SPARKCACHE_ADMIN_TOKEN": ADMIN},
                       extra={"git": {"repos": {"app": up.url("app")}, "fetch_interval": "1h"}})
    # Warm each protocol once, so that the fuzz hits cached paths as well as misses.
    assert request(d.port, "GET", "/api/files/files/release.bin").body == BODY
    assert request(d.port, "PUT", "/api/uploads/a.bin", bearer(WRITE), b"uploaded").status in (200, 201)
    home = tmp_path / "home"
    git_client("clone", "-q", "--bare", d.url("/git/app"), str(tmp_path / "warm.git"), home=home)
    before_files = files.total()
    outside_before = _outside(tmp_path, d.data_dir)

    layer = upstreams["image"].layers[0].digest
    assert request(d.port, "GET", f"/v2/hub/demo/app/blobs/{layer}").status == 200
    gen = Gen(random.Random(SEED), sentinel.port, d.port, layer)
    batch = list(gen.requests(TOTAL))
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda item: exchange(d.port, item[1], item[0] in INCOMPLETE), batch))

    problems: dict[str, str] = {}  # one example per kind of problem
    bad = 0
    statuses: Counter[str] = Counter()
    for (kind, data), answer in zip(batch, answers):
        status, problem = verdict(answer)
        if status is None and problem is None and kind not in INCOMPLETE:
            problem = "the connection closed without an answer"
        statuses[f"{kind}:{status}"] += 1
        if problem:
            bad += 1
            problems.setdefault(f"{kind} {problem[:50]}", f"[{kind}] {data[:200]!r} -> {problem}")
    summary = ", ".join(f"{k}={v}" for k, v in sorted(statuses.items()))
    print(f"fuzz: {len(batch)} requests; {summary}")
    assert not problems, f"{bad} bad answers of {len(batch)}:\n" + "\n".join(problems.values())

    assert sentinel.hits == 0, "a request made the daemon connect to an unconfigured host"
    sentinel.close()
    created = sorted(_outside(tmp_path, d.data_dir) - outside_before)
    assert not [p for p in created if CANARY in p], f"files created outside the data dir: {created}"
    tmp_canaries = [n for n in os.listdir("/tmp") if CANARY in n]
    assert not tmp_canaries, tmp_canaries
    log = d.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Unhandled Error" not in log, log[-4000:]

    # Still serving: a generic hit, the upload, git, OCI, health.
    resp = request(d.port, "GET", "/api/files/files/release.bin")
    assert resp.status == 200 and resp.body == BODY
    assert files.total() - before_files <= _upstream_budget(statuses), files.describe()
    assert request(d.port, "GET", "/api/uploads/a.bin").body == b"uploaded"
    out = git_client("ls-remote", d.url("/git/app"), home=home).stdout
    assert up.rev("refs/heads/main", "app") in out
    m = request(d.port, "GET", "/v2/hub/demo/app/manifests/1.0",
                {"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert m.status == 200 and json.loads(m.body)["schemaVersion"] == 2
    assert request(d.port, "GET", "/health").status == 200


def _upstream_budget(statuses: Counter[str]) -> int:
    # The generic upstream may be asked for the paths the fuzz names under
    # /api/files/ that are legitimate (a miss per distinct path at most); the
    # bound only catches a storm (a request per fuzz request), not a path.
    return sum(v for k, v in statuses.items() if k.startswith(("range", "egress", "traversal", "digest")))


def _outside(root: Path, data_dir: Path) -> set[str]:
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == data_dir or data_dir in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for name in filenames + dirnames:
            found.add(os.path.join(dirpath, name))
    return found
