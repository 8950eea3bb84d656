"""Air-gap bundles: the store's entries and bodies as one tar, and back.

A bundle is a POSIX (pax) tar whose members come in this order::

    manifest.json           format, source version, remotes, every entry, every blob, git mirrors
    blobs/sha256/<hex>      each body the manifest lists, named by its sha256
    git/<n>.bundle          ``git bundle create --all`` of the n-th mirror of manifest["git"]
    trailer.json            what is missing (a body evicted between the listing and
                            its read) and why; its presence says the archive is whole

Writing (:class:`BundleWriter`) runs on the reactor one chunk at a time, as
the HTTP response asks for them: a body is opened by its digest when its turn
comes (eviction passes it by while it is open) and read with ``pread``. An
entry whose body vanished since the listing is not in the archive and named
in the trailer.

Reading (:func:`extract`) blocks (call it in the I/O pool): it walks the tar
member by member, refuses any member it does not expect (other names, links,
directories, ``..``), copies every body into a spool of its own, hashed as it
is written, and checks each digest against its name and the manifest. Only
when the whole archive has been read and verified does :func:`commit_entries`
make entries visible, through the store's one commit path.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any, Generator, Iterator, Union

from twisted.internet.defer import Deferred

from sparkcache.store import BodyRange, Entry, SpoolFile, Store

FORMAT = 1
MANIFEST = "manifest.json"
TRAILER = "trailer.json"
BLOB_NAME = re.compile(r"blobs/sha256/([0-9a-f]{64})")
GIT_NAME = re.compile(r"git/(0|[1-9][0-9]{0,5})\.bundle")
# The manifest and the trailer are parsed in memory: bounded.
MAX_MANIFEST = 512 << 20
MAX_TRAILER = 64 << 20
CHUNK = 256 << 10
COPY = 1 << 20
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BundleError(Exception):
    """A bundle that cannot be imported: the message says why (for the JSON error)."""


# -- entries <-> manifest --------------------------------------------------------------------


def entry_doc(e: Entry) -> dict[str, Any]:
    """What the manifest says of one entry (everything the index holds but access times)."""
    return {"key": e.key, "remote": e.remote, "path": e.path, "status": e.status, "digest": e.digest,
            "size": e.size, "content_type": e.content_type, "headers": e.headers, "fetched": e.fetched,
            "expires": e.expires, "etag": e.etag, "last_modified": e.last_modified, "pinned": e.pinned,
            "kept": e.kept}


def entry_from_doc(doc: Any, now: float) -> Entry:
    """An Entry from the manifest, every field checked; BundleError when malformed."""
    if not isinstance(doc, dict):
        raise BundleError("manifest: an entry is not an object")

    def want(name: str, types: Any, optional: bool = False) -> Any:
        v = doc.get(name)
        if v is None and optional:
            return None
        if not isinstance(v, types) or isinstance(v, bool) and types in (int, (int, float)):
            raise BundleError(f"manifest: entry {doc.get('key')!r}: bad {name!r}")
        return v

    headers = want("headers", dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise BundleError(f"manifest: entry {doc.get('key')!r}: headers must map strings to strings")
    digest = want("digest", str)
    if not _HEX64.fullmatch(digest):
        raise BundleError(f"manifest: entry {doc.get('key')!r}: digest is not a sha256")
    size = want("size", int)
    if size < 0:
        raise BundleError(f"manifest: entry {doc.get('key')!r}: negative size")
    return Entry(want("key", str), want("remote", str), want("path", str), want("status", int), digest, size,
                 want("content_type", str, True), headers, float(want("fetched", (int, float))),
                 _opt_float(want("expires", (int, float), True)), want("etag", str, True),
                 want("last_modified", str, True), now, bool(doc.get("pinned")), bool(doc.get("kept")))


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def map_key(key: str, old: str, new: str) -> str | None:
    """``key`` of remote ``old`` under remote ``new``: the remote's name is the
    key's first ``:`` field (``files:a.bin``), or its second after a protocol
    prefix (``oci:hub:...``); None when the key names it neither way."""
    if old == new:
        return key
    if key.startswith(old + ":"):
        return new + key[len(old):]
    head, sep, rest = key.partition(":")
    if sep and rest.startswith(old + ":"):
        return f"{head}:{new}{rest[len(old):]}"
    return None


async def snapshot(store: Store, remotes: list[str] | None, since: float | None) -> list[Entry]:
    """The entries with a body of ``remotes`` (None: every remote), fetched at or
    after ``since``: the listing an export is made of."""
    return await store.index.entries_with_body(remotes, since)


def manifest(version: str, remotes: list[dict[str, Any]], entries: list[Entry],
             git: list["GitPart"], created: float) -> dict[str, Any]:
    blobs: dict[str, int] = {}
    for e in entries:
        assert e.digest is not None
        blobs[e.digest] = e.size
    return {"format": FORMAT, "created": created, "source_version": version, "remotes": remotes,
            "entries": [entry_doc(e) for e in entries], "blobs": blobs,
            "git": [g.doc() for g in git]}


def encode(doc: dict[str, Any]) -> bytes:
    """The manifest as written (compact JSON); a large one takes a while: call it in a pool."""
    return json.dumps(doc, separators=(",", ":")).encode()


# -- writing -------------------------------------------------------------------------------


@dataclass
class GitPart:
    """One mirror's ``git bundle`` made for an export: a scratch file in the spool."""

    name: str
    url: str
    refs: dict[str, str]
    head: str | None
    spool: SpoolFile
    size: int = 0
    sha256: str = ""

    def doc(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "refs": self.refs, "head": self.head, "size": self.size,
                "sha256": self.sha256}


