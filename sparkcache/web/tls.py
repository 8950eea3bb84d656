"""TLS for ``ssl:`` listeners: a context re-read from its files on SIGHUP, and ALPN.

Operators renew certificates in place (certbot, cert-manager) and send SIGHUP.
Each ``ssl:`` listener's connections are made by a :class:`ReloadingTLS`:
``reload`` reads the endpoint string's files again (``privateKey``,
``certKey``, ``extraCertChain``, ``dhParameters``; the same keys and defaults
as Twisted's ``ssl:`` parser) into a new context that the next connection
uses. Connections already open keep the context they were made with, so no
connection is dropped. Files that do not load (missing, not PEM, a key that
does not match the certificate) are logged naming the file, and the previous
context stays.

ALPN: ``http/1.1`` is selected when a client offers it (curl, browsers and
Python offer ``h2`` first; this daemon speaks HTTP/1.1 only: Twisted's HTTP/2
needs the h2 package). A client that offers only other protocols gets no ALPN
answer rather than a failed handshake, and may then try HTTP/1.1 or give up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint, _parse
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

log = Logger()

ALPN = (b"http/1.1",)
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


class TLSFileError(Exception):
    """A file of an ``ssl:`` listener could not be loaded; ``path`` names it."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


@dataclass(frozen=True)
class TLSFiles:
    """Where an ``ssl:`` endpoint string's certificate and key live."""

    private_key: str
    cert: str
    chain: str | None = None
    dh_parameters: str | None = None
    method: str | None = None  # a constant of OpenSSL.SSL, e.g. TLS_METHOD


@dataclass(frozen=True)
class SSLSpec:
    """An ``ssl:`` endpoint string, parsed as Twisted's ``ssl:`` parser does."""

    port: int
    interface: str
    backlog: int
    files: TLSFiles


def parse_ssl(spec: str) -> SSLSpec | None:
    """The parts of an ``ssl:`` endpoint string; None for any other kind.
    (Twisted's own tokenizer, so ``\\:`` escapes mean the same here.)"""
    if spec.split(":", 1)[0].strip().lower() != "ssl":
        return None
    args, kw = _parse(spec)
    args = args[1:]  # the "ssl" prefix
    names = ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain", "dhParameters")
    for name, value in zip(names, args):
        if name in kw:
            raise ValueError(f"{spec!r}: {name} given twice")
        kw[name] = value
    unknown = set(kw) - set(names)
    if unknown:
        raise ValueError(f"{spec!r}: unknown ssl endpoint option(s) {', '.join(sorted(unknown))}")
    if "port" not in kw:
        raise ValueError(f"{spec!r}: no port")
    private_key = kw.get("privateKey", "server.pem")
    files = TLSFiles(private_key, kw.get("certKey") or private_key, kw.get("extraCertChain"),
                     kw.get("dhParameters"), kw.get("sslmethod"))
    return SSLSpec(int(kw["port"]), kw.get("interface", ""), int(kw.get("backlog", 50)), files)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSFileError(path, e.strerror or str(e)) from None


def _why(e: Exception) -> str:
    return str(e) or type(e).__name__


def select_alpn(conn: SSL.Connection, offered: Sequence[bytes]) -> Any:
    for proto in ALPN:
        if proto in offered:
            return proto
    return SSL.NO_OVERLAPPING_PROTOCOLS  # no ALPN extension in the answer, rather than an alert


def load(files: TLSFiles) -> ssl.CertificateOptions:
    """Blocking (reads files): the options of a new TLS context, built now so that
    a bad key fails here rather than at the first handshake. Raises TLSFileError."""
    cert_pem = _read(files.cert)
    try:
        cert = ssl.Certificate.loadPEM(cert_pem).original
    except Exception as e:
        raise TLSFileError(files.cert, f"not a PEM certificate ({_why(e)})") from None
    try:
        key = ssl.KeyPair.load(_read(files.private_key), crypto.FILETYPE_PEM).original
    except TLSFileError:
        raise
    except Exception as e:
        raise TLSFileError(files.private_key, f"not a PEM private key ({_why(e)})") from None
    chain = None
    if files.chain is not None:
        found = _PEM_CERT.findall(_read(files.chain))
        if not found:
            raise TLSFileError(files.chain, "holds no PEM certificate")
        try:
            chain = [ssl.Certificate.loadPEM(pem).original for pem in found]
        except Exception as e:
            raise TLSFileError(files.chain, f"not PEM certificates ({_why(e)})") from None
    dh = None
    if files.dh_parameters is not None:
        _read(files.dh_parameters)  # an unreadable file is named here, not as an OpenSSL error later
        dh = ssl.DiffieHellmanParameters.fromFile(FilePath(files.dh_parameters))
    kw: dict[str, Any] = {}
    if files.method is not None:
        kw["method"] = getattr(SSL, files.method)
    probe = SSL.Context(SSL.TLS_METHOD)
    try:
        probe.use_certificate(cert)
        probe.use_privatekey(key)
        probe.check_privatekey()
    except SSL.Error as e:
        where = files.private_key if files.private_key == files.cert else f"{files.private_key} (for {files.cert})"
        raise TLSFileError(where, f"the key does not fit the certificate ({_why(e)})") from None
    options = ssl.CertificateOptions(privateKey=key, certificate=cert, extraCertChain=chain, dhParameters=dh,
                                     acceptableProtocols=list(ALPN), **kw)
    try:
        context = options.getContext()
    except SSL.Error as e:  # what is left to load: the DH parameters, or the chain
        raise TLSFileError(files.dh_parameters or files.chain or files.cert, f"OpenSSL refused it ({_why(e)})") from None
    # Twisted's selector answers a client with no protocol in common with an internal_error alert.
    context.set_alpn_select_callback(select_alpn)
    return options


def serial(options: ssl.CertificateOptions) -> int:
    cert = options.certificate
    assert cert is not None  # load() always gives one
    return int(cert.get_serial_number())


def describe(options: ssl.CertificateOptions) -> str:
    assert options.certificate is not None
    cert = options.certificate.to_cryptography()
    return f"serial {cert.serial_number:x}, expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingTLS:
    """The connection creator of one ``ssl:`` listener (what ``listenSSL`` wraps its
    factory with): every new connection uses the context last loaded."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self.options = load(files)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self.options.serverConnectionForTLS(tlsProtocol)

    def load(self) -> ssl.CertificateOptions:
        """Blocking: the new options (run it in a thread); ``use`` them on the reactor."""
        return load(self.files)

    def use(self, options: ssl.CertificateOptions) -> None:
        if serial(options) != serial(self.options):
            log.info("tls: {cert}: now serving {desc}", cert=self.files.cert, desc=describe(options))
        else:
            log.info("tls: {cert}: re-read, unchanged ({desc})", cert=self.files.cert, desc=describe(options))
        self.options = options


def tls_for(spec: str) -> ReloadingTLS | None:
    """The reloading TLS of an ``ssl:`` endpoint string (None for any other);
    raises TLSFileError when its files do not load."""
    parsed = parse_ssl(spec)
    return ReloadingTLS(parsed.files) if parsed is not None else None


def ssl_endpoint(reactor: Any, spec: str) -> tuple[SSL4ServerEndpoint, ReloadingTLS] | None:
    """An ``ssl:`` endpoint string as ``serverFromString`` would make it, but with a
    ReloadingTLS; None for any other kind."""
    parsed = parse_ssl(spec)
    if parsed is None:
        return None
    tls = ReloadingTLS(parsed.files)
    return SSL4ServerEndpoint(reactor, parsed.port, tls, backlog=parsed.backlog, interface=parsed.interface), tls
