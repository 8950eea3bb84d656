"""The HTTP site: the request and channel classes every listener uses.

Requests are counted while in flight (graceful stop waits for them). Once a
request's headers are in, its protocol's body gate decides where the body
goes (:mod:`sparkcache.web.bodies`): a request it refuses is answered at once,
before any body byte is stored; an upload goes straight into a store spool.
Bodies are capped at ``server.max_body_size``. Requests twisted.web refuses
before routing, or that fail outside any app's error handlers, are answered
in JSON rather than with its HTML pages.

Connections are bounded (see docs/configuration.rst, ``server``): an idle
keep-alive connection is closed after ``server.idle_timeout``; a request's
head must arrive within ``server.header_timeout`` of its first byte (of the
connection, for the first request), however slowly it trickles; beyond
``server.max_connections`` a new connection is answered ``503`` with
``Retry-After`` and closed (past SHED_MAX such answers at once, closed
without one), so file descriptors stay free for the work of the connections
already held; at the descriptor limit itself, twisted's listening port
accepts and closes with a reserved descriptor. Nothing bounds a request being answered: a slow
client that keeps reading, or an upload that keeps sending, is never cut.
The request framing is checked before twisted.web sees it (RFC 9112 6.1, 6.3):
a Transfer-Encoding other than a lone final ``chunked``, or together with a
Content-Length, is refused and the connection closed, so no body can be read
two ways and smuggle a second request.
"""

from __future__ import annotations

import re
import resource
from http import HTTPStatus
from io import BytesIO
from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel, _GenericHTTPChannelProtocol, parse_qs
from twisted.web.server import Request, Site

from sparkcache.web.bodies import BodyDecision, CappedBody, InMemory, Refuse, SpoolBody, ToSpool
from sparkcache.web.errors import JSON, ErrorReply, internal_error, send_error
from sparkcache.web.hits import FastHits, Head

log = Logger()
# Seconds a connection refused before its body keeps reading (and dropping)
# what the client still sends, before it is cut.
LINGER = 10.0
# A connection over server.max_connections: how long its 503 may wait to be
# read (reading and dropping what the client sends, so no reset destroys the
# answer), and how many may do so at once (beyond, they are closed at once).
SHED_LINGER = 2.0
SHED_MAX = 64
# Seconds a connection refused by a timeout may take to read its answer
# before it is cut (a client that never reads would hold it forever).
ABORT_AFTER = 5.0
# More digits than this in a Content-Length is no length a disk could hold;
# int() of thousands of digits is also slow, and past 4300 it raises.
MAX_LENGTH_DIGITS = 18
# Reason phrases twisted.web's table lacks (it would say "Unknown Status").
REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus if s.value not in RESPONSES}


def connection_cap(configured: int | None) -> int:
    """``server.max_connections``, or by default three quarters of the
    open-file limit: the last quarter stays free for what serving needs
    (store files, spools, upstream sockets, SQLite, pools)."""
    if configured is not None:
        return configured
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, soft * 3 // 4)


