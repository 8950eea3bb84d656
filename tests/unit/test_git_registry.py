import json
import os

import pytest

from sparkcache.protocols import load_config_data
from sparkcache.git.interfaces import UnknownRepo
from sparkcache.git.registry import RegistrationError, Registry, name_from_url, url_key


def make(tmp_path, git=None, env=None):
    cfg = load_config_data({"git": git or {}}, "cache.yaml", env or {}).git
    return Registry(cfg, str(tmp_path / "git"))


def test_config_and_env_repos_by_name_and_url(tmp_path):
    reg = make(tmp_path, {"repos": {"app": "https://github.com/org/app.git"}},
               {"GITCACHE_REPOS": "gitops=git@github.com:org/gitops.git"})
    assert reg.resolve("app")[0].url == "https://github.com/org/app.git"
    assert reg.resolve("gitops")[0].source == "env"
    # a URL that names a registered repo, however it is spelled
    for spelling in ("https://github.com/org/app", "https://GitHub.com/org/app.git/", "git@github.com:org/app.git"):
        assert reg.resolve(spelling) == (reg.get("app"), False)
    assert reg.resolve("ssh://git@github.com/org/gitops")[0].name == "gitops"
    with pytest.raises(UnknownRepo):
        reg.resolve("nope")
    with pytest.raises(UnknownRepo):
        reg.resolve("https://github.com/org/other")


def test_allowed_host_registers_on_first_use(tmp_path):
    reg = make(tmp_path, {"allowed_hosts": ["github.com", "http://127.0.0.1:9999"]})
    r, created = reg.resolve("github.com/org/repo.git")
    assert created and r.name == "github.com/org/repo" and r.url == "https://github.com/org/repo.git"
    assert reg.resolve("github.com/org/repo") == (r, False)
    assert reg.resolve("https://github.com/org/repo")[0] is r
    r2, created = reg.resolve("127.0.0.1:9999/team/sub/proj")
    assert created and r2.url == "http://127.0.0.1:9999/team/sub/proj.git"
    # scheme of the allow-list entry wins over what the client wrote
    r3, _ = reg.resolve("http://github.com/org/third")
    assert r3.url == "https://github.com/org/third.git"
    with pytest.raises(UnknownRepo):
        reg.resolve("gitlab.com/org/repo")


@pytest.mark.parametrize("bad", [
    "github.com/org/../etc", "github.com/..", "github.com//repo", "github.com/org/re po",
    "github.com/org/.hidden", "github.com/", "github.com/org/r%2e%2e", "github.com/org/r;rm",
    "github.com/" + "/".join(["a"] * 9), "",
])
def test_allowed_host_rejects_odd_paths(tmp_path, bad):
    reg = make(tmp_path, {"allowed_hosts": ["github.com"]})
    with pytest.raises(UnknownRepo):
        reg.resolve(bad)
    assert reg.all() == []


def test_mirror_paths_stay_under_the_mirrors_dir(tmp_path):
    reg = make(tmp_path, {"allowed_hosts": ["github.com"], "repos": {"..a": "https://h/x", "b": "https://h/b"}})
    base = os.path.realpath(tmp_path / "git" / "mirrors")
    paths = set()
    for name in ("..a", "b", "github.com/org/repo", "github.com/org/Repo"):
        m = reg.mirror(reg.resolve(name)[0])
        assert os.path.dirname(os.path.realpath(m.path)) == base and m.path.endswith(".git")
        paths.add(m.path)
    assert len(paths) == 4


def test_runtime_registrations_persist_without_credentials(tmp_path):
    reg = make(tmp_path, {"allowed_hosts": ["github.com"], "credentials": {"github.com": {"token": "s3cret-token"}},
                          "repos": {"cfg": "https://h/cfg"}})
    r, created = reg.register("tool", "https://git.example/org/tool.git")
    assert created and reg.dirty()
    assert reg.register("tool", "https://git.example/org/tool") == (r, False)
    reg.resolve("github.com/org/app")
    reg.save(reg.snapshot())
    assert not reg.dirty()
    text = (tmp_path / "git" / "registry.json").read_text()
    assert "s3cret-token" not in text and "cfg" not in json.loads(text)["repos"].__repr__()
    assert os.listdir(tmp_path / "git") == ["registry.json"]  # no temp file left behind
    again = make(tmp_path, {"allowed_hosts": ["github.com"]})
    assert again.load() == []
    assert again.get("tool").url == "https://git.example/org/tool.git"
    assert again.get("github.com/org/app").source == "host"
    assert again.mirror(again.get("tool")) == reg.mirror(r)


def test_older_snapshot_never_overwrites_a_newer_one(tmp_path):
    reg = make(tmp_path)
    reg.register("a", "https://h/a")
    old = reg.snapshot()
    reg.register("b", "https://h/b")
    reg.save(reg.snapshot())
    reg.save(old)
    names = [e["name"] for e in json.loads((tmp_path / "git" / "registry.json").read_text())["repos"]]
    assert names == ["a", "b"]


def test_corrupt_registry_file_is_reported_not_fatal(tmp_path):
    (tmp_path / "git").mkdir()
    (tmp_path / "git" / "registry.json").write_text(json.dumps(
        {"repos": [{"name": "ok", "url": "https://h/ok"}, {"name": "../x", "url": "https://h/x"},
                   {"name": "f", "url": "file:///etc"}, "junk"]}))
    reg = make(tmp_path)
    problems = reg.load()
    assert len(problems) == 3 and [r.name for r in reg.all()] == ["ok"]
    (tmp_path / "git" / "registry.json").write_text("{not json")
    assert "unreadable" in make(tmp_path).load()[0]


def test_register_refusals(tmp_path):
    reg = make(tmp_path, {"repos": {"app": "https://h/app"}})
    with pytest.raises(RegistrationError, match="another URL"):
        reg.register("app", "https://h/other")
    with pytest.raises(RegistrationError, match="already registered as app"):
        reg.register("app2", "https://h/app.git")
    with pytest.raises(RegistrationError, match="file://"):
        reg.register("local", "file:///srv/repo.git")
    with pytest.raises(RegistrationError, match="letters"):
        reg.register("a b", "https://h/x")
    with pytest.raises(RegistrationError):
        reg.register("x", "https://user:pw@h/x")
    # a name derived from the URL
    r, _ = reg.register(None, "git@git.example:team/tool.git")
    assert r.name == "git.example/team/tool"


def test_url_key_and_names():
    assert url_key("https://GitHub.com/Org/App.git/") == url_key("git@github.com:Org/App") == "github.com/Org/App"
    assert url_key("http://127.0.0.1:8080/r.git") == "127.0.0.1:8080/r"
    assert name_from_url("http://127.0.0.1:8080/a/b.git") == "127.0.0.1:8080/a/b"
    with pytest.raises(RegistrationError):
        name_from_url("https://h/")
