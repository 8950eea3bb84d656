"""``npm publish`` and ``npm dist-tag`` for ``type: npm-local`` remotes.

``npm publish`` PUTs the package's document with the new version(s) and
each tarball base64-encoded under ``_attachments``. The body is written to a
spool as it arrives (its size capped by the body gate, before any byte is
kept), then decoded and checked in a worker thread: the attachment must
hash to the version's ``dist.integrity`` (sha512) and ``dist.shasum`` (sha1).
The tarballs are then committed pinned through the cache's one commit path,
and the package's document, merged with what is stored, last, so a
document never lists a tarball that is not there. As on the public
registry, a version once published is never replaced (403).

Publishes and tag changes of one package run one at a time (a lock per
package), so two concurrent publishes of different versions both land.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredLock

from sparkcache.config import RemoteConfig
from sparkcache.fetch.cache import Target
from sparkcache.fetch.flight import BodyError
from sparkcache.fetch.produce import shield
from sparkcache.protocols.npm import names
from sparkcache.protocols.npm.packument import integrity_sha512
from sparkcache.web.bodies import request_spool
from sparkcache.web.errors import HTTPError

if TYPE_CHECKING:
    from sparkcache.context import Context
    from sparkcache.protocols._index import Runner

# A publish body (the tarball base64-encoded, plus the document) is decoded in
# memory: this bounds it, and the daemon's memory with it.
MAX_PUBLISH = 32 << 20
MAX_TAG_BODY = 4096
# Where a stored document's tarball URLs point; always rewritten to this cache's URL when served.
LOCAL_BASE = "https://npm-local.invalid"
_VERSION = re.compile(r"v?[0-9]+\.[0-9]+\.[0-9]+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class PublishError(HTTPError):
    pass


def local_key(remote: str, name: str) -> str:
    return f"{remote}:{name}"


@dataclass
class Publication:
    """A decoded, verified publish body."""

    doc: dict[str, Any]
    # file name → (tarball bytes, the digests the commit checks again)
    tarballs: dict[str, tuple[bytes, tuple[tuple[str, str], ...]]] = field(default_factory=dict)


def parse_publish(raw: bytes, name: str) -> Publication:
    """Decode and verify a publish body for package ``name`` (in a worker thread)."""
    if len(raw) > MAX_PUBLISH:
        raise PublishError(413, f"the publish body is over {MAX_PUBLISH} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise PublishError(400, "the publish body is not JSON") from None
    if not isinstance(doc, dict):
        raise PublishError(400, "the publish body is not a JSON object")
    if doc.get("name") != name:
        raise PublishError(400, f"the body publishes {str(doc.get('name'))[:100]!r}, the URL names {name!r}")
    versions, attachments = doc.get("versions"), doc.pop("_attachments", None)
    if not isinstance(versions, dict) or not versions:
        raise PublishError(400, "the body has no versions")
    if not isinstance(attachments, dict) or not attachments:
        raise PublishError(400, "the body has no tarball in _attachments (unpublish and deprecate are not supported)")
    # npm names an attachment <name>-<version>.tgz (@scope/name-1.0.0.tgz for a scoped
    # package); other clients use the tarball's file name.
    by_attachment: dict[str, dict[str, Any]] = {}
    for v, meta in versions.items():
        if not isinstance(meta, dict) or meta.get("version") != v or not _VERSION.fullmatch(v):
            raise PublishError(400, f"version {str(v)[:60]!r} is not a valid version document")
        if meta.get("name") != name:
            raise PublishError(400, f"version {v} names package {str(meta.get('name'))[:100]!r}")
        dist = meta.get("dist")
        if not isinstance(dist, dict) or not isinstance(dist.get("tarball"), str):
            raise PublishError(400, f"version {v} has no dist.tarball")
        by_attachment[f"{name}-{v}.tgz"] = meta
        by_attachment.setdefault(dist["tarball"].rpartition("/")[2], meta)
    out = Publication(doc)
    for key, att in attachments.items():
        meta = by_attachment.get(key) if isinstance(key, str) else None
        if meta is None:
            raise PublishError(400, f"invalid attachment name {str(key)[:80]!r}: it belongs to no version in the body")
        file = f"{name.rpartition('/')[2]}-{meta['version']}.tgz"
        if not names._FILE.fullmatch(file) or file in out.tarballs:
            raise PublishError(400, f"invalid attachment {str(key)[:80]!r}")
        data_b64 = att.get("data") if isinstance(att, dict) else None
        if not isinstance(data_b64, str):
            raise PublishError(400, f"attachment {file} has no data")
        try:
            data = base64.b64decode(data_b64, validate=True)
        except (binascii.Error, ValueError):
            raise PublishError(400, f"attachment {file} is not valid base64") from None
        length = att.get("length")
        if isinstance(length, int) and length != len(data):
            raise PublishError(400, f"attachment {file} is {len(data)} bytes, its length says {length}")
        dist = meta["dist"]
        checks: list[tuple[str, str]] = []
        want512 = integrity_sha512(dist.get("integrity"))
        if dist.get("integrity") is not None and want512 is None:
            raise PublishError(400, f"version {meta['version']}: dist.integrity has no sha512")
        if want512 is not None:
            got = hashlib.sha512(data).hexdigest()
            if got != want512:
                raise PublishError(400, f"attachment {file} does not match dist.integrity of {meta['version']}")
            checks.append(("sha512", want512))
        shasum = dist.get("shasum")
        if shasum is not None:
            if not isinstance(shasum, str) or hashlib.sha1(data).hexdigest() != shasum.lower():
                raise PublishError(400, f"attachment {file} does not match dist.shasum of {meta['version']}")
            checks.append(("sha1", shasum.lower()))
        if not checks:
            raise PublishError(400, f"version {meta['version']} has neither dist.integrity nor dist.shasum")
        dist["tarball"] = f"{LOCAL_BASE}/{names.url_name(name)}/-/{file}"
        out.tarballs[file] = (data, tuple(checks))
    if len(out.tarballs) != len(versions):
        attached = {f"{name.rpartition('/')[2]}-{v}.tgz" for v in versions}
        raise PublishError(400, f"no tarball attached for {', '.join(sorted(attached - set(out.tarballs)))}")
    return out


def merge(old: dict[str, Any] | None, new: dict[str, Any], name: str, now: str) -> dict[str, Any]:
    """The stored document after publishing ``new`` over ``old`` (403 on a version published before)."""
    old = old or {}
    old_versions = old.get("versions") or {}
    again = sorted(set(new["versions"]) & set(old_versions))
    if again:
        raise PublishError(403, f"cannot publish over the previously published versions: {', '.join(again)}")
    merged = dict(old)
    for k, v in new.items():
        if k not in ("versions", "dist-tags", "time", "_rev", "_id"):
            merged[k] = v
    merged["_id"] = merged["name"] = name
    merged["versions"] = {**old_versions, **new["versions"]}
    given = new.get("dist-tags")
    tags: dict[str, Any] = given if isinstance(given, dict) else {}
    merged["dist-tags"] = {**(old.get("dist-tags") or {}), **tags}
    if "latest" not in merged["dist-tags"]:
        merged["dist-tags"]["latest"] = sorted(new["versions"])[-1]
    times = dict(old.get("time") or {})
    times.setdefault("created", now)
    times["modified"] = now
    for v in new["versions"]:
        times[v] = now
    merged["time"] = times
    return merged


class Publisher:
    def __init__(self, ctx: "Context", run: "Runner") -> None:
        self.ctx = ctx
        self.run = run
        self._locks: dict[str, DeferredLock] = {}
        self.running: set[Deferred[Any]] = set()  # publishes being stored (a graceful stop waits for them)

    def may_publish(self, request: Any, remote: RemoteConfig) -> None:
        if remote.type != "npm-local":
            raise HTTPError(405, f"remote {remote.name!r} is a type: {remote.type} remote; publish to a "
                                 "type: npm-local remote", {"Allow": "GET, HEAD"})
        self.ctx.auth.require(request, "write")

    def _lock(self, key: str) -> DeferredLock:
        return self._locks.setdefault(key, DeferredLock())

    async def publish(self, request: Any, remote: RemoteConfig, name: str) -> dict[str, Any]:
        store = self.ctx.store
        spool = await request_spool(request, store)

        def read() -> bytes:
            with spool.reader() as f:
                return f.read(MAX_PUBLISH + 1)

        try:
            raw = await store.in_io(read)
        finally:
            store.discard(spool)
        pub = await self.run(parse_publish, raw, name)
        del raw
        # Once under way, a publish runs to its end even if its client leaves:
        # never tarballs committed without the document that lists them.
        d = Deferred.fromCoroutine(self._store_publication(remote, name, pub))
        self.running.add(d)
        d.addBoth(self._done, d)
        await shield(d)
        return {"ok": True, "id": name, "versions": sorted(pub.doc["versions"])}

    def _done(self, result: Any, d: "Deferred[Any]") -> Any:
        self.running.discard(d)
        return result

    async def _store_publication(self, remote: RemoteConfig, name: str, pub: Publication) -> None:
        key = local_key(remote.name, name)
        lock = self._lock(key)
        await lock.acquire()
        try:
            old = await self._load(key)
            merged = merge(old, pub.doc, name, self._now())
            for file, (data, checks) in pub.tarballs.items():
                path = f"{name}/-/{file}"
                await self._commit(Target(f"{remote.name}:{path}", remote.name, path, pinned=True, checks=checks),
                                   data, "application/octet-stream")
            await self._save(remote, name, merged)
        finally:
            lock.release()

    async def set_tag(self, request: Any, remote: RemoteConfig, name: str, tag: str, method: bytes) -> dict[str, Any]:
        if not _TAG.fullmatch(tag) or _VERSION.fullmatch(tag):
            raise HTTPError(400, f"invalid dist-tag {tag[:60]!r}")
        version = None
        if method != b"DELETE":
            raw = request.content.read(MAX_TAG_BODY + 1) if request.content is not None else b""
            try:
                version = json.loads(raw)
            except ValueError:
                version = None
            if not isinstance(version, str):
                raise HTTPError(400, 'the body of a dist-tag change is a JSON string: the version ("1.2.3")')
        elif tag == "latest":
            raise HTTPError(400, "the latest tag cannot be removed")
        key = local_key(remote.name, name)
        lock = self._lock(key)
        await lock.acquire()
        try:
            doc = await self._load(key)
            if doc is None:
                raise HTTPError(404, f"{name} is not published in {remote.name}")
            tags = doc.setdefault("dist-tags", {})
            if version is None:
                if tags.pop(tag, None) is None:
                    raise HTTPError(404, f"{name} has no dist-tag {tag!r}")
            else:
                if version not in (doc.get("versions") or {}):
                    raise HTTPError(404, f"{name}@{version[:60]} is not published in {remote.name}")
                tags[tag] = version
            doc.setdefault("time", {})["modified"] = self._now()
            await self._save(remote, name, doc)
        finally:
            lock.release()
        return {"ok": True, "id": name, "dist-tags": tags}

    # -- storage ---------------------------------------------------------------------------

    def _now(self) -> str:
        t = self.ctx.clock.seconds()
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"

    async def _load(self, key: str) -> dict[str, Any] | None:
        entry = await self.ctx.store.index.get(key)
        if entry is None or entry.status != 200:
            return None
        body = await self.ctx.store.read(entry, MAX_PUBLISH * 4)
        doc = await self.run(json.loads, body)
        if not isinstance(doc, dict):
            raise HTTPError(500, f"the stored document {key!r} is not a JSON object")
        return doc

    async def _save(self, remote: RemoteConfig, name: str, doc: dict[str, Any]) -> None:
        body = await self.run(lambda: json.dumps(doc, separators=(",", ":")).encode())
        await self._commit(Target(local_key(remote.name, name), remote.name, name, pinned=True), body,
                           "application/json")

    async def _commit(self, target: Target, data: bytes, ctype: str) -> None:
        store = self.ctx.store
        spool = store.new_spool("up-")
        try:
            await store.in_io(spool.write, data)
        except BaseException:
            store.discard(spool)
            raise
        digest = spool.hexdigest()
        last_modified = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(self.ctx.clock.seconds()))
        try:
            await self.ctx.cache.adopt(target, spool, {"content-type": ctype, "etag": f'"sha256:{digest}"',
                                                       "last-modified": last_modified})
        except BodyError as e:
            raise HTTPError(500, f"not stored: {e}") from None