class TrackedRequest(Request):
    """A request that the site counts while it is in flight (for graceful stop),
    whose body goes where its protocol's body gate says (see :mod:`sparkcache.web.bodies`)."""

    # Set once the headers are in when the request is answered before its body.
    refusal: Refuse | None = None
    # The answer when the body outgrows its limit on the way in (chunked bodies).
    too_large: Refuse | None = None

    def __init__(self, *args: Any, **kw: Any) -> None:
        # Never parse form bodies on the reactor: `curl --data-binary` sends
        # application/x-www-form-urlencoded by default, and twisted.web would
        # decode a multi-GB upload in memory. Apps read request.content.
        kw.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kw)

    def gotLength(self, length: int | None) -> None:
        site = getattr(self.channel, "site", None)
        if length == 0 or not isinstance(site, SparkSite):
            super().gotLength(length)  # no body (the hit path): nothing to decide
            return
        self._read_head()
        decision = site.body_decision(self)
        limit, self.too_large = _limit(decision, site.max_body_size)
        if isinstance(decision, Refuse):
            self.refusal = decision
        elif length is not None and limit is not None and length > limit:
            self.refusal = self.too_large
        if self.refusal is not None:
            # The channel answers as soon as this returns; a client waiting
            # for "100 Continue" must never get one, nor send the body.
            self.requestHeaders.removeHeader(b"expect")
            self.content = BytesIO()  # never written: the channel drops the body
        elif isinstance(decision, ToSpool):
            self.content = SpoolBody(decision.store, limit)  # type: ignore[assignment]
        elif isinstance(decision, InMemory):
            assert limit is not None
            self.content = CappedBody(BytesIO(), limit)  # type: ignore[assignment]
        else:
            super().gotLength(length)
            if limit is not None:
                self.content = CappedBody(self.content, limit)  # type: ignore[assignment]

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        if message is None:
            message = REASONS.get(code)
        super().setResponseCode(code, message)

    def _read_head(self) -> None:
        """Method, URI, path and query arguments, from the request line, for the
        body gate (twisted.web sets them again, the same, once the body is in)."""
        channel: Any = self.channel
        self.method, self.uri, self.clientproto = channel._command, channel._path, channel._version
        path, _, query = self.uri.partition(b"?")
        self.path = path
        # twisted.web's own parser: bytes in, bytes out, whatever the percent-encoded
        # bytes are (urllib's raises on a %ff, and the request would hang).
        self.args = parse_qs(query, True) if query else {}

    def answer_now(self, refuse: Refuse) -> None:
        """Answer with ``refuse`` and close the connection (the body, or what is
        left of it, is never read)."""
        self.setHeader(b"Connection", b"close")
        body = send_error(self, refuse.fmt, refuse.reply)
        self.write(body)
        self.finish()

    def process(self) -> None:
        site: SparkSite = self.channel.site  # type: ignore[attr-defined]
        site.active.add(self)
        self.notifyFinish().addBoth(lambda _: site.active.discard(self))
        content: Any = self.content
        if getattr(content, "overflow", False) and self.too_large is not None:
            self.answer_now(self.too_large)
            return
        if isinstance(content, SpoolBody) and content.error is not None:
            log.error("could not spool the body of {method} {path}: {why}", method=self.method.decode("latin-1"),
                      path=self.path.decode("latin-1"), why=content.error)
            self.answer_now(Refuse(JSON, ErrorReply(507, "could not store the request body (disk full?)")))
            return
        super().process()

    def processingFailed(self, reason: Failure) -> Failure:
        # An exception outside any app's error handlers (in a resource's
        # render, or in an app's catch-all itself): the JSON 500 every app
        # falls back to, where twisted.web would send its HTML page.
        body = internal_error(self, reason)
        if not self.finished and not self._disconnected:
            self.write(body)
            self.finish()
        return reason


def _limit(decision: BodyDecision, cap: int | None) -> tuple[int | None, Refuse | None]:
    """The tighter of the protocol's and ``server.max_body_size``'s limit on a
    body, and the answer to a body over it."""
    limit: int | None = None
    too_large: Refuse | None = None
    if cap is not None:
        limit = cap
        too_large = Refuse(JSON, ErrorReply(413, f"request body larger than server.max_body_size ({cap} bytes)"))
    if isinstance(decision, (ToSpool, InMemory)) and decision.limit is not None \
            and (limit is None or decision.limit < limit):
        limit = decision.limit
        too_large = decision.too_large or Refuse(JSON, ErrorReply(413, f"request body larger than {limit} bytes"))
    return limit, too_large


