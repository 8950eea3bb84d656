"""Just enough of the protobuf wire format to find the CAS blobs an
``ActionResult`` points to (no protobuf dependency).

Bazel's HTTP cache stores, under ``/ac/<action digest>``, a serialized
``build.bazel.remote.execution.v2.ActionResult``; its outputs are CAS blobs
named by ``Digest {hash = 1; size_bytes = 2}``. The fields read here (numbers
from remote_execution.proto, stable since v2.0):

- ``ActionResult``: ``output_files = 2`` (``OutputFile.digest = 2``),
  ``output_directories = 3`` (``OutputDirectory.tree_digest = 3``),
  ``stdout_digest = 6``, ``stderr_digest = 8``;
- ``Tree``: ``root = 1`` and ``children = 2``, both ``Directory``, whose
  ``files = 1`` are ``FileNode`` with ``digest = 2``. A Tree's
  ``DirectoryNode`` digests name directories inside the Tree itself, not
  blobs, so they are not references.

Every other field is skipped by its wire type. A body that is not a valid
message (truncated, a group, an unknown wire type, a digest hash that is not
64 hex digits) raises :class:`NotAMessage`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from sparkcache.protocols._protowire import read_varint, write_varint

_HEX64 = re.compile(rb"[0-9a-f]{64}")

VARINT, I64, LEN, I32 = 0, 1, 2, 5

# sha256 of nothing: Bazel never uploads or downloads the empty blob.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class NotAMessage(ValueError):
    """The bytes are not a protobuf message of the expected shape."""


@dataclass(frozen=True)
class Digest:
    hash: str
    size: int

    @property
    def empty(self) -> bool:
        return self.size == 0 and self.hash == EMPTY_SHA256


@dataclass(frozen=True)
class References:
    """The CAS blobs an ActionResult names: ``blobs`` are fetched as they are,
    ``trees`` are ``Tree`` messages whose files are blobs too."""

    blobs: tuple[Digest, ...]
    trees: tuple[Digest, ...]


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)`` of each field of one message:
    an int for varints, the bytes for length-delimited fields, the raw bytes
    of fixed-width ones."""
    pos, end = 0, len(data)
    while pos < end:
        tag, pos = read_varint(data, pos, NotAMessage)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise NotAMessage("field number 0")
        if wire == VARINT:
            value, pos = read_varint(data, pos, NotAMessage)
            yield number, wire, value
        elif wire == LEN:
            n, pos = read_varint(data, pos, NotAMessage)
            if pos + n > end:
                raise NotAMessage("length-delimited field past the end")
            yield number, wire, data[pos:pos + n]
            pos += n
        elif wire in (I64, I32):
            n = 8 if wire == I64 else 4
            if pos + n > end:
                raise NotAMessage("fixed-width field past the end")
            yield number, wire, data[pos:pos + n]
            pos += n
        else:  # groups (3, 4) are not in these messages; 6 and 7 do not exist
            raise NotAMessage(f"wire type {wire}")


def _submessages(data: bytes, number: int) -> Iterator[bytes]:
    for n, wire, value in fields(data):
        if n == number:
            if wire != LEN or not isinstance(value, bytes):
                raise NotAMessage(f"field {number} is not a message")
            yield value


def parse_digest(data: bytes) -> Digest:
    hash_, size = b"", 0
    for n, wire, value in fields(data):
        if n == 1 and isinstance(value, bytes) and wire == LEN:
            hash_ = value
        elif n == 2 and wire == VARINT and isinstance(value, int):
            size = value
    if not _HEX64.fullmatch(hash_):
        raise NotAMessage("a digest whose hash is not 64 lowercase hex digits")
    return Digest(hash_.decode("ascii"), size)


def _digest_field(data: bytes, number: int) -> Digest | None:
    found = None
    for d in _submessages(data, number):
        found = parse_digest(d)  # proto3: the last occurrence wins
    return found


def action_result_references(data: bytes) -> References:
    """The CAS blobs an ``ActionResult`` names (empty blobs left out)."""
    blobs: list[Digest] = []
    trees: list[Digest] = []
    for n, wire, value in fields(data):
        if wire != LEN or not isinstance(value, bytes):
            continue
        if n == 2:
            d = _digest_field(value, 2)
            if d is not None:
                blobs.append(d)
        elif n == 3:
            d = _digest_field(value, 3)
            if d is not None:
                trees.append(d)
        elif n in (6, 8):
            blobs.append(parse_digest(value))
    return References(tuple(d for d in blobs if not d.empty), tuple(d for d in trees if not d.empty))


def tree_files(data: bytes) -> list[Digest]:
    """The file blobs of a ``Tree`` (its root and every child directory)."""
    out: list[Digest] = []
    for n, wire, value in fields(data):
        if n in (1, 2) and wire == LEN and isinstance(value, bytes):
            for node in _submessages(value, 1):
                d = _digest_field(node, 2)
                if d is not None and not d.empty:
                    out.append(d)
    return out


# -- writing (tests and the benchmark build ActionResults with these) -----------


def field_bytes(number: int, value: bytes) -> bytes:
    return write_varint(number << 3 | LEN) + write_varint(len(value)) + value


def field_varint(number: int, value: int) -> bytes:
    return write_varint(number << 3 | VARINT) + write_varint(value)


def encode_digest(d: Digest) -> bytes:
    return field_bytes(1, d.hash.encode("ascii")) + (field_varint(2, d.size) if d.size else b"")


def encode_action_result(files: dict[str, Digest], stdout: Digest | None = None,
                         trees: dict[str, Digest] | None = None, exit_code: int = 0) -> bytes:
    """A minimal ``ActionResult``: output files, output directories' trees, stdout."""
    out = b""
    for path, d in files.items():
        out += field_bytes(2, field_bytes(1, path.encode()) + field_bytes(2, encode_digest(d)))
    for path, d in (trees or {}).items():
        out += field_bytes(3, field_bytes(1, path.encode()) + field_bytes(3, encode_digest(d)))
    if exit_code:
        out += field_varint(4, exit_code)
    if stdout is not None:
        out += field_bytes(6, encode_digest(stdout))
    return out


def encode_tree(files: dict[str, Digest]) -> bytes:
    """A ``Tree`` of one root directory holding ``files``."""
    root = b"".join(field_bytes(1, field_bytes(1, name.encode()) + field_bytes(2, encode_digest(d)))
                    for name, d in files.items())
    return field_bytes(1, root)
