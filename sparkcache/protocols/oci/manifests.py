"""What a pushed manifest declares: its media type and the digests it references."""

from __future__ import annotations

import json
from typing import Any

from sparkcache.protocols.oci.errors import OCIError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)


def parse_manifest(body: bytes, content_type: str | None) -> tuple[str, list[tuple[str, str]]]:
    """(media type, [(\"blob\" | \"manifest\", digest)]) of a manifest body, or OCIError."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise OCIError("MANIFEST_INVALID", f"manifest is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise OCIError("MANIFEST_INVALID", "manifest is not a JSON object")
    declared = doc.get("mediaType")
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in ("", "application/json", "application/octet-stream"):
        ctype = ""
    if declared is not None and not isinstance(declared, str):
        raise OCIError("MANIFEST_INVALID", "mediaType must be a string")
    if ctype and declared and declared != ctype:
        raise OCIError("MANIFEST_INVALID", f"Content-Type {ctype!r} does not match the manifest's mediaType {declared!r}")
    media_type = ctype or declared or (OCI_INDEX if "manifests" in doc else OCI_MANIFEST)
    if doc.get("schemaVersion") != 2:
        raise OCIError("MANIFEST_INVALID", "only schemaVersion 2 manifests are supported")
    refs: list[tuple[str, str]] = []
    if media_type in INDEX_TYPES or (media_type not in IMAGE_TYPES and "manifests" in doc):
        for d in _descriptors(doc, "manifests", required=True):
            # BuildKit's registry cache lists layer blobs in an index: either kind may be referenced.
            refs.append(("manifest", d))
    else:
        config = doc.get("config")
        if config is None and media_type in IMAGE_TYPES:
            raise OCIError("MANIFEST_INVALID", "an image manifest needs a config descriptor")
        if config is not None:
            refs += [("blob", d) for d in _descriptors({"c": [config]}, "c", required=True)]
        for field in ("layers", "blobs"):
            refs += [("blob", d) for d in _descriptors(doc, field, required=field == "layers" and media_type in IMAGE_TYPES)]
    return media_type, refs


def _descriptors(doc: dict[str, Any], field: str, required: bool) -> list[str]:
    items = doc.get(field)
    if items is None and not required:
        return []
    if not isinstance(items, list):
        raise OCIError("MANIFEST_INVALID", f"{field} must be a list of descriptors")
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("digest"), str) or not isinstance(item.get("size"), int):
            raise OCIError("MANIFEST_INVALID", f"a descriptor in {field} lacks a digest or size")
        if item.get("urls"):
            continue  # foreign layers live elsewhere, as distribution allows
        out.append(item["digest"])
    return out
