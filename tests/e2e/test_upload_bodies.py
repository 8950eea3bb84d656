"""Uploads land on disk once, and only when they may.

A request's body is refused or accepted from its headers: an anonymous
upload announcing 10 GiB is answered 401 (in its protocol's format, with the
challenge its clients follow) while the client has sent no body byte, and
nothing reaches the spool. An accepted body is written straight into a spool
file, and that very file (the same inode) becomes the stored body: no second
copy. A client that leaves mid-body leaves no spool file behind.

Requests go out on raw sockets, so a test controls exactly when body bytes
are sent, and sees a daemon that waits for a body as a socket timeout.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.support.client import Response, assert_json_error, bearer, eventually
from tests.support.remotes import generic_remote

WRITE = "wr-bodies-7e21"
TOKENS = {"SPARKCACHE_WRITE_TOKEN": WRITE}
TEN_GIB = 10 << 30
# How long a refused request may take: a daemon that waits for the body never answers.
ANSWER_TIMEOUT = 10.0


class _Wire:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, *args: Any, **kw: Any) -> io.BytesIO:
        return io.BytesIO(self.data)


def parse(data: bytes, method: str) -> Response:
    resp = http.client.HTTPResponse(_Wire(data), method=method)  # type: ignore[arg-type]
    resp.begin()
    return Response(resp.status, resp.headers, resp.read())


def head_bytes(port: int, method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_to_end(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def answer_to_head(port: int, method: str, path: str, headers: dict[str, str]) -> tuple[bytes, Response]:
    """Send only the head of a request announcing a 10 GiB body, and read the
    answer to its end (the daemon closes the connection after it)."""
    headers = {**headers, "Content-Length": str(TEN_GIB), "Expect": "100-continue"}
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT) as sock:
        sock.sendall(head_bytes(port, method, path, headers))
        data = read_to_end(sock)
    return data, parse(data, method)


def without_body(d: Any, method: str, path: str, headers: dict[str, str]) -> Response:
    """The same request with an empty body: answered by its handler, not its gate."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=ANSWER_TIMEOUT) as sock:
        sock.sendall(head_bytes(d.port, method, path, {**headers, "Content-Length": "0", "Connection": "close"}))
        return parse(read_to_end(sock), method)


def assert_refused_early(d: Any, method: str, path: str, headers: dict[str, str], status: int,
                         spool_before: list[str] | None = None, by_size: bool = False) -> Response:
    """The request is answered ``status`` from its head alone, the spool is as
    it was, and (unless refused ``by_size``) the answer is the one its handler
    gives the same request."""
    raw, resp = answer_to_head(d.port, method, path, headers)
    assert not raw.startswith(b"HTTP/1.1 100"), f"told to send the body before being refused:\n{raw[:300]!r}"
    assert resp.status == status, resp.describe()
    assert resp.header("Connection") == "close", resp.describe()
    assert d.spool_files() == (spool_before or []), d.spool_files()
    if by_size:
        return resp
    # Exactly what the handler answers when it decides on its own.
    late = without_body(d, method, path, headers)
    assert (late.status, late.body) == (resp.status, resp.body), late.describe()
    assert late.headers.get_all("WWW-Authenticate") == resp.headers.get_all("WWW-Authenticate")
    return resp


def test_anonymous_10_gib_put_is_401_before_any_body_byte(daemon_factory: Any) -> None:
    d = daemon_factory({"uploads": {"type": "local"}}, env=TOKENS)
    resp = assert_refused_early(d, "PUT", "/api/uploads/huge.iso", {}, 401)
    assert_json_error(resp, 401)
    assert resp.header("WWW-Authenticate"), resp.describe()
    assert d.get("/api/uploads/huge.iso").status == 404


def test_anonymous_oci_blob_patch_is_401_with_the_registry_challenge(daemon_factory: Any) -> None:
    d = daemon_factory({"pushes": {"type": "oci-local"}}, env=TOKENS)
    # Open a session first (as a pusher would), then PATCH it without credentials.
    start = d.request("POST", "/v2/pushes/team/app/blobs/uploads/", headers=bearer(WRITE))
    assert start.status == 202, start.describe()
    location = start.header("Location")
    assert location
    before = d.spool_files()  # the session's own (empty) spool file
    resp = assert_refused_early(d, "PATCH", location, {}, 401, spool_before=before)
    assert resp.json()["errors"][0]["code"] == "UNAUTHORIZED", resp.describe()
    challenge = resp.header("WWW-Authenticate") or ""
    assert challenge.startswith('Bearer realm="') and "/setup/token" in challenge, resp.describe()
    assert 'scope="repository:pushes/team/app:pull,push"' in challenge, resp.describe()


def test_anonymous_code_sync_upload_is_401_and_an_oversized_one_413(daemon_factory: Any) -> None:
    d = daemon_factory({}, env=TOKENS)
    resp = assert_refused_early(d, "POST", "/upload", {}, 401)
    assert_json_error(resp, 401)
    assert resp.header("WWW-Authenticate"), resp.describe()
    # With credentials, 10 GiB is past the upload limit: 413, still before the body.
    resp = assert_refused_early(d, "POST", "/upload", bearer(WRITE), 413, by_size=True)
    assert_json_error(resp, 413)


