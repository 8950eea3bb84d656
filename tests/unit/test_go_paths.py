"""Go proxy paths (case-encoding, module paths, versions), module zip checks and options."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from sparkcache.config import ConfigError
from sparkcache.fetch.flight import BodyError
from sparkcache.protocols import load_config_data
from sparkcache.protocols.go import modzip, sumdb
from sparkcache.protocols.go.paths import BadModulePath, escape, is_canonical, parse, unescape
from tests.support.go_modules import SAMPLE, ModuleVersion, module_zip


@pytest.mark.parametrize("plain, escaped", [
    ("github.com/Azure/azure-sdk", "github.com/!azure/azure-sdk"),
    ("example.com/UPPER", "example.com/!u!p!p!e!r"),
    ("golang.org/x/text", "golang.org/x/text"),
    ("v1.0.0-RC.1", "v1.0.0-!r!c.1"),
])
def test_case_encoding_round_trips(plain: str, escaped: str) -> None:
    assert escape(plain) == escaped
    assert unescape(escaped) == plain


@pytest.mark.parametrize("bad", ["github.com/Azure/x", "example.com/!", "example.com/!1x", "example.com/a!!b"])
def test_upper_case_or_a_stray_bang_is_refused(bad: str) -> None:
    with pytest.raises(BadModulePath):
        unescape(bad)


def test_parse_reads_every_form() -> None:
    r = parse("github.com/!azure/sdk/@v/list".split("/"))
    assert (r.module, r.form, r.version, r.canonical) == ("github.com/Azure/sdk", "list", None, False)
    assert r.tail == "github.com/!azure/sdk/@v/list"
    r = parse("example.com/m/@latest".split("/"))
    assert (r.form, r.tail, r.canonical) == ("latest", "example.com/m/@latest", False)
    r = parse("example.com/m/v2/@v/v2.1.0-!r!c1.zip".split("/"))
    assert (r.module, r.version, r.form, r.canonical) == ("example.com/m/v2", "v2.1.0-RC1", "zip", True)
    r = parse("example.com/m/@v/master.info".split("/"))
    assert (r.version, r.canonical) == ("master", False)
    r = parse("example.com/m/@v/v0.0.0-20240102030405-abcdefabcdef.mod".split("/"))
    assert r.canonical
    assert parse("example.com/m/@v/v3.0.0+incompatible.zip".split("/")).canonical


@pytest.mark.parametrize("tail", [
    "example.com/../x/@v/list",            # dot segments
    "example.com/./x/@v/list",
    "example.com/.hidden/@v/list",         # leading dot
    "example.com/x./@v/list",              # trailing dot
    "Example.com/x/@v/list",               # upper case without '!'
    "example.com/X/@v/list",
    "!example.com/x/@v/list",              # upper-case first element
    "localhost/x/@v/list",                 # no dot in the first element
    "-example.com/x/@v/list",
    "example.com/a%b/@v/list",
    "example.com/a b/@v/list",
    "example.com/x/v1/@v/list",            # /v1 is no major-version suffix
    "example.com/" + "a" * 600 + "/@v/list",  # overlong
    "example.com/x/@v/v1.0.0",             # no extension
    "example.com/x/@v/v1.0.0.tar",
    "example.com/x/@v/master.zip",         # .zip/.mod of a query
    "example.com/x/@v/v1.0.mod",           # not canonical
    "example.com/x/@v/v1.0.0+build.zip",   # build metadata other than +incompatible
    "example.com/x/@v/..info",
    "example.com/x/@v/a..b.info",
    "example.com/x/@v/" + "1" * 300 + ".info",
    "example.com/x/@v/@latest",
    "example.com/x/list",
    "example.com/@x/@v/list",
    "@v/list",
])
def test_invalid_paths_and_versions_are_refused(tail: str) -> None:
    with pytest.raises(BadModulePath):
        parse(tail.split("/"))


@pytest.mark.parametrize("version, canonical", [
    ("v1.2.3", True), ("v0.0.0-20240102030405-abcdefabcdef", True), ("v2.0.0+incompatible", True),
    ("v1.2.3-rc.1", True), ("v1.2", False), ("1.2.3", False), ("v01.2.3", False), ("v1.2.3+meta", False),
    ("master", False), ("v1.2.3-01", False),
])
def test_canonical_versions(version: str, canonical: bool) -> None:
    assert is_canonical(version) is canonical


# -- module zips ----------------------------------------------------------------------


def _check(tmp_path: Path, data: bytes, module: str = "example.com/Upper/words", version: str = "v0.2.0",
           stored_mod: bytes | None = None) -> None:
    p = tmp_path / "spool"
    p.write_bytes(data)
    with open(p, "rb") as f:
        modzip.check_zip(f, module, version, stored_mod)


def _raw_zip(names: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, d in names.items():
            z.writestr(n, d)
    return out.getvalue()


def test_a_module_zip_passes(tmp_path: Path) -> None:
    mv = SAMPLE[1]
    _check(tmp_path, module_zip(mv), stored_mod=mv.gomod)
    assert modzip.read_zip(io.BytesIO(module_zip(mv)), len(module_zip(mv)), mv.module, mv.version) == mv.gomod


@pytest.mark.parametrize("names, why", [
    ({"example.com/other@v0.2.0/words.go": b"x"}, "not under"),
    ({"example.com/Upper/words@v0.2.1/words.go": b"x"}, "not under"),
    ({"example.com/upper/words@v0.2.0/words.go": b"x"}, "not under"),      # the module path's case matters
    ({"example.com/Upper/words@v0.2.0/../evil.go": b"x"}, "invalid path element"),
    ({"example.com/Upper/words@v0.2.0/a/../../evil.go": b"x"}, "clean"),
    ({"example.com/Upper/words@v0.2.0//abs.go": b"x"}, "clean"),
    ({"example.com/Upper/words@v0.2.0/a\\b.go": b"x"}, "invalid file name"),
    ({"example.com/Upper/words@v0.2.0/a.go": b"1", "example.com/Upper/words@v0.2.0/A.go": b"2"}, "case"),
    ({"example.com/Upper/words@v0.2.0/sub/go.mod": b"module x\n"}, "module root"),
    ({"example.com/Upper/words@v0.2.0/GO.MOD": b"module x\n"}, "module root"),
    ({"../../etc/passwd": b"x"}, "not under"),
])
def test_a_zip_that_is_no_module_zip_is_refused(tmp_path: Path, names: dict[str, bytes], why: str) -> None:
    with pytest.raises(BodyError, match=why):
        _check(tmp_path, _raw_zip(names))


def test_garbage_and_truncated_zips_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BodyError, match="not a zip"):
        _check(tmp_path, b"<html>not found</html>")
    good = module_zip(SAMPLE[1])
    with pytest.raises(BodyError):
        _check(tmp_path, good[: len(good) - 30])


def test_size_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modzip, "MAX_ZIP", 1000)
    big = ModuleVersion("example.com/Upper/words", "v0.2.0", {"go.mod": b"module example.com/Upper/words\n",
                                                               "big.txt": b"0" * 5000})
    with pytest.raises(BodyError, match="exceed"):
        _check(tmp_path, module_zip(big))


def test_go_mod_must_match_between_zip_and_mod(tmp_path: Path) -> None:
    mv = SAMPLE[1]
    with pytest.raises(BodyError, match="differs"):
        _check(tmp_path, module_zip(mv), stored_mod=b"module example.com/Upper/words\n\nrequire evil.example v1.0.0\n")
    with pytest.raises(BodyError, match="differs"):
        modzip.check_mod(io.BytesIO(b"module example.com/Upper/words\n// tampered\n"), mv.module, mv.version, mv.gomod)
    modzip.check_mod(io.BytesIO(mv.gomod), mv.module, mv.version, mv.gomod)
    modzip.check_mod(io.BytesIO(mv.gomod), mv.module, mv.version, None)


# -- the remote's options -----------------------------------------------------------------


def _go_remote(tmp_path: Path, **extra: object) -> sumdb.GoOptions:
    cfg = load_config_data({"storage": {"data_dir": str(tmp_path)},
                            "remotes": {"golang": {"type": "go", "upstream": "http://proxy.test", **extra}}},
                           environ={"SUMDB": "http://sumdb.test/x/"})
    remote = cfg.remotes["golang"]
    assert remote.cache.mutable_ttl == 300
    return sumdb.options_of(remote)


def test_sumdb_options(tmp_path: Path) -> None:
    assert _go_remote(tmp_path).sumdb == (("sum.golang.org", "https://sum.golang.org"),)
    assert _go_remote(tmp_path, sumdb=False).sumdb == ()
    assert _go_remote(tmp_path, sumdb=["sum.golang.google.cn"]).sumdb == \
        (("sum.golang.google.cn", "https://sum.golang.google.cn"),)
    assert _go_remote(tmp_path, sumdb={"sum.golang.org": "${SUMDB}"}).sumdb == \
        (("sum.golang.org", "http://sumdb.test/x"),)
    for bad in ({"Bad Name": None}, {"sum.golang.org": "ftp://x"}, 3, {}):
        with pytest.raises(ConfigError):
            _go_remote(tmp_path, sumdb=bad)
