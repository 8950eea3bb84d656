"""Simple-index pages without a daemon: parsing every link form, keeping every
attribute, converting HTML and JSON into each other, content negotiation,
PEP 503 names and the streaming multipart parser."""

from __future__ import annotations

import io
import json

import pytest

from sparkcache.protocols.pypi import pages
from sparkcache.protocols.pypi.names import (
    BadName, belongs_to, is_valid_filename, normalize, project, version_of,
)
from sparkcache.protocols.pypi.upload import BadUpload, Upload, boundary_of, parse_upload, wheel_metadata
from tests.support.pypi_packages import wheel

PAGE_URL = "https://index.example/simple/demo/"
FILES = "http://cache.test/pypi/py/files/demo"
H = "a" * 64
M = "b" * 64

HTML = f"""<!DOCTYPE html><html><head><base href="https://index.example/simple/demo/"></head><body>
<a href="https://files.example/packages/aa/demo-1.0-py3-none-any.whl#sha256={H}"
   data-requires-python="&gt;=3.8" data-dist-info-metadata="sha256={M}" data-custom="x&amp;y">demo-1.0-py3-none-any.whl</a>
<a href="/packages/demo-1.1.tar.gz#md5=0123" data-yanked="">demo-1.1.tar.gz</a>
<a href="../../packages/demo-2.0-py3-none-any.whl" data-yanked="bad &lt;build&gt;" data-core-metadata="true"
   data-gpg-sig="false">demo-2.0-py3-none-any.whl</a>
<a href="javascript:alert(1)">evil</a>
<a href="https://files.example/packages/..%2f..%2fetc%2fpasswd">x</a>
</body></html>"""


def test_html_links_resolved_and_attributes_kept() -> None:
    page = pages.parse_page(HTML.encode(), "text/html", PAGE_URL, "demo")
    links = page.by_filename()
    assert set(links) == {"demo-1.0-py3-none-any.whl", "demo-1.1.tar.gz", "demo-2.0-py3-none-any.whl"}
    a = links["demo-1.0-py3-none-any.whl"]
    assert a.url == "https://files.example/packages/aa/demo-1.0-py3-none-any.whl"
    assert a.sha256 == H and a.requires_python == ">=3.8" and a.metadata_sha256 == M
    assert a.attrs == [("data-custom", "x&y")]
    b = links["demo-1.1.tar.gz"]
    assert b.url == "https://index.example/packages/demo-1.1.tar.gz" and b.hashes == {"md5": "0123"}
    assert b.yanked is True and b.sha256 is None
    c = links["demo-2.0-py3-none-any.whl"]
    assert c.url == "https://index.example/packages/demo-2.0-py3-none-any.whl"
    assert c.yanked == "bad <build>" and c.core_metadata is True and c.gpg_sig is False


def test_html_rendered_for_the_cache() -> None:
    page = pages.parse_page(HTML.encode(), "text/html", PAGE_URL, "demo")
    out = pages.render_html(page, FILES).decode()
    assert f'href="{FILES}/demo-1.0-py3-none-any.whl#sha256={H}"' in out
    assert 'data-requires-python="&gt;=3.8"' in out
    assert f'data-core-metadata="sha256={M}" data-dist-info-metadata="sha256={M}"' in out
    assert 'data-custom="x&amp;y"' in out
    assert f'href="{FILES}/demo-1.1.tar.gz#md5=0123" data-yanked=""' in out
    assert 'data-yanked="bad &lt;build&gt;"' in out and 'data-gpg-sig="false"' in out
    assert "files.example" not in out and "index.example" not in out and "javascript" not in out
    # What the cache renders, it reads back the same.
    again = pages.parse_page(out.encode(), "text/html", f"{FILES}/", "demo").by_filename()
    assert again["demo-1.0-py3-none-any.whl"].url == f"{FILES}/demo-1.0-py3-none-any.whl"


def test_html_converted_to_json() -> None:
    doc = json.loads(pages.convert(HTML.encode(), "text/html", PAGE_URL, "demo", "json", FILES))
    assert doc["meta"] == {"api-version": "1.0"} and doc["name"] == "demo"
    f = {x["filename"]: x for x in doc["files"]}
    a = f["demo-1.0-py3-none-any.whl"]
    assert a == {"filename": "demo-1.0-py3-none-any.whl", "url": f"{FILES}/demo-1.0-py3-none-any.whl",
                 "hashes": {"sha256": H}, "requires-python": ">=3.8", "core-metadata": {"sha256": M}}
    assert f["demo-1.1.tar.gz"]["yanked"] is True
    assert f["demo-2.0-py3-none-any.whl"]["yanked"] == "bad <build>"
    assert f["demo-2.0-py3-none-any.whl"]["core-metadata"] is True


