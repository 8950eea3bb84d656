"""GOPROXY request paths: module paths, versions, ``!`` case-encoding.

A module proxy URL is ``<escaped module>/@v/list``, ``<escaped module>/@latest``
or ``<escaped module>/@v/<escaped version>.{info,mod,zip}`` (``go help
goproxy``). Module paths and versions travel case-encoded: every upper-case
letter is written ``!`` and its lower-case form, so the escaped text has no
upper case at all and a case-insensitive file system cannot confuse two
modules. :func:`parse` checks a request against the rules of
``golang.org/x/mod/module`` (``CheckPath``, ``EscapePath``, semver) before
anything is looked up or fetched: a path that ``go`` itself could never
send is refused here, so it reaches neither the store nor an upstream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Longer than any module path or version in the wild, short enough to bound keys and URLs.
MAX_PATH = 512
MAX_VERSION = 256

_MOD_CHARS = re.compile(r"^[A-Za-z0-9._~-]+$")
_FIRST_CHARS = re.compile(r"^[a-z0-9.-]+$")
# Characters a version query (a branch, a tag, a commit) may hold once decoded:
# go's file-name rule (module.CheckFilePath's element check) without the space.
_QUERY_CHARS = re.compile(r"^[A-Za-z0-9!#$%&()+,.=@\[\]^_{}~-]+$")
# Semantic versions as go writes them: vMAJOR.MINOR.PATCH[-pre][+build].
_SEMVER = re.compile(
    r"^v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)
# Major-version suffix of the last path element (``/v2``).
_MAJOR_SUFFIX = re.compile(r"/v([0-9]+)$")
FILE_EXTS = ("info", "mod", "zip")


class BadModulePath(ValueError):
    """The request names no module or version ``go`` could ask for."""


@dataclass(frozen=True)
class ModuleRequest:
    """One proxy request: ``form`` is list, latest, info, mod or zip."""

    module: str          # decoded: Upper case as the module path writes it
    escaped: str         # as on the wire (lower case, ``!``)
    form: str
    version: str | None = None          # decoded
    escaped_version: str | None = None

    @property
    def canonical(self) -> bool:
        """Whether this names one canonical version's file, which never changes."""
        return self.version is not None and is_canonical(self.version)

    @property
    def tail(self) -> str:
        """The path under a GOPROXY base, escaped, as the upstream is asked for it."""
        if self.form == "list":
            return f"{self.escaped}/@v/list"
        if self.form == "latest":
            return f"{self.escaped}/@latest"
        return f"{self.escaped}/@v/{self.escaped_version}.{self.form}"


def escape(text: str) -> str:
    """``module.EscapePath``'s encoding: ``Upper`` → ``!upper``."""
    return "".join("!" + c.lower() if "A" <= c <= "Z" else c for c in text)


def unescape(text: str) -> str:
    """The inverse of :func:`escape`; BadModulePath for upper case or a stray ``!``."""
    out: list[str] = []
    bang = False
    for c in text:
        if bang:
            if not "a" <= c <= "z":
                raise BadModulePath(f"invalid escape '!{c}' (a '!' must be followed by a lower-case letter)")
            out.append(c.upper())
            bang = False
        elif c == "!":
            bang = True
        elif "A" <= c <= "Z":
            raise BadModulePath(f"upper-case {c!r} must be escaped as '!{c.lower()}'")
        else:
            out.append(c)
    if bang:
        raise BadModulePath("a trailing '!' escapes nothing")
    return "".join(out)


def check_module_path(path: str) -> None:
    """``module.CheckPath``: raise BadModulePath when ``path`` is no valid module path."""
    if not path:
        raise BadModulePath("empty module path")
    if len(path) > MAX_PATH:
        raise BadModulePath(f"module path longer than {MAX_PATH} characters")
    if path.startswith("-"):
        raise BadModulePath("leading dash in module path")
    for elem in path.split("/"):
        if not elem:
            raise BadModulePath("empty path element in module path")
        if elem.strip(".") == "":
            raise BadModulePath(f"invalid path element {elem!r}")
        if elem.startswith("."):
            raise BadModulePath("leading dot in path element")
        if elem.endswith("."):
            raise BadModulePath("trailing dot in path element")
        if not _MOD_CHARS.match(elem):
            raise BadModulePath(f"invalid character in path element {elem!r}")
    first = path.split("/", 1)[0]
    if "." not in first:
        raise BadModulePath("missing dot in first path element")
    if not _FIRST_CHARS.match(first):
        raise BadModulePath(f"invalid character in first path element {first!r}")
    m = _MAJOR_SUFFIX.search(path)
    if m and (m.group(1) in ("0", "1") or m.group(1).startswith("0")):
        raise BadModulePath(f"invalid major version suffix /v{m.group(1)}")


def is_canonical(version: str) -> bool:
    """``semver.Canonical(v) == v``, with go's ``+incompatible`` the only build suffix kept."""
    m = _SEMVER.match(version)
    if m is None:
        return False
    build = m.group(5)
    return build is None or build == "incompatible"


def check_version(version: str) -> None:
    """A version or version query go may put in a URL (``v1.2.3``, ``master``, a commit)."""
    if not version:
        raise BadModulePath("empty version")
    if len(version) > MAX_VERSION:
        raise BadModulePath(f"version longer than {MAX_VERSION} characters")
    if version.strip(".") == "" or ".." in version:
        raise BadModulePath(f"invalid version {version!r}")
    if not _QUERY_CHARS.match(version):
        raise BadModulePath(f"invalid character in version {version!r}")


def parse(segments: list[str]) -> ModuleRequest:
    """The request under a remote (``segments``: the decoded path after ``/go/<remote>/``)."""
    if len(segments) < 2:
        raise BadModulePath("expected <module>/@v/list, <module>/@latest or <module>/@v/<version>.<info|mod|zip>")
    if segments[-1] == "@latest":
        mod_segs, form, file = segments[:-1], "latest", None
    elif len(segments) >= 3 and segments[-2] == "@v":
        mod_segs, file = segments[:-2], segments[-1]
        form = "list" if file == "list" else ""
    else:
        raise BadModulePath("expected <module>/@v/list, <module>/@latest or <module>/@v/<version>.<info|mod|zip>")
    escaped = "/".join(mod_segs)
    if len(escaped) > MAX_PATH:
        raise BadModulePath(f"module path longer than {MAX_PATH} characters")
    if any(s.startswith("@") for s in mod_segs):
        raise BadModulePath("a module path element may not begin with '@'")
    module = unescape(escaped)
    check_module_path(module)
    if form in ("list", "latest"):
        return ModuleRequest(module, escaped, form)
    assert file is not None
    stem, dot, ext = file.rpartition(".")
    if not dot or ext not in FILE_EXTS:
        raise BadModulePath(f"expected @v/list or @v/<version>.<info|mod|zip>, got @v/{file}")
    version = unescape(stem)
    check_version(version)
    if ext != "info" and not is_canonical(version):
        # go asks for .mod and .zip of canonical versions only; a query resolves through .info.
        raise BadModulePath(f"{ext} files exist for canonical versions only, not {version!r}")
    return ModuleRequest(module, escaped, ext, version, stem)

