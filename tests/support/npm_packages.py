"""npm packages made in a test: tarballs, packuments, and an in-memory registry.

``NpmMemoryUpstream`` is a :class:`MemoryUpstream` that also answers like a
registry: ``publish(name, version)`` makes a tarball and (re)writes both
forms of the package's packument, the full one for ``Accept:
application/json`` and the abbreviated one for
``application/vnd.npm.install-v1+json``, at the path a registry client
asks for (``/@scope%2Fname``).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
from typing import Any
from urllib.parse import quote

from tests.support.client import Response
from tests.support.memory_upstream import MemoryUpstream

ABBREVIATED = "application/vnd.npm.install-v1+json"
ABBREVIATED_SUFFIX = "?form=abbreviated"


def packument_of(resp: Response) -> Any:
    """The JSON document of a 200 packument response (gzipped or not)."""
    assert resp.status == 200, resp.describe()
    body = gzip.decompress(resp.body) if resp.header("Content-Encoding") == "gzip" else resp.body
    return json.loads(body)


def npm_error(resp: Response, status: int) -> str:
    """The message of an error answered in npm's JSON (and that it is one)."""
    assert resp.status == status, resp.describe()
    assert resp.header("Content-Type") == "application/json", resp.describe()
    message = json.loads(resp.body)["error"]
    assert isinstance(message, str)
    return message


def make_tarball(name: str, version: str, dependencies: dict[str, str] | None = None,
                 files: dict[str, bytes] | None = None) -> bytes:
    """A package tarball (``package/package.json`` and ``files``), byte-identical for identical arguments."""
    manifest = {"name": name, "version": version, "main": "index.js", "dependencies": dependencies or {}}
    members = {"package/package.json": json.dumps(manifest, indent=2).encode(),
               "package/index.js": f"module.exports = {json.dumps(name + '@' + version)};\n".encode()}
    for path, data in (files or {}).items():
        members[f"package/{path}"] = data
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, data in sorted(members.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), 499162500, 0o644
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def file_name(name: str, version: str) -> str:
    return f"{name.rpartition('/')[2]}-{version}.tgz"


def version_doc(name: str, version: str, data: bytes, tarball_url: str,
                dependencies: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name, "version": version, "dependencies": dependencies or {}, "description": "x" * 40,
        "readme": f"# {name}\n" + "words " * 50,
        "dist": {"tarball": tarball_url, "integrity": integrity(data), "shasum": hashlib.sha1(data).hexdigest(),
                 "signatures": [{"keyid": "SHA256:test", "sig": "MEUCIQ" + "A" * 60}]},
    }


def abbreviated(doc: dict[str, Any]) -> dict[str, Any]:
    keep = ("name", "version", "dependencies", "dist", "deprecated")
    return {"name": doc["name"], "modified": "2024-01-01T00:00:00.000Z", "dist-tags": doc["dist-tags"],
            "versions": {v: {k: m[k] for k in keep if k in m} for v, m in doc["versions"].items()}}


def publish_body(name: str, version: str, data: bytes, registry: str = "http://cache.test/npm/internal/",
                 dependencies: dict[str, str] | None = None) -> dict[str, Any]:
    """What ``npm publish`` PUTs for one version."""
    file = file_name(name, version)
    v = version_doc(name, version, data, f"{registry}{name}/-/{file}", dependencies)
    del v["dist"]["signatures"]
    return {"_id": name, "name": name, "description": "test", "dist-tags": {"latest": version},
            "versions": {version: v}, "readme": "",
            # npm names the attachment after the full name: @scope/name-1.0.0.tgz.
            "_attachments": {f"{name}-{version}.tgz": {"content_type": "application/octet-stream",
                                    "data": base64.b64encode(data).decode(), "length": len(data)}}}


class NpmMemoryUpstream(MemoryUpstream):
    """A registry in memory (see the module's doc)."""

    def __init__(self, base_url: str = "http://upstream.test") -> None:
        super().__init__(base_url)
        self.docs: dict[str, dict[str, Any]] = {}
        self.tarballs: dict[tuple[str, str], bytes] = {}

    @staticmethod
    def packument_path(name: str) -> str:
        return "/" + quote(name, safe="@")

    @staticmethod
    def tarball_path(name: str, version: str) -> str:
        return f"/{name}/-/{file_name(name, version)}"

    def publish(self, name: str, version: str, dependencies: dict[str, str] | None = None,
                data: bytes | None = None, tag: bool = True) -> bytes:
        data = data if data is not None else make_tarball(name, version, dependencies)
        doc = self.docs.setdefault(name, {"_id": name, "name": name, "dist-tags": {}, "versions": {},
                                          "time": {"created": "2024-01-01T00:00:00.000Z"}})
        url = self.url(self.tarball_path(name, version))
        doc["versions"][version] = version_doc(name, version, data, url, dependencies)
        if tag:
            doc["dist-tags"]["latest"] = version
        self.tarballs[(name, version)] = data
        self.add(self.tarball_path(name, version), data)
        self.write_docs(name)
        return data

    def write_docs(self, name: str, full: bytes | None = None, abbr: bytes | None = None) -> None:
        """(Re)serve the packuments of ``name``; ``full``/``abbr`` replace the generated bodies."""
        doc = self.docs[name]
        path = self.packument_path(name)
        self.add(path, full if full is not None else json.dumps(doc).encode(), "application/json")
        self.add(path + ABBREVIATED_SUFFIX, abbr if abbr is not None else json.dumps(abbreviated(doc)).encode(),
                 ABBREVIATED)

    def render(self, request: Any) -> Any:
        accept = request.getHeader(b"accept") or b""
        if ABBREVIATED.encode() in accept and (request.uri.decode("latin-1") + ABBREVIATED_SUFFIX) in self.files:
            request.uri = request.uri + ABBREVIATED_SUFFIX.encode()
        return super().render(request)
