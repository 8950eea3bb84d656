"""Pieces of the ``type: oci`` mirror that need no registry: paging links, the catalog filter."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from sparkcache.protocols.oci.config import OCIOptions
from sparkcache.protocols.oci.mirror import _filtered_catalog, _next_link


def _request(path: bytes, ns: bytes | None = None) -> SimpleNamespace:
    return SimpleNamespace(path=path, args={b"ns": [ns]} if ns else {})


def test_next_link_points_at_the_path_the_client_used() -> None:
    up = '<https://registry.example/v2/library/busy/tags/list?last=1.0&n=2&token=s3cret>; rel="next"'
    link = _next_link(_request(b"/v2/busy/tags/list", b"docker.io"), up)
    assert link == '</v2/busy/tags/list?n=2&last=1.0&ns=docker.io>; rel="next"'
    # Relative upstream links (what distribution sends) and odd characters.
    link = _next_link(_request(b"/v2/hub/_catalog"), '</v2/_catalog?last=team%2Fa%20b&n=5>; rel="next"')
    assert link == '</v2/hub/_catalog?n=5&last=team%2Fa+b>; rel="next"'
    assert _next_link(_request(b"/v2/hub/_catalog"), None) is None
    assert _next_link(_request(b"/v2/hub/_catalog"), "garbage") is None


def test_catalog_filter_applies_the_allow_list() -> None:
    page = json.dumps({"repositories": ["library/busy", "library/x/y", "team/app", "other/app", 7]}).encode()
    hub = OCIOptions(("docker.io",), (re.compile(r"^busy$"), re.compile(r"^team/")))
    assert json.loads(_filtered_catalog(page, hub)) == {"repositories": ["library/busy", "team/app"]}
    plain = OCIOptions((), (re.compile(r"^team/"),))
    assert json.loads(_filtered_catalog(page, plain)) == {"repositories": ["team/app"]}
    with pytest.raises(ValueError):
        _filtered_catalog(b'{"nope": 1}', plain)
