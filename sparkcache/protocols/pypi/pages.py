"""Simple-index project pages: parsed from upstream's exact bytes (PEP 503
HTML or PEP 691 JSON), rendered in the form a client asked for, with every
file link pointed at this cache.

A page is parsed into :class:`Page` (its :class:`Link` s with every attribute
the PEPs define, and the ones they do not, kept as they were) and rendered
again: HTML to HTML keeps each anchor's attributes, JSON to JSON each file's
keys, and the two convert into each other (pypiserver and Nexus serve only
HTML; pip and uv ask for JSON first). PEP 714: HTML carries both
``data-core-metadata`` and ``data-dist-info-metadata``, JSON only
``core-metadata``.

Everything here is pure and runs in a worker thread (the protocol's pool):
no Twisted, no I/O.
"""

from __future__ import annotations

import hashlib
import html
import json
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import quote, unquote, urldefrag, urljoin, urlsplit

from sparkcache.protocols.pypi.names import is_valid_filename, version_of

JSON_TYPE = "application/vnd.pypi.simple.v1+json"
HTML_TYPE = "application/vnd.pypi.simple.v1+html"
TEXT_HTML = "text/html"
# The api-version of a page this cache writes itself (converted from HTML, or a local remote's).
API_VERSION = "1.1"
# The HTML attributes the PEPs give a meaning; every other data-* one is kept as it was.
_KNOWN = {"href", "data-requires-python", "data-yanked", "data-core-metadata", "data-dist-info-metadata",
          "data-gpg-sig"}
_KNOWN_KEYS = {"filename", "url", "hashes", "requires-python", "yanked", "core-metadata", "dist-info-metadata",
               "data-dist-info-metadata", "gpg-sig"}


class BadPage(ValueError):
    """Upstream's body is not a simple-index page (a login form, a proxy's error, junk)."""


@dataclass
class Link:
    filename: str
    url: str  # absolute, without its fragment: where upstream serves the file
    hashes: dict[str, str] = field(default_factory=dict)
    requires_python: str | None = None
    yanked: bool | str = False  # True, or the reason
    core_metadata: bool | dict[str, str] = False  # True, or {algorithm: hex}
    gpg_sig: bool | None = None
    size: int | None = None
    upload_time: str | None = None
    # What the PEPs do not name, kept: HTML data-* attributes, JSON keys.
    attrs: list[tuple[str, str]] = field(default_factory=list)
    keys: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str | None:
        v = self.hashes.get("sha256")
        return v.lower() if isinstance(v, str) and len(v) == 64 else None

    @property
    def metadata_sha256(self) -> str | None:
        if isinstance(self.core_metadata, dict):
            v = self.core_metadata.get("sha256")
            return v.lower() if isinstance(v, str) and len(v) == 64 else None
        return None


@dataclass
class Page:
    name: str
    links: list[Link]
    versions: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Other top-level JSON keys (project-status...), kept.
    keys: dict[str, Any] = field(default_factory=dict)

    def by_filename(self) -> dict[str, Link]:
        out: dict[str, Link] = {}
        for link in self.links:
            out.setdefault(link.filename, link)
        return out


# -- parsing -------------------------------------------------------------------------


