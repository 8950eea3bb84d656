"""OCI units: the /v2/ path grammar, remote options, challenges, Accept, upstream tokens.

Token tests drive a fake upstream client and a task.Clock, so expiry is
stepped, never waited for.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from sparkcache.config import ConfigError, RemoteConfig
from sparkcache.protocols import load_config_data
from sparkcache.protocols.oci.config import OCIOptions, options_of
from sparkcache.protocols.oci.errors import OCIError
from sparkcache.protocols.oci.mirror import accepted_types
from sparkcache.protocols.oci.names import check_reference, sha256_hex, split_path, upstream_name, validate_name
from sparkcache.protocols.oci.tokens import TokenAuth, TokenError, parse_challenge

HEX = "a" * 64


@pytest.mark.parametrize("path, name, tail", [
    ("library/nginx/manifests/latest", ["library", "nginx"], ["manifests", "latest"]),
    (f"a/blobs/sha256:{HEX}", ["a"], ["blobs", f"sha256:{HEX}"]),
    # A repository may have components named like endpoints: the tail is taken from the end.
    (f"team/blobs/manifests/sha256:{HEX}", ["team", "blobs"], ["manifests", f"sha256:{HEX}"]),
    ("a/manifests/blobs/1.0", ["a", "manifests"], ["blobs", "1.0"]),
    ("a/b/blobs/uploads/", ["a", "b"], ["blobs", "uploads", ""]),
    ("a/b/blobs/uploads", ["a", "b"], ["blobs", "uploads", ""]),
    ("a/b/blobs/uploads/1234-uuid", ["a", "b"], ["blobs", "uploads", "1234-uuid"]),
    ("a/b/tags/list", ["a", "b"], ["tags", "list"]),
    ("_catalog", [], ["_catalog"]),
    ("hub/_catalog", ["hub"], ["_catalog"]),
])
def test_split_path(path: str, name: list[str], tail: list[str]) -> None:
    segments = path.split("/")
    assert split_path(segments) == (name, tail)


@pytest.mark.parametrize("path", ["a/b", "a/manifests/", "a/tags/list/", "manifests/x", "a/b/c"])
def test_split_path_refuses_non_endpoints(path: str) -> None:
    with pytest.raises(OCIError) as e:
        split_path(path.split("/"))
    assert e.value.status == 404 and e.value.code == "NAME_UNKNOWN"


def test_names_references_digests() -> None:
    assert validate_name(["library", "nginx"]) == "library/nginx"
    assert validate_name(["a.b", "c__d", "e--f", "g_h"]) == "a.b/c__d/e--f/g_h"
    for bad in (["Upper"], ["a-"], ["-a"], ["a..b"], ["a___b"], [], ["x" * 256]):
        with pytest.raises(OCIError) as e:
            validate_name(bad)
        assert e.value.code == "NAME_INVALID" and e.value.status == 400
    assert check_reference("v1.2.3_rc-1") == "tag"
    assert check_reference(f"sha256:{HEX}") == "digest"
    with pytest.raises(OCIError) as e:
        check_reference("-bad")
    assert e.value.status == 404
    with pytest.raises(OCIError) as e:
        sha256_hex("sha256:ABC")
    assert e.value.code == "DIGEST_INVALID"
    with pytest.raises(OCIError) as e:
        sha256_hex("sha512:" + "b" * 128)
    assert e.value.code == "UNSUPPORTED"
    assert sha256_hex(f"sha256:{HEX}") == HEX
    assert upstream_name("nginx", True) == "library/nginx"
    assert upstream_name("nginx", False) == "nginx"
    assert upstream_name("bitnami/redis", True) == "bitnami/redis"


def _cfg(remotes: dict[str, Any]) -> Any:
    return load_config_data({"remotes": remotes}, "cache.yaml", {})


def test_options_parsed_and_validated() -> None:
    cfg = _cfg({
        "hub": {"type": "oci", "upstream": "https://registry-1.docker.io", "registries": ["Docker.io"],
                "repositories": ["^library/"], "tag_ttl": "2m"},
        "ghcr": {"type": "oci", "upstream": "https://ghcr.io", "registries": ["ghcr.io", "ghcr.io:443"]},
        "mine": {"type": "oci-local", "repositories": ["^team/"]},
    })
    hub = options_of(cfg.remotes["hub"])
    assert hub.registries == ("docker.io",) and hub.docker_hub and hub.tag_ttl == 120.0
    assert hub.allows("library/nginx") and not hub.allows("bitnami/redis")
    assert cfg.remotes["hub"].redacted()["options"] == {"registries": ["docker.io"], "repositories": ["^library/"],
                                                        "tag_ttl": 120.0}
    assert options_of(cfg.remotes["ghcr"]).allows("anything") and not options_of(cfg.remotes["ghcr"]).docker_hub
    assert options_of(cfg.remotes["mine"]).repositories[0].pattern == "^team/"
    assert options_of(RemoteConfig("x", "oci", "http://x")) == OCIOptions()


@pytest.mark.parametrize("remotes, path, problem", [
    ({"a": {"type": "oci", "upstream": "http://a", "registries": ["docker.io"]},
      "b": {"type": "oci", "upstream": "http://b", "registries": ["docker.io"]}},
     "remotes.b.registries[0]", "already served by remotes.a"),
    ({"a": {"type": "oci", "upstream": "http://a", "registries": ["https://docker.io"]}}, "remotes.a.registries[0]",
     "registry host name"),
    ({"a": {"type": "oci-local", "registries": ["docker.io"]}}, "remotes.a.registries", "type: oci remotes only"),
    ({"a": {"type": "oci", "upstream": "http://a", "tag_ttl": "soon"}}, "remotes.a.tag_ttl", "duration"),
    ({"a": {"type": "oci", "upstream": "http://a", "repositories": ["("]}}, "remotes.a.repositories[0]",
     "regular expression"),
    ({"a": {"type": "oci", "upstream": "http://a", "registry": ["docker.io"]}}, "remotes.a.registry", "unknown key"),
])
def test_option_errors(remotes: dict[str, Any], path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(remotes)
    assert e.value.path == path and problem in e.value.problem


def test_challenge_and_accept_parsing() -> None:
    ch = parse_challenge('Bearer realm="https://auth.example/token",service="registry.example",'
                         'scope="repository:library/nginx:pull,push"')
    assert ch is not None and ch.realm == "https://auth.example/token" and ch.service == "registry.example"
    assert parse_challenge('Basic realm="x"') is None
    assert parse_challenge('Bearer realm="file:///etc/passwd"') is None
    assert parse_challenge(None) is None

    class Req:
        def __init__(self, *values: bytes) -> None:
            self.requestHeaders = Headers({b"accept": list(values)} if values else {})

    assert accepted_types(Req()) is None
    assert accepted_types(Req(b"*/*")) is None
    assert accepted_types(Req(b"application/vnd.oci.image.index.v1+json; q=0.5, application/JSON",
                              b"application/vnd.docker.distribution.manifest.v2+json")) == {
        "application/vnd.oci.image.index.v1+json", "application/json",
        "application/vnd.docker.distribution.manifest.v2+json"}


# -- tokens -------------------------------------------------------------------------


class FakeResponse:
    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self.body = body
        self.headers = Headers({})
        self.length = len(body)

    def deliverBody(self, protocol: Any) -> None:
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeUpstream:
    """Answers token requests; each waits on a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[bytes, bytes]]] = []
        self.pending: list[Deferred[Any]] = []

    async def request(self, remote: Any, method: bytes, url: str, headers: dict[bytes, bytes]) -> Any:
        self.calls.append((url, headers))
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return await d

    def answer(self, code: int, doc: dict[str, Any]) -> None:
        d = self.pending.pop(0)
        d.callback((FakeResponse(code, json.dumps(doc).encode()), ""))


