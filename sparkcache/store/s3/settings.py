"""``storage.s3`` and ``storage.tier``: where the bucket is, and how big the local tier may grow.

Credentials never come from the configuration file itself: from the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or
from a credentials file whose *path* the configuration names (the INI format
of ``~/.aws/credentials``). They are kept out of ``repr`` and ``/config``.
"""

from __future__ import annotations

import configparser
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

# Object names are built from the prefix and hex digests only: keeping the
# prefix to these characters means no key ever needs URL quoting, so what is
# signed is exactly what is sent.
_PREFIX = re.compile(r"^[A-Za-z0-9._/-]*$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Credentials:
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)
    source: str = "environment"  # or the file's path: what /config may say

    def __repr__(self) -> str:
        return f"S3Credentials(from {self.source}, ***)"


@dataclass(frozen=True)
class S3Settings:
    endpoint: str
    bucket: str
    region: str = "us-east-1"
    prefix: str = ""
    addressing: str = "path"  # path | virtual
    credentials_file: str | None = None
    credentials: S3Credentials | None = field(default=None, repr=False, compare=False)
    # Bodies above this go up as a multipart upload in parts of part_size.
    multipart_threshold: int = 64 * 2**20
    part_size: int = 16 * 2**20
    # Parts of such bodies go up while they download (upload.py): "true"; "known":
    # only bodies whose sha256 is known in advance (no server-side copy at the
    # end, for servers where a copy costs as much as an upload); "false": at the end.
    stream_uploads: str = "true"
    # Attempts per request (5xx, throttling, connection errors), and the first backoff.
    attempts: int = 5
    backoff: float = 0.25
    timeout: float = 60.0
    # Index entries of immutable keys published in the bucket for the other hosts.
    share_index: bool = True
    # The cross-host lease on a key being fetched (lease.py): how long it
    # outlives a holder that died (renewed every third of it while alive).
    lease_ttl: float = 30.0
    # The bucket's sweeper (sweep.py): one elected host deletes least recently
    # used bodies above max_size (None: storage.max_size).
    sweep: bool = True
    sweep_interval: float = 300.0
    sweep_grace: float = 600.0  # bodies written or used this recently are never swept
    max_size: int | None = None
    host_id: str | None = None  # None: the host name and a hash of data_dir
    # Peer streaming (fetch/peer.py, web/peer.py): where the other hosts reach
    # this daemon while it holds a lease (None: they wait for the published
    # entry), and the key their requests are signed with (derived from the S3
    # secret key unless peer_secret_file / peer_secret_env name another).
    peer_url: str | None = None
    peer_secret_file: str | None = None
    peer_secret_env: str | None = None
    peer_key: bytes = field(default=b"", repr=False, compare=False)

    def redacted(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint, "bucket": self.bucket, "region": self.region, "prefix": self.prefix,
            "addressing": self.addressing, "credentials_file": self.credentials_file,
            "credentials": "***" if self.credentials is not None else None,
            "multipart_threshold": self.multipart_threshold, "part_size": self.part_size,
            "stream_uploads": self.stream_uploads,
            "attempts": self.attempts, "share_index": self.share_index, "lease_ttl": self.lease_ttl,
            "sweep": self.sweep,
            "sweep_interval": self.sweep_interval, "sweep_grace": self.sweep_grace, "max_size": self.max_size,
            "host_id": self.host_id, "peer_url": self.peer_url, "peer_secret_file": self.peer_secret_file,
            "peer_secret_env": self.peer_secret_env,
        }


