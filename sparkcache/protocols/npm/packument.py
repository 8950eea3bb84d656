"""Packuments: what is derived from the exact upstream bytes the store keeps.

Everything here is pure and runs in the protocol's worker threads, once per
stored body (``DerivedCache``), never per request:

- :func:`render`: the body clients get, with every ``dist.tarball`` pointed
  at this cache, rewritten at the byte level (a regular expression over the
  ``"tarball":"..."`` members; ``integrity``, ``shasum`` and ``signatures``
  are never touched) and gzip-compressed on the way, so a 40 MB packument
  is neither parsed nor kept whole twice: what stays in memory is its gzip;
- :func:`tarballs`: what each tarball must hash to (``dist.integrity``
  sha512, else ``dist.shasum`` sha1) and the upstream URL that names it,
  read by decoding only the small ``dist`` objects;
- :func:`check_json`: whether upstream sent a JSON document at all (a
  proxy's HTML error page must never be stored as a packument);
- :func:`abbreviate`: the install-v1 form of a document this cache wrote
  itself (a ``npm-local`` remote's).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

FULL_TYPE = "application/json"
ABBREVIATED_TYPE = "application/vnd.npm.install-v1+json"
# Keys of a version kept by the abbreviated form (the registry's own list).
ABBREVIATED_VERSION_KEYS = (
    "name", "version", "deprecated", "dependencies", "optionalDependencies", "devDependencies",
    "bundleDependencies", "peerDependencies", "peerDependenciesMeta", "bin", "directories", "dist", "engines",
    "cpu", "os", "_hasShrinkwrap", "hasInstallScript", "funding", "license", "acceptDependencies",
)
# A body this small is kept unencoded too (served to clients that do not take gzip without inflating it).
KEEP_IDENTITY = 256 << 10
GZIP_LEVEL = 6
# Bodies up to this size are parsed whole to check they are JSON; larger ones are checked structurally.
FULL_CHECK = 8 << 20
# "tarball": "<anything>/-/<file>" — the URL up to its last "/-/" is replaced.
_TARBALL = re.compile(rb'("tarball"\s*:\s*")https?://[^"\\\s]{1,2048}/-/([^"/\\\s]{1,512})"')
_DIST = re.compile(rb'"dist"\s*:\s*\{')
# A dist object is a few hundred bytes (a few KiB with signatures); one larger is not one we verify.
_DIST_WINDOW = 64 << 10
_HEX = re.compile(r"[0-9a-fA-F]+")


class NotJSON(ValueError):
    """The body is not the JSON object a packument is."""


@dataclass(frozen=True)
class Rendered:
    """A packument as clients get it: its gzip, its size unencoded, and (when
    small) the unencoded bytes themselves."""

    gz: bytes
    size: int
    identity: bytes | None = None

    @property
    def weight(self) -> int:
        return len(self.gz) + len(self.identity or b"") + 200

    def inflater(self) -> Callable[[int, int], bytes]:
        """``read(offset, n)``: the unencoded body, inflated a piece at a time as it is sent."""
        z = zlib.decompressobj(31)
        gz = memoryview(self.gz)
        state = {"pos": 0, "buf": b""}

        def read(offset: int, n: int) -> bytes:
            buf = state["buf"]
            assert isinstance(buf, bytes)
            while len(buf) < n:
                if z.unconsumed_tail:
                    src = z.unconsumed_tail
                else:
                    pos = state["pos"]
                    assert isinstance(pos, int)
                    src = bytes(gz[pos:pos + 65536])
                    state["pos"] = pos + len(src)
                    if not src:
                        buf += z.flush()
                        break
                buf += z.decompress(src, n)
            state["buf"] = buf[n:]
            return buf[:n]

        return read

    def plain(self) -> bytes:
        """The unencoded body, whole."""
        if self.identity is not None:
            return self.identity
        return zlib.decompress(self.gz, 31, self.size)  # one buffer of the known size


@dataclass(frozen=True)
class Tarball:
    """What a packument says of one tarball."""

    url: str
    sha512: str | None = None  # hex
    sha1: str | None = None  # hex

    @property
    def checks(self) -> tuple[tuple[str, str], ...]:
        """The digests a fetch verifies: sha512 when the packument gives it, else sha1."""
        if self.sha512:
            return (("sha512", self.sha512),)
        if self.sha1:
            return (("sha1", self.sha1),)
        return ()


def decoded(body: bytes, headers: Mapping[str, str], limit: int) -> bytes:
    """The body without its Content-Encoding (an upstream that gzips even
    unasked); NotJSON when it inflates past ``limit``."""
    if headers.get("content-encoding", "").lower() not in ("gzip", "x-gzip"):
        return body
    d = zlib.decompressobj(31)
    out = d.decompress(body, limit + 1)
    if len(out) > limit:
        raise NotJSON(f"the packument inflates past {limit} bytes")
    return out


def render(body: bytes, tarball_base: str, level: int = GZIP_LEVEL) -> Rendered:
    """``body`` with every ``dist.tarball`` URL now ``<tarball_base>/-/<file>``, gzipped on the way."""
    prefix = tarball_base.encode() + b"/-/"
    z = zlib.compressobj(level, zlib.DEFLATED, 31)
    out: list[bytes] = []
    size = 0
    pos = 0
    keep = len(body) <= KEEP_IDENTITY
    plain: list[bytes] = []

    def emit(piece: bytes) -> None:
        nonlocal size
        size += len(piece)
        out.append(z.compress(piece))
        if keep:
            plain.append(piece)

    for m in _TARBALL.finditer(body):
        emit(body[pos:m.start()])
        emit(m.group(1) + prefix + m.group(2) + b'"')
        pos = m.end()
    emit(body[pos:] if pos else body)
    out.append(z.flush())
    return Rendered(b"".join(out), size, b"".join(plain) if keep else None)


def integrity_sha512(integrity: Any) -> str | None:
    """The sha512 hex of an SRI ``integrity`` value (``sha512-<base64>``, maybe among others)."""
    if not isinstance(integrity, str):
        return None
    for item in integrity.split():
        algo, _, value = item.partition("-")
        if algo == "sha512":
            try:
                raw = base64.b64decode(value.split("?", 1)[0], validate=True)
            except (binascii.Error, ValueError):
                continue
            if len(raw) == 64:
                return raw.hex()
    return None


def _sha1(shasum: Any) -> str | None:
    if isinstance(shasum, str) and len(shasum) == 40 and _HEX.fullmatch(shasum):
        return shasum.lower()
    return None


def tarballs(body: bytes) -> dict[str, Tarball]:
    """{tarball file name: Tarball} for every version's ``dist`` in ``body``.

    Only the ``dist`` objects are decoded (each from a small window of the
    body), so a 40 MB packument costs a scan, not a parse. Two different
    digests for one file name: upstream contradicts itself, and neither is
    trusted (the file is then not listed at all)."""
    decoder = json.JSONDecoder()
    found: dict[str, Tarball] = {}
    clashes: set[str] = set()
    for m in _DIST.finditer(body):
        start = m.end() - 1
        window = body[start:start + _DIST_WINDOW].decode("utf-8", "replace")
        try:
            dist, _end = decoder.raw_decode(window)
        except ValueError:
            continue
        if not isinstance(dist, dict) or not isinstance(dist.get("tarball"), str):
            continue
        url = dist["tarball"]
        head, sep, file = url.rpartition("/-/")
        if not sep or not file or "/" in file or not url.startswith(("http://", "https://")):
            continue
        t = Tarball(url, integrity_sha512(dist.get("integrity")), _sha1(dist.get("shasum")))
        if found.setdefault(file, t) != t:
            clashes.add(file)
    for file in clashes:
        del found[file]
    return found


def check_json_file(f: Any, size: int) -> None:
    """:func:`check_json` of the ``size`` bytes readable from ``f``; over
    ``FULL_CHECK`` bytes a structural check instead (UTF-8 throughout, one
    ``{`` ... ``}``), read a MiB at a time: decoding a 40 MB document as
    text costs 40 MB more (measured: the daemon's peak went from about 120
    to 160 MB with a 40 MB packument), and what goes wrong with real
    upstreams (an HTML error page, a body cut short) shows at either end."""
    if size <= FULL_CHECK:
        check_json(f.read(size + 1))
        return
    utf8 = codecs.getincrementaldecoder("utf-8")()
    first = last = b""
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            break
        try:
            utf8.decode(chunk)
        except UnicodeDecodeError:
            raise NotJSON("the upstream answer is not UTF-8 text") from None
        stripped = chunk.strip()
        if stripped:
            first = first or stripped[:1]
            last = stripped[-1:]
    try:
        utf8.decode(b"", final=True)
    except UnicodeDecodeError:
        raise NotJSON("the upstream answer is not UTF-8 text") from None
    if first != b"{" or last != b"}":
        raise NotJSON("the upstream answer is not a JSON object (cut short?)")


def _drop(pairs: list[tuple[str, Any]]) -> None:
    return None


def check_json(body: bytes) -> None:
    """NotJSON unless ``body`` is one JSON object. Objects are dropped as soon
    as they are decoded, so checking a 40 MB document holds little more than its text."""
    stripped = body.lstrip()
    if not stripped.startswith(b"{"):
        raise NotJSON("the upstream answer is not a JSON object")
    try:
        json.loads(stripped, object_pairs_hook=_drop)
    except (ValueError, RecursionError) as e:
        raise NotJSON(f"the upstream answer is not valid JSON ({str(e)[:120]})") from None


def abbreviate(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The install-v1 (abbreviated) form of a full packument."""
    versions = doc.get("versions") or {}
    out: dict[str, Any] = {
        "name": doc.get("name"),
        "modified": (doc.get("time") or {}).get("modified") or "",
        "dist-tags": doc.get("dist-tags") or {},
        "versions": {
            v: {k: meta[k] for k in ABBREVIATED_VERSION_KEYS if k in meta}
            for v, meta in versions.items() if isinstance(meta, dict)
        },
    }
    return out
