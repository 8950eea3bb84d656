"""The Twirp message codec (sparkcache.protocols.gha.wire), against bytes
encoded by the tests' own protobuf encoder (tests/support/gha_calls.py)."""

from __future__ import annotations

import json

import pytest

from sparkcache.protocols.gha import wire
from tests.support.gha_calls import pb_request, pb_response, varint


def test_protobuf_requests_decode_skipping_metadata_and_unknown_fields() -> None:
    data = pb_request("GetCacheEntryDownloadURL", {"key": "k", "restore_keys": ["a-", "b-"], "version": "v"})
    # Unknown fields of every wire type are skipped, as proto3 parsers do.
    data += varint(9 << 3) + varint(5) + varint(10 << 3 | 1) + b"8bytes!!" + varint(11 << 3 | 5) + b"4byt"
    req = wire.decode_protobuf("GetCacheEntryDownloadURL", data)
    assert (req.key, req.version, req.restore_keys) == ("k", "v", ["a-", "b-"])
    big = pb_request("FinalizeCacheEntryUpload", {"key": "k", "size_bytes": 1 << 40, "version": "v"})
    req = wire.decode_protobuf("FinalizeCacheEntryUpload", big)
    assert req.size_bytes == 1 << 40 and req.version == "v"
    assert wire.decode_protobuf("FinalizeCacheEntryUpload", varint(3 << 3) + varint(-1)).size_bytes == -1


@pytest.mark.parametrize("data", [b"\x12\x05ab", b"\x12", b"\x18\xff", b"\x13", b"\x12\x02\xff\xfe"])
def test_malformed_protobuf_is_refused(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_protobuf("CreateCacheEntry" if data[:1] != b"\x18" else "GetCacheEntryDownloadURL", data)


def test_json_requests_take_proto_and_json_names_and_sizes_as_string_or_number() -> None:
    req = wire.decode_json("FinalizeCacheEntryUpload", b'{"key": "k", "version": "v", "size_bytes": "123"}')
    assert req.size_bytes == 123
    assert wire.decode_json("FinalizeCacheEntryUpload", b'{"key": "k", "sizeBytes": 77}').size_bytes == 77
    req = wire.decode_json("GetCacheEntryDownloadURL", b'{"key": "k", "restoreKeys": ["x"], "metadata": {}}')
    assert req.restore_keys == ["x"]
    for bad in (b"[]", b"{", b'{"key": 1}', b'{"size_bytes": "12x"}', b'{"size_bytes": true}',
                b'{"restore_keys": "x"}'):
        with pytest.raises(wire.WireError):
            wire.decode_json("FinalizeCacheEntryUpload" if b"size" in bad else "GetCacheEntryDownloadURL", bad)


def test_responses_in_both_encodings() -> None:
    fields = {"ok": True, "entry_id": 1 << 40, "message": ""}
    assert json.loads(wire.encode_json("FinalizeCacheEntryUpload", fields)) == {"ok": True, "entry_id": str(1 << 40),
                                                                                "message": ""}
    encoded = wire.encode_protobuf("FinalizeCacheEntryUpload", fields)
    assert encoded == b"\x08\x01\x10" + varint(1 << 40)  # defaults left out
    assert pb_response("FinalizeCacheEntryUpload", encoded) == {"ok": True, "entry_id": 1 << 40}
    url = {"ok": True, "signed_download_url": "http://h/d?sig=x", "matched_key": "k"}
    assert pb_response("GetCacheEntryDownloadURL", wire.encode_protobuf("GetCacheEntryDownloadURL", url)) == url
    assert wire.encode_protobuf("CreateCacheEntry", {"ok": False}) == b""
