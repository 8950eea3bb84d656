"""A small S3 client on the reactor: botocore signs, the Twisted Agent talks.

No thread touches the network: each request is signed with
``botocore.auth.S3SigV4Auth`` (the payload hash is the sha256 the store
already computed, or ``UNSIGNED-PAYLOAD`` for a part streamed from a file)
and sent with a persistent-pool ``Agent``. Bodies from files stream with
backpressure (bodies.FileProducer); bodies into files are written as they
arrive, hashed, and verified before anyone may use them (bodies.FileSink).

Every request is retried with exponential backoff on connection errors,
5xx and throttling (429, 503 SlowDown); a GET broken off midway resumes
with a Range from where it stopped. Secrets never reach a log line: errors
carry the method, the object name and S3's error code only.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from datetime import datetime
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import quote, urlsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, FirstError, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from sparkcache.store.s3.bodies import BytesProducer, Collect, FileProducer, FileSink, SinkBroken
from sparkcache.store.s3.settings import S3Settings

log = Logger()

UNSIGNED = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Statuses worth another attempt: throttling and server-side trouble.
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
RETRY_CODES = frozenset({"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"})
MAX_XML = 8 * 2**20  # listings and error bodies: bounded
PARALLEL_PARTS = 4  # parts of one multipart upload in flight at once
MIN_RATE = 256 * 1024  # bytes/s an upload may go no slower than before it counts as timed out
COPY_MAX = 5 * 2**30  # the largest object one CopyObject may copy
COPY_PART = 2**30  # UploadPartCopy ranges above that


class S3Error(Exception):
    """An answer S3 gave that is not what was asked for."""

    def __init__(self, what: str, status: int | None, code: str | None = None, message: str = "") -> None:
        self.status = status
        self.code = code
        detail = f" {code}" if code else ""
        super().__init__(f"{what}: {status if status is not None else 'no answer'}{detail} {message}".rstrip())


class S3Unavailable(S3Error):
    """The bucket could not be reached (or kept failing) after every attempt."""


class Mismatch(S3Error):
    """A body read back is not the body asked for (length or sha256)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None = None
    last_modified: float | None = None  # seconds since the epoch (listings only)


@dataclass(frozen=True)
class UploadInfo:
    """A multipart upload in progress (ListMultipartUploads)."""

    key: str
    upload_id: str  # as the server gave it: quote it for a query (abort_multipart takes it quoted)
    initiated: float | None  # seconds since the epoch


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # a "Starting factory" log line per connection is noise


class _QuietPool(HTTPConnectionPool):
    _factory = _QuietFactory


class _Signer(S3SigV4Auth):
    """S3SigV4Auth with the payload hash given, not computed from a body in memory."""

    def payload(self, request: Any) -> str:
        given = request.context.get("payload_hash")
        return str(given) if given is not None else str(super().payload(request))


