"""The Turborepo remote cache API (``type: turborepo``) on the in-memory
daemon: team namespaces, artifact tags and durations kept byte for byte,
immutability, tokens on every request, 413 before the body, a failing or
full store answered as a miss / a clean 507, the batch query, events, the
preflight and /setup/turborepo."""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest
import pytest_twisted

from tests.support.client import Response
from tests.support.harness import Harness, MakeHarness, harness_factory  # noqa: F401

WRITER, READER, OTHER = "turbo-w-1", "turbo-r-2", "turbo-w-3"
CONFIG = {
    "auth": {"anonymous_read": True, "tokens": [
        {"name": "ci", "token": WRITER, "scopes": ["write"]},
        {"name": "dev", "token": READER, "scopes": ["read"]},
        {"name": "other", "token": OTHER, "scopes": ["write"]},
    ]},
    "remotes": {"turbo": {"type": "turborepo", "max_entry_size": 1000}, "big": {"type": "turborepo"}},
}
W = {"Authorization": f"Bearer {WRITER}"}
R = {"Authorization": f"Bearer {READER}"}
API = "/turborepo/turbo/v8/artifacts"
TAG = "FQ0rfbaj90D0I0peaJkGA9PQON5uWXLiRJabL5GckN4="


@pytest.fixture
def h(harness_factory: MakeHarness) -> Harness:
    return pytest_twisted.blockon(harness_factory(CONFIG))


def vercel_error(resp: Response, status: int) -> str:
    """The message of an error in Vercel's form, ``{"error": {"code", "message"}}``."""
    assert resp.status == status, resp.describe()
    assert (resp.header("Content-Type") or "").startswith("application/json"), resp.describe()
    if not resp.body:  # HEAD
        return ""
    doc = resp.json()
    assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message"}, resp.describe()
    return str(doc["error"]["message"])


def count(h: Harness, form: str, result: str, remote: str = "turbo") -> float:
    want = f'sparkcache_registry_requests_total{{form="{form}",remote="{remote}",result="{result}"}} '
    for line in h.metrics.render().decode().splitlines():
        if line.startswith(want):
            return float(line.split()[-1])
    return 0.0


async def upload(h: Harness, hash_: str, body: bytes, team: str = "teamId=team_a",
                 headers: dict[str, str] | None = None, duration: str = "1234", tag: str | None = TAG) -> Response:
    hdrs = {**W, "x-artifact-duration": duration, "Content-Type": "application/octet-stream", **(headers or {})}
    if tag is not None:
        hdrs["x-artifact-tag"] = tag
    return await h.put(f"{API}/{hash_}?{team}", body, hdrs)


@pytest_twisted.ensureDeferred
async def test_every_request_needs_a_token_and_status_says_enabled(h: Harness) -> None:
    # anonymous_read is on for the daemon, yet turbo's API has no anonymous side.
    vercel_error(await h.get(f"{API}/status"), 401)
    vercel_error(await h.get(f"{API}/status", {"Authorization": "Bearer nope"}), 401)
    vercel_error(await h.get(f"{API}/abc123?teamId=team_a"), 401)
    vercel_error(await h.post(f"{API}/events", b"[]"), 401)
    got = await h.get(f"{API}/status?teamId=team_a", R)
    assert got.status == 200 and got.json() == {"status": "enabled"}
    # A read token cannot upload; the refusal comes before the body.
    assert "write" in vercel_error(await h.put(f"{API}/abc123?teamId=team_a", b"x", R), 403)
    assert (await h.get(f"{API}/abc123?teamId=team_a", R)).status == 404


