"""pypi-local uploads (the legacy upload API, as twine sends it) and
pypi-group pages: internal names hide the upstream's project entirely."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest
import pytest_twisted

from sparkcache.protocols.pypi.pages import JSON_TYPE
from tests.support.harness import UPSTREAM, Harness, MakeHarness, harness_factory  # noqa: F401
from tests.support.pypi_packages import Dist, html_page, sdist, sha256, wheel

WRITE, READ = "write-token", "read-token"
CONFIG = {
    "auth": {"anonymous_read": True, "tokens": [
        {"name": "ci", "token": WRITE, "scopes": ["read", "write"]},
        {"name": "ro", "token": READ, "scopes": ["read"]},
    ]},
    "remotes": {
        "internal": {"type": "pypi-local"},
        "public": {"type": "pypi", "upstream": f"{UPSTREAM}/simple"},
        "all": {"type": "pypi-group", "members": ["internal", "public"]},
    },
}


def basic(token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"__token__:{token}".encode()).decode()}


def multipart(dist: Dist, name: str, version: str, **extra: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    fields = {":action": "file_upload", "protocol_version": "1", "name": name, "version": version,
              "filetype": "bdist_wheel" if dist.filename.endswith(".whl") else "sdist",
              "sha256_digest": dist.sha256, "metadata_version": "2.1", **extra}
    out = b""
    for k, v in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    out += (f'--{boundary}\r\nContent-Disposition: form-data; name="content"; filename="{dist.filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + dist.data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


async def upload(h: Harness, dist: Dist, name: str, version: str, token: str = WRITE, remote: str = "internal",
                 **extra: str) -> Any:
    body, ctype = multipart(dist, name, version, **extra)
    return await h.post(f"/pypi/{remote}/", body, {"Content-Type": ctype, **basic(token)})


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


@pytest_twisted.ensureDeferred
async def test_upload_then_install_view(h: Harness) -> None:
    w = wheel("Secret.Pkg", "1.0", requires_python=">=3.9")
    resp = await upload(h, w, "Secret.Pkg", "1.0", requires_python=">=3.9")
    assert resp.status == 200, resp.describe()
    src = sdist("secret-pkg", "1.0")
    assert (await upload(h, src, "secret-pkg", "1.0")).status == 200

    page = (await h.get("/pypi/internal/simple/secret-pkg/", {"Accept": JSON_TYPE})).json()
    files = {f["filename"]: f for f in page["files"]}
    assert set(files) == {w.filename, src.filename} and page["versions"] == ["1.0"]
    f = files[w.filename]
    assert f["hashes"] == {"sha256": w.sha256} and f["size"] == len(w.data) and f["requires-python"] == ">=3.9"
    assert f["core-metadata"] == {"sha256": sha256(w.metadata or b"")} and "upload-time" in f
    assert "core-metadata" not in files[src.filename]
    assert (await h.get(f"/pypi/internal/files/secret-pkg/{w.filename}")).body == w.data
    assert (await h.get(f"/pypi/internal/files/secret-pkg/{w.filename}.metadata")).body == w.metadata
    html = (await h.get("/pypi/internal/simple/secret-pkg/")).body.decode()
    assert f"#sha256={w.sha256}" in html and 'data-requires-python="&gt;=3.9"' in html
    root = (await h.get("/pypi/internal/simple/")).body.decode()
    assert 'href="secret-pkg/"' in root
    # Pinned: an upload exists nowhere else.
    entry = await h.store.index.get(f"internal:files/secret-pkg/{w.filename}")
    assert entry is not None and entry.pinned


@pytest_twisted.ensureDeferred
async def test_upload_refusals(h: Harness) -> None:
    w = wheel("thing", "1.0")
    assert (await upload(h, w, "thing", "1.0", token=READ)).status == 403
    body, ctype = multipart(w, "thing", "1.0")
    resp = await h.post("/pypi/internal/", body, {"Content-Type": ctype})
    assert resp.status == 401 and resp.header("WWW-Authenticate").startswith("Basic")
    assert (await upload(h, w, "thing", "1.0", remote="public")).status == 405
    assert (await upload(h, w, "other", "1.0")).status == 400  # the file is not the project's
    assert (await upload(h, w, "thing", "1.0", sha256_digest="0" * 64)).status == 400
    assert (await upload(h, w, "-bad-", "1.0")).status == 400
    junk = Dist("thing-2.0-py3-none-any.whl", b"not a zip")
    assert (await upload(h, junk, "thing", "2.0")).status == 400
    resp = await h.post("/pypi/internal/", b"x=1", {"Content-Type": "application/x-www-form-urlencoded", **basic(WRITE)})
    assert resp.status == 400
    body, ctype = multipart(w, "thing", "1.0")
    resp = await h.post("/pypi/internal/", body[: len(body) // 2], {"Content-Type": ctype, **basic(WRITE)})
    assert resp.status == 400 and resp.header("Content-Type") == "application/json"
    await h.settle()
    assert await h.store.list("internal") == []
    # Accepted once; the same file name again is a conflict, whatever its bytes.
    assert (await upload(h, w, "thing", "1.0")).status == 200
    again = await upload(h, wheel("thing", "1.0", body="changed"), "thing", "1.0")
    assert again.status == 409 and "already exists" in again.json()["error"]
    assert (await h.get(f"/pypi/internal/files/thing/{w.filename}")).body == w.data


@pytest_twisted.ensureDeferred
async def test_group_internal_name_hides_the_public_project(h: Harness) -> None:
    public = [wheel("shared", "1.0"), wheel("shared", "99.0")]
    h.upstream.add("/simple/shared/", html_page("shared", public, lambda d: f"{UPSTREAM}/p/{d.filename}"), "text/html")
    h.upstream.add("/simple/only-public/", html_page("only-public", [wheel("only-public", "1.0")],
                                                     lambda d: f"{UPSTREAM}/p/{d.filename}"), "text/html")
    private = wheel("shared", "0.5", body="private")
    assert (await upload(h, private, "shared", "0.5")).status == 200

    page = (await h.get("/pypi/all/simple/shared/", {"Accept": JSON_TYPE})).json()
    assert [f["filename"] for f in page["files"]] == [private.filename]
    assert page["files"][0]["url"] == f"http://cache.test/pypi/internal/files/shared/{private.filename}"
    html = (await h.get("/pypi/all/simple/shared/")).body.decode()
    assert "99.0" not in html and private.filename in html
    # The public member was never even asked about the internal name.
    assert h.upstream.count("/simple/shared/") == 0
    other = (await h.get("/pypi/all/simple/only-public/", {"Accept": JSON_TYPE})).json()
    assert other["files"][0]["url"].startswith("http://cache.test/pypi/public/files/only-public/")
    assert (await h.get("/pypi/all/simple/nowhere/")).status == 404
    root = (await h.get("/pypi/all/simple/")).body.decode()
    assert 'href="shared/"' in root


@pytest_twisted.ensureDeferred
async def test_group_stops_at_a_failing_member(harness_factory: MakeHarness) -> None:
    config = {"remotes": {
        "first": {"type": "pypi", "upstream": f"{UPSTREAM}/one"},
        "second": {"type": "pypi", "upstream": f"{UPSTREAM}/two"},
        "both": {"type": "pypi-group", "members": ["first", "second"]},
    }}
    h = await harness_factory(config)
    h.upstream.add("/two/pkg/", html_page("pkg", [wheel("pkg", "1.0")], lambda d: f"{UPSTREAM}/p/{d.filename}"),
                   "text/html")
    h.upstream.behave("/one/pkg/", status=503)
    resp = await h.get("/pypi/both/simple/pkg/")
    assert resp.status == 502 and h.upstream.count("/two/pkg/") == 0
    h.upstream.clear()
    resp = await h.get("/pypi/both/simple/pkg/")
    assert resp.status == 200 and "/pypi/second/files/pkg/" in resp.body.decode()


@pytest_twisted.ensureDeferred
async def test_setup_snippets(h: Harness) -> None:
    pip = await h.get("/setup/pip")
    assert pip.status == 200 and "index-url = http://cache.test/pypi/all/simple/" in pip.body.decode()
    assert "trusted-host = cache.test" in pip.body.decode()
    uv = await h.get("/setup/uv?remote=public")
    assert uv.status == 200 and 'url = "http://cache.test/pypi/public/simple/"' in uv.body.decode()
    assert (await h.get("/setup/pip?remote=nope")).status == 404
