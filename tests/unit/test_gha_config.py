"""gha remote options, the one-default rule, and KeyedBlobs.put_spool (the
_keyed extension gha commits assembled uploads with)."""

from __future__ import annotations

import pytest
import pytest_twisted

from sparkcache.config import ConfigError
from sparkcache.protocols import load_config_data
from sparkcache.protocols._keyed import KeyedBlobs
from sparkcache.protocols.gha import GhaOptions
from sparkcache.web.errors import JSON, HTTPError
from tests.support.harness import MakeHarness, harness_factory  # noqa: F401


def load(remotes: dict, environ: dict | None = None) -> dict:
    cfg = load_config_data({"storage": {"data_dir": "/tmp/unused"}, "remotes": remotes}, "t.yaml", environ or {})
    return dict(cfg.remotes)


def test_options_and_their_defaults() -> None:
    opts = load({"a": {"type": "gha"}})["a"].options
    assert isinstance(opts, GhaOptions)
    assert (opts.scope, opts.restore_scopes, opts.default, opts.signing_secret) == ("refs/heads/main", (), False, None)
    assert (opts.url_ttl, opts.upload_ttl, opts.token_ttl) == (3600.0, 21600.0, 21600.0)
    opts = load({"a": {"type": "gha", "scope": "refs/heads/dev", "restore_scopes": ["refs/heads/main"],
                       "signing_secret_env": "S", "url_ttl": "5m", "max_entry_size": "1MiB", "default": True}},
                {"S": "s3cret"})["a"].options
    assert opts.signing_secret == "s3cret" and opts.url_ttl == 300 and opts.keyed.max_entry_size == 1 << 20
    assert opts.restore_scopes == ("refs/heads/main",) and opts.default
    assert "s3cret" not in repr(opts.redacted())


@pytest.mark.parametrize("remotes, problem", [
    ({"a": {"type": "gha", "default": True}, "b": {"type": "gha", "default": True}}, "only one gha remote"),
    ({"a": {"type": "gha", "scope": ""}}, "non-empty"),
    ({"a": {"type": "gha", "bogus": 1}}, "unknown key"),
    ({"a": {"type": "gha", "default": "yes"}}, "boolean"),
])
def test_bad_options_are_config_errors(remotes: dict, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load(remotes)


@pytest_twisted.ensureDeferred
async def test_put_spool_commits_an_assembled_body_and_holds_the_limit(harness_factory: MakeHarness) -> None:
    h = await harness_factory({"remotes": {"g": {"type": "gha", "max_entry_size": 10}}})
    blobs = KeyedBlobs(h.ctx, h.config.remotes["g"], JSON)
    spool = h.store.new_spool("t-")
    spool.write(b"assembled")
    stored = await blobs.put_spool(spool, "name", {"Content-Type": "application/x-t"})
    assert stored.created and stored.entry.size == 9 and stored.entry.headers["content-type"] == "application/x-t"
    assert (await blobs.get("name")) is not None
    big = h.store.new_spool("t-")
    big.write(b"x" * 11)
    with pytest.raises(HTTPError) as e:
        await blobs.put_spool(big, "big")
    assert e.value.status == 413 and await blobs.get("big") is None and not h.store._spools
