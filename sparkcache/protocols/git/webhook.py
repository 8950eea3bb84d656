"""``POST /git/webhook``: forge push events refresh the named mirror at once.

Which forge sent the event is read from its headers; each forge kind has its
own secret (``git.webhooks``), checked before the body is parsed:

- GitHub: ``X-GitHub-Event``, ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>``;
- GitLab: ``X-Gitlab-Event``, ``X-Gitlab-Token: <the secret itself>``;
- Gitea / Forgejo: ``X-Gitea-Event`` / ``X-Forgejo-Event``, ``X-Gitea-Signature`` /
  ``X-Forgejo-Signature: <hex HMAC-SHA256 of the body>`` (both send GitHub's
  headers too, so they are recognised first).

Every comparison is constant-time (hmac.compare_digest). A bad or missing
signature is a 401; a push event, valid, is a 202 whether or not the
repository is mirrored here (the answer says nothing about what is
registered); other events (ping, issues...) are a 202 that does nothing. The
repository is matched by the clone URLs in the payload (https and ssh forms
alike, see registry.url_key).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Mapping

from twisted.logger import Logger

from sparkcache.web.errors import HTTPError
from sparkcache.web.serve import header

log = Logger()
MAX_PAYLOAD = 8 << 20  # GitHub caps payloads at 25 MB, but a push's is far smaller
ZERO = "0" * 40

# (forge, event header, signature header) in the order they are recognised.
FORGES = (
    ("forgejo", b"x-forgejo-event", b"x-forgejo-signature"),
    ("gitea", b"x-gitea-event", b"x-gitea-signature"),
    ("gitlab", b"x-gitlab-event", b"x-gitlab-token"),
    ("github", b"x-github-event", b"x-hub-signature-256"),
)
PUSH_EVENTS = {"push", "Push Hook", "Tag Push Hook"}
URL_FIELDS = ("clone_url", "git_url", "ssh_url", "html_url", "git_http_url", "git_ssh_url", "http_url",
              "web_url", "url", "homepage", "svn_url")


def identify(request: Any) -> tuple[str, str, str | None]:
    """(forge, event, signature header value) of a webhook request; HTTPError 400 when
    no known forge sent it."""
    for forge, event_header, sig_header in FORGES:
        event = header(request, event_header)
        if event:
            return forge, event, header(request, sig_header)
    raise HTTPError(400, "not a forge webhook: expected X-GitHub-Event, X-Gitlab-Event, "
                         "X-Gitea-Event or X-Forgejo-Event")


def verify(forge: str, secret: str, signature: str | None, body: bytes) -> bool:
    """Whether ``signature`` (the header's value) proves the sender knows ``secret``."""
    if not signature:
        return False
    if forge == "gitlab":
        return hmac.compare_digest(signature.encode("utf-8", "replace"), secret.encode())
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    given = signature.strip()
    if forge == "github":
        if not given.startswith("sha256="):
            return False
        given = given[len("sha256="):]
    return hmac.compare_digest(given.lower().encode("ascii", "replace"), expected.encode())


def clone_urls(payload: Any) -> list[str]:
    """The repository URLs a push payload names (GitHub/Gitea ``repository``, GitLab ``project``)."""
    out: list[str] = []
    if not isinstance(payload, dict):
        return out
    for key in ("repository", "project"):
        repo = payload.get(key)
        if isinstance(repo, dict):
            for f in URL_FIELDS:
                v = repo.get(f)
                if isinstance(v, str) and v and len(v) < 2048 and v not in out:
                    out.append(v)
    return out


def updates(payload: Any) -> dict[str, str]:
    """ref → new id of a push (``ref`` and ``after``); empty for a deletion or an odd payload."""
    if not isinstance(payload, dict):
        return {}
    ref, after = payload.get("ref"), payload.get("after")
    if isinstance(ref, str) and isinstance(after, str) and ref.startswith("refs/") and after.strip("0"):
        return {ref: after}
    return {}


def handle(secrets: Mapping[str, str], request: Any, body: bytes, mirrors: Any) -> tuple[int, dict[str, Any]]:
    """Answer one webhook (the body already read); starts the refresh, never waits for it."""
    forge, event, signature = identify(request)
    secret = secrets.get(forge)
    if secret is None:
        # Not configured for this forge: nobody can prove anything, same answer as a bad signature.
        raise HTTPError(401, f"webhooks from {forge} are not accepted here (no git.webhooks.{forge} secret)")
    if not verify(forge, secret, signature, body):
        log.info("git webhook: bad or missing {forge} signature", forge=forge)
        raise HTTPError(401, "bad or missing webhook signature")
    if event not in PUSH_EVENTS:
        return 202, {"accepted": True, "event": event, "action": "ignored"}
    try:
        payload = json.loads(body)
    except ValueError:
        raise HTTPError(400, "the webhook body is not JSON") from None
    registry = mirrors.registry
    for url in clone_urls(payload):
        try:
            reg = registry.by_url(url)
        except ValueError:
            continue
        if reg is not None:
            mirror = registry.mirror(reg)
            log.info("git webhook: {forge} push to {name}; refreshing", forge=forge, name=reg.name)
            d = mirrors.pushed(mirror, updates(payload))
            d.addErrback(lambda f, n=reg.name: log.warn("git webhook: refreshing {name} failed: {why}", name=n,
                                                        why=f.getErrorMessage()))
            break
    # The same answer whether the repository is mirrored or not.
    return 202, {"accepted": True, "event": event}