def member_header(name: str, size: int, mtime: float) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(mtime)
    info.mode = 0o644
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


# What BundleWriter.read gives: bytes of the archive, or a Deferred to wait for
# first (a body being brought into a local tier) before reading on.
Chunk = Union[bytes, "Deferred[Any]"]


class BundleWriter:
    """The archive as consecutive chunks: ``read()`` returns the next one
    (at most CHUNK bytes of a body, or a header), b"" at the end, or a
    Deferred to wait for before reading on (a content store with a local
    tier fetching a body into it). On the reactor: a body is opened when its
    turn comes and read with pread. BundleError when a body turns out
    shorter than its size (the response must then be cut off, never ended
    cleanly)."""

    def __init__(self, store: Store, doc: dict[str, Any], git: list[GitPart], mtime: float,
                 encoded: bytes | None = None) -> None:
        """``encoded``: ``doc`` as JSON already (:func:`encode`, made off the reactor)."""
        self.store = store
        self.manifest = doc
        self.encoded = encoded
        self.git = git
        self.mtime = mtime
        self.missing: list[dict[str, Any]] = []
        self.written = 0  # bytes of the archive so far
        self.blobs = 0
        self._open: BodyRange | None = None
        self._chunks = self._generate()

    def read(self) -> Chunk:
        chunk = next(self._chunks, b"")
        if isinstance(chunk, bytes):
            self.written += len(chunk)
        return chunk

    def close(self) -> None:
        self._chunks.close()
        if self._open is not None:
            body, self._open = self._open, None
            body.close()

    def _generate(self) -> Generator[Chunk, None, None]:
        yield from self._member(MANIFEST, self.encoded if self.encoded is not None else encode(self.manifest))
        for digest, size in sorted(self.manifest["blobs"].items()):
            if self.store.needs_fill(digest):
                yield Deferred.fromCoroutine(self.store.fill(digest, size))
            body = self._open_blob(digest, size)
            if body is None:
                continue
            self._open = body
            try:
                yield member_header(f"blobs/sha256/{digest}", size, self.mtime)
                offset = 0
                while offset < size:
                    data = body.read(offset, CHUNK)
                    if not data:
                        raise BundleError(f"the body {digest} is shorter than its {size} bytes")
                    offset += len(data)
                    yield data
                if size % BLOCK:
                    yield bytes(-size % BLOCK)
            finally:
                self._open = None
                body.close()
            self.blobs += 1
        for n, part in enumerate(self.git):
            yield from self._git_member(n, part)
        trailer = {"complete": True, "blobs": self.blobs, "missing": self.missing}
        yield from self._member(TRAILER, json.dumps(trailer).encode())
        end = 2 * BLOCK
        yield bytes(end + (-(self.written + end) % RECORD))

    def _open_blob(self, digest: str, size: int) -> BodyRange | None:
        try:
            body = self.store.open_digest(digest, size)
        except FileNotFoundError:
            self.missing.append({"digest": digest, "reason": "evicted or purged during the export"})
            return None
        if os.fstat(body.fileno()).st_size != size:
            body.close()
            self.missing.append({"digest": digest, "reason": "the stored body is not of its recorded size"})
            return None
        return body

    def _member(self, name: str, data: bytes) -> Iterator[bytes]:
        yield member_header(name, len(data), self.mtime)
        yield data + bytes(-len(data) % BLOCK)

    def _git_member(self, n: int, part: GitPart) -> Iterator[bytes]:
        reader = part.spool.reader()
        try:
            yield member_header(f"git/{n}.bundle", part.size, self.mtime)
            offset = 0
            while offset < part.size:
                data = reader.pread(min(CHUNK, part.size - offset), offset)
                if not data:
                    raise BundleError(f"the git bundle of {part.name} is shorter than {part.size} bytes")
                offset += len(data)
                yield data
            if part.size % BLOCK:
                yield bytes(-part.size % BLOCK)
        finally:
            reader.close()