@pytest_twisted.ensureDeferred
async def test_tags_and_durations_round_trip_exactly(h: Harness) -> None:
    body = b"\x28\xb5\x2f\xfd" + bytes(range(200))  # a zstd magic, then anything
    put = await upload(h, "463a541ebdd6186e", body)
    assert put.status == 202 and put.json()["urls"][0].endswith(f"{API}/463a541ebdd6186e"), put.describe()
    got = await h.get(f"{API}/463a541ebdd6186e?teamId=team_a", R)
    assert got.status == 200 and got.body == body
    assert got.header("x-artifact-tag") == TAG and got.header("x-artifact-duration") == "1234"
    assert got.header("Content-Type") == "application/octet-stream"
    head = await h.head(f"{API}/463a541ebdd6186e?teamId=team_a", R)
    assert head.status == 200 and head.body == b"" and head.header("x-artifact-duration") == "1234"
    assert head.header("x-artifact-tag") == TAG and head.header("Content-Length") == str(len(body))
    # Unsigned artifacts have no tag; nothing is invented.
    assert (await upload(h, "unsigned01", b"plain", tag=None)).status == 202
    plain = await h.get(f"{API}/unsigned01?teamId=team_a", R)
    assert plain.body == b"plain" and plain.header("x-artifact-tag") is None
    assert count(h, "entry", "hit") == 3 and count(h, "upload", "stored") == 2


@pytest_twisted.ensureDeferred
async def test_teams_never_see_each_others_artifacts(h: Harness) -> None:
    assert (await upload(h, "h1", b"team a's", "teamId=team_a")).status == 202
    assert (await h.get(f"{API}/h1?teamId=team_b", R)).status == 404
    assert (await h.head(f"{API}/h1?slug=b", R)).status == 404
    # teamId and slug name the same namespace (--team=x and TURBO_TEAMID=x share it).
    assert (await h.get(f"{API}/h1?slug=team_a", R)).body == b"team a's"
    # The same hash in another team is another artifact.
    assert (await upload(h, "h1", b"team b's", "slug=team_b")).status == 202
    assert (await h.get(f"{API}/h1?teamId=team_b", R)).body == b"team b's"
    assert (await h.get(f"{API}/h1?teamId=team_a", R)).body == b"team a's"
    # No team: the token's own namespace.
    assert (await upload(h, "h2", b"mine", "")).status == 202
    assert (await h.get(f"{API}/h2", W)).body == b"mine"
    assert (await h.get(f"{API}/h2", {"Authorization": f"Bearer {OTHER}"})).status == 404
    assert (await h.get(f"{API}/h2?teamId=team_a", W)).status == 404
    # Another remote is another cache.
    assert (await h.get("/turborepo/big/v8/artifacts/h1?teamId=team_a", R)).status == 404


@pytest_twisted.ensureDeferred
async def test_an_artifact_is_immutable(h: Harness) -> None:
    assert (await upload(h, "h3", b"first", tag="tag-one")).status == 202
    again = await upload(h, "h3", b"second", tag="tag-two", duration="9")
    assert again.status == 202
    got = await h.get(f"{API}/h3?teamId=team_a", R)
    assert (got.body, got.header("x-artifact-tag"), got.header("x-artifact-duration")) == (b"first", "tag-one", "1234")
    assert count(h, "upload", "exists") == 1


@pytest_twisted.ensureDeferred
async def test_bad_input_is_a_clear_400_and_nothing_is_kept(h: Harness) -> None:
    assert "hash" in vercel_error(await upload(h, "a%20b", b"x"), 400)
    assert "teamId" in vercel_error(await upload(h, "h4", b"x", "teamId=a/b"), 400)
    assert "duration" in vercel_error(await upload(h, "h4", b"x", duration="12ms"), 400)
    assert "tag" in vercel_error(await upload(h, "h4", b"x", tag="x" * 600), 400)
    assert (await h.get(f"{API}/h4?teamId=team_a", R)).status == 404
    vercel_error(await h.request("DELETE", f"{API}/h4?teamId=team_a", None, W), 405)
    vercel_error(await h.get("/turborepo/nope/v8/artifacts/status", R), 404)
    vercel_error(await h.get("/turborepo/turbo/v2/whatever", R), 404)
    vercel_error(await h.put(f"{API}/status", b"x", W), 405)


@pytest_twisted.ensureDeferred
async def test_too_large_is_refused_before_the_body(h: Harness) -> None:
    resp = await upload(h, "big1", b"x" * 1001)
    assert "at most 1000 bytes" in vercel_error(resp, 413)
    assert (await h.get(f"{API}/big1?teamId=team_a", R)).status == 404
    assert count(h, "upload", "rejected") == 1
    assert (await upload(h, "big1", b"x" * 1000)).status == 202


