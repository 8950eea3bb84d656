"""Tiny Python distributions made in the test, and simple-index pages listing them.

``wheel(name, version, ...)`` writes a real, installable wheel (a module, its
``.dist-info`` with METADATA, WHEEL and RECORD) with zipfile;
``sdist(name, version)`` a ``.tar.gz`` with PKG-INFO and a setuptools
``pyproject.toml``. ``html_page``/``json_page`` list :class:`Dist` s as PEP
503 HTML (with ``#sha256=`` and ``data-*`` attributes) and PEP 691 JSON.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import tarfile
import zipfile
from dataclasses import dataclass
from typing import Callable


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Dist:
    filename: str
    data: bytes
    metadata: bytes | None = None  # PEP 658 (wheels)
    requires_python: str | None = None
    yanked: str | bool = False

    @property
    def sha256(self) -> str:
        return sha256(self.data)

    @property
    def project(self) -> str:
        return self.filename.split("-", 1)[0].replace("_", "-").lower()


def metadata_text(name: str, version: str, requires: tuple[str, ...] = (), requires_python: str | None = None,
                  summary: str = "") -> bytes:
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", f"Summary: {summary or name}"]
    if requires_python:
        lines.append(f"Requires-Python: {requires_python}")
    lines += [f"Requires-Dist: {r}" for r in requires]
    return ("\n".join(lines) + "\n\n").encode()


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def wheel(name: str, version: str, *, requires: tuple[str, ...] = (), requires_python: str | None = None,
          yanked: str | bool = False, body: str | None = None) -> Dist:
    """A pure-Python wheel of module ``<name>`` whose ``VALUE`` is ``body`` (default: name==version)."""
    mod = name.replace("-", "_").lower()
    dist_info = f"{mod}-{version}.dist-info"
    meta = metadata_text(name, version, requires, requires_python)
    files = {
        f"{mod}/__init__.py": f"VALUE = {body or f'{name}=={version}'!r}\n".encode(),
        f"{dist_info}/METADATA": meta,
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: sparkcache-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(p, d) for p, d in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files.items():
            z.writestr(zipfile.ZipInfo(path, (2020, 1, 1, 0, 0, 0)), data)
    return Dist(f"{mod}-{version}-py3-none-any.whl", out.getvalue(), meta, requires_python, yanked)


# An in-tree PEP 517 backend with no build requirements: pip and uv build the
# sdist offline (setuptools would want the wheel package, and isolation a download).
_BACKEND = """\
import base64, hashlib, os, zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
NAME, VERSION, MOD = {name!r}, {version!r}, {mod!r}
DIST_INFO = MOD + "-" + VERSION + ".dist-info"


def _metadata():
    with open(os.path.join(HERE, "PKG-INFO"), "rb") as f:
        return f.read()


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    os.makedirs(os.path.join(metadata_directory, DIST_INFO))
    with open(os.path.join(metadata_directory, DIST_INFO, "METADATA"), "wb") as f:
        f.write(_metadata())
    return DIST_INFO


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open(os.path.join(HERE, MOD, "__init__.py"), "rb") as f:
        files = {{MOD + "/__init__.py": f.read()}}
    files[DIST_INFO + "/METADATA"] = _metadata()
    files[DIST_INFO + "/WHEEL"] = b"Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(path + ",sha256=" + digest + "," + str(len(data)))
    files[DIST_INFO + "/RECORD"] = ("\\n".join(record + [DIST_INFO + "/RECORD,,"]) + "\\n").encode()
    name = MOD + "-" + VERSION + "-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return name
"""


def sdist(name: str, version: str) -> Dist:
    """An sdist that builds (offline, no build requirements) into a wheel whose ``VALUE`` says "(sdist)"."""
    mod = name.replace("-", "_").lower()
    root = f"{mod}-{version}"
    files = {
        f"{root}/PKG-INFO": metadata_text(name, version),
        f"{root}/pyproject.toml": (b'[build-system]\nrequires = []\nbuild-backend = "sdist_backend"\n'
                                   b'backend-path = ["."]\n'),
        f"{root}/sdist_backend.py": _BACKEND.format(name=name, version=version, mod=mod).encode(),
        f"{root}/{mod}/__init__.py": f"VALUE = {f'{name}=={version} (sdist)'!r}\n".encode(),
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as t:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mtime = len(data), 1_600_000_000
            t.addfile(info, io.BytesIO(data))
    return Dist(f"{root}.tar.gz", out.getvalue())


def html_page(project: str, dists: list[Dist], href: Callable[[Dist], str]) -> bytes:
    """PEP 503 HTML for ``dists``; ``href(dist)`` gives each link (absolute, root-relative or relative)."""
    lines = ["<!DOCTYPE html>", "<html><head><meta name=\"pypi:repository-version\" content=\"1.1\">",
             f"<title>Links for {project}</title></head><body>", f"<h1>Links for {project}</h1>"]
    for d in dists:
        attrs = [f'href="{html.escape(href(d))}#sha256={d.sha256}"']
        if d.requires_python:
            attrs.append(f'data-requires-python="{html.escape(d.requires_python)}"')
        if d.yanked:
            attrs.append(f'data-yanked="{html.escape(d.yanked if isinstance(d.yanked, str) else "")}"')
        if d.metadata is not None:
            attrs.append(f'data-dist-info-metadata="sha256={sha256(d.metadata)}"')
            attrs.append(f'data-core-metadata="sha256={sha256(d.metadata)}"')
        lines.append(f"<a {' '.join(attrs)}>{html.escape(d.filename)}</a><br/>")
    lines.append("</body></html>")
    return ("\n".join(lines) + "\n").encode()


def json_page(project: str, dists: list[Dist], href: Callable[[Dist], str]) -> bytes:
    files = []
    for d in dists:
        f: dict[str, object] = {"filename": d.filename, "url": href(d), "hashes": {"sha256": d.sha256},
                                "size": len(d.data), "upload-time": "2024-01-02T03:04:05.000000Z"}
        if d.requires_python:
            f["requires-python"] = d.requires_python
        if d.yanked:
            f["yanked"] = d.yanked
        if d.metadata is not None:
            f["core-metadata"] = {"sha256": sha256(d.metadata)}
        files.append(f)
    versions = sorted({d.filename.split("-")[1].removesuffix(".tar.gz") for d in dists})
    return json.dumps({"meta": {"api-version": "1.1"}, "name": project, "files": files, "versions": versions}).encode()
