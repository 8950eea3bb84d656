"""sparkcache.web.tls: ``ssl:`` endpoint strings read as Twisted reads them, and
files that do not load reported by name (the running context is kept by the
caller, tests/e2e/test_tls_reload.py)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from sparkcache.web.tls import ALPN, ReloadingTLS, TLSFileError, TLSFiles, parse_ssl, select_alpn, serial, ssl_endpoint


def self_signed(tmp_path: Path, serial_number: int, stem: str = "") -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial_number).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    kp, cp = tmp_path / f"{stem}key.pem", tmp_path / f"{stem}cert.pem"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return kp, cp


def test_parse_reads_what_twisted_reads() -> None:
    assert parse_ssl("tcp:8090") is None
    s = parse_ssl(r"ssl:8443:interface=127.0.0.1:privateKey=/etc/a\:b/key.pem:certKey=/c.pem:backlog=7")
    assert s is not None
    assert (s.port, s.interface, s.backlog) == (8443, "127.0.0.1", 7)
    assert s.files == TLSFiles("/etc/a:b/key.pem", "/c.pem")
    # Twisted's defaults: server.pem holding both, on every interface.
    d = parse_ssl("ssl:443")
    assert d is not None and d.files == TLSFiles("server.pem", "server.pem") and d.interface == ""
    # Positional, as Twisted's parser allows.
    p = parse_ssl("ssl:443:k.pem:c.pem")
    assert p is not None and p.files == TLSFiles("k.pem", "c.pem")
    with pytest.raises(ValueError, match="unknown"):
        parse_ssl("ssl:443:privateKey=k.pem:certkey=c.pem")


def test_files_that_do_not_load_are_named(tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path, 11)
    tls = ReloadingTLS(TLSFiles(str(key), str(cert)))
    assert serial(tls.options) == 11
    chained = ReloadingTLS(TLSFiles(str(key), str(cert), chain=str(cert)))
    assert len(chained.options.extraCertChain) == 1
    both = tmp_path / "both.pem"  # Twisted's default: one file, key and certificate
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    assert serial(ReloadingTLS(TLSFiles(str(both), str(both))).options) == 11

    missing = tmp_path / "gone.pem"
    with pytest.raises(TLSFileError) as e:
        ReloadingTLS(TLSFiles(str(key), str(missing)))
    assert e.value.path == str(missing)

    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSFileError) as e:
        tls_files = TLSFiles(str(key), str(garbage))
        ReloadingTLS(tls_files)
    assert e.value.path == str(garbage) and "certificate" in e.value.why
    with pytest.raises(TLSFileError) as e:
        ReloadingTLS(TLSFiles(str(garbage), str(cert)))
    assert e.value.path == str(garbage) and "private key" in e.value.why

    other_key, _ = self_signed(tmp_path, 12, "other-")
    with pytest.raises(TLSFileError) as e:
        ReloadingTLS(TLSFiles(str(other_key), str(cert)))
    assert str(other_key) in e.value.path and "does not fit" in e.value.why

    with pytest.raises(TLSFileError) as e:
        ReloadingTLS(TLSFiles(str(key), str(cert), chain=str(key)))
    assert e.value.path == str(key) and "no PEM certificate" in e.value.why

    with pytest.raises(TLSFileError) as e:
        ReloadingTLS(TLSFiles(str(key), str(cert), dh_parameters=str(garbage)))
    assert e.value.path == str(garbage)
    with pytest.raises(TLSFileError) as e:
        ReloadingTLS(TLSFiles(str(key), str(cert), dh_parameters=str(missing)))
    assert e.value.path == str(missing)


def test_a_reload_swaps_the_context_for_new_connections(tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path, 21)
    tls = ReloadingTLS(TLSFiles(str(key), str(cert)))
    before = tls.options
    self_signed(tmp_path, 22)
    tls.use(tls.load())
    assert serial(tls.options) == 22 and tls.options is not before


def test_alpn_selects_http11_only() -> None:
    assert ALPN == (b"http/1.1",)
    conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    assert select_alpn(conn, [b"h2", b"http/1.1"]) == b"http/1.1"
    assert select_alpn(conn, [b"h2"]) is SSL.NO_OVERLAPPING_PROTOCOLS


def test_ssl_endpoint_keeps_port_interface_and_backlog(tmp_path: Path) -> None:
    from twisted.internet.testing import MemoryReactor

    key, cert = self_signed(tmp_path, 31)
    reactor = MemoryReactor()
    made = ssl_endpoint(reactor, f"ssl:8443:interface=127.0.0.1:backlog=9:privateKey={key}:certKey={cert}")
    assert made is not None
    endpoint, tls = made
    endpoint.listen(object())  # type: ignore[arg-type]
    port, _, factory, backlog, interface = reactor.sslServers[0]
    assert (port, backlog, interface) == (8443, 9, "127.0.0.1") and factory is tls
    assert ssl_endpoint(reactor, "tcp:8090") is None
