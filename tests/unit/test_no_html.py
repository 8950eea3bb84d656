"""No request to any mounted app is ever answered with an HTML page.

The daemon's real resource tree and site (``SparkcacheService`` over a config
with one remote of every type the protocol registry knows; listeners never
started) is driven in memory: raw request bytes go into a channel built by
the real ``SparkSite`` and the bytes it writes back are parsed as a client
would. Every app under the root is walked (each segment the registry mounts,
``/setup``, and the management app behind the root's fallback) with bad
methods, bad percent-encodings and invalid UTF-8, control characters, an
over-long path, and with every Klein endpoint patched to raise. A new
protocol in ``sparkcache.protocols.PROTOCOLS`` is walked without touching
this file.

Error responses must be in the app's own format: JSON ``{"error", "status"}``,
OCI's ``{"errors": [{"code", "message"}]}``, cargo's ``{"errors": [{"detail"}]}``,
the Turborepo API's ``{"error": {"code", "message"}}``, and for git's own requests a
pkt-line ``ERR`` (upload-pack POSTs) or a text/plain message (``info/refs``), and
the Go module proxy's text/plain message.
"""

from __future__ import annotations

import http.client
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from klein import Klein
from klein.resource import KleinResource
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.web.resource import IResource
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import provider

from sparkcache.git.pktline import iter_pkt_lines
from sparkcache.protocols import PROTOCOLS, load_config_data
from sparkcache.protocols._group import is_group
from sparkcache.service import SparkcacheService
from sparkcache.web.errors import JSON, ErrorFormat, ErrorReply, Guarded
from sparkcache.web.root import Remount

TOKEN = "no-html-5b0c1d"
GIT_FETCH = {"User-Agent": "git/2.39.5", "Accept": "application/x-git-upload-pack-result",
             "Content-Type": "application/x-git-upload-pack-request"}
GIT_REFS = {"User-Agent": "git/2.39.5", "Git-Protocol": "version=2"}
GIT_TYPES = ("application/x-git-upload-pack-result", "application/x-git-upload-pack-advertisement")

# Appended to every mount point.
BAD_PATHS = [
    "/%ff", "/%ff/x", "/x/%c3%28", "/%c0%af", "/%ed%a0%80", "/x%ff.bin",
    "/%", "/%zz", "/x%2",
    "/x%00y", "/x%0d%0aX-Injected:%20yes", "/..%0d%0a", "/x%01", "/x%7f",
    "/%2e%2e/x", "/x/..", "/x%2fy", "/x%5cy", "/x\\y",
    "/x?%ff=%ff", "/x?q=%0d%0a", "//x",
    "/" + "a" * 5000,
    "/x/info/refs?service=git-upload-pack", "/%ff/info/refs?service=git-upload-pack",
]
# The status some of them must get on every mount, whatever the app.
EXPECTED = {"/%ff": 400, "/x/%c3%28": 400, "/x%00y": 400, "/x%0d%0aX-Injected:%20yes": 400, "/x%7f": 400,
            "/%2e%2e/x": 400, "/x%2fy": 400, "/" + "a" * 5000: 414}
RAW_PATHS = [b"/\xff", b"/x\x01y", b"/x\x7f"]
BRANCH_TAILS = ("x", "x/info/refs", "x/git-upload-pack")
BAD_METHODS = ["BREW", "PROPFIND", "TRACE", "CONNECT", "OPTIONS", "PATCH", "DELETE", "PUT", "POST", "HEAD"]


@dataclass
class Reply:
    request: bytes        # as sent
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def __str__(self) -> str:
        return f"{self.request[:160]!r} -> {self.status} {self.headers.get('Content-Type')} {self.body[:200]!r}"


class _Wire:
    def __init__(self, data: bytes) -> None:
        self.file = io.BytesIO(data)

    def makefile(self, *args: Any, **kw: Any) -> io.BytesIO:
        return self.file


def exchange(site: Any, raw: bytes) -> Reply:
    """One request on a fresh in-memory connection to ``site``; its parsed response."""
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    # Every request here is answered before any I/O (refused, unauthorised, or
    # a patched endpoint raising), so the whole response is already written.
    data = transport.value()
    channel.connectionLost(None)
    assert data, f"no response to {raw!r}"
    method = raw.split(b" ", 1)[0].decode("latin-1")
    resp = http.client.HTTPResponse(_Wire(data), method=method)  # type: ignore[arg-type]
    resp.begin()
    return Reply(raw, resp.status, resp.headers, resp.read())


