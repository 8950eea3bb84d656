import base64

import pytest

from sparkcache.auth import AuthError, Authorizer
from sparkcache.config import AuthConfig, TokenConfig
from sparkcache.web.paths import BadPath, quote_segments, split_raw_path
from sparkcache.web.serve import Unsatisfiable, parse_range


def test_split_raw_path():
    assert split_raw_path(b"/api/r/a/b.txt?x=1") == ["api", "r", "a", "b.txt"]
    assert split_raw_path(b"/api/r/") == ["api", "r", ""]
    assert split_raw_path(b"/api/r//a%20b") == ["api", "r", "a b"]
    assert quote_segments(["a b", "c+d", "ü"]) == "a%20b/c+d/%C3%BC"


@pytest.mark.parametrize("raw", [
    b"/api/r/../x", b"/api/r/%2e%2e/x", b"/api/r/%2E%2e/x", b"/api/r/a%2f..%2f..%2fetc/passwd",
    b"/api/r/a%5c..%5cx", b"/api/r/a\\b", b"/api/r/a%00b", b"/api/r/./x", b"/api/r/%0d%0aSet-Cookie",
    b"/api/r/%ff",
])
def test_bad_paths(raw):
    with pytest.raises(BadPath) as e:
        split_raw_path(raw)
    assert e.value.status == 400


def test_long_path():
    with pytest.raises(BadPath) as e:
        split_raw_path(b"/api/r/" + b"a" * 5000, 4096)
    assert e.value.status == 414


def test_parse_range():
    assert parse_range(None, 10) is None
    assert parse_range(b"bytes=0-4", 10) == (0, 4)
    assert parse_range(b"bytes=5-", 10) == (5, 9)
    assert parse_range(b"bytes=-3", 10) == (7, 9)
    assert parse_range(b"bytes=-30", 10) == (0, 9)
    assert parse_range(b"bytes=2-100", 10) == (2, 9)
    assert parse_range(b"bytes=0-1,4-5", 10) is None  # multiple ranges: send it all
    assert parse_range(b"items=0-1", 10) is None
    assert parse_range(b"bytes=3-4", None) is None
    with pytest.raises(Unsatisfiable):
        parse_range(b"bytes=10-", 10)


class Req:
    def __init__(self, auth=None):
        self.auth = auth

    def getHeader(self, name):
        return self.auth


def authz(anonymous=True):
    return Authorizer(AuthConfig(anonymous, (
        TokenConfig("r", "read-tok", frozenset({"read"})),
        TokenConfig("a", "admin-tok", frozenset({"read", "write", "admin"})),
    )))


def test_auth_scopes():
    a = authz()
    a.require(Req(), "read")
    a.require(Req("Bearer admin-tok"), "admin")
    basic = "Basic " + base64.b64encode(b"anyone:read-tok").decode()
    a.require(Req(basic), "read")
    with pytest.raises(AuthError) as e:
        a.require(Req(basic), "write")
    assert e.value.status == 403
    with pytest.raises(AuthError) as e:
        a.require(Req("Bearer wrong"), "read")
    assert e.value.status == 401
    with pytest.raises(AuthError) as e:
        a.require(Req(), "write")
    assert e.value.status == 401


def test_anonymous_off():
    with pytest.raises(AuthError) as e:
        authz(anonymous=False).require(Req(), "read")
    assert e.value.status == 401