def test_json_kept_and_converted_to_html() -> None:
    upstream = {
        "meta": {"api-version": "1.1", "_last-serial": 7}, "name": "Demo", "versions": ["1.0"],
        "project-status": {"status": "active"},
        "files": [{"filename": "demo-1.0.tar.gz", "url": "../../p/demo-1.0.tar.gz", "hashes": {"sha256": H},
                   "size": 12, "upload-time": "2024-01-01T00:00:00Z", "dist-info-metadata": {"sha256": M},
                   "yanked": False, "provenance": None}],
    }
    body = json.dumps(upstream).encode()
    doc = json.loads(pages.convert(body, pages.JSON_TYPE, PAGE_URL, "demo", "json", FILES))
    assert doc["meta"] == upstream["meta"] and doc["versions"] == ["1.0"] and doc["name"] == "Demo"
    assert doc["project-status"] == {"status": "active"}
    f = doc["files"][0]
    assert f["url"] == f"{FILES}/demo-1.0.tar.gz" and f["size"] == 12 and f["provenance"] is None
    assert f["core-metadata"] == {"sha256": M} and "dist-info-metadata" not in f and "yanked" not in f
    link = pages.parse_page(body, None, PAGE_URL, "demo").links[0]
    assert link.url == "https://index.example/p/demo-1.0.tar.gz"
    html = pages.convert(body, pages.JSON_TYPE, PAGE_URL, "demo", "html", FILES).decode()
    assert f'href="{FILES}/demo-1.0.tar.gz#sha256={H}"' in html and f'data-dist-info-metadata="sha256={M}"' in html


@pytest.mark.parametrize("body,ctype", [
    (b"", "text/html"), (b"plain text", "text/plain"), (b"\x00<html>", "text/html"), (b"\xff\xfe<a>", "text/html"),
    (b"{not json", "application/json"), (b'{"files": []}', pages.JSON_TYPE),
    (b'{"meta": {"api-version": "2.0"}, "files": []}', pages.JSON_TYPE),
    (b'{"meta": {"api-version": "1.0"}, "files": [{"url": 3}]}', pages.JSON_TYPE),
])
def test_bodies_that_are_not_pages(body: bytes, ctype: str) -> None:
    with pytest.raises(pages.BadPage):
        pages.parse_page(body, ctype, PAGE_URL, "demo")


@pytest.mark.parametrize("accept,form,ctype", [
    (None, "html", "text/html"),
    ("*/*", "html", "text/html"),
    ("application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01",
     "json", pages.JSON_TYPE),
    ("text/html;q=0.5, application/vnd.pypi.simple.v1+json;q=0.4", "html", "text/html"),
    ("application/vnd.pypi.simple.v1+html", "html", pages.HTML_TYPE),
    ("application/vnd.pypi.simple.latest+json", "json", pages.JSON_TYPE),
    ("application/vnd.pypi.simple.v1+json;q=0, text/html", "html", "text/html"),
])
def test_negotiation(accept: str | None, form: str, ctype: str) -> None:
    assert pages.negotiate(accept) == (form, ctype)


def test_negotiation_refuses_what_it_cannot_serve() -> None:
    assert pages.negotiate("image/png") is None
    assert pages.negotiate("application/vnd.pypi.simple.v1+json;q=0") is None


def test_names() -> None:
    assert normalize("Foo.Bar__baz-") == "foo-bar-baz-"
    assert project("Django_REST.framework") == "django-rest-framework"
    for bad in ("", "-x", "x-", "a/b", "..", "a b", "é", "x" * 300):
        with pytest.raises(BadName):
            project(bad)
    assert is_valid_filename("demo-1.0+local-py3-none-any.whl")
    for bad in ("", ".hidden", "a/b", "x.whl.metadata", "a..b", "a b", "x" * 300):
        assert not is_valid_filename(bad)
    assert belongs_to("Demo_Pkg-1.0-py3-none-any.whl", "demo-pkg")
    assert belongs_to("demo.pkg-1.0.tar.gz", "demo-pkg")
    assert not belongs_to("other-1.0.tar.gz", "demo")
    assert version_of("demo-1.0-py3-none-any.whl", "demo") == "1.0"
    assert version_of("demo-pkg-2.0rc1.tar.gz", "demo-pkg") == "2.0rc1"


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> bytes:
    out = b""
    for name, filename, value in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


class _Spool(io.BytesIO):
    """A stand-in for a store spool file."""

    def hexdigest(self) -> str:
        return ""


def test_multipart_streams_the_file() -> None:
    data = bytes(range(256)) * 5000 + b"\r\n--Xy" + b"\r\n-" * 3  # binary, with near-boundaries at the end
    body = _multipart([(":action", None, b"file_upload"), ("name", None, b"demo"),
                       ("content", "demo-1.0.tar.gz", data), ("version", None, b"1.0")])
    spool = _Spool()
    up = parse_upload(io.BytesIO(body), boundary_of("multipart/form-data; boundary=XyZ"), lambda: spool, Upload())
    assert up.fields == {":action": "file_upload", "name": "demo", "version": "1.0"}
    assert up.filename == "demo-1.0.tar.gz" and spool.getvalue() == data


@pytest.mark.parametrize("body", [
    b"", b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue-without-end",
    b"--XyZ\r\nno-disposition: x\r\n\r\nv\r\n--XyZ--\r\n", b"--XyZ" + b"\r\n" + b"x" * (40 << 10),
])
def test_multipart_malformed(body: bytes) -> None:
    with pytest.raises(BadUpload):
        parse_upload(io.BytesIO(body), b"XyZ", _Spool, Upload())


def test_multipart_fields_are_capped() -> None:
    body = _multipart([("description", None, b"x" * (2 << 20))])
    with pytest.raises(BadUpload, match="too long"):
        parse_upload(io.BytesIO(body), b"XyZ", _Spool, Upload())
    with pytest.raises(BadUpload):
        boundary_of("application/json")


def test_wheel_metadata() -> None:
    w = wheel("demo", "1.0", requires_python=">=3.7")
    assert wheel_metadata(io.BytesIO(w.data), w.filename) == w.metadata
    with pytest.raises(BadUpload):
        wheel_metadata(io.BytesIO(b"PK\x03\x04 nonsense"), "x.whl")
