"""Calls of the gha protocol for harness tests: Twirp in either encoding (with
a protobuf encoder/decoder of their own, independent of the daemon's), the
signed URLs it hands out, and the v1 REST API."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from tests.support.harness import Harness

SERVICE = "/twirp/github.actions.results.api.v1.CacheService/"
# Field numbers of the requests and responses (results/api/v1/cache.proto); metadata is 1.
_NUMBERS = {
    "CreateCacheEntry": {"key": 2, "version": 3},
    "FinalizeCacheEntryUpload": {"key": 2, "size_bytes": 3, "version": 4},
    "GetCacheEntryDownloadURL": {"key": 2, "restore_keys": 3, "version": 4},
}
_RESPONSES = {
    "CreateCacheEntry": {1: "ok", 2: "signed_upload_url", 3: "message"},
    "FinalizeCacheEntryUpload": {1: "ok", 2: "entry_id", 3: "message"},
    "GetCacheEntryDownloadURL": {1: "ok", 2: "signed_download_url", 3: "matched_key"},
}


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def pb_request(call: str, fields: dict[str, Any], metadata: bool = True) -> bytes:
    out = bytearray()
    if metadata:  # CacheMetadata{repository_id: 7, scope: [{scope: "refs/heads/x", permission: 3}]}
        scope = b"\x0a\x0crefs/heads/x\x10\x03"
        meta = b"\x08\x07" + b"\x12" + varint(len(scope)) + scope
        out += b"\x0a" + varint(len(meta)) + meta
    for name, value in fields.items():
        number = _NUMBERS[call][name]
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int):
                out += varint(number << 3) + varint(v)
            else:
                raw = v.encode()
                out += varint(number << 3 | 2) + varint(len(raw)) + raw
    return bytes(out)


def pb_response(call: str, data: bytes) -> dict[str, Any]:
    names = _RESPONSES[call]
    out: dict[str, Any] = {}
    pos = 0

    def read_varint() -> int:
        nonlocal pos
        n = shift = 0
        while True:
            b = data[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    while pos < len(data):
        tag = read_varint()
        if tag & 7 == 0:
            v = read_varint()
            out[names[tag >> 3]] = bool(v) if names[tag >> 3] == "ok" else v
        else:
            n = read_varint()
            out[names[tag >> 3]] = data[pos:pos + n].decode()
            pos += n
    return out


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


async def twirp(h: Harness, call: str, fields: dict[str, Any], token: str | None, encoding: str = "json",
                prefix: str = "") -> tuple[int, dict[str, Any]]:
    """``(status, response fields)``; ``prefix`` ``/gha/<remote>`` for a remote's own mount."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if encoding == "json":
        headers["Content-Type"] = "application/json"
        body = json.dumps(fields).encode()
    else:
        headers["Content-Type"] = "application/protobuf"
        body = pb_request(call, fields)
    resp = await h.post(prefix + SERVICE + call, body, headers)
    if resp.status != 200 or encoding == "json":
        return resp.status, resp.json() if resp.body else {}
    assert resp.header("Content-Type") == "application/protobuf"
    return resp.status, pb_response(call, resp.body)


async def save_v2(h: Harness, key: str, version: str, body: bytes, token: str, encoding: str = "json",
                  prefix: str = "") -> dict[str, Any]:
    """Create, one BlockBlob PUT, finalize; the finalize response."""
    status, created = await twirp(h, "CreateCacheEntry", {"key": key, "version": version}, token, encoding, prefix)
    assert status == 200 and created.get("ok"), created
    put = await h.put(path_of(created["signed_upload_url"]), body, {"x-ms-blob-type": "BlockBlob"})
    assert put.status == 201, put.describe()
    size: Any = str(len(body)) if encoding == "json" else len(body)
    status, done = await twirp(h, "FinalizeCacheEntryUpload", {"key": key, "version": version, "size_bytes": size},
                               token, encoding, prefix)
    assert status == 200, done
    return done


async def restore_v2(h: Harness, key: str, version: str, token: str | None, restore_keys: list[str] | None = None,
                     encoding: str = "json", prefix: str = "") -> tuple[str | None, bytes | None]:
    """``(matched key, body)`` or ``(None, None)`` on a miss."""
    fields: dict[str, Any] = {"key": key, "version": version}
    if restore_keys:
        fields["restore_keys"] = restore_keys
    status, got = await twirp(h, "GetCacheEntryDownloadURL", fields, token, encoding, prefix)
    assert status == 200, got
    if not got.get("ok"):
        return None, None
    resp = await h.get(path_of(got["signed_download_url"]))
    assert resp.status == 200, resp.describe()
    return got["matched_key"], resp.body