def request(site: Any, method: str, target: str | bytes, headers: dict[str, str] | None = None,
            body: bytes = b"") -> Reply:
    if isinstance(target, str):
        target = target.encode("latin-1")
    headers = {"Host": "cache.test", **(headers or {})}
    lines = [method.encode() + b" " + target + b" HTTP/1.1"]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in headers.items()]
    lines.append(b"Content-Length: %d" % len(body))
    return exchange(site, b"\r\n".join(lines) + b"\r\n\r\n" + body)


def problems(reply: Reply, error: bool = True, fmt: ErrorFormat | None = None) -> list[str]:
    """What is wrong with ``reply``: HTML anywhere, or an error not in a protocol's format
    (``fmt``'s, when given: the same media type and the same JSON keys)."""
    ctype = (reply.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    head = reply.body.lstrip()[:64].lower()
    if ctype == "text/html" or head.startswith((b"<!doctype", b"<html", b"<head", b"<title")):
        return [f"HTML: {reply}"]
    if not error and reply.status < 300:
        return []
    if fmt is not None and shape(reply.request, reply.headers.get("Content-Type") or "", reply.body) \
            != expected_shape(fmt, reply):
        return [f"not in the app's format {expected_shape(fmt, reply)}: {reply}"]
    method = reply.request.split(b" ", 1)[0]
    if ctype == "application/json":
        if method == b"HEAD":
            return []
        try:
            doc = json.loads(reply.body)
        except ValueError:
            return [f"JSON that does not parse: {reply}"]
        if isinstance(doc, dict) and isinstance(doc.get("errors"), list) and doc["errors"]:
            if all(isinstance(e, dict) and isinstance(e.get("code"), str) and isinstance(e.get("message"), str)
                   for e in doc["errors"]) \
                    or all(isinstance(e, dict) and isinstance(e.get("detail"), str) for e in doc["errors"]):  # cargo
                return []
        elif isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc.get("status") == reply.status:
            return []
        elif isinstance(doc, dict) and set(doc) == {"error"} and isinstance(doc["error"], dict) \
                and isinstance(doc["error"].get("code"), str) and isinstance(doc["error"].get("message"), str):
            return []  # Vercel's (the Turborepo API)
        return [f"JSON that is no error body: {reply}"]
    if fmt is not None and ctype == "text/plain" and (method == b"HEAD" or reply.body.strip()):
        return []  # an app whose own format is plain text (the Go module proxy), as the shape check saw
    git = b"User-Agent: git/" in reply.request
    if git and ctype in GIT_TYPES and reply.status == 200:
        lines = list(iter_pkt_lines(reply.body))
        if lines and isinstance(lines[0], bytes) and lines[0].startswith(b"ERR "):
            return []
        return [f"git response without an ERR packet: {reply}"]
    if git and ctype == "text/plain" and reply.status >= 400 and (method == b"HEAD" or reply.body.strip()):
        return []
    return [f"an error in no protocol's format: {reply}"]


def shape(raw: bytes, ctype: str, body: bytes) -> tuple[str, tuple[str, ...]]:
    """An error's media type, and its JSON keys (or its first pkt-line's first word)."""
    ctype = ctype.split(";")[0].strip().lower()
    if raw.startswith(b"HEAD ") or not body:
        return ctype, ()
    if ctype == "application/json":
        return ctype, tuple(sorted(json.loads(body)))
    if ctype in GIT_TYPES:
        first = next(iter_pkt_lines(body))
        return ctype, (first.split(b" ", 1)[0].decode(),) if isinstance(first, bytes) else ()
    return ctype, ()


def expected_shape(fmt: ErrorFormat, reply: Reply) -> tuple[str, tuple[str, ...]]:
    """The shape of an error ``fmt`` renders for the same request (method, target, headers)."""
    head, _, _ = reply.request.partition(b"\r\n\r\n")
    request_line, *header_lines = head.split(b"\r\n")
    method, target, _ = request_line.split(b" ")
    dummy = DummyRequest([b""])
    dummy.method, dummy.uri, dummy.path = method, target, target.split(b"?", 1)[0]
    for line in header_lines:
        name, _, value = line.partition(b": ")
        dummy.requestHeaders.addRawHeader(name, value)
    status = reply.status if reply.status >= 300 else 500
    body = fmt.render(dummy, ErrorReply(status, "x"))
    ctype = (dummy.responseHeaders.getRawHeaders(b"content-type") or [b""])[0].decode()
    return shape(reply.request, ctype, body)


# -- the daemon under test ---------------------------------------------------------------


def every_remote_type() -> dict[str, Any]:
    """One remote of every type the registry knows, so that every protocol mounts its app."""
    remotes: dict[str, Any] = {}
    for spec in PROTOCOLS:
        for kind in spec.remote_types:
            remote: dict[str, Any] = {"type": kind.name}
            if kind.needs_upstream:
                # Never contacted: every request here fails before any fetch.
                remote["upstream"] = "http://127.0.0.1:9"
            remotes[f"r-{kind.name}"] = remote
        # A group's members: the protocol's other remotes.
        for kind in spec.remote_types:
            if is_group(kind):
                remotes[f"r-{kind.name}"]["members"] = [
                    f"r-{k.name}" for k in spec.remote_types if not is_group(k)]
    return remotes


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[SparkcacheService]:
    config = load_config_data({
        "storage": {"data_dir": str(tmp_path / "data")},
        "remotes": every_remote_type(),
        "git": {"allowed_hosts": ["git.example"]},  # git's apps are built only when git is configured
        # Anonymous reads refused: unpatched handlers stop at a 401 before any I/O.
        "auth": {"anonymous_read": False, "tokens": [{"name": "ci", "token": TOKEN, "scopes": ["admin"]}]},
    }, environ={})
    yield SparkcacheService(config, reactor=MemoryReactorClock())


@dataclass
class Mount:
    prefix: str          # "" for the root's fallback (the management app)
    resource: IResource

    @property
    def fmt(self) -> ErrorFormat:
        """The app's error format: its guard's, or JSON (the generic app vets paths on its hit path)."""
        guards = [r for r in wrapped(self.resource) if isinstance(r, Guarded)]
        return guards[0].fmt if guards else JSON


def mounts(svc: SparkcacheService) -> list[Mount]:
    root = svc.root
    missing = {seg for spec in PROTOCOLS for seg in spec.segments} - set(root.apps)
    assert not missing, f"segments the registry names but the root does not mount: {missing}"
    return [Mount("/" + seg.decode(), res) for seg, res in sorted(root.apps.items())] + [Mount("", root.fallback)]


def mount_of(svc: SparkcacheService, path: str) -> Mount:
    first = "/" + path.lstrip("/").split("/", 1)[0]
    return next((m for m in mounts(svc) if m.prefix == first), mounts(svc)[-1])


def inner(resource: Any) -> list[Any]:
    """The resources ``resource`` wraps (a path guard, the hit fast path, Remount...)."""
    if isinstance(resource, KleinResource):
        return []
    return [v for v in vars(resource).values() if IResource.providedBy(v)]


def wrapped(resource: Any) -> Iterator[Any]:
    yield resource
    for res in inner(resource):
        yield from wrapped(res)


def klein_apps(resource: Any, remounted: bool = False) -> Iterator[tuple[Klein, bool]]:
    """The Klein apps behind ``resource``, and whether each sees the whole path (behind ``Remount``)."""
    if isinstance(resource, KleinResource):
        yield resource._app, remounted
    for res in inner(resource):
        yield from klein_apps(res, remounted or isinstance(resource, Remount))


def routes(mount: Mount, seen: set[tuple[str, str, str]] | None = None) -> Iterator[tuple[Klein, str, str, str]]:
    """(app, endpoint, method, URL) for every method of every route of every app under
    ``mount``, but those in ``seen`` (an app mounted at several segments is walked once)."""
    seen = set() if seen is None else seen
    apps = list(klein_apps(mount.resource))
    assert apps, f"no Klein app found under {mount.prefix or '/'}"
    for app, remounted in apps:
        adapter = app.url_map.bind("cache.test")
        for rule in app.url_map.iter_rules():
            # A branch route (``<path:__rest__>``) also gets the tails of git's requests.
            rests = BRANCH_TAILS if "__rest__" in rule.arguments else ("x",)
            for rest in rests:
                values = {arg: rest if arg == "__rest__" else "x" for arg in rule.arguments}
                path = adapter.build(rule.endpoint, values, append_unknown=False)
                url = path if remounted or not mount.prefix else mount.prefix + path
                for method in sorted(rule.methods or {"GET"}):
                    if (rule.endpoint, method, url) not in seen:
                        seen.add((rule.endpoint, method, url))
                        yield app, rule.endpoint, method, url


class Events:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            self.events.append(event)

        self.observer = observe

    def __enter__(self) -> "Events":
        globalLogPublisher.addObserver(self.observer)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self.observer)


