"""The pure parts of the npm protocol: registry paths (raw, every spelling of a
scoped name), Accept negotiation, the byte-level tarball rewrite, the digest
scan of ``dist`` objects, the JSON check and the abbreviated form."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from typing import Any

import pytest

from sparkcache.protocols.npm import names
from sparkcache.protocols.npm.app import accepts_gzip, tarball_urls, wanted_form
from sparkcache.protocols.npm.packument import (
    KEEP_IDENTITY, NotJSON, Tarball, abbreviate, check_json, decoded, integrity_sha512, render, tarballs,
)
from sparkcache.protocols.npm.publish import PublishError, merge
from sparkcache.web.paths import BadPath


def route(path: str) -> names.Route:
    return names.parse(names.raw_segments(path.encode()))


@pytest.mark.parametrize("path", ["@s%2fn", "@s%2Fn", "@s/n", "/@s/n/", "//@s%2fn"])
def test_every_spelling_of_a_scoped_name_is_one_package(path: str) -> None:
    assert route(path) == names.Route("packument", "@s/n")


@pytest.mark.parametrize("path,name,file", [
    ("@s/n/-/n-1.0.0.tgz", "@s/n", "n-1.0.0.tgz"),
    ("@s%2fn/-/n-1.0.0.tgz", "@s/n", "n-1.0.0.tgz"),
    ("left-pad/-/left-pad-1.3.0.tgz", "left-pad", "left-pad-1.3.0.tgz"),
    ("a/-/a-1.0.0-rc.1%2Bbuild.5.tgz", "a", "a-1.0.0-rc.1+build.5.tgz"),
])
def test_tarball_paths(path: str, name: str, file: str) -> None:
    r = route(path)
    assert (r.kind, r.name, r.file, r.path) == ("tarball", name, file, f"{name}/-/{file}")


def test_special_paths() -> None:
    assert route("-/ping") == names.Route("special", rest=("ping",))
    assert route("-/v1/search") == names.Route("special", rest=("v1", "search"))
    assert route("-/package/@s%2fn/dist-tags") == names.Route("special", name="@s/n", rest=("package", "dist-tags"))
    assert route("-/package/@s/n/dist-tags/next") == \
        names.Route("special", name="@s/n", rest=("package", "dist-tags", "next"))
    assert route("") == names.Route("root")
    assert route("left-pad/1.3.0") == names.Route("version", "left-pad", "1.3.0")


@pytest.mark.parametrize("path", [
    "..", "%2e%2e", "@s%2f..", "@s%2f%2e%2e", "@..%2fn", "@s/..", ".n", "_n", "n%00", "n%0a", "a%5cb", "a\\b",
    "n%2fm", "@s%2fn%2fm", "@s", "n/-/..%2fx.tgz", "n/-/x.zip", "n/-/.x.tgz", "a b", "%ff", "@s/n/-/n-1.tgz/x",
    "n/x/y", "x" * 215, "-/v1%2fsearch",
])
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(BadPath):
        route(path)


def test_names() -> None:
    assert names.check_name("JSONStream") == "JSONStream"  # legacy upper case is still served
    assert names.url_name("@s/n") == "@s/n"
    with pytest.raises(BadPath):
        names.check_name("@/n")


@pytest.mark.parametrize("accept,form", [
    ("application/json", "full"),
    (None, "full"),
    ("*/*", "full"),
    ("application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*", "abbreviated"),
    ("application/vnd.npm.install-v1+json", "abbreviated"),
    ("application/vnd.npm.install-v1+json;q=0, application/json", "full"),
    ("APPLICATION/VND.NPM.INSTALL-V1+JSON;q=junk", "abbreviated"),
])
def test_negotiation(accept: str | None, form: str) -> None:
    assert wanted_form(accept) == form


def test_gzip_negotiation() -> None:
    assert accepts_gzip("gzip, deflate, br")
    assert accepts_gzip("*")
    assert not accepts_gzip(None)
    assert not accepts_gzip("gzip;q=0, deflate")
    assert not accepts_gzip("br")


def doc_with(n: int, base: str = "http://up.example/reg") -> dict[str, Any]:
    versions = {}
    for i in range(n):
        data = f"tarball {i}".encode()
        versions[f"1.0.{i}"] = {
            "name": "@s/n", "version": f"1.0.{i}", "description": "z" * 200,
            "dist": {"tarball": f"{base}/@s/n/-/n-1.0.{i}.tgz",
                     "integrity": "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode(),
                     "shasum": hashlib.sha1(data).hexdigest(),
                     "signatures": [{"keyid": "k", "sig": "MEU=="}]},
        }
    return {"name": "@s/n", "dist-tags": {"latest": "1.0.0"}, "versions": versions,
            "time": {"modified": "2024-01-01T00:00:00Z"}, "readme": 'say "tarball": "http://x/-/y.tgz"'}


def test_render_rewrites_only_tarball_urls_and_gzips() -> None:
    doc = doc_with(3)
    body = json.dumps(doc, indent=2).encode()
    out = render(body, "http://cache.test/npm/r/@s/n")
    plain = gzip.decompress(out.gz)
    assert out.size == len(plain) and out.identity == plain
    got = json.loads(plain)
    for v, meta in got["versions"].items():
        assert meta["dist"]["tarball"] == f"http://cache.test/npm/r/@s/n/-/n-{v}.tgz"
        want = doc["versions"][v]["dist"]
        assert {k: meta["dist"][k] for k in ("integrity", "shasum", "signatures")} == \
            {k: want[k] for k in ("integrity", "shasum", "signatures")}
    # Text inside strings (a readme quoting a tarball member) is left alone.
    assert got["readme"] == doc["readme"]
    # Only the URLs differ from upstream's bytes.
    assert plain == body.replace(b"http://up.example/reg/@s/n/-/", b"http://cache.test/npm/r/@s/n/-/")


def test_render_of_a_large_body_keeps_only_its_gzip() -> None:
    body = json.dumps(doc_with(2000)).encode()
    assert len(body) > KEEP_IDENTITY
    out = render(body, "http://c/npm/r/@s/n")
    assert out.identity is None and len(out.gz) < len(body) // 4
    assert json.loads(out.plain())["versions"]["1.0.1999"]["dist"]["tarball"] == "http://c/npm/r/@s/n/-/n-1.0.1999.tgz"


def test_tarballs_reads_the_dist_objects() -> None:
    doc = doc_with(3)
    del doc["versions"]["1.0.1"]["dist"]["integrity"]
    found = tarballs(json.dumps(doc).encode())
    assert set(found) == {"n-1.0.0.tgz", "n-1.0.1.tgz", "n-1.0.2.tgz"}
    t0 = found["n-1.0.0.tgz"]
    assert t0.url == "http://up.example/reg/@s/n/-/n-1.0.0.tgz"
    assert t0.checks == (("sha512", hashlib.sha512(b"tarball 0").hexdigest()),)
    assert found["n-1.0.1.tgz"].checks == (("sha1", hashlib.sha1(b"tarball 1").hexdigest()),)


def test_tarballs_trusts_no_file_upstream_lists_twice_with_different_digests() -> None:
    doc = doc_with(2)
    doc["versions"]["1.0.1"]["dist"]["tarball"] = doc["versions"]["1.0.0"]["dist"]["tarball"]
    assert set(tarballs(json.dumps(doc).encode())) == set()


def test_tarballs_ignores_what_is_not_a_dist_object() -> None:
    body = b'{"files": ["dist"], "directories": {"dist": "lib"}, "x": "\\"dist\\": {"}'
    assert tarballs(body) == {}
    assert Tarball("u").checks == ()


def test_integrity_values() -> None:
    digest = hashlib.sha512(b"x").digest()
    sri = "sha512-" + base64.b64encode(digest).decode()
    assert integrity_sha512(sri) == digest.hex()
    assert integrity_sha512("sha1-abc " + sri) == digest.hex()
    assert integrity_sha512("sha256-abc") is None
    assert integrity_sha512("sha512-!!!") is None
    assert integrity_sha512(None) is None


def test_check_json() -> None:
    check_json(b' {"a": [1, {"b": null}]}')
    for bad in (b"<html>", b'{"a": ', b"[1]", b"", b'{"a": 1} trailing'):
        with pytest.raises(NotJSON):
            check_json(bad)


def test_decoded_inflates_a_gzipped_upstream_body_within_a_limit() -> None:
    assert decoded(gzip.compress(b'{"a":1}'), {"content-encoding": "gzip"}, 100) == b'{"a":1}'
    assert decoded(b"{}", {}, 1) == b"{}"
    with pytest.raises(NotJSON):
        decoded(gzip.compress(b" " * 1000), {"content-encoding": "gzip"}, 100)


def test_abbreviate() -> None:
    doc = doc_with(1)
    doc["versions"]["1.0.0"]["hasInstallScript"] = True
    a = abbreviate(doc)
    assert set(a) == {"name", "modified", "dist-tags", "versions"}
    assert a["modified"] == "2024-01-01T00:00:00Z"
    assert set(a["versions"]["1.0.0"]) == {"name", "version", "dist", "hasInstallScript"}


def test_tarball_urls_tries_the_same_path_on_the_other_upstreams() -> None:
    ups = ("http://a/reg", "http://b")
    assert tarball_urls("http://a/reg/n/-/n-1.tgz", ups) == ["http://a/reg/n/-/n-1.tgz", "http://b/n/-/n-1.tgz"]
    assert tarball_urls("http://elsewhere/n/-/n-1.tgz", ups) == ["http://elsewhere/n/-/n-1.tgz"]


def test_merge_keeps_old_versions_and_refuses_republishing() -> None:
    old = {"name": "n", "versions": {"1.0.0": {}}, "dist-tags": {"latest": "1.0.0", "beta": "1.0.0"},
           "time": {"created": "t0", "1.0.0": "t0"}}
    new = {"name": "n", "versions": {"1.1.0": {}}, "dist-tags": {"latest": "1.1.0"}, "readme": "new"}
    merged = merge(old, new, "n", "t1")
    assert sorted(merged["versions"]) == ["1.0.0", "1.1.0"]
    assert merged["dist-tags"] == {"latest": "1.1.0", "beta": "1.0.0"}
    assert merged["time"] == {"created": "t0", "1.0.0": "t0", "1.1.0": "t1", "modified": "t1"}
    assert merged["readme"] == "new"
    with pytest.raises(PublishError) as e:
        merge(merged, {"name": "n", "versions": {"1.0.0": {}}}, "n", "t2")
    assert e.value.status == 403
