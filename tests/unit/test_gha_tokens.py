"""Runtime tokens minted by the daemon (``POST /setup/gha-token``): JWTs
BuildKit can decode, whose ``ac`` scopes decide where a runner writes and
reads; tampered or expired ones are refused. And ``/setup/gha``."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import pytest_twisted

from tests.support.gha_calls import restore_v2, save_v2, twirp
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401

WRITER, READER = "w-token", "r-token"
V = "version"
CONFIG = {
    "auth": {"anonymous_read": False, "tokens": [{"name": "w", "token": WRITER, "scopes": ["write"]},
                                                  {"name": "r", "token": READER, "scopes": ["read"]}]},
    "remotes": {"ci": {"type": "gha", "token_ttl": "2h"}},
}


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


async def mint(h: Harness, query: str, token: str = WRITER) -> Any:
    resp = await h.post(f"/setup/gha-token?{query}", b"", {"Authorization": f"Bearer {token}"})
    return resp.json() if resp.status == 200 else resp.status


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@pytest_twisted.ensureDeferred
async def test_minted_tokens_carry_the_claims_buildkit_decodes(h: Harness) -> None:
    got = await mint(h, "scope=refs/heads/feature&restore=refs/heads/main&ttl=1h")
    c = claims(got["token"])
    assert json.loads(c["ac"]) == [{"Scope": "refs/heads/feature", "Permission": 3},
                                   {"Scope": "refs/heads/main", "Permission": 1}]
    now = int(h.clock.seconds())
    assert c["exp"] == now + 3600 and c["nbf"] <= now and got["expires_at"] == c["exp"]
    # At most the remote's token_ttl.
    assert claims((await mint(h, "ttl=30d"))["token"])["exp"] == now + 7200
    # Only a write (or admin) token mints; a minted token does not.
    assert await mint(h, "", READER) == 403
    assert await mint(h, "", got["token"]) == 401
    assert (await h.get("/setup/gha-token", {"Authorization": f"Bearer {WRITER}"})).status == 405


@pytest_twisted.ensureDeferred
async def test_a_minted_token_writes_to_its_scope_and_reads_its_restore_scopes(h: Harness) -> None:
    main = (await mint(h, "scope=refs/heads/main"))["token"]
    feature = (await mint(h, "scope=refs/heads/feature&restore=refs/heads/main"))["token"]
    other = (await mint(h, "scope=refs/heads/other"))["token"]
    await save_v2(h, "deps-1", V, b"from main", main)
    await save_v2(h, "deps-2", V, b"from feature", feature, "protobuf")
    assert await restore_v2(h, "deps-1", V, feature) == ("deps-1", b"from main")
    assert await restore_v2(h, "x", V, feature, ["deps-"]) == ("deps-2", b"from feature")
    assert await restore_v2(h, "deps-2", V, main) == (None, None)
    assert await restore_v2(h, "x", V, other, ["deps-"]) == (None, None)
    # The configured writer uses the remote's scope (refs/heads/main by default).
    assert await restore_v2(h, "deps-1", V, WRITER) == ("deps-1", b"from main")
    read_only = (await mint(h, "scope=refs/heads/main&read_only=1"))["token"]
    status, err = await twirp(h, "CreateCacheEntry", {"key": "k", "version": V}, read_only)
    assert status == 403 and err["code"] == "permission_denied"
    assert await restore_v2(h, "deps-1", V, read_only) == ("deps-1", b"from main")


@pytest_twisted.ensureDeferred
async def test_tampered_and_expired_tokens_are_refused(h: Harness) -> None:
    token = (await mint(h, "scope=refs/heads/main&ttl=10m"))["token"]
    head, payload, sig = token.split(".")
    c = claims(token)
    c["ac"] = json.dumps([{"Scope": "refs/heads/secret", "Permission": 3}])
    forged_payload = base64.urlsafe_b64encode(json.dumps(c).encode()).rstrip(b"=").decode()
    for bad in (f"{head}.{forged_payload}.{sig}", f"{head}.{payload}.{sig[:-2]}AA", f"{head}.{payload}."):
        status, err = await twirp(h, "GetCacheEntryDownloadURL", {"key": "k", "version": V}, bad)
        assert status == 401, (bad, err)
    status, _ = await twirp(h, "GetCacheEntryDownloadURL", {"key": "k", "version": V}, token)
    assert status == 200
    h.clock.advance(601)
    status, err = await twirp(h, "GetCacheEntryDownloadURL", {"key": "k", "version": V}, token)
    assert status == 401 and "expired" in err["msg"]


@pytest_twisted.ensureDeferred
async def test_the_secret_survives_a_restart_and_a_purge(tmp_path: Any) -> None:
    first = await Harness(tmp_path / "data", CONFIG).start()
    try:
        token = (await mint(first, ""))["token"]
        await save_v2(first, "k", V, b"kept", token)
        await first.store.purge_all()  # the secret is pinned: not purged as cache
        assert await first.store.index.get("_gha:signing-secret") is not None
    finally:
        await first.stop()
    second = await Harness(tmp_path / "data", CONFIG).start()
    try:
        status, got = await twirp(second, "GetCacheEntryDownloadURL", {"key": "k", "version": V}, token)
        assert status == 200 and not got.get("ok")  # the token verifies; the entry was purged
    finally:
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_setup_gha_prints_the_runner_environment(h: Harness) -> None:
    resp = await h.get("/setup/gha", {"Authorization": f"Bearer {READER}"})
    assert resp.status == 200, resp.describe()
    text = resp.body.decode()
    for line in ("ACTIONS_CACHE_SERVICE_V2=true", "ACTIONS_RESULTS_URL=http://cache.test/gha/ci/",
                 "ACTIONS_CACHE_URL=http://cache.test/gha/ci/", "ACTIONS_RUNTIME_TOKEN="):
        assert line in text
    assert "/setup/gha-token" in text
    assert (await h.get("/setup/gha?remote=nope", {"Authorization": f"Bearer {READER}"})).status == 404
