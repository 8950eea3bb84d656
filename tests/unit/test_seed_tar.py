"""The artifacts' tar stream (sparkcache.protocols.seed.tarstream) is byte for
byte what Python's tarfile writes for the same members, whatever the sizes
of the reads that pull it; a body that is gone or short ends it early."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from sparkcache.protocols.seed.tarstream import TarStream, archive_parts
from sparkcache.store import BodyRange, Entry


class FakeStore:
    """Bodies in files by digest; open_range as the store's."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.open = 0

    def add(self, path: str, body: bytes, when: float = 1_700_000_000.0) -> Entry:
        digest = hashlib.sha256(body).hexdigest()
        (self.root / digest).write_bytes(body)
        return Entry(f"k:{path}", "seed/artifacts", path, 200, digest, len(body), None, fetched=when)

    def open_range(self, entry: Entry, start: int = 0, end: int | None = None) -> BodyRange:
        assert entry.digest is not None
        fd = os.open(self.root / entry.digest, os.O_RDONLY)
        self.open += 1
        return BodyRange(fd, start, entry.size if end is None else end, entry.digest, self._closed)

    def _closed(self, digest: str) -> None:
        self.open -= 1


MEMBERS = {
    "a.txt": b"hello\n",
    "empty": b"",
    "exact/block": b"x" * 512,
    "big/" + "n" * 120 + "/ünïcode.bin": os.urandom(70_000),
}


def reference(members: dict[str, bytes], when: float) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(body), int(when), 0o644
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


def pull(stream: TarStream, n: int) -> bytes:
    out, offset = [], 0
    while offset < stream.size:
        data = stream.read(offset, n)
        if not data:
            break
        out.append(data)
        offset += len(data)
    stream.close()
    return b"".join(out)


@pytest.mark.parametrize("chunk", [1, 7, 512, 4096, 256 * 1024])
def test_same_bytes_as_tarfile(tmp_path: Path, chunk: int) -> None:
    store: Any = FakeStore(tmp_path)
    entries = [(name, store.add(name, body)) for name, body in MEMBERS.items()]
    stream = TarStream(store, archive_parts(entries))
    want = reference(MEMBERS, 1_700_000_000.0)
    assert stream.size == len(want)
    assert pull(stream, chunk) == want
    assert store.open == 0  # every body closed


def test_a_body_gone_or_short_ends_the_stream(tmp_path: Path) -> None:
    store: Any = FakeStore(tmp_path)
    entries = [(name, store.add(name, body)) for name, body in MEMBERS.items()]
    os.unlink(tmp_path / str(entries[-1][1].digest))
    stream = TarStream(store, archive_parts(entries))
    assert len(pull(stream, 4096)) < stream.size
    # A body shorter than its entry says: the stream stops where it ends.
    short = store.add("s", b"abc")
    lying = Entry(short.key, short.remote, short.path, 200, short.digest, 10, None)
    stream = TarStream(store, archive_parts([("s", lying)]))
    got = pull(stream, 4096)
    assert len(got) < stream.size and got.endswith(b"abc")
    assert store.open == 0