class JsonErrorChannel(HTTPChannel):
    """Requests twisted.web rejects before routing (header lines over 16 KiB,
    too many headers, malformed request lines, ambiguous framing) get a JSON
    error too; requests refused from their headers are answered before their
    body, which is dropped. Heads that arrive too slowly, and connections
    over the cap, are cut (see the module docstring)."""

    _first_bytes_seen = False
    # The request answered before its body: everything after it is dropped.
    _refused: TrackedRequest | None = None
    _linger_call: Any = None
    # The pending header deadline, and whether this request's head has begun.
    _head_call: Any = None
    _head_started = False
    # Counted in the site's connections (not when shed over the cap).
    _counted = False
    # Over the cap: what the client sends is dropped; counted in site.shedding.
    _shed = False
    _shed_counted = False
    # Framing headers of the request being parsed: its Transfer-Encoding
    # codings so far and whether it had a Content-Length.
    _framing_of: Any = None
    _codings: list[bytes] = []
    _had_length = False

    # -- connection bounds ---------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        site = getattr(self, "site", None)
        if not isinstance(site, SparkSite):
            return
        if site.connections >= site.max_connections:
            self._shed_connection(site)
            return
        site.connections += 1
        self._counted = True
        self._start_head_timer()

    def _shed_connection(self, site: SparkSite) -> None:
        """Over the cap: a 503 the client can act on, then close. A flood of
        them never costs more than SHED_MAX descriptors for SHED_LINGER s."""
        self._shed = True
        self.setTimeout(None)
        site.shed_total += 1
        transport: Any = self.transport
        if site.shedding >= SHED_MAX or not hasattr(transport, "loseWriteConnection"):
            transport.abortConnection()
            return
        site.shedding += 1
        self._shed_counted = True
        body = b'{"error": "too many connections (server.max_connections); retry", "status": 503}\n'
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        transport.loseWriteConnection()
        self._linger_call = self.callLater(SHED_LINGER, self._stop_lingering)

    def _start_head_timer(self) -> None:
        timeout = getattr(getattr(self, "site", None), "header_timeout", None)
        if timeout and self._head_call is None:
            self._head_started = False
            self._head_call = self.callLater(timeout, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if self._head_call is not None and self._head_call.active():
            self._head_call.cancel()
        self._head_call = None

    def _head_too_slow(self) -> None:
        """The head did not arrive within server.header_timeout (slowloris,
        or a client that connected and never spoke)."""
        self._head_call = None
        if self.transport is None:
            return
        if not self._head_started:
            self.loseConnection()  # a silent connection: nothing to answer
        else:
            self._reject(408, b"Request Timeout", b"request headers not received within server.header_timeout")
        self._abort_later()

    def timeoutConnection(self) -> None:
        # Idle keep-alive connection (server.idle_timeout): close quietly; a
        # log line per idle client would flood the journal.
        self._stop_head_timer()
        self.loseConnection()
        self._abort_later()

    def _abort_later(self) -> None:
        """A client that does not read what is left to send must not hold the
        connection: cut it ABORT_AFTER seconds from now."""
        if self._abortingCall is None:
            self._abortingCall = self.callLater(ABORT_AFTER, self.forceAbortClient)

    # -- framing (RFC 9112 6.1, 6.3) -----------------------------------------------------

    def headerReceived(self, line: bytes) -> bool:
        name, sep, value = line.partition(b":")
        lname = name.strip().lower()
        if sep and lname in (b"transfer-encoding", b"content-length"):
            refusal = self._framing(lname, value.strip(b" \t"))
            if refusal is not None:
                self._reject(*refusal)
                return False
        return bool(super().headerReceived(line))

    def _framing(self, name: bytes, value: bytes) -> tuple[int, bytes, bytes] | None:
        """Why the framing header ``name: value`` makes the request's body
        ambiguous or unreadable, as (status, reason, message); None if it is fine."""
        request = self.requests[-1] if self.requests else None
        if self._framing_of is not request:
            self._framing_of, self._codings, self._had_length = request, [], False
        if name == b"content-length":
            if self._codings:
                return 400, b"Bad Request", b"both Transfer-Encoding and Content-Length"
            if self._had_length:
                return 400, b"Bad Request", b"more than one Content-Length"
            self._had_length = True
            if value.isdigit() and len(value) > MAX_LENGTH_DIGITS:
                return 413, b"Content Too Large", b"Content-Length too large"
            return None
        if getattr(self, "_version", b"HTTP/1.1") != b"HTTP/1.1":
            return 400, b"Bad Request", b"Transfer-Encoding in an HTTP/1.0 request"
        if self._had_length:
            return 400, b"Bad Request", b"both Transfer-Encoding and Content-Length"
        codings = self._codings + [c.strip(b" \t").lower() for c in value.split(b",") if c.strip(b" \t")]
        self._codings = codings
        if not codings or b"chunked" in codings[:-1]:
            return 400, b"Bad Request", b"chunked must be the final transfer coding, once"
        if any(c != b"chunked" for c in codings):
            # RFC 9112 suggests 501; a 400 keeps every malformed request a
            # client error (monitoring reads 5xx as the cache failing).
            return 400, b"Bad Request", b"unsupported transfer coding (only chunked is)"
        return None

    # -- refused requests ---------------------------------------------------------------

    def allHeadersReceived(self) -> None:
        self._stop_head_timer()
        super().allHeadersReceived()  # the request's gotLength decides
        request = self.requests[-1]
        refuse = getattr(request, "refusal", None)
        if refuse is not None:
            self._refused = request
            self.persistent = False
            request.answer_now(refuse)

    def requestDone(self, request: Any) -> None:
        if request is not self._refused:
            super().requestDone(request)
            # Bytes of the next request already buffered: its head is on the clock.
            if self.persistent and self.transport is not None and self._buffered():
                self._start_head_timer()
                self._head_started = True
            return
        self.requests.remove(request)
        # Close our side once the answer is out, but keep reading (and
        # dropping) what the client still sends for a while: closing with its
        # bytes unread would reset the connection, and a reset can destroy
        # the answer before the client reads it.
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.loseConnection()
            return
        half_close()
        self._linger_call = self.callLater(LINGER, self._stop_lingering)

    def _buffered(self) -> bool:
        return bool(getattr(self, "_buffer", b""))

    def _stop_lingering(self) -> None:
        self._linger_call = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._linger_call = None
        self._stop_head_timer()
        site = getattr(self, "site", None)
        if isinstance(site, SparkSite):
            if self._counted:
                self._counted = False
                site.connections -= 1
            if self._shed_counted:
                self._shed_counted = False
                site.shedding -= 1
        super().connectionLost(reason)

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused is None:
            super().rawDataReceived(data)

    def dataReceived(self, data: bytes) -> None:
        if self._refused is not None or self._shed:
            return
        # A TLS ClientHello on a plain-HTTP listener: skopeo, podman and
        # docker try https first against an insecure registry. Closing at
        # once makes them fall back to http now, not after their 10 s
        # handshake timeout (twisted.web would wait for a request line).
        if not self._first_bytes_seen and data:
            self._first_bytes_seen = True
            if data[:1] == b"\x16" and self.transport is not None:
                self.transport.loseConnection()
                return
        first = data[:1]  # (``in`` a bytes would raise and catch a TypeError first)
        if (first == b"G" or first == b"H") and self.line_mode and not self.requests and not self._buffer \
                and not self._busyReceiving and not self.paused and self.persistent:
            data = self._fast_answers(data)
            if not data:
                return
        if data and not self._handlingRequest and self.line_mode:
            # Bytes of a request's head: the first ones start its clock.
            if self._head_call is None:
                self._start_head_timer()
            self._head_started = True
        super().dataReceived(data)

    # -- fresh hits at the connection (sparkcache.web.hits) ------------------------------

    def _fast_answers(self, data: bytes) -> bytes:
        """Answer the requests at the start of ``data`` that are small fresh
        hits, one write each; return the rest (from the first request that is
        not one) for twisted.web, which then sees the connection as if those
        requests had been answered by it."""
        site: Any = getattr(self, "site", None)
        apps = getattr(getattr(site, "resource", None), "apps", None)
        transport: Any = self.transport
        if apps is None or transport is None or transport.disconnecting:
            return data
        answered = False
        while data:
            end = data.find(b"\r\n\r\n", 0, FAST_HEAD_MAX)
            if end < 0:
                break
            head = parse_head(data[:end])
            if head is None:
                break
            app = apps.get(head.mount)
            out = app.answer(head) if type(app) is FastHits else None
            if out is None:
                break
            send_now(transport, out[0])
            answered = True
            if site.access_log:
                site.log_line(head.method, head.uri, 200, out[1])
            data = data[end + 4:]
        if answered:
            self.resetTimeout()
            if self._head_call is not None:
                self._stop_head_timer()
        return data

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._reject(400, b"Bad Request", b"malformed or oversized request")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._reject(431, b"Request Header Fields Too Large", b"request line or header longer than 16 KiB")

    def _reject(self, status: int, reason: bytes, message: bytes) -> None:
        self._stop_head_timer()
        body = b'{"error": "%s", "status": %d}\n' % (message, status)
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.loseConnection()


# A request head longer than this is never a fast hit (twisted.web's limit is 16 KiB).
FAST_HEAD_MAX = 8192
FAST_HEADERS_MAX = 100
# Heads (and header blocks) up to this long are kept once parsed, up to
# HEADS_MAX heads and FIELDS_MAX header blocks (all forgotten at once past
# that): a client sends the same head bytes for each URL it asks again, and
# the same headers for every URL. A block's parsed form is the larger (up to
# FAST_HEADERS_MAX values): at most ~12 MiB of them however heads are made up.
HEAD_KEEP_MAX = 1024
HEADS_MAX = 4096
FIELDS_MAX = 1024
# What the connection answers itself: GET/HEAD, an origin-form target of
# visible ASCII, HTTP/1.1, header lines whose names are tokens and whose values
# hold no control byte (twisted.web refuses what this does not match, or
# parses it the same way).
_REQUEST_LINE = re.compile(rb"(GET|HEAD) (/[\x21-\x7e]*) HTTP/1\.1")
_FIELD_LINES = re.compile(rb"(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*)*")
# Request headers that change a response (or the connection) beyond what a
# fresh hit's block says, in a lowercased head: such requests go through twisted.web.
_NOT_FAST = re.compile(rb"\r\n(?:content-length|transfer-encoding|range|if-range|if-none-match|if-modified-since|"
                       rb"if-match|if-unmodified-since|expect|upgrade|http2-settings|te|trailer):")
# Parsed heads and header blocks (None: not one the connection answers).
_heads: dict[bytes, Head | None] = {}
_fields: dict[bytes, dict[bytes, bytes] | None] = {}


def parse_head(head: bytes) -> Head | None:
    """A request head (without its final blank line) the connection may answer
    itself; None for anything twisted.web must see (a Host header that is not
    UTF-8 included: routers decode it, and the app answers the error)."""
    try:
        return _heads[head]
    except KeyError:
        pass
    parsed = None
    line, crlf, rest = head.partition(b"\r\n")
    m = _REQUEST_LINE.fullmatch(line)
    if m is not None:
        fields = parse_fields(crlf + rest)
        if fields is not None:
            parsed = Head(m.group(1), m.group(2), fields)
    if len(head) <= HEAD_KEEP_MAX:
        if len(_heads) >= HEADS_MAX:
            _heads.clear()
        _heads[head] = parsed
    return parsed


def parse_fields(block: bytes) -> dict[bytes, bytes] | None:
    """The header values of a head's header lines (``block``: each line
    preceded by CRLF), by lowercased name, the last of a name; None when
    the connection must leave the request to twisted.web."""
    try:
        return _fields[block]
    except KeyError:
        pass
    fields: dict[bytes, bytes] | None = None
    lower = block.lower()
    if _FIELD_LINES.fullmatch(block) is not None and block.count(b"\r\n") <= FAST_HEADERS_MAX \
            and _NOT_FAST.search(lower) is None:
        fields = {}
        for line in block.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.lower()] = value.strip(b" \t")
        connection = fields.get(b"connection")
        if connection is not None and connection.lower() != b"keep-alive":
            fields = None
        else:
            try:
                fields.get(b"host", b"").decode("utf-8")
            except UnicodeDecodeError:
                fields = None
    if len(block) <= HEAD_KEEP_MAX:
        if len(_fields) >= FIELDS_MAX:
            _fields.clear()
        _fields[block] = fields
    return fields


