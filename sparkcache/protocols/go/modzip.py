"""Module zips: the checks a ``.zip`` passes before it is committed.

``golang.org/x/mod/zip`` (``CheckZip``) defines a module zip: every entry sits
under ``<module>@<version>/``, names are clean relative file paths with no two
equal but for case, ``go.mod`` only at the root, and the archive and its
contents stay under 500 MiB (go.mod under 16 MiB). A body that breaks any of
these is refused (:class:`BodyError`) before the engine commits it, so a
corrupt or tampered upstream zip is never stored and never served whole.

The zip's ``go.mod`` is also what the version's ``.mod`` must say: when both
are in the store, each is checked against the other (:func:`check_zip` with
the stored ``.mod``; :func:`check_mod` with the stored zip).

Everything here blocks (zip directories, a decompressed go.mod): it runs in
the store's I/O pool, as the engine's validate hook does.
"""

from __future__ import annotations

import io
import posixpath
import zipfile
from typing import IO, Any

from sparkcache.fetch.flight import BodyError

MAX_ZIP = 500 << 20
MAX_GO_MOD = 16 << 20
MAX_LICENSE = 16 << 20
MAX_ENTRIES = 200_000
_BAD_CHARS = set('"\'*<>?`|:\\') | {chr(c) for c in range(0x20)} | {"\x7f"}


def _check_name(name: str) -> None:
    """``module.CheckFilePath`` of a name under the prefix, and path.Clean(name) == name."""
    if not name or name.startswith("/") or posixpath.normpath(name) != name:
        raise BodyError(f"module zip entry {name!r} is not a clean relative path")
    for elem in name.split("/"):
        if elem in ("", ".", "..") or elem.strip(".") == "":
            raise BodyError(f"module zip entry {name!r} has an invalid path element")
        if elem.endswith(".") or _BAD_CHARS.intersection(elem):
            raise BodyError(f"module zip entry {name!r} has an invalid file name")


def read_zip(f: IO[bytes], size: int, module: str, version: str) -> bytes | None:
    """Check the zip in ``f`` (``size`` bytes) for ``module@version``; its go.mod, if any."""
    if size > MAX_ZIP:
        raise BodyError(f"module zip is {size} bytes; the limit is {MAX_ZIP}")
    try:
        z = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise BodyError(f"not a zip file: {e}") from None
    with z:
        infos = z.infolist()
        if len(infos) > MAX_ENTRIES:
            raise BodyError(f"module zip has more than {MAX_ENTRIES} entries")
        prefix = f"{module}@{version}/"
        seen: set[str] = set()
        total = 0
        gomod: zipfile.ZipInfo | None = None
        for info in infos:
            if not info.filename.startswith(prefix):
                raise BodyError(f"module zip entry {info.filename!r} is not under {prefix!r}")
            name = info.filename[len(prefix):]
            if name == "":
                continue
            is_dir = name.endswith("/")
            name = name.rstrip("/") if is_dir else name
            _check_name(name)
            folded = name.lower()
            if folded in seen:
                raise BodyError(f"module zip has two entries named {name!r} but for case")
            seen.add(folded)
            if is_dir:
                continue
            if posixpath.basename(name).lower() == "go.mod":
                if name != "go.mod":
                    raise BodyError(f"module zip has {name!r}; go.mod belongs at the module root, in lower case")
                if info.file_size > MAX_GO_MOD:
                    raise BodyError("go.mod in the module zip is too large")
                gomod = info
            if name == "LICENSE" and info.file_size > MAX_LICENSE:
                raise BodyError("LICENSE in the module zip is too large")
            total += info.file_size
            if total > MAX_ZIP:
                raise BodyError(f"module zip contents exceed {MAX_ZIP} bytes uncompressed")
        if gomod is None:
            return None
        try:
            with z.open(gomod) as member:
                data = member.read(MAX_GO_MOD + 1)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as e:
            raise BodyError(f"go.mod in the module zip cannot be read: {e}") from None
        if len(data) > MAX_GO_MOD:
            raise BodyError("go.mod in the module zip is too large")
        return data


def check_zip(f: IO[bytes], module: str, version: str, stored_mod: bytes | None) -> None:
    """The engine's validate hook for a ``.zip`` (``f``: the complete body)."""
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    gomod = read_zip(f, size, module, version)
    if stored_mod is not None and gomod is not None and gomod != stored_mod and not version.endswith("+incompatible"):
        raise BodyError(f"the zip's go.mod differs from the stored {module}@{version}.mod")


def check_mod(f: IO[bytes], module: str, version: str, zip_gomod: bytes | None) -> None:
    """The validate hook for a ``.mod`` (``f``: the complete body); ``zip_gomod``
    is the go.mod of the version's stored zip (:func:`stored_gomod`), or None."""
    data = f.read(MAX_GO_MOD + 1)
    if len(data) > MAX_GO_MOD:
        raise BodyError(f"go.mod is larger than {MAX_GO_MOD} bytes")
    if zip_gomod is not None and zip_gomod != data and not version.endswith("+incompatible"):
        raise BodyError(f"{module}@{version}.mod differs from the go.mod in the stored zip")


def stored_gomod(body: Any, module: str, version: str) -> bytes | None:
    """The go.mod in a stored zip (a ``BodyRange``, left open for its owner to close)."""
    return read_zip(io.BufferedReader(_RangeFile(body), 1 << 16), len(body), module, version)


class _RangeFile(io.RawIOBase):
    """A stored body (``BodyRange``: ``read(offset, n)``) as the seekable file zipfile wants."""

    def __init__(self, body: Any) -> None:
        super().__init__()
        self.body, self.pos, self.size = body, 0, len(body)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), max(0, self.size - self.pos))
        data = self.body.read(self.pos, n) if n else b""
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)
