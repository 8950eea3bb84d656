"""``type: pypi-local`` remotes: private packages uploaded with ``twine upload``.

An upload (the legacy upload API, ``POST /pypi/<local>/``, a token with the
``write`` scope) is spooled to disk as it arrives, parsed in a worker thread
(:mod:`sparkcache.protocols.pypi.upload`), and its file committed pinned
(never evicted or purged as cache) under ``files/<project>/<filename>``; a
wheel's METADATA beside it as ``<filename>.metadata`` (PEP 658). Project
pages and the root index are generated from what is stored, with each file's
sha256, its metadata's, ``requires-python``, size and upload time.
Re-uploading a file name that exists is a 409, as on PyPI: a published file
never changes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import CancelledError

from sparkcache.config import RemoteConfig
from sparkcache.fetch import Target
from sparkcache.fetch.flight import BodyError
from sparkcache.fetch.produce import shield
from sparkcache.protocols._index import Runner
from sparkcache.protocols.pypi import pages
from sparkcache.protocols.pypi.index import file_path
from sparkcache.protocols.pypi.names import METADATA_SUFFIX, BadName, belongs_to, is_valid_filename, project
from sparkcache.protocols.pypi.upload import BadUpload, Upload, boundary_of, parse_upload, wheel_metadata
from sparkcache.store import Entry, SpoolFile
from sparkcache.web.bodies import request_spool
from sparkcache.web.errors import HTTPError
from sparkcache.web.serve import header

if TYPE_CHECKING:
    from sparkcache.context import Context

# Per upload: larger files need server.max_body_size raised too (the smaller one wins).
MAX_UPLOAD = 2 << 30
REQUIRES_PYTHON = "x-pypi-requires-python"
VERSION = "x-pypi-version"
MAX_PROJECTS = 100_000


class LocalProjects:
    """Pages generated from, and uploads committed to, the store of local remotes."""

    def __init__(self, ctx: "Context", run: Runner) -> None:
        self.ctx = ctx
        self.run = run
        # Keys being uploaded now: a second upload of the same file is a 409, not a race.
        self._uploading: set[str] = set()

    # -- reads ---------------------------------------------------------------------------

    async def page(self, remote: RemoteConfig, name: str) -> pages.Page | None:
        """The page of project ``name`` from the stored files; None when there is none."""
        entries = await self.ctx.store.list(remote.name, f"files/{name}/", limit=None)
        metadata = {e.path[: -len(METADATA_SUFFIX)]: e for e in entries if e.path.endswith(METADATA_SUFFIX)}
        links: list[pages.Link] = []
        versions: dict[str, None] = {}
        for e in entries:
            if e.path.endswith(METADATA_SUFFIX) or e.digest is None:
                continue
            meta = metadata.get(e.path)
            links.append(pages.Link(
                filename=e.path.rsplit("/", 1)[1], url="", hashes={"sha256": e.digest},
                requires_python=e.headers.get(REQUIRES_PYTHON) or None,
                core_metadata={"sha256": meta.digest} if meta is not None and meta.digest else False,
                size=e.size, upload_time=pages.upload_time(e.fetched),
            ))
            version = e.headers.get(VERSION)
            if version:
                versions.setdefault(version, None)
        if not links:
            return None
        return pages.Page(name, links, list(versions), {"api-version": pages.API_VERSION})

    async def projects(self, remote: RemoteConfig) -> list[str]:
        entries = await self.ctx.store.list(remote.name, "files/", limit=MAX_PROJECTS)
        return pages.project_names([e.path for e in entries])

    async def file(self, remote: RemoteConfig, name: str, filename: str) -> Entry | None:
        entry = await self.ctx.store.index.get(f"{remote.name}:{file_path(name, filename)}")
        return entry if entry is not None and entry.status == 200 else None

    # -- uploads -------------------------------------------------------------------------

    async def upload(self, request: Any, remote: RemoteConfig) -> dict[str, Any]:
        store = self.ctx.store
        try:
            boundary = boundary_of(header(request, b"content-type") or "")
        except BadUpload as e:
            raise HTTPError(400, str(e)) from None
        body = await request_spool(request, store)
        upload = Upload()
        # Made here, not in the worker: the store tracks its spools on the reactor.
        content = store.new_spool("up-")

        def parse() -> None:
            with body.reader() as f:
                parse_upload(f, boundary, lambda: content, upload)

        try:
            await self._in_worker(parse, content, body)
        except BadUpload as e:
            raise HTTPError(400, str(e)) from None
        store.discard(body)
        if upload.spool is None:
            self._discard(content)
        spool = upload.spool
        try:
            key, name, filename = self._vet(remote, upload)
        except BaseException:
            self._discard(spool)
            raise
        assert spool is not None and upload.filename is not None
        self._uploading.add(key)
        try:
            return await self._commit(remote, upload, spool, key, name, filename)
        finally:
            self._uploading.discard(key)

    def _vet(self, remote: RemoteConfig, upload: Upload) -> tuple[str, str, str]:
        action = upload.get(":action")
        if action != "file_upload":
            raise HTTPError(400, f"unsupported :action {action[:50]!r}; only file_upload is")
        if upload.spool is None or not upload.filename:
            raise HTTPError(400, "the upload has no content file")
        try:
            name = project(upload.get("name"))
        except BadName as e:
            raise HTTPError(400, str(e)) from None
        filename = upload.filename
        if not is_valid_filename(filename):
            raise HTTPError(400, f"{filename[:100]!r} is not a valid distribution file name")
        if not belongs_to(filename, name):
            raise HTTPError(400, f"{filename!r} is not a file of project {name!r}")
        if not upload.get("version"):
            raise HTTPError(400, "the upload names no version")
        sha256 = upload.get("sha256_digest").strip().lower()
        digest = upload.spool.hexdigest()
        if sha256 and sha256 != digest:
            raise HTTPError(400, f"sha256_digest {sha256} does not match the file's sha256 {digest}")
        key = f"{remote.name}:{file_path(name, filename)}"
        if key in self._uploading or self.ctx.store.index.peek(key) is not None:
            raise HTTPError(409, f"File already exists: {filename} is in {remote.name!r}; a published file "
                                 "never changes (upload a new version)")
        return key, name, filename

    async def _commit(self, remote: RemoteConfig, upload: Upload, spool: SpoolFile, key: str, name: str,
                      filename: str) -> dict[str, Any]:
        store = self.ctx.store
        existing = await store.index.get(key)
        if existing is not None and existing.status == 200:
            self._discard(spool)
            raise HTTPError(409, f"File already exists: {filename} is in {remote.name!r}")
        now = self.ctx.clock.seconds()
        stamp = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        path = file_path(name, filename)
        try:
            if filename.endswith(".whl"):
                # Beside the file, before it: a page never lists a wheel whose metadata is still to come.
                await self._adopt(Target(key + METADATA_SUFFIX, remote.name, path + METADATA_SUFFIX, pinned=True),
                                  await self._metadata(spool, filename),
                                  {"content-type": "text/plain; charset=utf-8", "last-modified": stamp})
        except BaseException:
            self._discard(spool)
            raise
        digest = spool.hexdigest()
        headers = {"content-type": "application/octet-stream", "etag": f'"sha256:{digest}"', "last-modified": stamp,
                   VERSION: upload.get("version")}
        if upload.get("requires_python"):
            headers[REQUIRES_PYTHON] = upload.get("requires_python")
        # adopt consumes the spool, kept or not.
        entry = await self._adopt(Target(key, remote.name, path, pinned=True, expected_digest=digest), spool, headers)
        return {"ok": True, "project": name, "filename": filename, "sha256": entry.digest, "size": entry.size}

    async def _metadata(self, spool: SpoolFile, filename: str) -> SpoolFile:
        """A spool holding the METADATA of the wheel in ``spool`` (BadUpload: 400)."""
        store = self.ctx.store
        out = store.new_spool("up-")

        def extract() -> None:
            with spool.reader() as f:
                out.write(wheel_metadata(f, filename))

        try:
            await self._in_worker(extract, out)
        except BadUpload as e:
            raise HTTPError(400, str(e)) from None
        return out

    async def _in_worker(self, job: Callable[[], None], *spools: SpoolFile) -> None:
        """Run ``job`` in the pool; when it fails, discard ``spools`` once it has
        ended (a client that leaves cancels its handler, not the thread, which
        may still be writing to them)."""
        d = self.run(job)
        try:
            await shield(d)
        except CancelledError:
            d.addBoth(lambda _: self._discard(*spools))
            raise
        except BaseException:
            self._discard(*spools)
            raise

    async def _adopt(self, target: Target, spool: SpoolFile, headers: dict[str, str]) -> Entry:
        try:
            return await self.ctx.cache.adopt(target, spool, headers)
        except BodyError as e:
            raise HTTPError(500, f"upload not stored: {e}") from None

    def _discard(self, *spools: SpoolFile | None) -> None:
        for spool in spools:
            if spool is not None:
                self.ctx.store.discard(spool)
