"""A checksum database of our own: what ``go`` verifies modules against in tests.

The go.sum database protocol (``golang.org/x/mod/sumdb``): each record is a
module version's two go.sum lines; the records are the leaves of a
transparent log (RFC 6962 hashing), whose size and root hash are published
as a signed note. ``go`` with ``GOSUMDB=<name>+<key>`` asks
``/lookup/<module>@<version>`` (the record, its id and a signed tree head)
and the log's tiles, checks the note's Ed25519 signature against the key,
and proves the record is in the tree from the tiles. :class:`SumDB` computes
all of that for a list of module versions and lays it out as static files
(``files()``: path → bytes) for any test upstream to serve. One partial
tile holds the whole log, so at most 255 records.
"""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zipfile

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sparkcache.protocols.go.paths import escape
from tests.support.go_modules import ModuleVersion, module_zip


def hash1(files: list[tuple[str, bytes]]) -> str:
    """``dirhash.Hash1``: go.sum's ``h1:`` hash of named files."""
    summary = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files))
    return "h1:" + base64.b64encode(hashlib.sha256(summary.encode()).digest()).decode()


def zip_hash(zipped: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(zipped)) as z:
        return hash1([(i.filename, z.read(i)) for i in z.infolist()])


def go_sum_lines(mv: ModuleVersion) -> str:
    return (f"{mv.module} {mv.version} {zip_hash(module_zip(mv))}\n"
            f"{mv.module} {mv.version}/go.mod {hash1([('go.mod', mv.gomod)])}\n")


def _record_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _tree_hash(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _tree_hash(leaves[:k]) + _tree_hash(leaves[k:])).digest()


class SumDB:
    def __init__(self, name: str, versions: list[ModuleVersion]) -> None:
        assert 0 < len(versions) < 256
        self.name = name
        self._key = Ed25519PrivateKey.generate()
        pub = b"\x01" + self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._hash = struct.pack(">I", struct.unpack(">I", hashlib.sha256(name.encode() + b"\n" + pub).digest()[:4])[0])
        # The GOSUMDB value that trusts this database (and names no URL: only a proxy reaches it).
        self.gosumdb = f"{name}+{self._hash.hex()}+{base64.b64encode(pub).decode()}"
        self.versions = versions
        self.records = [go_sum_lines(mv).encode() for mv in versions]

    def _signed(self, text: bytes) -> bytes:
        sig = self._key.sign(text)
        return text + b"\n" + "\u2014 ".encode() + self.name.encode() + b" " + \
            base64.b64encode(self._hash + sig) + b"\n"

    def files(self) -> dict[str, bytes]:
        leaves = [_record_hash(r) for r in self.records]
        n = len(leaves)
        tree = self._signed(f"go.sum database tree\n{n}\n{base64.b64encode(_tree_hash(leaves)).decode()}\n".encode())
        out = {"latest": tree, f"tile/8/0/000.p/{n}": b"".join(leaves)}
        for i, (mv, record) in enumerate(zip(self.versions, self.records)):
            out[f"lookup/{escape(mv.module)}@{escape(mv.version)}"] = f"{i}\n".encode() + record + b"\n" + tree
        return out
