"""OCI Distribution URL grammar: ``/v2/<name>/<tail>`` split, names, tags, digests.

The repository name may itself contain ``blobs`` or ``manifests`` components,
so the tail is recognised from the end of the path, where the spec puts it:

====================================  ===================================
path after ``/v2/``                   tail
====================================  ===================================
``<name>/manifests/<reference>``      ``["manifests", ref]``
``<name>/blobs/<digest>``             ``["blobs", digest]``
``<name>/blobs/uploads/``             ``["blobs", "uploads", ""]``
``<name>/blobs/uploads/<uuid>``       ``["blobs", "uploads", uuid]``
``<name>/tags/list``                  ``["tags", "list"]``
``<prefix>/_catalog``                 ``["_catalog"]`` (name is the prefix)
====================================  ===================================

Segments come from :func:`sparkcache.web.paths.split_raw_path`, so they are
already percent-decoded once and free of dot segments and separators.
"""

from __future__ import annotations

import re

from sparkcache.protocols.oci.errors import OCIError

# distribution-spec: [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_SHA256 = re.compile(r"^sha256:([a-f0-9]{64})$")
MAX_NAME = 255


def split_path(segments: list[str]) -> tuple[list[str], list[str]]:
    """Split the segments after ``v2`` into (name segments, tail); 404 when no tail fits."""
    s = segments
    n = len(s)
    if n >= 4 and s[-3] == "blobs" and s[-2] == "uploads":
        return s[:-3], s[-3:]
    if n >= 3 and s[-2] == "blobs" and s[-1] == "uploads":
        return s[:-2], ["blobs", "uploads", ""]
    if n >= 3 and s[-2] in ("manifests", "blobs") and s[-1] != "":
        return s[:-2], s[-2:]
    if n >= 3 and s[-2:] == ["tags", "list"]:
        return s[:-2], s[-2:]
    if n >= 1 and s[-1] == "_catalog":
        return s[:-1], ["_catalog"]
    raise OCIError("NAME_UNKNOWN", "not an OCI Distribution endpoint: expected /v2/<name>/(manifests|blobs|tags)/...", 404)


def validate_name(segments: list[str]) -> str:
    """The repository name, checked against the spec's grammar (NAME_INVALID otherwise)."""
    if not segments:
        raise OCIError("NAME_INVALID", "missing repository name")
    for c in segments:
        if not _COMPONENT.match(c):
            raise OCIError("NAME_INVALID", f"invalid repository name component {c!r}: lower-case letters, digits and "
                                           "single separators (. _ __ -) only")
    name = "/".join(segments)
    if len(name) > MAX_NAME:
        raise OCIError("NAME_INVALID", f"repository name longer than {MAX_NAME} characters")
    return name


def is_tag(ref: str) -> bool:
    return bool(_TAG.match(ref))


def is_digest(ref: str) -> bool:
    return ":" in ref and bool(_DIGEST.match(ref))


def sha256_hex(digest: str, code: str = "DIGEST_INVALID") -> str:
    """The hex part of a ``sha256:`` digest; other algorithms and malformed digests are refused."""
    m = _SHA256.match(digest)
    if m is None:
        if is_digest(digest) and not digest.startswith("sha256:"):
            raise OCIError("UNSUPPORTED", f"digest algorithm of {digest!r} is not supported (sha256 only)", 400)
        raise OCIError(code, f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    return m.group(1)


def check_reference(ref: str) -> str:
    """'tag' or 'digest'; a malformed reference is MANIFEST_UNKNOWN (404), so containerd tries its next host."""
    if is_digest(ref):
        sha256_hex(ref)
        return "digest"
    if is_tag(ref):
        return "tag"
    raise OCIError("MANIFEST_UNKNOWN", f"invalid reference {ref!r}: neither a tag nor a digest", 404)


def upstream_name(name: str, docker_hub: bool) -> str:
    """Docker Hub keeps single-component official images under ``library/``."""
    return f"library/{name}" if docker_hub and "/" not in name else name