def test_put_to_a_read_through_remote_is_405_before_the_body(upstream: Any, daemon_factory: Any) -> None:
    d = daemon_factory({"files": generic_remote(upstream)}, env=TOKENS)
    resp = assert_refused_early(d, "PUT", "/api/files/files/a.bin", bearer(WRITE), 405)
    assert_json_error(resp, 405)
    assert "GET" in (resp.header("Allow") or ""), resp.describe()
    assert upstream.total() == 0, upstream.describe()


# -- accepted bodies: one file, from the socket to the store -------------------------------------


def cas_path(d: Any, hexdigest: str) -> Path:
    return Path(d.data_dir) / "cas" / "sha256" / hexdigest[:2] / hexdigest


def growing_spool_file(d: Any, at_least: int) -> Path:
    """The spool file the body being sent is written to, once it holds ``at_least`` bytes."""
    def find() -> Path | None:
        for name in d.spool_files():
            p = d.spool_dir / name
            try:
                if p.stat().st_size >= at_least:
                    return p
            except FileNotFoundError:
                pass
        return None

    found = eventually(find, message=f"no spool file with {at_least} bytes: {d.spool_files()}")
    assert isinstance(found, Path)
    return found


def upload_in_two_halves(d: Any, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Response]:
    """Send the head and half the body, note the inode of the spool file it
    lands in, send the rest; (that inode, the answer)."""
    half = len(body) // 2
    headers = {**headers, "Content-Length": str(len(body)), "Connection": "close"}
    with socket.create_connection(("127.0.0.1", d.port), timeout=30) as sock:
        sock.sendall(head_bytes(d.port, method, path, headers) + body[:half])
        inode = growing_spool_file(d, half).stat().st_ino
        sock.sendall(body[half:])
        return inode, parse(read_to_end(sock), method)


def test_generic_upload_is_stored_as_the_very_file_it_was_spooled_to(daemon_factory: Any) -> None:
    d = daemon_factory({"uploads": {"type": "local"}}, env=TOKENS)
    body = os.urandom(3 << 20)
    hexd = hashlib.sha256(body).hexdigest()
    inode, resp = upload_in_two_halves(d, "PUT", "/api/uploads/blob.bin", {**bearer(WRITE), "X-Checksum-Sha256": hexd},
                                       body)
    assert resp.status == 201, resp.describe()
    assert resp.json()["digest"] == f"sha256:{hexd}"
    assert cas_path(d, hexd).stat().st_ino == inode, "the stored body is a copy of the spooled one"
    assert d.spool_files() == []
    got = d.get("/api/uploads/blob.bin")
    assert got.status == 200 and hashlib.sha256(got.body).hexdigest() == hexd


@pytest.mark.parametrize("monolithic", ["post", "put"])
def test_oci_monolithic_upload_is_stored_as_the_very_file_it_was_spooled_to(daemon_factory: Any,
                                                                            monolithic: str) -> None:
    d = daemon_factory({"pushes": {"type": "oci-local"}}, env=TOKENS)
    body = os.urandom(3 << 20)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    auth = {**bearer(WRITE), "Content-Type": "application/octet-stream"}
    if monolithic == "post":
        target = f"/v2/pushes/team/app/blobs/uploads/?digest={digest}"
        inode, resp = upload_in_two_halves(d, "POST", target, auth, body)
    else:
        start = d.request("POST", "/v2/pushes/team/app/blobs/uploads/", headers=bearer(WRITE))
        assert start.status == 202, start.describe()
        inode, resp = upload_in_two_halves(d, "PUT", f"{start.header('Location')}?digest={digest}", auth, body)
    assert resp.status == 201, resp.describe()
    assert resp.header("Docker-Content-Digest") == digest
    assert cas_path(d, digest.split(":")[1]).stat().st_ino == inode, "the stored blob is a copy of the spooled one"
    assert d.spool_files() == []
    got = d.get(f"/v2/pushes/team/app/blobs/{digest}", headers=bearer(WRITE))
    assert got.status == 200 and "sha256:" + hashlib.sha256(got.body).hexdigest() == digest


def test_a_client_leaving_mid_body_leaves_no_spool_file(daemon_factory: Any) -> None:
    d = daemon_factory({"uploads": {"type": "local"}}, env=TOKENS)
    body = os.urandom(2 << 20)
    with socket.create_connection(("127.0.0.1", d.port), timeout=30) as sock:
        sock.sendall(head_bytes(d.port, "PUT", "/api/uploads/gone.bin",
                                {**bearer(WRITE), "Content-Length": str(len(body))}) + body[: len(body) // 2])
        growing_spool_file(d, len(body) // 2)
    eventually(lambda: d.spool_files() == [], message=f"spool file left behind: {d.spool_files()}")
    assert d.get("/api/uploads/gone.bin").status == 404
