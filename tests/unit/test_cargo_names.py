"""Cargo's pure parts: crate-name rules, index paths, dl templates (every
marker), the config.json rewrite and the cksum digests of index files."""

from __future__ import annotations

import json

import pytest

from sparkcache.protocols.cargo import names
from sparkcache.protocols.cargo.index import (
    CargoIndex, cache_dl, expand_dl, index_digests, parse_dl, rewrite_config,
)
from sparkcache.web.errors import HTTPError

SUM_A, SUM_B = "a" * 64, "b" * 64


@pytest.mark.parametrize("name, path", [
    ("a", "1/a"), ("ab", "2/ab"), ("abc", "3/a/abc"), ("abcd", "ab/cd/abcd"), ("serde", "se/rd/serde"),
    ("Inflector", "in/fl/inflector"), ("cargo-util_x", "ca/rg/cargo-util_x"), ("_ab", "3/_/_ab"),
])
def test_index_paths_follow_cargos_layout(name: str, path: str) -> None:
    assert names.index_path(name) == path
    assert names.name_of_index_path(path.split("/")) == name.lower()


def test_prefix_keeps_the_names_case() -> None:
    assert names.prefix("Inflector") == "In/fl"
    assert names.prefix("Abc") == "3/A"
    assert names.prefix("X") == "1"


@pytest.mark.parametrize("name", [
    "", "1abc", "-abc", "a b", "a.b", "a/b", "ä", "a" * 65, "..", "serde\n", "a%2fb",
])
def test_names_outside_the_rules_are_refused(name: str) -> None:
    assert not names.valid_name(name)
    with pytest.raises(HTTPError) as e:
        names.check_name(name)
    assert e.value.status == 400


def test_longest_name_is_accepted() -> None:
    assert names.check_name("a" * 64) == "a" * 64


@pytest.mark.parametrize("segments, status", [
    (["se", "rd", "sexde"], 400),           # the name computes to another directory
    (["se", "rd", "Serde"], 400),           # index paths are lower case
    (["1", "ab"], 400),
    (["3", "b", "abc"], 400),
    (["ab", "cd", "ef", "abcd"], 400),
    (["se", "rd", "../x"], 400),
    ([], 404),
    (["se", "rd", ""], 404),
])
def test_wrong_index_paths_are_refused(segments: list[str], status: int) -> None:
    with pytest.raises(HTTPError) as e:
        names.name_of_index_path(segments)
    assert e.value.status == status


@pytest.mark.parametrize("version, ok", [
    ("1.0.0", True), ("0.1.12-alpha.1+build.5", True), ("10.20.30", True),
    ("1.0", False), ("01.0.0", False), ("1.0.0/..", False), ("..", False), ("1.0.0-", False),
    ("1.0.0 ", False), ("1.0.0-" + "a" * 200, False),
])
def test_versions_are_semver(version: str, ok: bool) -> None:
    assert names.valid_version(version) is ok


# -- dl templates ----------------------------------------------------------------------


def test_dl_without_markers_gets_crate_version_download_appended() -> None:
    assert expand_dl("https://dl.example/api/v1/crates", "Serde", "1.0.0", SUM_A) == \
        "https://dl.example/api/v1/crates/Serde/1.0.0/download"


def test_dl_with_every_marker() -> None:
    t = "https://dl.example/{prefix}/{lowerprefix}/{crate}/{crate}-{version}.crate?sum={sha256-checksum}"
    assert expand_dl(t, "Inflector", "0.11.4", SUM_A) == \
        f"https://dl.example/In/fl/in/fl/Inflector/Inflector-0.11.4.crate?sum={SUM_A}"
    assert expand_dl("https://dl.example/{lowerprefix}/{crate}", "abc", "1.0.0", SUM_A) == \
        "https://dl.example/3/a/abc"
    # one marker is enough to stop the append
    assert expand_dl("https://dl.example/by-sum/{sha256-checksum}", "x", "1.0.0", SUM_B) == \
        f"https://dl.example/by-sum/{SUM_B}"


@pytest.mark.parametrize("body", [
    b"", b"[]", b"{}", b'{"dl": 5}', b'{"dl": ""}', b'{"dl": "/relative/{crate}"}', b'{"dl": "file:///etc/{crate}"}',
    b'{"dl": "ftp://x.example/"}',
])
def test_unusable_dl_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_dl(body)


def test_config_rewrite_points_dl_at_the_cache_and_drops_api() -> None:
    up = {"dl": "https://static.example/crates", "api": "https://registry.example", "auth-required": True,
          "extra": {"kept": 1}}
    out = json.loads(rewrite_config(json.dumps(up).encode(), "http://cache:8090/cargo/crates"))
    assert out == {"dl": "http://cache:8090/cargo/crates/crates/{crate}/{version}/download",
                   "auth-required": True, "extra": {"kept": 1}}
    assert cache_dl("http://c/cargo/r") == out["dl"].replace("http://cache:8090/cargo/crates", "http://c/cargo/r")
    with pytest.raises(ValueError):
        rewrite_config(b"[1]", "http://c")


# -- digests of index files --------------------------------------------------------------


def line(name: str, vers: str, cksum: object, **more: object) -> bytes:
    return json.dumps({"name": name, "vers": vers, "deps": [], "cksum": cksum, "features": {}, "yanked": False,
                       **more}).encode()


def test_index_lines_give_cksums_of_their_own_crate_only() -> None:
    body = b"\n".join([
        line("Serde", "1.0.0", SUM_A),
        line("serde", "1.0.1", SUM_B, yanked=True),   # yanked versions still download
        line("other", "1.0.0", SUM_A),                # another crate: this file cannot vouch for it
        line("serde", "1.0.2", "not-a-sum"),
        line("serde", "bad", SUM_A),
        b"{not json",
        b"",
        b"[1, 2]",
        line("serde", "1.0.3", SUM_A.upper()),       # cargo writes lower-case hex
    ]) + b"\n"
    assert index_digests(body, "index/se/rd/serde") == {
        "crates/Serde/1.0.0/download": SUM_A,
        "crates/serde/1.0.1/download": SUM_B,
    }


def test_a_version_listed_with_two_sums_is_verified_against_neither() -> None:
    body = line("abc", "1.0.0", SUM_A) + b"\n" + line("abc", "1.0.0", SUM_B) + b"\n" + line("abc", "2.0.0", SUM_B)
    assert index_digests(body, "index/3/a/abc") == {"crates/abc/2.0.0/download": SUM_B}


def test_indexes_listing_a_crate() -> None:
    listing = CargoIndex.indexes_listing
    assert listing(None, "crates/Serde/1.0.0/download") == ["index/se/rd/serde"]  # type: ignore[arg-type]
    assert listing(None, "crates/../1.0.0/download") == ()  # type: ignore[arg-type]
    assert listing(None, "index/se/rd/serde") == ()  # type: ignore[arg-type]
