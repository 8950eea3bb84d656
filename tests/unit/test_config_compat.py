"""Configuration people bring with them: the FastAPI artifact cache's
``remotes.yaml`` (``type: remote|local`` + ``package:``, ``description``), the
rule that a key a remote type does not use is an error naming it, and the
sparkwing-cache environment as aliases of the ``SPARKCACHE_*`` names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sparkcache.config import SHARED_KEYS, UPSTREAM_KEYS, ConfigError
from sparkcache.git.config import parse_env_repos
from sparkcache.protocols import load_config, load_config_data, remote_types
from sparkcache.protocols.oci.config import DEFAULT_TAG_TTL, options_of

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fastapi_remotes.yaml"


def load(data: Any, env: dict[str, str] | None = None) -> Any:
    return load_config_data(data, "cache.yaml", env or {})


def remote(body: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    return load({"remotes": {"r": body}}, env).remotes["r"]


def fails(data: Any, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load(data, env)
    return e.value


# -- the FastAPI remotes.yaml ---------------------------------------------------------


def test_the_fastapi_remotes_yaml_loads_unchanged() -> None:
    cfg = load_config(str(FIXTURE), {})
    r = cfg.remotes
    assert {n: x.type for n, x in r.items()} == {
        "github": "generic", "alpine": "alpine", "rocky": "rpm", "builds": "local", "dockerhub": "oci", "images": "oci-local"}
    assert r["github"].upstream == "https://github.mirror.example"
    assert [p.pattern for p in r["github"].immutable_patterns] == ["/releases/download/"]
    assert r["alpine"].cache.mutable_ttl == 1800 and r["alpine"].check_mutable_updates
    assert any(p.search("/v3.19/main/x86_64/APKINDEX.tar.gz") for p in r["alpine"].mutable_patterns)
    assert r["rocky"].credentials.username == "mirror-user" and r["rocky"].credentials.password == "mirror-pass"
    assert r["builds"].upstream is None
    # The docker remote: a pull-through registry whose allow-list and tag TTL are the file's.
    hub = options_of(r["dockerhub"])
    assert [p.pattern for p in hub.repositories] == ["^library/nginx"]
    assert hub.permits("library/nginx") and not hub.permits("library/redis")
    assert hub.tag_ttl == 600 == r["dockerhub"].cache.mutable_ttl
    # Descriptions are kept, and shown in /config (the secret is not).
    assert r["builds"].description == "Build outputs uploaded by CI"
    shown = cfg.redacted()
    assert shown["remotes"]["dockerhub"]["description"] == "Docker Hub, nginx images only"
    assert "mirror-pass" not in repr(shown)


@pytest.mark.parametrize("kind, package, expected", [
    ("remote", "generic", "generic"),
    ("remote", "alpine", "alpine"),
    ("remote", "rpm", "rpm"),
    ("remote", "docker", "oci"),
    ("remote", None, "generic"),
    ("remote", "pypi", "pypi"),
    ("local", "generic", "local"),
    ("local", "alpine", "local"),
    ("local", "rpm", "local"),
    ("local", "docker", "oci-local"),
    ("local", None, "local"),
    ("local", "pypi", "pypi-local"),
    ("local", "npm", "npm-local"),
    (None, "alpine", "alpine"),  # package alone names the type, as before
    (None, "docker", "oci"),
    ("oci", "docker", "oci"),  # a sparkcache type with an agreeing package
])
def test_type_and_package_pick_the_remote_type(kind: str | None, package: str | None, expected: str) -> None:
    body: dict[str, Any] = {}
    if kind is not None:
        body["type"] = kind
    if package is not None:
        body["package"] = package
    local = kind == "local"
    if not local:
        body["base_url"] = "https://up.example"
    assert remote(body).type == expected


@pytest.mark.parametrize("body, path, problem", [
    ({"type": "remote", "package": "kv"}, "remotes.r.package", "package: kv has no pull-through type"),
    ({"type": "local", "package": "go", "base_url": "https://up.example"}, "remotes.r.package",
     "package: go has no type: local counterpart"),
    ({"type": "remote", "package": "conan", "base_url": "https://up.example"}, "remotes.r.package",
     "unknown package 'conan'"),
    ({"type": "generic", "package": "alpine", "base_url": "https://up.example"}, "remotes.r.package",
     "package: alpine disagrees with type: generic"),
    ({"package": "conan", "base_url": "https://up.example"}, "remotes.r.package", "unknown remote type 'conan'"),
    ({"type": "remote", "package": "generic", "description": 7, "base_url": "https://up.example"},
     "remotes.r.description", "expected a string"),
])
def test_type_and_package_errors_name_the_key(body: dict[str, Any], path: str, problem: str) -> None:
    e = fails({"remotes": {"r": body}})
    assert e.path == path and problem in e.problem, str(e)


# -- a key a type does not use is an error --------------------------------------------


@pytest.mark.parametrize("body, key", [
    ({"type": "local", "cache": {"mutable_ttl": "1h"}}, "cache.mutable_ttl"),
    ({"type": "local", "upstream": "https://up.example"}, "upstream"),
    ({"type": "local", "package": "generic", "immutable_patterns": ["x"]}, "immutable_patterns"),
    ({"type": "pypi", "upstream": "https://up.example", "immutable_patterns": ["x"]}, "immutable_patterns"),
    ({"type": "pypi", "upstream": "https://up.example", "cache": {"immutable_ttl": "1d"}}, "cache.immutable_ttl"),
    ({"type": "npm", "upstream": "https://up.example", "check_mutable_updates": True}, "check_mutable_updates"),
    ({"type": "go", "upstream": "https://up.example", "mutable_patterns": ["x"]}, "mutable_patterns"),
    ({"type": "cargo", "upstream": "https://up.example", "immutable_patterns": ["x"]}, "immutable_patterns"),
    ({"type": "maven", "upstream": "https://up.example", "immutable_patterns": ["x"]}, "immutable_patterns"),
    ({"type": "oci", "upstream": "https://up.example", "mutable_patterns": ["x"]}, "mutable_patterns"),
    ({"type": "oci", "upstream": "https://up.example", "cache": {"immutable_ttl": "1d"}}, "cache.immutable_ttl"),
    ({"type": "oci", "upstream": "https://up.example", "check_mutable_updates": True}, "check_mutable_updates"),
    ({"type": "oci-local", "credentials": {"username": "u", "password": "p"}}, "credentials"),
    ({"type": "oci-local", "cache": {"mutable_ttl": "5m"}}, "cache.mutable_ttl"),
    ({"type": "kv", "read_timeout": "5s"}, "read_timeout"),
    ({"type": "bazel", "cache": {"negative_ttl": "5s"}}, "cache.negative_ttl"),
    ({"type": "pypi-local", "username": "u"}, "username"),
])
def test_a_key_without_effect_is_an_error_naming_it(body: dict[str, Any], key: str) -> None:
    e = fails({"remotes": {"r": body}})
    assert str(e) == f"cache.yaml: remotes.r.{key}: has no effect on type: {body['type']} remotes"


def test_immutable_ttl_zero_is_what_pull_through_types_do_anyway() -> None:
    # remotes.yaml files carry one cache: block on every remote; 0 (until evicted)
    # on a type that keeps content by digest says what happens, so it loads
    for rtype in ("oci", "pypi"):
        load_config_data({"remotes": {"r": {"type": rtype, "upstream": "https://up.example",
                                            "cache": {"immutable_ttl": 0}}}}, "c.yaml", {})
    with pytest.raises(ConfigError, match="cache.immutable_ttl: has no effect"):
        load_config_data({"remotes": {"r": {"type": "oci", "upstream": "https://up.example",
                                            "cache": {"immutable_ttl": "1h"}}}}, "c.yaml", {})


def test_tag_ttl_is_oci_only() -> None:
    e = fails({"remotes": {"r": {"type": "oci-local", "tag_ttl": "5m"}}})
    assert e.path == "remotes.r.tag_ttl" and "type: oci remotes only" in e.problem


def test_every_type_declares_shared_keys_it_uses() -> None:
    types = remote_types()
    for kind in types.values():
        assert kind.honours <= SHARED_KEYS, kind.name
        if kind.needs_upstream:
            # Whatever fetches through the engine uses its upstream, credentials, timeouts and 404 TTL.
            assert UPSTREAM_KEYS <= kind.honours, kind.name
        elif not kind.name.endswith("-group"):
            assert kind.honours <= {"immutable_patterns"}, kind.name
    assert types["generic"].honours == SHARED_KEYS
    assert types["oci"].honours == UPSTREAM_KEYS | {"immutable_patterns", "cache.mutable_ttl"}


def test_keys_a_type_uses_still_load() -> None:
    full = {"upstream": "https://up.example", "immutable_patterns": ["/dl/"], "mutable_patterns": ["index"],
            "check_mutable_updates": True, "cache": {"immutable_ttl": "1d", "mutable_ttl": "5m", "negative_ttl": "1m"},
            "credentials": {"username": "u", "password": "p"}, "connect_timeout": "3s", "read_timeout": "9s"}
    for t in ("generic", "alpine", "rpm", "deb", "helm"):
        assert remote({**full, "type": t}).read_timeout == 9
    assert remote({"type": "maven", "upstream": "https://up.example", "mutable_patterns": ["x"],
                   "cache": {"mutable_ttl": "1m", "immutable_ttl": "1d", "negative_ttl": "1s"}}).cache.mutable_ttl == 60
    assert remote({"type": "oci-local", "immutable_patterns": ["^team/"]}).type == "oci-local"


# -- oci: immutable_patterns is the allow-list, cache.mutable_ttl the tag TTL ----------


def test_oci_tag_ttl_and_mutable_ttl_are_one_setting() -> None:
    up = {"type": "oci", "upstream": "https://up.example"}
    assert options_of(remote(up)).tag_ttl == DEFAULT_TAG_TTL == remote(up).cache.mutable_ttl
    assert options_of(remote({**up, "cache": {"mutable_ttl": "2m"}})).tag_ttl == 120
    assert options_of(remote({**up, "tag_ttl": "90s"})).tag_ttl == 90
    assert options_of(remote({**up, "tag_ttl": "2m", "cache": {"mutable_ttl": 120}})).tag_ttl == 120
    e = fails({"remotes": {"r": {**up, "tag_ttl": "1m", "cache": {"mutable_ttl": "2m"}}}})
    assert e.path == "remotes.r.tag_ttl" and "disagree" in e.problem


def test_oci_immutable_patterns_are_the_allowed_image_names() -> None:
    hub = options_of(remote({"type": "oci", "upstream": "https://up.example", "registries": ["docker.io"],
                             "immutable_patterns": ["^library/nginx"]}))
    # On Docker Hub, "nginx" is library/nginx.
    assert hub.permits("library/nginx") and hub.permits("nginx") and not hub.permits("redis")
    local = options_of(remote({"type": "oci-local", "immutable_patterns": ["^team/"]}))
    assert local.allows("team/app") and not local.allows("other/app")
    e = fails({"remotes": {"r": {"type": "oci", "upstream": "https://up.example", "repositories": ["a"],
                                 "immutable_patterns": ["b"]}}})
    assert e.path == "remotes.r.immutable_patterns" and "give only one" in e.problem


# -- the sparkwing-cache environment ---------------------------------------------------


def test_data_dir_alias_and_precedence() -> None:
    assert load({}, {"DATA_DIR": "/srv/cache"}).storage.data_dir == "/srv/cache"
    both = {"DATA_DIR": "/srv/cache", "SPARKCACHE_DATA_DIR": "/var/lib/sparkcache"}
    assert load({"storage": {"data_dir": "./d"}}, both).storage.data_dir == "/var/lib/sparkcache"


def test_port_listens_on_every_interface_like_sparkwing() -> None:
    assert load({}, {"PORT": "8080"}).server.listen == ("tcp:8080",)
    assert load({}, {"PORT": "8080", "SPARKCACHE_INTERFACE": "10.0.0.5"}).server.listen == ("tcp:8080:interface=10.0.0.5",)
    assert load({}, {"PORT": "8080", "SPARKCACHE_PORT": "9000"}).server.listen == ("tcp:9000:interface=127.0.0.1",)
    assert load({}, {"PORT": "8080", "SPARKCACHE_LISTEN": "tcp:7000"}).server.listen == ("tcp:7000",)
    e = fails({}, {"PORT": "http"})
    assert e.path == "PORT" and "port number" in e.problem


def test_fetch_interval_alias_and_precedence() -> None:
    assert load({}, {"FETCH_INTERVAL": "90"}).git.fetch_interval == 90
    assert load({}, {"FETCH_INTERVAL": "2m"}).git.fetch_interval == 120
    assert load({}, {"FETCH_INTERVAL": "2m", "SPARKCACHE_FETCH_INTERVAL": "45s"}).git.fetch_interval == 45
    e = fails({}, {"FETCH_INTERVAL": "often"})
    assert e.path == "FETCH_INTERVAL" and "duration" in e.problem
    e = fails({}, {"SPARKCACHE_FETCH_INTERVAL": "often", "FETCH_INTERVAL": "1m"})
    assert e.path == "SPARKCACHE_FETCH_INTERVAL"


def test_gitcache_repos_alias_takes_urls_or_pairs() -> None:
    env = {"GITCACHE_REPOS": "https://git.example/org/app.git git@git.example:org/lib.git,docs=https://git.example/d"}
    repos = load({}, env).git.repos
    assert {n: r.url for n, r in repos.items()} == {
        "app": "https://git.example/org/app.git", "lib": "git@git.example:org/lib.git", "docs": "https://git.example/d"}
    assert all(r.source == "env" for r in repos.values())
    both = {"GITCACHE_REPOS": "old=https://git.example/old", "SPARKCACHE_GIT_REPOS": "new=https://git.example/new"}
    assert set(load({}, both).git.repos) == {"new"}
    e = fails({}, {"GITCACHE_REPOS": "https://a.example/x.git https://b.example/x.git"})
    assert e.path == "GITCACHE_REPOS" and "two repositories named 'x'" in e.problem
    assert parse_env_repos("\n a=https://h/a\n") == [("a", "https://h/a")]


def test_sparkwing_api_token_is_a_write_token() -> None:
    tokens = load({}, {"SPARKWING_API_TOKEN": "sw-secret"}).auth.tokens
    assert [(t.name, t.token, t.scopes) for t in tokens] == [("sparkwing_api_token", "sw-secret", {"read", "write"})]
    both = load({}, {"SPARKWING_API_TOKEN": "sw-secret", "SPARKCACHE_WRITE_TOKEN": "sc-secret"}).auth.tokens
    assert [t.token for t in both] == ["sc-secret"]
    assert "sw-secret" not in repr(load({}, {"SPARKWING_API_TOKEN": "sw-secret"}).redacted())