# -- the walks -------------------------------------------------------------------------


# Every mount point, known when tests are collected so that the walk below is
# one test per mount (xdist spreads them): each segment the registry names,
# /setup, and "" (the management app behind the root's fallback).
PREFIXES = sorted({"/" + seg.decode() for spec in PROTOCOLS for seg in spec.segments} | {"/setup"}) + [""]


def test_every_protocol_is_mounted_and_has_routes(daemon: SparkcacheService) -> None:
    assert sorted(m.prefix for m in mounts(daemon)) == sorted(PREFIXES), "PREFIXES is not what the root mounts"
    for mount in mounts(daemon):
        assert list(routes(mount)), mount.prefix


@pytest.mark.parametrize("prefix", PREFIXES, ids=lambda p: p or "(fallback)")
def test_bad_paths_methods_and_headers_are_answered_in_the_apps_format(daemon: SparkcacheService,
                                                                       prefix: str) -> None:
    found: list[str] = []
    checked = 0
    for mount in [m for m in mounts(daemon) if m.prefix == prefix]:
        for suffix in BAD_PATHS:
            for headers in ({}, GIT_REFS):
                reply = request(daemon.site, "GET", mount.prefix + suffix, headers)
                found += problems(reply, error=False, fmt=mount.fmt)
                checked += 1
                if reply.status != EXPECTED.get(suffix, reply.status):
                    found.append(f"not a {EXPECTED[suffix]}: {reply}")
                if "X-Injected" in reply.headers:
                    found.append(f"header injected: {reply}")
        for raw in RAW_PATHS:
            # twisted.web refuses most raw bytes in the request line itself (JsonErrorChannel's JSON);
            # the rest reach the app, which answers in its own format.
            reply = request(daemon.site, "GET", mount.prefix.encode() + raw)
            found += (problems(reply) and problems(reply, fmt=mount.fmt)) if reply.status == 400 \
                else [f"not a 400: {reply}"]
        for method in BAD_METHODS:
            for headers in ({}, GIT_FETCH):
                for suffix in ("/x", "/", "/x/git-upload-pack", "/%ff/git-upload-pack"):
                    reply = request(daemon.site, method, mount.prefix + suffix, headers)
                    found += problems(reply, error=False, fmt=mount.fmt)
        found += problems(request(daemon.site, "GET", mount.prefix + "/x", {"Host": "\xff.test"}), fmt=mount.fmt)
        reply = request(daemon.site, "GET", mount.prefix or "/", {"Authorization": "Bearer wrong"})
        found += problems(reply, error=False, fmt=mount.fmt)
    assert checked == 2 * len(BAD_PATHS) > 40, f"{prefix or '/'} is not mounted"
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", ["/api/r-generic/%ff", "/v2/%ff/manifests/x", "/setup/%ff", "/git/%ff/info/refs",
                                  "/archive/%ff", "/%ff", "/metrics/%ff"])
