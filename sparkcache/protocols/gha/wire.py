"""The few messages of ``github.actions.results.api.v1.CacheService``, in both
Twirp encodings: JSON (``@actions/cache``, BuildKit) and protobuf (sccache).

A tiny protobuf wire codec instead of a dependency: the requests carry strings
(``key``, ``version``, ``restore_keys``), one int64 (``size_bytes``) and a
``metadata`` message we skip; responses are bools, strings and one int64.
Field numbers are those of ``results/api/v1/cache.proto``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sparkcache.protocols._protowire import read_varint, write_varint

PROTOBUF = "application/protobuf"
JSON_TYPE = "application/json"

# Request field numbers (metadata is 1 in each and is skipped).
_CREATE = {2: "key", 3: "version"}
_FINALIZE = {2: "key", 3: "size_bytes", 4: "version"}
_DOWNLOAD = {2: "key", 3: "restore_keys", 4: "version"}
REQUEST_FIELDS = {"CreateCacheEntry": _CREATE, "FinalizeCacheEntryUpload": _FINALIZE,
                  "GetCacheEntryDownloadURL": _DOWNLOAD}
# Response field numbers and kinds.
RESPONSE_FIELDS: dict[str, dict[str, tuple[int, str]]] = {
    "CreateCacheEntry": {"ok": (1, "bool"), "signed_upload_url": (2, "str"), "message": (3, "str")},
    "FinalizeCacheEntryUpload": {"ok": (1, "bool"), "entry_id": (2, "int64"), "message": (3, "str")},
    "GetCacheEntryDownloadURL": {"ok": (1, "bool"), "signed_download_url": (2, "str"), "matched_key": (3, "str")},
}
_JSON_NAMES = {"restoreKeys": "restore_keys", "sizeBytes": "size_bytes"}


class WireError(ValueError):
    """A request body that is not a valid message (a Twirp ``malformed``)."""


@dataclass
class CacheRequest:
    """The fields of any of the three requests (those a call lacks stay empty)."""

    key: str = ""
    version: str = ""
    restore_keys: list[str] = field(default_factory=list)
    size_bytes: int | None = None


# -- protobuf ------------------------------------------------------------------------


def decode_protobuf(method: str, data: bytes) -> CacheRequest:
    names = REQUEST_FIELDS[method]
    req = CacheRequest()
    pos = 0
    while pos < len(data):
        tag, pos = read_varint(data, pos, WireError)
        number, wire_type = tag >> 3, tag & 7
        name = names.get(number)
        if wire_type == 0:
            value, pos = read_varint(data, pos, WireError)
            if name == "size_bytes":
                req.size_bytes = value - (1 << 64) if value >= 1 << 63 else value
            elif name is not None:
                raise WireError(f"field {number} is not a varint")
        elif wire_type == 2:
            length, pos = read_varint(data, pos, WireError)
            if pos + length > len(data):
                raise WireError("truncated field")
            chunk, pos = data[pos:pos + length], pos + length
            if name is None:
                continue  # metadata, or a field a newer client added
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError:
                raise WireError(f"field {name} is not UTF-8") from None
            if name == "restore_keys":
                req.restore_keys.append(text)
            elif name in ("key", "version"):
                setattr(req, name, text)
            else:
                raise WireError(f"field {number} is not length-delimited")
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        if pos > len(data):
            raise WireError("truncated field")
    return req


def encode_protobuf(method: str, fields: dict[str, Any]) -> bytes:
    out = bytearray()
    for name, (number, kind) in RESPONSE_FIELDS[method].items():
        value = fields.get(name)
        if value in (None, "", False, 0):
            continue  # proto3 leaves defaults out
        if kind == "str":
            raw = str(value).encode()
            out += write_varint(number << 3 | 2) + write_varint(len(raw)) + raw
        else:
            out += write_varint(number << 3) + write_varint(int(value))
    return bytes(out)


# -- JSON ----------------------------------------------------------------------------


def decode_json(method: str, data: bytes) -> CacheRequest:
    try:
        doc = json.loads(data or b"{}")
    except ValueError:
        raise WireError("the body is not JSON") from None
    if not isinstance(doc, dict):
        raise WireError("the body is not a JSON object")
    req = CacheRequest()
    allowed = set(REQUEST_FIELDS[method].values())
    for raw_name, value in doc.items():
        name = _JSON_NAMES.get(raw_name, raw_name)
        if name not in allowed:
            continue
        if name in ("key", "version"):
            if not isinstance(value, str):
                raise WireError(f"{raw_name} must be a string")
            setattr(req, name, value)
        elif name == "restore_keys":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise WireError(f"{raw_name} must be a list of strings")
            req.restore_keys = list(value)
        elif name == "size_bytes":
            # protobuf's JSON mapping writes int64 as a string (@actions/cache); BuildKit sends a number.
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise WireError(f"{raw_name} must be an integer or a string of one")
            try:
                req.size_bytes = int(value)
            except ValueError:
                raise WireError(f"{raw_name} must be an integer or a string of one") from None
    return req


def encode_json(method: str, fields: dict[str, Any]) -> bytes:
    out: dict[str, Any] = {}
    for name, (_number, kind) in RESPONSE_FIELDS[method].items():
        value = fields.get(name)
        if value is None:
            continue
        out[name] = str(value) if kind == "int64" else value
    return json.dumps(out).encode()


def decode(method: str, content_type: str, data: bytes) -> CacheRequest:
    if content_type == PROTOBUF:
        return decode_protobuf(method, data)
    return decode_json(method, data)


def encode(method: str, content_type: str, fields: dict[str, Any]) -> bytes:
    if content_type == PROTOBUF:
        return encode_protobuf(method, fields)
    return encode_json(method, fields)
