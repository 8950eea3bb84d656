"""Blocking operations on bare repositories (pygit2 and the git CLI), run in the
git thread pool by sparkcache.git.mirrors, never on the reactor."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pygit2
from pygit2.enums import ReferenceType

from sparkcache.git.credentials import Callbacks

MIRROR_REFSPEC = "+refs/*:refs/*"
# What makes serving cheap and safe; see PROTOCOLS.md (git smart HTTP).
SERVING_CONFIG = {
    "remote.origin.mirror": "true",
    "repack.writeBitmaps": "true",
    "gc.auto": "0",
    "core.commitGraph": "true",
    "uploadpack.allowFilter": "true",
    "uploadpack.allowReachableSHA1InWant": "true",
    "uploadpack.allowAnySHA1InWant": "false",
    "core.logAllRefUpdates": "false",
}
GIT_TIMEOUT = 3600.0
# libgit2 would otherwise wait forever on a silent upstream, holding a pool thread.
CONNECT_TIMEOUT_MS = 15_000
IO_TIMEOUT_MS = 120_000


def git_env() -> dict[str, str]:
    """The whole environment of a git child: no inherited secrets, no prompts."""
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
        "LC_ALL": "C",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
    }


# git children running for maintenance and seeding, so that a stopping daemon
# can end them instead of waiting for a long repack.
_children: set[subprocess.Popen[bytes]] = set()
_children_lock = threading.Lock()


def run_git(args: list[str], cwd: str | None = None, timeout: float = GIT_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run git from a pool thread (never on the reactor); with ``check``, raise on a
    non-zero exit."""
    proc = subprocess.Popen(["git", *args], cwd=cwd, env=git_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    with _children_lock:
        _children.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"git {args[0]} took longer than {timeout:.0f}s") from None
    finally:
        with _children_lock:
            _children.discard(proc)
    if check and proc.returncode != 0:
        msg = err.decode("utf-8", "replace").strip()[-2000:]
        raise RuntimeError(f"git {args[0]} exited {proc.returncode}: {msg}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# "error in commit <id>: missingEmail: ...": an object git would not write today but
# that is intact (old history on real forges has them). Not a reason to re-clone:
# a fresh clone would have the very same objects.
_FORMAT_ISSUE = re.compile(r"^(error|warning) in (commit|tree|tag|blob) [0-9a-f]{40,64}: [A-Za-z]+: ")


def fsck(path: str) -> list[str]:
    """Run ``git fsck``; return the lines that show damage (unreadable, missing or
    mismatching objects), ignoring format complaints about intact objects."""
    proc = run_git(["fsck", "--no-dangling", "--no-progress"], cwd=path, check=False)
    if proc.returncode == 0:
        return []
    lines = (proc.stdout + b"\n" + proc.stderr).decode("utf-8", "replace").splitlines()
    damage = [line for line in lines if line.strip() and not _FORMAT_ISSUE.match(line)
              and not line.startswith(("notice:", "warning:", "Checking", "checking"))]
    # A failure git explained only with format complaints is not damage; one it did not
    # explain at all (killed, out of memory) is not proof of damage either.
    return damage


def terminate_children() -> None:
    """SIGTERM every git child (git removes its temporary files on TERM)."""
    with _children_lock:
        procs = list(_children)
    for p in procs:
        try:
            p.terminate()
        except OSError:
            pass


def read_refs(repo: pygit2.Repository) -> dict[str, str]:
    out: dict[str, str] = {}
    for ref in repo.references.iterator():
        if ref.type == ReferenceType.DIRECT and ref.name.startswith("refs/"):
            out[ref.name] = str(ref.target)
    return out


def dir_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def is_repo(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "HEAD")) and os.path.isdir(os.path.join(path, "objects"))


def origin(repo: pygit2.Repository, url: str) -> Any:
    try:
        remote = repo.remotes["origin"]
    except KeyError:
        return repo.remotes.create("origin", url, MIRROR_REFSPEC)
    if remote.url != url:
        repo.remotes.set_url("origin", url)
        remote = repo.remotes["origin"]
    return remote


def configure(repo: pygit2.Repository, url: str) -> None:
    cfg = repo.config
    for k, v in SERVING_CONFIG.items():
        cfg[k] = v
    origin(repo, url)