@pytest_twisted.ensureDeferred
async def test_a_failing_store_is_a_miss_and_a_full_one_a_clean_507(h: Harness,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert (await upload(h, "h5", b"kept")).status == 202

    def broken_index(key: str) -> Any:
        raise OSError("disk I/O error")

    async def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h.store.index, "get", broken_index)
    assert (await h.get(f"{API}/h5?teamId=team_a", R)).status == 404
    query = await h.post(f"{API}?teamId=team_a", json.dumps({"hashes": ["h5"]}).encode(), R)
    assert query.status == 200 and "error" in query.json()["h5"]
    monkeypatch.undo()
    monkeypatch.setattr(h.cache, "adopt", full)
    assert "No space left" in vercel_error(await upload(h, "h6", b"new"), 507)
    monkeypatch.undo()
    assert (await h.get(f"{API}/h6?teamId=team_a", R)).status == 404
    assert (await h.get(f"{API}/h5?teamId=team_a", R)).body == b"kept"


@pytest_twisted.ensureDeferred
async def test_the_batch_query_answers_per_hash(h: Harness) -> None:
    assert (await upload(h, "q1", b"12345", duration="77")).status == 202
    assert (await upload(h, "q2", b"ab", tag=None, duration="0")).status == 202
    body = json.dumps({"hashes": ["q1", "q2", "q3"]}).encode()
    got = await h.post(f"{API}?teamId=team_a", body, {**R, "Content-Type": "application/json"})
    assert got.status == 200, got.describe()
    assert got.json() == {
        "q1": {"size": 5, "taskDurationMs": 77, "tag": TAG},
        "q2": {"size": 2, "taskDurationMs": 0},
        "q3": {"error": {"message": "artifact not found"}},
    }
    other_team = await h.post(f"{API}?teamId=team_b", body, R)
    assert all("error" in v for v in other_team.json().values())
    vercel_error(await h.post(f"{API}?teamId=team_a", b'{"hashes": "q1"}', R), 400)
    vercel_error(await h.post(f"{API}?teamId=team_a", b"not json", R), 400)


@pytest_twisted.ensureDeferred
async def test_events_are_counted_and_dropped(h: Harness) -> None:
    events = [{"sessionId": "s", "source": "REMOTE", "event": "HIT", "hash": "q1", "duration": 10},
              {"sessionId": "s", "source": "LOCAL", "event": "MISS", "hash": "q2"}]
    got = await h.post(f"{API}/events?teamId=team_a", json.dumps(events).encode(), W)
    assert got.status == 200 and got.body == b""
    assert count(h, "event-remote", "hit") == 1 and count(h, "event-local", "miss") == 1
    vercel_error(await h.post(f"{API}/events", b"{}", W), 400)
    too_big = b"[" + b" " * (1 << 20) + b"]"
    vercel_error(await h.post(f"{API}/events", too_big, W), 413)


@pytest_twisted.ensureDeferred
async def test_preflight_allows_the_authorization_header(h: Harness) -> None:
    got = await h.request("OPTIONS", f"{API}/h1?teamId=team_a", None,
                          {"Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "Authorization"})
    assert got.status == 200
    assert "authorization" in (got.header("Access-Control-Allow-Headers") or "").lower()
    assert "PUT" in (got.header("Access-Control-Allow-Methods") or "")


@pytest_twisted.ensureDeferred
async def test_setup_turborepo(h: Harness) -> None:
    got = await h.get("/setup/turborepo?remote=big&team=web", R)
    assert got.status == 200, got.describe()
    text = got.body.decode()
    assert f"export TURBO_API={h.base_url}/turborepo/big\n" in text
    assert "export TURBO_TEAM=web\n" in text and "TURBO_TOKEN=" in text and "TURBO_TELEMETRY_DISABLED=1" in text
    assert f"--api={h.base_url}/turborepo/big --team=web" in text
    assert "/turborepo/turbo\n" in (await h.get("/setup/turborepo", R)).body.decode()
    assert (await h.get("/setup/turborepo?remote=nope", R)).status == 404
    assert (await h.get("/setup/turborepo?team=a/b", R)).status == 400
