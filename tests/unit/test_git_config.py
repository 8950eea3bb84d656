import pytest

from sparkcache.config import ConfigError
from sparkcache.protocols import load_config_data
from sparkcache.git.config import GitConfig, check_url, parse_env_repos, url_host


def load(git, env=None):
    return load_config_data({"git": git}, "cache.yaml", env or {}).git


def test_defaults_without_a_git_section():
    cfg = load_config_data({}, "cache.yaml", {}).git
    assert isinstance(cfg, GitConfig)
    assert cfg.fetch_interval == 30 and cfg.fetch_concurrency == 4 and cfg.repos == {}
    assert cfg.max_upload_pack_body == 64 * 2**20 and cfg.pack_cache is True
    assert cfg.maintenance_interval == 6 * 3600


def test_repos_from_config_and_env():
    cfg = load(
        {"repos": {"app": "https://github.com/org/app.git",
                   "gitops": {"url": "git@github.com:org/gitops.git", "credentials": {"ssh_key": "/etc/key"}}},
         "fetch_interval": "2m", "jitter": "1s", "max_upload_pack_body": "1MiB", "pack_cache": False},
        {"GITCACHE_REPOS": "tools=https://git.example/tools, docs=ssh://git@git.example/docs.git"},
    )
    assert set(cfg.repos) == {"app", "gitops", "tools", "docs"}
    assert cfg.repos["gitops"].credentials.ssh_key == "/etc/key"
    assert cfg.repos["tools"].source == "env" and cfg.repos["app"].source == "config"
    assert cfg.fetch_interval == 120 and cfg.jitter == 1 and cfg.max_upload_pack_body == 2**20
    assert cfg.pack_cache is False


def test_fetch_interval_env_overrides_config():
    assert load({"fetch_interval": "5m"}, {"FETCH_INTERVAL": "45"}).fetch_interval == 45
    assert load({}, {"FETCH_INTERVAL": "1m"}).fetch_interval == 60


def test_credentials_by_repo_then_name_then_host():
    env = {"GH": "ghp_secret", "OTHER": "other-secret"}
    cfg = load({
        "repos": {"a": "https://github.com/o/a", "b": {"url": "https://github.com/o/b", "credentials": {"token": "inline"}},
                  "c": "https://git.example:8443/o/c"},
        "credentials": {"github.com": {"username": "bot", "token_env": "GH"}, "c": {"token_env": "OTHER"}},
    }, env)
    assert cfg.credentials_for("a", "https://github.com/o/a").token == "ghp_secret"
    assert cfg.credentials_for("a", "https://github.com/o/a").username == "bot"
    assert cfg.credentials_for("b", "https://github.com/o/b").token == "inline"
    assert cfg.credentials_for("c", "https://git.example:8443/o/c").token == "other-secret"
    assert cfg.credentials_for("x", "https://GitHub.com/o/x").token == "ghp_secret"
    assert cfg.credentials_for("y", "https://gitlab.example/o/y") is None


def test_secrets_never_in_redacted_config_nor_repr():
    env = {"GH": "ghp_topsecret"}
    full = load_config_data({"git": {"credentials": {"github.com": {"token_env": "GH"}},
                                     "repos": {"k": {"url": "ssh://git@h/k", "credentials": {
                                         "ssh_key": "/k", "ssh_key_passphrase": "pass-secret"}}}}}, "c", env)
    text = repr(full.redacted()) + repr(full.git)
    assert "ghp_topsecret" not in text and "pass-secret" not in text
    assert full.redacted()["git"]["credentials"]["github.com"]["token"] == "***"


def test_allowed_hosts():
    cfg = load({"allowed_hosts": ["GitHub.com", "http://127.0.0.1:8080"]})
    assert cfg.allowed_host("github.com").scheme == "https"
    assert cfg.allowed_host("127.0.0.1:8080").scheme == "http"
    assert cfg.allowed_host("127.0.0.1") is None


