"""storage.backend / storage.s3 / storage.tier: validation (file, key path,
problem), credentials from the environment or a named file (never the
config), and /config's redacted view without them."""

from __future__ import annotations

import json
import os

import pytest

from sparkcache.config import ConfigError
from sparkcache.protocols import load_config_data

ENV = {"AWS_ACCESS_KEY_ID": "AKIDENVTEST", "AWS_SECRET_ACCESS_KEY": "env-secret-91c"}


def load(storage, env=ENV, server=None):
    data = {"storage": storage}
    if server:
        data["server"] = server
    return load_config_data(data, "cache.yaml", env)


def s3(**kw):
    return {"backend": "s3", "s3": {"endpoint": "http://127.0.0.1:8333", "bucket": "cache-bucket", **kw}}


def test_defaults_local_and_s3():
    cfg = load({})
    assert cfg.storage.backend == "local" and cfg.storage.s3 is None
    cfg = load({**s3(prefix="ci"), "tier": {"max_size": "2GiB"}})
    st = cfg.storage
    assert st.backend == "s3" and st.tier_max_size == 2 * 2**30
    assert st.s3.prefix == "ci/" and st.s3.addressing == "path" and st.s3.region == "us-east-1"
    assert st.s3.credentials.access_key == "AKIDENVTEST" and st.s3.credentials.token is None


@pytest.mark.parametrize("storage, path, problem", [
    ({"backend": "nfs"}, "storage.backend", "expected local or s3"),
    ({"s3": {"bucket": "b"}}, "storage.s3", "only used with storage.backend: s3"),
    ({"backend": "s3", "s3": {"bucket": "cache-bucket"}}, "storage.s3.endpoint", "required"),
    (s3(endpoint="ftp://x"), "storage.s3.endpoint", "http(s)://host"),
    (s3(endpoint="http://x/path"), "storage.s3.endpoint", "no path"),
    (s3(bucket="Bad_Bucket"), "storage.s3.bucket", "not a valid bucket name"),
    (s3(addressing="sideways"), "storage.s3.addressing", "path or virtual"),
    (s3(prefix="/abs"), "storage.s3.prefix", "not starting with /"),
    (s3(prefix="a b"), "storage.s3.prefix", "letters, digits"),
    (s3(secret_key="x"), "storage.s3.secret_key", "never go in the configuration"),
    (s3(part_size="1MiB"), "storage.s3.part_size", "at least 5 MiB"),
    (s3(stream_uploads="sometimes"), "storage.s3.stream_uploads", "true, false or known"),
    (s3(bogus=1), "storage.s3.bogus", "unknown key"),
    ({**s3(), "tier": {"max_size": "lots"}}, "storage.tier.max_size", ""),
    ({**s3(), "tier": {"size": 1}}, "storage.tier.size", "unknown key"),
])
def test_errors_name_the_key(storage, path, problem):
    with pytest.raises(ConfigError) as e:
        load(storage)
    assert e.value.source == "cache.yaml" and e.value.path == path and problem in e.value.problem


def test_credentials_required_from_the_environment_or_a_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(s3(), env={})
    assert e.value.path == "storage.s3" and "AWS_ACCESS_KEY_ID" in e.value.problem
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKIDFILE\naws_secret_access_key = file-secret-77\n"
                     "aws_session_token = tok-5\n")
    cfg = load(s3(credentials_file=str(creds)), env={})
    c = cfg.storage.s3.credentials
    assert (c.access_key, c.secret_key, c.token, c.source) == ("AKIDFILE", "file-secret-77", "tok-5", str(creds))
    with pytest.raises(ConfigError) as e:
        load(s3(credentials_file=str(tmp_path / "missing")), env={})
    assert e.value.path == "storage.s3.credentials_file" and "cannot read" in e.value.problem
    creds.write_text("[other]\nx = 1\n[more]\ny = 2\n")
    with pytest.raises(ConfigError) as e:
        load(s3(credentials_file=str(creds)), env={})
    assert "no [default] profile" in e.value.problem


def test_redacted_config_names_no_secret(tmp_path):
    cfg = load({**s3(), "tier": {"max_size": "1GiB"}}, env={**ENV, "AWS_SESSION_TOKEN": "sess-tok-44"})
    text = json.dumps(cfg.redacted()) + repr(cfg)
    for secret in ("env-secret-91c", "sess-tok-44", "AKIDENVTEST"):
        assert secret not in text
    shown = cfg.redacted()["storage"]
    assert shown["backend"] == "s3" and shown["s3"]["bucket"] == "cache-bucket" and shown["s3"]["credentials"] == "***"
    assert shown["tier"] == {"max_size": 2**30}


def test_s3_runs_with_worker_processes():
    # One tier LRU per host (store/s3/tier.py): an explicit count is kept, and so is auto's.
    cfg = load(s3(), env=ENV, server={"workers": 2})
    assert cfg.storage.backend == "s3" and cfg.server.workers == 2
    auto = load(s3(), env=ENV, server={"workers": "auto"})
    assert auto.server.workers == max(1, len(os.sched_getaffinity(0)))


def test_peer_streaming_keys(tmp_path):
    cfg = load(s3(peer_url="http://10.0.0.5:8080/"))
    st = cfg.storage.s3
    assert st.peer_url == "http://10.0.0.5:8080" and len(st.peer_key) == 32
    # Derived from what every host on the bucket shares: the same on each, another with another secret or prefix.
    assert load(s3()).storage.s3.peer_key == st.peer_key
    assert load(s3(), env={**ENV, "AWS_SECRET_ACCESS_KEY": "other"}).storage.s3.peer_key != st.peer_key
    assert load(s3(prefix="other")).storage.s3.peer_key != st.peer_key
    secret = tmp_path / "peer-secret"
    secret.write_text("a secret of the fleet's own, 32+ chars\n")
    assert load(s3(peer_secret_file=str(secret))).storage.s3.peer_key == b"a secret of the fleet's own, 32+ chars"
    cfg = load(s3(peer_secret_env="PEER_SECRET"), env={**ENV, "PEER_SECRET": "from-the-environment-123"})
    assert cfg.storage.s3.peer_key == b"from-the-environment-123"
    text = json.dumps(cfg.redacted()) + repr(cfg)
    assert "from-the-environment-123" not in text and "peer_key" not in text
    assert cfg.redacted()["storage"]["s3"]["peer_secret_env"] == "PEER_SECRET"


@pytest.mark.parametrize("keys, path, problem", [
    ({"peer_url": "10.0.0.5:8080"}, "storage.s3.peer_url", "http(s)://host[:port]"),
    ({"peer_url": "http://h:1/sub"}, "storage.s3.peer_url", "http(s)://host[:port]"),
    ({"peer_secret": "inline"}, "storage.s3.peer_secret", "never go in the configuration"),
    ({"peer_secret_env": "NOPE"}, "storage.s3.peer_secret_env", "not set"),
    ({"peer_secret_env": "SHORT"}, "storage.s3.peer_secret_env", "too short"),
    ({"peer_secret_file": "/nonexistent/peer"}, "storage.s3.peer_secret_file", "cannot read"),
    ({"peer_secret_file": "/x", "peer_secret_env": "SHORT"}, "storage.s3.peer_secret_file", "not both"),
])
def test_peer_key_errors(keys, path, problem):
    with pytest.raises(ConfigError) as e:
        load(s3(**keys), env={**ENV, "SHORT": "abc"})
    assert e.value.path == path and problem in e.value.problem, e.value
