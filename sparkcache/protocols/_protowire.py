"""Varints of the protobuf wire format, for the protocols that read or write a
few protobuf messages by hand instead of taking a dependency (Bazel's
ActionResult, the GitHub Actions cache's Twirp messages)."""

from __future__ import annotations


def read_varint(data: bytes, pos: int, error: type[ValueError] = ValueError) -> tuple[int, int]:
    """The varint at ``data[pos:]`` and the position after it; raises ``error``
    when it is truncated or longer than ten bytes."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise error("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise error("varint longer than 10 bytes")


def write_varint(n: int) -> bytes:
    """``n`` as a varint; a negative int64 takes ten bytes, two's complement."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
