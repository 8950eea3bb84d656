"""Cache entries and the uploads that become them.

An entry is one keyed blob of the remote, stored under the name
``e/<scope>/<version>/<key>`` (scope and version percent-encoded, the key
last and raw, so that a restore key is a prefix of the names it matches):
the store's index row is the entry's metadata (key, version and scope in its
path, size, time stored). Entries are immutable: a key that exists is never
reserved again.

An upload is a :class:`Reservation` held in memory until it is committed:
the parts a client sent (one Azure ``BlockBlob`` PUT, Azure blocks, or v1
``PATCH`` chunks at their offsets, in any order and in parallel), each in a
spool of its own, assembled into one spool in the I/O pool when committed;
nothing of it is visible before. Reservations not committed in time are
dropped with their spools.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import quote

from twisted.logger import Logger

from sparkcache.protocols._keyed import KeyedBlobs
from sparkcache.store import Entry, SpoolFile
from sparkcache.web.errors import HTTPError

if TYPE_CHECKING:
    from sparkcache.context import Context

log = Logger()
MAX_KEY = 512
MAX_PARTS = 50_000
# Restore-key candidates looked at per prefix (the newest of them wins).
PREFIX_SCAN = 2_000


def check_key(key: str, what: str = "key") -> str:
    if not key or len(key) > MAX_KEY:
        raise HTTPError(400, f"a {what} is 1 to {MAX_KEY} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in key) or "," in key:
        raise HTTPError(400, f"a {what} holds no commas or control characters")
    return key


def entry_base(scope: str, version: str) -> str:
    return f"e/{quote(scope, safe='')}/{quote(version, safe='')}/"


def entry_name(scope: str, version: str, key: str) -> str:
    return entry_base(scope, version) + key


def entry_id(name: str) -> int:
    """A stable number for an entry (what v1 and v2 call its id): below 2**53, as JavaScript parses it."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:13], 16)


@dataclass
class Match:
    entry: Entry
    key: str
    scope: str
    name: str


async def lookup(blobs: KeyedBlobs, scopes: Iterable[str], version: str, key: str,
                 restore_keys: Iterable[str]) -> Match | None:
    """GitHub's matching: in each scope in turn, the key exactly, then each
    restore key exactly and then as a prefix (the newest entry it begins)."""
    ctx = blobs.ctx
    restore = list(restore_keys)
    for scope in scopes:
        base = entry_base(scope, version)
        for i, k in enumerate([key, *restore]):
            entry = await blobs.get(base + k)
            if entry is not None:
                return Match(entry, k, scope, base + k)
            if i == 0:
                continue
            try:
                candidates = await ctx.store.list(blobs.remote.name, base + k, PREFIX_SCAN)
            except Exception:
                log.failure("{remote}: listing entries failed; answering a miss", remote=blobs.remote.name)
                return None
            now = ctx.clock.seconds()
            live = [e for e in candidates if e.fresh(now) and ctx.store.exists(e)]
            if live:
                newest = max(live, key=lambda e: (e.fetched, e.path))
                ctx.store.index.touch(newest, now)
                return Match(newest, newest.path[len(base):], scope, newest.path)
    return None


@dataclass
class Reservation:
    """An upload in progress, until committed or expired."""

    cache_id: int
    token: str
    name: str
    key: str
    version: str
    scope: str
    expires: float
    size_hint: int | None = None
    # A whole body (an Azure single-shot PUT, or the blocks once listed).
    body: SpoolFile | None = None
    # Azure blocks by id, and v1 chunks by (start, end), not yet assembled.
    blocks: dict[str, SpoolFile] = field(default_factory=dict)
    chunks: dict[tuple[int, int], SpoolFile] = field(default_factory=dict)
    committing: bool = False

    def spools(self) -> list[SpoolFile]:
        return [*([self.body] if self.body is not None else []), *self.blocks.values(), *self.chunks.values()]

    def stored_bytes(self) -> int:
        return sum(s.size for s in self.spools())


class Reservations:
    """The uploads in progress of one remote, by v1 cache id, v2 URL token and entry name."""

    def __init__(self, ctx: "Context", ttl: float, limit: int = 1_000) -> None:
        self.ctx = ctx
        self.ttl = ttl
        self.limit = limit
        self._next_id = 1
        self.by_id: dict[int, Reservation] = {}
        self.by_token: dict[str, Reservation] = {}
        self.by_name: dict[str, Reservation] = {}

    def sweep(self) -> None:
        now = self.ctx.clock.seconds()
        for r in [r for r in self.by_id.values() if r.expires <= now and not r.committing]:
            self.drop(r)

    def reserve(self, name: str, key: str, version: str, scope: str, size_hint: int | None) -> Reservation | None:
        """A new reservation, or None when one for the name is in progress."""
        self.sweep()
        if name in self.by_name:
            return None
        if len(self.by_id) >= self.limit:
            raise HTTPError(429, "too many uploads in progress; try again later")
        r = Reservation(self._next_id, os.urandom(16).hex(), name, key, version, scope,
                        self.ctx.clock.seconds() + self.ttl, size_hint)
        self._next_id += 1
        self.by_id[r.cache_id] = r
        self.by_token[r.token] = r
        self.by_name[name] = r
        return r

    def live(self, r: Reservation | None) -> Reservation:
        if r is None or r.expires <= self.ctx.clock.seconds():
            raise HTTPError(404, "no such upload in progress (unknown, committed or expired)")
        return r

    def drop(self, r: Reservation) -> None:
        for spool in r.spools():
            self.ctx.store.discard(spool)
        r.body, r.blocks, r.chunks = None, {}, {}
        self.by_id.pop(r.cache_id, None)
        self.by_token.pop(r.token, None)
        if self.by_name.get(r.name) is r:
            del self.by_name[r.name]

    def clear(self) -> None:
        for r in list(self.by_id.values()):
            self.drop(r)

    def keep(self, parts: dict[Any, SpoolFile], part: Any, spool: SpoolFile) -> None:
        """Keep ``spool`` as ``part``, replacing (and discarding) a retried one."""
        old = parts.pop(part, None)
        if old is not None:
            self.ctx.store.discard(old)
        parts[part] = spool

    async def assemble(self, parts: list[SpoolFile]) -> SpoolFile:
        """One hashed spool of ``parts`` in order, copied in the I/O pool (never in memory)."""
        store = self.ctx.store
        out = store.new_spool("gha-")

        def copy() -> None:
            for part in parts:
                out.append_from(part)

        try:
            await store.in_io(copy)
        except BaseException:
            store.discard(out)
            raise
        return out


def chunk_order(chunks: dict[tuple[int, int], SpoolFile], size: int) -> list[SpoolFile]:
    """The v1 chunks in offset order; HTTPError 400 unless they tile [0, size) exactly."""
    at = 0
    ordered = []
    for (start, end), spool in sorted(chunks.items()):
        if start != at:
            raise HTTPError(400, f"the uploaded chunks do not cover bytes {at}-{start - 1}"
                            if start > at else f"uploaded chunks overlap at byte {start}")
        ordered.append(spool)
        at = end + 1
    if at != size:
        raise HTTPError(400, f"{at} bytes were uploaded, the commit says {size}")
    return ordered