def looks_like_json(body: bytes, content_type: str | None) -> bool:
    if content_type and "json" in content_type.lower():
        return True
    return body.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{"


def parse_page(body: bytes, content_type: str | None, page_url: str, project: str) -> Page:
    """The page in ``body`` (served at ``page_url``); BadPage when it is none."""
    if looks_like_json(body, content_type):
        return _parse_json(body, page_url, project)
    return _parse_html(body, page_url, project)


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadPage("the page is not UTF-8") from None


def _filename_of(url: str) -> str:
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


def _usable(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https") and bool(urlsplit(url).netloc)


def _fragment_hashes(fragment: str) -> dict[str, str]:
    algo, sep, value = fragment.partition("=")
    if sep and algo and value and all(c in "0123456789abcdefABCDEF" for c in value):
        return {algo.lower(): value.lower()}
    return {}


def _metadata_attr(value: str | None) -> bool | dict[str, str]:
    if value is None:
        return False
    algo, sep, digest = value.partition("=")
    if sep and algo and digest:
        return {algo.lower(): digest.lower()}
    return value.strip().lower() != "false"


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[list[tuple[str, str | None]]] = []
        self.base: str | None = None
        self.tags = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags += 1
        if tag == "a":
            self.anchors.append(attrs)
        elif tag == "base" and self.base is None:
            self.base = dict(attrs).get("href")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)


def _parse_html(body: bytes, page_url: str, project: str) -> Page:
    text = _text(body)
    if "\x00" in text or not text.lstrip().startswith("<"):
        raise BadPage("the page is not HTML")
    parser = _Anchors()
    try:
        parser.feed(text)
        parser.close()
    except Exception as e:  # the parser is lenient; this is a page it cannot read at all
        raise BadPage(f"the page is not HTML: {e}") from None
    if parser.tags == 0:
        raise BadPage("the page is not HTML")
    base = urljoin(page_url, parser.base) if parser.base else page_url
    links = []
    for attrs in parser.anchors:
        a = {k.lower(): v for k, v in attrs}
        href = a.get("href")
        if not href:
            continue
        url, fragment = urldefrag(urljoin(base, href.strip()))
        filename = _filename_of(url)
        if not _usable(url) or not is_valid_filename(filename):
            continue
        core = a.get("data-core-metadata")
        if core is None:
            core = a.get("data-dist-info-metadata")
        yanked = a.get("data-yanked")
        gpg = a.get("data-gpg-sig")
        links.append(Link(
            filename=filename, url=url, hashes=_fragment_hashes(fragment),
            requires_python=a.get("data-requires-python") or None,
            yanked=False if yanked is None else (yanked or True),
            core_metadata=_metadata_attr(core),
            gpg_sig=None if gpg is None else gpg.strip().lower() == "true",
            attrs=[(k, v or "") for k, v in attrs if k.lower().startswith("data-") and k.lower() not in _KNOWN],
        ))
    return Page(project, links)


def _parse_json(body: bytes, page_url: str, project: str) -> Page:
    try:
        doc = json.loads(_text(body))
    except ValueError as e:
        raise BadPage(f"the page is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise BadPage("the JSON page has no files list")
    meta = doc.get("meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("api-version"), str):
        raise BadPage("the JSON page has no meta.api-version")
    if not meta["api-version"].startswith("1."):
        raise BadPage(f"unsupported api-version {meta['api-version']!r}")
    links = []
    for f in doc["files"]:
        if not isinstance(f, dict) or not isinstance(f.get("url"), str) or not isinstance(f.get("filename"), str):
            raise BadPage("a file of the JSON page has no filename or url")
        url, fragment = urldefrag(urljoin(page_url, f["url"]))
        filename = f["filename"]
        if not _usable(url) or not is_valid_filename(filename):
            continue
        given = f.get("hashes")
        hashes = {str(k).lower(): v.lower() for k, v in given.items() if isinstance(v, str)} \
            if isinstance(given, dict) else {}
        hashes = hashes or _fragment_hashes(fragment)
        core = f.get("core-metadata", f.get("dist-info-metadata", f.get("data-dist-info-metadata", False)))
        if isinstance(core, dict):
            core = {str(k).lower(): str(v).lower() for k, v in core.items() if isinstance(v, str)} or True
        yanked = f.get("yanked", False)
        size = f.get("size")
        upload_time = f.get("upload-time")
        links.append(Link(
            filename=filename, url=url, hashes=hashes,
            requires_python=f["requires-python"] if isinstance(f.get("requires-python"), str) else None,
            yanked=yanked if isinstance(yanked, str) and yanked else bool(yanked),
            core_metadata=core if isinstance(core, dict) else bool(core),
            gpg_sig=f["gpg-sig"] if isinstance(f.get("gpg-sig"), bool) else None,
            size=size if isinstance(size, int) and not isinstance(size, bool) else None,
            upload_time=upload_time if isinstance(upload_time, str) else None,
            keys={k: v for k, v in f.items() if k not in _KNOWN_KEYS and k not in ("size", "upload-time")},
        ))
    versions = doc.get("versions")
    name = doc.get("name")
    return Page(name if isinstance(name, str) and name else project, links,
                [v for v in versions if isinstance(v, str)] if isinstance(versions, list) else None,
                dict(meta), {k: v for k, v in doc.items() if k not in ("meta", "name", "files", "versions")})


# -- rendering ---------------------------------------------------------------------------


def file_url(files_base: str, filename: str) -> str:
    """Where this cache serves ``filename``: ``<files_base>/<filename>``."""
    return f"{files_base}/{quote(filename, safe='+!~')}"


def _fragment(link: Link) -> str:
    if link.sha256:
        return f"#sha256={link.sha256}"
    for algo, value in link.hashes.items():
        return f"#{algo}={value}"
    return ""


def _metadata_value(core: bool | dict[str, str]) -> str | None:
    if isinstance(core, dict):
        for algo, value in core.items():
            return f"{algo}={value}"
        return "true"
    return "true" if core else None


def render_html(page: Page, files_base: str) -> bytes:
    """PEP 503 HTML of ``page``, its links at ``files_base`` (PEP 714: both metadata attributes)."""
    esc = html.escape
    out = [
        "<!DOCTYPE html>\n<html>\n  <head>\n",
        f'    <meta name="pypi:repository-version" content="{esc(page.meta.get("api-version") or API_VERSION)}">\n',
        f"    <title>Links for {esc(page.name)}</title>\n  </head>\n  <body>\n    <h1>Links for {esc(page.name)}</h1>\n",
    ]
    for link in page.links:
        attrs = [("href", file_url(files_base, link.filename) + _fragment(link))]
        if link.requires_python:
            attrs.append(("data-requires-python", link.requires_python))
        if link.yanked:
            attrs.append(("data-yanked", link.yanked if isinstance(link.yanked, str) else ""))
        core = _metadata_value(link.core_metadata)
        if core is not None:
            attrs += [("data-core-metadata", core), ("data-dist-info-metadata", core)]
        if link.gpg_sig is not None:
            attrs.append(("data-gpg-sig", "true" if link.gpg_sig else "false"))
        attrs += link.attrs
        text = " ".join(f'{k}="{esc(v, quote=True)}"' for k, v in attrs)
        out.append(f"    <a {text}>{esc(link.filename)}</a><br />\n")
    out.append("  </body>\n</html>\n")
    return "".join(out).encode()


def _versions(page: Page) -> list[str]:
    if page.versions is not None:
        return page.versions
    seen: dict[str, None] = {}
    for link in page.links:
        v = version_of(link.filename, page.name)
        if v is not None:
            seen.setdefault(v, None)
    return list(seen)


def render_json(page: Page, files_base: str) -> bytes:
    """PEP 691 JSON of ``page`` (PEP 700's ``versions``, ``size``, ``upload-time`` when known)."""
    files = []
    for link in page.links:
        f: dict[str, Any] = dict(link.keys)
        f["filename"] = link.filename
        f["url"] = file_url(files_base, link.filename)
        f["hashes"] = dict(link.hashes)
        if link.requires_python:
            f["requires-python"] = link.requires_python
        if link.yanked:
            f["yanked"] = link.yanked
        if link.core_metadata:
            f["core-metadata"] = link.core_metadata
        if link.gpg_sig is not None:
            f["gpg-sig"] = link.gpg_sig
        if link.size is not None:
            f["size"] = link.size
        if link.upload_time is not None:
            f["upload-time"] = link.upload_time
        files.append(f)
    meta = dict(page.meta) or {"api-version": API_VERSION}
    doc: dict[str, Any] = {"meta": meta, "name": page.name, "files": files}
    # api-version 1.1 promises versions (PEP 700); size it cannot always promise
    # for a page converted from HTML, which has none: such a page says 1.0.
    if all(link.size is not None for link in page.links) or page.meta:
        doc["versions"] = _versions(page)
    else:
        meta["api-version"] = "1.0"
    doc.update({k: v for k, v in page.keys.items() if k not in doc})
    return json.dumps(doc, separators=(",", ":")).encode()


def etag(body: bytes) -> str:
    """The ETag of a rendered page."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def render(page: Page, form: str, files_base: str) -> bytes:
    return render_json(page, files_base) if form == "json" else render_html(page, files_base)


def convert(body: bytes, content_type: str | None, page_url: str, project: str, form: str, files_base: str) -> bytes:
    """Upstream's page ``body`` as a client gets it: in ``form`` ("html"/"json"), links at ``files_base``."""
    return render(parse_page(body, content_type, page_url, project), form, files_base)


# -- generated root indexes ------------------------------------------------------------


def render_root(projects: Iterable[str], form: str) -> bytes:
    """A root index (``/simple/``) listing ``projects`` (relative links: ``<name>/``)."""
    names = sorted(set(projects))
    if form == "json":
        return json.dumps({"meta": {"api-version": "1.0"}, "projects": [{"name": n} for n in names]}).encode()
    body = "".join(f'    <a href="{quote(n)}/">{html.escape(n)}</a><br />\n' for n in names)
    return ("<!DOCTYPE html>\n<html>\n  <head>\n    <meta name=\"pypi:repository-version\" content=\"1.0\">\n"
            "    <title>Simple index</title>\n  </head>\n  <body>\n" + body + "  </body>\n</html>\n").encode()


def upload_time(seconds: float) -> str:
    """An ISO 8601 UTC time as PEP 700 writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1e6):06d}Z"


# -- content negotiation (PEP 691) --------------------------------------------------------

# Media types a client may ask for → (form, the Content-Type answered).
_OFFERS: Mapping[str, tuple[str, str]] = {
    JSON_TYPE: ("json", JSON_TYPE),
    "application/vnd.pypi.simple.latest+json": ("json", JSON_TYPE),
    HTML_TYPE: ("html", HTML_TYPE),
    "application/vnd.pypi.simple.latest+html": ("html", HTML_TYPE),
    TEXT_HTML: ("html", TEXT_HTML),
}


def _accepted(accept: str) -> list[tuple[str, float, int]]:
    out = []
    for i, part in enumerate(accept.split(",")):
        mtype, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for p in params:
            k, _, v = p.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if mtype:
            out.append((mtype.lower(), max(0.0, min(q, 1.0)), i))
    return out


def negotiate(accept: str | None) -> tuple[str, str] | None:
    """(form, Content-Type) for a request's ``Accept``; None when it accepts
    nothing this cache serves (a 406). No Accept, or ``*/*``, gets text/html."""
    if not accept or not accept.strip():
        return _OFFERS[TEXT_HTML]
    best: tuple[float, int, tuple[str, str]] | None = None
    for mtype, q, order in _accepted(accept):
        if q <= 0:
            continue
        if mtype in _OFFERS:
            offer = _OFFERS[mtype]
        elif mtype in ("*/*", "text/*"):
            offer = _OFFERS[TEXT_HTML]
        elif mtype == "application/*":
            offer = _OFFERS[JSON_TYPE]
        else:
            continue
        # Highest q wins; among equals the one listed first.
        if best is None or q > best[0]:
            best = (q, order, offer)
    return best[2] if best is not None else None


def project_names(paths: Sequence[str]) -> list[str]:
    """Project names of store paths ``files/<project>/<file>``."""
    return sorted({p.split("/")[1] for p in paths if p.count("/") == 2})