# -- reading -------------------------------------------------------------------------------


@dataclass
class Extracted:
    """A verified bundle: its manifest, a spool per body, a file per git bundle."""

    manifest: dict[str, Any]
    blobs: dict[str, SpoolFile] = field(default_factory=dict)
    git: dict[int, SpoolFile] = field(default_factory=dict)
    missing: list[dict[str, Any]] = field(default_factory=list)

    def discard(self, store: Store) -> None:
        for spool in [*self.blobs.values(), *self.git.values()]:
            store.discard(spool)
        self.blobs.clear()
        self.git.clear()


def extract(store: Store, fileobj: IO[bytes]) -> Extracted:
    """Blocking (the I/O pool): read and verify a whole bundle from ``fileobj``.
    BundleError on anything wrong; nothing it spooled is left behind then."""
    out = Extracted({})
    try:
        _extract(store, fileobj, out)
    except BaseException:
        out.discard(store)
        raise
    return out


def _extract(store: Store, fileobj: IO[bytes], out: Extracted) -> None:
    try:
        # Seekable (a spool): members' data are read in place, without the
        # stream mode's 10 KiB buffer copies (half the CPU of an import).
        tar = tarfile.open(fileobj=fileobj, mode="r:")
    except tarfile.TarError as e:
        raise BundleError(f"not a tar archive: {e}") from None
    trailer: dict[str, Any] | None = None
    try:
        while True:
            member = tar.next()
            if member is None:
                break
            tar.members.clear()  # type: ignore[attr-defined]  # one TarInfo per body adds up over millions
            name = member.name
            if trailer is not None:
                raise BundleError(f"member {name!r} after {TRAILER}")
            if not member.isreg():
                raise BundleError(f"member {name!r} is not a regular file")
            if not out.manifest:
                if name != MANIFEST:
                    raise BundleError(f"the first member must be {MANIFEST}, not {name!r}")
                out.manifest = _check_manifest(_small_json(tar, member, MAX_MANIFEST))
                continue
            if name == TRAILER:
                trailer = _small_json(tar, member, MAX_TRAILER)
                continue
            m = BLOB_NAME.fullmatch(name)
            if m:
                _blob(store, tar, member, m.group(1), out)
                continue
            g = GIT_NAME.fullmatch(name)
            if g:
                _git(store, tar, member, int(g.group(1)), out)
                continue
            raise BundleError(f"unexpected member {name!r} (a bundle holds {MANIFEST}, blobs/sha256/<sha256>, "
                              f"git/<n>.bundle and {TRAILER})")
    except (tarfile.TarError, EOFError) as e:
        raise BundleError(f"the archive is truncated or damaged: {e}") from None
    if not out.manifest:
        raise BundleError(f"no {MANIFEST}: not a sparkcache bundle (or an empty archive)")
    if trailer is None:
        raise BundleError(f"the archive ends before its {TRAILER}: truncated")
    _check_complete(out, trailer)


def _small_json(tar: tarfile.TarFile, member: tarfile.TarInfo, cap: int) -> Any:
    if member.size > cap:
        raise BundleError(f"{member.name} is larger than {cap} bytes")
    f = tar.extractfile(member)
    assert f is not None
    data = f.read()
    if len(data) != member.size:
        raise BundleError(f"the archive is truncated inside {member.name}")
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise BundleError(f"{member.name} is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{member.name} is not a JSON object")
    return doc


def _check_manifest(doc: dict[str, Any]) -> dict[str, Any]:
    if doc.get("format") != FORMAT:
        raise BundleError(f"unknown bundle format version {doc.get('format')!r} (this daemon reads {FORMAT})")
    blobs = doc.get("blobs")
    if not isinstance(blobs, dict) or not all(_HEX64.fullmatch(d) and type(s) is int and s >= 0
                                              for d, s in blobs.items()):
        raise BundleError("manifest: 'blobs' must map sha256 digests to sizes")
    for key in ("entries", "git", "remotes"):
        if not isinstance(doc.get(key), list):
            raise BundleError(f"manifest: {key!r} must be a list")
    for e in doc["entries"]:
        entry = entry_from_doc(e, 0.0)
        if blobs.get(entry.digest) != entry.size:
            raise BundleError(f"manifest: entry {entry.key!r}: its body is not in 'blobs' with its size")
    for g in doc["git"]:
        if not (isinstance(g, dict) and isinstance(g.get("url"), str) and isinstance(g.get("name"), str)
                and isinstance(g.get("sha256"), str) and isinstance(g.get("size"), int)):
            raise BundleError("manifest: a git entry needs name, url, sha256 and size")
    return doc