class S3Client:
    def __init__(self, settings: S3Settings, reactor: Any, in_io: Callable[..., Deferred[Any]],
                 agent: Any = None, clock: Any = None) -> None:
        """``in_io`` runs file reads (multipart parts) off the reactor."""
        assert settings.credentials is not None, "S3 credentials are resolved when the config is read"
        self.settings = settings
        self.reactor = reactor
        self.clock = clock or reactor
        self.in_io = in_io
        c = settings.credentials
        self._creds = Credentials(c.access_key, c.secret_key, c.token)
        self._pool = _QuietPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 16
        self._pool.retryAutomatically = False  # we retry, with backoff, ourselves
        self.agent = agent or Agent(reactor, connectTimeout=min(settings.timeout, 10.0), pool=self._pool)
        parts = urlsplit(settings.endpoint)
        self._scheme, self._netloc = parts.scheme, parts.netloc
        self.requests = 0  # sent, retries included (tests, metrics)

    async def close(self) -> None:
        await self._pool.closeCachedConnections()

    # -- addressing and signing ---------------------------------------------------

    def url(self, key: str, query: str = "") -> str:
        s = self.settings
        path = quote(key, safe="/-_.~")
        if s.addressing == "virtual":
            base = f"{self._scheme}://{s.bucket}.{self._netloc}/{path}"
        else:
            base = f"{self._scheme}://{self._netloc}/{s.bucket}/{path}"
        return f"{base}?{query}" if query else base

    def sign(self, method: str, url: str, headers: dict[str, str], payload_hash: str) -> dict[str, str]:
        req = AWSRequest(method=method, url=url, headers=dict(headers), data=b"")
        req.context["payload_hash"] = payload_hash
        _Signer(self._creds, "s3", self.settings.region).add_auth(req)
        return {k: str(v) for k, v in req.headers.items()}

    # -- one request, retried ---------------------------------------------------------

    async def _send(self, method: str, key: str, query: str = "", headers: dict[str, str] | None = None,
                    body: Callable[[], IBodyProducer] | None = None, payload_hash: str = EMPTY_SHA256,
                    wait: int = 0) -> IResponse:
        url = self.url(key, query)
        signed = self.sign(method, url, headers or {}, payload_hash)
        hdrs = Headers({k.encode("latin-1"): [v.encode("latin-1")] for k, v in signed.items()})
        self.requests += 1
        producer = body() if body is not None else None
        d = self.agent.request(method.encode(), url.encode(), hdrs, producer)
        # Until the answer's headers: the body sent too, at no less than MIN_RATE
        # (and ``wait`` bytes the server works on first: a copy, a completion).
        sending = producer.length if producer is not None and isinstance(producer.length, int) else 0
        sending += wait
        d.addTimeout(self.settings.timeout + sending / MIN_RATE, self.reactor)
        response: IResponse = await d
        return response

    async def request(self, method: str, key: str, query: str = "", headers: dict[str, str] | None = None,
                      body: Callable[[], IBodyProducer] | None = None, payload_hash: str = EMPTY_SHA256,
                      ok: tuple[int, ...] = (200,), expect: tuple[int, ...] = (),
                      wait: int = 0) -> tuple[IResponse, bytes | None]:
        """Send until an answer in ``ok`` (its body left unread: None) or in
        ``expect`` (its small body read), retrying what is worth retrying;
        ``wait``: bytes the server handles before it answers (a server-side copy),
        which lengthen the timeout as a body sent would."""
        what = f"{method} {key}"
        attempt = 0
        while True:
            attempt += 1
            last: S3Error
            try:
                response = await self._send(method, key, query, headers, body, payload_hash, wait)
            except CancelledError:
                raise
            except Exception as e:
                if _cancelled(e):  # (a request cancelled mid-body fails as a transmission failure)
                    raise CancelledError() from None
                if not _transient(e):
                    raise
                last = S3Unavailable(what, None, message=f"({_describe(e)})")
            else:
                if response.code in ok:
                    return response, None
                text = await _small_body(response)
                if response.code in expect:
                    return response, text
                code, message = _error_of(text)
                if response.code in RETRY_STATUS or code in RETRY_CODES:
                    last = S3Unavailable(what, response.code, code, message)
                else:
                    raise S3Error(what, response.code, code, message)
            if attempt >= self.settings.attempts:
                raise last
            delay = self.settings.backoff * (2 ** (attempt - 1))
            log.debug("S3 {what} failed ({e}); retrying in {d:.2f}s", what=what, e=last, d=delay)
            await deferLater(self.clock, delay, lambda: None)

    # -- objects -------------------------------------------------------------------------

    async def head(self, key: str) -> ObjectInfo | None:
        """The object's size and ETag; None when there is none."""
        response, _ = await self.request("HEAD", key, expect=(404,))
        if response.code == 404:
            return None
        return ObjectInfo(key, _length(response) or 0, _header(response, b"etag"))

    async def put_bytes(self, key: str, data: bytes, if_none_match: bool = False,
                        content_type: str = "application/octet-stream") -> bool:
        """PUT a small body; with ``if_none_match`` False when the object already
        existed (412: nothing written)."""
        headers = {"Content-Type": content_type}
        if if_none_match:
            headers["If-None-Match"] = "*"
        response, _ = await self.request("PUT", key, headers=headers, body=lambda: BytesProducer(data),
                                         payload_hash=hashlib.sha256(data).hexdigest(), expect=(412,))
        if response.code == 200:
            await _discard(response)
        return response.code == 200

    async def put_file(self, key: str, path: str, size: int, sha256: str) -> bool:
        """Upload a complete file as ``key`` once: a conditional PUT, or a
        multipart upload (conditional completion) above the threshold. False
        when the object was already there; an identical overwrite by a server
        that ignores the condition is harmless (the name is the content's hash)."""
        if size <= self.settings.multipart_threshold:
            response, _ = await self.request(
                "PUT", key, headers={"If-None-Match": "*", "Content-Type": "application/octet-stream"},
                body=lambda: FileProducer(path, 0, size, self.in_io), payload_hash=sha256, expect=(412,))
            if response.code == 200:
                await _discard(response)
            return response.code == 200
        return await self._multipart(key, path, size)

    async def _multipart(self, key: str, path: str, size: int) -> bool:
        if await self.head(key) is not None:
            return False  # already there: no need to send it again
        uid = await self.create_multipart(key)
        return await self._in_parts(key, uid, size, self.settings.part_size,
                                    lambda part, start, n: self.upload_part(key, uid, part, path, start, n))

    async def _in_parts(self, key: str, uid: str, size: int, step: int,
                        send: Callable[[int, int, int], Awaitable[str]]) -> bool:
        """Upload ``uid`` of ``key`` in parts of ``step`` bytes, each sent by
        ``send(part, start, n)`` (its ETag), then completed (see complete_multipart).
        Aborted when anything fails, with the failed part's own error."""
        spans = [(i + 1, off, min(step, size - off)) for i, off in enumerate(range(0, size, step))]
        etags: list[str] = [""] * len(spans)

        async def one(part: int, start: int, n: int) -> None:
            etags[part - 1] = await send(part, start, n)

        try:
            # A few parts in flight at once (the round trips overlap); each streams
            # from the file in chunks, so memory stays a few chunks per part.
            limit = DeferredSemaphore(PARALLEL_PARTS)
            await gatherResults([limit.run(lambda *a: Deferred.fromCoroutine(one(*a)), p, o, n) for p, o, n in spans],
                                consumeErrors=True)
            return await self.complete_multipart(key, uid, etags)
        except FirstError as e:  # a part failed: its error, not the wrapper
            await self.abort_multipart(key, uid)
            e.subFailure.raiseException()
            raise
        except BaseException:
            await self.abort_multipart(key, uid)
            raise

    # -- multipart uploads, step by step (upload.py streams parts as a body downloads) ----

    async def create_multipart(self, key: str) -> str:
        """Start a multipart upload of ``key``: its upload id, quoted for a query."""
        _, text = await self.request("POST", key, "uploads=", headers={"Content-Type": "application/octet-stream"},
                                     ok=(), expect=(200,))
        upload_id = _find(_parse(text), "UploadId")
        if not upload_id:
            raise S3Error(f"POST {key}?uploads", 200, message="no UploadId in the answer")
        return quote(upload_id, safe="-_.~")

    async def upload_part(self, key: str, uid: str, part: int, path: str, start: int, n: int) -> str:
        """Bytes [start, start+n) of the file at ``path`` as part ``part``: its ETag."""
        response, _ = await self.request(
            "PUT", key, f"partNumber={part}&uploadId={uid}",
            body=lambda: FileProducer(path, start, n, self.in_io), payload_hash=UNSIGNED)
        etag = _header(response, b"etag")
        await _discard(response)
        if not etag:
            raise S3Error(f"PUT {key} part {part}", response.code, message="no ETag")
        return etag

    async def complete_multipart(self, key: str, uid: str, etags: list[str]) -> bool:
        """Complete the upload with parts 1..len(etags), conditionally (``If-None-Match: *``):
        False, the upload aborted, when ``key`` was there already. Ceph RGW ignores
        the condition and overwrites with the identical bytes, harmless for a name
        that is the content's hash."""
        doc = "<CompleteMultipartUpload>" + "".join(
            f"<Part><PartNumber>{i}</PartNumber><ETag>{_xml_escape(t)}</ETag></Part>"
            for i, t in enumerate(etags, start=1)) + "</CompleteMultipartUpload>"
        data = doc.encode()
        response, text = await self.request(
            "POST", key, f"uploadId={uid}", headers={"If-None-Match": "*", "Content-Type": "application/xml"},
            body=lambda: BytesProducer(data), payload_hash=hashlib.sha256(data).hexdigest(),
            ok=(), expect=(200, 412))
        if response.code == 412:
            await self.abort_multipart(key, uid)
            return False
        code, message = _error_of(text)
        if code:  # S3 may answer 200 and put the failure in the body
            raise S3Error(f"POST {key}?uploadId", 200, code, message)
        return True

    async def abort_multipart(self, key: str, uid: str) -> bool:
        """Best effort: False (logged) when it failed (upload.py tries again once
        the bucket answers; the sweeper (sweep.py, leftovers) takes what is
        left, docs/s3.rst)."""
        try:
            _, _ = await self.request("DELETE", key, f"uploadId={uid}", ok=(204, 200), expect=(404,))
            return True
        except Exception as e:
            log.warn("could not abort the multipart upload of {key}: {e}", key=key, e=e)
            return False

    async def copy(self, source: str, key: str, size: int) -> None:
        """A server-side copy of the object ``source`` (``size`` bytes) to ``key``:
        one CopyObject up to COPY_MAX, else a multipart upload of UploadPartCopy
        ranges (CopyObject's limit is 5 GiB)."""
        src = "/" + quote(f"{self.settings.bucket}/{source}", safe="/-_.~")
        if size <= COPY_MAX:
            _, text = await self.request("PUT", key, headers={"x-amz-copy-source": src}, ok=(), expect=(200,),
                                         wait=size)
            code, message = _error_of(text)
            if code:  # a copy's failure may come after its 200
                raise S3Error(f"PUT {key} (copy)", 200, code, message)
            return
        uid = await self.create_multipart(key)

        async def copy_part(part: int, start: int, n: int) -> str:
            _, text = await self.request(
                "PUT", key, f"partNumber={part}&uploadId={uid}", ok=(), expect=(200,), wait=n,
                headers={"x-amz-copy-source": src, "x-amz-copy-source-range": f"bytes={start}-{start + n - 1}"})
            etag = _find(_parse(text), "ETag")
            if not etag:
                code, message = _error_of(text)
                raise S3Error(f"PUT {key} part {part} (copy)", 200, code, message or "no ETag")
            return etag

        await self._in_parts(key, uid, size, COPY_PART, copy_part)

    async def get_bytes(self, key: str, limit: int = MAX_XML) -> bytes | None:
        """A small object whole (at most ``limit`` bytes); None when there is none."""
        response, _ = await self.request("GET", key, expect=(404,))
        if response.code == 404:
            await _discard(response)
            return None
        return await _small_body(response, limit)

    async def get_to(self, key: str, sink: FileSink, start: int = 0, end: int | None = None) -> None:
        """Bytes [start, end) of ``key`` into ``sink``, resuming with a Range from
        where a broken-off body stopped; raises S3Error(404) when the object is
        gone and Mismatch when the body is longer or shorter than asked."""
        attempt = 0
        while True:
            at = start + sink.written
            headers = {}
            if at > 0 or end is not None:
                headers["Range"] = f"bytes={at}-" + (str(end - 1) if end is not None else "")
            response, _ = await self.request("GET", key, headers=headers, ok=(200, 206))
            if response.code == 200 and at > 0:
                await _discard(response)
                raise Mismatch(f"GET {key}", 200, message="a Range was answered with the whole object")
            try:
                await sink.receive(response)
                return
            except SinkBroken as e:
                attempt += 1
                if attempt >= self.settings.attempts:
                    raise S3Unavailable(f"GET {key}", response.code, message=f"body broke off: {e}") from None
                await deferLater(self.clock, self.settings.backoff * (2 ** (attempt - 1)), lambda: None)

    async def delete(self, key: str) -> None:
        response, _ = await self.request("DELETE", key, ok=(204, 200), expect=(404,))
        await _discard(response)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object whose name starts with ``prefix`` (ListObjectsV2, by pages)."""
        token: str | None = None
        while True:
            query = "list-type=2&prefix=" + quote(prefix, safe="-_.~")
            if token:
                query = "continuation-token=" + quote(token, safe="-_.~") + "&" + query
            _, text = await self.request("GET", "", query, ok=(), expect=(200,))
            root = _parse(text)
            for item in root:
                if _local(item.tag) == "Contents":
                    key, size = _find(item, "Key"), _find(item, "Size")
                    if key is not None:
                        yield ObjectInfo(key, int(size or 0), _find(item, "ETag"), _timestamp(_find(item, "LastModified")))
            token = _find(root, "NextContinuationToken")
            if _find(root, "IsTruncated") != "true" or not token:
                return

    async def list_uploads(self, prefix: str) -> AsyncIterator[UploadInfo]:
        """Every multipart upload in progress on an object whose name starts
        with ``prefix`` (ListMultipartUploads, by pages: key-marker and
        upload-id-marker). Raises S3Error (501 NotImplemented on some servers)."""
        markers: tuple[str, str] = ("", "")
        while True:
            query = "uploads=&prefix=" + quote(prefix, safe="-_.~")
            if markers[0]:
                query += "&key-marker=" + quote(markers[0], safe="-_.~")
            if markers[1]:
                query += "&upload-id-marker=" + quote(markers[1], safe="-_.~")
            _, text = await self.request("GET", "", query, ok=(), expect=(200,))
            root = _parse(text)
            if _local(root.tag) == "Error":
                code, message = _error_of(text)
                raise S3Error("GET ?uploads", 200, code, message)
            for item in root:
                if _local(item.tag) == "Upload":
                    key, uid = _find(item, "Key"), _find(item, "UploadId")
                    if key is not None and uid:
                        yield UploadInfo(key, uid, _timestamp(_find(item, "Initiated")))
            following = (_find(root, "NextKeyMarker") or "", _find(root, "NextUploadIdMarker") or "")
            # (a server that answers the same markers again would page forever)
            if _find(root, "IsTruncated") != "true" or not following[0] or following == markers:
                return
            markers = following


# -- helpers -------------------------------------------------------------------------------


def _transient(e: BaseException) -> bool:
    return isinstance(e, (net_error.ConnectError, net_error.ConnectionLost, net_error.ConnectionDone,
                          net_error.TimeoutError, ResponseFailed, net_error.DNSLookupError)) or \
        type(e).__name__ in ("ResponseNeverReceived", "RequestTransmissionFailed", "RequestNotSent")


def _cancelled(e: BaseException) -> bool:
    reasons = getattr(e, "reasons", None) or []
    return any(r.check(CancelledError) for r in reasons)


def _describe(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(type(r.value).__name__ for r in reasons)
    return type(e).__name__


def _header(response: IResponse, name: bytes) -> str | None:
    v = response.headers.getRawHeaders(name)
    return v[0].decode("latin-1") if v else None


def _length(response: IResponse) -> int | None:
    v = _header(response, b"content-length")
    return int(v) if v and v.isdigit() else None


async def _small_body(response: IResponse, limit: int = MAX_XML) -> bytes:
    collect = Collect(limit)
    response.deliverBody(collect)
    return await collect.done


async def _discard(response: IResponse) -> None:
    try:
        await _small_body(response, MAX_XML)
    except Exception:
        pass


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse(text: bytes | None) -> ET.Element:
    try:
        return ET.fromstring(text or b"<none/>")
    except ET.ParseError:
        return ET.Element("unparsable")


def _find(root: ET.Element, name: str) -> str | None:
    for el in root.iter():
        if _local(el.tag) == name:
            return el.text or ""
    return None


def _error_of(text: bytes | None) -> tuple[str | None, str]:
    root = _parse(text)
    if _local(root.tag) != "Error":
        return None, ""
    return _find(root, "Code"), (_find(root, "Message") or "")[:200]


def _timestamp(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _xml_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
