"""twine uploads a private package to a pypi-local remote; through a
pypi-group listing it first, pip and uv install the private package and the
upstream's package of the same name (even its higher versions) is invisible."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.support.pypi_clients import JSON_TYPE, index, installed, ok, pip, twine, uv  # noqa: F401
from tests.support.pypi_packages import sdist, wheel
from tests.support.pypi_upstream import IndexUpstream

WRITE, READ = "pypi-wr-5e1d0a2c", "pypi-rd-90b7f3aa"
AUTH = {"anonymous_read": True, "tokens": [{"name": "ci", "token": WRITE, "scopes": ["read", "write"]},
                                           {"name": "ro", "token": READ, "scopes": ["read"]}]}


def test_twine_upload_shadows_the_public_name(index: IndexUpstream, daemon_factory: Any, tmp_path: Path) -> None:
    # The public index has "corp-tools" too, at higher versions: a dependency-confusion bait.
    index.add("corp-tools", wheel("corp-tools", "1.0", body="public"), wheel("corp-tools", "99.0", body="public"))
    index.add("public-dep", wheel("public-dep", "2.0"))
    d = daemon_factory({
        "internal": {"type": "pypi-local"},
        "public": {"type": "pypi", "upstream": index.index_url},
        "all": {"type": "pypi-group", "members": ["internal", "public"]},
    }, auth=AUTH)
    dist = tmp_path / "dist"
    dist.mkdir()
    private = wheel("corp-tools", "0.3", requires=("public-dep==2.0",), body="private")
    src = sdist("corp-tools", "0.3")
    for w in (private, src):
        (dist / w.filename).write_bytes(w.data)
    upload_url = f"{d.base_url}/pypi/internal/"

    # A read-only token cannot publish.
    denied = twine(upload_url, READ, [dist / private.filename], tmp_path)
    assert denied.returncode != 0 and "403" in denied.stdout + denied.stderr
    ok(twine(upload_url, WRITE, [dist / private.filename, dist / src.filename], tmp_path))
    # A published file never changes: the same name again is refused (409).
    again = twine(upload_url, WRITE, [dist / private.filename], tmp_path)
    assert again.returncode != 0 and "409" in again.stdout + again.stderr

    url = f"{d.base_url}/pypi/all/simple/"
    ok(pip(url, tmp_path / "p", "corp-tools", tmp=tmp_path))
    assert installed(tmp_path / "p", "corp_tools") == "private"
    assert installed(tmp_path / "p", "public_dep") == "public-dep==2.0"
    ok(uv(url, tmp_path / "u", "corp-tools", tmp=tmp_path))
    assert installed(tmp_path / "u", "corp_tools") == "private"
    # Even asking for the public version explicitly finds nothing.
    assert pip(url, tmp_path / "x", "corp-tools==99.0", tmp=tmp_path).returncode != 0
    # The upstream was never asked about the internal name.
    assert index.count("/simple/corp-tools/") == 0

    page = d.get("/pypi/all/simple/corp-tools/", headers={"Accept": JSON_TYPE}).json()
    assert sorted(f["filename"] for f in page["files"]) == sorted([private.filename, src.filename])
    assert all(f["url"].startswith(f"{d.base_url}/pypi/internal/files/corp-tools/") for f in page["files"])

    # Uploads are pinned and survive a restart.
    d.stop()
    d.start()
    ok(pip(url, tmp_path / "after", "corp-tools", tmp=tmp_path))
    assert installed(tmp_path / "after", "corp_tools") == "private"
    assert os.path.isdir(tmp_path / "after" / "public_dep")
