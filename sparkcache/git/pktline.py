"""pkt-line framing and upload-pack request parsing (gitprotocol-common, -pack, -v2).

The cache needs to understand a client's upload-pack request without
running git: to check that every wanted object is in the mirror before
serving (the just-pushed-commit race), and to decide whether two requests
would produce the same pack (the pack cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

FLUSH = b"0000"
DELIM = b"0001"
RESPONSE_END = b"0002"
MAX_PKT = 65520


class PktError(ValueError):
    """The body is not well-formed pkt-line data."""


class Special:
    """Marker for the zero-payload packets."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


FLUSH_PKT = Special("flush")
DELIM_PKT = Special("delim")
END_PKT = Special("response-end")
_SPECIAL = {0: FLUSH_PKT, 1: DELIM_PKT, 2: END_PKT}


def pkt_line(payload: bytes | str) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode()
    if len(payload) + 4 > MAX_PKT:
        raise PktError("pkt-line payload too long")
    return b"%04x" % (len(payload) + 4) + payload


def iter_pkt_lines(data: bytes, text: bool = True) -> Iterator[bytes | Special]:
    """Yield payloads and Special markers.

    ``text`` drops one trailing newline, as git does for text lines; binary
    payloads (side-band pack data) must keep it: pass ``text=False``."""
    pos, n = 0, len(data)
    while pos < n:
        if pos + 4 > n:
            raise PktError("truncated pkt-line length")
        try:
            size = int(data[pos:pos + 4], 16)
        except ValueError:
            raise PktError(f"bad pkt-line length {data[pos:pos + 4]!r}") from None
        if size in _SPECIAL:
            yield _SPECIAL[size]
            pos += 4
            continue
        if size < 4 or pos + size > n:
            raise PktError("pkt-line length out of range")
        payload = data[pos + 4:pos + size]
        yield payload[:-1] if text and payload.endswith(b"\n") else payload
        pos += size


_HEX = frozenset("0123456789abcdef")


def _oid(value: str) -> str:
    if len(value) not in (40, 64) or not set(value) <= _HEX:
        raise PktError(f"bad object id {value[:80]!r}")
    return value


@dataclass(frozen=True)
class UploadRequest:
    """One upload-pack request, in either protocol version."""

    version: int  # 0 for v0/v1 (same request grammar), 2 for protocol v2
    command: str  # "fetch" or "ls-refs" (v2); always "fetch" for v0
    capabilities: tuple[str, ...] = ()  # v2 capability lines / v0 first-want capabilities
    wants: tuple[str, ...] = ()
    want_refs: tuple[str, ...] = ()
    haves: tuple[str, ...] = ()
    shallows: tuple[str, ...] = ()
    deepen: tuple[str, ...] = ()  # deepen / deepen-since / deepen-not / deepen-relative lines
    filter: str | None = None
    done: bool = False
    arguments: tuple[str, ...] = field(default=())  # other v2 arguments (ofs-delta, no-progress...)

    @property
    def shallow_or_filtered(self) -> bool:
        return bool(self.shallows or self.deepen or self.filter)


def parse_request(body: bytes, version: int) -> UploadRequest:
    """Parse an upload-pack POST body; raise PktError when it is malformed."""
    if version == 2:
        return _parse_v2(body)
    return _parse_v0(body)


def _text(p: bytes) -> str:
    try:
        return p.decode("utf-8")
    except UnicodeDecodeError:
        raise PktError("pkt-line is not UTF-8") from None


def _parse_v2(body: bytes) -> UploadRequest:
    command = ""
    caps: list[str] = []
    args: list[str] = []
    section = "caps"
    for pkt in iter_pkt_lines(body):
        if pkt is DELIM_PKT:
            section = "args"
            continue
        if isinstance(pkt, Special):
            break
        line = _text(pkt)
        if section == "caps":
            if line.startswith("command="):
                command = line[len("command="):]
            else:
                caps.append(line)
        else:
            args.append(line)
    if not command:
        raise PktError("protocol v2 request without a command")
    wants, want_refs, haves, shallows, deepen, other = [], [], [], [], [], []
    flt: str | None = None
    done = False
    for a in args:
        key, _, value = a.partition(" ")
        if command != "fetch":
            other.append(a)
        elif key == "want":
            wants.append(_oid(value))
        elif key == "want-ref":
            want_refs.append(value)
        elif key == "have":
            haves.append(_oid(value))
        elif key == "shallow":
            shallows.append(_oid(value))
        elif key.startswith("deepen"):
            deepen.append(a)
        elif key == "filter":
            flt = value
        elif a == "done":
            done = True
        else:
            other.append(a)
    return UploadRequest(2, command, tuple(caps), tuple(wants), tuple(want_refs), tuple(haves), tuple(shallows),
                         tuple(deepen), flt, done, tuple(other))


def _parse_v0(body: bytes) -> UploadRequest:
    wants, haves, shallows, deepen = [], [], [], []
    caps: list[str] = []
    flt: str | None = None
    done = False
    for pkt in iter_pkt_lines(body):
        if isinstance(pkt, Special):
            continue
        line = _text(pkt)
        key, _, value = line.partition(" ")
        if key == "want":
            oid, _, rest = value.partition(" ")
            wants.append(_oid(oid))
            if not caps and rest:
                caps = rest.split()
        elif key == "have":
            haves.append(_oid(value))
        elif key == "shallow":
            shallows.append(_oid(value))
        elif key.startswith("deepen"):
            deepen.append(line)
        elif key == "filter":
            flt = value
        elif line == "done":
            done = True
        else:
            raise PktError(f"unexpected line in upload-pack request: {line[:80]!r}")
    return UploadRequest(0, "fetch", tuple(caps), tuple(wants), (), tuple(haves), tuple(shallows), tuple(deepen),
                         flt, done, ())
