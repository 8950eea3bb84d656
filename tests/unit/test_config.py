import pytest

from sparkcache.config import ConfigError, parse_duration, parse_size
from sparkcache.protocols import load_config, load_config_data


def load(data, env=None):
    return load_config_data(data, "cache.yaml", env or {})


def test_defaults_and_types():
    cfg = load({"remotes": {"gh": {"upstream": "https://github.com", "immutable_patterns": ["/releases/download/"]}}})
    gh = cfg.remotes["gh"]
    assert gh.type == "generic"
    assert gh.cache.immutable_ttl == 0 and gh.cache.mutable_ttl == 3600
    assert gh.immutable_patterns[0].search("/o/r/releases/download/v1/x")
    assert cfg.server.listen == ("tcp:8090:interface=127.0.0.1",)


def test_durations_and_sizes():
    assert parse_duration("30s") == 30 and parse_duration("5m") == 300 and parse_duration(2) == 2.0
    assert parse_duration("1.5h") == 5400
    assert parse_size("50GiB") == 50 * 2**30 and parse_size("10MB") == 10_000_000 and parse_size(5) == 5
    with pytest.raises(ValueError):
        parse_duration("soon")
    with pytest.raises(ValueError):
        parse_size("-1")


@pytest.mark.parametrize(
    "data, path, problem",
    [
        ({"remotes": {"a": {"upstream": "https://x", "bogus": 1}}}, "remotes.a.bogus", "unknown key"),
        ({"remotes": {"a": {"upstream": "https://x", "cache": {"mutable_ttl": "abc"}}}}, "remotes.a.cache.mutable_ttl", "duration"),
        ({"remotes": {"a": {"upstream": "https://x", "immutable_patterns": ["("]}}}, "remotes.a.immutable_patterns[0]", "regular expression"),
        ({"remotes": {"a": {"upstream": "ftp://x"}}}, "remotes.a.upstream", "http"),
        ({"remotes": {"a": {}}}, "remotes.a.upstream", "missing"),
        ({"remotes": {"a": {"upstream": "https://x", "type": "nope"}}}, "remotes.a.type", "unknown remote type"),
        ({"remotes": {"a": {"upstream": "https://x", "credentials": {"password_env": "NOPE"}}}},
         "remotes.a.credentials.password_env", "NOPE is not set"),
        ({"auth": {"tokens": [{"token": "x", "scopes": ["root"]}]}}, "auth.tokens[0].scopes[0]", "unknown scope"),
        ({"auth": {"anonymous_read": "yes"}}, "auth.anonymous_read", "boolean"),
        ({"storage": {"max_size": "lots"}}, "storage.max_size", "size"),
        ({"nonsense": 1}, "nonsense", "unknown key"),
        ([1, 2], "", "mapping"),
    ],
)
def test_errors_name_file_key_and_problem(data, path, problem):
    with pytest.raises(ConfigError) as e:
        load(data)
    assert e.value.source == "cache.yaml"
    assert e.value.path == path
    assert problem in e.value.problem
    assert str(e.value).startswith("cache.yaml: ")


def test_fastapi_remotes_yaml_aliases():
    cfg = load({"remotes": {"alp": {"base_url": "https://dl.example/alpine", "package": "alpine",
                                    "username": "u", "password": "p"}}})
    r = cfg.remotes["alp"]
    assert r.upstream == "https://dl.example/alpine" and r.type == "alpine"
    assert r.credentials.username == "u" and r.credentials.password == "p"
    # built-in mutable defaults for the type
    assert any(p.search("/v3.19/main/x86_64/APKINDEX.tar.gz") for p in r.mutable_patterns)
    assert "***" in str(cfg.redacted()) and "'p'" not in str(cfg.redacted())


def test_deb_defaults_keep_by_hash_and_pool_immutable():
    r = load({"remotes": {"d": {"upstream": "https://deb.example/debian", "type": "deb"}}}).remotes["d"]
    mut = lambda p: any(x.search(p) for x in r.mutable_patterns)  # noqa: E731
    assert mut("/dists/stable/InRelease")
    assert mut("/dists/stable/main/binary-amd64/Packages.xz")
    assert mut("/dists/stable/main/i18n/Translation-en.bz2")
    assert not mut("/dists/stable/main/binary-amd64/by-hash/SHA256/abcd")
    assert not mut("/pool/main/h/hello/hello_2.10-3_amd64.deb")


def test_env_overrides_and_secret_env():
    env = {"SPARKCACHE_DATA_DIR": "/var/lib/x", "SPARKCACHE_PORT": "9000", "SPARKCACHE_ADMIN_TOKEN": "s3cret", "UP": "https://up.example"}
    cfg = load({"storage": {"data_dir": "./data"}, "remotes": {"a": {"upstream": "${UP}/simple"}}}, env)
    assert cfg.storage.data_dir == "/var/lib/x"
    assert cfg.server.listen == ("tcp:9000:interface=127.0.0.1",)
    assert cfg.auth.tokens[0].scopes == {"admin", "write", "read"}
    assert cfg.remotes["a"].upstream == "https://up.example/simple"
    assert "s3cret" not in repr(cfg.redacted())


def test_file_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("remotes: [\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p), {})
    assert "invalid YAML" in str(e.value) and str(p) in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "missing.yaml"), {})
    assert "cannot read" in str(e.value)


def test_bundled_config_loads():
    import os

    here = os.path.dirname(__file__)
    cfg = load_config(os.path.join(here, "..", "..", "etc", "cache.yaml"), {})
    assert "github" in cfg.remotes


def test_rpm_defaults_only_unchecksummed_metadata_mutable():
    r = load({"remotes": {"r": {"upstream": "https://rpm.example/9/BaseOS", "type": "rpm"}}}).remotes["r"]
    mut = lambda p: any(x.search(p) for x in r.mutable_patterns)  # noqa: E731
    assert mut("/x86_64/os/repodata/repomd.xml")
    assert mut("/x86_64/os/repodata/repomd.xml.asc")
    assert mut("/x86_64/os/repodata/primary.xml.gz")  # createrepo --simple-md-filenames
    assert not mut("/x86_64/os/repodata/" + "a" * 64 + "-primary.xml.gz")
    assert not mut("/x86_64/os/repodata/" + "0" * 40 + "-comps.xml")
    assert not mut("/x86_64/os/Packages/b/bash-5.1.8-6.el9.x86_64.rpm")


def test_bundled_example_config_loads_with_overrides():
    # `make run` uses etc/cache.yaml; --data-dir/--listen must work with it too.
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "cache.yaml")
    cfg = load_config(path, {"SPARKCACHE_DATA_DIR": "/tmp/x", "SPARKCACHE_LISTEN": "tcp:1"})
    assert cfg.storage.data_dir == "/tmp/x" and cfg.server.listen == ("tcp:1",)
    assert {r.type for r in cfg.remotes.values()} >= {"generic", "oci", "oci-local", "local"}