def _copy(tar: tarfile.TarFile, member: tarfile.TarInfo, spool: SpoolFile) -> None:
    src = tar.extractfile(member)
    assert src is not None
    while True:
        chunk = src.read(COPY)
        if not chunk:
            break
        spool.write(chunk)
    if spool.size != member.size:
        raise BundleError(f"the archive is truncated inside {member.name}")


def _blob(store: Store, tar: tarfile.TarFile, member: tarfile.TarInfo, digest: str, out: Extracted) -> None:
    want = out.manifest["blobs"].get(digest)
    if want is None:
        raise BundleError(f"{member.name} is not listed in the manifest")
    if digest in out.blobs:
        raise BundleError(f"{member.name} appears twice")
    if member.size != want:
        raise BundleError(f"{member.name} has {member.size} bytes, the manifest says {want}")
    spool = store.new_spool("import-")
    out.blobs[digest] = spool
    _copy(tar, member, spool)
    got = spool.hexdigest()
    if got != digest:
        raise BundleError(f"{member.name}: its sha256 is {got}, not the digest it is named by")


def _git(store: Store, tar: tarfile.TarFile, member: tarfile.TarInfo, n: int, out: Extracted) -> None:
    mirrors = out.manifest["git"]
    if n >= len(mirrors) or n in out.git:
        raise BundleError(f"{member.name} is not listed in the manifest (or appears twice)")
    want = mirrors[n]
    if member.size != want["size"]:
        raise BundleError(f"{member.name} has {member.size} bytes, the manifest says {want['size']}")
    spool = store.new_spool("import-git-")
    out.git[n] = spool
    _copy(tar, member, spool)
    spool.sync_and_close()
    got = spool.hexdigest()
    if got != want["sha256"]:
        raise BundleError(f"{member.name} ({want['name']}): its sha256 is {got}, the manifest says {want['sha256']}")


def _check_complete(out: Extracted, trailer: dict[str, Any]) -> None:
    missing = trailer.get("missing")
    if trailer.get("complete") is not True or not isinstance(missing, list):
        raise BundleError(f"{TRAILER} does not say the archive is complete")
    said = {m.get("digest") for m in missing if isinstance(m, dict)}
    absent = [d for d in out.manifest["blobs"] if d not in out.blobs and d not in said]
    if absent:
        raise BundleError(f"{len(absent)} body(ies) of the manifest are neither in the archive nor named missing "
                          f"in its trailer (first: {absent[0]})")
    lost_git = [g["name"] for n, g in enumerate(out.manifest["git"]) if n not in out.git]
    if lost_git:
        raise BundleError(f"the git bundle of {lost_git[0]} is not in the archive")
    out.missing = [m for m in missing if isinstance(m, dict)]


# -- committing ----------------------------------------------------------------------------


@dataclass
class Committed:
    entries: int = 0  # made visible
    present: int = 0  # already there with the same body
    kept_newer: int = 0  # the importing side's entry is newer or pinned: left alone
    lost: list[str] = field(default_factory=list)  # keys whose body went meanwhile


async def commit_entries(store: Store, extracted: Extracted, entries: list[Entry]) -> Committed:
    """Make ``entries`` (their bodies verified in ``extracted``) visible through
    the store's commit path, one body at a time; a body no entry takes is
    discarded. An entry already stored with the same body is left as it is;
    one stored with another body is replaced only when the bundle's is newer
    and the stored one is not pinned."""
    result = Committed()
    by_digest: dict[str, list[Entry]] = {}
    for e in entries:
        assert e.digest is not None
        by_digest.setdefault(e.digest, []).append(e)
    try:
        for digest, group in by_digest.items():
            spool = extracted.blobs.pop(digest, None)
            for e in group:
                current = await store.index.get(e.key)
                if current is not None and current.digest == e.digest and current.status == e.status:
                    result.present += 1
                    continue
                if current is not None and (current.pinned or current.fetched > e.fetched):
                    result.kept_newer += 1
                    continue
                if spool is not None:
                    await store.commit(spool, e)
                    spool = None
                    result.entries += 1
                elif await store.link(e):
                    result.entries += 1
                else:
                    result.lost.append(e.key)
            if spool is not None:
                store.discard(spool)
    finally:
        extracted.discard(store)
    await store.refresh_stats()
    return result
