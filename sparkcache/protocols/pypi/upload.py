"""The legacy upload API's body, read from a spool file in a worker thread.

``twine upload`` POSTs ``multipart/form-data`` with ``:action=file_upload``,
the file as the ``content`` part and the metadata as small text fields. The
parser here streams: the file part is copied into a spool file of its own
(hashed as it is written) a chunk at a time, the text fields are kept up to
``MAX_FIELDS`` bytes in all, so an upload of any size costs a few hundred KiB
of memory. A wheel's ``METADATA`` is then read out of that spool (PEP 658
serves it beside the file).
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

from sparkcache.store import SpoolFile

CHUNK = 256 << 10
MAX_FIELDS = 1 << 20  # every text field together (long descriptions included)
MAX_PART_HEADERS = 16 << 10
MAX_METADATA = 8 << 20  # a METADATA file larger than this is refused, not read (a zip bomb guard)


class BadUpload(ValueError):
    """The body is not an upload this cache accepts (400)."""


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    spool: SpoolFile | None = None  # the ``content`` part

    def get(self, name: str) -> str:
        return self.fields.get(name, "")


def boundary_of(content_type: str) -> bytes:
    mtype, _, params = content_type.partition(";")
    if mtype.strip().lower() != "multipart/form-data":
        raise BadUpload("expected a multipart/form-data body (the legacy upload API: twine upload)")
    m = re.search(r'boundary=(?:"([^"]{1,200})"|([^\s;]{1,200}))', params, re.I)
    if m is None:
        raise BadUpload("the multipart body names no boundary")
    return (m.group(1) or m.group(2)).encode("latin-1")


def _disposition(headers: bytes) -> tuple[str, str | None]:
    text = headers.decode("utf-8", "replace")
    for line in text.split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() != "content-disposition":
            continue
        fname = re.search(r';\s*name="([^"]*)"', value) or re.search(r";\s*name=([^;\s]+)", value)
        fn = re.search(r';\s*filename="([^"]*)"', value) or re.search(r";\s*filename=([^;\s]+)", value)
        if fname is None:
            break
        return fname.group(1), (fn.group(1) if fn else None)
    raise BadUpload("a part of the multipart body has no Content-Disposition name")


class _Reader:
    """Buffered reads of a file object with a look-ahead window."""

    def __init__(self, f: Any) -> None:
        self.f, self.buf, self.eof = f, b"", False

    def fill(self) -> bool:
        if self.eof:
            return False
        data = self.f.read(CHUNK)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def until(self, marker: bytes, limit: int, what: str) -> bytes:
        """The bytes before ``marker`` (consumed with it), at most ``limit``."""
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out, self.buf = self.buf[:i], self.buf[i + len(marker):]
                return out
            if len(self.buf) > limit + len(marker):
                raise BadUpload(f"{what} is too long")
            if not self.fill():
                raise BadUpload(f"the multipart body ended inside {what}")

    def stream_until(self, marker: bytes, out: Callable[[bytes], None]) -> None:
        """Hand everything before ``marker`` to ``out`` a window at a time."""
        keep = len(marker) - 1
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out(self.buf[:i])
                self.buf = self.buf[i + len(marker):]
                return
            if len(self.buf) > keep:
                out(self.buf[:-keep])
                self.buf = self.buf[-keep:]
            if not self.fill():
                raise BadUpload("the multipart body ended inside a part")

    def take(self, n: int) -> bytes:
        while len(self.buf) < n and self.fill():
            pass
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def parse_upload(body: Any, boundary: bytes, new_spool: Callable[[], SpoolFile], upload: Upload) -> Upload:
    """Blocking (in a worker thread): the fields and file of a multipart body,
    into ``upload``. The file part goes to a spool from ``new_spool``, the
    caller's to commit or discard (also when this raises: it is set on
    ``upload`` as soon as it is made)."""
    r = _Reader(body)
    delimiter = b"--" + boundary
    r.until(delimiter, MAX_FIELDS, "the preamble")
    field_bytes = 0
    try:
        while True:
            after = r.take(2)
            if after == b"--":
                break
            if after != b"\r\n":
                raise BadUpload("malformed multipart delimiter")
            headers = r.until(b"\r\n\r\n", MAX_PART_HEADERS, "a part's headers")
            name, filename = _disposition(headers)
            end = b"\r\n" + delimiter
            if filename is not None and name == "content":
                if upload.spool is not None:
                    raise BadUpload("more than one content part")
                upload.filename = filename
                upload.spool = spool = new_spool()
                r.stream_until(end, spool.write)
            else:
                value = r.until(end, MAX_FIELDS - field_bytes, f"the field {name[:50]!r}")
                field_bytes += len(value)
                if filename is None and name not in upload.fields:
                    upload.fields[name] = value.decode("utf-8", "replace")
    except OSError as e:
        raise BadUpload(f"could not store the upload: {e}") from None
    return upload


def wheel_metadata(f: Any, filename: str) -> bytes:
    """The ``<name>-<version>.dist-info/METADATA`` of the wheel in ``f`` (blocking)."""
    try:
        with zipfile.ZipFile(f) as z:
            found = [i for i in z.infolist()
                     if i.filename.count("/") == 1 and i.filename.endswith(".dist-info/METADATA")]
            if len(found) != 1:
                raise BadUpload(f"{filename} has {len(found)} top-level .dist-info/METADATA files, not one")
            info = found[0]
            if info.file_size > MAX_METADATA:
                raise BadUpload(f"the METADATA of {filename} is over {MAX_METADATA} bytes")
            with z.open(info) as m:
                data = m.read(MAX_METADATA + 1)
            if len(data) > MAX_METADATA:
                raise BadUpload(f"the METADATA of {filename} is over {MAX_METADATA} bytes")
            return data
    except BadUpload:
        raise
    except Exception as e:  # zipfile raises many kinds on a damaged archive (BadZipFile, zlib.error, EOFError...)
        raise BadUpload(f"{filename} is not a valid wheel (zip): {type(e).__name__}: {e}") from None