def test_invalid_utf8_is_a_400_logged_in_one_line(daemon: SparkcacheService, path: str) -> None:
    with Events() as log:
        reply = request(daemon.site, "GET", path)
    assert reply.status == 400, reply
    assert not problems(reply, fmt=mount_of(daemon, path).fmt), problems(reply)
    assert b"UTF-8" in reply.body, reply
    assert len(log.events) == 1, log.events
    assert "log_failure" not in log.events[0] and "failure" not in log.events[0], log.events[0]


def test_an_exception_in_any_endpoint_is_a_500_in_the_apps_format(
        daemon: SparkcacheService, monkeypatch: pytest.MonkeyPatch) -> None:
    reached: list[str] = []

    def raising(name: str, original: Any) -> Any:
        def boom(*args: Any, **kw: Any) -> Any:
            reached.append(name)
            raise RuntimeError(f"forced failure in {name}")

        # Klein reads how many path segments the route consumes off the endpoint.
        boom.segment_count = original.segment_count  # type: ignore[attr-defined]
        return boom

    walked: list[tuple[ErrorFormat, Klein, str, str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    for mount in mounts(daemon):
        walked += [(mount.fmt, *route) for route in routes(mount, seen)]
    assert len(walked) > 50
    for _, app, endpoint, _, _ in walked:
        if getattr(app.endpoints[endpoint], "__name__", "") == "boom":
            continue
        monkeypatch.setitem(app.endpoints, endpoint, raising(endpoint, app.endpoints[endpoint]))
    found: list[str] = []
    with Events() as log:
        for fmt, _, endpoint, method, url in walked:
            for headers in ({"Authorization": f"Bearer {TOKEN}"}, {**GIT_FETCH, **GIT_REFS}):
                del reached[:]
                reply = request(daemon.site, method, url, headers)
                if reached != [endpoint]:
                    found.append(f"{method} {url} did not reach {endpoint} (reached {reached}): {reply}")
                if reply.status != 500 and not (reply.status == 200 and b"ERR " in reply.body):
                    found.append(f"not a 500: {reply}")
                found += problems(reply, fmt=fmt)
    assert not found, "\n".join(found)
    failures = [e for e in log.events if e.get("log_failure") is not None]
    assert failures and all(e["log_failure"].check(RuntimeError) for e in failures)


def test_an_exception_outside_the_apps_is_a_json_500(daemon: SparkcacheService,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: bytes, request: Any) -> Any:
        raise RuntimeError("forced failure in the root")

    monkeypatch.setattr(daemon.root, "getChild", boom)
    with Events() as log:
        reply = request(daemon.site, "GET", "/anything")
    assert reply.status == 500 and not problems(reply), reply
    assert "RuntimeError" in json.loads(reply.body)["error"]
    assert [e["log_failure"].check(RuntimeError) for e in log.events if "log_failure" in e] == [RuntimeError]


def test_requests_refused_before_routing_are_json(daemon: SparkcacheService) -> None:
    for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
                b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                b"GET / HTTP/1.1\r\nX: " + b"b" * 20000 + b"\r\n\r\n"):
        reply = exchange(daemon.site, raw)
        assert reply.status >= 400 and not problems(reply), reply


# -- each format, where a client depends on it --------------------------------------------------


def test_oci_clients_get_oci_errors(daemon: SparkcacheService) -> None:
    bad = request(daemon.site, "GET", "/v2/%ff/manifests/latest")
    assert bad.status == 400 and json.loads(bad.body)["errors"][0]["code"] == "NAME_INVALID", bad
    brew = request(daemon.site, "BREW", "/v2/")
    assert brew.status == 405 and json.loads(brew.body)["errors"][0]["code"] == "UNSUPPORTED", brew
    moved = request(daemon.site, "GET", "/v2")
    assert moved.status == 308 and moved.headers["Location"].endswith("/v2/"), moved
    assert not problems(moved)


def test_git_sees_its_errors(daemon: SparkcacheService) -> None:
    # git keeps its 401 (it asks its credential helper then) ...
    denied = request(daemon.site, "POST", "/git/app/git-upload-pack", GIT_FETCH, b"0000")
    assert denied.status == 401 and "Basic" in denied.headers["WWW-Authenticate"], denied
    # ... and shows other failures of a POST only as an ERR packet.
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad = request(daemon.site, "POST", "/git/app/git-upload-pack", {**GIT_FETCH, **auth}, b"not pkt-line")
    assert bad.status == 200 and bad.headers["Content-Type"] == GIT_TYPES[0], bad
    assert list(iter_pkt_lines(bad.body)) == [b"ERR unknown repository: no repository named 'app'"], bad
    # info/refs: git prints a text/plain body as "remote: ..." lines.
    refs = request(daemon.site, "GET", "/git/%ff/info/refs?service=git-upload-pack", GIT_REFS)
    assert refs.status == 400 and refs.headers["Content-Type"].startswith("text/plain"), refs
    assert refs.body == b"path is not valid UTF-8\n"
    # Anyone else gets JSON, with the same status.
    plain = request(daemon.site, "POST", "/git/app/git-upload-pack", auth, b"not pkt-line")
    assert plain.status == 404 and json.loads(plain.body)["status"] == 404, plain


def test_werkzeug_redirects_and_405s_are_json(daemon: SparkcacheService) -> None:
    moved = request(daemon.site, "GET", "/setup")
    assert moved.status == 308 and moved.headers["Location"].endswith("/setup/") and not problems(moved), moved
    brew = request(daemon.site, "PROPFIND", "/setup/containerd")
    assert brew.status == 405 and "Allow" in brew.headers and not problems(brew), brew
    assert request(daemon.site, "GET", "/metrics/..%0d%0a").status == 400
