"""What a dagger remote keeps besides its blobs: the URL-signing secret and the
cache graph, both as small entries in the store (through the engine's one
commit path, pinned: eviction must not forget what the blobs are for, and
both are bounded), so signed URLs and the graph survive a restart.

Signed URLs: HMAC-SHA256 over the remote, the operation, the blob's digest,
the cache-mount name and size (uploads of cache mounts) and the expiry; the
secret is the remote's ``signing_secret`` or 32 random bytes generated on
first use and stored (``_dagger:<remote>:secret``). Verification is constant
time and checks the expiry against the daemon's clock.
"""

from __future__ import annotations

import binascii
import json
import os
from typing import TYPE_CHECKING

from twisted.internet.defer import DeferredLock
from twisted.logger import Logger

from sparkcache.fetch import Target
from sparkcache.protocols.dagger.graph import Graph

if TYPE_CHECKING:
    from sparkcache.config import RemoteConfig
    from sparkcache.context import Context

log = Logger()
STATE_REMOTE = "_dagger"
# The stored graph document is at most this large: past it, the graph is cut down before storing.
MAX_GRAPH_BYTES = 16 << 20
# Cache mounts remembered per remote (an engine has a handful).
MAX_MOUNTS = 1000


def dumps(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


class RemoteState:
    """The secret and graph of one remote, loaded on first use, stored on change."""

    def __init__(self, ctx: "Context", remote: "RemoteConfig", configured_secret: str | None, max_keys: int) -> None:
        self.ctx = ctx
        self.remote = remote
        self._configured = configured_secret.encode() if configured_secret else None
        self._secret: bytes | None = None
        self.graph = Graph(max_keys=max_keys, max_links=2 * max_keys)
        # cache-mount name → (digest, size)
        self.mounts: dict[str, tuple[str, int]] = {}
        self.loaded = False
        self._lock = DeferredLock()

    def _key(self, what: str) -> str:
        return f"{STATE_REMOTE}:{self.remote.name}:{what}"

    async def _read(self, what: str, limit: int) -> bytes | None:
        store = self.ctx.store
        try:
            entry = await store.index.get(self._key(what))
            if entry is not None and entry.status == 200 and store.exists(entry):
                return await store.read(entry, limit)
        except Exception as e:
            log.warn("dagger {remote}: could not read its stored {what} ({why})", remote=self.remote.name,
                     what=what, why=e)
        return None

    async def _write(self, what: str, data: bytes) -> bool:
        spool = self.ctx.store.new_spool("dagger-")
        try:
            await self.ctx.store.in_io(spool.write, data)  # up to MAX_GRAPH_BYTES: off the reactor
            await self.ctx.cache.adopt(Target(self._key(what), STATE_REMOTE, f"{self.remote.name}/{what}",
                                              pinned=True), spool, {"content-type": "application/json"})
            return True
        except Exception as e:
            self.ctx.store.discard(spool)  # a no-op once adopt consumed it
            # A full store must not stop the cache: the state lives on in memory.
            log.warn("dagger {remote}: could not store its {what} ({why}); kept in memory",
                     remote=self.remote.name, what=what, why=e)
            return False

    async def load(self) -> None:
        if self.loaded:
            return
        await self._lock.acquire()
        try:
            if self.loaded:
                return
            if self._configured is None:
                stored = await self._read("secret", 256)
                if stored and len(stored.strip()) >= 32:
                    self._secret = stored.strip()
                else:
                    self._secret = binascii.hexlify(os.urandom(32))
                    await self._write("secret", self._secret)
            raw = await self._read("graph", MAX_GRAPH_BYTES + 1)
            if raw:
                try:
                    doc = await self.ctx.store.in_io(json.loads, raw)
                    self.graph.load_json(doc["graph"])
                    self.mounts = {str(n): (str(d), int(s)) for n, (d, s) in doc.get("mounts", {}).items()}
                except Exception as e:
                    log.warn("dagger {remote}: its stored graph is unreadable ({why}); starting empty",
                             remote=self.remote.name, why=e)
            self.graph.dirty = False
            self.loaded = True
        finally:
            self._lock.release()

    @property
    def secret(self) -> bytes:
        secret = self._configured or self._secret
        assert secret is not None, "load() first"
        return secret

    async def set_mount(self, name: str, digest: str, size: int) -> None:
        if self.mounts.get(name) != (digest, size):
            self.mounts.pop(name, None)
            self.mounts[name] = (digest, size)
            while len(self.mounts) > MAX_MOUNTS:
                del self.mounts[next(iter(self.mounts))]  # the least recently uploaded
            self.graph.dirty = True
            await self.save()

    async def save(self) -> bool:
        """Store the graph and mounts (one document, replaced whole) when they
        changed; False when the store could not take it."""
        await self._lock.acquire()
        try:
            if not self.graph.dirty:
                return True
            self.graph.dirty = False
            doc = {"graph": self.graph.to_json(), "mounts": {n: list(v) for n, v in self.mounts.items()}}
            # A snapshot of plain lists and dicts: dumped off the reactor.
            data = await self.ctx.store.in_io(dumps, doc)
            bound = (self.graph.max_keys, self.graph.max_links)
            while len(data) > MAX_GRAPH_BYTES and self.graph.keys:
                # Forget the least recently reported half until it fits.
                self.graph.max_keys = max(1, len(self.graph.keys) // 2)
                self.graph.max_links = 2 * self.graph.max_keys
                self.graph.update_records({})
                doc["graph"] = self.graph.to_json()
                data = await self.ctx.store.in_io(dumps, doc)
            self.graph.max_keys, self.graph.max_links = bound
            if not await self._write("graph", data):
                self.graph.dirty = True  # try again on the next change
                return False
            return True
        finally:
            self._lock.release()