REMOTE = RemoteConfig("hub", "oci", "https://registry.example", credentials=None)
CHALLENGE = 'Bearer realm="https://auth.example/token",service="reg"'


@pytest_twisted.ensureDeferred
async def test_tokens_shared_cached_until_expiry() -> None:
    from sparkcache.config import Credentials

    remote = RemoteConfig("hub", "oci", "https://registry.example", credentials=Credentials("u", "p"))
    clock = task.Clock()
    up = FakeUpstream()
    auth = TokenAuth(up, clock)  # type: ignore[arg-type]
    scope = "repository:library/nginx:pull"
    assert auth.cached(remote, scope) == {}
    assert auth.learn(remote, CHALLENGE)
    first = Deferred.fromCoroutine(auth.renew(remote, scope))
    second = Deferred.fromCoroutine(auth.renew(remote, scope))
    assert len(up.calls) == 1  # one token request for everyone asking at once
    url, headers = up.calls[0]
    assert url == "https://auth.example/token?service=reg&scope=repository%3Alibrary%2Fnginx%3Apull"
    assert headers[b"Authorization"].startswith(b"Basic ")
    up.answer(200, {"token": "T1", "expires_in": 65})
    assert await first == await second == {b"Authorization": b"Bearer T1"}
    assert auth.cached(remote, scope) == {b"Authorization": b"Bearer T1"}
    clock.advance(59)
    assert auth.cached(remote, scope) == {b"Authorization": b"Bearer T1"}
    clock.advance(2)  # past expires_in less the safety margin
    assert auth.cached(remote, scope) == {}
    # Without expires_in: 60 s.
    renewed = Deferred.fromCoroutine(auth.renew(remote, scope))
    up.answer(200, {"access_token": "T2"})
    assert await renewed == {b"Authorization": b"Bearer T2"}
    clock.advance(54)
    assert auth.cached(remote, scope) == {b"Authorization": b"Bearer T2"}
    clock.advance(2)
    assert auth.cached(remote, scope) == {}


@pytest_twisted.ensureDeferred
async def test_token_errors_say_whether_upstream_is_down() -> None:
    clock = task.Clock()
    up = FakeUpstream()
    auth = TokenAuth(up, clock)  # type: ignore[arg-type]
    assert auth.learn(REMOTE, CHALLENGE)
    for code, doc, down in ((401, {}, False), (503, {}, True), (200, {"nothing": 1}, True)):
        d = Deferred.fromCoroutine(auth.renew(REMOTE, "s"))
        up.answer(code, doc)
        with pytest.raises(TokenError) as e:
            await d
        assert e.value.down is down
        assert "Authorization" not in str(e.value)
    assert not auth.cached(REMOTE, "s")