def send_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but sent at once when the transport holds
    nothing unsent: twisted buffers every write until the reactor's next turn,
    which costs a hit two epoll updates and a second event besides the send.
    What the socket does not take is left to the transport, in order."""
    if type(transport) is tcp.Server and not transport.TLS and transport.connected \
            and not transport.disconnecting and not transport._writeDisconnecting \
            and not transport._writeDisconnected and not transport.dataBuffer and not transport._tempDataLen:
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # would block, or the connection is gone: the transport finds out
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _channel(factory: Any) -> _GenericHTTPChannelProtocol:
    return _GenericHTTPChannelProtocol(JsonErrorChannel())


class SparkSite(Site):
    requestFactory = TrackedRequest
    protocol = _channel  # type: ignore[assignment]
    noisy = False

    def __init__(self, resource: Any, access_log: bool = False, max_body_size: int | None = None,
                 idle_timeout: float = 60.0, header_timeout: float = 30.0, max_connections: int | None = None,
                 **kw: Any) -> None:
        # twisted.web's idle timeout (12 hours by default) is server.idle_timeout:
        # it runs between requests and while a request's body arrives, never
        # while one is being answered.
        super().__init__(resource, timeout=idle_timeout or None, **kw)
        self.active: set[TrackedRequest] = set()
        self.access_log = access_log
        self.max_body_size = max_body_size
        self.header_timeout = header_timeout
        self.max_connections = connection_cap(max_connections)
        self.connections = 0  # open client connections (not counting shed ones)
        self.shedding = 0  # connections over the cap whose 503 is going out
        self.shed_total = 0  # connections refused over the cap since start

    def buildProtocol(self, addr: Any) -> Any:
        if self.connections >= self.max_connections and self.shedding >= SHED_MAX:
            # Over the cap with no 503 to spare: the listening port closes the
            # socket at once, before it takes a descriptor for long.
            self.shed_total += 1
            return None
        return super().buildProtocol(addr)

    def body_decision(self, request: Any) -> BodyDecision:
        """What becomes of ``request``'s body, by the gate of the resource tree
        (``Root.body_gate``); twisted.web's default when there is none, or when
        it fails (the handler then answers as it would have)."""
        gate = getattr(self.resource, "body_gate", None)
        if gate is None:
            return None
        try:
            decision: BodyDecision = gate(request)
        except Exception:
            log.failure("body gate for {method} {path} failed", method=request.method.decode("latin-1"),
                        path=request.path.decode("latin-1"))
            return None
        return decision

    def log(self, request: Any) -> None:
        # Off by default: at CI-fleet request rates a line per hit costs a
        # fifth of the hit path and floods the journal; /metrics counts them.
        if not self.access_log:
            return
        self.log_line(request.method, request.uri, request.code, request.sentLength)

    def log_line(self, method: bytes, uri: bytes, code: int, size: int) -> None:
        # twisted.web's access log would print Authorization-free lines, but
        # URLs can carry signed query strings: log method, path and status only.
        path = uri.split(b"?", 1)[0].decode("latin-1", "replace")
        log.info("{method} {path} {code} {size}", method=method.decode("latin-1"), path=path, code=code, size=size)
