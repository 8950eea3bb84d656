"""The bundle tar writer and reader (sparkcache.store.bundle): a round trip
between two stores, and every kind of bad archive refused with nothing left
behind (digest mismatch, unknown format, truncation, unexpected names)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from sparkcache.store import Entry, Store
from sparkcache.store import bundle
from sparkcache.store.bundle import BundleError


def _store(path: Any) -> Store:
    s = Store(str(path), reactor, max_size=1 << 30)
    pytest_twisted.blockon(Deferred.fromCoroutine(s.start()))
    return s


@pytest.fixture
def stores(tmp_path):
    a, b = _store(tmp_path / "a"), _store(tmp_path / "b")
    yield a, b
    for s in (a, b):
        pytest_twisted.blockon(Deferred.fromCoroutine(s.stop()))


async def put(store: Store, remote: str, path: str, body: bytes, **kw: Any) -> Entry:
    spool = store.new_spool()
    spool.write(body)
    entry = Entry(f"{remote}:{path}", remote, path, 200, spool.hexdigest(), len(body), "application/octet-stream",
                  {"ETag": '"e1"', "X-Origin": "up"}, 1000.0, kw.pop("expires", None), '"e1"', None, 1000.0, **kw)
    return await store.commit(spool, entry)


async def export(store: Store, remotes: list[str] | None = None) -> tuple[bytes, bundle.BundleWriter]:
    entries = await bundle.snapshot(store, remotes, None)
    doc = bundle.manifest("test", [{"name": "files", "type": "generic", "upstream": None}], entries, [], 2000.0)
    writer = bundle.BundleWriter(store, doc, [], 2000.0)
    out = bytearray()
    while True:
        chunk = writer.read()
        if not chunk:
            break
        assert len(chunk) <= bundle.CHUNK + bundle.BLOCK * 4
        out += chunk
    writer.close()
    return bytes(out), writer


def spools(store: Store) -> list[str]:
    return sorted(os.listdir(store.spool_dir))


def refused(store: Store, data: bytes, match: str) -> None:
    with pytest.raises(BundleError, match=match):
        bundle.extract(store, io.BytesIO(data))
    assert spools(store) == [], "a refused bundle left spool files"


@pytest_twisted.ensureDeferred
async def test_round_trip_between_two_stores(stores):
    a, b = stores
    big = os.urandom(700_000)  # several chunks
    e1 = await put(a, "files", "big.bin", big)
    await put(a, "files", "copy.bin", big)  # the same body under a second key: one blob
    await put(a, "files", "up.bin", b"uploaded", pinned=True)
    await put(a, "other", "x", b"other remote")
    data, writer = await export(a, ["files"])
    assert writer.missing == [] and writer.blobs == 2
    assert len(data) % tarfile.RECORDSIZE == 0
    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert names[0] == "manifest.json" and names[-1] == "trailer.json"
    want = (e1.digest, hashlib.sha256(b"uploaded").hexdigest())
    assert sorted(names[1:-1]) == sorted(f"blobs/sha256/{d}" for d in want)

    extracted = await a.in_io(bundle.extract, b, io.BytesIO(data))
    man = extracted.manifest
    assert man["format"] == bundle.FORMAT and len(man["entries"]) == 3
    entries = [bundle.entry_from_doc(d, 3000.0) for d in man["entries"]]
    done = await bundle.commit_entries(b, extracted, entries)
    assert (done.entries, done.present, done.lost) == (3, 0, [])
    assert spools(b) == []
    got = await b.index.get("files:big.bin")
    assert got is not None and got.digest == e1.digest and got.headers == e1.headers and got.etag == '"e1"'
    assert (await b.read(got, 1 << 20)) == big
    up = await b.index.get("files:up.bin")
    assert up is not None and up.pinned
    assert await b.index.get("other:x") is None

    # Again: everything is already there.
    extracted = await a.in_io(bundle.extract, b, io.BytesIO(data))
    done = await bundle.commit_entries(b, extracted, [bundle.entry_from_doc(d, 3000.0) for d in man["entries"]])
    assert (done.entries, done.present) == (0, 3)
    assert spools(b) == []


@pytest_twisted.ensureDeferred
async def test_a_body_evicted_during_the_export_is_named_in_the_trailer(stores):
    a, b = stores
    gone = await put(a, "files", "gone.bin", b"evicted meanwhile")
    await put(a, "files", "kept.bin", b"still here")
    entries = await bundle.snapshot(a, None, None)
    await a.purge_key(gone.key)  # after the listing, before its body is read
    doc = bundle.manifest("test", [], entries, [], 2000.0)
    writer = bundle.BundleWriter(a, doc, [], 2000.0)
    data = b"".join(iter(writer.read, b""))
    assert [m["digest"] for m in writer.missing] == [gone.digest]
    extracted = await a.in_io(bundle.extract, b, io.BytesIO(data))
    assert list(extracted.blobs) == [hashlib.sha256(b"still here").hexdigest()]
    assert extracted.missing[0]["digest"] == gone.digest
    extracted.discard(b)


def test_map_key():
    assert bundle.map_key("files:a/b", "files", "mirror") == "mirror:a/b"
    assert bundle.map_key("oci:hub:x:manifest:sha256:ab", "hub", "dh") == "oci:dh:x:manifest:sha256:ab"
    assert bundle.map_key("archive/app/abc.tar.gz", "files", "x") is None
    assert bundle.map_key("same:x", "same", "same") == "same:x"


# -- bad archives ---------------------------------------------------------------------------


@pytest.fixture
def good(stores):
    a, b = stores
    pytest_twisted.blockon(Deferred.fromCoroutine(put(a, "files", "a.bin", b"A" * 5000)))
    data, _ = pytest_twisted.blockon(Deferred.fromCoroutine(export(a)))
    return b, data


def rebuild(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, body in members:
            info.size = len(body) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(body) if info.isreg() else None)
    return out.getvalue()


def members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    tf = tarfile.open(fileobj=io.BytesIO(data))
    return [(m, tf.extractfile(m).read()) for m in tf.getmembers()]  # type: ignore[union-attr]


def test_a_good_bundle_extracts(good):
    b, data = good
    bundle.extract(b, io.BytesIO(data)).discard(b)
    assert spools(b) == []


def test_a_tampered_body_is_refused(good):
    b, data = good
    ms = members(data)
    info, body = ms[1]
    ms[1] = (info, b"B" + body[1:])
    refused(b, rebuild(ms), "sha256 is")


def test_a_body_under_another_digest_is_refused(good):
    b, data = good
    ms = members(data)
    other = hashlib.sha256(b"x").hexdigest()
    ms[1][0].name = f"blobs/sha256/{other}"
    refused(b, rebuild(ms), "not listed in the manifest")


def test_an_unknown_format_version_is_refused(good):
    b, data = good
    ms = members(data)
    doc = json.loads(ms[0][1])
    doc["format"] = 99
    ms[0] = (ms[0][0], json.dumps(doc).encode())
    refused(b, rebuild(ms), "unknown bundle format version 99")


@pytest.mark.parametrize("cut", [100, 600, 2000, 4000, -2048])
def test_a_truncated_archive_is_refused(good, cut):
    b, data = good
    # -2048: every member whole, but the trailer cut off.
    short = data[:cut] if cut > 0 else data[:tarfile.open(fileobj=io.BytesIO(data)).getmembers()[-1].offset]
    refused(b, short, "truncated|not a tar|no manifest")


def test_an_empty_archive_is_refused(good):
    b, _ = good
    refused(b, b"", "not a tar|no manifest|truncated")
    refused(b, b"\0" * 10240, "no manifest")


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "blobs/sha256/../../x", "blobs/sha256/ABC",
                                  "manifest.json/../x", "git/01.bundle", "extra.txt"])
def test_unexpected_member_names_are_refused(good, name):
    b, data = good
    ms = members(data)
    ms.insert(1, (tarfile.TarInfo(name), b"payload"))
    refused(b, rebuild(ms), "unexpected member|not listed")


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.CHRTYPE])
def test_links_and_special_members_are_refused(good, kind):
    b, data = good
    ms = members(data)
    info = tarfile.TarInfo(ms[1][0].name)
    info.type = kind
    info.linkname = "/etc/passwd"
    ms[1] = (info, b"")
    refused(b, rebuild(ms), "not a regular file")


def test_a_member_after_the_trailer_is_refused(good):
    b, data = good
    ms = members(data)
    ms.append((tarfile.TarInfo("blobs/sha256/" + "0" * 64), b""))
    refused(b, rebuild(ms), "after trailer.json")


def test_a_missing_body_not_named_in_the_trailer_is_refused(good):
    b, data = good
    ms = members(data)
    del ms[1]
    refused(b, rebuild(ms), "neither in the archive nor named missing")


def test_the_manifest_must_come_first(good):
    b, data = good
    ms = members(data)
    ms[0], ms[1] = ms[1], ms[0]
    refused(b, rebuild(ms), "first member must be manifest.json")


def test_a_manifest_entry_without_its_blob_is_refused(good):
    b, data = good
    ms = members(data)
    doc = json.loads(ms[0][1])
    doc["entries"][0]["size"] += 1
    ms[0] = (ms[0][0], json.dumps(doc).encode())
    refused(b, rebuild(ms), "not in 'blobs' with its size")
    doc["entries"][0]["headers"] = {"X": 1}
    ms[0] = (ms[0][0], json.dumps(doc).encode())
    refused(b, rebuild(ms), "headers must map strings")


class _Tiered:
    """A content store with a local tier: ``ensure`` brings a body back (later, on the reactor)."""

    def __init__(self, inner: Any, kept: dict[str, bytes]) -> None:
        self.inner, self.kept, self.ensured = inner, kept, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def ensure(self, digest: str, size: int) -> bool:
        from twisted.internet.task import deferLater

        await deferLater(reactor, 0, lambda: None)
        self.ensured.append(digest)
        path = self.inner.local_path(digest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(self.kept[digest])
        return True


@pytest_twisted.ensureDeferred
async def test_a_body_outside_the_local_tier_is_brought_in_first(stores):
    a, b = stores
    e = await put(a, "files", "far.bin", b"in the bucket only")
    path = a.cas.local_path(e.digest)
    os.unlink(path)
    a.cas = _Tiered(a.cas, {e.digest: b"in the bucket only"})  # type: ignore[assignment]
    entries = await bundle.snapshot(a, None, None)
    writer = bundle.BundleWriter(a, bundle.manifest("t", [], entries, [], 1.0), [], 1.0)
    out = bytearray()
    while True:
        chunk = writer.read()
        if isinstance(chunk, Deferred):
            await chunk
            continue
        if not chunk:
            break
        out += chunk
    assert a.cas.ensured == [e.digest] and writer.missing == []
    extracted = await a.in_io(bundle.extract, b, io.BytesIO(bytes(out)))
    assert list(extracted.blobs) == [e.digest]
    extracted.discard(b)
