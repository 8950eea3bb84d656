"""Cheap ref checks over HTTP: what the fetch loop asks a forge when nothing changed.

A check is one request on the reactor, over one persistent connection per forge
host (requests to a host queue for it): no thread, no process, no libgit2 and
no access to the mirror on disk. The first check of a host sends ``GET
info/refs?service=git-upload-pack`` with ``Git-Protocol: version=2``; a forge
that answers with the v2 capability advertisement and offers ``ls-refs`` is
from then on asked with a single ``POST git-upload-pack`` ``command=ls-refs``
(smart HTTP v2 is stateless, so the capability round trip need not be
repeated). A v0-only forge is read from the ref advertisement of the GET.

Credentials are the mirror's own (a token as HTTP Basic, as libgit2 sends it),
sent to the repository's origin only; they never appear in a log line or an error.
ssh:// and file:// mirrors are not checked here (see Mirrors.check).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.defer import TimeoutError as DeferTimeout
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from sparkcache.fetch.upstream import _QuietPool, _safe
from sparkcache.git.config import GitCredentials
from sparkcache.git.credentials import DEFAULT_TOKEN_USER
from sparkcache.git.pktline import FLUSH, PktError, Special, iter_pkt_lines, pkt_line

# A ref advertisement of a big monorepo with pull-request refs runs to megabytes;
# anything past this is not a ref listing.
MAX_ADVERTISEMENT = 64 << 20
CONNECT_TIMEOUT = 15.0
CHECK_TIMEOUT = 60.0
MAX_BACKLOG = 2  # checks queued or in flight on a host's connection before the loop waits
USER_AGENT = b"git/sparkcache"
LS_REFS = (pkt_line(b"command=ls-refs\n") + pkt_line(b"agent=git/sparkcache\n") + b"0001"
           + pkt_line(b"symrefs\n") + FLUSH)


class CheckError(Exception):
    """The forge could not be asked, or answered something that is not a ref listing
    (``status``: the HTTP status when there was one)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Advertisement:
    """The refs a forge advertises, as a mirror stores them, and its default branch."""

    refs: dict[str, str]
    head: str | None


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def host_of(url: str) -> str:
    """``scheme://host:port``: the key of a forge host's connection and rate cap."""
    p = urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    return f"{p.scheme}://{(p.hostname or '').lower()}:{port}"


class _Collect(Protocol):
    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self.done, self.limit = done, limit
        self.buf = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > self.limit and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if len(self.buf) > self.limit:
            self.done.errback(CheckError(f"ref advertisement larger than {self.limit} bytes"))
        elif reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(bytes(self.buf))
        else:
            self.done.errback(CheckError(f"connection lost while reading the refs: {reason.getErrorMessage()}"))


@dataclass
class Host:
    """One forge host: its connection, its queue and what it speaks."""

    agent: Any
    pool: HTTPConnectionPool
    queue: DeferredSemaphore = field(default_factory=lambda: DeferredSemaphore(1))
    v2: bool | None = None   # None: not known yet
    requests: int = 0
    pending: int = 0         # checks queued for the connection or on it


class RefChecker:
    """``check(url, creds)`` → the upstream's Advertisement, over one connection per host.
    ``agent_factory(pool)`` builds the Agent (tests give an in-memory one)."""

    def __init__(self, reactor: Any, agent_factory: Any = None, timeout: float = CHECK_TIMEOUT) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self._agent_factory = agent_factory
        self.hosts: dict[str, Host] = {}

    def host(self, url: str) -> Host:
        key = host_of(url)
        h = self.hosts.get(key)
        if h is None:
            pool = _QuietPool(self.reactor, persistent=True)
            pool.maxPersistentPerHost = 1
            pool.cachedConnectionTimeout = 240
            pool.retryAutomatically = True
            agent = (self._agent_factory(pool) if self._agent_factory is not None
                     else Agent(self.reactor, pool=pool, connectTimeout=CONNECT_TIMEOUT))
            h = self.hosts[key] = Host(agent, pool)
        return h

    def check(self, url: str, creds: GitCredentials | None) -> Deferred[Advertisement]:
        h = self.host(url)
        h.pending += 1

        def done(result: Any) -> Any:
            h.pending -= 1
            return result

        return h.queue.run(lambda: Deferred.fromCoroutine(self._check(h, url, creds))).addBoth(done)

    def busy(self, url: str) -> bool:
        """Whether the host's connection already has a backlog: the loop then holds its
        next checks back, so that a client's check never queues behind hundreds."""
        h = self.hosts.get(host_of(url))
        return h is not None and h.pending >= MAX_BACKLOG

    async def _check(self, h: Host, url: str, creds: GitCredentials | None) -> Advertisement:
        base = url.rstrip("/")
        if h.v2:
            try:
                return parse_ls_refs(await self._request(h, b"POST", base + "/git-upload-pack", creds, LS_REFS))
            except CheckError:
                h.v2 = None  # re-learn what the forge speaks (it may have been reconfigured)
                raise
        body = await self._request(h, b"GET", base + "/info/refs?service=git-upload-pack", creds, None)
        lines = list(_pkts(body))
        if _is_v2(lines):
            if "ls-refs" not in {_text(x).split("=", 1)[0] for x in lines if isinstance(x, bytes)}:
                raise CheckError("the forge speaks protocol v2 without ls-refs")
            h.v2 = True
            return parse_ls_refs(await self._request(h, b"POST", base + "/git-upload-pack", creds, LS_REFS))
        h.v2 = False
        return parse_v0(lines)

    async def _request(self, h: Host, method: bytes, url: str, creds: GitCredentials | None,
                       body: bytes | None) -> bytes:
        headers = Headers({b"User-Agent": [USER_AGENT], b"Git-Protocol": [b"version=2"]})
        if body is not None:
            headers.setRawHeaders(b"Content-Type", [b"application/x-git-upload-pack-request"])
            headers.setRawHeaders(b"Accept", [b"application/x-git-upload-pack-result"])
        if creds is not None and creds.token is not None:
            raw = f"{creds.username or DEFAULT_TOKEN_USER}:{creds.token}".encode()
            headers.setRawHeaders(b"Authorization", [b"Basic " + base64.b64encode(raw)])
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        h.requests += 1
        d: Deferred[bytes] = Deferred.fromCoroutine(self._exchange(h, method, url, headers, producer))
        d.addTimeout(self.timeout, self.reactor)
        try:
            return await d
        except CheckError:
            raise
        except Exception as e:
            raise CheckError(f"{_describe(e)} ({method.decode()} {_safe(url)})") from None

    async def _exchange(self, h: Host, method: bytes, url: str, headers: Headers, producer: Any) -> bytes:
        response: IResponse = await h.agent.request(method, url.encode("ascii"), headers, producer)
        done: Deferred[bytes] = Deferred()
        response.deliverBody(_Collect(done, MAX_ADVERTISEMENT))
        data = await done
        if response.code != 200:
            raise CheckError(f"HTTP {response.code} from {_safe(url)}", response.code)
        return data

    def close(self) -> Deferred[Any]:
        return DeferredList([h.pool.closeCachedConnections() for h in self.hosts.values()])


