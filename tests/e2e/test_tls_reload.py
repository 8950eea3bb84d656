"""An ``ssl:`` listener re-reads its certificate and key on SIGHUP (renewals by
certbot or cert-manager, replaced in place): new connections get the new
certificate, a keep-alive connection opened before keeps working, files that do
not load leave the previous certificate in use with an error naming the file,
and ALPN answers ``http/1.1``. In one process and with two workers (the parent
forwards SIGHUP to each). Certificates are made here with ``cryptography``,
signed by a throwaway CA the client trusts (docs/operations.rst, TLS)."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.daemon import Daemon, free_port

SERIALS = (0x5EC0001, 0x5EC0002)


class CA:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sparkcache test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.name = name
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                     .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, serial: int) -> tuple[bytes, bytes]:
        """(key PEM, certificate PEM) for 127.0.0.1."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
                .issuer_name(self.name).public_key(key.public_key()).serial_number(serial)
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def replace(path: Path, data: bytes) -> None:
    """As a renewal does: the new file renamed over the old one."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def client_context(cafile: Path, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def fresh(port: int, cafile: Path) -> tuple[int, int, str | None]:
    """A new verified connection offering h2 and http/1.1: (certificate serial,
    worker that answered GET /health, ALPN protocol selected)."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30,
                                       context=client_context(cafile, ["h2", "http/1.1"]))
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body
        sock: Any = conn.sock
        serial = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)).serial_number
        return serial, json.loads(body).get("worker", 0) or 0, sock.selected_alpn_protocol()
    finally:
        conn.close()


def until(cond: Callable[[], bool], what: str, d: Daemon, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}\n{d.log_tail()}")
        time.sleep(0.05)


def serving(port: int, cafile: Path, serial: int, workers: int) -> Callable[[], bool]:
    """True once every worker has answered a new connection with ``serial``."""
    latest: dict[int, int] = {}

    def check() -> bool:
        got, worker, _ = fresh(port, cafile)
        latest[worker] = got
        return len(latest) == workers and all(s == serial for s in latest.values())

    return check


def tls_daemon(tmp_path: Path, daemon_factory: Any, workers: int) -> tuple[CA, Path, Path, Path, int, Daemon]:
    """A throwaway CA, a certificate of serial SERIALS[0] from it, and a
    daemon with a plain and an ``ssl:`` listener using that certificate
    (``workers`` processes): (ca, its file, key file, cert file, TLS port, daemon)."""
    ca = CA()
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(ca.pem())
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_pem, cert_pem = ca.issue(SERIALS[0])
    key.write_bytes(key_pem)
    cert.write_bytes(cert_pem)
    tcp_port, tls_port = free_port(), free_port()
    d = daemon_factory(port=tcp_port, server={"workers": workers, "listen": [
        f"tcp:{tcp_port}:interface=127.0.0.1", f"ssl:{tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"]})
    return ca, cafile, key, cert, tls_port, d


@pytest.mark.parametrize("workers", [1, 2], ids=["w1", "w2"])
def test_sighup_reloads_the_certificate_without_dropping_connections(tmp_path: Path, daemon_factory: Any,
                                                                        workers: int) -> None:
    ca, cafile, key, cert, tls_port, d = tls_daemon(tmp_path, daemon_factory, workers)
    until(serving(tls_port, cafile, SERIALS[0], workers), "not every worker served the first certificate", d)
    assert fresh(tls_port, cafile)[2] == "http/1.1"

    # A keep-alive connection opened before the renewal.
    old = http.client.HTTPSConnection("127.0.0.1", tls_port, timeout=30, context=client_context(cafile))
    old.request("GET", "/health")
    first = old.getresponse()
    assert first.status == 200 and first.read()
    old_sock: Any = old.sock

    key_pem, cert_pem = ca.issue(SERIALS[1])
    replace(key, key_pem)
    replace(cert, cert_pem)
    d.signal(signal.SIGHUP)
    until(serving(tls_port, cafile, SERIALS[1], workers), "a new connection still gets the old certificate", d)
    assert f"now serving serial {SERIALS[1]:x}" in d.log()

    # The connection from before: same socket, same certificate, still answering.
    old.request("GET", "/health")
    again = old.getresponse()
    assert again.status == 200 and again.read()
    assert old.sock is old_sock
    assert x509.load_der_x509_certificate(old_sock.getpeercert(binary_form=True)).serial_number == SERIALS[0]
    old.close()

    # Files that do not load: logged naming the file; the last good certificate stays.
    replace(key, b"not a key\n")
    d.signal(signal.SIGHUP)
    until(lambda: f"tls: {key}: not a PEM private key" in d.log(), "the broken key file was not reported", d)
    if workers == 2:
        until(lambda: d.log().count(f"tls: {key}: not a PEM private key") >= 2, "a worker did not report it", d)
    for _ in range(4):
        assert fresh(tls_port, cafile)[0] == SERIALS[1]
    assert d.running
    assert d.stop() == 0


def test_alpn_answers_http11_and_never_h2(tmp_path: Path, daemon_factory: Any) -> None:
    _, cafile, _, _, tls_port, d = tls_daemon(tmp_path, daemon_factory, 1)

    def negotiated(alpn: list[str] | None) -> str | None:
        with socket.create_connection(("127.0.0.1", tls_port), timeout=30) as raw:
            with client_context(cafile, alpn).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.selected_alpn_protocol()

    assert negotiated(["h2", "http/1.1"]) == "http/1.1"
    assert negotiated(["http/1.1"]) == "http/1.1"
    assert negotiated(None) is None
    # Nothing in common: the handshake completes without ALPN (no internal_error alert).
    assert negotiated(["h2"]) is None
    assert d.running