def parse_s3(loader: Any, sec: Any) -> S3Settings:
    """``storage.s3`` read through the config's Section (errors name file and key path)."""
    from sparkcache.config import parse_duration, parse_size

    endpoint = sec.get("endpoint", str, None)
    if not endpoint:
        raise loader.error(sec.key("endpoint"), "required with storage.backend: s3 (e.g. http://127.0.0.1:8333)")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise loader.error(sec.key("endpoint"), f"expected http(s)://host[:port] with no path, got {endpoint!r}")
    bucket = sec.get("bucket", str, None)
    if not bucket:
        raise loader.error(sec.key("bucket"), "required with storage.backend: s3")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise loader.error(sec.key("bucket"), f"not a valid bucket name: {bucket!r} (3-63 of a-z 0-9 . -)")
    region = sec.get("region", str, "us-east-1")
    prefix = sec.get("prefix", str, "")
    if not _PREFIX.match(prefix) or prefix.startswith("/") or "//" in prefix:
        raise loader.error(sec.key("prefix"), f"expected letters, digits and . _ - / only, not starting with /, got {prefix!r}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    addressing = sec.get("addressing", str, "path")
    if addressing not in ("path", "virtual"):
        raise loader.error(sec.key("addressing"), f"expected path or virtual, got {addressing!r}")
    cred_file = sec.get("credentials_file", str, None)
    for secret in ("access_key", "secret_key", "aws_access_key_id", "aws_secret_access_key", "session_token"):
        if sec.has(secret):
            raise loader.error(sec.key(secret), "credentials never go in the configuration: set AWS_ACCESS_KEY_ID/"
                               "AWS_SECRET_ACCESS_KEY in the environment or name a credentials_file")
    if cred_file is not None:
        creds = read_credentials_file(loader, sec.key("credentials_file"), cred_file)
    else:
        creds = credentials_from_env(loader, sec.path, loader.environ)
    threshold = sec.convert("multipart_threshold", parse_size, S3Settings.multipart_threshold)
    part_size = sec.convert("part_size", parse_size, S3Settings.part_size)
    if part_size < 5 * 2**20:
        raise loader.error(sec.key("part_size"), "S3 parts are at least 5 MiB")
    stream = sec.get("stream_uploads", (bool, str), True)
    stream = {True: "true", False: "false"}.get(stream, stream) if isinstance(stream, bool) else stream
    if stream not in ("true", "known", "false"):
        raise loader.error(sec.key("stream_uploads"), f"expected true, false or known, got {stream!r}")
    attempts = sec.get("attempts", int, S3Settings.attempts)
    if attempts < 1:
        raise loader.error(sec.key("attempts"), "expected at least 1")
    lease_ttl = sec.convert("lease_ttl", parse_duration, S3Settings.lease_ttl)
    if lease_ttl < 1.0:
        raise loader.error(sec.key("lease_ttl"), "expected at least 1s")
    host_id = sec.get("host_id", str, None)
    if host_id is not None and not re.match(r"^[A-Za-z0-9._-]{1,128}$", host_id):
        raise loader.error(sec.key("host_id"), f"expected 1-128 of letters, digits and . _ -, got {host_id!r}")
    peer_url = sec.get("peer_url", str, None)
    if peer_url is not None:
        parts = urlsplit(peer_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
                or parts.query or parts.fragment or parts.username:
            raise loader.error(sec.key("peer_url"), f"expected http(s)://host[:port] (the address the other hosts "
                               f"reach this daemon at), got {peer_url!r}")
        peer_url = peer_url.rstrip("/")
    if sec.has("peer_secret"):
        raise loader.error(sec.key("peer_secret"), "secrets never go in the configuration: name a file "
                           "(peer_secret_file) or an environment variable (peer_secret_env)")
    secret_file = sec.get("peer_secret_file", str, None)
    secret_env = sec.get("peer_secret_env", str, None)
    if secret_file is not None and secret_env is not None:
        raise loader.error(sec.key("peer_secret_file"), "give either peer_secret_file or peer_secret_env, not both")
    if secret_file is not None:
        peer_key = read_secret_file(loader, sec.key("peer_secret_file"), secret_file)
    elif secret_env is not None:
        peer_key = loader.env(sec.key("peer_secret_env"), secret_env).encode()
    else:  # every host on the bucket has its secret key, outsiders do not
        peer_key = hmac.new(creds.secret_key.encode(), f"sparkcache-peer\n{bucket}\n{prefix}".encode(),
                          hashlib.sha256).digest()
    if len(peer_key) < 16:
        raise loader.error(sec.key("peer_secret_file" if secret_file is not None else "peer_secret_env"),
                           "the peer secret is too short (at least 16 bytes)")
    out = S3Settings(
        endpoint=endpoint.rstrip("/"), bucket=bucket, region=region, prefix=prefix, addressing=addressing,
        credentials_file=cred_file, credentials=creds, multipart_threshold=max(threshold, part_size),
        part_size=part_size, stream_uploads=stream, attempts=attempts, backoff=sec.convert("backoff", parse_duration, S3Settings.backoff),
        timeout=sec.convert("timeout", parse_duration, S3Settings.timeout),
        share_index=sec.get("share_index", bool, True),
        lease_ttl=lease_ttl,
        sweep=sec.get("sweep", bool, True),
        sweep_interval=sec.convert("sweep_interval", parse_duration, S3Settings.sweep_interval),
        sweep_grace=sec.convert("sweep_grace", parse_duration, S3Settings.sweep_grace),
        max_size=sec.convert("max_size", parse_size, None),
        host_id=host_id,
        peer_url=peer_url, peer_secret_file=secret_file, peer_secret_env=secret_env, peer_key=peer_key,
    )
    if out.sweep_interval <= 0:
        raise loader.error(sec.key("sweep_interval"), "expected a positive duration")
    sec.done()
    return out


def credentials_from_env(loader: Any, path: str, environ: Mapping[str, str]) -> S3Credentials:
    access, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise loader.error(path, "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the "
                           "environment, or name a credentials_file")
    return S3Credentials(access, secret, environ.get("AWS_SESSION_TOKEN") or None, "environment")


def read_credentials_file(loader: Any, key_path: str, path: str) -> S3Credentials:
    """The ``[default]`` profile (or the only one) of an AWS-style credentials file."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise loader.error(key_path, f"cannot read {path}: {e.strerror or e}") from None
    except configparser.Error as e:
        raise loader.error(key_path, f"{path} is not an INI credentials file: {e.message}") from None
    sections = parser.sections()
    name = "default" if "default" in sections else (sections[0] if len(sections) == 1 else None)
    if name is None:
        raise loader.error(key_path, f"{path} has no [default] profile")
    prof = parser[name]
    access, secret = prof.get("aws_access_key_id"), prof.get("aws_secret_access_key")
    if not access or not secret:
        raise loader.error(key_path, f"{path} [{name}] needs aws_access_key_id and aws_secret_access_key")
    return S3Credentials(access.strip(), secret.strip(), (prof.get("aws_session_token") or "").strip() or None, path)


def read_secret_file(loader: Any, key_path: str, path: str) -> bytes:
    """A secret kept in a file of its own (surrounding whitespace ignored)."""
    try:
        with open(path, "rb") as f:
            secret = f.read(4096).strip()
    except OSError as e:
        raise loader.error(key_path, f"cannot read {path}: {e.strerror or e}") from None
    if not secret:
        raise loader.error(key_path, f"{path} is empty")
    return secret