def head_target(heads: list[Any]) -> str | None:
    """The upstream's default branch: its HEAD symref, or else (servers that do not
    advertise symrefs) the branch HEAD points at, as ``git clone`` guesses it."""
    head = next((h for h in heads if h.name == "HEAD"), None)
    if head is None:
        return None
    if head.symref_target:
        return str(head.symref_target)
    branches = {h.name: h.oid for h in heads if h.name and h.name.startswith("refs/heads/")}
    for name in ("refs/heads/main", "refs/heads/master", *sorted(branches)):
        if branches.get(name) == head.oid:
            return name
    return None


def head_of(repo: pygit2.Repository) -> str | None:
    """The branch HEAD points at, or None (detached or missing)."""
    try:
        head = repo.references["HEAD"]
    except KeyError:
        return None
    return str(head.target) if head.type == ReferenceType.SYMBOLIC else None


def advertised_refs(heads: list[Any]) -> dict[str, str]:
    """The refs of a ref advertisement, as a mirror stores them (no HEAD, no peeled ``^{}``)."""
    return {h.name: str(h.oid) for h in heads if h.name and h.name.startswith("refs/") and not h.name.endswith("^{}")}


@dataclass
class FetchResult:
    refs: dict[str, str] = field(default_factory=dict)
    changed: bool = False
    cloned: bool = False
    missing: bool = False
    size: int | None = None
    head: str | None = None
    joined: bool = False  # another worker's fetch (its record ended after we asked)


def snapshot(path: str, changed: bool = False, cloned: bool = False) -> FetchResult:
    """The refs, HEAD and size of the repository at ``path``."""
    repo = pygit2.Repository(path)
    try:
        refs, head = read_refs(repo), head_of(repo)
    finally:
        repo.free()
    return FetchResult(refs=refs, changed=changed, cloned=cloned, size=dir_size(path), head=head)


