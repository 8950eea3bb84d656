"""Keys of a ``type: kv`` remote, and its options.

A key is the path under ``/kv/<remote>/``, as the tool built it: ccache's
``ab/cdef…`` (``subdirs``), ``abcdef…`` (``flat``) or ``ac/<64 hex>``
(``bazel``), Gradle's ``cache/<32 hex>``, sccache's ``a/b/c/<hex>`` and
``.sccache_check``. The raw path is split and vetted first
(:func:`sparkcache.web.paths.split_raw_path`: no dot segments, encoded
separators, backslashes or control bytes); a key must then also be made of
the characters these tools use and stay short. Keys only ever name index
rows (``<remote>:<key>``), never files, but a narrow alphabet keeps logs,
metrics and ``/config`` free of surprises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sparkcache.config import Loader, Section
from sparkcache.protocols._keyed import KeyedOptions, read_keyed_options

# Every character ccache, sccache and Gradle put in a key, and the few URL-safe ones around them.
_SEGMENT = re.compile(r"[A-Za-z0-9._~+=:@,!$'()*-]{1,255}")
DEFAULT_MAX_KEY = 1024
MAX_SEGMENTS = 32


class BadKey(ValueError):
    """A key the remote refuses (answered 400)."""


@dataclass(frozen=True)
class KvOptions:
    """A kv remote's options: the keyed-blob ones and the longest key it accepts."""

    keyed: KeyedOptions
    max_key_length: int = DEFAULT_MAX_KEY

    def redacted(self) -> dict[str, Any]:
        return {**self.keyed.redacted(), "max_key_length": self.max_key_length}


def parse_kv_options(loader: Loader, sec: Section, rtype: str) -> KvOptions:
    """``max_entry_size``, ``quota``, ``ttl`` (see _keyed) and ``max_key_length``."""
    keyed = read_keyed_options(loader, sec)
    max_key = sec.get("max_key_length", int, DEFAULT_MAX_KEY)
    if not 1 <= max_key <= 4096:
        raise loader.error(sec.key("max_key_length"), "must be between 1 and 4096")
    return KvOptions(keyed, max_key)


def options_of(remote: Any) -> KvOptions:
    opts = getattr(remote, "options", None)
    return opts if isinstance(opts, KvOptions) else KvOptions(KeyedOptions())


def key_of(segments: list[str], max_length: int = DEFAULT_MAX_KEY) -> str:
    """The key named by the vetted path segments after ``/kv/<remote>/``; BadKey
    when it is empty, a directory (a trailing slash), too long or has other characters."""
    if not segments or segments == [""]:
        raise BadKey("no key: use /kv/<remote>/<key>")
    if segments[-1] == "":
        raise BadKey("a key names an entry, not a directory (drop the trailing slash)")
    if len(segments) > MAX_SEGMENTS:
        raise BadKey(f"a key has at most {MAX_SEGMENTS} segments")
    for seg in segments:
        if not _SEGMENT.fullmatch(seg):
            raise BadKey(f"key segment {seg[:64]!r} has characters outside [A-Za-z0-9._~+=:@,!$'()*-]")
    key = "/".join(segments)
    if len(key) > max_length:
        raise BadKey(f"a key is at most {max_length} characters")
    return key


def collection_of(segments: list[str]) -> bool:
    """Whether these segments name a WebDAV collection (sccache's directories):
    the remote's root or a path with a trailing slash whose other segments are valid."""
    return all(_SEGMENT.fullmatch(s) for s in segments[:-1]) and (not segments or segments[-1] == "")