def _pkts(body: bytes) -> list[bytes | Special]:
    try:
        return list(iter_pkt_lines(body, text=True))
    except PktError as e:
        raise CheckError(f"not a git ref advertisement: {e}") from None


def _text(p: bytes) -> str:
    return p.decode("utf-8", "replace").rstrip("\n")


def _is_v2(lines: list[bytes | Special]) -> bool:
    data = [x for x in lines if isinstance(x, bytes)]
    if data and data[0].startswith(b"# service="):
        data = data[1:]
    return bool(data) and _text(data[0]) == "version 2"


def parse_v0(lines: list[bytes | Special]) -> Advertisement:
    """The smart-HTTP v0 ref advertisement (after the ``# service`` header)."""
    refs: dict[str, str] = {}
    head_oid: str | None = None
    head: str | None = None
    data = [x for x in lines if isinstance(x, bytes)]
    if not data or not data[0].startswith(b"# service=git-upload-pack"):
        raise CheckError("not a smart HTTP ref advertisement")
    for i, line in enumerate(data[1:]):
        text = _text(line)
        if i == 0:
            text, _, caps = text.partition("\0")
            for cap in caps.split():
                if cap.startswith("symref=HEAD:"):
                    head = cap[len("symref=HEAD:"):]
        oid, _, name = text.partition(" ")
        if len(oid) not in (40, 64):
            raise CheckError(f"malformed ref line {text[:80]!r}")
        if name == "HEAD":
            head_oid = oid
        elif name.startswith("refs/") and not name.endswith("^{}") and name != "capabilities^{}":
            refs[name] = oid
    return Advertisement(refs, head or guess_head(refs, head_oid))


def parse_ls_refs(body: bytes) -> Advertisement:
    """A v2 ``ls-refs`` answer: ``<oid> <name>[ symref-target:<t>]`` lines, then a flush."""
    refs: dict[str, str] = {}
    head: str | None = None
    head_oid: str | None = None
    flushed = False
    for x in _pkts(body):
        if isinstance(x, Special):
            flushed = True
            break
        text = _text(x)
        if text.startswith("ERR "):
            raise CheckError(f"the forge refused ls-refs: {text[4:200]}")
        parts = text.split(" ")
        oid, name = parts[0], parts[1] if len(parts) > 1 else ""
        if len(oid) not in (40, 64) or not name:
            raise CheckError(f"malformed ls-refs line {text[:80]!r}")
        if name == "HEAD":
            head_oid = oid
            for attr in parts[2:]:
                if attr.startswith("symref-target:"):
                    head = attr[len("symref-target:"):]
        elif name.startswith("refs/"):
            refs[name] = oid
    if not flushed:
        raise CheckError("truncated ls-refs answer")
    return Advertisement(refs, head or guess_head(refs, head_oid))


def guess_head(refs: dict[str, str], head_oid: str | None) -> str | None:
    """As repo_ops.head_target: the branch HEAD points at, when no symref says it."""
    if head_oid is None:
        return None
    branches = {n: o for n, o in refs.items() if n.startswith("refs/heads/")}
    for name in ("refs/heads/main", "refs/heads/master", *sorted(branches)):
        if branches.get(name) == head_oid:
            return name
    return None


def _describe(e: BaseException) -> str:
    if isinstance(e, DeferTimeout):
        return "no answer in time"
    if isinstance(e, ResponseNeverReceived) and e.reasons:
        return "; ".join(r.getErrorMessage() or type(r.value).__name__ for r in e.reasons)
    return str(e) or type(e).__name__