def install(built: str, dest: str, trash_dir: str) -> None:
    """Move a complete repository into place; the one it replaces goes to ``trash_dir``
    (an upload-pack still reading it keeps working: its files move with it)."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.lexists(dest):
        os.makedirs(trash_dir, exist_ok=True)
        os.rename(dest, os.path.join(trash_dir, f"{os.path.basename(dest)}.{time.time_ns()}"))
    os.rename(built, dest)


def bundle_default_branch(list_heads_output: str) -> str | None:
    """The branch a mirror seeded from a bundle points HEAD at (``git bundle
    list-heads`` gives HEAD's commit only, not its branch)."""
    names = [line.split(" ", 1)[1] for line in list_heads_output.splitlines() if " " in line]
    branches = sorted(n for n in names if n.startswith("refs/heads/"))
    for candidate in ("refs/heads/main", "refs/heads/master", *branches):
        if candidate in names:
            return candidate
    return None


UNCHANGED, CHANGED, MISSING = "unchanged", "changed", "missing"


def probe(path: str, url: str, callbacks: Any, known_refs: dict[str, str], known_head: str | None) -> str:
    """Compare the upstream's ref advertisement with what the mirror holds, without
    touching the mirror (so it needs no lock): UNCHANGED, CHANGED or MISSING.
    Raises pygit2.GitError when the upstream cannot be reached."""
    if not is_repo(path):
        return MISSING
    try:
        repo = pygit2.Repository(path)
    except pygit2.GitError:
        return CHANGED  # the refresh path re-clones what cannot be opened
    try:
        # An anonymous remote: no config lookup, and freed (disconnected) right after.
        remote = repo.remotes.create_anonymous(url)
        heads = remote.list_heads(callbacks=callbacks)
        del remote
    finally:
        repo.free()
    if advertised_refs(heads) != known_refs:
        return CHANGED
    target = head_target(heads)
    return CHANGED if target is not None and target != known_head else UNCHANGED


def set_head(repo: pygit2.Repository, target: str | None) -> None:
    if not target or not target.startswith("refs/heads/"):
        return
    try:
        head = repo.references["HEAD"]
        if head.type == ReferenceType.SYMBOLIC and head.target == target:
            return
    except KeyError:
        pass
    repo.references.create("HEAD", target, force=True)


def missing_sync(path: str, oids: list[str]) -> list[str]:
    repo = pygit2.Repository(path)
    try:
        out = []
        for oid in oids:
            try:
                if oid not in repo:
                    out.append(oid)
            except (ValueError, TypeError):
                out.append(oid)
        return out
    finally:
        repo.free()


def remove_stale_locks(path: str, max_age: float) -> int:
    """Remove ``*.lock`` files older than ``max_age`` seconds left by a crashed git."""
    now = time.time()
    removed = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            if f.endswith(".lock"):
                p = os.path.join(root, f)
                try:
                    if now - os.lstat(p).st_mtime > max_age:
                        os.unlink(p)
                        removed += 1
                except OSError:
                    pass
    return removed


# Lock files a ref or config update takes (git and libgit2 alike).
_REF_LOCKS = ("HEAD.lock", "packed-refs.lock", "config.lock", "shallow.lock", "FETCH_HEAD.lock")


def remove_ref_locks(path: str) -> int:
    """Remove the ref and config ``*.lock`` files of a mirror, whatever their age. Only
    for the holder of the mirror's lock across worker processes (git/shared.py): no
    one else updates its refs then, so any such file is a killed worker's leftover,
    which would make every later fetch fail."""
    removed = 0
    candidates = [os.path.join(path, name) for name in _REF_LOCKS]
    for root, _dirs, files in os.walk(os.path.join(path, "refs")):
        candidates += [os.path.join(root, f) for f in files if f.endswith(".lock")]
    for p in candidates:
        try:
            os.unlink(p)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def probe_batch(items: list[tuple[str, str, Any, dict[str, str], str | None]]) -> list[tuple[str, str | None]]:
    # One pool job for many mirrors: a thread hand-off per mirror would cost
    # about as much CPU as the ref advertisement itself.
    out: list[tuple[str, str | None]] = []
    for path, url, creds, refs, head in items:
        try:
            out.append((probe(path, url, Callbacks(creds), refs, head), None))
        except pygit2.GitError as e:
            out.append(("error", str(e)))
    return out


def fetch_bundle(bundle: str, repo_path: str) -> None:
    try:
        run_git(["fetch", "--quiet", "--no-write-fetch-head", bundle, MIRROR_REFSPEC], cwd=repo_path)
    except RuntimeError as e:
        # Typically a thin bundle whose prerequisite commits the mirror lacks.
        raise ValueError(f"the bundle cannot be applied to this mirror: {e}") from None


def _fast_forward(repo: pygit2.Repository, old: pygit2.Oid, new: pygit2.Oid) -> bool:
    try:
        old_c = repo[old].peel(pygit2.Commit).id
        new_c = repo[new].peel(pygit2.Commit).id
    except (KeyError, ValueError, pygit2.GitError):
        return False  # a ref to a tree or blob, or a tag of one: never moved
    return old == new or bool(repo.descendant_of(new_c, old_c))


def seed_refs(bundle: str, repo_path: str) -> list[str]:
    """Apply a bundle to an existing mirror: all of its objects, then each ref that
    is new or a fast-forward of the mirror's. A bundle may be older than the mirror
    (made before the last fetch): a branch it would move back, or a diverged one,
    is left alone and returned. Runs under the mirror's lock."""
    try:
        # unbundle stores the objects (checking prerequisites) and prints the refs
        # without updating any, so each one can be checked first.
        listed = run_git(["bundle", "unbundle", bundle], cwd=repo_path).stdout.decode("utf-8", "replace")
    except RuntimeError as e:
        raise ValueError(f"the bundle cannot be applied to this mirror: {e}") from None
    skipped: list[str] = []
    repo = pygit2.Repository(repo_path)
    try:
        for line in listed.splitlines():
            sha, _, name = line.strip().partition(" ")
            if not name.startswith("refs/"):
                continue
            new = pygit2.Oid(hex=sha)
            try:
                ref = repo.references[name]
            except KeyError:
                repo.references.create(name, new)
                continue
            if ref.type != ReferenceType.DIRECT:
                skipped.append(name)
            elif ref.target != new:
                if _fast_forward(repo, ref.target, new):  # type: ignore[arg-type]
                    ref.set_target(new)
                else:
                    skipped.append(name)
    finally:
        repo.free()
    return skipped


def load_refs(path: str) -> tuple[dict[str, str], str | None] | None:
    """The refs and HEAD branch of the mirror at ``path``, or None when there is none."""
    if not is_repo(path):
        return None
    try:
        repo = pygit2.Repository(path)
    except pygit2.GitError:
        return {}, None  # differs from any upstream: the refresh re-clones it
    try:
        return read_refs(repo), head_of(repo)
    finally:
        repo.free()
