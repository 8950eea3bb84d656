"""What a path in a Maven (or Ivy) repository is, from the path alone.

A Maven repository is a tree of ``group/as/dirs/artifact/version/file``:

- ``maven-metadata.xml`` at the group, artifact and ``-SNAPSHOT`` version
  levels lists versions (and a snapshot's latest timestamp): it changes in
  place, so it is *mutable*;
- a release file and a timestamped snapshot file
  (``1.0-SNAPSHOT/lib-1.0-20240101.120000-3.jar``) never change once
  published: *immutable*;
- a non-unique snapshot file (``1.0-SNAPSHOT/lib-1.0-SNAPSHOT.jar``, Maven 2
  style and some local deploys) is overwritten in place: *mutable*;
- repository indexes (``.index/``, ``.meta/``, ``archetype-catalog.xml``) and
  directory listings (a path ending in ``/``, which Ivy and Gradle read for
  dynamic versions) change: *mutable*;
- a sidecar (``.sha1``, ``.md5``, ``.sha256``, ``.sha512``, ``.asc``) belongs
  to the file it is named after and has that file's freshness.

Ivy layouts (``org/module/1.0/ivy-1.0.xml``, ``[organisation]/[module]/...``)
are paths like any other: release files, immutable.

Nothing here decides what is safe; the raw path was vetted already
(:func:`sparkcache.web.paths.split_raw_path` refuses dot segments, encoded
separators, backslashes and control characters). :func:`check_segments` adds
what a repository path never has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Sidecar extension → the hashlib name its body is a digest in (None: a signature).
SIDECARS: dict[str, str | None] = {"sha1": "sha1", "md5": "md5", "sha256": "sha256", "sha512": "sha512",
                                   "asc": None}
HEX_LENGTH = {"sha1": 40, "md5": 32, "sha256": 64, "sha512": 128}

METADATA = "metadata"
ARTIFACT = "artifact"
CHECKSUM = "checksum"

# ``<base>-YYYYMMDD.HHMMSS-<build>`` after the version's base in a snapshot file name.
_TIMESTAMP = re.compile(r"-\d{8}\.\d{6}-\d+")
_METADATA = re.compile(r"^maven-metadata(-[^/]+)?\.xml$")
_MUTABLE_NAMES = frozenset({"archetype-catalog.xml", "prefixes.txt"})
_MUTABLE_DIRS = frozenset({".index", ".meta"})
MAX_SEGMENT = 255


class NotARepositoryPath(ValueError):
    """A path no Maven or Ivy repository has."""


@dataclass(frozen=True)
class RepoPath:
    """One repository path, classified."""

    path: str  # as requested (a directory listing ends in "/")
    form: str  # METADATA | ARTIFACT | CHECKSUM (a sidecar), for metrics
    mutable: bool
    # For a sidecar: the file it belongs to, and its digest algorithm (None for ``.asc``).
    base: str | None = None
    algorithm: str | None = None

    @property
    def listing(self) -> bool:
        return self.path.endswith("/")

    @property
    def verifiable(self) -> bool:
        """Whether this is a file whose bytes never change and upstream's sidecar
        can vouch for (a release or a timestamped snapshot, not a sidecar)."""
        return self.form == ARTIFACT and not self.mutable and not self.listing


def check_segments(segments: list[str]) -> None:
    """Raise NotARepositoryPath for segments no repository path has (beyond what
    the raw-path vetting refused already)."""
    for s in segments:
        if len(s) > MAX_SEGMENT:
            raise NotARepositoryPath(f"a path segment longer than {MAX_SEGMENT} characters")
        if s.strip() != s or s.startswith("~") or s in ("..", "."):
            raise NotARepositoryPath(f"{s!r} is not a repository path segment")


def classify(path: str) -> RepoPath:
    """The form and freshness of ``path`` (no leading slash)."""
    if path.endswith("/"):
        return RepoPath(path, METADATA, True)
    directory, _, name = path.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    if dot and stem and ext in SIDECARS:
        base = f"{directory}/{stem}" if directory else stem
        of = classify(base)
        return RepoPath(path, CHECKSUM, of.mutable, base=base, algorithm=SIDECARS[ext])
    if _METADATA.match(name):
        return RepoPath(path, METADATA, True)
    dirs = directory.split("/") if directory else []
    if name in _MUTABLE_NAMES or any(d in _MUTABLE_DIRS for d in dirs):
        return RepoPath(path, METADATA, True)
    version = dirs[-1] if dirs else ""
    if version.endswith("-SNAPSHOT"):
        return RepoPath(path, ARTIFACT, not is_timestamped(version, name))
    return RepoPath(path, ARTIFACT, False)


def is_timestamped(version: str, name: str) -> bool:
    """Whether ``name``, in the ``version`` (``1.0-SNAPSHOT``) directory, is a
    timestamped (unique) snapshot file, which never changes."""
    base = version[: -len("-SNAPSHOT")]
    if base and f"-{base}-" in name:
        return re.search(re.escape(f"-{base}") + _TIMESTAMP.pattern, name) is not None
    # The file names no version (an Ivy file, a custom layout): trust a timestamp anywhere.
    return bool(_TIMESTAMP.search(name)) and "-SNAPSHOT" not in name


def parse_sidecar(body: bytes, algorithm: str) -> str | None:
    """The hex digest a sidecar file states, or None when it states none.

    Usually the bare hex; some tools write ``<hex>  <file name>`` or
    ``<file name>: <hex>`` (older Nexus, md5sum), so any token of the right
    length wins."""
    want = HEX_LENGTH[algorithm]
    try:
        text = body[:4096].decode("ascii")
    except UnicodeDecodeError:
        return None
    for token in re.split(r"[\s:*]+", text):
        if len(token) == want and re.fullmatch(r"[0-9a-fA-F]+", token):
            return token.lower()
    return None