@pytest.mark.parametrize(
    "git, env, path, problem",
    [
        ({"bogus": 1}, {}, "git.bogus", "unknown key"),
        ({"repos": {"a/b": "https://x/a"}}, {}, "git.repos.a/b", "letters, digits"),
        ({"repos": {"..": "https://x/a"}}, {}, "git.repos...", "letters, digits"),
        ({"repos": {"a": "ftp://x/a"}}, {}, "git.repos.a", "unsupported scheme"),
        ({"repos": {"a": "https://user:pw@x/a"}}, {}, "git.repos.a", "credentials"),
        ({"repos": {"a": "https://x/../a"}}, {}, "git.repos.a", ".."),
        ({"repos": {"a": "not a url"}}, {}, "git.repos.a", "without spaces"),
        ({"repos": {"a": {"url": "https://x/a", "branch": "main"}}}, {}, "git.repos.a.branch", "unknown key"),
        ({"repos": {"a": {}}}, {}, "git.repos.a.url", "missing"),
        ({"repos": {"a": {"url": "https://x/a", "credentials": {"token_env": "NOPE"}}}}, {},
         "git.repos.a.credentials.token_env", "NOPE is not set"),
        ({"repos": {"a": {"url": "https://x/a", "credentials": {"username": "u"}}}}, {},
         "git.repos.a.credentials", "token"),
        ({"credentials": {"h": {"token": "t", "ssh_key": "/k"}}}, {}, "git.credentials.h.ssh_key", "not both"),
        ({"credentials": {"h": {"ssh_key": "relative/key"}}}, {}, "git.credentials.h.ssh_key", "absolute"),
        ({"credentials": {"h": {"token": "t", "scope": "x"}}}, {}, "git.credentials.h.scope", "unknown key"),
        ({"allowed_hosts": ["github.com/org"]}, {}, "git.allowed_hosts[0]", "host name"),
        ({"allowed_hosts": ["ftp://h"]}, {}, "git.allowed_hosts[0]", "host name"),
        ({"fetch_interval": "soon"}, {}, "git.fetch_interval", "duration"),
        ({"fetch_interval": 0}, {}, "git.fetch_interval", "at least"),
        ({"fetch_concurrency": 0}, {}, "git.fetch_concurrency", "at least"),
        ({"jitter": "1m"}, {}, "git.jitter", "shorter"),
        ({"max_upload_pack_body": "big"}, {}, "git.max_upload_pack_body", "size"),
        ({"pack_cache": "yes"}, {}, "git.pack_cache", "boolean"),
        ({"repos": ["a"]}, {}, "git.repos", "mapping"),
        ({}, {"FETCH_INTERVAL": "often"}, "FETCH_INTERVAL", "duration"),
        ({}, {"GITCACHE_REPOS": "app"}, "GITCACHE_REPOS", "name=url"),
        ({}, {"GITCACHE_REPOS": "a=gopher://h/x"}, "GITCACHE_REPOS", "scheme"),
        ({"repos": {"a": "https://x/a"}}, {"GITCACHE_REPOS": "a=https://y/a"}, "GITCACHE_REPOS", "another URL"),
    ],
)
def test_errors_name_the_key(git, env, path, problem):
    with pytest.raises(ConfigError) as e:
        load(git, env)
    assert e.value.path == path
    assert problem in e.value.problem


def test_url_helpers():
    assert url_host("git@GitHub.com:org/r.git") == "github.com"
    assert url_host("https://h.example:8443/x") == "h.example:8443"
    assert check_url("file:///srv/r.git", allow_file=True)
    with pytest.raises(ValueError):
        check_url("file:///srv/r.git")
    with pytest.raises(ValueError):
        check_url("https://h/r?x=1")
    assert parse_env_repos(" a=https://h/a ,, b=git@h:o/b.git") == [("a", "https://h/a"), ("b", "git@h:o/b.git")]
